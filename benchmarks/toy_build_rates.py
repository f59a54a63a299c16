"""Per-stage speed of the toy-asset build, and the full build's projected time on this machine.

    python benchmarks/toy_build_rates.py --out outputs/toy_build_rates.json

Runs every stage of :mod:`lcm_lab.toy.build` on a small world (600 training images) in a temporary folder,
with the default batch sizes and a few hundred optimiser steps in all, and times it. Each training stage's
seconds per step (the median interval between two optimiser updates: data, forward, backward and update, not
the stage's set-up or saving) times its default step count, plus the per-image rates of rendering and VAE
encoding/decoding times the default image counts, gives the projected minutes of a full
``python scripts/build_toy_assets.py`` alone on this machine. Two to three minutes; the build's outputs are
deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from lcm_lab.files import atomic_write_text  # noqa: E402
from lcm_lab.toy import build  # noqa: E402
from lcm_lab.toy.models import CONTEXT_LENGTH  # noqa: E402
from lcm_lab.toy.tokenizer import write_clip_tokenizer  # noqa: E402

PROBE_STEPS = {"vae": 150, "judge": 100, "reward": 30, "teacher": 250}
PROBE_IMAGES, PROBE_RECON = 600, 200


def measure(steps: dict[str, int] = PROBE_STEPS) -> dict:
    """Seconds per step (training stages) or per image (render, encode) and the projected full build."""
    full = build.BuildConfig()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = build.BuildConfig(out_dir=f"{tmp}/out", work_dir=f"{tmp}/work", num_train_images=PROBE_IMAGES,
                                num_recon_images=PROBE_RECON, checkpoint_every=10**9,
                                **{f"{k}_steps": v for k, v in steps.items()})
        Path(cfg.out_dir).mkdir(parents=True)
        Path(cfg.work_dir).mkdir(parents=True)
        tokenizer_dir = Path(cfg.work_dir) / "tokenizer"
        write_clip_tokenizer(tokenizer_dir, model_max_length=CONTEXT_LENGTH)

        def timed(fn, *args):
            t0 = time.perf_counter()
            result = fn(*args)
            return result, time.perf_counter() - t0

        updates: dict[str, list[float]] = {}
        update = build._Trainer.update

        def recording_update(trainer, loss):
            update(trainer, loss)
            updates.setdefault(trainer.stage, []).append(time.perf_counter())

        build._Trainer.update = recording_update
        try:
            data, render_s = timed(build.build_data, cfg)
            vae_dir, _ = timed(build.train_vae, cfg, data)
            latents, encode_s = timed(build.encode_latents, cfg, data, vae_dir)
            build.train_judge(cfg, data, latents)
            build.train_reward(cfg, data, latents, tokenizer_dir)
            build.train_teacher(cfg, data, latents, vae_dir, tokenizer_dir)
        finally:
            build._Trainer.update = update

    per_step = {stage: statistics.median(b - a for a, b in zip(t, t[1:])) for stage, t in updates.items()}
    # encode_latents encodes every image and decodes the first num_recon_images: scale both counts
    encode_per_image = encode_s / (PROBE_IMAGES + PROBE_RECON)
    projected = {
        "data": render_s / PROBE_IMAGES * full.num_train_images,
        "vae": per_step["vae"] * full.vae_steps,
        "latents": encode_per_image * (full.num_train_images + full.num_recon_images),
        "judge": per_step["judge"] * full.judge_steps,
        "reward": per_step["reward"] * full.reward_steps,
        "teacher": per_step["teacher"] * full.teacher_steps,
    }
    return {
        "probe_steps": steps,
        "seconds_per_step": {k: round(v, 4) for k, v in per_step.items()},
        "projected_minutes": {k: round(v / 60, 1) for k, v in projected.items()},
        "projected_total_minutes": round(sum(projected.values()) / 60, 1),
        "full_build": asdict(full),
        "torch_threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    args = parser.parse_args()
    result = measure()
    print("| stage | s/step | projected minutes (default build) |")
    print("|---|---|---|")
    for stage, minutes in result["projected_minutes"].items():
        print(f"| {stage} | {result['seconds_per_step'].get(stage, '-')} | {minutes} |")
    print(f"| total | | {result['projected_total_minutes']} |")
    if args.out is not None:
        atomic_write_text(args.out, json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
