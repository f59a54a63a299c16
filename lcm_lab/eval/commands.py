"""``lcm-lab eval`` and ``lcm-lab bench quality|speed``: argparse sub-commands.

Wire them into the main parser with::

    from .eval.commands import add_bench_parser, add_eval_parser
    add_eval_parser(sub)
    add_bench_parser(sub)

Each parser sets ``func`` to a handler taking the parsed Namespace and returning an exit code.
Heavy imports happen inside the handlers, so building the parser stays cheap.

    lcm-lab eval --model DIR --sampler ddim --steps 1,2,4 --num-samples N --guidance W
                 --prompts toy|FILE|hps:DIR|coco:FILE --out DIR [--save-images]
                 [--inception PATH] [--hps PATH] [--clip PATH] [--reference DIR] [--metrics fd,clip]
    lcm-lab bench quality --models A,B --samplers ddim,lcm --steps 1,2,4 --out DIR [metric options]
    lcm-lab bench speed [--model DIR | --sd15-random] --sampler lcm --steps 4 --batch-size 4 --out DIR
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..arg_types import device_arg, int_list, non_negative_int, positive_int, seed_arg, str_list

SAMPLERS = ("ddim", "lcm", "tcd")
DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}


def _metric_list(text: str) -> list[str]:
    """Comma-separated metric names; an empty string means "timing only"."""
    from .evaluate import check_metric_names

    try:
        return list(check_metric_names(text.split(","), toy=True))  # toy-only metrics: checked with --prompts
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _sampler_list(text: str) -> list[str]:
    values = str_list(text)
    bad = [v for v in values if v not in SAMPLERS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown sampler(s) {bad}; choose from {list(SAMPLERS)}")
    return values


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-samples", type=positive_int, default=None,
                   help="images per row (default: 1000 for toy, else one per prompt; prompts cycle)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the toy teacher's 5.0)")
    p.add_argument("--gamma", type=float, default=0.3, help="TCD stochasticity gamma")
    p.add_argument("--prompts", default="toy", help="toy | FILE (one prompt per line) | hps:DIR | coco:FILE")
    p.add_argument("--per-style", type=positive_int, default=None, help="HPS benchmark prompts per style")
    p.add_argument("--seed", type=seed_arg, default=0, help="base seed: image i gets seed+i")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per sampler call")
    p.add_argument("--truncate", action="store_true", help="truncate over-long prompts instead of failing")
    p.add_argument("--device", type=device_arg, default=None, help="cpu | cuda | cuda:N | mps (default: cuda when available)")
    p.add_argument("--save-images", action="store_true", help="also write every image as PNG (+ captions.json)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--resume", action="store_true",
                   help="reuse the rows of OUT's results that have this run's settings and metrics (an "
                        "interrupted run continues where it stopped); otherwise every row is computed anew")


def _add_metric_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("metrics (all weights are local files; nothing is downloaded)")
    g.add_argument("--metrics", type=_metric_list, default=None,
                   help="comma-separated: fd,accuracy,clip,fid,kid,hpsv2; '' for timing only (default: "
                        "fd,accuracy,clip for toy; otherwise whatever --clip/--hps enable; "
                        "fid,kid with --reference/--inception)")
    g.add_argument("--clip", default=None, help="open_clip model folder / weights for the CLIP score "
                                                "(toy: overrides the toy-clip folder)")
    g.add_argument("--clip-arch", default=None, help="open_clip architecture of a bare CLIP weights file")
    g.add_argument("--hps", default=None, help="HPS_v2.1_compressed.pt (or a folder holding it): adds hpsv2")
    g.add_argument("--hps-arch", default="ViT-H-14", help="open_clip architecture of the HPS checkpoint")
    g.add_argument("--hps-version", default="v2.1", choices=["v2.0", "v2.1"])
    g.add_argument("--inception", default=None,
                   help="weights-inception-2015-12-05-6726825d.pth for FID/KID (or $LCM_LAB_INCEPTION_WEIGHTS)")
    g.add_argument("--reference", default=None, help="folder of real images for FID/KID (toy: held-out real images)")
    g.add_argument("--reference-num", type=int, default=1000, help="held-out real toy images for FD/FID references")
    g.add_argument("--antialias", action="store_true",
                   help="FID resize with antialiasing (torchmetrics>=1.8 default) instead of the TF-compatible one")
    g.add_argument("--inception-fp32", action="store_true",
                   help="run Inception in float32 (faster on CPU; statistics stay float64)")


def _suite_options(args: argparse.Namespace) -> dict:
    import torch

    fid_options = {"antialias": args.antialias}
    if args.inception_fp32:
        fid_options["inception_dtype"] = torch.float32
    return dict(clip=args.clip, clip_arch=args.clip_arch, hps=args.hps, hps_arch=args.hps_arch,
                hps_version=args.hps_version, inception=args.inception, reference=args.reference,
                reference_num=args.reference_num, fid_options=fid_options, batch_size=args.batch_size)


def _print_notes(pset) -> None:
    for note in getattr(pset, "notes", []):
        print(f"prompts ({pset.name}): {note}", file=sys.stderr)


# ----------------------------------------------------------------------------- eval


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``lcm-lab eval`` on ``subparsers`` (from ``parser.add_subparsers()``)."""
    p = subparsers.add_parser("eval", help="evaluate one model and sampler at several step counts",
                              description="Generate images with fixed per-image seeds and measure them; "
                                          "writes metrics.json and metrics.md (one row per step count).")
    p.add_argument("--model", default=None, help="diffusers pipeline folder (default: the embedded toy teacher)")
    p.add_argument("--name", default=None, help="the model column of the table (default: the folder)")
    p.add_argument("--sampler", default="ddim", choices=SAMPLERS)
    p.add_argument("--steps", type=int_list, default=None,
                   help="comma-separated step counts, e.g. 1,2,4 (default: 50 for ddim, 4 for lcm/tcd)")
    p.add_argument("--out", default="outputs/eval", help="output folder")
    _add_generation_args(p)
    _add_metric_args(p)
    p.set_defaults(func=cmd_eval)
    return p


def cmd_eval(args: argparse.Namespace) -> int:
    """Handler of ``lcm-lab eval``: one row per step count in ``--steps``."""
    from ..files import check_out_folder
    from ..generation import DEFAULT_STEPS, check_sampling
    from ..models.sd import load_ldm
    from .evaluate import (MetricSuite, _default_device, check_metric_names, evaluate, format_table, read_rows,
                           resolve_prompts, write_metrics)

    out = check_out_folder(args.out)
    check_sampling([args.model], [args.sampler], args.steps, args.guidance, args.gamma)
    if args.metrics is not None:
        check_metric_names(args.metrics, toy=args.prompts == "toy")
    ldm = load_ldm(args.model, device=args.device or _default_device())
    num = args.num_samples if args.num_samples is not None else (1000 if args.prompts == "toy" else None)
    pset = resolve_prompts(args.prompts, num, ldm.tokenizer, args.per_style)
    _print_notes(pset)
    suite = MetricSuite(args.metrics, toy=pset.name == "toy", device=ldm.device, **_suite_options(args))
    previous = read_rows(out / "metrics.json") if args.resume else []
    rows = []
    for steps in args.steps or [DEFAULT_STEPS[args.sampler]]:
        images_dir = out / "images" / f"{args.sampler}-{steps}" if args.save_images else None
        row = evaluate(ldm, args.sampler, steps, pset, num, args.seed, args.guidance, batch_size=args.batch_size,
                       suite=suite, save_images_dir=images_dir, truncate=args.truncate, gamma=args.gamma,
                       progress=not args.no_progress, name=args.name, resume_from=previous)
        rows.append(row)
        json_path, md_path = write_metrics(rows, out)  # after every row: an interrupted run keeps its rows
    print(format_table(rows), end="")
    print(f"wrote {json_path} and {md_path}")
    return 0


# ----------------------------------------------------------------------------- bench


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``lcm-lab bench quality`` and ``lcm-lab bench speed`` on ``subparsers``."""
    p = subparsers.add_parser("bench", help="quality and speed benchmarks",
                              description="quality: metrics over models x samplers x steps, with plots; "
                                          "speed: lcm_lab's sampler vs the stock diffusers pipeline.")
    sub = p.add_subparsers(dest="bench_command", required=True)

    q = sub.add_parser("quality", help="metrics over models x samplers x steps; results.json/md and plots")
    q.add_argument("--models", type=str_list, default=None,
                   help="comma-separated pipeline folders (default: the embedded toy teacher)")
    q.add_argument("--samplers", type=_sampler_list, default=["ddim", "lcm"])
    q.add_argument("--steps", type=int_list, default=[1, 2, 4, 8])
    q.add_argument("--out", default="outputs/bench/quality")
    _add_generation_args(q)
    _add_metric_args(q)
    q.set_defaults(func=cmd_bench_quality)

    s = sub.add_parser("speed", help="images/s, latency and peak memory: ours vs diffusers, same weights")
    s.add_argument("--model", default=None, help="pipeline folder (default: the embedded toy teacher)")
    s.add_argument("--sd15-random", action="store_true",
                   help="benchmark a random-weight SD1.5-architecture UNet (built in a temp folder, no download)")
    s.add_argument("--latent-size", type=positive_int, default=16, help="latent side for --sd15-random")
    s.add_argument("--sampler", default="lcm", choices=SAMPLERS)
    s.add_argument("--steps", type=positive_int, default=4)
    s.add_argument("--batch-size", type=positive_int, default=4)
    s.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the toy teacher's 5.0)")
    s.add_argument("--gamma", type=float, default=0.3, help="TCD gamma")
    s.add_argument("--repeats", type=positive_int, default=5, help="timed calls per side (interleaved)")
    s.add_argument("--warmup", type=non_negative_int, default=1, help="untimed calls per side first")
    s.add_argument("--seed", type=seed_arg, default=0)
    s.add_argument("--device", type=device_arg, default=None, help="cpu | cuda | cuda:N | mps (default: cuda when available)")
    s.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    s.add_argument("--out", default="outputs/bench/speed")
    s.set_defaults(func=cmd_bench_speed)
    return p


def cmd_bench_quality(args: argparse.Namespace) -> int:
    """Handler of ``lcm-lab bench quality``."""
    from .bench import bench_quality
    from .evaluate import format_table

    num = args.num_samples if args.num_samples is not None else (1000 if args.prompts == "toy" else None)
    options = _suite_options(args)
    options.pop("batch_size")
    rows = bench_quality(args.models or [None], args.samplers, args.steps, args.out, prompt_set=args.prompts,
                         num_samples=num, seeds=args.seed, guidance=args.guidance, metrics=args.metrics,
                         batch_size=args.batch_size, device=args.device, gamma=args.gamma, truncate=args.truncate,
                         save_images=args.save_images, progress=not args.no_progress, per_style=args.per_style,
                         resume=args.resume, **options)
    print(format_table(rows), end="")
    print(f"wrote {Path(args.out) / 'results.json'}, results.md and plots to {args.out}")
    return 0


def cmd_bench_speed(args: argparse.Namespace) -> int:
    """Handler of ``lcm-lab bench speed``."""
    import torch

    from .bench import bench_speed
    from .evaluate import format_table

    if args.sd15_random and args.model:
        raise ValueError("give either --model or --sd15-random, not both")
    row = bench_speed(args.model, sd15_random=args.sd15_random, sampler=args.sampler, steps=args.steps,
                      batch_size=args.batch_size, guidance=args.guidance, gamma=args.gamma, repeats=args.repeats,
                      warmup=args.warmup, seed=args.seed, device=args.device,
                      dtype=getattr(torch, DTYPES[args.dtype]), latent_size=args.latent_size, out_dir=args.out)
    keys = ["model", "sampler", "steps", "batch_size", "device", "ours_images_per_s", "diffusers_images_per_s",
            "speed_ratio", "ours_latency_s", "diffusers_latency_s", "ours_peak_mem_mb", "diffusers_peak_mem_mb",
            "max_abs_diff", "outputs_match"]
    print(format_table([row], keys), end="")
    if not row["outputs_match"]:
        print(f"warning: images differ from the diffusers pipeline's by up to {row['max_abs_diff']:.3g}; "
              "the two sides may not compute the same thing (check the scheduler config)", file=sys.stderr)
    print(f"wrote {Path(args.out) / 'results.json'} and results.md")
    return 0
