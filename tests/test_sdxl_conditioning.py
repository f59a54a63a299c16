"""SDXL text conditioning (lcm_lab.models.sdxl) on tiny random CLIP text encoders.

The tokenizers are rebuilt offline from open_clip's BPE (lcm_lab.toy.tokenizer); the encoders are a
random ``CLIPTextModel`` and ``CLIPTextModelWithProjection`` (hidden 32, 2 layers, projection 32).
"""

import json

import pytest
import torch

from lcm_lab.models.sdxl import (
    SDXL_TEXT_PARTS,
    encode_prompts_sdxl,
    load_sdxl_text,
    make_time_ids,
    sdxl_uncond,
)
from lcm_lab.core.conditioning import Conditioning

pytestmark = pytest.mark.usefixtures("single_thread_torch")

HIDDEN = 32
PROJ = 32
PROMPTS = ["a photo of a cat", "", "an oil painting of a lighthouse at dusk"]


def _clip_config(**extra):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=49408, hidden_size=HIDDEN, intermediate_size=37, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406,
                          eos_token_id=49407, pad_token_id=49407, **extra)


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    """A folder in the real SDXL layout holding the tiny encoders and tokenizers."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from lcm_lab.toy.tokenizer import write_clip_tokenizer

    root = tmp_path_factory.mktemp("sdxl")
    write_clip_tokenizer(root / "tokenizer")
    tok2 = write_clip_tokenizer(root / "tokenizer_2")
    # SDXL's second tokenizer pads with "!" (id 0); mirror that so the two tokenizers differ.
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        cfg = json.loads((tok2 / name).read_text())
        cfg["pad_token"] = "!"
        (tok2 / name).write_text(json.dumps(cfg))
    torch.manual_seed(0)
    CLIPTextModel(_clip_config()).eval().save_pretrained(root / "text_encoder")
    torch.manual_seed(1)
    CLIPTextModelWithProjection(_clip_config(projection_dim=PROJ)).eval().save_pretrained(root / "text_encoder_2")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    return root


@pytest.fixture(scope="module")
def text(sdxl_dir):
    return load_sdxl_text(sdxl_dir)


def _ids(tok, prompts):
    return tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids


def test_load_sdxl_text_types_and_frozen(text):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    assert type(text.text_encoder) is CLIPTextModel
    assert type(text.text_encoder_2) is CLIPTextModelWithProjection
    assert text.tokenizer.model_max_length == 77 and text.tokenizer_2.model_max_length == 77
    assert text.tokenizer_2.pad_token == "!" and text.tokenizer.pad_token == "<|endoftext|>"
    for enc in text.text_encoders:
        assert not enc.training
        assert not any(p.requires_grad for p in enc.parameters())


def test_shapes(text):
    cond = text.encode(PROMPTS, original_size=(64, 64))
    assert isinstance(cond, Conditioning)
    assert cond.encoder_hidden_states.shape == (3, 77, 2 * HIDDEN)
    assert cond.added_cond_kwargs["text_embeds"].shape == (3, PROJ)
    assert cond.added_cond_kwargs["time_ids"].shape == (3, 6)
    assert cond.encoder_hidden_states.dtype == torch.float32
    assert cond.added_cond_kwargs["time_ids"].dtype == torch.float32
    assert len(cond) == 3
    assert not cond.encoder_hidden_states.requires_grad


def test_hidden_states_are_penultimate_and_concatenated(text):
    cond = encode_prompts_sdxl(text.tokenizers, text.text_encoders, PROMPTS)
    with torch.no_grad():
        out1 = text.text_encoder(_ids(text.tokenizer, PROMPTS), output_hidden_states=True)
        out2 = text.text_encoder_2(_ids(text.tokenizer_2, PROMPTS), output_hidden_states=True)
    assert len(out1.hidden_states) == 3  # embeddings + 2 layers
    expected = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
    torch.testing.assert_close(cond.encoder_hidden_states, expected, rtol=0, atol=0)
    # penultimate, not the last layer / final-layer-normed output
    last = torch.cat([out1.last_hidden_state, out2.last_hidden_state], dim=-1)
    assert (cond.encoder_hidden_states - last).abs().max() > 1e-3
    assert (out1.hidden_states[-1] - out1.hidden_states[-2]).abs().max() > 1e-3
    # the two tokenizers pad differently: each encoder must get its own ids
    assert not torch.equal(_ids(text.tokenizer, PROMPTS), _ids(text.tokenizer_2, PROMPTS))


def test_pooled_is_second_encoder_text_embeds(text):
    cond = text.encode(PROMPTS)
    with torch.no_grad():
        out2 = text.text_encoder_2(_ids(text.tokenizer_2, PROMPTS))
    torch.testing.assert_close(cond.added_cond_kwargs["text_embeds"], out2.text_embeds, rtol=0, atol=0)
    assert not torch.allclose(cond.added_cond_kwargs["text_embeds"], out2.last_hidden_state[:, 0])


def test_time_ids_values(text):
    cond = text.encode(PROMPTS[:2], original_size=(512, 768), crop_top_left=(16, 32), target_size=(1024, 1024))
    expected = torch.tensor([[512.0, 768, 16, 32, 1024, 1024]] * 2)
    assert torch.equal(cond.added_cond_kwargs["time_ids"], expected)
    # target_size defaults to original_size; crop defaults to (0, 0)
    ids = text.encode(["x"], original_size=(640, 480)).added_cond_kwargs["time_ids"]
    assert torch.equal(ids, torch.tensor([[640.0, 480, 0, 0, 640, 480]]))
    # per-prompt sizes and crops (multi-aspect / random-crop training)
    ids = make_time_ids(2, [(100, 200), (300, 400)], [(1, 2), (3, 4)], (64, 64))
    assert torch.equal(ids, torch.tensor([[100.0, 200, 1, 2, 64, 64], [300, 400, 3, 4, 64, 64]]))
    with pytest.raises(ValueError):
        make_time_ids(3, [(100, 200), (300, 400)])
    with pytest.raises(ValueError):
        make_time_ids(1, (1, 2, 3))


def test_empty_and_long_prompts(text):
    cond = text.encode([""])  # caption dropout: allowed
    assert torch.isfinite(cond.encoder_hidden_states).all()
    long = " ".join(["word"] * 200)
    a = text.encode([long, long + " and then a dragon"])
    assert a.encoder_hidden_states.shape[1] == 77
    # both truncated to the same 77 tokens
    torch.testing.assert_close(a.encoder_hidden_states[0], a.encoder_hidden_states[1], rtol=0, atol=0)
    torch.testing.assert_close(a.added_cond_kwargs["text_embeds"][0], a.added_cond_kwargs["text_embeds"][1],
                               rtol=0, atol=0)
    # a single string works and equals the one-element list
    torch.testing.assert_close(text.encode("a cat").encoder_hidden_states, text.encode(["a cat"]).encoder_hidden_states)


def test_bad_arguments(text):
    with pytest.raises(ValueError):
        encode_prompts_sdxl([text.tokenizer], [text.text_encoder], ["a"])
    with pytest.raises(ValueError):
        encode_prompts_sdxl(text.tokenizers, text.text_encoders, [])
    with pytest.raises(ValueError, match="CLIPTextModelWithProjection"):
        encode_prompts_sdxl(text.tokenizers, (text.text_encoder, text.text_encoder), ["a"])


def test_sdxl_uncond(text):
    cond = text.encode(PROMPTS, original_size=(64, 96), crop_top_left=(0, 8))
    un = sdxl_uncond(cond)
    assert un.encoder_hidden_states.shape == (1, 77, 2 * HIDDEN)
    assert un.added_cond_kwargs["text_embeds"].shape == (1, PROJ)
    assert torch.count_nonzero(un.encoder_hidden_states) == 0
    assert torch.count_nonzero(un.added_cond_kwargs["text_embeds"]) == 0
    # as the reference script: the size/crop micro-conditioning is not zeroed; LCDLoss takes it per
    # sample from the conditional batch
    assert "time_ids" not in un.added_cond_kwargs
    zeros = sdxl_uncond(cond, time_ids="zeros")
    assert torch.count_nonzero(zeros.added_cond_kwargs["time_ids"]) == 0
    assert zeros.added_cond_kwargs["time_ids"].shape == (1, 6)
    # broadcasts to the batch like LCDLoss does with it
    assert un.expand(3).encoder_hidden_states.shape == cond.encoder_hidden_states.shape
    with pytest.raises(ValueError):
        sdxl_uncond(Conditioning(cond.encoder_hidden_states))
    with pytest.raises(ValueError):
        sdxl_uncond(cond, time_ids="ones")


def test_save_load_roundtrip(sdxl_dir, text, tmp_path):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    # the folder's parts are stock transformers objects
    tok = CLIPTokenizer.from_pretrained(str(sdxl_dir / "tokenizer_2"))
    enc1 = CLIPTextModel.from_pretrained(str(sdxl_dir / "text_encoder"))
    enc2 = CLIPTextModelWithProjection.from_pretrained(str(sdxl_dir / "text_encoder_2"))
    direct = encode_prompts_sdxl((CLIPTokenizer.from_pretrained(str(sdxl_dir / "tokenizer")), tok), (enc1, enc2),
                                 PROMPTS)
    loaded = text.encode(PROMPTS)
    torch.testing.assert_close(loaded.encoder_hidden_states, direct.encoder_hidden_states, rtol=0, atol=0)
    torch.testing.assert_close(loaded.added_cond_kwargs["text_embeds"], direct.added_cond_kwargs["text_embeds"],
                               rtol=0, atol=0)
    # a second save -> load cycle in the same layout gives the same conditioning
    out = tmp_path / "copy"
    for name in ("tokenizer", "tokenizer_2"):
        getattr(text, name).save_pretrained(out / name)
    for name in ("text_encoder", "text_encoder_2"):
        getattr(text, name).save_pretrained(out / name)
    again = load_sdxl_text(out).encode(PROMPTS)
    torch.testing.assert_close(again.encoder_hidden_states, loaded.encoder_hidden_states, rtol=0, atol=0)
    # dtype argument
    half = load_sdxl_text(out, dtype=torch.bfloat16)
    assert half.text_encoder_2.dtype == torch.bfloat16
    assert half.encode(["a"]).encoder_hidden_states.dtype == torch.bfloat16


@pytest.mark.parametrize("missing", SDXL_TEXT_PARTS)
def test_missing_subfolder_error(sdxl_dir, tmp_path, missing):
    import shutil

    copy = tmp_path / "partial"
    shutil.copytree(sdxl_dir, copy)
    shutil.rmtree(copy / missing)
    with pytest.raises(FileNotFoundError) as err:
        load_sdxl_text(copy)
    msg = str(err.value)
    assert f"{missing}/" in msg
    assert "huggingface-cli download stabilityai/stable-diffusion-xl-base-1.0 --local-dir DIR" in msg
    # the other parts are not reported missing
    head = msg.split("; ")[0]
    for other in SDXL_TEXT_PARTS:
        if other != missing:
            assert f"{other}/" not in head


def test_missing_folder_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="huggingface-cli download"):
        load_sdxl_text(tmp_path / "nope")
