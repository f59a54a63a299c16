"""Benchmarks: quality vs steps / time across models and samplers, and sampler speed vs diffusers.

* :func:`bench_quality`: :func:`~lcm_lab.eval.evaluate.evaluate` over every (model, sampler,
  steps), sharing one metric suite; writes ``results.json``, ``results.md`` and PNG plots of
  each metric against steps and against seconds per image.
* :func:`bench_speed`: images/s and latency of lcm_lab's sampler against the stock diffusers
  pipeline (``StableDiffusionPipeline`` with the matching scheduler, or
  ``LatentConsistencyModelPipeline`` for w-conditioned LCM students) on the same weights (the
  very same modules), the same prompts, seeds, batch and steps. Both run in one process with
  warm-up and interleaved repeats (alternating which goes first), and their images are
  compared, so the timing compares equal work.
* :func:`build_random_pipeline`: random-weight pipelines saved in the diffusers layout: a tiny
  one (tests) and an SD1.5-architecture one (``--sd15-random``: speed at SD scale without
  downloading weights).
"""

from __future__ import annotations

import json
import math
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from ..files import atomic_write, atomic_write_text, check_out_folder
from .evaluate import MetricSuite, evaluate, write_metrics

PLOT_METRICS = ("fd", "fd_real", "accuracy", "clip", "fid", "kid", "hpsv2", "sec_per_image")
SPEED_PROMPTS = (
    "a photograph of an astronaut riding a horse",
    "a watercolor painting of a lighthouse at dawn",
    "a red circle on the left, dark background",
    "a bowl of fruit on a wooden table, studio lighting",
)

# diffusers' scheduler config of Stable Diffusion 1.x (DDIMScheduler).
SD_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                           beta_schedule="scaled_linear", steps_offset=1, clip_sample=False,
                           set_alpha_to_one=False, prediction_type="epsilon")
# The UNet of runwayml/stable-diffusion-v1-5 (unet/config.json), ~860M parameters.
SD15_UNET_CONFIG = dict(
    act_fn="silu", attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280), center_input_sample=False,
    cross_attention_dim=768, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                               "CrossAttnDownBlock2D", "DownBlock2D"),
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2,
    mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=32, out_channels=4, sample_size=64,
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
TINY_UNET_CONFIG = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, norm_num_groups=8, attention_head_dim=8)


# ----------------------------------------------------------------------------- random pipelines


def build_random_pipeline(out_dir: str | os.PathLike, preset: str = "tiny", seed: int = 0,
                          latent_size: int | None = None, w_conditioned: bool = False) -> Path:
    """Save a random-weight Stable-Diffusion-style pipeline folder (diffusers layout).

    Presets:
        ``"tiny"``: UNet (32, 64) channels on 8x8 latents, a 2-level VAE (16 px images), a
            2-layer 32-wide CLIP text encoder with a 32-token context. Seconds to build.
        ``"sd15"``: the SD1.5 UNet architecture (:data:`SD15_UNET_CONFIG`, 860M parameters,
            cross-attention 768) on ``latent_size`` latents (default 16), a small 4-level VAE
            (factor 8, like SD's) and a 2-layer 768-wide text encoder with SD's 77-token
            context. About 3.5 GB on disk; a minute or two to build on CPU.

    The tokenizer is CLIP's BPE written offline (:func:`lcm_lab.toy.tokenizer.write_clip_tokenizer`),
    the scheduler DDIM with SD's config. ``w_conditioned`` adds a guidance embedding input
    (``time_cond_proj_dim``) like an LCM student.

    Returns:
        the folder, loadable with :func:`lcm_lab.models.sd.load_ldm` and diffusers.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from ..toy.tokenizer import write_clip_tokenizer

    if preset not in ("tiny", "sd15"):
        raise ValueError(f"unknown preset {preset!r}; choose 'tiny' or 'sd15'")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tiny = preset == "tiny"
    size = latent_size or (TINY_UNET_CONFIG["sample_size"] if tiny else 16)
    unet_config = {**(TINY_UNET_CONFIG if tiny else SD15_UNET_CONFIG), "sample_size": size}
    if w_conditioned:
        unet_config["time_cond_proj_dim"] = 32 if tiny else 256
    channels = (8, 16) if tiny else (32, 64, 64, 64)  # VAE factor 2 (tiny) or SD's 8
    vae_config = dict(in_channels=3, out_channels=3, block_out_channels=channels, layers_per_block=1,
                      down_block_types=("DownEncoderBlock2D",) * len(channels),
                      up_block_types=("UpDecoderBlock2D",) * len(channels), latent_channels=4,
                      norm_num_groups=8 if tiny else 32, sample_size=size * 2 ** (len(channels) - 1))
    context = 32 if tiny else 77
    text_config = CLIPTextConfig(hidden_size=unet_config["cross_attention_dim"], num_hidden_layers=2,
                                 intermediate_size=64 if tiny else 3072, num_attention_heads=4 if tiny else 12,
                                 vocab_size=49408, max_position_embeddings=context)
    # Seeded without touching the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(**vae_config)
        text_encoder = CLIPTextModel(text_config)
    with tempfile.TemporaryDirectory() as tok_dir:
        tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tok_dir, model_max_length=context))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(**SD_SCHEDULER_CONFIG), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out)
    return out


# ----------------------------------------------------------------------------- quality


def _model_names(models: Sequence) -> list[str]:
    """Short, unique names: the folder name, or the full path when two folders share a name."""
    paths = ["toy-teacher" if m is None else str(m) for m in models]
    short = [Path(p).name or p for p in paths]
    return [s if short.count(s) == 1 else p for s, p in zip(short, paths)]


def bench_quality(models: Sequence, samplers: Sequence[str], steps_list: Sequence[int], out_dir: str | os.PathLike,
                  *, prompt_set="toy", num_samples: int | None = None, seeds: int = 0, guidance: float | None = None,
                  metrics: Sequence[str] | None = None, batch_size: int = 32, device: str | None = None,
                  gamma: float = 0.3, truncate: bool = False, save_images: bool = False, progress: bool = True,
                  suite: MetricSuite | None = None, resume: bool = False, **suite_options) -> list[dict]:
    """Evaluate every (model, sampler, steps); write ``results.json``, ``results.md`` and plots.

    Args:
        models: pipeline folders (``None`` = the embedded toy teacher).
        samplers, steps_list: the grid.
        out_dir: where results (and, with ``save_images``, ``images/<model>/<sampler>-<steps>/``) go.
        prompt_set, num_samples, seeds, guidance, metrics, batch_size, device, gamma, truncate: as in
            :func:`~lcm_lab.eval.evaluate.evaluate`, the same for every row (same prompts and
            seeds: rows differ only by model, sampler and steps).
        suite / suite_options: a prepared :class:`~lcm_lab.eval.evaluate.MetricSuite`, or its
            keyword arguments (``clip``, ``hps``, ``inception``, ``reference``, ...).
        resume: reuse the rows of ``out_dir/results.json`` with the same settings and metrics.

    Returns:
        the rows (also in ``results.json``); results are rewritten after every row, so an
        interrupted run keeps what it finished.
    """
    from ..generation import check_sampling
    from ..models.sd import load_ldm
    from ..models.sdxl import is_sdxl_dir
    from .evaluate import _default_device, check_metric_names, read_rows, resolve_prompts
    from .prompts import PromptSet

    out = Path(out_dir)
    check_out_folder(out)
    check_sampling(models, samplers, steps_list, guidance, gamma)
    sdxl = [m for m in models if m is not None and is_sdxl_dir(m)]
    if sdxl:  # load_ldm would refuse them only after the rows of the models before them
        raise ValueError(f"{sdxl[0]} is an SDXL pipeline; bench quality takes SD 1.x/2.x folders")
    if metrics is not None:
        check_metric_names(metrics, toy=(prompt_set.name if isinstance(prompt_set, PromptSet) else prompt_set) == "toy")
    previous = read_rows(out / "results.json") if resume else []
    device = device or _default_device()
    rows: list[dict] = []
    names = _model_names(models)
    per_style = suite_options.pop("per_style", None)
    for name, path in zip(names, models):
        ldm = load_ldm(path, device=device)
        pset = resolve_prompts(prompt_set, num_samples, ldm.tokenizer, per_style)
        if suite is None:
            suite = MetricSuite(metrics, toy=pset.name == "toy", device=device, **suite_options)
        for sampler in samplers:
            for steps in steps_list:
                images_dir = out / "images" / name.replace(os.sep, "_") / f"{sampler}-{steps}" if save_images else None
                row = evaluate(ldm, sampler, int(steps), pset, num_samples, seeds, guidance, batch_size=batch_size,
                               suite=suite, save_images_dir=images_dir, progress=progress, name=name, gamma=gamma,
                               truncate=truncate, resume_from=previous)
                rows.append(row)
                write_results(rows, out)
    return rows


def write_results(rows: Sequence[dict], out_dir: str | os.PathLike) -> dict[str, Path]:
    """``results.json`` + ``results.md`` (atomically) and the plots; returns the written paths."""
    out = Path(out_dir)
    json_path, md_path = write_metrics(rows, out, stem="results")
    paths = {"json": json_path, "md": md_path}
    paths.update(plot_results(rows, out))
    return paths


def _series(rows: Sequence[dict]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row.get("model"), row.get("sampler")), []).append(row)
    return groups


def plot_results(rows: Sequence[dict], out_dir: str | os.PathLike) -> dict[str, Path]:
    """One PNG per metric and x axis: ``<metric>_vs_steps.png`` and ``<metric>_vs_time.png``
    (seconds per image), a line per (model, sampler). Uses matplotlib's Agg canvas directly
    (no pyplot, so no global backend is touched)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    present = [m for m in PLOT_METRICS
               if any(isinstance(r.get(m), (int, float)) and math.isfinite(r[m]) for r in rows)]
    for metric in present:
        for axis, key, label in (("steps", "steps", "sampling steps"),
                                 ("time", "sec_per_image", "seconds per image")):
            if metric == "sec_per_image" and axis == "time":
                continue
            fig = Figure(figsize=(5.5, 3.8), dpi=100)
            FigureCanvasAgg(fig)
            ax = fig.add_subplot(1, 1, 1)
            for (model, sampler), group in _series(rows).items():
                pts = sorted((r[key], r[metric]) for r in group
                             if isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric]))
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{model} / {sampler}")
            if axis == "steps":
                ax.set_xscale("log", base=2)
            elif all(r.get("sec_per_image", 0) > 0 for r in rows):
                ax.set_xscale("log")
            ax.set_xlabel(label)
            ax.set_ylabel(metric)
            ax.set_title(f"{metric} vs {label}")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
            fig.tight_layout()
            path = out / f"{metric}_vs_{axis}.png"
            atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
            written[f"{metric}_vs_{axis}"] = path
    return written


# ----------------------------------------------------------------------------- speed


class PeakMemory:
    """Peak memory of a code region.

    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (tensors only,
    excluding the caching allocator's slack). CPU: the process resident-set high-water mark
    (``VmHWM``), reset before the region through ``/proc/self/clear_refs`` on Linux; where that
    reset is unavailable, ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (the high-water mark since
    the process started, so only an upper bound for the region).
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        if self.device.type == "cuda":
            self.kind = "cuda_max_memory_allocated"
        elif self._can_reset_rss():
            self.kind = "rss_high_water_mark"
        else:
            self.kind = "process_ru_maxrss"

    @staticmethod
    def _can_reset_rss() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return "VmHWM" in Path("/proc/self/status").read_text()
        except OSError:
            return False

    def reset(self) -> None:
        """Start a region; :attr:`baseline_mb` is the memory in use at its start."""
        if self.kind == "cuda_max_memory_allocated":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline_mb = torch.cuda.memory_allocated(self.device) / 2**20
            return
        if self.kind == "rss_high_water_mark":
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        try:
            self.baseline_mb = self._status_mb("VmRSS")
        except OSError:  # no /proc (macOS): the process's peak so far
            self.baseline_mb = process_peak_rss_mb()

    @staticmethod
    def _status_mb(field: str) -> float:
        """A memory field of ``/proc/self/status`` in MiB; ``OSError`` when there is none."""
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
        raise OSError(f"/proc/self/status has no {field} line")

    def peak_mb(self) -> float:
        """Peak memory (MiB) since :meth:`reset`; weights and everything else resident included."""
        if self.kind == "cuda_max_memory_allocated":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self.kind == "rss_high_water_mark":
            return self._status_mb("VmHWM")
        return process_peak_rss_mb()


def process_peak_rss_mb() -> float:
    """``resource.getrusage`` peak RSS of this process in MiB (Linux reports kB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def diffusers_pipeline(ldm, sampler: str):
    """The stock diffusers pipeline for ``sampler`` built from the SAME modules as ``ldm``.

    ``ddim`` -> StableDiffusionPipeline + DDIMScheduler; ``tcd`` -> + TCDScheduler; ``lcm`` ->
    LatentConsistencyModelPipeline for w-conditioned students (guidance embedded, no CFG), else
    StableDiffusionPipeline + LCMScheduler (CFG, as lcm_lab does for such models). Schedulers
    are built from the model's own scheduler config.
    """
    from diffusers import (DDIMScheduler, LatentConsistencyModelPipeline, LCMScheduler, StableDiffusionPipeline,
                           TCDScheduler)

    from ..models.student import is_w_conditioned

    schedulers = {"ddim": DDIMScheduler, "lcm": LCMScheduler, "tcd": TCDScheduler}
    if sampler not in schedulers:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(schedulers)}")
    scheduler = schedulers[sampler].from_config(ldm.scheduler_config)
    cls = LatentConsistencyModelPipeline if sampler == "lcm" and is_w_conditioned(ldm.unet) else StableDiffusionPipeline
    pipe = cls(vae=ldm.vae, text_encoder=ldm.text_encoder, tokenizer=ldm.tokenizer, unet=ldm.unet,
               scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def bench_speed(model_path: str | os.PathLike | None = None, *, sd15_random: bool = False, sampler: str = "lcm",
                steps: int = 4, batch_size: int = 4, guidance: float | None = None, gamma: float = 0.3,
                repeats: int = 5, warmup: int = 1, seed: int = 0, device: str | None = None,
                dtype: torch.dtype = torch.float32, prompts: Sequence[str] | None = None, latent_size: int = 16,
                out_dir: str | os.PathLike | None = None, tolerance: float | None = None) -> dict:
    """Images/s and latency of lcm_lab's sampler vs the stock diffusers pipeline, same weights.

    Both sides generate ``batch_size`` images from the same prompts and seeds (image ``i`` gets
    seed ``seed + i``) with the same sampler, steps and guidance, end to end (text encoding,
    denoising loop, VAE decoding). After ``warmup`` untimed calls each, ``repeats`` rounds time
    one call of each side, alternating which side goes first; the median call time gives
    ``*_images_per_s = batch_size / median`` and ``*_latency_s = median``. The images of the
    first calls are compared (``max_abs_diff``; ``outputs_match`` within ``tolerance``,
    default 1e-4 in float32, 2e-2 otherwise) so the timing compares the same computation.

    Args:
        model_path: a pipeline folder (default: the toy teacher); ignored with ``sd15_random``.
        sd15_random: build an SD1.5-architecture random pipeline (:func:`build_random_pipeline`,
            ``latent_size`` latents) in a temporary folder, deleted afterwards.
        device, dtype: where and in which precision both sides run (default CUDA when available).
        out_dir: also write ``results.json`` / ``results.md`` there.

    Returns:
        one row: ``ours_images_per_s``, ``diffusers_images_per_s``, ``speed_ratio`` (ours /
        diffusers images per second), latencies, ``*_peak_mem_mb`` with ``mem_kind``,
        ``*_peak_extra_mb`` (peak minus the memory in use before the call: the generation's own
        working memory), ``process_peak_rss_mb``, ``max_abs_diff``, ``outputs_match`` and the settings.
    """
    from ..core.noise import generators_for_seeds
    from ..generation import check_sampling, generate, resolve_steps, sampling_grid
    from ..models.sd import load_ldm
    from .evaluate import _default_device, _sync

    if repeats < 1 or warmup < 0 or batch_size < 1:
        raise ValueError("need repeats >= 1, warmup >= 0 and batch_size >= 1")
    if guidance is None:
        from ..toy import TEACHER_GUIDANCE

        guidance = TEACHER_GUIDANCE
    device = torch.device(device or _default_device())
    if out_dir is not None:
        check_out_folder(out_dir)
    # before the (possibly random SD1.5) pipeline is built
    if sd15_random:
        sampling_grid(SD_SCHEDULER_CONFIG, sampler, steps, guidance_scale=guidance, gamma=gamma)
    else:
        check_sampling([model_path], [sampler], [steps], guidance, gamma)
    steps = resolve_steps(sampler, steps)
    tmp = None
    try:
        if sd15_random:
            tmp = tempfile.TemporaryDirectory(prefix="lcm_lab_sd15_random_")
            model_path = build_random_pipeline(Path(tmp.name) / "sd15", preset="sd15", latent_size=latent_size)
        ldm = load_ldm(model_path, device=device, dtype=dtype)
        pipe = diffusers_pipeline(ldm, sampler)
        base = list(prompts or SPEED_PROMPTS)
        batch_prompts = [base[i % len(base)] for i in range(batch_size)]
        seeds = [seed + i for i in range(batch_size)]

        def ours():
            return generate(ldm, batch_prompts, seeds, sampler=sampler, steps=steps, guidance_scale=guidance,
                            gamma=gamma, batch_size=batch_size, decode_chunk_size=batch_size, progress=False)

        def theirs():
            gens = generators_for_seeds(seeds)  # on the CPU, as ours
            extra = {"eta": gamma} if sampler == "tcd" else {}
            with torch.no_grad():
                return pipe(batch_prompts, num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                            output_type="pt", **extra).images

        sides = {"ours": ours, "diffusers": theirs}
        memory = PeakMemory(device)
        times = {k: [] for k in sides}
        peaks = {k: 0.0 for k in sides}
        extra = {k: 0.0 for k in sides}
        first = {}

        def run(name, timed):
            memory.reset()
            _sync(device)
            t0 = time.perf_counter()
            images = sides[name]()
            _sync(device)
            elapsed = time.perf_counter() - t0
            peak = memory.peak_mb()
            peaks[name] = max(peaks[name], peak)
            extra[name] = max(extra[name], peak - memory.baseline_mb)
            first.setdefault(name, images.float().cpu())
            if timed:
                times[name].append(elapsed)

        for i in range(warmup):
            for name in (("ours", "diffusers") if i % 2 == 0 else ("diffusers", "ours")):
                run(name, timed=False)
        for i in range(repeats):
            for name in (("ours", "diffusers") if i % 2 == 0 else ("diffusers", "ours")):
                run(name, timed=True)

        diff = float((first["ours"] - first["diffusers"]).abs().max())
        tol = tolerance if tolerance is not None else (1e-4 if dtype == torch.float32 else 2e-2)
        lat = {k: _median(v) for k, v in times.items()}
        row = {
            "model": "sd15-random" if sd15_random else str(ldm.path),
            "sampler": sampler, "steps": int(steps), "guidance": float(guidance), "batch_size": batch_size,
            "device": str(device), "dtype": str(dtype).replace("torch.", ""),
            "image_size": first["ours"].shape[-1], "repeats": repeats, "warmup": warmup,
            "diffusers_pipeline": type(pipe).__name__ + "+" + type(pipe.scheduler).__name__,
            "ours_images_per_s": batch_size / lat["ours"], "diffusers_images_per_s": batch_size / lat["diffusers"],
            "speed_ratio": lat["diffusers"] / lat["ours"],
            "ours_latency_s": lat["ours"], "diffusers_latency_s": lat["diffusers"],
            "ours_latency_min_s": min(times["ours"]), "diffusers_latency_min_s": min(times["diffusers"]),
            "ours_peak_mem_mb": peaks["ours"], "diffusers_peak_mem_mb": peaks["diffusers"],
            "ours_peak_extra_mb": extra["ours"], "diffusers_peak_extra_mb": extra["diffusers"],
            "mem_kind": memory.kind, "process_peak_rss_mb": process_peak_rss_mb(),
            "max_abs_diff": diff, "outputs_match": diff <= tol,
        }
    finally:
        if tmp is not None:
            tmp.cleanup()
    if out_dir is not None:
        write_metrics([row], out_dir, stem="results")
        atomic_write_text(Path(out_dir) / "speed_times.json",
                          json.dumps({"seconds_per_call": times, "prompts": batch_prompts, "seeds": seeds}, indent=1))
    return row


__all__ = ["PLOT_METRICS", "SD15_UNET_CONFIG", "TINY_UNET_CONFIG", "PeakMemory", "bench_quality",
           "bench_speed", "build_random_pipeline", "diffusers_pipeline", "plot_results", "process_peak_rss_mb",
           "write_results"]
