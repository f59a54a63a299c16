"""Run by tests/test_training_lcd.py under torchrun with two CPU ranks (gloo)."""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from lcm_lab.training import load_method_config
from lcm_lab.training.data import StepBatchSampler
from lcm_lab.training.lcd import LCDTask
from lcm_lab.training.trainer import train

REPO = Path(__file__).resolve().parents[2]

out = Path(sys.argv[1])
overrides = [f"train.output_dir={out / 'run'}", "train.max_steps=3", "train.batch_size=4", "train.learning_rate=1e-3",
             "train.lr_warmup_steps=0", "train.report_to=none", "train.validation_steps=0", "train.progress=false",
             "data.num_images=16", "data.cache_latents=true"]
cfg = load_method_config("lcd", REPO / "configs/toy/lcd.yaml", overrides)
task = LCDTask(cfg)
before = {n: p.detach().clone() for n, p in task.student.named_parameters()}
train(cfg.train, task)
rank = task.accelerator.process_index
params = {n: p.detach().cpu().contiguous() for n, p in task.student.named_parameters()}
save_file(params, out / f"rank{rank}.safetensors")
if rank == 0:
    info = {"world_size": task.accelerator.num_processes,
            "batches_differ": StepBatchSampler(16, 4, 0, 0).batch(0) != StepBatchSampler(16, 4, 0, 1).batch(0),
            "changed": any(not torch.equal(before[n], params[n]) for n in params)}
    (out / "ranks.json").write_text(json.dumps(info))
