"""`lcm-lab demo`: the main job on the embedded toy world.

For now it samples the toy teacher at 50 and at 4 DDIM steps on the same held-out
prompts and seeds and writes both grids plus a side-by-side comparison, so the gap that
consistency distillation has to close is visible.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .eval.evaluate import atomic_write_text, format_table
from .eval.toy import eval_prompts
from .generation import timed_generate
from .imaging import save_grid
from .models.sd import load_ldm
from .toy import TEACHER_GUIDANCE


def run_demo(out_dir: Path, num_prompts: int = 8, seed: int = 0, guidance: float = TEACHER_GUIDANCE) -> dict:
    """Write teacher grids (DDIM-50, DDIM-4), ``report.json`` and ``report.md`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model = load_ldm()
    prompts, _ = eval_prompts(num_prompts)
    seeds = [seed + i for i in range(num_prompts)]
    rows, grids = [], []
    for steps in (50, 4):
        images, spi = timed_generate(model, prompts, seeds, sampler="ddim", steps=steps,
                                     guidance_scale=guidance, progress=False)
        path = save_grid(images, out_dir / f"teacher_ddim{steps}.png", nrow=num_prompts, scale=4)
        grids.append(images)
        rows.append({"model": "teacher", "sampler": "ddim", "steps": steps, "guidance": guidance,
                     "sec_per_image": spi, "grid": str(path)})
        print(f"teacher DDIM-{steps}: {spi * 1000:.1f} ms/image -> {path}")
    comparison = save_grid(torch.cat(grids), out_dir / "comparison.png", nrow=num_prompts, scale=4)
    report = {"prompts": prompts, "seeds": seeds, "rows": rows, "comparison": str(comparison),
              "comparison_layout": "row 1: teacher DDIM-50, row 2: teacher DDIM-4 (same prompts and seeds)"}
    atomic_write_text(out_dir / "report.json", json.dumps(report, indent=2))
    table = format_table(rows, ["model", "sampler", "steps", "guidance", "sec_per_image", "grid"])
    atomic_write_text(out_dir / "report.md",
                      f"# lcm-lab demo\n\n{table}\nComparison: {report['comparison_layout']}\n")
    print(f"comparison grid (top: DDIM-50, bottom: DDIM-4) -> {comparison}")
    for i, p in enumerate(prompts):
        print(f"  column {i + 1}: {p}")
    return report
