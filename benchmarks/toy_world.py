"""Quality figures of the embedded toy world (judge, VAE, FD floors, teacher).

    python benchmarks/toy_world.py --num 1000 --out outputs/bench_toy

Writes results.json and results.md into --out and prints the table. Every number comes
from held-out images of the evaluation stream with fixed seeds (image i uses seed i).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from lcm_lab.toy import TEACHER_GUIDANCE  # noqa: E402
from lcm_lab.eval.toy import (  # noqa: E402
    eval_prompts, load_judge, prompt_accuracy, psnr, real_images, toy_metrics, toy_reference,
    vae_reconstruct,
)
from lcm_lab.files import atomic_write_text  # noqa: E402
from lcm_lab.generation import timed_generate  # noqa: E402
from lcm_lab.imaging import save_grid  # noqa: E402
from lcm_lab.models.sd import load_ldm  # noqa: E402
from lcm_lab.toy.world import ATTRIBUTE_NAMES  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num", type=int, default=1000, help="samples per set (>= 1000 for reported figures)")
    parser.add_argument("--guidance", type=float, default=TEACHER_GUIDANCE)
    parser.add_argument("--steps", default="50,4", help="teacher DDIM step counts")
    parser.add_argument("--compose", action="store_true", help="also report held-out compositions")
    parser.add_argument("--out", default="outputs/bench_toy")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    n = args.num

    ldm = load_ldm()
    judge = load_judge()
    results: dict = {"num": n, "guidance": args.guidance, "machine": f"{platform.processor() or platform.machine()}, "
                     f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads"}

    real, attrs = real_images(n, 0)
    results["judge_accuracy_real"] = prompt_accuracy(judge, real, attrs)
    recon = vae_reconstruct(ldm.vae, real)
    results["vae_psnr_db"] = psnr(recon, real)
    results["judge_accuracy_recon"] = prompt_accuracy(judge, recon, attrs)
    reference = toy_reference(judge, ldm.vae, n)
    results["floors"] = reference.floors

    # Generated sets use prompts from a part of the eval stream disjoint from the references.
    prompts, prompt_attrs = eval_prompts(n)
    seeds = list(range(n))
    rows = []
    for steps in [int(s) for s in args.steps.split(",")]:
        images, spi = timed_generate(ldm, prompts, seeds, sampler="ddim", steps=steps,
                                     guidance_scale=args.guidance, batch_size=250)
        row = {"model": "teacher", "sampler": "ddim", "steps": steps, "guidance": args.guidance,
               "num_samples": n, **toy_metrics(judge, reference, images, prompt_attrs), "sec_per_image": spi}
        rows.append(row)
        save_grid(images[:64], out / f"teacher_ddim{steps}.png", nrow=8, scale=4)
        print(json.dumps(row))
    if args.compose:
        c_prompts, c_attrs = eval_prompts(n, split="compose")
        images, spi = timed_generate(ldm, c_prompts, seeds, sampler="ddim", steps=50, guidance_scale=args.guidance,
                                     batch_size=250)
        results["compose_ddim50"] = prompt_accuracy(judge, images, c_attrs)
    results["rows"] = rows
    atomic_write_text(out / "results.json", json.dumps(results, indent=2))

    lines = [f"Toy world, {n} held-out samples per set, fixed seeds ({results['machine']}).", "",
             "| attribute | judge acc. (real) | judge acc. (VAE recon) |", "|---|---|---|"]
    for k in ATTRIBUTE_NAMES:
        lines.append(f"| {k} | {results['judge_accuracy_real']['acc_' + k]:.4f} | "
                     f"{results['judge_accuracy_recon']['acc_' + k]:.4f} |")
    fl = results["floors"]
    lines += ["", f"VAE reconstruction PSNR: {results['vae_psnr_db']:.2f} dB", "",
              "| FD floor | value |", "|---|---|",
              f"| recon vs recon (floor of FD) | {fl['fd_floor']:.3f} |",
              f"| real vs real (floor of FD-real) | {fl['fd_real_floor']:.3f} |",
              f"| VAE recon vs real (VAE error) | {fl['fd_vae']:.3f} |", "",
              "| model | sampler | steps | guidance | FD | FD-real | prompt acc. | s/image |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['sampler']} | {r['steps']} | {r['guidance']} | {r['fd']:.3f} | "
                     f"{r['fd_real']:.3f} | {r['accuracy']:.3f} | {r['sec_per_image']:.4f} |")
    if "compose_ddim50" in results:
        lines += ["", f"Held-out compositions, teacher DDIM-50: prompt accuracy {results['compose_ddim50']['accuracy']:.3f}"]
    atomic_write_text(out / "results.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - t0:.0f} s")
