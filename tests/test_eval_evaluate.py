"""evaluate() and `lcm-lab eval` on a tiny random Stable-Diffusion-style folder: row keys and
values, saved images (deterministic per seed, atomic), FID/KID against a reference folder,
up-front errors, write_metrics; and the toy-world metrics when the toy assets exist."""

import argparse
import json
import math
import os
import shutil
import socket

import numpy as np
import pytest
import torch

from lcm_lab.eval.evaluate import (BASE_KEYS, MetricSuite, evaluate, format_table, list_images,
                                   load_reference_images, write_metrics)

pytestmark = pytest.mark.usefixtures("single_thread_torch")

PROMPTS = ["a red circle on the left", "a large blue square", "a small striped yellow triangle"]
TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    from lcm_lab.eval.bench import build_random_pipeline

    return build_random_pipeline(tmp_path_factory.mktemp("tiny_sd"), preset="tiny")


@pytest.fixture(scope="module")
def ldm(tiny_sd):
    from lcm_lab.models.sd import load_ldm

    return load_ldm(tiny_sd)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A random tiny open_clip model in the local-dir layout the `clip` reward loads."""
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY_OPEN_CLIP)
    folder = tmp_path_factory.mktemp("clip")
    config = {"model_cfg": TINY_OPEN_CLIP,
              "preprocess_cfg": {"size": 32, "mean": [0.48145466, 0.4578275, 0.40821073],
                                 "std": [0.26862954, 0.26130258, 0.27577711]}}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder


@pytest.fixture()
def prompt_file(tmp_path):
    file = tmp_path / "prompts.txt"
    file.write_text("\n".join(PROMPTS) + "\n\n")
    return file


def _sibling(name):
    """Import a sibling test module by path (works whatever pytest's import mode)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(f"_eval_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pngs(folder):
    return sorted(folder.glob("*.png"))


def _tmp_leftovers(root):
    return [p for p in root.rglob("*") if ".tmp-" in p.name]  # atomic_write's temp files


def test_evaluate_row_clip_value_and_deterministic_images(ldm, clip_dir, prompt_file, tmp_path):
    from lcm_lab.generation import generate
    from lcm_lab.rewards import CLIPScoreReward

    suite = MetricSuite(["clip"], toy=False, clip=clip_dir)
    kwargs = dict(sampler="lcm", steps=2, prompt_set=str(prompt_file), num_samples=5, guidance=2.0, batch_size=2,
                  suite=suite, progress=False)
    row = evaluate(ldm, seeds=10, save_images_dir=tmp_path / "a", **kwargs)
    assert list(row)[:len(BASE_KEYS)] == list(BASE_KEYS)
    assert {"clip", "sec_per_image", "images_dir"} <= set(row)
    assert row["num_samples"] == 5 and row["steps"] == 2 and row["sampler"] == "lcm" and row["seed"] == 10
    assert row["guidance"] == 2.0 and row["model"] == str(ldm.path) and row["prompt_set"] == str(prompt_file)
    assert row["sec_per_image"] > 0

    # The CLIP column is the `clip` reward's mean on exactly these images (prompts cycle, seeds 10..14).
    prompts = [PROMPTS[i % 3] for i in range(5)]
    images = generate(ldm, prompts, list(range(10, 15)), sampler="lcm", steps=2, guidance_scale=2.0, progress=False)
    with torch.no_grad():
        expected = CLIPScoreReward(clip_dir, antialias=True)(images, prompts).double().mean().item()  # as PIL
    assert math.isclose(row["clip"], expected, rel_tol=1e-5, abs_tol=1e-5)

    files = _pngs(tmp_path / "a")
    assert [f.name for f in files] == [f"{i:05d}.png" for i in range(5)]
    captions = json.loads((tmp_path / "a" / "captions.json").read_text())
    assert [c["prompt"] for c in captions] == prompts and [c["seed"] for c in captions] == list(range(10, 15))
    assert captions[3] == {"file": "00003.png", "prompt": PROMPTS[0], "seed": 13, "line": 1}
    from PIL import Image

    with Image.open(files[0]) as img:
        saved = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)
    assert saved.shape == (3, 16, 16)
    assert torch.equal(saved, (images[0] * 255).round().to(torch.uint8))

    (tmp_path / "b").mkdir()
    for name in ("00009.png", "keep.png"):  # an earlier, larger run's image goes; other files stay
        (tmp_path / "b" / name).write_bytes(files[0].read_bytes())
    again = evaluate(ldm, seeds=10, save_images_dir=tmp_path / "b", **kwargs)
    assert not (tmp_path / "b" / "00009.png").exists() and (tmp_path / "b" / "keep.png").exists()
    other = evaluate(ldm, seeds=100, save_images_dir=tmp_path / "c", **kwargs)
    same = [a.read_bytes() == b.read_bytes() for a, b in zip(files, _pngs(tmp_path / "b"))]
    diff = [a.read_bytes() != c.read_bytes() for a, c in zip(files, _pngs(tmp_path / "c"))]
    assert all(same) and len(same) == 5
    assert all(diff)
    assert again["clip"] == row["clip"] and other["clip"] != row["clip"]
    assert not _tmp_leftovers(tmp_path)


def test_eval_cli_writes_rows_per_step_and_images(tiny_sd, clip_dir, prompt_file, tmp_path, capsys):
    from lcm_lab.eval.commands import add_bench_parser, add_eval_parser

    parser = argparse.ArgumentParser(prog="lcm-lab")
    sub = parser.add_subparsers(dest="command", required=True)
    add_eval_parser(sub)
    add_bench_parser(sub)
    out = tmp_path / "out"
    args = parser.parse_args(["eval", "--model", str(tiny_sd), "--sampler", "ddim", "--steps", "1,3",
                              "--num-samples", "4", "--guidance", "1.5", "--prompts", str(prompt_file),
                              "--out", str(out), "--save-images", "--metrics", "clip", "--clip", str(clip_dir),
                              "--batch-size", "3", "--seed", "5", "--no-progress", "--device", "cpu"])
    assert args.func(args) == 0
    rows = json.loads((out / "metrics.json").read_text())
    assert [r["steps"] for r in rows] == [1, 3]
    for r in rows:
        assert {*BASE_KEYS, "clip", "sec_per_image"} <= set(r)
        assert r["num_samples"] == 4 and r["sampler"] == "ddim" and r["guidance"] == 1.5 and r["seed"] == 5
    md = (out / "metrics.md").read_text().splitlines()
    assert md[0].startswith("| model | sampler | steps |") and len(md) == 4
    assert "| ddim | 3 |" in md[3]
    printed = capsys.readouterr().out
    assert "| model | sampler |" in printed and "metrics.json" in printed
    for steps in (1, 3):
        assert [p.name for p in _pngs(out / "images" / f"ddim-{steps}")] == [f"{i:05d}.png" for i in range(4)]
    assert not _tmp_leftovers(out)

    bad = parser.parse_args(["eval", "--model", str(tiny_sd), "--prompts", str(prompt_file), "--metrics", "fd",
                             "--out", str(tmp_path / "bad"), "--device", "cpu"])
    with pytest.raises(ValueError, match="toy"):
        bad.func(bad)
    for argv in (["eval", "--steps", "1,x"], ["eval", "--seed", "-1"], ["bench", "speed", "--latent-size", "0"]):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
    # an --out that is a file fails before any image is generated, not when the first row is written
    (tmp_path / "file").write_text("")
    bad = parser.parse_args(["eval", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "file")])
    with pytest.raises(ValueError, match="is a file"):
        bad.func(bad)


def test_eval_resume_reuses_finished_rows_only(tiny_sd, prompt_file, tmp_path, monkeypatch):
    """`--resume` returns the rows of an interrupted run that have this run's settings and metrics without
    generating again, and computes the rest; without it every row is computed anew."""
    import lcm_lab.generation as generation
    from lcm_lab.eval.commands import add_eval_parser
    from lcm_lab.eval.evaluate import read_rows

    parser = argparse.ArgumentParser(prog="lcm-lab")
    add_eval_parser(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "out"

    def run(*extra):
        args = parser.parse_args(["eval", "--model", str(tiny_sd), "--sampler", "tcd", "--num-samples", "2",
                                  "--prompts", str(prompt_file), "--metrics", "", "--out", str(out),
                                  "--no-progress", "--device", "cpu", *extra])
        assert args.func(args) == 0
        return read_rows(out / "metrics.json")

    first = run("--steps", "1,2")
    calls = []
    real = generation.generate
    monkeypatch.setattr(generation, "generate", lambda *a, **k: calls.append(k["steps"]) or real(*a, **k))
    assert run("--steps", "1,2", "--resume") == first and calls == []  # sec_per_image included: reused
    rows = run("--steps", "2,3", "--resume")  # step 3 is new
    assert rows[0] == first[1] and rows[1]["steps"] == 3 and calls == [3, 3]  # warm-up image, then the batch
    calls.clear()
    rows = run("--steps", "2", "--resume", "--gamma", "0.7")  # another TCD gamma is another row
    assert rows[0]["gamma"] == 0.7 and calls == [2, 2]
    calls.clear()
    run("--steps", "2")  # no --resume: computed anew
    assert calls == [2, 2]
    (out / "metrics.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot resume from .*metrics.json"):
        run("--steps", "2", "--resume")


def test_resume_needs_every_prompt_and_seed_to_match(ldm, prompt_file):
    """The `seed` and `prompt_set` columns name only the first seed and the prompt source: a row is reused
    only when every image's prompt and seed are the same (`inputs_id`)."""
    from lcm_lab.eval.evaluate import inputs_id

    kwargs = dict(sampler="ddim", steps=1, metrics=[], progress=False, warmup=False, num_samples=3)
    row = evaluate(ldm, prompt_set=str(prompt_file), seeds=[0, 1, 2], **kwargs)
    assert row["inputs_id"] == inputs_id([PROMPTS[i % len(PROMPTS)] for i in range(3)], [0, 1, 2])
    assert evaluate(ldm, prompt_set=str(prompt_file), seeds=0, resume_from=[row], **kwargs) == row  # 0, 1, 2 again
    other_seeds = evaluate(ldm, prompt_set=str(prompt_file), seeds=[0, 5, 6], resume_from=[row], **kwargs)
    assert other_seeds["seed"] == row["seed"] and other_seeds["inputs_id"] != row["inputs_id"]
    prompt_file.write_text("\n".join(reversed(PROMPTS)) + "\n")  # same file name, other prompts
    edited = evaluate(ldm, prompt_set=str(prompt_file), seeds=[0, 1, 2], resume_from=[row], **kwargs)
    assert edited["prompt_set"] == row["prompt_set"] and edited["inputs_id"] != row["inputs_id"]


def test_evaluate_fid_kid_against_a_reference_folder(ldm, prompt_file, tmp_path, monkeypatch):
    from lcm_lab.eval.fid import INCEPTION_FILE, InceptionMetrics
    from lcm_lab.generation import generate
    from lcm_lab.imaging import save_grid


    weights = tmp_path / INCEPTION_FILE
    torch.save(_sibling("test_eval_fid").random_inception_state_dict(), weights)
    ref_dir = tmp_path / "reference"
    g = torch.Generator().manual_seed(0)
    for i in range(6):  # 24x20 images: center-cropped to 20x20, resized to the generated 16x16
        save_grid(torch.rand(1, 3, 20, 24, generator=g), ref_dir / f"real_{i}.png")
    (ref_dir / "notes.txt").write_text("not an image")
    options = {"feature": 64, "inception_dtype": torch.float32, "kid_subsets": 4}
    suite = MetricSuite(None, toy=False, inception=weights, reference=ref_dir, fid_options=options)
    assert suite.metrics == ("fid", "kid")  # the defaults once a reference folder is given
    row = evaluate(ldm, "ddim", 2, str(prompt_file), num_samples=4, seeds=0, guidance=2.0, suite=suite,
                   progress=False)
    assert {"fid", "kid", "kid_std", "fid_reference_num"} <= set(row) and row["fid_reference_num"] == 6
    # the row records how FID/KID were measured: resize mode, Inception precision, KID subset size (capped at 4)
    assert (row["fid_antialias"], row["inception_dtype"], row["kid_subset_size"]) == (False, "float32", 4)
    assert row["fid_reference"] == "6 png files, center-cropped, PIL bicubic to 16 px"
    assert row["fid"] > 0 and math.isfinite(row["kid"])
    # --resume reuses the row only when measured against the same reference folder and weights
    assert f"reference={ref_dir}; inception={weights}" in row["metric_sources"]
    again = dict(sampler="ddim", steps=2, prompt_set=str(prompt_file), num_samples=4, seeds=0, guidance=2.0,
                 progress=False, resume_from=[row])
    assert evaluate(ldm, suite=suite, **again) == row
    fewer = tmp_path / "fewer"
    fewer.mkdir()
    for i in range(3):
        shutil.copy(ref_dir / f"real_{i}.png", fewer)
    other = MetricSuite(None, toy=False, inception=weights, reference=fewer, fid_options=options)
    assert evaluate(ldm, suite=other, **again)["fid_reference_num"] == 3
    # the weights the loader resolved count, not the argument: other weights through the environment variable
    # (--inception not given) recompute the row
    second = tmp_path / "second" / INCEPTION_FILE
    second.parent.mkdir()
    torch.save(_sibling("test_eval_fid").random_inception_state_dict(seed=1), second)
    monkeypatch.setenv("LCM_LAB_INCEPTION_WEIGHTS", str(second))
    from_env = MetricSuite(["fid"], toy=False, reference=ref_dir, fid_options=options)
    assert f"inception={second}" in from_env.sources
    assert evaluate(ldm, suite=from_env, **again)["fid"] != row["fid"]

    files = list_images(ref_dir)
    assert len(files) == 6
    ref = load_reference_images(files, 16)
    assert ref.shape == (6, 3, 16, 16) and ref.dtype == torch.uint8
    from PIL import Image

    for file, got in zip(files, ref):  # written out with PIL: a centred 20 px square, bicubic to 16 px
        with Image.open(file) as img:
            expected = img.convert("RGB").crop((2, 0, 22, 20)).resize((16, 16), Image.BICUBIC)
        assert torch.equal(got, torch.from_numpy(np.asarray(expected).copy()).permute(2, 0, 1))
    (ref_dir / "real_9.png").write_bytes(b"\x89PNG truncated")  # a damaged reference file is named, not skipped
    with pytest.raises(ValueError, match=r"cannot read reference image .*real_9.png"):
        load_reference_images(list_images(ref_dir), 16)
    fake = generate(ldm, [PROMPTS[i % 3] for i in range(4)], [0, 1, 2, 3], sampler="ddim", steps=2,
                    guidance_scale=2.0, progress=False)
    direct = InceptionMetrics(feature=64, kid_subsets=4, inception=suite.inception.inception)
    direct.update(ref, real=True)
    direct.update(fake, real=False)
    expected = direct.compute()
    assert math.isclose(row["fid"], expected["fid"], rel_tol=1e-6)
    assert math.isclose(row["kid"], expected["kid"], rel_tol=1e-6, abs_tol=1e-12)


def test_errors_before_generation(ldm, prompt_file, tmp_path):
    with pytest.raises(ValueError, match="toy"):
        MetricSuite(["accuracy"], toy=False)
    with pytest.raises(ValueError, match="unknown metric"):
        MetricSuite(["fidelity"], toy=False)
    with pytest.raises(ValueError, match="reference"):
        MetricSuite(["fid"], toy=False)
    with pytest.raises(FileNotFoundError, match="CLIP"):
        MetricSuite(["clip"], toy=False, clip=tmp_path / "no_clip")
    long_file = tmp_path / "long.txt"
    long_file.write_text("a red circle\n" + " ".join(["word"] * 40) + "\n")
    with pytest.raises(ValueError, match="more than the model's 32.*Shorten the prompts of"):
        evaluate(ldm, "ddim", 1, str(long_file), metrics=[], save_images_dir=tmp_path / "never")
    assert not (tmp_path / "never").exists()
    with pytest.raises(ValueError, match="seeds"):
        evaluate(ldm, "ddim", 1, str(prompt_file), num_samples=2, seeds=[1, 2, 3], metrics=[])
    row = evaluate(ldm, "ddim", 1, str(long_file), metrics=[], truncate=True, progress=False, warmup=False)
    assert row["num_samples"] == 2 and set(row) == {*BASE_KEYS, "metric_sources", "sec_per_image", "inputs_id"}
    # FD / FID / KID need two images a side: refused up front, not after generating
    from lcm_lab.toy.judge import AttributeJudge

    with pytest.raises(ValueError, match="reference_num must be >= 2"):
        MetricSuite(["fd"], toy=True, reference_num=1, judge=AttributeJudge())
    with pytest.raises(ValueError, match="fd need at least 2 generated images, got num_samples=1"):
        evaluate(ldm, "ddim", 1, "toy", num_samples=1, suite=MetricSuite(["fd"], toy=True, reference_num=4,
                                                                          judge=AttributeJudge()))
    one = tmp_path / "one_ref"
    one.mkdir()
    from lcm_lab.imaging import save_grid

    save_grid(torch.rand(1, 3, 16, 16), one / "only.png")
    with pytest.raises(ValueError, match="at least 2 reference images"):
        MetricSuite(["fid"], toy=False, reference=one)
    from lcm_lab.generation import generate

    with pytest.raises(ValueError, match="3 init images for 2 prompts"):
        generate(ldm, PROMPTS[:2], [0, 1], images=torch.rand(3, 3, 16, 16), strength=0.5, progress=False)
    bad_inputs = (
        (dict(images=torch.rand(2, 1, 16, 16), strength=0.5), ValueError, r"must be a \(N, 3, H, W\) RGB tensor"),
        (dict(images=torch.rand(3, 16, 16), strength=0.5), ValueError, r"must be a \(N, 3, H, W\) RGB tensor"),
        (dict(images=torch.full((2, 3, 16, 16), torch.nan), strength=0.5), ValueError, "NaN or inf"),
        (dict(images=torch.rand(2, 3, 16, 16) * 255, strength=0.5), ValueError, r"floats in \[0, 1\]"),
        (dict(image_size=0), ValueError, "image size 0 is not a positive multiple"),
        (dict(image_size=-32), ValueError, "image size -32 is not a positive multiple"),
        (dict(steps=1000), ValueError, "1000 leading DDIM steps with steps_offset 1 reach timestep 1000.*fewer steps"),
        (dict(sampler="tcd", gamma=1.5), ValueError, r"gamma must be in \[0, 1\], got 1.5"),
    )
    for kwargs, error, match in bad_inputs:
        with pytest.raises(error, match=match):
            generate(ldm, PROMPTS[:2], [0, 1], progress=False, **kwargs)
    with pytest.raises(TypeError, match=r"seeds must be integers, got \[1.5\]"):  # not silently seed 1
        generate(ldm, PROMPTS[:2], [0, 1.5], progress=False)
    expected = generate(ldm, PROMPTS[:1], [3], steps=1, progress=False)
    for seed in (np.int64(3), torch.tensor(3)):  # numpy and torch integers are seeds too
        torch.testing.assert_close(generate(ldm, PROMPTS[:1], [seed], steps=1, progress=False), expected,
                                   rtol=0, atol=0)
    for seeds in ([0, 1.5], [0, True]):
        with pytest.raises(TypeError, match="seeds must be integers"):
            evaluate(ldm, "ddim", 1, str(prompt_file), num_samples=2, seeds=seeds, metrics=[])
    rows = [evaluate(ldm, "ddim", 1, str(prompt_file), num_samples=2, seeds=base, metrics=[], progress=False,
                     warmup=False) for base in (np.int64(4), torch.tensor(4), [4, 5])]
    assert [r["seed"] for r in rows] == [4, 4, 4]
    # init images a resize overshot by less than half a gray level are clamped, not refused
    init = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(
        generate(ldm, PROMPTS[:2], [0, 1], images=(init * 1.001).clamp(max=1.0009), strength=0.5, progress=False),
        generate(ldm, PROMPTS[:2], [0, 1], images=(init * 1.001).clamp(max=1.0), strength=0.5, progress=False))


def test_saved_images_of_an_earlier_run_survive_a_failed_one(ldm, prompt_file, tmp_path, monkeypatch):
    import lcm_lab.generation as generation

    images = tmp_path / "images"
    (images / "notes.txt").parent.mkdir()
    (images / "notes.txt").write_text("mine")
    # the temp folders of a killed run (no such pid) and of a live one (another process of this host)
    killed, live = (images / f".images.partial-{socket.gethostname()}-{pid}" for pid in (999999999, os.getppid()))
    killed.mkdir()
    live.mkdir()
    kwargs = dict(metrics=[], progress=False, warmup=False, save_images_dir=images, batch_size=1)
    evaluate(ldm, "ddim", 1, str(prompt_file), num_samples=3, seeds=0, **kwargs)
    assert not killed.exists() and live.is_dir()  # only the dead writer's is removed
    live.rmdir()
    earlier = {p.name: p.read_bytes() for p in images.iterdir()}
    assert sorted(earlier) == ["00000.png", "00001.png", "00002.png", "captions.json", "notes.txt"]

    real, calls = generation.generate, []

    def fails_on_the_second_batch(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise FloatingPointError("diverged")
        return real(*args, **kw)

    monkeypatch.setattr(generation, "generate", fails_on_the_second_batch)
    with pytest.raises(FloatingPointError):
        evaluate(ldm, "ddim", 1, str(prompt_file), num_samples=2, seeds=50, **kwargs)
    assert {p.name: p.read_bytes() for p in images.iterdir()} == earlier  # the first batch's image went nowhere
    monkeypatch.undo()
    evaluate(ldm, "ddim", 1, str(prompt_file), num_samples=2, seeds=50, **kwargs)
    now = {p.name: p.read_bytes() for p in images.iterdir()}
    assert sorted(now) == ["00000.png", "00001.png", "captions.json", "notes.txt"]  # 00002 went, notes stayed
    assert now["00000.png"] != earlier["00000.png"] and now["notes.txt"] == b"mine"


def test_cli_refuses_impossible_settings_before_any_work(tiny_sd, prompt_file, tmp_path, monkeypatch):
    """Settings that cannot run fail before a network is loaded or a row is written, so an earlier run's
    results in --out stay as they were."""
    import lcm_lab.eval.bench as bench
    import lcm_lab.models.sd as sd
    from lcm_lab.eval.commands import add_bench_parser, add_eval_parser

    def no_work(*args, **kwargs):
        raise AssertionError("a model was loaded or built before the settings were checked")

    monkeypatch.setattr(sd, "load_ldm", no_work)
    monkeypatch.setattr(bench, "build_random_pipeline", no_work)
    parser = argparse.ArgumentParser(prog="lcm-lab")
    sub = parser.add_subparsers(dest="command", required=True)
    add_eval_parser(sub)
    add_bench_parser(sub)
    out = tmp_path / "out"
    out.mkdir()
    for name in ("metrics.json", "results.json"):
        (out / name).write_text("[earlier rows]")
    model = ["--model", str(tiny_sd)]
    sdxl_like = tmp_path / "sdxl"  # an SDXL folder's layout (a second text encoder); never loaded
    shutil.copytree(tiny_sd, sdxl_like)
    (sdxl_like / "text_encoder_2").mkdir()
    (sdxl_like / "tokenizer_2").mkdir()
    cases = (
        (["eval", *model, "--steps", "1,5000"], "num_inference_steps"),
        (["eval", *model, "--guidance", "nan"], "guidance_scale must be a finite number"),
        (["eval", *model, "--sampler", "tcd", "--gamma", "5"], r"gamma must be in \[0, 1\]"),
        (["eval", *model, "--metrics", "fd", "--prompts", str(prompt_file)], "need the toy world's prompts"),
        (["bench", "quality", "--models", f"{tiny_sd},{tmp_path / 'missing'}"], "missing does not exist"),
        (["bench", "quality", "--models", f"{tiny_sd},{sdxl_like}"], "is an SDXL pipeline"),
        (["bench", "quality", "--models", str(tiny_sd), "--samplers", "ddim,lcm", "--steps", "2,60"],
         "num_inference_steps"),
        (["bench", "speed", "--sd15-random", "--sampler", "lcm", "--steps", "100"], "num_inference_steps"),
        (["bench", "speed", *model, "--out", str(out / "metrics.json")], "is a file"),
    )
    for argv, match in cases:
        args = parser.parse_args([*argv, *([] if "--out" in argv else ["--out", str(out)])])
        with pytest.raises((ValueError, FileNotFoundError), match=match):
            args.func(args)
    assert {p.name: p.read_text() for p in out.iterdir()} == {"metrics.json": "[earlier rows]",
                                                            "results.json": "[earlier rows]"}
    bad_options = [["eval", "--metrics", "fid,foo"], ["eval", "--device", "tpu"], ["eval", "--num-samples", "0"],
                   ["eval", "--batch-size", "0"], ["bench", "speed", "--repeats", "0"],
                   ["bench", "speed", "--warmup", "-1"], ["bench", "speed", "--steps", "0"]]
    if not torch.cuda.is_available():
        bad_options.append(["bench", "speed", "--device", "cuda"])
    for argv in bad_options:
        with pytest.raises(SystemExit):
            parser.parse_args(argv)


def test_non_finite_images_stop_the_evaluation(tiny_sd, prompt_file):
    """A diverged model's images would otherwise be scored (FID on black images, a NaN CLIP score)."""
    from lcm_lab.models.sd import load_ldm

    broken = load_ldm(tiny_sd)
    with torch.no_grad():
        broken.unet.conv_out.bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="ddim-1 produced non-finite images for seeds 0..1"):
        evaluate(broken, "ddim", 1, str(prompt_file), num_samples=2, metrics=[], progress=False, warmup=False)


def test_write_metrics_atomic_json_and_markdown(tmp_path):
    rows = [{"model": "m|1", "sampler": "lcm", "steps": 1, "fd": 12.3456, "clip": float("nan")},
            {"model": "m2", "sampler": "lcm", "steps": 2, "fd": 0.5, "extra": True}]
    json_path, md_path = write_metrics(rows, tmp_path / "o")
    data = json.loads(json_path.read_text())
    assert data[0]["clip"] is None and data[1]["fd"] == 0.5 and len(data) == 2
    lines = md_path.read_text().splitlines()
    assert lines[0] == "| model | sampler | steps | fd | clip | extra |"
    assert lines[2] == "| m\\|1 | lcm | 1 | 12.3 | nan |  |"
    assert lines[3].endswith("| 0.5 |  | True |")
    assert format_table(rows) == md_path.read_text()
    assert not _tmp_leftovers(tmp_path)


def test_toy_metrics_against_independent_computations():
    """prompt_accuracy counts an image only when the judge reads every attribute as prompted; the toy FD
    compares judge features with those of VAE reconstructions of real eval images [0, num), fd_real with the
    real images, and the floors use a second set [num, num + num_b)."""
    from diffusers import AutoencoderKL

    from lcm_lab.eval.frechet import fd_between
    from lcm_lab.eval.toy import eval_prompts, prompt_accuracy, real_images, toy_metrics, toy_reference
    from lcm_lab.models.sd import toy_teacher_dir
    from lcm_lab.toy.judge import AttributeJudge
    from lcm_lab.toy.world import ATTRIBUTE_NAMES, ATTRIBUTES, attribute_labels

    _, attrs = eval_prompts(4)
    labels = torch.tensor([attribute_labels(a) for a in attrs])
    pred = labels.clone()
    first, third = ATTRIBUTE_NAMES[0], ATTRIBUTE_NAMES[2]
    pred[1, 0] = (pred[1, 0] + 1) % len(ATTRIBUTES[first])  # image 1: one attribute wrong
    pred[2, 2] = (pred[2, 2] + 1) % len(ATTRIBUTES[third])  # image 2: another one wrong

    class Stub:
        def predict(self, images):
            return pred[:len(images)]

    acc = prompt_accuracy(Stub(), torch.zeros(4, 3, 32, 32), attrs)
    assert acc["accuracy"] == 0.5 and acc[f"acc_{first}"] == 0.75 and acc[f"acc_{third}"] == 0.75
    assert all(acc[f"acc_{k}"] == 1.0 for k in ATTRIBUTE_NAMES if k not in (first, third))

    torch.manual_seed(0)
    judge = AttributeJudge().eval()
    vae = AutoencoderKL.from_pretrained(toy_teacher_dir() / "vae").eval()

    def feats(x):
        with torch.no_grad():
            return judge.features(x)

    def recon(x):
        with torch.no_grad():
            return (vae.decode(vae.encode(x * 2 - 1).latent_dist.mode()).sample / 2 + 0.5).clamp(0, 1)

    real_a, real_b = real_images(6)[0], real_images(4, start=6)[0]
    ref = toy_reference(judge, vae, 6, 4)
    close = dict(rel=1e-5, abs=1e-6)
    assert ref.floors["fd_floor"] == pytest.approx(fd_between(feats(recon(real_b)), feats(recon(real_a))), **close)
    assert ref.floors["fd_real_floor"] == pytest.approx(fd_between(feats(real_b), feats(real_a)), **close)
    assert ref.floors["fd_vae"] == pytest.approx(fd_between(feats(recon(real_b)), feats(real_a)), **close)
    images = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    row = toy_metrics(judge, ref, images, eval_prompts(5)[1])
    assert row["fd"] == pytest.approx(fd_between(feats(images), feats(recon(real_a))), **close)
    assert row["fd_real"] == pytest.approx(fd_between(feats(images), feats(real_a)), **close)


def test_toy_metrics_path_with_random_toy_models(clip_dir, tmp_path_factory):
    """The toy-world branch (judge FD, accuracy, toy-clip) on random stand-ins of the toy assets:
    a 32 px tiny pipeline, a random judge and a random open_clip folder loaded as toy-clip. The
    row equals lcm_lab.eval.toy.toy_metrics and the toy-clip reward on the same images."""
    from lcm_lab.eval.bench import build_random_pipeline
    from lcm_lab.eval.toy import eval_prompts, toy_metrics, toy_reference
    from lcm_lab.generation import generate
    from lcm_lab.models.sd import load_ldm
    from lcm_lab.rewards import ToyCLIPReward
    from lcm_lab.toy.judge import AttributeJudge

    model = load_ldm(build_random_pipeline(tmp_path_factory.mktemp("tiny32"), preset="tiny", latent_size=16))
    torch.manual_seed(0)
    judge = AttributeJudge().eval()
    suite = MetricSuite(None, toy=True, reference_num=24, judge=judge, clip=clip_dir)
    assert suite.metrics == ("fd", "accuracy", "clip") and isinstance(suite.clip, ToyCLIPReward)
    row = evaluate(model, "tcd", 2, "toy", num_samples=7, seeds=3, guidance=2.0, suite=suite, batch_size=3,
                   progress=False)
    assert {"fd", "fd_real", "accuracy", "clip"} <= set(row) and row["prompt_set"] == "toy"

    prompts, attrs = eval_prompts(7)
    images = generate(model, prompts, list(range(3, 10)), sampler="tcd", steps=2, guidance_scale=2.0, progress=False)
    assert images.shape[-1] == 32
    expected = toy_metrics(judge, toy_reference(judge, model.vae, 24, 7), images, attrs)
    for key in ("fd", "fd_real", "accuracy", "acc_color", "fd_floor", "fd_real_floor"):
        assert math.isclose(row[key], expected[key], rel_tol=1e-5, abs_tol=1e-6), key
    # the floors are measured at the row's sample size (7 vs 24), not the reference's (24 vs 24)
    assert row["fd_floor"] != toy_reference(judge, model.vae, 24).floors["fd_floor"]
    with torch.no_grad():
        assert math.isclose(row["clip"], suite.clip(images, prompts).double().mean().item(), rel_tol=1e-5)
    # a bfloat16 model's images go through the float32 judge, VAE reference and toy-clip
    half = load_ldm(model.path, dtype=torch.bfloat16)
    row16 = evaluate(half, "tcd", 2, "toy", num_samples=7, seeds=3, guidance=2.0, suite=suite, batch_size=3,
                     progress=False)
    assert all(math.isfinite(row16[k]) for k in ("fd", "fd_floor", "accuracy", "clip"))


def test_toy_world_metrics_match_toy_module(tmp_path):
    from lcm_lab.eval.toy import toy_judge_dir
    from lcm_lab.models.sd import toy_teacher_dir
    from lcm_lab.rewards import toy_clip_dir

    needed = [toy_teacher_dir() / "model_index.json", toy_judge_dir(), toy_clip_dir() / "open_clip_config.json"]
    if not all(p.exists() for p in needed):
        pytest.skip(f"toy assets not built ({', '.join(str(p) for p in needed if not p.exists())} missing; "
                    "python scripts/build_toy_assets.py)")
    from lcm_lab.eval.toy import eval_prompts, load_judge, toy_metrics, toy_reference
    from lcm_lab.generation import generate
    from lcm_lab.models.sd import load_ldm

    model = load_ldm()
    judge = load_judge()
    suite = MetricSuite(None, toy=True, reference_num=64, judge=judge)
    assert suite.metrics == ("fd", "accuracy", "clip")
    row = evaluate(model, "ddim", 4, "toy", num_samples=12, seeds=3, suite=suite, batch_size=5, progress=False)
    assert {"fd", "fd_real", "accuracy", "clip", "sec_per_image"} <= set(row)
    assert any(k.startswith("acc_") for k in row) and 0 <= row["accuracy"] <= 1 and row["clip"] >= 0

    prompts, attrs = eval_prompts(12)
    from lcm_lab.toy import TEACHER_GUIDANCE  # evaluate's default guidance

    images = generate(model, prompts, list(range(3, 15)), sampler="ddim", steps=4, guidance_scale=TEACHER_GUIDANCE,
                      progress=False)
    expected = toy_metrics(judge, toy_reference(judge, model.vae, 64), images, attrs)
    for key in ("fd", "fd_real", "accuracy"):
        assert math.isclose(row[key], expected[key], rel_tol=1e-5, abs_tol=1e-6), key


def test_eval_cli_hps_benchmark_per_style(tiny_sd, tmp_path):
    """`--prompts hps:DIR --hps FILE`: hpsv2 = mean x 100 per style and their average, equal to the
    hpsv2 reward on the same images (a tiny open_clip saved in the HPS checkpoint format)."""
    import open_clip

    from lcm_lab.eval.commands import add_eval_parser
    from lcm_lab.eval.prompts import HPS_STYLES
    from lcm_lab.generation import generate
    from lcm_lab.models.sd import load_ldm
    from lcm_lab.rewards import HPSv2Reward

    torch.manual_seed(1)
    ckpt = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": open_clip.CLIP(**TINY_OPEN_CLIP).state_dict()}, ckpt)
    arch = tmp_path / "tiny_arch.json"
    arch.write_text(json.dumps({"model_cfg": TINY_OPEN_CLIP}))
    bench = tmp_path / "hps_bench"
    bench.mkdir()
    for style in HPS_STYLES:
        (bench / f"{style}.json").write_text(json.dumps([f"{style} red circle", f"{style} blue square", "unused"]))

    parser = argparse.ArgumentParser(prog="lcm-lab")
    add_eval_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "out"
    args = parser.parse_args(["eval", "--model", str(tiny_sd), "--sampler", "lcm", "--steps", "2", "--prompts",
                              f"hps:{bench}", "--per-style", "2", "--hps", str(ckpt), "--hps-arch", str(arch),
                              "--guidance", "2", "--out", str(out), "--no-progress", "--device", "cpu"])
    assert args.func(args) == 0
    (row,) = json.loads((out / "metrics.json").read_text())
    assert row["num_samples"] == 8 and row["prompt_set"] == f"hps:{bench}"
    assert {f"hpsv2_{s}" for s in HPS_STYLES} | {"hpsv2"} <= set(row) and "clip" not in row

    prompts = [f"{s} {p}" for p in ("red circle", "blue square") for s in HPS_STYLES]  # styles interleaved
    images = generate(load_ldm(tiny_sd), prompts, list(range(8)), sampler="lcm", steps=2, guidance_scale=2.0,
                      progress=False)
    with torch.no_grad():
        scores = HPSv2Reward(ckpt, arch=str(arch), antialias=True)(images, prompts).double()  # metrics resize as PIL
    per_style = 100 * scores.view(2, 4).mean(0)
    for style, value in zip(HPS_STYLES, per_style.tolist()):
        assert math.isclose(row[f"hpsv2_{style}"], value, rel_tol=1e-5), style
    assert math.isclose(row["hpsv2"], per_style.mean().item(), rel_tol=1e-5)
