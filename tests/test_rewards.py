"""Reward-model zoo: every loader on a tiny same-family model saved in the real format, scores
checked against an independent computation with the raw model, gradients, preprocessing,
JPEG rewards, the registry and weighted specs, and missing-weight errors."""

import importlib.util
import io
import json
import pickle
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lcm_lab import rewards
from lcm_lab.rewards import (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, AestheticReward, CLIPScoreReward, HPSv2Reward,
                             PickScoreReward, WeightedReward, load_reward, parse_reward_spec, parse_reward_terms,
                             preprocess_images)

pytestmark = pytest.mark.usefixtures("single_thread_torch")

TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
PROMPTS = ["a red circle on the left", "a large blue square", "a small striped yellow triangle"]
ENV_VARS = ["LCM_LAB_CLIP_CHECKPOINT", "LCM_LAB_CLIP_ARCH", "LCM_LAB_HPS_CHECKPOINT", "LCM_LAB_PICKSCORE_DIR",
            "LCM_LAB_PICKSCORE_PROCESSOR_DIR", "LCM_LAB_AESTHETIC_HEAD", "LCM_LAB_AESTHETIC_CLIP_CHECKPOINT",
            "LCM_LAB_IMAGEREWARD_CHECKPOINT", "LCM_LAB_TOY_CLIP_DIR"]


@pytest.fixture(autouse=True)
def _no_weight_env(monkeypatch):
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)


def _images(n=3, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _normalise(x, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD):
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _check_gradients(reward, images=None, prompts=PROMPTS):
    images = (_images() if images is None else images).clone().requires_grad_()
    scores = reward(images, prompts)
    assert scores.shape == (images.shape[0],) and scores.dtype == torch.float32
    scores.sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all()
    assert images.grad.abs().sum() > 0
    params = list(reward.parameters())
    assert params and all(not p.requires_grad and p.grad is None for p in params)
    assert not any(m.training for m in reward.modules())


# ----------------------------------------------------------------------------- tiny models on disk


@pytest.fixture(scope="module")
def open_clip_raw():
    """A random tiny open_clip CLIP (ViT image tower) and its state dict."""
    import open_clip

    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY_OPEN_CLIP).eval()
    return model, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def open_clip_dir(tmp_path_factory, open_clip_raw):
    """The tiny model as an open_clip ``local-dir`` folder (toy-clip / HF open_clip layout)."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("open_clip_tiny")
    config = {"model_cfg": TINY_OPEN_CLIP,
              "preprocess_cfg": {"size": 32, "mean": list(OPENAI_CLIP_MEAN), "std": list(OPENAI_CLIP_STD),
                                 "interpolation": "bicubic", "resize_mode": "shortest"}}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in open_clip_raw[1].items()}, str(folder / "open_clip_model.safetensors"))
    return folder


@pytest.fixture(scope="module")
def hps_checkpoint(tmp_path_factory, open_clip_raw):
    """The tiny model in the HPS checkpoint format: torch file with the state dict under 'state_dict'."""
    folder = tmp_path_factory.mktemp("hps")
    torch.save({"state_dict": open_clip_raw[1], "epoch": 1}, folder / "HPS_v2.1_compressed.pt")
    (folder / "tiny_arch.json").write_text(json.dumps({"model_cfg": TINY_OPEN_CLIP}))
    return folder


def _open_clip_reference(open_clip_raw, images, prompts):
    """cos(image, text) computed with the raw open_clip model on 32 px images."""
    from open_clip import SimpleTokenizer

    model = open_clip_raw[0]
    with torch.no_grad():
        img = model.encode_image(_normalise(images))
        txt = model.encode_text(SimpleTokenizer(context_length=16)(prompts))
    return F.cosine_similarity(img, txt, dim=-1)


# ----------------------------------------------------------------------------- preprocessing


def test_preprocess_resize_crop_normalise_matches_torchvision():
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    images = torch.rand(2, 3, 48, 64, generator=torch.Generator().manual_seed(1))  # H=48, W=64
    ours = preprocess_images(images, 32)
    ref = TF.resize(images, [32], interpolation=InterpolationMode.BICUBIC, antialias=True)
    assert ref.shape[-2:] == (32, 42)
    ref = TF.normalize(TF.center_crop(ref, [32, 32]), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    assert ours.shape == (2, 3, 32, 32)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_preprocess_exact_crop_and_normalise_by_hand():
    images = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(2))  # short side already 32
    out = preprocess_images(images, 32, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 2.0))
    expected = (images[..., :, 8:40] - torch.tensor([0.5, 0.25, 0.0]).view(1, 3, 1, 1)) / torch.tensor(
        [0.5, 0.25, 2.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    const = preprocess_images(torch.full((1, 3, 64, 64), 0.75), 32)  # a flat image stays flat
    torch.testing.assert_close(const, _normalise(torch.full((1, 3, 32, 32), 0.75)), atol=1e-5, rtol=0)


def test_preprocess_longest_pads_like_hps():
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    images = torch.rand(1, 3, 48, 64, generator=torch.Generator().manual_seed(3))
    out = preprocess_images(images, 32, resize_mode="longest")
    ref = TF.resize(images, [24, 32], interpolation=InterpolationMode.BICUBIC, antialias=True)
    ref = TF.normalize(F.pad(ref, (0, 0, 4, 4), value=0.0), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="resize_mode"):
        preprocess_images(images, 32, resize_mode="nearest")
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        preprocess_images(images[0], 32)


def test_antialiased_preprocess_matches_pil_bicubic():
    """Metrics resize like the PIL pipelines the models were published with; the plain resize does not."""
    from PIL import Image

    g = torch.Generator().manual_seed(4)
    images = F.interpolate(torch.rand(1, 3, 32, 32, generator=g), size=128, mode="bilinear").clamp(0, 1)
    pil = Image.fromarray((images[0].permute(1, 2, 0) * 255).round().byte().numpy()).resize((32, 32), Image.BICUBIC)
    ref = _normalise(torch.from_numpy(np.array(pil)).permute(2, 0, 1)[None].float() / 255)
    quantised = (images * 255).round() / 255
    err = {aa: (preprocess_images(quantised, 32, antialias=aa) - ref).abs().mean().item() for aa in (True, False)}
    assert err[True] < 0.02 < err[False]


# ----------------------------------------------------------------------------- CLIP score / HPSv2


def test_clip_score_local_dir_matches_raw_model(open_clip_dir, open_clip_raw):
    images = _images()
    cos = _open_clip_reference(open_clip_raw, images, PROMPTS)
    reward = load_reward("clip", checkpoint=open_clip_dir)
    assert reward.input_size == 32 and reward.differentiable and reward.name == "clip"
    torch.testing.assert_close(reward(images, PROMPTS), 100 * cos.clamp(min=0), atol=1e-4, rtol=0)
    plain = CLIPScoreReward(open_clip_dir, clip_at_zero=False)
    torch.testing.assert_close(plain(images, PROMPTS), 100 * cos, atol=1e-4, rtol=0)
    torch.testing.assert_close(plain.cosine(images, PROMPTS), cos, atol=1e-5, rtol=0)
    _check_gradients(plain)
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        reward(images, PROMPTS[:2])
    with pytest.raises(ValueError, match="expected float images in \\[0, 1\\], got torch.uint8"):
        reward((images * 255).round().to(torch.uint8), PROMPTS)


def test_clip_text_features_encode_each_distinct_prompt_once(open_clip_dir, open_clip_raw):
    reward = CLIPScoreReward(open_clip_dir, clip_at_zero=False)
    rows = []
    encode_text = reward.model.encode_text
    reward.model.encode_text = lambda tokens: rows.append(len(tokens)) or encode_text(tokens)
    repeated = [PROMPTS[1], PROMPTS[0], PROMPTS[1], PROMPTS[1]]
    features = reward.text_features(repeated)
    assert rows == [2]  # two distinct prompts, one batch
    torch.testing.assert_close(features, reward.text_features(PROMPTS[:2])[[1, 0, 1, 1]], atol=1e-6, rtol=0)
    images = _images(n=4)
    torch.testing.assert_close(reward.cosine(images, repeated), _open_clip_reference(open_clip_raw, images, repeated),
                               atol=1e-5, rtol=0)


def test_clip_score_weights_file_with_arch(tmp_path, open_clip_raw, monkeypatch):
    torch.save(open_clip_raw[1], tmp_path / "open_clip_pytorch_model.bin")
    monkeypatch.setenv("LCM_LAB_CLIP_CHECKPOINT", str(tmp_path / "open_clip_pytorch_model.bin"))
    reward = CLIPScoreReward(arch=TINY_OPEN_CLIP, clip_at_zero=False)
    images = _images(seed=5)
    torch.testing.assert_close(reward.cosine(images, PROMPTS), _open_clip_reference(open_clip_raw, images, PROMPTS),
                               atol=1e-5, rtol=0)


def test_hpsv2_checkpoint_matches_raw_model(hps_checkpoint, open_clip_raw):
    images = _images(seed=7)
    reward = load_reward("hpsv2", checkpoint=hps_checkpoint / "HPS_v2.1_compressed.pt",
                         arch=str(hps_checkpoint / "tiny_arch.json"))
    assert reward.version == "v2.1" and reward.input_size == 32 and reward.preprocess.resize_mode == "longest"
    scores = reward(images, PROMPTS)
    torch.testing.assert_close(scores, _open_clip_reference(open_clip_raw, images, PROMPTS), atol=1e-5, rtol=0)
    # a folder plus the version picks the file; a dict architecture works too
    again = HPSv2Reward(checkpoint=hps_checkpoint, version="2.1", arch=TINY_OPEN_CLIP)
    torch.testing.assert_close(again(images, PROMPTS), scores, atol=1e-6, rtol=0)
    _check_gradients(reward)
    reward.train()
    assert not any(m.training for m in reward.modules())


# ----------------------------------------------------------------------------- PickScore


@pytest.fixture(scope="module")
def pickscore_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel

    from lcm_lab.toy.tokenizer import write_clip_tokenizer

    folder = tmp_path_factory.mktemp("pickscore")
    config = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "max_position_embeddings": 77, "vocab_size": 49408, "bos_token_id": 49406,
                     "eos_token_id": 49407, "pad_token_id": 49407},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16, logit_scale_init_value=3.0)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    write_clip_tokenizer(folder, model_max_length=77)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": {"height": 32, "width": 32}, "size": {"shortest_edge": 32}, "do_center_crop": True,
        "do_normalize": True, "do_resize": True, "resample": 3, "image_processor_type": "CLIPImageProcessor",
        "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3]}))
    return folder


def test_pickscore_matches_raw_model(pickscore_dir):
    from transformers import CLIPModel, CLIPTokenizer

    images = _images(seed=11)
    reward = load_reward("pickscore", model_dir=pickscore_dir)
    assert reward.input_size == 32 and reward.preprocess.mean == (0.5, 0.4, 0.3)
    scores = reward(images, PROMPTS)

    model = CLIPModel.from_pretrained(pickscore_dir).eval()
    tokens = CLIPTokenizer.from_pretrained(pickscore_dir)(PROMPTS, padding=True, truncation=True, max_length=77,
                                                         return_tensors="pt")
    with torch.no_grad():
        img = model.get_image_features(pixel_values=_normalise(images, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)))
        txt = model.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
        img = img if isinstance(img, torch.Tensor) else img.pooler_output
        txt = txt if isinstance(txt, torch.Tensor) else txt.pooler_output
        expected = model.logit_scale.exp() * F.cosine_similarity(img, txt, dim=-1)
    assert abs(model.logit_scale.exp().item() - np.exp(3.0)) < 1e-4
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-5)
    _check_gradients(reward)


def test_pickscore_model_and_processor_in_separate_folders(pickscore_dir, tmp_path, monkeypatch):
    """The published layout: the weights (yuvalkirstain/PickScore_v1) and the processor (laion's CLIP-H) are
    two folders; the processor is found from ``processor_dir`` or LCM_LAB_PICKSCORE_PROCESSOR_DIR."""
    import shutil

    model_dir, proc_dir = tmp_path / "model", tmp_path / "processor"
    model_dir.mkdir()
    proc_dir.mkdir()
    for f in pickscore_dir.iterdir():
        is_model = f.name == "config.json" or f.suffix == ".safetensors"
        shutil.copy(f, model_dir if is_model else proc_dir)
    images = _images(seed=12)
    expected = load_reward("pickscore", model_dir=pickscore_dir)(images, PROMPTS)
    with pytest.raises(FileNotFoundError, match="PickScore processor"):
        load_reward("pickscore", model_dir=model_dir)
    torch.testing.assert_close(load_reward("pickscore", model_dir=model_dir, processor_dir=proc_dir)(images, PROMPTS),
                               expected, rtol=0, atol=0)
    monkeypatch.setenv("LCM_LAB_PICKSCORE_PROCESSOR_DIR", str(proc_dir))
    torch.testing.assert_close(load_reward("pickscore", model_dir=model_dir)(images, PROMPTS), expected, rtol=0, atol=0)


# ----------------------------------------------------------------------------- aesthetic


def test_eval_metrics_resize_with_antialiasing(open_clip_dir, hps_checkpoint):
    from lcm_lab.eval.clip_metrics import load_clip_metric, load_hps_metric

    assert load_clip_metric(checkpoint=open_clip_dir).preprocess.antialias
    assert load_hps_metric(hps_checkpoint / "HPS_v2.1_compressed.pt",
                           arch=str(hps_checkpoint / "tiny_arch.json")).preprocess.antialias
    assert load_reward("clip", checkpoint=open_clip_dir).preprocess.antialias  # training rewards too (RG-LCD)
    # ...because a plain 1024 -> 224 px resize passes gradient to only a grid of the pixels
    image = torch.rand(1, 3, 1024, 1024, requires_grad=True)
    for antialias, untouched in ((False, True), (True, False)):
        preprocess_images(image, 224, antialias=antialias).sum().backward()
        assert bool((image.grad == 0).any()) is untouched
        image.grad = None


def test_aesthetic_head_and_clip_match_raw_models(tmp_path, open_clip_dir, open_clip_raw):
    torch.manual_seed(3)
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128),
                              torch.nn.Dropout(0.2), torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
                              torch.nn.Linear(64, 16), torch.nn.Linear(16, 1)).eval()
    head_file = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save({f"layers.{k}": v for k, v in mlp.state_dict().items()}, head_file)
    reward = load_reward("aesthetic", head=tmp_path, clip_checkpoint=open_clip_dir)
    assert not reward.uses_prompts and reward.differentiable
    images = _images(seed=13)
    with torch.no_grad():
        expected = mlp(F.normalize(open_clip_raw[0].encode_image(_normalise(images)), dim=-1)).squeeze(-1)
    torch.testing.assert_close(reward(images, None), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(reward(images, PROMPTS), expected, atol=1e-5, rtol=1e-5)  # prompts are ignored
    _check_gradients(reward, prompts=None)
    half = load_reward("aesthetic", head=tmp_path, clip_checkpoint=open_clip_dir, dtype=torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in half.head.parameters())  # the head runs in float32, as upstream
    with torch.no_grad():
        torch.testing.assert_close(half(images, None), mlp(half.image_features(images)).squeeze(-1), atol=1e-6, rtol=0)

    with torch.no_grad():
        features = half.image_features(images)
        half.image_features = lambda _: features  # the backbone's output fixed: only the head runs under autocast
        with torch.autocast("cpu", dtype=torch.bfloat16):  # mixed precision leaves the head in float32
            got = half(images, None)
        torch.testing.assert_close(got, mlp(features).squeeze(-1), atol=1e-6, rtol=0)

    wrong = tmp_path / "wrong"
    wrong.mkdir()
    torch.save({f"layers.{k}": v for k, v in torch.nn.Sequential(
        torch.nn.Linear(8, 1024), torch.nn.Dropout(), torch.nn.Linear(1024, 128), torch.nn.Dropout(),
        torch.nn.Linear(128, 64), torch.nn.Dropout(), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1)
    ).state_dict().items()}, wrong / "sac+logos+ava1-l14-linearMSE.pth")
    with pytest.raises(ValueError, match="expects 8-d"):
        AestheticReward(head=wrong, clip_checkpoint=open_clip_dir)


def test_aesthetic_linear_probe_head_as_rg_lcd_uses(tmp_path, open_clip_dir, open_clip_raw):
    """LAION's original linear probe (sa_0_4_vit_l_14_linear.pth: a bare Linear(D, 1) state dict)."""
    torch.manual_seed(4)
    probe = torch.nn.Linear(16, 1).eval()
    head_file = tmp_path / "sa_0_4_vit_l_14_linear.pth"
    torch.save(probe.state_dict(), head_file)
    reward = load_reward("aesthetic", head=head_file, clip_checkpoint=open_clip_dir)
    assert reward.head.kind == "linear"
    images = _images(seed=14)
    with torch.no_grad():
        expected = probe(F.normalize(open_clip_raw[0].encode_image(_normalise(images)), dim=-1)).squeeze(-1)
    torch.testing.assert_close(reward(images, None), expected, atol=1e-5, rtol=1e-5)
    _check_gradients(reward, prompts=None)
    torch.save({"weight": torch.zeros(2, 16), "bias": torch.zeros(2)}, head_file)  # not a 1-output probe
    with pytest.raises(ValueError, match="not an aesthetic-predictor head"):
        load_reward("aesthetic", head=head_file, clip_checkpoint=open_clip_dir)


# ----------------------------------------------------------------------------- JPEG


def test_jpeg_rewards_order_flat_above_noisy():
    flat = torch.full((1, 3, 64, 64), 0.5)
    noisy = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    images = torch.cat([flat, noisy])
    comp = load_reward("jpeg-compressibility")
    incomp = load_reward("jpeg-incompressibility")
    assert comp.differentiable is False and incomp.differentiable is False
    c, i = comp(images, None), incomp(images, ["x", "y"])
    assert c[0] > c[1] and i[1] > i[0]
    torch.testing.assert_close(c, -i)

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray((noisy[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(
        buffer, format="JPEG", quality=95)
    assert i[1].item() == pytest.approx(buffer.tell() / 1000, abs=1e-6)
    assert 0 < i[0] < i[1]
    with pytest.raises(ValueError, match="NaN or inf"):  # not cast to a gray level and given a size
        comp(torch.cat([flat, flat * torch.nan]), None)
    with pytest.raises(ValueError, match="no images to score"):
        comp(torch.zeros(0, 3, 64, 64), [])


# ----------------------------------------------------------------------------- registry and specs


def test_registry_unknown_name_lists_known_names():
    assert {"clip", "hpsv2", "pickscore", "aesthetic", "imagereward", "jpeg-compressibility",
            "jpeg-incompressibility", "toy-clip"} <= set(rewards.REGISTRY)
    with pytest.raises(ValueError) as info:
        load_reward("hpsv3")
    for name in ("hpsv2", "pickscore", "jpeg-compressibility", "toy-clip"):
        assert name in str(info.value)
    assert isinstance(load_reward(" JPEG-Compressibility "), rewards.JpegCompressibilityReward)


def test_parse_reward_terms():
    assert parse_reward_terms("1.0*hpsv2+0.1*imagereward") == [(1.0, "hpsv2"), (0.1, "imagereward")]
    assert parse_reward_terms("clip") == [(1.0, "clip")]
    assert parse_reward_terms(" 2 * toy-clip + -0.5*jpeg-compressibility ") == [(2.0, "toy-clip"),
                                                                                (-0.5, "jpeg-compressibility")]
    assert parse_reward_terms("1e-2*clip+1E+1*hpsv2") == [(0.01, "clip"), (10.0, "hpsv2")]


@pytest.mark.parametrize("spec", ["", "   ", "1.0*", "*hpsv2", "hpsv2++clip", "hpsv2+", "+hpsv2", "1.0**hpsv2",
                                  "hpsv2 clip", "abc*hpsv2", "nan*hpsv2", "1.0*hpsv2+0.5*hpsv2", "hpsv2*2",
                                  "1,0*hpsv2"])
def test_malformed_specs_raise_value_error(spec):
    with pytest.raises(ValueError):
        parse_reward_terms(spec)


def test_model_kwargs_must_map_names_to_keyword_dicts():
    with pytest.raises(ValueError, match=r"got 5 for 'jpeg-compressibility'"):
        parse_reward_spec("jpeg-compressibility", model_kwargs={"jpeg-compressibility": 5})
    reward = parse_reward_spec("jpeg-compressibility", model_kwargs={"jpeg-compressibility": {"quality": 50}})
    assert reward.models[0].quality == 50


def test_weighted_spec_values_and_components():
    images = torch.cat([torch.full((1, 3, 48, 48), 0.3), _images(2, 48, seed=4)])
    mix = parse_reward_spec("2*jpeg-compressibility+0.5*jpeg-incompressibility")
    assert isinstance(mix, WeightedReward) and mix.weights == (2.0, 0.5) and not mix.differentiable
    assert mix.names == ["jpeg-compressibility", "jpeg-incompressibility"]
    total, parts = mix(images, None, return_components=True)
    size = rewards.jpeg_sizes_kb(images)
    torch.testing.assert_close(parts, torch.stack([-size, size], dim=1))
    torch.testing.assert_close(total, -1.5 * size)
    torch.testing.assert_close(mix(images, None), total)
    with pytest.raises(ValueError, match="unknown reward"):
        parse_reward_spec("1*jpeg-compressibility+1*hpsv3")
    with pytest.raises(ValueError, match="does not use"):
        parse_reward_spec("jpeg-compressibility", model_kwargs={"hpsv2": {}})
    with pytest.raises(ValueError):
        WeightedReward([])


def test_weighted_differentiable_mix(open_clip_dir, hps_checkpoint):
    kwargs = {"clip": {"checkpoint": open_clip_dir, "clip_at_zero": False},
              "hpsv2": {"checkpoint": hps_checkpoint, "arch": TINY_OPEN_CLIP}}
    mix = parse_reward_spec("1.0*clip+0.5*hpsv2", model_kwargs=kwargs, device="cpu")
    assert mix.differentiable
    images = _images(seed=9)
    total, parts = mix(images, PROMPTS, return_components=True)
    cos = mix.models[1](images, PROMPTS)
    torch.testing.assert_close(parts, torch.stack([100 * cos, cos], dim=1), atol=1e-4, rtol=0)
    torch.testing.assert_close(total, 100.5 * cos, atol=1e-4, rtol=0)
    _check_gradients(mix)
    with_jpeg = WeightedReward([(mix.models[0], 1.0), (load_reward("jpeg-incompressibility"), 0.1)])
    assert not with_jpeg.differentiable and with_jpeg.name == "1*clip+0.1*jpeg-incompressibility"
    with pytest.raises(ValueError, match="prompts are required"):
        mix(images, None)


# ----------------------------------------------------------------------------- missing weights


def test_missing_weights_name_file_source_and_env(tmp_path, monkeypatch):
    cases = [
        (lambda: HPSv2Reward(), ["HPS_v2.1_compressed.pt", "xswu/HPSv2", "LCM_LAB_HPS_CHECKPOINT", "checkpoint="]),
        (lambda: HPSv2Reward(version="v2.0"), ["HPS_v2_compressed.pt", "LCM_LAB_HPS_CHECKPOINT"]),
        (lambda: CLIPScoreReward(), ["open_clip_pytorch_model.bin", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
                                     "LCM_LAB_CLIP_CHECKPOINT"]),
        (lambda: PickScoreReward(), ["yuvalkirstain/PickScore_v1", "LCM_LAB_PICKSCORE_DIR", "model_dir="]),
        (lambda: AestheticReward(), ["sac+logos+ava1-l14-linearMSE.pth", "improved-aesthetic-predictor",
                                     "LCM_LAB_AESTHETIC_HEAD"]),
    ]
    for build, needles in cases:
        with pytest.raises(FileNotFoundError) as info:
            build()
        for needle in needles:
            assert needle in str(info.value), (needle, str(info.value))

    # a path that does not hold the file is named in the message, from an argument or the env var
    with pytest.raises(FileNotFoundError, match="nowhere"):
        HPSv2Reward(checkpoint=tmp_path / "nowhere.pt")
    monkeypatch.setenv("LCM_LAB_HPS_CHECKPOINT", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="HPS_v2.1_compressed.pt"):
        HPSv2Reward()

    (tmp_path / "sac+logos+ava1-l14-linearMSE.pth").write_bytes(b"")
    with pytest.raises(FileNotFoundError) as info:
        AestheticReward(head=tmp_path)
    assert "LCM_LAB_AESTHETIC_CLIP_CHECKPOINT" in str(info.value)

    pick = tmp_path / "pick"
    pick.mkdir()
    (pick / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="yuvalkirstain/PickScore_v1"):  # a config without weights
        PickScoreReward(model_dir=pick)
    (pick / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError) as info:
        PickScoreReward(model_dir=pick)
    assert "laion/CLIP-ViT-H-14-laion2B-s32B-b79K" in str(info.value)
    assert "LCM_LAB_PICKSCORE_PROCESSOR_DIR" in str(info.value)

    with pytest.raises(FileNotFoundError, match=f"toy-clip: {tmp_path} is not an open_clip model folder"):
        load_reward("toy-clip", path=tmp_path)  # a folder the user named: no advice to build the toy assets
    monkeypatch.setenv("LCM_LAB_TOY_CLIP_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="build_toy_assets"):
        load_reward("toy-clip")


def test_corrupt_weight_files_name_the_file(tmp_path, open_clip_dir, hps_checkpoint):
    hps = tmp_path / "HPS_v2.1_compressed.pt"
    hps.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError, match=r"cannot read HPS v2.1 checkpoint .*HPS_v2.1_compressed.pt") as info:
        HPSv2Reward(checkpoint=hps, arch=str(hps_checkpoint / "tiny_arch.json"))
    assert "weights_only=False" not in str(info.value)  # torch's hint is not the fix for a corrupt file
    head = tmp_path / "head" / "sac+logos+ava1-l14-linearMSE.pth"
    head.parent.mkdir()
    head.write_bytes(b"")
    with pytest.raises(ValueError, match="cannot read aesthetic-predictor head .*linearMSE.pth"):
        AestheticReward(head=head, clip_checkpoint=open_clip_dir)
    broken = tmp_path / "clip"
    broken.mkdir()
    for f in open_clip_dir.iterdir():
        data = f.read_bytes()
        (broken / f.name).write_bytes(data[:len(data) // 2] if f.suffix == ".safetensors" else data)
    with pytest.raises(ValueError, match=f"cannot read open_clip model folder {broken}"):
        CLIPScoreReward(broken)


def test_pickled_code_is_refused_without_running_it(tmp_path, hps_checkpoint):
    """A pickle that runs code on load is refused by every torch.load (weights_only=True), and the message
    does not pass on torch's advice to load it with weights_only=False."""
    import os

    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    hps = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": Evil()}, hps)
    with pytest.raises(ValueError, match=r"cannot read HPS v2.1 checkpoint .*not a plain tensor file, refused by "
                                         r"torch.load\(weights_only=True\): .*posix.system") as info:
        HPSv2Reward(checkpoint=hps, arch=str(hps_checkpoint / "tiny_arch.json"))
    assert "False" not in str(info.value) and not marker.exists()
    torch.save({"state_dict": np.zeros(3)}, hps)  # an allowed-module class: torch's message differs
    with pytest.raises(ValueError, match=r"refused by torch.load\(weights_only=True\): Unsupported global: GLOBAL "
                                         r"numpy.*not an allowed global by default\.\)") as info:
        HPSv2Reward(checkpoint=hps, arch=str(hps_checkpoint / "tiny_arch.json"))
    assert "weights_only` set to `False" not in str(info.value) and "add_safe_globals" not in str(info.value)
    from lcm_lab.readable import first_line

    torch26 = pickle.UnpicklingError(  # torch 2.6's form: the detail on the line that names weights_only=True
        "Weights only load failed. Re-running `torch.load` with `weights_only` set to `False` will likely succeed.\n"
        "Please file an issue with the following so that we can make `weights_only=True` compatible with your use "
        "case: WeightsUnpickler error: Unsupported operand 10\n\nCheck the documentation of torch.load")
    assert first_line(torch26) == "not a plain tensor file, refused by torch.load(weights_only=True): Unsupported operand 10"


def test_wrong_or_partial_files_name_the_file(tmp_path, open_clip_dir, pickscore_dir, hps_checkpoint):
    import shutil

    # another model's weights under PickScore's file name: transformers would only log the missing tensors
    pick = tmp_path / "pick"
    shutil.copytree(pickscore_dir, pick)
    shutil.copy(open_clip_dir / "open_clip_model.safetensors", pick / "model.safetensors")
    with pytest.raises(ValueError, match=r"cannot read PickScore model folder .*45 tensor\(s\) of the model missing "
                                         r"from its weights"):
        PickScoreReward(model_dir=pick)
    shutil.copy(pickscore_dir / "model.safetensors", pick / "model.safetensors")
    (pick / "vocab.json").write_text("{bad")
    with pytest.raises(ValueError, match="cannot read PickScore processor folder .*pick"):
        PickScoreReward(model_dir=pick)
    shutil.copy(pickscore_dir / "vocab.json", pick / "vocab.json")
    (pick / "preprocessor_config.json").write_text("{bad")
    with pytest.raises(ValueError, match="image processor config .*preprocessor_config.json is not valid UTF-8 JSON"):
        PickScoreReward(model_dir=pick)

    arch = tmp_path / "arch.json"
    for text, match in (("{bad", "is not valid UTF-8 JSON"), ("[1, 2]", "holds a JSON list, not an object")):
        arch.write_text(text)
        with pytest.raises(ValueError, match=f"open_clip model config {arch} {re.escape(match)}"):
            HPSv2Reward(checkpoint=hps_checkpoint / "HPS_v2.1_compressed.pt", arch=str(arch))

    state = {f"layers.{k}": v for k, v in torch.nn.Sequential(
        torch.nn.Linear(16, 1024), torch.nn.Dropout(), torch.nn.Linear(1024, 128), torch.nn.Dropout(),
        torch.nn.Linear(128, 64), torch.nn.Dropout(), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1)
    ).state_dict().items()}
    del state["layers.7.bias"]
    head = tmp_path / "head.pth"
    torch.save(state, head)
    with pytest.raises(ValueError, match=r"cannot read aesthetic-predictor head .*head.pth .*Missing key\(s\) in "
                                         r"state_dict: \"layers.7.bias\""):
        AestheticReward(head=head, clip_checkpoint=open_clip_dir)


def test_imagereward_optional_dependency():
    if importlib.util.find_spec("ImageReward") is None:
        with pytest.raises(ImportError, match="pip install image-reward"):
            load_reward("imagereward", clip_max=2.0)
    else:  # installed: without weights the loader names the missing file
        with pytest.raises((FileNotFoundError, ImportError)) as info:
            load_reward("imagereward", clip_max=2.0)
        assert "ImageReward" in str(info.value)


def test_imagereward_rejects_a_checkpoint_without_its_weights(tmp_path, monkeypatch):
    """strict=False as upstream, but a file missing the head or most weights is an error, not random scores
    (a stand-in module with ImageReward's blip/mlp layout: the package is optional)."""
    from lcm_lab.rewards import imagereward

    class FakeImageReward(torch.nn.Module):
        def __init__(self, med_config, device):
            super().__init__()
            self.blip = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(10)])
            self.mlp = torch.nn.Linear(4, 1)

    monkeypatch.setattr(imagereward, "_imagereward_class", lambda: FakeImageReward)
    (tmp_path / "med_config.json").write_text("{}")
    full = FakeImageReward(None, "cpu").state_dict()
    for name, state in (("head_missing", {k: v for k, v in full.items() if not k.startswith("mlp.")}),
                        ("other_model", {"layers.0.weight": torch.zeros(1)})):
        torch.save(state, tmp_path / "ImageReward.pt")
        with pytest.raises(ValueError, match="cannot read ImageReward checkpoint .*weights missing"):
            imagereward.ImageRewardReward(tmp_path)
    torch.save({k: v for k, v in full.items() if k != "blip.9.bias"}, tmp_path / "ImageReward.pt")
    imagereward.ImageRewardReward(tmp_path)  # one unused tensor missing: loads, as upstream


def test_imagereward_names_the_missing_bert_tokenizer(tmp_path, monkeypatch):
    from lcm_lab.rewards import imagereward

    def no_tokenizer(med_config, device):  # what BLIP's BertTokenizer.from_pretrained raises offline
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files of bert-base-uncased")

    monkeypatch.setattr(imagereward, "_imagereward_class", lambda: no_tokenizer)
    (tmp_path / "med_config.json").write_text("{}")
    torch.save({}, tmp_path / "ImageReward.pt")
    with pytest.raises(FileNotFoundError, match="'bert-base-uncased' tokenizer .*huggingface-cli download"):
        imagereward.ImageRewardReward(tmp_path)


class _FakeEncoding:
    def __init__(self, input_ids):
        self.input_ids, self.attention_mask = input_ids, torch.ones_like(input_ids)

    def to(self, device):
        return self


class _FakeBLIPTokenizer:
    """Token ids from the characters of each prompt; records the requested max_length."""

    def __call__(self, prompts, padding, truncation, max_length, return_tensors):
        self.max_length = max_length
        return _FakeEncoding(torch.tensor([[ord(c) % 50 for c in (p * max_length)[:max_length]] for p in prompts]))


class _FakeBLIPText(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.embed = torch.nn.Embedding(50, dim)

    def forward(self, input_ids, attention_mask, encoder_hidden_states, encoder_attention_mask, return_dict):
        import types

        hidden = self.embed(input_ids) + encoder_hidden_states.mean(1, keepdim=True)
        return types.SimpleNamespace(last_hidden_state=hidden)


class _FakeImageRewardModel(torch.nn.Module):
    """ImageReward's layout (blip.tokenizer / visual_encoder / text_encoder, mlp, mean, std) at toy size."""

    def __init__(self, med_config, device, dim=8):
        super().__init__()
        self.blip = torch.nn.Module()
        self.blip.tokenizer = _FakeBLIPTokenizer()
        self.blip.visual_encoder = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(2),
                                                       torch.nn.Linear(4, dim))  # [B, 3, 4] -> [B, 3, dim] tokens
        self.blip.text_encoder = _FakeBLIPText(dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 4), torch.nn.Linear(4, 1))
        self.mean, self.std = 0.3, 2.0


def test_imagereward_score_standardises_and_clips_the_heads_output(tmp_path, monkeypatch):
    """score = min((mlp(BLIP [CLS] feature) - mean) / std, clip_max), text at ImageReward's 35 tokens."""
    from lcm_lab.rewards import imagereward

    monkeypatch.setattr(imagereward, "_imagereward_class", lambda: _FakeImageRewardModel)
    (tmp_path / "med_config.json").write_text("{}")
    torch.manual_seed(5)
    torch.save(_FakeImageRewardModel(None, "cpu").state_dict(), tmp_path / "ImageReward.pt")
    reward = imagereward.ImageRewardReward(tmp_path)
    images = _images(seed=15)
    m = reward.model
    with torch.no_grad():
        enc = m.blip.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        image_embeds = m.blip.visual_encoder(reward.preprocess(images))
        cls = m.blip.text_encoder(enc.input_ids, enc.attention_mask, image_embeds, None, True).last_hidden_state[:, 0]
        expected = (m.mlp(cls).squeeze(-1) - 0.3) / 2.0
        got = reward(images, PROMPTS)
    assert m.blip.tokenizer.max_length == 35
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    clip_max = float(expected.median())
    clipped = imagereward.ImageRewardReward(tmp_path, clip_max=clip_max)
    with torch.no_grad():
        torch.testing.assert_close(clipped(images, PROMPTS), expected.clamp(max=clip_max), atol=1e-6, rtol=1e-6)
    assert float(expected.max()) > clip_max  # the clip did act


# ----------------------------------------------------------------------------- toy-clip


def test_toy_clip_prefers_matching_captions():
    from lcm_lab.rewards import toy_clip_dir
    from lcm_lab.toy.world import ATTRIBUTES, ToyWorld, caption_for

    if not (toy_clip_dir() / "open_clip_config.json").is_file():
        pytest.skip(f"toy assets not built: {toy_clip_dir() / 'open_clip_config.json'} missing "
                    "(python scripts/build_toy_assets.py)")
    reward = load_reward("toy-clip")
    assert reward.input_size == 32 and reward.differentiable
    world = ToyWorld(0, "eval")
    samples = [world[i] for i in range(48)]
    images = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).float() / 255
    matched = [s.caption for s in samples]
    colors = ATTRIBUTES["color"]
    mismatched = [caption_for({**s.attributes, "color": colors[(colors.index(s.attributes["color"]) + 1) % 4],
                               "shape": ATTRIBUTES["shape"][(ATTRIBUTES["shape"].index(s.attributes["shape"]) + 1) % 4]})
                  for s in samples]
    with torch.no_grad():
        good, bad = reward(images, matched), reward(images, mismatched)
    assert good.shape == (48,) and (good >= 0).all()
    assert good.mean() > bad.mean() + 1.0, (good.mean(), bad.mean())
    assert (good > bad).float().mean() > 0.75


def test_toy_clip_loader_on_a_fresh_toy_format_model(tmp_path):
    """The toy-clip loader on a random model written exactly as the asset build writes it, compared
    with the raw model fed the training-time tokenizer (transformers CLIPTokenizer, padded with
    end-of-text to the 32-token context)."""
    import open_clip
    from safetensors.torch import save_file

    from lcm_lab.toy import models
    from lcm_lab.toy.tokenizer import load_clip_tokenizer, write_clip_tokenizer

    torch.manual_seed(1)
    raw = models.build_reward_model().eval()
    config = {"model_cfg": models.REWARD_MODEL_CONFIG, "preprocess_cfg": models.REWARD_PREPROCESS_CONFIG}
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in raw.state_dict().items()}, str(tmp_path / "open_clip_model.safetensors"))
    reward = load_reward("toy-clip", path=tmp_path, clip_at_zero=False)
    assert reward.name == "toy-clip" and reward.input_size == 32

    tokenizer = load_clip_tokenizer(write_clip_tokenizer(tmp_path / "tok", model_max_length=models.CONTEXT_LENGTH))
    ids = tokenizer(PROMPTS, padding="max_length", max_length=models.CONTEXT_LENGTH, truncation=True,
                    return_tensors="pt").input_ids
    images = _images(seed=21)
    with torch.no_grad():
        cos = F.cosine_similarity(raw.encode_image(_normalise(images)), raw.encode_text(ids), dim=-1)
    torch.testing.assert_close(reward(images, PROMPTS), 100 * cos, atol=1e-4, rtol=0)
    assert isinstance(open_clip.get_tokenizer(f"local-dir:{tmp_path}"), open_clip.SimpleTokenizer)
    _check_gradients(reward)


def test_builtin_architecture_takes_the_preprocessing_its_checkpoints_agree_on(monkeypatch):
    """A bare weights file + built-in name: SigLIP's checkpoints all use mean = std = 0.5 and squash resizing,
    not the OpenAI defaults open_clip falls back to without pretrained weights; ViT-B-32's all use OpenAI's."""
    import open_clip

    from lcm_lab.rewards.clip_score import create_open_clip

    monkeypatch.setattr(open_clip, "get_tokenizer", lambda name: None)  # SigLIP's comes from the hub
    siglip, _ = create_open_clip("ViT-B-16-SigLIP")
    cfg = siglip.visual.preprocess_cfg
    assert (cfg["mean"], cfg["std"], cfg["resize_mode"]) == ((0.5,) * 3, (0.5,) * 3, "squash")
    vit_b, _ = create_open_clip("ViT-B-32")
    assert vit_b.visual.preprocess_cfg["mean"] == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert vit_b.visual.preprocess_cfg["resize_mode"] == "shortest"


def test_a_json_configs_preprocessing_reaches_the_model(tmp_path):
    """An ``open_clip_config.json``-style file sets the model and its preprocessing; a bare model-config dict
    gets open_clip's defaults."""
    from lcm_lab.rewards.clip_score import create_open_clip
    from lcm_lab.toy import models

    preprocess = {**models.REWARD_PREPROCESS_CONFIG, "mean": [0.5, 0.5, 0.5], "resize_mode": "squash"}
    path = tmp_path / "open_clip_config.json"
    path.write_text(json.dumps({"model_cfg": models.REWARD_MODEL_CONFIG, "preprocess_cfg": preprocess}))
    from_file, _ = create_open_clip(path)
    assert tuple(from_file.visual.preprocess_cfg["mean"]) == (0.5, 0.5, 0.5)
    assert from_file.visual.preprocess_cfg["resize_mode"] == "squash"
    from_dict, _ = create_open_clip(models.REWARD_MODEL_CONFIG)
    assert tuple(from_dict.visual.preprocess_cfg["mean"]) == pytest.approx(OPENAI_CLIP_MEAN)
    assert from_dict.visual.preprocess_cfg["resize_mode"] == "shortest"
    assert from_file.state_dict().keys() == from_dict.state_dict().keys()


def test_imagereward_package_that_cannot_import_says_why(monkeypatch):
    """image-reward's BLIP code imports helpers transformers 5 removed: the error says so instead of advising a
    reinstall that cannot help; a missing package says how to install it."""
    import importlib

    from lcm_lab.rewards import imagereward

    def fails(message, name=None):
        def import_module(module):
            raise (ModuleNotFoundError if name else ImportError)(message, name=name)
        return import_module

    monkeypatch.setattr(importlib, "import_module", fails(
        "cannot import name 'apply_chunking_to_forward' from 'transformers.modeling_utils'"))
    with pytest.raises(ImportError, match=r"does not import under transformers .*needs transformers < 5"):
        imagereward._imagereward_class()
    monkeypatch.setattr(importlib, "import_module", fails("No module named 'ImageReward'", name="ImageReward"))
    with pytest.raises(ImportError, match="not installed. Install it with `pip install image-reward`"):
        imagereward._imagereward_class()
    monkeypatch.setattr(importlib, "import_module", fails("No module named 'fairscale'", name="fairscale"))
    with pytest.raises(ImportError, match="failed to import .*reinstall it"):
        imagereward._imagereward_class()
