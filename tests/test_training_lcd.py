"""The LCD training loop on the embedded toy teacher: learning happens, resume is exact, bad input is handled."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from lcm_lab.training import load_method_config
from lcm_lab.training.checkpoint import CheckpointError
from lcm_lab.training.config import ConfigError, apply_overrides
from lcm_lab.training.data import StepBatchSampler
from lcm_lab.training.lcd import LCDTask
from lcm_lab.training.trainer import train

from helpers.tiny_run import tiny_overrides
from helpers.two_ranks import exported_unet, launch_two_cpu_ranks, relative_gap, run_two_cpu_ranks

pytestmark = pytest.mark.usefixtures("single_thread_torch")

REPO = Path(__file__).resolve().parents[1]


def run_lcd(out: Path, steps: int, config: str = "configs/toy/lcd.yaml", **extra) -> LCDTask:
    cfg = load_method_config("lcd", REPO / config, tiny_overrides(out, steps, **extra))
    task = LCDTask(cfg)
    train(cfg.train, task)
    return task


def test_every_trainable_parameter_changes_and_export_loads(tmp_path):
    from diffusers import LatentConsistencyModelPipeline, UNet2DConditionModel

    cfg = load_method_config("lcd", REPO / "configs/toy/lcd.yaml", tiny_overrides(tmp_path, 3))
    task = LCDTask(cfg)
    before = {n: p.detach().clone() for n, p in task.student.named_parameters() if p.requires_grad}
    teacher_before = {n: p.detach().clone() for n, p in task.ldm.unet.named_parameters()}
    train(cfg.train, task)
    after = dict(task.student.named_parameters())
    unchanged = [n for n, p in before.items() if torch.equal(p, after[n].detach())]
    assert not unchanged, f"{len(unchanged)} trainable parameters did not change, e.g. {unchanged[:3]}"
    assert all(torch.equal(p, dict(task.ldm.unet.named_parameters())[n]) for n, p in teacher_before.items())
    # the EMA target moved towards the student but is not the student
    target = dict(task.ema.model.named_parameters())
    name = "time_embedding.cond_proj.weight"
    assert not torch.equal(target[name], after[name])
    assert not torch.equal(target[name], before[name])

    pipe_dir = tmp_path / "final" / "pipeline"
    pipe = LatentConsistencyModelPipeline.from_pretrained(pipe_dir)
    image = pipe("a small red solid circle on the left, dark background", num_inference_steps=2,
                 guidance_scale=5.0, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()
    exported = UNet2DConditionModel.from_pretrained(pipe_dir / "unet_target")  # the online UNet
    assert torch.equal(dict(exported.named_parameters())[name], after[name].detach())


def test_lcd_training_shrinks_the_held_out_consistency_gap(tmp_path):
    """Learning, not just movement: 40 steps of the toy recipe make f(x_{t_{n+k}}) and f(x_hat_{t_n}) (the
    teacher's solver step) agree better on images the run never saw (measured: 0.102 -> 0.094)."""
    from lcm_lab.core.conditioning import Conditioning
    from lcm_lab.core.latents import LatentCodec
    from lcm_lab.training.data import ToyImages, collate

    cfg = load_method_config("lcd", REPO / "configs/toy/lcd.yaml", tiny_overrides(
        tmp_path, 40, **{"train.batch_size": 16, "train.learning_rate": 1e-4, "data.num_images": 1024,
                         "train.checkpointing_steps": 40}))
    task = LCDTask(cfg)
    held_out = collate([ToyImages(4352)[i] for i in range(4096, 4352)])  # the run trains on items 0..1023
    latents = LatentCodec(task.ldm.vae).encode(held_out["pixel_values"], generator=torch.Generator().manual_seed(0),
                                               sample=True, no_grad=True)
    cond = Conditioning(task.ldm.encode_prompts(held_out["text"], allow_empty=True, truncate=True))
    initial = copy.deepcopy(task.student)
    train(cfg.train, task)

    def gap(net):  # the LCD loss with the net as its own target, on fixed draws
        with torch.no_grad():
            return float(task.objective(net, net, latents, cond, torch.Generator().manual_seed(123))[0])

    before = gap(initial)
    assert gap(task.student) < 0.96 * before and gap(task.ema.model) < 0.96 * before


def test_validation_grid_samples_with_the_objectives_lcm_grid_and_scaling(tmp_path):
    from lcm_lab.generation import generate

    # a tiny boundary scaling (c_skip = 0.5 at s * t = sigma_data) makes it visible in a 2-step sample
    prompt = "a small red solid circle on the left, dark background"
    task = run_lcd(tmp_path, 2, **{"train.validation_steps": 2, "validation.prompts": f'["{prompt}"]',
                                   "validation.steps": "[2]", "objective.timestep_scaling": 0.001})
    assert (tmp_path / "validation" / "step-000002.png").is_file()
    images, n = task.validation_images()
    assert n == 1 and images.shape == (1, 3, 32, 32)
    view = copy.copy(task.ldm)
    view.unet = task.final_unet().eval()
    kwargs = {"sampler": "lcm", "steps": 2, "guidance_scale": task.config.validation.guidance_scale,
              "original_inference_steps": task.config.objective.num_ddim_timesteps, "progress": False}
    torch.testing.assert_close(images, generate(view, [prompt], [0], timestep_scaling=0.001, **kwargs), rtol=0, atol=0)
    assert (images - generate(view, [prompt], [0], timestep_scaling=10.0, **kwargs)).abs().max() > 1e-3


def test_resume_continues_to_the_same_weights(tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    run_lcd(full, 4)
    run_lcd(split, 2)
    assert (split / "checkpoints" / "checkpoint-2" / "extra" / "target_ema.safetensors").is_file()
    run_lcd(split, 4, **{"train.resume_from_checkpoint": "latest"})
    for sub in ("unet", "unet_target"):
        a = load_file(full / "final" / "pipeline" / sub / "diffusion_pytorch_model.safetensors")
        b = load_file(split / "final" / "pipeline" / sub / "diffusion_pytorch_model.safetensors")
        assert a.keys() == b.keys()
        diffs = [k for k in a if not torch.equal(a[k], b[k])]
        assert not diffs, f"{sub}: {len(diffs)} tensors differ after resume, e.g. {diffs[:3]}"


def test_corrupt_or_incomplete_checkpoint_names_the_folder(tmp_path):
    run_lcd(tmp_path, 2)
    ckpt = tmp_path / "checkpoints" / "checkpoint-2"
    resume = {"train.resume_from_checkpoint": "latest"}
    for name, part in (("random_states_0.pkl", "random_states_0.pkl"), ("model.safetensors", "accelerate's model"),
                       ("optimizer.bin", "accelerate's model"),
                       ("extra/target_ema.safetensors", "extra/target_ema.safetensors")):
        # a truncated RNG state: accelerate alone would only log it and resume with the current RNG;
        # the task's own extra state is checked too
        file = ckpt / name
        good = file.read_bytes()
        file.write_bytes(good[:50])
        with pytest.raises(CheckpointError, match=r"cannot resume from .*checkpoint-2: .*\(reading "
                                                  + re.escape(part) + r".*if the folder is damaged") as info:
            run_lcd(tmp_path, 4, **resume)
        assert "weights_only=False" not in str(info.value)  # torch's advice for untrusted pickles is not the fix
        file.write_bytes(good)
    state = ckpt / "lcm_lab_state.json"
    good = state.read_text()
    state.write_text(good[:5])
    with pytest.raises(CheckpointError, match=r"checkpoint-2: unreadable lcm_lab_state.json"):
        run_lcd(tmp_path, 4, **resume)
    state.write_text(good)
    # a resume with another batch layout would replay neither the data order nor the RNG streams
    with pytest.raises(CheckpointError, match=r"checkpoint-2: it was saved with batch_size=4 \(now 2\)"):
        run_lcd(tmp_path, 4, **resume, **{"train.batch_size": 2})
    with pytest.raises(CheckpointError, match=r"checkpoint-2: it was saved with seed=0 \(now 1\)"):
        run_lcd(tmp_path, 4, **resume, **{"train.seed": 1})
    # a state file whose step is not its folder's; the checkpointed skip counters missing
    state.write_text(json.dumps({**json.loads(good), "step": 99}))
    with pytest.raises(CheckpointError, match=r"checkpoint-2: its lcm_lab_state.json records step 99, not the "
                                              r"folder's"):
        run_lcd(tmp_path, 4, **resume)
    state.write_text(good)
    counters = ckpt / "extra" / "counters.safetensors"
    good = counters.read_bytes()
    counters.unlink()
    with pytest.raises(CheckpointError, match=r"checkpoint-2: KeyError: .*no counters of skipped images"):
        run_lcd(tmp_path, 4, **resume)
    counters.write_bytes(good)
    (ckpt / "extra" / "target_ema.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"cannot resume from .*checkpoint-2: KeyError: .*target_ema"):
        run_lcd(tmp_path, 4, **resume)


def test_a_resume_takes_this_runs_optimizer_settings(tmp_path, capsys):
    """A restored optimizer would bring back the checkpoint's learning rate and AdamW settings; the usual fix
    after a non-finite loss is a lower learning rate on a resume, so the run's own settings win (and are said)."""
    run_lcd(tmp_path, 2)
    resume = {"train.resume_from_checkpoint": "latest"}
    run_lcd(tmp_path, 3, **resume, **{"train.learning_rate": 2e-5, "train.adam_weight_decay": 0.5})
    assert "resumed with weight_decay=0.5 (the checkpoint's: 0.01), learning_rate=2e-05 (the checkpoint's: 0.001)" \
        in capsys.readouterr().out
    ckpt = tmp_path / "checkpoints" / "checkpoint-3"
    group = torch.load(ckpt / "optimizer.bin", weights_only=True)["param_groups"][0]
    assert (group["lr"], group["weight_decay"], group["betas"]) == (2e-5, 0.5, (0.9, 0.999))
    assert torch.load(ckpt / "scheduler.bin", weights_only=True)["base_lrs"] == [2e-5]
    # a checkpoint past max_steps is refused, not silently exported as the shorter run
    with pytest.raises(ValueError, match=r"checkpoint-3 is at step 3, past train.max_steps=2"):
        run_lcd(tmp_path, 2, **resume)


def test_a_save_interrupted_while_swapping_a_resaved_step_is_put_back(tmp_path, capsys):
    """Re-saving a step moves the old copy aside before the new one takes its name: a crash between the two
    leaves only ``checkpoint-<step>.old-<host>-<pid>``, which the next run restores instead of resuming from an
    earlier step; a crash mid-save leaves a ``.tmp-checkpoint-<step>`` folder, which it removes."""
    run_lcd(tmp_path, 3, **{"train.checkpointing_steps": 1})
    assert "to resume: training from step 0" in capsys.readouterr().out  # `latest` in a new folder, said
    root = tmp_path / "checkpoints"
    killed = f"checkpoint-3.old-{socket.gethostname()}-999999999"  # the pid of a writer that no longer exists
    os.replace(root / "checkpoint-3", root / killed)
    shutil.copytree(root / "checkpoint-2", root / ".tmp-checkpoint-5")
    run_lcd(tmp_path, 3, **{"train.resume_from_checkpoint": "latest"})
    out = capsys.readouterr().out
    assert "put back" in out and "resumed from" in out and "at step 3" in out
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-2", "checkpoint-3"]
    shutil.copytree(root / "checkpoint-3", root / killed)  # a crash after the swap: only cleanup left
    run_lcd(tmp_path, 3, **{"train.resume_from_checkpoint": "latest"})
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-2", "checkpoint-3"]


def test_a_fresh_run_does_not_overwrite_an_earlier_runs_checkpoints(tmp_path):
    run_lcd(tmp_path, 4, **{"train.checkpointing_steps": 1})
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    cfg = load_method_config("lcd", REPO / "configs/toy/lcd.yaml",
                             tiny_overrides(tmp_path, 2, **{"train.resume_from_checkpoint": "null"}))
    task = LCDTask(cfg)
    with pytest.raises(ValueError, match=r"earlier run \(latest: checkpoint-4\).*resume_from_checkpoint=latest"):
        train(cfg.train, task)
    assert task.objective is None  # refused before the task's set-up (device placement, latent caching)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before


def test_lora_only_adapters_train_and_export(tmp_path):
    task = run_lcd(tmp_path, 2, config="configs/toy/lcd_lora.yaml", **{"model.lora_rank": 4, "model.lora_alpha": 4})
    trainable = [n for n, p in task.student.named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n in trainable)
    assert (tmp_path / "final" / "lora" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_lora_under_mixed_precision_keeps_the_frozen_base_in_bf16(tmp_path):
    """As diffusers' LoRA script: the frozen base in the mixed-precision dtype (half the memory), the adapters
    float32 masters that train; the EMA target shares the bf16 base; validation and export work."""
    cfg = load_method_config("lcd", REPO / "configs/toy/lcd_lora.yaml", tiny_overrides(
        tmp_path, 2, **{"train.mixed_precision": "bf16", "train.validation_steps": 2, "model.lora_target_ema": True,
                        "model.lora_rank": 4, "model.lora_alpha": 4}))
    task = LCDTask(cfg)
    before = {n: p.detach().clone() for n, p in task.student.named_parameters()}
    train(cfg.train, task)
    params = dict(task.student.named_parameters())
    frozen = {n: p for n, p in params.items() if not p.requires_grad}
    adapters = {n: p for n, p in params.items() if p.requires_grad}
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen.values())
    assert adapters and all(p.dtype == torch.float32 for p in adapters.values())
    assert all(not torch.equal(p, before[n]) for n, p in adapters.items())
    assert all(torch.equal(p, before[n].bfloat16()) for n, p in frozen.items())
    target = dict(task.ema.model.named_parameters())
    assert all(target[n] is p for n, p in frozen.items())
    assert (tmp_path / "validation" / "step-000002.png").is_file()
    assert (tmp_path / "final" / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_lora_ema_target_shares_frozen_weights(tmp_path):
    task = run_lcd(tmp_path, 2, config="configs/toy/lcd_lora.yaml",
                   **{"model.lora_rank": 4, "model.lora_alpha": 4, "model.lora_target_ema": True})
    online, target = dict(task.student.named_parameters()), dict(task.ema.model.named_parameters())
    frozen = [n for n, p in online.items() if not p.requires_grad]
    assert frozen and all(target[n] is online[n] for n in frozen)
    lora = [n for n, p in online.items() if p.requires_grad]
    assert any(not torch.equal(target[n], online[n]) for n in lora)
    # channels_last=frozen lays out the teacher, not the student's base weights that its target shares
    convs = [online[n] for n in frozen if online[n].dim() == 4 and min(online[n].shape[1:]) > 1]  # not 1x1
    assert convs and not any(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert task.ldm.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


def test_checkpoint_limit_and_tensorboard_logs(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_lcd(tmp_path, 6, **{"train.checkpoints_total_limit": 2, "train.report_to": "tensorboard", "train.log_every": 2})
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["checkpoint-4", "checkpoint-6"]
    events = list((tmp_path / "logs").rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file written"
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    losses = acc.Scalars("loss")
    assert [e.step for e in losses] == [2, 4, 6] and all(e.value > 0 for e in losses)

    # Resumed from an older checkpoint into the same folder, the run replaces the abandoned later checkpoints:
    # the limit keeps this run's own, and `latest` would find this run's last one.
    older = str(tmp_path / "checkpoints" / "checkpoint-4")
    run_lcd(tmp_path, 5, **{"train.checkpoints_total_limit": 2, "train.report_to": "none",
                            "train.resume_from_checkpoint": older, "train.checkpointing_steps": 1})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint-4", "checkpoint-5"]
    # ...but a checkpoint from elsewhere must not prune this folder's: refused before any step
    shutil.copytree(older, tmp_path / "elsewhere" / "checkpoint-4")
    with pytest.raises(ValueError, match="holds checkpoints of another run"):
        run_lcd(tmp_path, 5, **{"train.resume_from_checkpoint": str(tmp_path / "elsewhere" / "checkpoint-4")})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint-4", "checkpoint-5"]


def test_a_section_keeps_its_methods_defaults_for_the_keys_it_does_not_give(tmp_path):
    """LCD's and RG-LCD's own train.output_dir (not LoopConfig's "outputs/run", where the two would meet) stays
    when other train keys are given, from overrides or from a file's train section."""
    for method in ("lcd", "rg_lcd"):
        assert load_method_config(method, None, []).train.output_dir == f"outputs/{method}"
        cfg = load_method_config(method, None, ["train.max_steps=5"])
        assert cfg.train.output_dir == f"outputs/{method}" and cfg.train.max_steps == 5
    config = tmp_path / "lcd.yaml"
    config.write_text("train:\n  max_steps: 7\nobjective:\n  w_max: 6.0\n")
    cfg = load_method_config("lcd", config, ["objective.w_min=2"])
    assert (cfg.train.output_dir, cfg.train.max_steps, cfg.objective.w_min, cfg.objective.w_max) == ("outputs/lcd", 7, 2, 6)
    with pytest.raises(ConfigError, match="train.max_steps must be int"):  # still checked in a section
        load_method_config("lcd", config, ["train.max_steps=many"])


def test_unknown_and_bad_config_keys_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="max_steps"):
        load_method_config("lcd", REPO / "configs/toy/lcd.yaml", ["train.max_step=3"])
    with pytest.raises(ConfigError, match="unknown config key"):
        load_method_config("lcd", None, ["objectiv.w_min=3"])
    with pytest.raises(ConfigError, match="w_min"):
        load_method_config("lcd", None, ["objective.w_min=9", "objective.w_max=3"])
    with pytest.raises(ConfigError, match="must be int"):
        load_method_config("lcd", None, ["train.max_steps=many"])
    with pytest.raises(ConfigError, match="model.teacher is empty"):  # an unset shell variable: not the toy teacher
        load_method_config("lcd", REPO / "configs/sd15/lcd.yaml", ["model.teacher=", "data.path=/data/shards"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  batch_sise: 4\n")
    with pytest.raises(ConfigError, match="batch_size"):
        load_method_config("lcd", bad)
    for bad in (["validation.steps=[0]"], ["validation.guidance_scale=.nan"], ["validation.steps=[20]"]):
        with pytest.raises(ConfigError, match="validation"):
            load_method_config("lcd", REPO / "configs/toy/lcd.yaml", bad)
    for key, value in (("max_grad_norm", ".nan"), ("output_dir", "''"), ("learning_rate", ".nan")):
        with pytest.raises(ConfigError, match=key):
            load_method_config("lcd", REPO / "configs/toy/lcd.yaml", [f"train.{key}={value}"])
    cfg = load_method_config("lcd", REPO / "configs/toy/lcd.yaml", tiny_overrides(
        tmp_path / "long", 2, **{"train.validation_steps": 2, "validation.prompts": "['" + "word " * 40 + "']"}))
    with pytest.raises(ValueError, match=r"validation.prompts: prompt has \d+ tokens, more than .* Shorten it\.$"):
        train(cfg.train, LCDTask(cfg))
    assert not (tmp_path / "long" / "checkpoints").exists()
    cfg = load_method_config("lcd", REPO / "configs/toy/lcd.yaml", ["objective.w_min=2", "train.learning_rate=3e-4"])
    assert cfg.objective.w_min == 2.0 and cfg.train.learning_rate == 3e-4
    for key in ("seed", "lr_warmup_steps", "validation_steps"):
        with pytest.raises(ConfigError, match=f"{key} must be >= 0, got -1"):
            load_method_config("lcd", None, [f"train.{key}=-1"])
    with pytest.raises(ConfigError, match=r"output_dir must be str, got int 7 \(put the value in quotes"):
        load_method_config("lcd", None, ["train.output_dir=007"])
    assert load_method_config("lcd", None, ["train.output_dir='007'"]).train.output_dir == "007"
    # YAML 1.1 reads 1e-4 (no dot) as a string; an empty section keeps its defaults and takes overrides
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  learning_rate: 1e-4\nobjective:\n")
    cfg = load_method_config("lcd", path, ["objective.w_max=7"])
    assert cfg.train.learning_rate == 1e-4 and cfg.objective.w_max == 7.0
    # the same in overrides of untyped values (reward_kwargs); quoted, it stays text
    assert apply_overrides({}, ["a.b=1e-2", "a.c='1e-2'"]) == {"a": {"b": 0.01, "c": "1e-2"}}
    assert apply_overrides({}, ["a.b=1.5e3", "a.c=.5E-2", "a.d=-2.e1"]) == {"a": {"b": 1500.0, "c": 0.005, "d": -20.0}}
    # malformed YAML in an override, or a file that is not a mapping: a ConfigError naming it, not a traceback
    for raw in ("@x", "[a, b", "*foo"):
        with pytest.raises(ConfigError, match=re.escape(f"train.output_dir={raw}")):
            load_method_config("lcd", None, [f"train.output_dir={raw}"])
    path.write_text("- train\n- objective\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_method_config("lcd", path, ["train.max_steps=3"])
    # a diffusers schedule that needs arguments the config cannot give
    with pytest.raises(ConfigError, match="piecewise_constant"):
        load_method_config("lcd", None, ["train.lr_scheduler=piecewise_constant"])
    # nan or inf in any float, a key written twice (PyYAML would keep the last), a file that is not UTF-8
    for key in ("train.adam_beta1", "train.adam_epsilon", "objective.huber_c", "train.learning_rate"):
        with pytest.raises(ConfigError, match=f"{key} must be a finite number, got inf"):
            load_method_config("lcd", None, [f"{key}=.inf"])
    for text, key in (("train:\n  max_steps: 3\n  max_steps: 5\n", "max_steps"),
                      ("train:\n  max_steps: 3\ntrain:\n  batch_size: 4\n", "train")):
        path.write_text(text)
        with pytest.raises(ConfigError, match=f"(?s)run.yaml is not valid YAML.*found the key '{key}' twice"):
            load_method_config("lcd", path)
    path.write_text("train:\n  <<: {max_steps: 3, batch_size: 4}\n  batch_size: 8\n")  # merge keys still work
    cfg = load_method_config("lcd", path)
    assert (cfg.train.max_steps, cfg.train.batch_size) == (3, 8)
    with pytest.raises(ConfigError, match=r"override .*not valid YAML.*found the key 'b' twice"):
        apply_overrides({}, ["a={b: 1, b: 2}"])
    path.write_bytes(b"train:\n  output_dir: caf\xe9\n")
    with pytest.raises(ConfigError, match="run.yaml is not valid YAML"):
        load_method_config("lcd", path)


@pytest.mark.parametrize("family, resolution", [("sd15", 512), ("sd21", 768), ("sdxl", 1024)])
def test_shipped_lcd_configs_parse(family, resolution):
    """The SD configs leave model.teacher and data.path open (REQUIRED in their comments)."""
    for name, lora in (("lcd.yaml", False), ("lcd_lora.yaml", True)):
        cfg = load_method_config("lcd", REPO / "configs" / family / name, ["model.teacher=/sd", "data.path=/shards"])
        assert cfg.data.resolution == resolution and cfg.model.lora is lora
        assert cfg.objective.loss_type == "huber" and cfg.train.resume_from_checkpoint == "latest"


def test_yaml_booleans_are_only_true_and_false(tmp_path):
    """`mixed_precision: no` (accelerate's spelling) is the string "no", not YAML 1.1's False."""
    cfg = load_method_config("lcd", None, ["train.mixed_precision=no", "train.progress=false"])
    assert cfg.train.mixed_precision == "no" and cfg.train.progress is False
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  mixed_precision: no\n  channels_last: none\n")
    cfg = load_method_config("lcd", path)
    assert cfg.train.mixed_precision == "no" and cfg.train.channels_last == "none"
    with pytest.raises(ConfigError, match="must be bool"):
        load_method_config("lcd", None, ["train.progress=off"])


@pytest.mark.parametrize("mode, expected", [("frozen", (True, False, True)), ("all", (True, True, True)),
                                            ("none", (False, False, False))])
def test_channels_last_modes_lay_out_teacher_student_and_target(tmp_path, mode, expected):
    from accelerate import Accelerator

    task = LCDTask(load_method_config("lcd", REPO / "configs/toy/lcd.yaml",
                                      tiny_overrides(tmp_path, 1, **{"train.channels_last": mode})))
    task.setup(Accelerator(cpu=True), channels_last=task.config.train.channels_last)
    nets = (task.ldm.unet, task.student, task.ema.model)  # teacher, student, EMA target
    assert tuple(n.conv_in.weight.is_contiguous(memory_format=torch.channels_last) for n in nets) == expected
    if mode == "frozen":  # exactly Module.to's strides, 1x1 kernels included (oneDNN's rounding depends on them)
        reference = copy.deepcopy(task.student).to(memory_format=torch.channels_last)
        strides = {n: p.stride() for n, p in reference.named_parameters() if p.dim() == 4}
        assert any(p.shape[-1] == 1 for n, p in reference.named_parameters() if n in strides)
        assert {n: p.stride() for n, p in task.ema.model.named_parameters() if n in strides} == strides
    with pytest.raises(ConfigError, match="channels_last must be one of frozen, all, none"):
        load_method_config("lcd", None, ["train.channels_last=yes"])


def test_cli_rejects_unknown_key(capsys):
    from lcm_lab.cli import main

    assert main(["train", "lcd", "--config", str(REPO / "configs/toy/lcd.yaml"), "train.max_stepz=1"]) == 2
    assert "max_steps" in capsys.readouterr().err
    assert main(["train", "lcd", "--config", str(REPO / "configs/toy/lcd.yaml"), "--print-config"]) == 0
    assert "w_embedding_dim: 256" in capsys.readouterr().out
    # --help-config lists the method's keys with the run's own defaults, whatever the file holds
    assert main(["train", "lcd", "--config", str(REPO / "configs/sd15/lcd.yaml"), "--help-config"]) == 0
    assert "train.output_dir = 'outputs/lcd'" in capsys.readouterr().out
    # an SD config without model.teacher would otherwise distill the 32 px toy teacher at 512 px
    assert main(["train", "lcd", "--config", str(REPO / "configs/sd15/lcd.yaml"), "--print-config",
                 "data.path=/data"]) == 2
    assert "model.teacher is null" in capsys.readouterr().err
    assert main(["train", "lcd", "--config", str(REPO / "configs/toy/lcd.yaml"), "--print-config",
                 "train.lr_scheduler=cosine_annealing"]) == 2
    assert "lr_scheduler must be one of linear, cosine" in capsys.readouterr().err


def test_cli_reports_a_missing_optional_package_in_one_line(tmp_path, capsys, monkeypatch):
    from lcm_lab.cli import main

    monkeypatch.setitem(sys.modules, "xformers", None)  # absent, whether or not this machine has it
    assert main(["train", "lcd", "--config", str(REPO / "configs/toy/lcd.yaml"), "train.attention=xformers",
                 *tiny_overrides(tmp_path, 1)]) == 2
    assert "attention=xformers needs the xformers package" in capsys.readouterr().err


def test_training_script_prints_user_errors_in_one_line():
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "train_lcd.py"), "--config",
                           str(REPO / "configs/toy/lcd.yaml"), "train.bogus=1"], capture_output=True, text=True,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: unknown config key 'train.bogus'")


def test_corrupt_images_are_skipped_and_counted(tmp_path, capsys):
    from lcm_lab.toy.world import ToyWorld

    folder = ToyWorld(0, "train").write_folder(tmp_path / "data", n=6)
    files = sorted(folder.glob("*.png"))
    files[1].write_bytes(b"not a png")
    files[4].unlink()
    task = run_lcd(tmp_path / "run", 2, **{"data.type": "folder", "data.path": str(folder),
                                           "data.cache_latents": False})
    drawn = [i for step in range(2) for i in StepBatchSampler(6, 4, 0, 0).batch(step)]
    expected = sum(i in (1, 4) for i in drawn)
    assert expected > 0  # the seed draws at least one bad file
    assert task.skipped == task.skipped_total == expected
    assert f"data: skipped images: {expected} (all processes)" in capsys.readouterr().out  # trackers or not
    # the count is checkpointed: a resumed run goes on counting from it
    more = run_lcd(tmp_path / "run", 3, **{"data.type": "folder", "data.path": str(folder),
                                          "data.cache_latents": False})
    assert more.skipped_total == expected + sum(i in (1, 4) for i in StepBatchSampler(6, 4, 0, 0).batch(2))


def test_over_long_captions_are_truncated_and_counted(tmp_path):
    from lcm_lab.toy.world import ToyWorld

    folder = ToyWorld(0, "train").write_folder(tmp_path / "data", n=6)
    meta = folder / "metadata.jsonl"
    rows = [json.loads(line) for line in meta.read_text().splitlines()]
    rows[2]["text"] = "a red circle " * 40  # 120 words, past the toy text encoder's context
    meta.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = run_lcd(tmp_path / "run", 2, **{"data.type": "folder", "data.path": str(folder),
                                           "data.cache_latents": False})
    drawn = [i for step in range(2) for i in StepBatchSampler(6, 4, 0, 0).batch(step)]
    assert drawn.count(2) > 0 and task.truncated == task.truncated_total == drawn.count(2)
    assert task.skipped_total == 0


def test_a_wholly_unreadable_batch_is_skipped_and_counted(tmp_path):
    from lcm_lab.toy.world import ToyWorld

    folder = ToyWorld(0, "train").write_folder(tmp_path / "data", n=4)
    files = sorted(folder.glob("*.png"))
    files[0].write_bytes(b"not a png")
    folder_opts = {"data.type": "folder", "data.path": str(folder), "data.cache_latents": False,
                   "train.batch_size": 1}
    drawn = [StepBatchSampler(4, 1, 0, 0).batch(step)[0] for step in range(8)]
    steps = drawn.index(0) + 2  # the run meets the bad file, then one more step
    task = run_lcd(tmp_path / "run", steps, **folder_opts)
    assert task.skipped == drawn[:steps + 1].count(0) >= 1
    assert (tmp_path / "run" / "final" / "pipeline").is_dir()
    for f in files[1:]:
        f.write_bytes(b"not a png either")
    with pytest.raises(ValueError, match="no readable image"):
        run_lcd(tmp_path / "bad", 2, **folder_opts)


def test_nan_loss_stops_with_clear_error_and_keeps_checkpoints(tmp_path, monkeypatch):
    cfg = load_method_config("lcd", REPO / "configs/toy/lcd.yaml", tiny_overrides(tmp_path, 4))
    task = LCDTask(cfg)
    real_loss = task.loss
    calls = {"n": 0}

    def loss(student, batch, gen):
        calls["n"] += 1
        value, logs = real_loss(student, batch, gen)
        return (value * float("nan"), logs) if calls["n"] == 3 else (value, logs)

    monkeypatch.setattr(task, "loss", loss)
    with pytest.raises(FloatingPointError, match=r"step 2; the last checkpoint, .*checkpoint-2, is intact"):
        train(cfg.train, task)
    ckpts = [p.name for p in (tmp_path / "checkpoints").iterdir()]
    assert ckpts == ["checkpoint-2"]
    # before the first checkpoint, the message does not promise one
    fresh = load_method_config("lcd", REPO / "configs/toy/lcd.yaml", tiny_overrides(tmp_path / "fresh", 4))
    task = LCDTask(fresh)
    real_loss = task.loss
    monkeypatch.setattr(task, "loss", lambda student, batch, gen: (real_loss(student, batch, gen)[0] * float("nan"), {}))
    with pytest.raises(FloatingPointError, match=r"step 0; no checkpoint was written to .*fresh.checkpoints yet"):
        train(fresh.train, task)
    assert json.loads((tmp_path / "checkpoints" / "checkpoint-2" / "lcm_lab_state.json").read_text())["step"] == 2


@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0])  # with clipping off too
def test_nan_gradients_of_a_finite_loss_stop_the_run_before_the_update(tmp_path, monkeypatch, max_grad_norm):
    cfg = load_method_config("lcd", REPO / "configs/toy/lcd.yaml",
                             tiny_overrides(tmp_path, 4, **{"train.max_grad_norm": max_grad_norm}))
    task = LCDTask(cfg)
    real_loss = task.loss

    def loss(student, batch, gen):
        value, logs = real_loss(student, batch, gen)
        w = next(p for p in student.parameters() if p.requires_grad)
        # the unselected branch is NaN: the loss stays finite, its gradient does not
        return value + torch.where(torch.tensor(True), torch.zeros(()), torch.sqrt(-1 - w.sum() ** 2)), logs

    monkeypatch.setattr(task, "loss", loss)
    with pytest.raises(FloatingPointError, match="non-finite gradient norm .* at step 0; nothing was updated"):
        train(cfg.train, task)
    assert all(torch.isfinite(p).all() for p in task.student.parameters())


def test_unsupported_or_mismatched_accelerators_are_refused_before_set_up(tmp_path):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    def accelerator(kind, accumulation=1, mixed_precision="no", **more):
        return SimpleNamespace(gradient_accumulation_steps=accumulation, distributed_type=kind,
                               mixed_precision=mixed_precision, **{"native_amp": mixed_precision != "no", **more})

    cfg = load_method_config("lcd", REPO / "configs/toy/lcd.yaml", tiny_overrides(tmp_path, 2))
    task = LCDTask(cfg)
    with pytest.raises(ValueError, match="DEEPSPEED is not supported"):
        train(cfg.train, task, accelerator(DistributedType.DEEPSPEED))
    with pytest.raises(ValueError, match="FSDP needs fsdp_version: 2"):
        train(cfg.train, task, accelerator(DistributedType.FSDP, is_fsdp2=False))
    with pytest.raises(ValueError, match="channels_last=all cannot be used with FSDP"):
        train(dataclasses.replace(cfg.train, channels_last="all"), task, accelerator(DistributedType.FSDP, is_fsdp2=True))
    from accelerate.utils import FullyShardedDataParallelPlugin

    for option, refused in (("cpu_offload", "fsdp_offload_params"),
                            ("activation_checkpointing", "fsdp_activation_checkpointing")):
        state = SimpleNamespace(fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2, **{option: True}))
        with pytest.raises(ValueError, match=f"{refused}: true is not supported"):
            train(cfg.train, task, accelerator(DistributedType.FSDP, is_fsdp2=True, state=state))
    with pytest.raises(ValueError, match="accumulates 4 micro-batches but train.gradient_accumulation_steps is 1"):
        train(cfg.train, task, accelerator(DistributedType.NO, accumulation=4))
    # float16 on CPU: accelerate runs no autocast (native_amp False, as Accelerator(cpu=True, mixed_precision="fp16")
    # sets it), so the float16 teacher would meet float32 inputs in the first step
    with pytest.raises(ValueError, match="train.mixed_precision=fp16 needs a GPU; on cpu use 'bf16' or 'no'"):
        train(cfg.train, task, accelerator(DistributedType.NO, mixed_precision="fp16", native_amp=False,
                                           device=torch.device("cpu")))
    assert task.objective is None  # refused before any set-up
    lora = load_method_config("lcd", REPO / "configs/toy/lcd_lora.yaml", tiny_overrides(tmp_path, 2))
    with pytest.raises(ValueError, match="FSDP is not supported for this run: model.lora=true"):
        train(lora.train, LCDTask(lora), accelerator(DistributedType.FSDP, is_fsdp2=True))


def test_fsdp_follows_ddp_and_resumes_exactly(tmp_path):
    """Two CPU ranks under FSDP2 (configs/accelerate/fsdp.yaml) against the same run under DDP: the sharded
    student and EMA target end where DDP's do (up to the order of float sums in the gradient reduction), the
    validation grid is the same, checkpoints hold sharded weights, and a resume from one reaches the same bits.
    Two micro-batches per step: accelerate's no-sync path of FSDP2 too."""
    from lcm_lab.models.sd import toy_teacher_dir

    run = ["train.validation_steps=3", "train.checkpointing_steps=2", "train.gradient_accumulation_steps=2"]
    _, _, info = run_two_cpu_ranks(tmp_path / "fsdp", "lcd", *run, fsdp=True)
    assert info["sharded"] and info["local_fraction"] == pytest.approx(0.5, abs=0.01)
    run_two_cpu_ranks(tmp_path / "ddp", "lcd", *run)
    fsdp, ddp = tmp_path / "fsdp" / "run", tmp_path / "ddp" / "run"
    assert (fsdp / "checkpoints/checkpoint-2/pytorch_model_fsdp_0").is_dir()  # the student as shards

    teacher = load_file(toy_teacher_dir() / "unet/diffusion_pytorch_model.safetensors")
    for unet in ("unet", "unet_target"):  # the EMA target and the online student
        a, b = exported_unet(fsdp, unet), exported_unet(ddp, unet)
        assert a.keys() == b.keys()
        configs = [json.loads((root / "final/pipeline" / unet / "config.json").read_text()) for root in (fsdp, ddp)]
        assert configs[0] == configs[1]
        gap = relative_gap(a, b, teacher)
        print(f"toy {unet}: |FSDP - DDP| / |DDP - teacher| = {gap:.2g}")  # benchmarks/RESULTS.md
        assert gap < 2e-3, unet
    grids = [np.asarray(Image.open(root / "validation/step-000003.png"), dtype=np.int16) for root in (fsdp, ddp)]
    print(f"toy grid: max {np.abs(grids[0] - grids[1]).max()}/255 apart")
    assert np.abs(grids[0] - grids[1]).max() <= 1
    ema = [load_file(root / "checkpoints/checkpoint-3/extra/target_ema.safetensors") for root in (fsdp, ddp)]
    assert max(float((ema[0][k] - ema[1][k]).abs().max()) for k in ema[1]) < 1e-3

    resumed = tmp_path / "resumed"
    shutil.copytree(fsdp / "checkpoints/checkpoint-2", resumed / "run/checkpoints/checkpoint-2")
    run_two_cpu_ranks(resumed, "lcd", *run, "train.resume_from_checkpoint=latest", fsdp=True)
    for unet in ("unet", "unet_target"):
        a, b = exported_unet(fsdp, unet), exported_unet(resumed / "run", unet)
        assert all(torch.equal(a[k], b[k]) for k in a), unet


@pytest.mark.parametrize("mixed_precision", ["bf16", "fp16"])
def test_fsdp_mixed_precision_reduces_gradients_in_float32(mixed_precision):
    """accelerate's FSDP2 policy for bf16/fp16 reduces gradients in the compute dtype; the trainer keeps its
    weights in the compute dtype but reduces (and accumulates) gradients in float32, as DDP does."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    from lcm_lab.training.trainer import _fsdp_float32_gradients

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[mixed_precision]
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    plugin.set_mixed_precision(mixed_precision)  # what accelerate does for GPU ranks
    assert plugin.mixed_precision_policy.reduce_dtype == dtype
    _fsdp_float32_gradients(plugin)
    policy = plugin.mixed_precision_policy
    assert (policy.param_dtype, policy.reduce_dtype, policy.output_dtype) == (dtype, torch.float32, dtype)


def test_a_nan_loss_on_one_rank_stops_both(tmp_path):
    """Every rank stops, with the error, at the step whose loss is non-finite on any of them (before, only that
    rank raised; the launcher then killed the other one wherever it was)."""
    proc = launch_two_cpu_ranks(tmp_path, "lcd", "train.checkpointing_steps=1", timeout=300,
                                env={"LCM_LAB_TEST_NAN_AT": "1:2"})
    assert proc.returncode != 0
    errors = [(tmp_path / f"rank{r}.error").read_text() for r in (0, 1)]
    assert errors[1].startswith("non-finite loss (nan) at step 1; the last checkpoint")
    assert errors[0].startswith("non-finite loss (on another process) at step 1")
    assert [p.name for p in (tmp_path / "run/checkpoints").iterdir()] == ["checkpoint-1"]


def test_blown_up_weights_are_not_checkpointed(tmp_path):
    overrides = tiny_overrides(tmp_path, 4, **{"train.checkpointing_steps": 1, "train.learning_rate": 1e38,
                                               "train.max_grad_norm": 0})
    cfg = load_method_config("lcd", REPO / "configs/toy/lcd.yaml", overrides)
    with pytest.raises(FloatingPointError, match="non-finite student weights after step 1: not saved"):
        train(cfg.train, LCDTask(cfg))
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def test_two_cpu_ranks_keep_identical_parameters(tmp_path):
    r0, r1, info = run_two_cpu_ranks(tmp_path, "lcd")
    assert r0.keys() == r1.keys() and len(r0) > 0
    assert all(torch.equal(r0[k], r1[k]) for k in r0), "ranks diverged"
    assert info["world_size"] == 2
    assert info["batches_differ"] and info["losses_differ"], "both ranks trained on the same data"
    assert info["changed"] == {"student": True}, "training did not change the weights"
