"""The ``lcm-lab`` command line.

    lcm-lab sample --prompt TEXT [--model DIR (SD 1.x/2.x or SDXL)] [--sampler ddim|lcm|tcd] [--steps N]
                   [--guidance W] [--seed S] [--image PNG --strength F] [--out PNG]
    lcm-lab demo --out DIR [--num-samples N] [section.key=value ...]
    lcm-lab train lcd|rg_lcd --config configs/toy/lcd.yaml [section.key=value ...]
    lcm-lab eval --model DIR --sampler ddim --steps 4,50 --out DIR
    lcm-lab bench quality|speed ...
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub: every model is a local folder

from .arg_types import positive_int, seed_arg  # noqa: E402
from .eval.commands import add_bench_parser, add_eval_parser  # noqa: E402

from .toy import TEACHER_GUIDANCE as TOY_GUIDANCE  # noqa: E402
from .training import METHODS, USER_ERRORS  # noqa: E402  (lazy loaders: imports nothing heavy)


def cmd_sample(args: argparse.Namespace) -> int:
    """``lcm-lab sample``: prompts -> one image or a grid (.png, .jpg, .webp, ...) with any sampler."""
    from .generation import check_sampling, generate, resolve_steps
    from .imaging import check_output_image, load_images, save_grid
    from .models.sd import load_ldm
    from .models.sdxl import is_sdxl_dir, load_sdxl

    prompts = args.prompt
    # A bad --out or impossible sampler settings fail now, not after loading the model and sampling.
    check_output_image(args.out)
    if args.strength != 1.0 and not args.image:
        raise ValueError("--strength needs an init image (--image PNG)")
    guidance = args.guidance if args.guidance is not None else TOY_GUIDANCE
    check_sampling([args.model], [args.sampler], [args.steps], guidance, args.gamma, args.strength)
    model = load_sdxl(args.model) if is_sdxl_dir(args.model) else load_ldm(args.model)
    images = None
    if args.image:
        images = load_images([args.image] * len(prompts), size=model.image_size)
    seeds = [args.seed + i for i in range(args.num_images)]
    all_prompts = [p for p in prompts for _ in seeds]
    all_seeds = [s for _ in prompts for s in seeds]
    if images is not None:
        images = images.repeat_interleave(args.num_images, dim=0)
    out = generate(model, all_prompts, all_seeds, sampler=args.sampler, steps=args.steps,
                   guidance_scale=guidance, images=images, strength=args.strength,
                   truncate=args.truncate, gamma=args.gamma)
    path = save_grid(out, Path(args.out), nrow=args.num_images if len(out) > 1 else None)
    steps = f"{resolve_steps(args.sampler, args.steps)} steps"
    if images is not None:  # img2img may run fewer (see generate's strength)
        steps += f" at strength {args.strength}"
    print(f"wrote {len(out)} image(s) ({args.sampler}, {steps}, guidance {guidance}) to {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """``lcm-lab demo``: distill the toy teacher with LCD, evaluate it against the teacher, write the report."""
    from .demo import run_demo

    report = run_demo(Path(args.out), num_samples=args.num_samples, overrides=args.overrides,
                      num_prompts=args.num_prompts)
    failed = [c["check"] for c in report["checks"] if not c["pass"]]
    if failed:
        print(f"warning: {len(failed)} demo check(s) not met: {'; '.join(failed)}", file=sys.stderr)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """``lcm-lab train METHOD``: run (or print/explain) a method's config file plus overrides."""
    from .training import METHODS, load_method_config, run
    from .training.config import config_to_dict, help_text

    if args.help_config:  # the keys of the method, whatever the file holds
        print(help_text(METHODS[args.method]()[0]))
        return 0
    if args.print_config:
        import yaml

        print(yaml.safe_dump(config_to_dict(load_method_config(args.method, args.config, args.overrides)),
                             sort_keys=False))
        return 0
    out = run(args.method, args.config, args.overrides)
    print(f"done: checkpoints, logs and the exported model are in {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``lcm-lab`` parser with every sub-command (cheap: nothing heavy is imported)."""
    parser = argparse.ArgumentParser(prog="lcm-lab", description="Few-step image generation with latent consistency models.")
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("sample", help="generate images from text (and optionally an init image)")
    s.add_argument("--prompt", action="append", required=True, help="text prompt; repeat for several")
    s.add_argument("--model", default=None, help="diffusers pipeline folder, SD 1.x/2.x or SDXL (default: the embedded toy teacher)")
    s.add_argument("--sampler", default="ddim", choices=["ddim", "lcm", "tcd"])
    s.add_argument("--steps", type=int, default=None, help="sampling steps (default: 50 for ddim, 4 for lcm/tcd)")
    s.add_argument("--guidance", type=float, default=None, help=f"guidance scale (default {TOY_GUIDANCE})")
    s.add_argument("--gamma", type=float, default=0.3, help="TCD stochasticity gamma")
    s.add_argument("--seed", type=seed_arg, default=0)
    s.add_argument("--num-images", type=positive_int, default=1, help="images per prompt (seeds seed, seed+1, ...)")
    s.add_argument("--image", default=None, help="init image for img2img / restoration")
    s.add_argument("--strength", type=float, default=1.0, help="img2img strength in (0, 1]")
    s.add_argument("--truncate", action="store_true", help="truncate over-long prompts instead of failing")
    s.add_argument("--out", default="sample.png", help="output image, default sample.png (a grid when several images; .png, .jpg, .webp)")
    s.set_defaults(func=cmd_sample)

    d = sub.add_parser("demo", help="the main job on the embedded toy world")
    d.add_argument("--out", default="outputs/demo")
    d.add_argument("--num-samples", type=int, default=1000, help="images per evaluated setting")
    d.add_argument("--num-prompts", type=int, default=8, help="columns of the comparison grid")
    d.add_argument("overrides", nargs="*", help="changes to configs/toy/lcd.yaml, e.g. train.max_steps=200")
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser("train", help="train with one method's config (also: accelerate launch scripts/train_<method>.py)")
    t.add_argument("method", choices=sorted(METHODS), help="training method")
    t.add_argument("--config", default=None, help="YAML config (configs/<family>/<method>.yaml)")
    t.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.max_steps=200")
    t.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    t.add_argument("--help-config", action="store_true", help="list every config key with its default and help")
    t.set_defaults(func=cmd_train)

    add_eval_parser(sub)
    add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lcm-lab`` command; returns the exit code."""
    parser = build_parser()
    # `train` takes key=value overrides anywhere on the line (argparse stops collecting positionals
    # at the first option, so the ones after --config arrive as "unknown").
    args, extra = parser.parse_known_args(argv)
    if extra:
        if args.command not in ("train", "demo") or any(e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    try:
        return args.func(args)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
