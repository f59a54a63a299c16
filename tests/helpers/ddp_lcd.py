"""Run by tests/test_training_lcd.py / test_rg_lcd.py under accelerate with two CPU ranks (gloo).

    ddp_lcd.py OUT [lcd|rg_lcd|rg_lcd_direct] [section.key=value ...]

The second argument names the config, configs/toy/<it>.yaml (``rg_lcd``: LRM mode, ``rg_lcd_direct``: direct mode).

Launched with configs/accelerate/fsdp.yaml (``ACCELERATE_USE_FSDP=true``), the ranks train under FSDP2: accelerate
selects FSDP for GPU ranks only and silently runs CPU ranks as DDP, so this script hands them the FSDP plugin the
launcher configured (from its ``FSDP_*`` variables), as accelerate does on GPUs.

Writes each rank's student (and, in LRM mode, latent reward model) parameters to OUT/rank<r>.safetensors, the
captions and loss of the first micro-batch that rank trained on to OUT/rank<r>.json, and, from rank 0,
OUT/ranks.json (world size, whether training changed the weights). A rank stopped by a non-finite loss writes
its error to OUT/rank<r>.error (``LCM_LAB_TEST_NAN_AT=RANK:CALL`` makes that rank's loss NaN from its CALL-th
loss on).
"""

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from lcm_lab.training import load_method_config
from lcm_lab.training.lcd import LCDTask
from lcm_lab.training.rg_lcd import RGLCDTask
from lcm_lab.training.sharding import is_sharded, local, reshard
from lcm_lab.training.trainer import train

REPO = Path(__file__).resolve().parents[2]

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
config = sys.argv[2] if len(sys.argv) > 2 else "lcd"
method = "rg_lcd" if config.startswith("rg_lcd") else "lcd"
overrides = [f"train.output_dir={out / 'run'}", "train.max_steps=3", "train.batch_size=4", "train.learning_rate=1e-3",
             "train.lr_warmup_steps=0", "train.report_to=none", "train.validation_steps=0", "train.progress=false",
             "data.num_images=16", "data.cache_latents=true"]
if config == "rg_lcd":  # LRM mode, trained online only (no pre-training), on 3 samples per rank and step
    overrides += ["reward.lrm_lr=1e-3", "reward.lrm_subset=3", "reward.lrm_pretrain_steps=0"]
cfg = load_method_config(method, REPO / f"configs/toy/{config}.yaml", overrides + sys.argv[3:])
accelerator = None
if os.environ.get("ACCELERATE_USE_FSDP") == "true":
    from accelerate import Accelerator
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    accelerator = Accelerator(gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
                              mixed_precision=cfg.train.mixed_precision)
    assert accelerator.distributed_type == DistributedType.MULTI_CPU, accelerator.distributed_type
    # Both states: AcceleratorState copies PartialState's fields whenever it is built again.
    PartialState().distributed_type = accelerator.state.distributed_type = DistributedType.FSDP
    plugin = FullyShardedDataParallelPlugin()
    if cfg.train.mixed_precision != "no":
        plugin.set_mixed_precision(cfg.train.mixed_precision)  # as accelerate does for GPU ranks
    accelerator.state.fsdp_plugin = plugin
task = (RGLCDTask if method == "rg_lcd" else LCDTask)(cfg)
nets = {"student": task.student, **({"lrm": task.lrm} if method == "rg_lcd" and task.lrm is not None else {})}


def parameters(net: str) -> dict[str, torch.Tensor]:
    """This rank's parameters: its shards under FSDP (whose weights the tests read from the export)."""
    reshard(nets[net])
    return {f"{net}.{n}": local(p.detach()).cpu().contiguous() for n, p in nets[net].named_parameters()}


before = {net: parameters(net) for net in nets}
if "lrm" in nets and os.environ.get("RANK", "0") == "0":  # the replicated proxy's initial weights
    save_file(before["lrm"], out / "lrm_initial.safetensors")
first = {}
task_loss = task.loss


# "RANK:CALL": that rank's loss is NaN from its CALL-th loss on
nan_rank, nan_call = map(int, os.environ.get("LCM_LAB_TEST_NAN_AT", "-1:0").split(":"))
calls = 0


def recording_loss(student, batch, generator):  # what this rank actually trains on
    global calls
    loss, logs = task_loss(student, batch, generator)
    calls += 1
    if task.accelerator.process_index == nan_rank and calls >= nan_call:
        loss = loss * float("nan")
    if not first:
        first.update(texts=list(batch[2] if isinstance(batch, tuple) else batch["text"]), loss=float(loss))
    return loss, logs


task.loss = recording_loss
try:
    train(cfg.train, task, accelerator)
except FloatingPointError as e:  # kept in a file: the launcher may kill this rank before stderr is read
    (out / f"rank{task.accelerator.process_index}.error").write_text(str(e))
    raise
rank = task.accelerator.process_index
after = {net: parameters(net) for net in nets}
save_file({k: v for params in after.values() for k, v in params.items()}, out / f"rank{rank}.safetensors")
(out / f"rank{rank}.json").write_text(json.dumps(first))
if rank == 0:
    info = {"world_size": task.accelerator.num_processes,
            "changed": {net: any(not torch.equal(before[net][k], v) for k, v in after[net].items()) for net in nets},
            "sharded": is_sharded(task.student),  # then "changed" compares shards with whole tensors: ignore it
            # the share of the student's weights this rank holds
            "local_fraction": sum(local(p).numel() for p in task.student.parameters())
            / sum(p.numel() for p in task.student.parameters())}
    (out / "ranks.json").write_text(json.dumps(info))
