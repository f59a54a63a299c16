"""RG-LCD on the toy world: teacher DDIM-50 vs LCD vs RG-LCD (direct and LRM) at 2 and 4 steps.

    python benchmarks/rg_lcd_toy.py --lcd outputs/demo/train --out outputs/bench_rg_lcd

Each distilled model comes from a training output folder (``<dir>/final/pipeline``); a folder that
does not exist yet is trained first with its config (same budget as the LCD demo: 1000 steps,
batch 64, configs/toy/*.yaml), so the command is resumable. Every setting is evaluated on the same
1000 held-out prompts and seeds: toy-clip score (the expert), judge FD and prompt accuracy.
Writes results.json and results.md (table + the issue's checks).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
RUNS = {  # name -> (method, config)
    "lcd": ("lcd", "configs/toy/lcd.yaml"),
    "rg-lcd-direct": ("rg_lcd", "configs/toy/rg_lcd_direct.yaml"),
    "rg-lcd-lrm": ("rg_lcd", "configs/toy/rg_lcd.yaml"),
}
COLUMNS = ["model", "sampler", "steps", "num_samples", "clip", "fd", "fd_floor", "accuracy", "sec_per_image"]


def trained(name: str, out_dir: Path) -> Path:
    """``out_dir/final/pipeline``, training the run first when it is missing."""
    pipe = out_dir / "final" / "pipeline"
    if not pipe.is_dir():
        from lcm_lab.training import run

        method, config = RUNS[name]
        run(method, REPO / config, [f"train.output_dir={out_dir}"])
    return pipe


def checks(rows: dict[str, dict]) -> list[dict]:
    t50, lcd2, lrm2 = rows["teacher-ddim-50"], rows["lcd-2"], rows["rg-lcd-lrm-2"]
    fd_bound = max(1.2 * lcd2["fd"], lcd2["fd"] + lcd2["fd_floor"])
    return [
        {"check": "RG-LCD (LRM) 2-step toy-clip > teacher DDIM-50 toy-clip", "value": lrm2["clip"],
         "bound": t50["clip"], "pass": lrm2["clip"] > t50["clip"]},
        {"check": "RG-LCD (LRM) 2-step FD <= max(1.2 x LCD 2-step FD, LCD 2-step FD + FD floor)",
         "value": lrm2["fd"], "bound": fd_bound, "pass": lrm2["fd"] <= fd_bound},
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lcd", default="outputs/toy-lcd", help="LCD training output folder")
    parser.add_argument("--rg-direct", default="outputs/toy-rg-lcd-direct", help="RG-LCD direct output folder")
    parser.add_argument("--rg-lrm", default="outputs/toy-rg-lcd", help="RG-LCD LRM output folder")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--out", default="outputs/bench_rg_lcd")
    args = parser.parse_args()

    from lcm_lab.eval.evaluate import MetricSuite, evaluate, format_table
    from lcm_lab.files import atomic_write_text
    from lcm_lab.models.sd import load_ldm

    models = {name: load_ldm(trained(name, Path(folder)))
              for name, folder in (("lcd", args.lcd), ("rg-lcd-direct", args.rg_direct), ("rg-lcd-lrm", args.rg_lrm))}
    suite = MetricSuite(None, toy=True, reference_num=max(1000, args.num_samples))
    settings = [("teacher-ddim-50", load_ldm(), "ddim", 50)]
    settings += [(f"{name}-{steps}", model, "lcm", steps) for name, model in models.items() for steps in (2, 4)]
    rows = {}
    for key, model, sampler, steps in settings:
        rows[key] = evaluate(model, sampler=sampler, steps=steps, num_samples=args.num_samples,
                             guidance=args.guidance, suite=suite, batch_size=250, name=key.rsplit("-", 1)[0])
        print(f"{key}: toy-clip {rows[key]['clip']:.2f}, FD {rows[key]['fd']:.1f}, accuracy {rows[key]['accuracy']:.3f}")
    result = {"rows": list(rows.values()), "checks": checks(rows), "guidance": args.guidance,
              "runs": {"lcd": args.lcd, "rg-lcd-direct": args.rg_direct, "rg-lcd-lrm": args.rg_lrm}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(result, indent=2) + "\n")
    table = format_table(list(rows.values()), COLUMNS)
    lines = "\n".join(f"- [{'x' if c['pass'] else ' '}] {c['check']}: {c['value']:.2f} vs {c['bound']:.2f}"
                      for c in result["checks"])
    atomic_write_text(out / "results.md", f"# RG-LCD on the toy world\n\n{table}\n{lines}\n")
    print(table)
    print(lines)


if __name__ == "__main__":
    main()
