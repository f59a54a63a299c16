"""Overrides that shrink the toy recipes to a few seconds of training (shared by the training tests)."""

from pathlib import Path

TINY = {
    "train.max_steps": 2, "train.batch_size": 4, "train.learning_rate": 1e-3, "train.lr_warmup_steps": 0,
    "train.checkpointing_steps": 2, "train.report_to": "none", "train.validation_steps": 0,
    "train.progress": False, "data.num_images": 16, "data.cache_latents": True,
}


def tiny_overrides(out: Path, steps: int, **extra) -> list[str]:
    """``key=value`` overrides for a ``steps``-step run writing to ``out``; ``extra`` wins."""
    values = {**TINY, "train.output_dir": str(out), "train.max_steps": steps, **extra}
    return [f"{k}={v}" for k, v in values.items()]
