"""`lcm-lab bench quality` / `bench speed` on a tiny random Stable-Diffusion-style folder: results
files, plots, one row per (sampler, steps); speed ratio, and our images equal the stock diffusers
pipeline's for the same seeds (what makes the timing comparison fair)."""

import argparse
import json
import math

import pytest
import torch

from lcm_lab.eval.bench import SD15_UNET_CONFIG, PeakMemory, bench_speed, build_random_pipeline, diffusers_pipeline

pytestmark = pytest.mark.usefixtures("single_thread_torch")

PROMPTS = ["a red circle on the left", "a large blue square", "a small striped yellow triangle"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return build_random_pipeline(tmp_path_factory.mktemp("tiny_sd"), preset="tiny")


@pytest.fixture(scope="module")
def parser():
    from lcm_lab.eval.commands import add_bench_parser, add_eval_parser

    p = argparse.ArgumentParser(prog="lcm-lab")
    sub = p.add_subparsers(dest="command", required=True)
    add_eval_parser(sub)
    add_bench_parser(sub)
    return p


def test_bench_quality_cli_rows_tables_and_plots(tiny_sd, parser, tmp_path, capsys):
    from PIL import Image

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    out = tmp_path / "bench"
    args = parser.parse_args(["bench", "quality", "--models", str(tiny_sd), "--samplers", "ddim,lcm",
                              "--steps", "1,2", "--num-samples", "3", "--prompts", str(prompts), "--metrics", "",
                              "--out", str(out), "--batch-size", "2", "--no-progress", "--device", "cpu"])
    assert args.func(args) == 0
    rows = json.loads((out / "results.json").read_text())
    assert sorted((r["sampler"], r["steps"]) for r in rows) == [("ddim", 1), ("ddim", 2), ("lcm", 1), ("lcm", 2)]
    assert all(r["num_samples"] == 3 and r["model"] == tiny_sd.name and r["sec_per_image"] > 0 for r in rows)
    md = (out / "results.md").read_text().splitlines()
    assert len(md) == 2 + 4 and md[0].startswith("| model | sampler | steps |")
    plot = out / "sec_per_image_vs_steps.png"
    assert plot.read_bytes()[:8] == PNG_MAGIC
    with Image.open(plot) as img:
        assert img.width > 100 and img.height > 100
    assert not list(out.rglob("*.tmp-*"))  # atomic_write's temp files
    assert "| lcm | 2 |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "quality", "--samplers", "ddim,euler"])

    # --gamma and --truncate reach the sampler: TCD rows differ by gamma, an over-long prompt is cut, not refused
    prompts.write_text(PROMPTS[0] + " " + " ".join(["word"] * 40) + "\n")
    for gamma in ("0", "1"):
        args = parser.parse_args(["bench", "quality", "--models", str(tiny_sd), "--samplers", "tcd", "--steps", "2",
                                  "--num-samples", "2", "--prompts", str(prompts), "--metrics", "", "--save-images",
                                  "--gamma", gamma, "--truncate", "--out", str(tmp_path / f"g{gamma}"),
                                  "--no-progress", "--device", "cpu"])
        assert args.func(args) == 0
    g0, g1 = (sorted((tmp_path / f"g{g}" / "images").rglob("00000.png"))[0].read_bytes() for g in "01")
    assert g0 != g1
    from lcm_lab.eval.bench import bench_speed

    with pytest.raises(ValueError, match="steps must be >= 1"):  # not silently the default step count
        bench_speed(tiny_sd, steps=0)


def test_bench_quality_plots_metrics_against_steps_and_time(tmp_path):
    from lcm_lab.eval.bench import write_results

    rows = [{"model": m, "sampler": s, "steps": k, "clip": 20 + k + (m == "b"), "fid": 50 / k,
             "sec_per_image": 0.01 * k} for m in ("a", "b") for s in ("ddim", "lcm") for k in (1, 2, 4)]
    paths = write_results(rows, tmp_path)
    for name in ("clip_vs_steps", "clip_vs_time", "fid_vs_steps", "fid_vs_time", "sec_per_image_vs_steps"):
        assert paths[name].read_bytes()[:8] == PNG_MAGIC
    assert "sec_per_image_vs_time" not in paths and len(json.loads(paths["json"].read_text())) == 12


@torch.no_grad()
@pytest.mark.parametrize("sampler", ["ddim", "lcm", "tcd"])
def test_our_images_equal_the_diffusers_pipeline(tiny_sd, sampler):
    """Independent of bench_speed's own check: same modules, prompts and seeds -> same images."""
    from lcm_lab.generation import generate
    from lcm_lab.models.sd import load_ldm

    ldm = load_ldm(tiny_sd)
    pipe = diffusers_pipeline(ldm, sampler)
    assert pipe.unet is ldm.unet and pipe.vae is ldm.vae and pipe.text_encoder is ldm.text_encoder
    seeds = [4, 9, 2]
    extra = {"eta": 0.3} if sampler == "tcd" else {}
    ref = pipe(PROMPTS, num_inference_steps=3, guidance_scale=2.5, output_type="pt",
               generator=[torch.Generator().manual_seed(s) for s in seeds], **extra).images
    ours = generate(ldm, PROMPTS, seeds, sampler=sampler, steps=3, guidance_scale=2.5, gamma=0.3, progress=False)
    assert ref.shape == ours.shape == (3, 3, 16, 16)
    assert (ours - ref).abs().max() <= 1e-4
    other = generate(ldm, PROMPTS, [5, 9, 2], sampler=sampler, steps=3, guidance_scale=2.5, progress=False)
    assert (other[0] - ref[0]).abs().max() > 1e-2  # the comparison can fail: seeds matter


def test_bench_speed_ratio_and_parity(tiny_sd, parser, tmp_path, capsys):
    args = parser.parse_args(["bench", "speed", "--model", str(tiny_sd), "--sampler", "lcm", "--steps", "2",
                              "--batch-size", "2", "--repeats", "3", "--warmup", "1", "--device", "cpu",
                              "--out", str(tmp_path / "speed")])
    assert args.func(args) == 0
    row = json.loads((tmp_path / "speed" / "results.json").read_text())[0]
    assert math.isfinite(row["speed_ratio"]) and row["speed_ratio"] > 0
    assert math.isclose(row["speed_ratio"], row["ours_images_per_s"] / row["diffusers_images_per_s"], rel_tol=1e-9)
    assert math.isclose(row["ours_images_per_s"], 2 / row["ours_latency_s"], rel_tol=1e-9)
    assert row["outputs_match"] is True and row["max_abs_diff"] <= 1e-4
    assert row["diffusers_pipeline"] == "StableDiffusionPipeline+LCMScheduler"
    assert row["ours_peak_mem_mb"] > 0 and row["diffusers_peak_mem_mb"] > 0 and row["process_peak_rss_mb"] > 0
    assert row["ours_peak_extra_mb"] >= 0
    times = json.loads((tmp_path / "speed" / "speed_times.json").read_text())["seconds_per_call"]
    assert len(times["ours"]) == len(times["diffusers"]) == 3
    assert "speed_ratio" in capsys.readouterr().out
    assert (tmp_path / "speed" / "results.md").read_text().startswith("| model |")


def test_bench_speed_w_conditioned_student_uses_lcm_pipeline(tmp_path):
    folder = build_random_pipeline(tmp_path / "student", preset="tiny", w_conditioned=True, seed=1)
    row = bench_speed(folder, sampler="lcm", steps=2, batch_size=2, repeats=1, warmup=0, guidance=4.0, device="cpu")
    assert row["diffusers_pipeline"] == "LatentConsistencyModelPipeline+LCMScheduler"
    assert row["outputs_match"] and row["speed_ratio"] > 0


def test_peak_memory_cpu():
    import mmap

    mem = PeakMemory(torch.device("cpu"))
    mem.reset()
    # 64 MiB of fresh anonymous pages, every page touched. (A tensor from malloc can reuse memory that
    # earlier tests freed but the allocator kept resident, and then the resident set does not grow.)
    block = mmap.mmap(-1, 64 * 2**20)
    for offset in range(0, len(block), mmap.PAGESIZE):
        block[offset] = 1
    peak = mem.peak_mb()
    assert peak >= mem.baseline_mb > 0
    if mem.kind == "rss_high_water_mark":
        assert peak - mem.baseline_mb > 32
    block.close()


def test_sd15_unet_config_is_the_sd15_architecture():
    """On the meta device (no memory, no time): the config gives SD1.5's 859.52M-parameter UNet."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**{**SD15_UNET_CONFIG, "sample_size": 16})
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    assert unet.config.cross_attention_dim == 768


@pytest.mark.slow
def test_bench_speed_sd15_random(tmp_path):
    """The --sd15-random path end to end (builds and saves ~3.4 GB of random weights)."""
    row = bench_speed(sd15_random=True, sampler="lcm", steps=1, batch_size=1, repeats=1, warmup=0, latent_size=8,
                      device="cpu")
    assert row["model"] == "sd15-random" and row["image_size"] == 64
    assert row["outputs_match"] and row["speed_ratio"] > 0


def test_bench_quality_takes_a_toy_prompt_set_object(tmp_path):
    """A PromptSet named "toy" counts as toy prompts for the toy-only metrics, as a "toy" string does."""
    from lcm_lab.eval.bench import bench_quality
    from lcm_lab.eval.evaluate import resolve_prompts
    from lcm_lab.models.sd import load_ldm

    pset = resolve_prompts("toy", 2, load_ldm().tokenizer)
    rows = bench_quality([None], ["ddim"], [1], tmp_path, prompt_set=pset, num_samples=2, metrics=["accuracy"],
                         progress=False, device="cpu")
    assert len(rows) == 1 and 0 <= rows[0]["accuracy"] <= 1 and rows[0]["prompt_set"] == "toy"
