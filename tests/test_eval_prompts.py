"""Prompt sets: text files (blank lines counted, over-long lines reported), the HPSv2 benchmark
layout, COCO captions, the toy held-out prompts, and clear errors for missing/malformed files."""

import json

import pytest

from lcm_lab.eval.prompts import (HPS_STYLES, PromptSet, coco_captions, count_tokens, hps_prompts, load_prompt_set,
                                  read_prompt_file, toy_prompts)

pytestmark = pytest.mark.usefixtures("single_thread_torch")

LONG = " ".join(["a very long and detailed prompt about a red circle"] * 12)  # ~121 CLIP tokens


def test_text_file_blank_lines_and_long_lines(tmp_path):
    file = tmp_path / "prompts.txt"
    file.write_text("a red circle\n\n   \n  a blue square  \n" + LONG + "\n\n", encoding="utf-8")
    pset = read_prompt_file(file)
    assert isinstance(pset, PromptSet) and pset.name == str(file)
    assert pset.prompts == ["a red circle", "a blue square", LONG]
    assert pset.metadata == [{"line": 1}, {"line": 4}, {"line": 5}]
    assert pset.skipped_blank == 3  # lines 2, 3 (whitespace only) and 6
    assert [line for line, _ in pset.too_long] == [5] and pset.too_long[0][1] > 77
    assert any("3 blank" in n for n in pset.notes) and any("line" in n and "5" in n for n in pset.notes)
    assert count_tokens(["a red circle"]) == [5]  # <start> a red circle <end>
    assert load_prompt_set(str(file)).prompts == pset.prompts
    file.write_text("a red circle\n", encoding="utf-8-sig")  # as some editors save: the BOM is no prompt text
    assert read_prompt_file(file).prompts == ["a red circle"]


def test_text_file_token_check_with_a_model_tokenizer(tmp_path):
    from transformers import CLIPTokenizer

    from lcm_lab.toy.tokenizer import write_clip_tokenizer

    tok = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp_path / "tok", model_max_length=32))
    file = tmp_path / "p.txt"
    words = " ".join(["word"] * 31)  # 31 + 2 = 33 tokens
    file.write_text(f"short prompt\n{words}\n")
    pset = read_prompt_file(file, tokenizer=tok, max_tokens=32)
    assert pset.too_long == [(2, 33)]
    assert read_prompt_file(file, max_tokens=None).too_long == []


def test_text_file_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_prompt_file(tmp_path / "missing.txt")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n")
    with pytest.raises(ValueError, match="blank.txt"):
        read_prompt_file(blank)
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match="binary.txt"):
        read_prompt_file(binary)
    with pytest.raises(ValueError, match="empty prompt-set spec"):
        load_prompt_set("")


def _hps_folder(root, n=3):
    root.mkdir()
    for style in HPS_STYLES:
        (root / f"{style}.json").write_text(json.dumps([f"{style} prompt {i}" for i in range(n)]))
    return root


def test_hps_benchmark_layout(tmp_path):
    folder = _hps_folder(tmp_path / "hps")
    pset = hps_prompts(folder)
    assert len(pset) == 12 and pset.name == f"hps:{folder}"
    # styles interleaved: any prefix of the set (an evaluation with fewer samples) covers them evenly
    assert [m["style"] for m in pset.metadata] == list(HPS_STYLES) * 3
    assert pset[5] == ("concept-art prompt 1", {"style": "concept-art", "index": 1})
    limited = load_prompt_set(f"hps:{folder}", per_style=2)
    assert len(limited) == 8 and limited.prompts[:2] == ["anime prompt 0", "concept-art prompt 0"]
    assert sorted(m["index"] for m in limited.metadata) == [0, 0, 0, 0, 1, 1, 1, 1]


@pytest.mark.parametrize("content", ['{"prompts": ["a"]}', "[1, 2]", "not json", "[]", '["ok", ""]'])
def test_hps_malformed_style_file(tmp_path, content):
    folder = _hps_folder(tmp_path / "hps")
    (folder / "paintings.json").write_text(content)
    with pytest.raises(ValueError, match="paintings.json"):
        hps_prompts(folder)


def test_hps_missing_folder_or_style(tmp_path):
    with pytest.raises(FileNotFoundError, match="anime.json"):
        hps_prompts(tmp_path / "nope")
    folder = _hps_folder(tmp_path / "hps")
    (folder / "photo.json").unlink()
    with pytest.raises(FileNotFoundError, match="photo.json"):
        hps_prompts(folder)


def _coco(path):
    annotations = [
        {"image_id": 42, "id": 9, "caption": "A dog  on a\nbeach."},
        {"image_id": 7, "id": 30, "caption": "second caption of seven"},
        {"image_id": 42, "id": 3, "caption": "The first caption of 42."},
        {"image_id": 7, "id": 12, "caption": "A cat on a sofa."},
        {"image_id": 100, "id": 50, "caption": "A bus."},
        {"image_id": 5, "id": 51, "caption": "A kite."},
    ]
    images = [{"id": 42, "file_name": "COCO_val2014_000000000042.jpg"}, {"id": 7, "file_name": "7.jpg"}]
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path


def test_coco_one_caption_per_image_deterministic(tmp_path):
    file = _coco(tmp_path / "captions_val2014.json")
    pset = coco_captions(file)
    assert [m["image_id"] for m in pset.metadata] == [5, 7, 42, 100]
    assert pset.prompts == ["A kite.", "A cat on a sofa.", "The first caption of 42.", "A bus."]
    assert pset.metadata[2] == {"image_id": 42, "caption_id": 3, "file_name": "COCO_val2014_000000000042.jpg"}
    assert pset.metadata[0]["file_name"] is None
    # same annotations in another order: same choice
    data = json.loads(file.read_text())
    data["annotations"].reverse()
    other = tmp_path / "reordered.json"
    other.write_text(json.dumps(data))
    assert coco_captions(other).prompts == pset.prompts
    # a seeded subset, kept in image-id order, reproducible
    a, b = coco_captions(file, limit=2, seed=1), load_prompt_set(f"coco:{file}", num=2, seed=1)
    assert len(a) == 2 and a.prompts == b.prompts
    ids = [m["image_id"] for m in a.metadata]
    assert ids == sorted(ids) and set(ids) <= {5, 7, 42, 100} and a.notes
    assert coco_captions(file, limit=10).prompts == pset.prompts  # limit above size: everything


@pytest.mark.parametrize("data", [[{"image_id": 1, "caption": "x"}], {"annotations": []},
                                  {"annotations": [{"image_id": "1", "caption": "x"}]},
                                  {"annotations": [{"image_id": 1, "caption": "  "}]},
                                  {"annotations": [{"image_id": 1, "caption": "x", "id": "a"}]}])
def test_coco_malformed(tmp_path, data):
    file = tmp_path / "captions_bad.json"
    file.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="captions_bad.json"):
        coco_captions(file)


def test_coco_missing_or_not_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="captions_none.json"):
        coco_captions(tmp_path / "captions_none.json")
    bad = tmp_path / "captions_text.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="captions_text.json"):
        load_prompt_set(f"coco:{bad}")


def test_toy_prompts_carry_attributes():
    from lcm_lab.eval.toy import eval_prompts

    pset = load_prompt_set("toy", num=5)
    prompts, attrs = eval_prompts(5)
    assert pset.name == "toy" and pset.prompts == prompts
    assert [m["attributes"] for m in pset.metadata] == attrs
    assert toy_prompts(2, start=3).metadata[0]["index"] == 3
    with pytest.raises(ValueError):
        toy_prompts(0)
