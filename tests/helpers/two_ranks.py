"""Launch tests/helpers/ddp_lcd.py on two CPU ranks and read back what each rank wrote."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it), for the rendezvous of one launch."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_cpu_ranks(out: Path, config: str, *overrides: str, fsdp: bool = False, timeout: float = 600,
                         env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run tests/helpers/ddp_lcd.py on two gloo ranks (``config``: "lcd", "rg_lcd" (LRM mode) or "rg_lcd_direct",
    a toy config; ``overrides``: ``key=value``; ``env``: extra variables).

    ``accelerate launch --cpu --num_processes 2`` silently runs one process, hence ``--multi_gpu`` with
    ``ACCELERATE_USE_CPU``; ``fsdp`` launches with configs/accelerate/fsdp.yaml instead.
    """
    variables = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO),
                 "ACCELERATE_USE_CPU": "1", **(env or {})}
    layout = (["--config_file", str(REPO / "configs" / "accelerate" / "fsdp.yaml")] if fsdp
              else ["--multi_gpu", "--num_machines", "1"])
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *layout, "--num_processes", "2",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           str(REPO / "tests" / "helpers" / "ddp_lcd.py"), str(out), config, *overrides]
    return subprocess.run(cmd, env=variables, capture_output=True, text=True, timeout=timeout)


def run_two_cpu_ranks(out: Path, config: str, *overrides: str,
                      fsdp: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """Train ``config`` for a few steps on two gloo ranks (:func:`launch_two_cpu_ranks`);
    returns rank 0's and rank 1's parameters (their shards with ``fsdp``) and rank 0's ``ranks.json``, with
    ``batches_differ`` / ``losses_differ``: whether the first micro-batches the two ranks trained on had
    different captions / losses. The run's folder is ``out / "run"``.
    """
    proc = launch_two_cpu_ranks(out, config, *overrides, fsdp=fsdp)  # two processes on a busy 2-core machine
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((out / "ranks.json").read_text())
    first = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    info.update(batches_differ=first[0]["texts"] != first[1]["texts"],
                losses_differ=first[0]["loss"] != first[1]["loss"])
    return load_file(out / "rank0.safetensors"), load_file(out / "rank1.safetensors"), info


def exported_unet(run: Path, unet: str) -> dict[str, torch.Tensor]:
    """The weights of ``final/pipeline/<unet>`` of the training run in folder ``run``."""
    return load_file(run / "final" / "pipeline" / unet / "diffusion_pytorch_model.safetensors")


def relative_gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], start: dict[str, torch.Tensor],
                 keys=None) -> float:
    """``|a - b| / |b - start|`` over ``keys`` (default: all of ``b``): how far two runs ended apart, as a share of
    how far ``b`` moved from where it started (the denominator over the keys ``start`` has)."""
    keys = list(b) if keys is None else list(keys)
    gap = torch.cat([(a[k] - b[k]).flatten() for k in keys]).norm()
    moved = torch.cat([(b[k] - start[k]).flatten() for k in keys if k in start]).norm()
    assert moved > 0, "the run did not move"
    return float(gap / moved)
