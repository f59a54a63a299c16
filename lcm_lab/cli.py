"""The ``lcm-lab`` command line.

    lcm-lab sample --prompt TEXT [--model DIR] [--sampler ddim|lcm|tcd] [--steps N]
                   [--guidance W] [--seed S] [--image PNG --strength F] [--out PNG]
    lcm-lab demo --out DIR
    lcm-lab eval --model DIR --sampler ddim --steps 4,50 --out DIR
    lcm-lab bench quality|speed ...
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub: every model is a local folder

from .eval.commands import add_bench_parser, add_eval_parser  # noqa: E402

from .toy import TEACHER_GUIDANCE as TOY_GUIDANCE  # noqa: E402


def _save_png(images, path: Path, nrow: int | None = None) -> Path:
    """Save (N, 3, H, W) images in [0, 1] as one PNG (a grid when N > 1), atomically."""
    from .imaging import save_grid

    return save_grid(images, path, nrow=nrow)


def cmd_sample(args: argparse.Namespace) -> int:
    from .generation import DEFAULT_STEPS, generate
    from .imaging import load_images
    from .models.sd import load_ldm

    prompts = args.prompt
    model = load_ldm(args.model)
    images = None
    if args.image:
        images = load_images([args.image] * len(prompts), size=model.latent_shape[1] * _vae_factor(model))
    elif args.strength != 1.0:
        raise ValueError("--strength needs an init image (--image PNG)")
    seeds = [args.seed + i for i in range(args.num_images)]
    all_prompts = [p for p in prompts for _ in seeds]
    all_seeds = [s for _ in prompts for s in seeds]
    if images is not None:
        images = images.repeat_interleave(args.num_images, dim=0)
    guidance = args.guidance if args.guidance is not None else TOY_GUIDANCE
    out = generate(model, all_prompts, all_seeds, sampler=args.sampler, steps=args.steps,
                   guidance_scale=guidance, images=images, strength=args.strength,
                   truncate=args.truncate, gamma=args.gamma)
    path = _save_png(out, Path(args.out), nrow=args.num_images if len(out) > 1 else None)
    steps = args.steps or DEFAULT_STEPS[args.sampler]
    print(f"wrote {len(out)} image(s) ({args.sampler}, {steps} steps, guidance {guidance}) to {path}")
    return 0


def _vae_factor(model) -> int:
    return 2 ** (len(model.vae.config.block_out_channels) - 1)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(Path(args.out), num_prompts=args.num_prompts, seed=args.seed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lcm-lab", description="Few-step image generation with latent consistency models.")
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("sample", help="generate images from text (and optionally an init image)")
    s.add_argument("--prompt", action="append", required=True, help="text prompt; repeat for several")
    s.add_argument("--model", default=None, help="diffusers pipeline folder (default: the embedded toy teacher)")
    s.add_argument("--sampler", default="ddim", choices=["ddim", "lcm", "tcd"])
    s.add_argument("--steps", type=int, default=None, help="sampling steps (default: 50 for ddim, 4 for lcm/tcd)")
    s.add_argument("--guidance", type=float, default=None, help=f"guidance scale (default {TOY_GUIDANCE})")
    s.add_argument("--gamma", type=float, default=0.3, help="TCD stochasticity gamma")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--num-images", type=int, default=1, help="images per prompt (seeds seed, seed+1, ...)")
    s.add_argument("--image", default=None, help="init image for img2img / restoration")
    s.add_argument("--strength", type=float, default=1.0, help="img2img strength in (0, 1]")
    s.add_argument("--truncate", action="store_true", help="truncate over-long prompts instead of failing")
    s.add_argument("--out", default="sample.png", help="output PNG (a grid when several images)")
    s.set_defaults(func=cmd_sample)

    d = sub.add_parser("demo", help="the main job on the embedded toy world")
    d.add_argument("--out", default="outputs/demo")
    d.add_argument("--num-prompts", type=int, default=8)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_demo)

    add_eval_parser(sub)
    add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
