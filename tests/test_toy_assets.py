"""The embedded toy models: stock diffusers loading, parity of our sampler with the stock
pipeline, the judge's accuracy, and the `lcm-lab sample` / `demo` commands."""

import json
import re

import numpy as np
import pytest
import torch


from lcm_lab.models.sd import toy_teacher_dir

from helpers.tiny_run import TINY

pytestmark = [
    pytest.mark.skipif(not (toy_teacher_dir() / "model_index.json").exists(),
                       reason="toy assets not built (python scripts/build_toy_assets.py)"),
    pytest.mark.usefixtures("single_thread_torch"),
]

PROMPT = "a large striped red circle on the left, dark background"


@pytest.fixture(scope="module")
def ldm():
    from lcm_lab.models.sd import load_ldm

    return load_ldm()


def test_stock_pipeline_loads_and_matches_our_ddim(ldm):
    from diffusers import StableDiffusionPipeline

    from lcm_lab.generation import generate

    pipe = StableDiffusionPipeline.from_pretrained(toy_teacher_dir())
    pipe.set_progress_bar_config(disable=True)
    images = {}
    for guidance in (5.0, 0.5):  # diffusers runs CFG only for a scale > 1: 0.5 is the conditional model
        gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
        ref = pipe([PROMPT, PROMPT], num_inference_steps=6, guidance_scale=guidance, generator=gens,
                   output_type="pt").images
        ours = generate(ldm, [PROMPT, PROMPT], [0, 1], sampler="ddim", steps=6, guidance_scale=guidance,
                        progress=False)
        assert ref.shape == ours.shape == (2, 3, 32, 32)
        assert (ref - ours).abs().max() < 1e-4
        images[guidance] = ours
    assert (images[5.0][0] - images[5.0][1]).abs().max() > 0.05  # different seeds, different images
    assert (images[5.0] - images[0.5]).abs().max() > 0.05  # guidance changed the images
    for prompts in (PROMPT, [PROMPT, None]):  # a bare string would be one image per character
        with pytest.raises(TypeError, match="prompts must be a sequence of strings"):
            generate(ldm, prompts, [0, 1], progress=False)
    with pytest.raises(ValueError, match=r"seeds must be in \[0, 2\*\*63\)"):
        generate(ldm, [PROMPT], [2**63], progress=False)


@pytest.mark.parametrize("spacing, clip", [("leading", {}), ("trailing", {}),
                                           ("linspace", {"clip_sample": True, "clip_sample_range": 0.5})])
@pytest.mark.filterwarnings("ignore:The configuration file of this scheduler:FutureWarning")  # no steps_offset: on purpose
def test_ddim_follows_the_models_scheduler_config(tmp_path, spacing, clip):
    """A model whose scheduler config asks for another DDIM spacing samples on the grid and with the previous
    timesteps of DDIMScheduler.from_config(that config), as the stock pipeline does (at 7 steps the next grid
    point is not t - 1000 // 7 on these grids); StableDiffusionPipeline then imposes steps_offset 1 and no x0
    clipping whatever the config says (clip_sample missing means DDIM's default, on), and so does lcm_lab."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from lcm_lab.generation import generate, sampling_grid
    from lcm_lab.models.sd import load_ldm

    folder = tmp_path / "teacher"
    folder.mkdir()
    for part in toy_teacher_dir().iterdir():
        if part.name != "scheduler":
            (folder / part.name).symlink_to(part)
    config = json.loads((toy_teacher_dir() / "scheduler" / "scheduler_config.json").read_text())
    config["timestep_spacing"] = spacing
    for key in ("steps_offset", "clip_sample", "clip_sample_range"):
        del config[key]
    config.update(clip)
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))

    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    assert (pipe.scheduler.config.steps_offset, pipe.scheduler.config.clip_sample) == (1, False)  # imposed
    model = load_ldm(folder)
    assert model.sampling_config["steps_offset"] == 1 and model.sampling_config["clip_sample"] is False
    pipe.scheduler.set_timesteps(7)
    _, grid = sampling_grid(model.sampling_config, "ddim", 7)
    assert grid.tolist() == pipe.scheduler.timesteps.tolist()
    if spacing == "leading":  # the offset the pipeline imposes (DDIMScheduler's own default would be 0)
        assert grid[-1] == 1
    else:
        assert any(a - b != 1000 // 7 for a, b in zip(grid.tolist(), grid.tolist()[1:]))

    def stock():
        gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
        return pipe([PROMPT, PROMPT], num_inference_steps=7, guidance_scale=5.0, generator=gens,
                    output_type="pt").images

    ref = stock()
    ours = generate(model, [PROMPT, PROMPT], [0, 1], sampler="ddim", steps=7, guidance_scale=5.0, progress=False)
    assert (ref - ours).abs().max() < 1e-4
    pipe.scheduler = DDIMScheduler.from_config({**pipe.scheduler.config, "clip_sample": True})  # what it undid
    assert (stock() - ref).abs().max() > 1e-2  # clipping would have changed the images
    with pytest.raises(ValueError, match="sets thresholding=true .* do not implement"):
        sampling_grid({**config, "thresholding": True}, "ddim", 7)
    sampling_grid({**config, "thresholding": True}, "tcd", 4)  # TCDScheduler.step ignores it


def test_prompt_embeddings_match_the_pipeline_with_and_without_the_padding_mask():
    """encode_prompts = StableDiffusionPipeline.encode_prompt, also for a text encoder whose config asks for the
    padding mask (use_attention_mask): then the padded positions' embeddings change."""
    from diffusers import StableDiffusionPipeline

    from lcm_lab.models.sd import encode_prompts

    pipe = StableDiffusionPipeline.from_pretrained(toy_teacher_dir())
    plain = encode_prompts(pipe.tokenizer, pipe.text_encoder, [PROMPT])
    torch.testing.assert_close(plain, pipe.encode_prompt(PROMPT, "cpu", 1, False)[0], rtol=0, atol=0)
    pipe.text_encoder.config.use_attention_mask = True
    masked = encode_prompts(pipe.tokenizer, pipe.text_encoder, [PROMPT])
    torch.testing.assert_close(masked, pipe.encode_prompt(PROMPT, "cpu", 1, False)[0], rtol=0, atol=0)
    assert (masked - plain).abs().max() > 1e-3


def test_img2img_matches_a_diffusers_loop(ldm):
    """generate(images=..., strength=...) with DDIM equals StableDiffusionImg2ImgPipeline's steps written out
    with the stock scheduler: the posterior mode of the init image (ours; the pipeline samples the posterior),
    the grid trimmed by strength, add_noise at its first timestep with per-seed noise, CFG, decode."""
    from diffusers import DDIMScheduler

    from lcm_lab.generation import generate

    prompts, seeds, guidance, strength = [PROMPT, "a small blue square on the top"], [3, 4], 5.0, 0.5
    init = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ours = generate(ldm, prompts, seeds, sampler="ddim", steps=6, guidance_scale=guidance, images=init,
                    strength=strength, progress=False)

    sched = DDIMScheduler.from_pretrained(toy_teacher_dir() / "scheduler")
    sched.set_timesteps(6)
    start = 6 - min(int(6 * strength), 6)  # StableDiffusionImg2ImgPipeline.get_timesteps
    timesteps = sched.timesteps[start * sched.order:]
    vae, unet, sf = ldm.vae, ldm.unet, ldm.vae.config.scaling_factor

    def embed(texts):
        ids = ldm.tokenizer(texts, padding="max_length", max_length=ldm.tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids
        return ldm.text_encoder(ids)[0]

    with torch.no_grad():
        clean = vae.encode(init * 2 - 1).latent_dist.mode() * sf
        noise = torch.cat([torch.randn((1, *clean.shape[1:]), generator=torch.Generator().manual_seed(s))
                           for s in seeds])
        latents = sched.add_noise(clean, noise, timesteps[:1].repeat(2))
        text = torch.cat([embed(["", ""]), embed(prompts)])
        for t in timesteps:
            eps_u, eps_c = unet(torch.cat([latents, latents]), t, encoder_hidden_states=text).sample.chunk(2)
            latents = sched.step(eps_u + guidance * (eps_c - eps_u), t, latents).prev_sample
        ref = (vae.decode(latents / sf).sample / 2 + 0.5).clamp(0, 1)
    assert len(timesteps) == 3 and (ours - ref).abs().max() < 1e-4
    assert (ours - generate(ldm, prompts, seeds, sampler="ddim", steps=6, guidance_scale=guidance,
                            progress=False)).abs().max() > 0.05  # the init images mattered


@pytest.mark.parametrize("sampler", ["lcm", "tcd"])
def test_few_step_img2img_matches_the_stock_img2img_pipeline(ldm, sampler):
    """On a StableDiffusionPipeline folder, LCM / TCD img2img is StableDiffusionImg2ImgPipeline's with that
    scheduler: the last int(n * strength) steps of the full grid, not LatentConsistencyModelImg2ImgPipeline's
    grid laid out for the strength. The pipeline gets the init latents (the posterior mode lcm_lab encodes;
    given pixels it would sample the posterior)."""
    from diffusers import LCMScheduler, StableDiffusionImg2ImgPipeline, TCDScheduler

    from lcm_lab.core.noise import generators_for_seeds
    from lcm_lab.generation import generate, sampling_grid

    prompts, seeds, guidance, strength, gamma = [PROMPT, "a small blue square on the top"], [3, 4], 5.0, 0.5, 0.3
    init = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ours = generate(ldm, prompts, seeds, sampler=sampler, steps=4, guidance_scale=guidance, images=init,
                    strength=strength, gamma=gamma, progress=False)
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(toy_teacher_dir())
    pipe.scheduler = {"lcm": LCMScheduler, "tcd": TCDScheduler}[sampler].from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        ref = pipe(prompts, image=ldm.codec.encode(init * 2 - 1), strength=strength, num_inference_steps=4,
                   guidance_scale=guidance, eta=gamma, generator=generators_for_seeds(seeds), output_type="pt").images
    assert (ours - ref).abs().max() < 1e-4
    _, ran = sampling_grid(ldm.sampling_config, sampler, 4, strength=strength)
    assert len(ran) == 2 and len(sampling_grid(ldm.sampling_config, sampler, 4, strength=strength,
                                               strength_in_scheduler=True)[1]) == 4


def test_per_seed_images_do_not_depend_on_batch(ldm):
    from lcm_lab.generation import generate

    prompts = [PROMPT, "a small solid blue square on the top, light background", PROMPT]
    together = generate(ldm, prompts, [7, 8, 9], sampler="lcm", steps=2, guidance_scale=3.0, batch_size=3)
    alone = generate(ldm, prompts[2:], [9], sampler="lcm", steps=2, guidance_scale=3.0)
    assert torch.allclose(together[2], alone[0], atol=1e-5)


def test_teacher_follows_prompts(ldm):
    from lcm_lab.eval.toy import eval_prompts, load_judge, prompt_accuracy
    from lcm_lab.generation import generate

    prompts, attrs = eval_prompts(24)
    images = generate(ldm, prompts, list(range(24)), sampler="ddim", steps=20, guidance_scale=5.0)
    acc = prompt_accuracy(load_judge(), images, attrs)
    assert acc["accuracy"] >= 0.7, acc


def test_judge_reads_real_images():
    from lcm_lab.eval.toy import load_judge, prompt_accuracy, real_images

    images, attrs = real_images(300, start=5000)
    acc = prompt_accuracy(load_judge(), images, attrs)
    assert min(v for k, v in acc.items() if k.startswith("acc_")) >= 0.97, acc


def test_corrupt_model_files_name_the_file(tmp_path):
    import shutil

    from lcm_lab.models.sd import load_ldm
    from lcm_lab.toy.judge import AttributeJudge

    teacher = tmp_path / "teacher"
    shutil.copytree(toy_teacher_dir(), teacher)
    (teacher / "text_encoder" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="cannot read text encoder .*text_encoder"):
        load_ldm(teacher)
    shutil.copytree(toy_teacher_dir() / "text_encoder", teacher / "text_encoder", dirs_exist_ok=True)
    for weights in (teacher / "unet").glob("*.safetensors"):  # missing, not corrupt: said so
        weights.unlink()
    with pytest.raises(FileNotFoundError, match=r"UNet .*unet has no weights file: .*no file named"):
        load_ldm(teacher)
    shutil.copytree(toy_teacher_dir() / "unet", teacher / "unet", dirs_exist_ok=True)
    from safetensors.torch import load_file, save_file

    for part, dropped in (("unet", "conv_out.weight"), ("text_encoder", "final_layer_norm.weight")):
        # diffusers and transformers only log a tensor missing from the weights (and leave it random or on meta)
        weights = next((teacher / part).glob("*.safetensors"))
        state = load_file(weights)
        del state[dropped]
        save_file(state, weights)
        with pytest.raises(ValueError, match=rf"cannot read .* {teacher / part} .*1 tensor\(s\) of the model missing "
                                             rf"from its weights, e.g. .*{re.escape(dropped)}"):
            load_ldm(teacher)
        shutil.copytree(toy_teacher_dir() / part, teacher / part, dirs_exist_ok=True)
    (teacher / "tokenizer" / "tokenizer.json").unlink()  # transformers would build a 2-token tokenizer
    with pytest.raises(FileNotFoundError, match="tokenizer folder .*tokenizer has neither tokenizer.json nor "
                                                "vocab.json"):
        load_ldm(teacher)
    shutil.copytree(toy_teacher_dir() / "tokenizer", teacher / "tokenizer", dirs_exist_ok=True)
    from transformers import CLIPTokenizer

    from lcm_lab.models.sd import load_tokenizer

    with pytest.raises(ValueError, match="has 49408 tokens but the text encoder only 1000 embeddings"):
        load_tokenizer(CLIPTokenizer, teacher / "tokenizer", vocab_size=1000)  # ids past the embedding table
    config = teacher / "scheduler" / "scheduler_config.json"
    good = config.read_text()
    for text, match in (("{not json", "scheduler config .*scheduler_config.json is not valid UTF-8 JSON"),
                        (good.replace('"beta_end": 0.012', '"beta_end": "abc"'),
                         "cannot read scheduler config .*scheduler_config.json \\(TypeError")):
        config.write_text(text)
        with pytest.raises(ValueError, match=match):
            load_ldm(teacher)
    config.unlink()
    with pytest.raises(FileNotFoundError, match="lacks scheduler/scheduler_config.json. Copy the scheduler/"):
        load_ldm(teacher)
    judge = tmp_path / "judge"
    shutil.copytree(toy_teacher_dir().parent / "judge", judge)
    (judge / "model.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match="cannot read toy judge folder"):
        AttributeJudge.from_pretrained(judge)


def test_reward_model_loads_with_open_clip_and_prefers_matching_captions():
    import open_clip

    from lcm_lab.eval.toy import real_images
    from lcm_lab.models.sd import assets_dir

    model = open_clip.create_model("local-dir:" + str(assets_dir() / "toy" / "reward")).eval()
    tok = open_clip.get_tokenizer("local-dir:" + str(assets_dir() / "toy" / "reward"))
    images, attrs = real_images(16, start=7000)
    from lcm_lab.toy.world import caption_for

    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():
        img = model.encode_image((images - mean) / std, normalize=True)
        txt = model.encode_text(tok([caption_for(a) for a in attrs]), normalize=True)
    sims = img @ txt.t()
    assert (sims.diag() > sims.mean(1)).float().mean() >= 0.9


def test_cli_sample_writes_png_and_rejects_bad_input(tmp_path, capsys, monkeypatch):
    from PIL import Image

    from lcm_lab.cli import main

    out = tmp_path / "s.png"
    assert main(["sample", "--prompt", PROMPT, "--steps", "4", "--out", str(out)]) == 0
    assert Image.open(out).size == (32, 32)
    grid = tmp_path / "g.png"
    assert main(["sample", "--prompt", PROMPT, "--sampler", "lcm", "--steps", "2", "--num-images", "3",
                 "--out", str(grid)]) == 0
    assert Image.open(grid).size[0] > 3 * 32
    # img2img from the first image
    assert main(["sample", "--prompt", PROMPT, "--image", str(out), "--strength", "0.5", "--out",
                 str(tmp_path / "i.png")]) == 0
    capsys.readouterr()
    for bad in (["--prompt", " "], ["--prompt", PROMPT, "--sampler", "lcm", "--steps", "60"],
                ["--prompt", PROMPT, "--strength", "0.5"], ["--prompt", "word " * 60],
                ["--prompt", PROMPT, "--image", str(tmp_path / "missing.png"), "--strength", "0.5"],
                ["--prompt", PROMPT, "--sampler", "lcm", "--steps", "0"],
                ["--prompt", PROMPT, "--guidance", "nan"]):
        assert main(["sample", *bad, "--out", str(tmp_path / "bad.png")]) == 2
        assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "bad.png").exists()
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not a png")
    assert main(["sample", "--prompt", PROMPT, "--image", str(corrupt), "--strength", "0.5",
                 "--out", str(tmp_path / "bad.png")]) == 2
    assert "cannot read" in capsys.readouterr().err
    # --out: the extension picks the format; a folder or an unknown extension fails before any sampling
    assert main(["sample", "--prompt", PROMPT, "--steps", "1", "--out", str(tmp_path / "s.jpg")]) == 0
    assert Image.open(tmp_path / "s.jpg").format == "JPEG"
    capsys.readouterr()
    monkeypatch.setattr("lcm_lab.models.sd.load_ldm", lambda *a, **k: pytest.fail("sampled before checking --out"))
    for bad_out, message in ((tmp_path, "is a folder"), (tmp_path / "s.txt", "not an image file name"),
                             (tmp_path / "s.xbm", "not an image file name PIL can write as RGB"),  # 1-bit only
                             (tmp_path / "s.jpg" / "deeper" / "s.png", "s.jpg is a file, so no folder can be made")):
        assert main(["sample", "--prompt", PROMPT, "--out", str(bad_out)]) == 2
        assert message in capsys.readouterr().err
    for bad in (["--seed", str(2**64)], ["--num-images", "0"]):  # argparse errors
        with pytest.raises(SystemExit):
            main(["sample", "--prompt", PROMPT, *bad])
    monkeypatch.undo()
    # non-finite images (damaged weights, fp16 overflow) are an error, not a black PNG
    from lcm_lab.models.sd import load_ldm

    broken = load_ldm()
    with torch.no_grad():
        broken.unet.conv_out.bias.fill_(float("nan"))
    monkeypatch.setattr("lcm_lab.models.sd.load_ldm", lambda *a, **k: broken)
    assert main(["sample", "--prompt", PROMPT, "--out", str(tmp_path / "nan.png")]) == 2
    assert "non-finite images" in capsys.readouterr().err and not (tmp_path / "nan.png").exists()


def test_demo_checks_are_the_issue_bounds():
    from lcm_lab.demo import demo_checks

    def rows(l2_fd, l4_fd, l2_acc, l4_acc):
        return {"teacher-ddim-50": {"fd": 40.0, "accuracy": 0.99}, "teacher-ddim-4": {"fd": 100.0, "accuracy": 0.7},
                "lcm-2": {"fd": l2_fd, "accuracy": l2_acc}, "lcm-4": {"fd": l4_fd, "accuracy": l4_acc}}

    passing = demo_checks(rows(80.0, 50.0, 0.94, 0.94))  # every value exactly at (or inside) its bound
    assert [c["pass"] for c in passing] == [True] * 5
    assert [c["bound"] for c in passing] == pytest.approx([60.0, 80.0, 0.94, 0.94, 50.0])
    # one value past its bound fails exactly the checks that read it (LCM-4 FD has two bounds)
    for values, failing in (((80.0, 50.5, 0.94, 0.94), {4}), ((80.0, 60.5, 0.94, 0.94), {0, 4}),
                            ((80.5, 50.0, 0.94, 0.94), {1}), ((80.0, 50.0, 0.94, 0.93), {2}),
                            ((80.0, 50.0, 0.93, 0.94), {3})):
        assert {i for i, c in enumerate(demo_checks(rows(*values))) if not c["pass"]} == failing


def test_demo_distills_evaluates_and_reports(tmp_path):
    from lcm_lab.demo import run_demo

    tiny = [f"{k}={v}" for k, v in TINY.items()]
    report = run_demo(tmp_path / "demo", num_samples=12, overrides=tiny, num_prompts=3, reference_num=12,
                      progress=False)
    saved = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert saved["prompts"] == report["prompts"] and len(saved["prompts"]) == 3
    assert [(r["sampler"], r["steps"]) for r in saved["rows"]] == [("ddim", 50), ("ddim", 4), ("lcm", 1),
                                                                    ("lcm", 2), ("lcm", 4)]
    assert all(r["num_samples"] == 12 and r["fd"] > 0 and 0 <= r["accuracy"] <= 1 for r in saved["rows"])
    assert len(saved["checks"]) == 5 and all(isinstance(c["pass"], bool) for c in saved["checks"])
    assert "| lcm | lcm | 4 |" in (tmp_path / "demo" / "report.md").read_text()
    index = json.loads((tmp_path / "demo" / "model" / "model_index.json").read_text())
    assert index["_class_name"] == "LatentConsistencyModelPipeline"
    from PIL import Image

    grid = np.asarray(Image.open(tmp_path / "demo" / "comparison.png"))
    assert grid.shape[0] > 5 * 32 * 4 and grid.shape[1] > 3 * 32 * 4
