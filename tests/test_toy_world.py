"""The toy world's dataset, captions, tokenizer and judge container (no trained assets needed)."""

import json
import os
import socket

import numpy as np
import pytest
import torch


from lcm_lab.toy.world import (
    ATTRIBUTES, HELD_OUT, ToyWorld, all_combinations, attribute_labels, caption_for, parse_caption,
)

pytestmark = pytest.mark.usefixtures("single_thread_torch")


def test_same_seed_same_samples_any_order():
    a, b = ToyWorld(seed=3), ToyWorld(seed=3)
    images, captions, labels = a.arrays(6, start=10)
    for j, i in enumerate(reversed(range(10, 16))):  # reverse order, fresh object
        s = b[i]
        k = 5 - j
        assert np.array_equal(s.image, images[k])
        assert s.caption == captions[k]
        assert attribute_labels(s.attributes) == labels[k].tolist()


def test_seeds_and_splits_differ():
    x = ToyWorld(seed=0).arrays(8)[0]
    assert not np.array_equal(x, ToyWorld(seed=1).arrays(8)[0])
    assert not np.array_equal(x, ToyWorld(seed=0, split="eval").arrays(8)[0])


def test_images_are_32px_rgb_with_both_backgrounds():
    images, _, labels = ToyWorld(0).arrays(64)
    assert images.shape == (64, 32, 32, 3) and images.dtype == np.uint8
    bg = labels[:, list(ATTRIBUTES).index("background")]
    corner = images[:, 0, 0].mean(1)  # corners are background: dark < 80 < light
    assert (corner[bg == 0] < 80).all() and (corner[bg == 1] > 180).all()


def test_stripes_are_fine_detail():
    world = ToyWorld(0)
    solid = {"shape": "square", "color": "red", "size": "large", "position": "left",
             "background": "dark", "pattern": "solid"}
    from lcm_lab.toy.world import render

    a = render(solid, np.random.default_rng(0)).astype(float)
    b = render({**solid, "pattern": "striped"}, np.random.default_rng(0)).astype(float)
    # Vertical high-frequency energy inside the shape is much larger with stripes.
    inner = (slice(11, 21), slice(5, 13))
    assert np.abs(np.diff(b[inner], axis=0)).mean() > 20 * np.abs(np.diff(a[inner], axis=0)).mean() + 10
    assert world.size == 32


def test_held_out_combinations():
    train = all_combinations("train")
    compose = all_combinations("compose")
    assert len(train) >= 100 and len(train) + len(compose) == np.prod([len(v) for v in ATTRIBUTES.values()])
    key = lambda a: (a["shape"], a["color"], a["pattern"])  # noqa: E731
    assert all(key(a) not in HELD_OUT for a in train)
    assert all(key(a) in HELD_OUT for a in compose)
    seen = {key(ToyWorld(0).attributes(i)) for i in range(3000)}
    assert not seen & HELD_OUT
    assert {key(ToyWorld(0, "compose").attributes(i)) for i in range(200)} <= HELD_OUT


def test_caption_round_trip_and_errors():
    world = ToyWorld(0)
    for i in range(50):
        s = world[i]
        assert parse_caption(s.caption) == s.attributes
    attrs = world.attributes(0)
    for t in range(3):
        assert parse_caption(caption_for(attrs, t)) == attrs
    with pytest.raises(ValueError, match="does not name"):
        parse_caption("a red circle")
    with pytest.raises(ValueError, match="two values"):
        parse_caption("a small large red striped circle on the left, dark background")
    with pytest.raises(ValueError, match="unknown split"):
        ToyWorld(0, "test")


def test_write_folder(tmp_path):
    from PIL import Image

    world = ToyWorld(5)
    # an interrupted write's files must not end up in the folder
    stale = tmp_path / f"data.partial-{socket.gethostname()}-{os.getpid()}"
    stale.mkdir()
    (stale / "0000009.png").write_bytes(b"stale")
    out = world.write_folder(tmp_path / "data", 4)
    assert sorted(p.name for p in out.iterdir()) == [f"{i:07d}.png" for i in range(4)] + ["metadata.jsonl"]
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    for i, row in enumerate(rows):
        assert row["text"] == world[i].caption
        assert np.array_equal(np.asarray(Image.open(out / row["file_name"])), world[i].image)
    assert not stale.exists()
    with pytest.raises(FileExistsError):
        world.write_folder(out, 1)


def test_tokenizer_matches_open_clip(tmp_path):
    import open_clip

    from lcm_lab.toy.tokenizer import load_clip_tokenizer, write_clip_tokenizer

    tok = load_clip_tokenizer(write_clip_tokenizer(tmp_path / "tok"))
    texts = [s.caption for s in (ToyWorld(0)[i] for i in range(20))]
    texts += ["Hello, World!  café naïve 123 — emoji 😀", "", "UPPER case, punctuation... & symbols #1", "word " * 100]
    ids = tok(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    ref = open_clip.tokenize(texts)
    # Equal up to and including the first end-of-text token; after it both only pad.
    eot = torch.cumsum((ids == 49407).int(), 1)
    after = (eot >= 1) & ~((eot == 1) & (ids == 49407))
    assert torch.equal(ids.masked_fill(after, 0), ref)
    assert (ids[after] == tok.pad_token_id).all()
    assert len(tok.get_vocab()) == 49408


def test_judge_save_load_round_trip(tmp_path):
    from lcm_lab.toy.judge import AttributeJudge

    torch.manual_seed(0)
    judge = AttributeJudge().eval()
    judge.save_pretrained(tmp_path / "judge")
    loaded = AttributeJudge.from_pretrained(tmp_path / "judge")
    x = torch.rand(3, 3, 32, 32)
    assert torch.equal(judge.features(x), loaded.features(x))
    assert judge.predict(x).shape == (3, 6)
    with pytest.raises(FileNotFoundError, match="build_toy_assets"):
        AttributeJudge.from_pretrained(tmp_path / "missing")
