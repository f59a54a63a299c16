"""Students (w-embedding, LoRA) and their export as stock diffusers artifacts.

The exported folders are loaded with stock diffusers classes only (offline) and must generate the same
images as lcm_lab's own sampler: the same initial latents (``lcm_lab.core.noise.randn`` from per-seed
generators) and the same per-seed generators for the fresh noise of multistep LCM, so the noise streams of
both sides match exactly.
"""

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import (
    LatentConsistencyModelPipeline,
    LCMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)

from lcm_lab.core import generators_for_seeds, guidance_scale_embedding, randn
from lcm_lab.generation import generate
from lcm_lab.models.sd import load_ldm, toy_teacher_dir
from lcm_lab.models.student import (
    LORA_TARGET_MODULES,
    add_lora,
    lora_parameters,
    lora_state_dict,
    make_w_student,
)
from lcm_lab.pipelines import export_lcm_pipeline, export_lora

pytestmark = pytest.mark.usefixtures("single_thread_torch")

PROMPTS = ["a large striped red circle on the left, dark background",
           "a small solid blue square on the top, light background"]
SEEDS = [3, 4]
TOL = 1e-4


def tiny_unet(**extra):
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, norm_num_groups=8, attention_head_dim=8, **extra,
    ).eval().requires_grad_(False)


def tiny_inputs(batch=2):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(batch, 4, 8, 8, generator=g), torch.tensor([999, 259])[:batch],
            torch.randn(batch, 7, 32, generator=g))


@torch.no_grad()
def perturb(module, scale, seed, only=None):
    """Add seeded Gaussian noise to (a subset of) a module's parameters."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if only is None or only in name:
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def max_diff(a, b):
    assert a.shape == b.shape and torch.isfinite(a).all() and torch.isfinite(b).all()
    return (a - b).abs().max().item()


# ----------------------------------------------------------------------------- w-student


@torch.no_grad()
def test_w_student_copies_teacher():
    teacher = tiny_unet()
    before = copy.deepcopy(teacher.state_dict())
    student = make_w_student(teacher, w_embedding_dim=32)

    assert student.config.time_cond_proj_dim == 32 and teacher.config.time_cond_proj_dim is None
    assert student.training and all(p.requires_grad and p.dtype == torch.float32 for p in student.parameters())
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    assert set(s_sd) - set(t_sd) == {"time_embedding.cond_proj.weight"} and set(t_sd) <= set(s_sd)
    assert all(torch.equal(t_sd[k], s_sd[k]) for k in t_sd)
    assert student.time_embedding.cond_proj.bias is None
    assert student.time_embedding.cond_proj.weight.shape == (teacher.config.block_out_channels[0], 32)
    assert all(torch.equal(before[k], t_sd[k]) for k in before)  # teacher untouched

    x, t, ehs = tiny_inputs()
    ref = teacher(x, t, encoder_hidden_states=ehs).sample
    zero = student(x, t, encoder_hidden_states=ehs, timestep_cond=torch.zeros(2, 32)).sample
    assert torch.equal(zero, ref)  # bias-free cond_proj: zero w-embedding == teacher, exactly
    w_emb = guidance_scale_embedding(torch.tensor([3.0, 7.0]), 32)
    assert max_diff(student(x, t, encoder_hidden_states=ehs, timestep_cond=w_emb).sample, ref) > 1e-3


def test_w_student_errors():
    with pytest.raises(ValueError, match="w_embedding_dim"):
        make_w_student(tiny_unet(), w_embedding_dim=0)
    with pytest.raises(ValueError, match="already w-conditioned"):
        make_w_student(tiny_unet(time_cond_proj_dim=16), w_embedding_dim=32)
    same = make_w_student(tiny_unet(time_cond_proj_dim=32), w_embedding_dim=32)  # re-initialising a student
    assert same.config.time_cond_proj_dim == 32


# ----------------------------------------------------------------------------- LoRA


@torch.no_grad()
def test_add_lora():
    base = tiny_unet()
    x, t, ehs = tiny_inputs()
    ref = base(x, t, encoder_hidden_states=ehs).sample
    unet = add_lora(copy.deepcopy(base), rank=4, alpha=8)

    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(lora_parameters(unet)) == len(trainable)
    frozen = [n for n, p in unet.named_parameters() if not p.requires_grad]
    assert any(n.endswith("base_layer.weight") for n in frozen)
    adapted = {n for n, m in unet.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    for target in LORA_TARGET_MODULES:
        assert any(n.endswith("." + target) for n in adapted), f"no LoRA adapter on {target}"
    assert unet.peft_config["default"].r == 4 and unet.peft_config["default"].lora_alpha == 8

    assert torch.equal(unet(x, t, encoder_hidden_states=ehs).sample, ref)  # B = 0 at init
    perturb(unet, 1e-2, seed=5, only="lora_B")
    assert max_diff(unet(x, t, encoder_hidden_states=ehs).sample, ref) > 1e-4

    sd = lora_state_dict(unet)
    assert len(sd) == len(trainable)
    # one uniform key format (a mixed lora.down/lora_A dict loses the attention LoRA in diffusers' loader)
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in sd)
    assert {k.rsplit(".lora_", 1)[0] for k in sd} == adapted


def test_add_lora_errors():
    with pytest.raises(ValueError, match="rank"):
        add_lora(tiny_unet(), rank=0)
    with pytest.raises(ValueError, match="alpha"):
        add_lora(tiny_unet(), alpha=-1)
    with pytest.raises(ValueError, match="not_a_layer"):
        add_lora(tiny_unet(), target_modules=["to_q", "not_a_layer"])
    with pytest.raises(ValueError, match="no LoRA adapter"):
        lora_state_dict(tiny_unet())


# ----------------------------------------------------------------------------- LCM pipeline export


@pytest.fixture(scope="module")
def teacher():
    return load_ldm()


@pytest.fixture(scope="module")
def exported(teacher, tmp_path_factory):
    student = make_w_student(teacher.unet, 256)
    perturb(student, 2e-3, seed=11)
    target = copy.deepcopy(student)
    perturb(target, 2e-3, seed=12)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    out = export_lcm_pipeline(tmp_path_factory.mktemp("lcm") / "student", toy_teacher_dir(), student, target,
                              original_inference_steps=50, timestep_scaling=10.0)
    # the caller's modules are not modified
    assert student.training and all(p.dtype == torch.float32 and p.requires_grad for p in student.parameters())
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())
    return out, student, target


def test_export_folder_layout(exported):
    out, student, target = exported
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "LatentConsistencyModelPipeline"
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "LCMScheduler"
    assert sched["original_inference_steps"] == 50 and sched["timestep_scaling"] == 10.0
    teacher_sched = json.loads((toy_teacher_dir() / "scheduler" / "scheduler_config.json").read_text())
    for key in ("beta_start", "beta_end", "beta_schedule", "prediction_type", "num_train_timesteps"):
        assert sched[key] == teacher_sched[key]
    assert not list(out.parent.glob("*.partial-*")) and not list(out.parent.glob("*.old-*"))

    loaded_target = UNet2DConditionModel.from_pretrained(out / "unet_target")
    assert loaded_target.config.time_cond_proj_dim == 256
    t_sd = target.state_dict()
    assert all(torch.equal(v, t_sd[k]) for k, v in loaded_target.state_dict().items())
    loaded = UNet2DConditionModel.from_pretrained(out / "unet")
    s_sd = student.state_dict()
    assert all(torch.equal(v, s_sd[k]) for k, v in loaded.state_dict().items())


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_exported_pipeline_matches_generate(exported, steps):
    out, _, _ = exported
    pipe = LatentConsistencyModelPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, LCMScheduler)
    gens = generators_for_seeds(SEEDS)
    latents = randn((len(SEEDS), 4, 8, 8), gens)  # what generate draws first; then the same streams re-noise
    with torch.no_grad():
        ref = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=5.0, output_type="pt",
                   generator=gens, latents=latents).images
    ours = generate(load_ldm(out), PROMPTS, SEEDS, sampler="lcm", steps=steps, guidance_scale=5.0, progress=False)
    assert ref.shape == ours.shape == (2, 3, 32, 32)
    assert max_diff(ours, ref) <= TOL
    # the w-embedding is live: another guidance scale gives other images
    other = generate(load_ldm(out), PROMPTS, SEEDS, sampler="lcm", steps=steps, guidance_scale=9.0, progress=False)
    assert max_diff(other, ours) > 1e-3


def test_exported_pipeline_img2img_matches_generate(exported):
    """On a LatentConsistencyModelPipeline folder, img2img runs every step on the LCM grid laid out for the
    strength, as LatentConsistencyModelImg2ImgPipeline (given the init latents lcm_lab encodes)."""
    from diffusers import LatentConsistencyModelImg2ImgPipeline

    out, _, _ = exported
    model = load_ldm(out)
    assert model.strength_in_scheduler and not load_ldm(toy_teacher_dir()).strength_in_scheduler
    init = torch.rand(len(SEEDS), 3, 32, 32, generator=torch.Generator().manual_seed(0))
    pipe = LatentConsistencyModelImg2ImgPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        ref = pipe(PROMPTS, image=model.codec.encode(init * 2 - 1), strength=0.5, num_inference_steps=4,
                   guidance_scale=5.0, generator=generators_for_seeds(SEEDS), output_type="pt").images
    ours = generate(model, PROMPTS, SEEDS, sampler="lcm", steps=4, guidance_scale=5.0, images=init, strength=0.5,
                    progress=False)
    assert max_diff(ours, ref) <= TOL


def test_lcm_folder_that_asks_for_clipping_matches_its_stock_pipeline(exported, tmp_path):
    """LatentConsistencyModelPipeline imposes nothing on its scheduler (StableDiffusionPipeline would turn
    clipping off): an LCM folder whose config clips x0 is sampled with that clipping, as the stock pipeline does."""
    out, _, _ = exported
    folder = tmp_path / "clipping"
    folder.mkdir()
    for part in out.iterdir():
        if part.name != "scheduler":
            (folder / part.name).symlink_to(part)
    config = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({**config, "clip_sample": True, "clip_sample_range": 0.5}))
    model = load_ldm(folder)
    assert model.stock_scheduler_overrides == {} and load_ldm(toy_teacher_dir()).stock_scheduler_overrides
    pipe = LatentConsistencyModelPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    gens = generators_for_seeds(SEEDS)
    latents = randn((len(SEEDS), 4, 8, 8), gens)
    with torch.no_grad():
        ref = pipe(PROMPTS, num_inference_steps=4, guidance_scale=5.0, output_type="pt", generator=gens,
                   latents=latents).images
    ours = generate(model, PROMPTS, SEEDS, sampler="lcm", steps=4, guidance_scale=5.0, progress=False)
    assert max_diff(ours, ref) <= TOL
    unclipped = generate(load_ldm(out), PROMPTS, SEEDS, sampler="lcm", steps=4, guidance_scale=5.0, progress=False)
    assert max_diff(ours, unclipped) > 1e-2  # the clipping acted


def test_v_prediction_teacher_distils_and_exports(tmp_path):
    """SD 2.x-style teacher: the toy teacher's weights under a v-prediction scheduler config. LCD reads the
    parameterization from the teacher, and the exported stock pipeline samples like lcm_lab's sampler."""
    from lcm_lab.training import load_method_config
    from lcm_lab.training.lcd import LCDTask
    from lcm_lab.training.trainer import train

    from helpers.tiny_run import tiny_overrides

    v_dir = tmp_path / "v_teacher"
    shutil.copytree(toy_teacher_dir(), v_dir)
    config_file = v_dir / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "prediction_type": "v_prediction"}))
    cfg = load_method_config("lcd", Path(__file__).resolve().parents[1] / "configs/toy/lcd.yaml",
                             tiny_overrides(tmp_path / "run", 2, **{"model.teacher": str(v_dir)}))
    task = LCDTask(cfg)
    train(cfg.train, task)
    assert task.objective.schedule.prediction_type == "v_prediction"

    out = tmp_path / "run" / "final" / "pipeline"
    pipe = LatentConsistencyModelPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    gens = generators_for_seeds(SEEDS)
    latents = randn((len(SEEDS), 4, 8, 8), gens)
    with torch.no_grad():
        ref = pipe(PROMPTS, num_inference_steps=2, guidance_scale=5.0, output_type="pt", generator=gens,
                   latents=latents).images
    ours = generate(load_ldm(out), PROMPTS, SEEDS, sampler="lcm", steps=2, guidance_scale=5.0, progress=False)
    assert max_diff(ours, ref) <= TOL
    # the parameterization matters: read as epsilon, the same network gives other images
    eps_dir = tmp_path / "as_eps"
    shutil.copytree(out, eps_dir)
    sched_file = eps_dir / "scheduler" / "scheduler_config.json"
    sched_file.write_text(json.dumps({**json.loads(sched_file.read_text()), "prediction_type": "epsilon"}))
    as_eps = generate(load_ldm(eps_dir), PROMPTS, SEEDS, sampler="lcm", steps=2, guidance_scale=5.0, progress=False)
    assert max_diff(as_eps, ours) > 1e-2


def test_export_rejects_wrong_unets(teacher, tmp_path):
    with pytest.raises(ValueError, match="w-conditioned"):
        export_lcm_pipeline(tmp_path / "x", toy_teacher_dir(), teacher.unet)
    with pytest.raises(ValueError, match="peft"):
        export_lcm_pipeline(tmp_path / "x", toy_teacher_dir(), add_lora(tiny_unet(time_cond_proj_dim=32), rank=2))
    assert not (tmp_path / "x").exists()


def test_export_crash_keeps_previous(teacher, tmp_path, monkeypatch):
    out = tmp_path / "model"
    out.mkdir()
    (out / "marker.txt").write_text("previous export")
    student = make_w_student(teacher.unet, 256)

    def boom(self, *args, **kwargs):
        raise RuntimeError("disk full")

    with monkeypatch.context() as m:
        m.setattr(UNet2DConditionModel, "save_pretrained", boom)
        with pytest.raises(RuntimeError, match="disk full"):
            export_lcm_pipeline(out, toy_teacher_dir(), student)
    assert (out / "marker.txt").read_text() == "previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]

    with monkeypatch.context() as m:
        m.setattr(StableDiffusionPipeline, "save_lora_weights", boom)
        with pytest.raises(RuntimeError, match="disk full"):
            export_lora(out, add_lora(tiny_unet(), rank=2))
    assert (out / "marker.txt").read_text() == "previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]

    # a successful export replaces the old folder completely
    export_lcm_pipeline(out, toy_teacher_dir(), student)
    assert not (out / "marker.txt").exists() and (out / "model_index.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


# ----------------------------------------------------------------------------- LoRA export


@pytest.mark.parametrize("steps", [1, 2])
def test_lora_export_loads_in_stock_pipeline(teacher, tmp_path, steps):
    peft_unet = add_lora(copy.deepcopy(teacher.unet), rank=8, alpha=16)  # alpha != rank: scaling must survive
    perturb(peft_unet, 2e-2, seed=21, only="lora_B")
    peft_unet.eval()
    # a run with a non-default LCM grid: the saved scheduler must carry it (from_config(teacher) would not)
    out = export_lora(tmp_path / "lora", peft_unet, base=toy_teacher_dir(), original_inference_steps=20,
                      timestep_scaling=5.0)
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert not list(tmp_path.glob("*.partial-*"))

    pipe = StableDiffusionPipeline.from_pretrained(toy_teacher_dir())
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(out)
    n_loaded = sum(".lora_" in n for n, _ in pipe.unet.named_parameters())
    assert n_loaded == len(lora_parameters(peft_unet))  # every LoRA tensor made it, attention included
    pipe.fuse_lora()
    pipe.scheduler = LCMScheduler.from_pretrained(out, subfolder="scheduler")
    assert pipe.scheduler.config.original_inference_steps == 20 and pipe.scheduler.config.timestep_scaling == 5.0
    gens = generators_for_seeds(SEEDS)
    latents = randn((len(SEEDS), 4, 8, 8), gens)
    with torch.no_grad():
        ref = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=1.0, output_type="pt",
                   generator=gens, latents=latents).images

    ldm = copy.copy(teacher)
    ldm.unet = peft_unet
    grid = dict(original_inference_steps=20, timestep_scaling=5.0)
    ours = generate(ldm, PROMPTS, SEEDS, sampler="lcm", steps=steps, guidance_scale=1.0, progress=False, **grid)
    assert max_diff(ours, ref) <= TOL
    plain = generate(teacher, PROMPTS, SEEDS, sampler="lcm", steps=steps, guidance_scale=1.0, progress=False, **grid)
    assert max_diff(plain, ref) > 1e-3  # the adapter actually changes the images


def test_exported_scheduler_never_clips(tmp_path):
    """A teacher scheduler with clip_sample/thresholding on must not make the stock LCM pipeline clip x0:
    neither the LCD objective nor lcm_lab's samplers do."""
    base = tmp_path / "teacher"
    shutil.copytree(toy_teacher_dir() / "scheduler", base / "scheduler")
    cfg_file = base / "scheduler" / "scheduler_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "clip_sample": True, "thresholding": True}))
    out = export_lora(tmp_path / "lora", add_lora(tiny_unet(), rank=2), base=base)
    cfg = LCMScheduler.from_pretrained(out, subfolder="scheduler").config
    assert cfg.clip_sample is False and cfg.thresholding is False
    assert cfg.original_inference_steps == 50 and cfg.timestep_scaling == 10.0
