"""`lcm-lab demo`: the main job on the embedded toy world, end to end.

1. Distill the toy teacher into a 1-4 step latent consistency model with LCD
   (``configs/toy/lcd.yaml``; resumes from ``DIR/train/checkpoints`` when re-run).
2. Evaluate teacher DDIM-50, teacher DDIM-4 and the LCM at 1, 2 and 4 steps on the same held-out
   prompts and seeds: Fréchet distance on the judge's features (with its floor), toy-clip score,
   prompt accuracy, seconds per image.
3. Write ``report.json``, ``report.md``, ``comparison.png`` and the distilled model (a stock
   ``LatentConsistencyModelPipeline`` folder, ``DIR/model``) and print the table.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from .eval.evaluate import format_table
from .files import atomic_write_text, write_folder_atomically
from .toy import TEACHER_GUIDANCE

__all__ = ["run_demo", "demo_checks", "toy_config_path"]

COLUMNS = ["model", "sampler", "steps", "guidance", "num_samples", "fd", "fd_floor", "clip", "accuracy",
           "sec_per_image"]


def toy_config_path() -> Path:
    """``configs/toy/lcd.yaml`` of this checkout (the one source of the demo's recipe)."""
    path = Path(__file__).resolve().parents[1] / "configs" / "toy" / "lcd.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the demo reads the toy LCD recipe from the repository's "
                                "configs/ folder; run it from a checkout (pip install -e .)")
    return path


def demo_checks(rows: dict[str, dict]) -> list[dict]:
    """The demo's acceptance checks: how close the LCM gets to the teacher's 50-step quality."""
    t50, t4, l2, l4 = rows["teacher-ddim-50"], rows["teacher-ddim-4"], rows["lcm-2"], rows["lcm-4"]
    checks = [
        ("LCM-4 FD <= 1.5 x teacher DDIM-50 FD", l4["fd"], 1.5 * t50["fd"], l4["fd"] <= 1.5 * t50["fd"]),
        ("LCM-2 FD <= 2 x teacher DDIM-50 FD", l2["fd"], 2 * t50["fd"], l2["fd"] <= 2 * t50["fd"]),
        ("LCM-4 accuracy >= teacher DDIM-50 accuracy - 0.05", l4["accuracy"], t50["accuracy"] - 0.05,
         l4["accuracy"] >= t50["accuracy"] - 0.05),
        ("LCM-2 accuracy >= teacher DDIM-50 accuracy - 0.05", l2["accuracy"], t50["accuracy"] - 0.05,
         l2["accuracy"] >= t50["accuracy"] - 0.05),
        ("LCM-4 FD <= 0.5 x teacher DDIM-4 FD", l4["fd"], 0.5 * t4["fd"], l4["fd"] <= 0.5 * t4["fd"]),
    ]
    return [{"check": c, "value": float(v), "bound": float(b), "pass": bool(p)} for c, v, b, p in checks]


def _copy_model(src: Path, dst: Path) -> Path:
    """Copy the exported pipeline folder into place atomically."""

    return write_folder_atomically(dst, lambda tmp: shutil.copytree(src, tmp, dirs_exist_ok=True))


def run_demo(out_dir: Path, num_samples: int = 1000, overrides: Sequence[str] = (), num_prompts: int = 8,
             guidance: float = TEACHER_GUIDANCE, reference_num: int = 1000, progress: bool = True) -> dict:
    """Distill, evaluate and report (see the module docstring). Returns the report dict.

    Args:
        out_dir: where everything is written.
        num_samples: images per evaluated setting (fixed held-out prompts and seeds).
        overrides: ``section.key=value`` changes to the toy LCD recipe (e.g. ``train.max_steps=200``).
        num_prompts: columns of the comparison grid.
        guidance: diffusers-convention guidance for the teacher and the (w-conditioned) LCM alike.
        reference_num: real images in the FD reference (at least ``num_samples``).
        progress: progress bars.
    """
    if num_samples < 2 or num_prompts < 1:  # before the distillation, not after it
        raise ValueError(f"num_samples must be >= 2 (FD needs a covariance) and num_prompts >= 1, got "
                         f"{num_samples} and {num_prompts}")
    from .eval.evaluate import MetricSuite, evaluate
    from .eval.toy import eval_prompts
    from .generation import generate
    from .imaging import save_grid
    from .models.sd import load_ldm
    from .training.config import load_config
    from .training.lcd import LCDRunConfig, train_lcd

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = load_config(LCDRunConfig, toy_config_path(),
                      [f"train.output_dir={out_dir / 'train'}", f"train.progress={progress}", *overrides])
    t0 = time.perf_counter()
    train_dir = train_lcd(cfg)
    train_seconds = time.perf_counter() - t0
    model_dir = _copy_model(train_dir / "final" / "pipeline", out_dir / "model")
    print(f"distilled in {train_seconds / 60:.1f} min -> {model_dir}")

    teacher, student = load_ldm(), load_ldm(model_dir)
    suite = MetricSuite(None, toy=True, reference_num=max(num_samples, reference_num))
    settings = [("teacher-ddim-50", teacher, "ddim", 50), ("teacher-ddim-4", teacher, "ddim", 4),
                ("lcm-1", student, "lcm", 1), ("lcm-2", student, "lcm", 2), ("lcm-4", student, "lcm", 4)]
    rows = {}
    for name, model, sampler, steps in settings:
        row = evaluate(model, sampler=sampler, steps=steps, num_samples=num_samples, guidance=guidance,
                       suite=suite, batch_size=250, progress=progress, name=name.rsplit("-", 1)[0])
        rows[name] = row
        print(f"{name}: FD {row['fd']:.1f}, accuracy {row['accuracy']:.3f}, {row['sec_per_image'] * 1e3:.1f} ms/image")

    prompts, _ = eval_prompts(num_prompts)
    seeds = list(range(num_prompts))
    grid = torch.cat([generate(model, prompts, seeds, sampler=sampler, steps=steps, guidance_scale=guidance,
                               progress=False) for _, model, sampler, steps in settings])
    comparison = save_grid(grid, out_dir / "comparison.png", nrow=num_prompts, scale=4)

    checks = demo_checks(rows)
    report = {
        "rows": list(rows.values()), "checks": checks, "train_seconds": train_seconds,
        "config": str(toy_config_path()), "overrides": list(overrides), "model_dir": str(model_dir),
        "comparison": str(comparison),
        "comparison_layout": "rows: teacher DDIM-50, teacher DDIM-4, LCM-1, LCM-2, LCM-4; columns: prompts below",
        "prompts": prompts, "seeds": seeds, "torch_threads": torch.get_num_threads(),
    }
    atomic_write_text(out_dir / "report.json", json.dumps(report, indent=2) + "\n")
    table = format_table(list(rows.values()), COLUMNS)
    check_lines = "\n".join(f"- [{'x' if c['pass'] else ' '}] {c['check']}: {c['value']:.3f} vs {c['bound']:.3f}"
                            for c in checks)
    atomic_write_text(out_dir / "report.md", (
        f"# lcm-lab demo: LCD on the toy world\n\n"
        f"Distillation: {train_seconds / 60:.1f} min ({cfg.train.max_steps} steps, batch {cfg.train.batch_size}, "
        f"{torch.get_num_threads()} threads). Model: `{model_dir}`.\n\n{table}\n"
        "FD: judge-feature Fréchet distance to VAE reconstructions of held-out images (fd_floor: the same "
        "between two sets of reconstructions); clip: toy-clip score; accuracy: share of prompts with every "
        "attribute right (judge).\n\n"
        f"## Checks\n\n{check_lines}\n\n"
        f"Comparison grid `{comparison.name}`: {report['comparison_layout']}.\n"))
    print()
    print(table)
    print(check_lines)
    print(f"report -> {out_dir / 'report.md'}; comparison grid -> {comparison}; model -> {model_dir}")
    return report
