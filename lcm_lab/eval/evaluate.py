"""Evaluate a model + sampler + step count on a prompt set: one row of metrics.

Images are generated with fixed per-image seeds (image ``i`` gets seed ``base_seed + i`` and
prompt ``i`` of the set, cycling when more images than prompts are asked for), in batches,
and streamed through the metric accumulators, so memory does not grow with the number of
images. Optionally every image is written as ``{index:05d}.png`` (atomically) with a
``captions.json`` index, for external tools.

Metrics (``metrics=``):

* ``fd`` (+ ``fd_real``, and the floors ``fd_floor`` / ``fd_real_floor`` / ``fd_vae`` of
  :func:`lcm_lab.eval.toy.toy_reference`) and ``accuracy`` (+ ``acc_<attribute>``): the toy world's judge
  (:mod:`lcm_lab.eval.toy`); toy prompts only;
* ``clip``: CLIP score (Hessel et al. 2021), ``toy-clip`` for toy prompts, else the ``clip``
  reward with a user-supplied open_clip model;
* ``fid`` / ``kid`` (+ ``kid_std``): Inception FID (Heusel et al. 2017) / KID (Bińkowski et al.
  2018) against held-out real toy images, or a user folder of reference images
  (:mod:`lcm_lab.eval.fid`);
* ``hpsv2`` (+ ``hpsv2_<style>``): HPSv2 (Wu et al. 2023), mean x 100 per style;
* always: ``sec_per_image`` (generation wall-clock, text encoding and VAE decoding included,
  metrics excluded, after one warm-up image).

Default metrics (``metrics=None``): toy prompts -> ``fd, accuracy, clip``; other prompt sets ->
``clip`` if a CLIP model is given (argument or ``$LCM_LAB_CLIP_CHECKPOINT``), ``hpsv2`` if an
HPS checkpoint is given; ``fid, kid`` whenever a reference folder or Inception weights are given
(FID/KID on non-toy prompts need the reference folder).
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..files import atomic_write_text, scratch_folder
from ..imaging import IMAGE_EXTENSIONS, to_rgb
from ..rewards import RewardModel
from .clip_metrics import ScoreMean, load_clip_metric, load_hps_metric, reward_scores
from .frechet import FeatureStats, fd_between
from .prompts import CLIP_CONTEXT, PromptSet, load_prompt_set

METRICS = ("fd", "accuracy", "clip", "fid", "kid", "hpsv2")
TOY_METRICS = ("fd", "accuracy", "clip")
BASE_KEYS = ("model", "sampler", "steps", "guidance", "num_samples", "seed", "prompt_set")


# ----------------------------------------------------------------------------- files


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):  # 3 significant digits below 100, one decimal above
        return "nan" if math.isnan(value) else f"{value:.3g}" if abs(value) < 100 else f"{value:.1f}"
    return str(value).replace("|", "\\|")


def format_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """A markdown table of ``rows``; columns in first-seen key order unless given."""
    if columns is None:
        columns = []
        for row in rows:
            columns += [k for k in row if k not in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _json_value(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None  # strict JSON has no NaN/inf
    if isinstance(value, Path):
        return str(value)
    return value


def write_metrics(rows: Sequence[dict], out_dir: str | os.PathLike, stem: str = "metrics") -> tuple[Path, Path]:
    """Write ``<stem>.json`` (a list of rows) and ``<stem>.md`` (a markdown table), atomically.

    Returns:
        the two paths.
    """
    out = Path(out_dir)
    clean = [{k: _json_value(v) for k, v in row.items()} for row in rows]
    json_path = atomic_write_text(out / f"{stem}.json", json.dumps(clean, indent=2) + "\n")
    md_path = atomic_write_text(out / f"{stem}.md", format_table(rows))
    return json_path, md_path


def inputs_id(prompts: Sequence[str], seeds: Sequence[int]) -> str:
    """The first 16 hex digits of the SHA-256 of every image's prompt and seed: rows with the same settings
    but another prompt file content, ``per_style`` or seed list (the ``seed`` column holds the first seed only)
    get another id, so a resumed run does not reuse them."""
    return hashlib.sha256(json.dumps([list(prompts), [int(s) for s in seeds]]).encode()).hexdigest()[:16]


def read_rows(path: str | os.PathLike) -> list[dict]:
    """The rows of a ``metrics.json`` / ``results.json`` written by :func:`write_metrics`; none if the file is
    missing. A file that is not such a list raises ``ValueError`` naming it."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        rows = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot resume from {path}: {exc}") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"cannot resume from {path}: not a list of result rows")
    return rows


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files (png/jpg/jpeg/webp/bmp) directly in ``folder``, sorted by name."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"reference image folder {root} does not exist")
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise ValueError(f"reference image folder {root} holds no image ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def load_reference_images(files: Sequence[Path], size: int) -> torch.Tensor:
    """Images center-cropped to a square and resized to ``size`` (PIL bicubic, antialiased),
    as uint8 ``(N, 3, size, size)``: the same resolution as the generated images, so both sides
    reach Inception through the same resize."""
    import numpy as np
    from PIL import Image

    out = []
    for path in files:
        try:
            with Image.open(path) as img:
                img = to_rgb(img)
                side = min(img.size)
                left, top = (img.width - side) // 2, (img.height - side) // 2
                img = img.crop((left, top, left + side, top + side))
                if side != size:
                    img = img.resize((size, size), Image.BICUBIC)
                out.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1))
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise ValueError(f"cannot read reference image {path}: {exc}") from None
    return torch.stack(out)


# ----------------------------------------------------------------------------- metrics


def check_metric_names(metrics: Sequence[str], toy: bool) -> tuple[str, ...]:
    """``metrics`` without blanks and repeats; unknown names, or toy-only metrics without toy prompts, are a
    ``ValueError`` (entry points call this before loading anything)."""
    metrics = [m.strip() for m in metrics if m.strip()]
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {list(METRICS)}")
    toy_only = [m for m in metrics if m in ("fd", "accuracy")]
    if toy_only and not toy:
        raise ValueError(f"metric(s) {toy_only} need the toy world's prompts (--prompts toy)")
    return tuple(dict.fromkeys(metrics))


class MetricSuite:
    """Metric models and reference statistics, loaded once and shared by many evaluations.

    Args:
        metrics: names from :data:`METRICS`, or ``None`` for the defaults (see the module docstring).
        toy: whether the prompts are toy-world prompts (with attributes).
        device: where the metric networks run.
        clip: CLIP-score model (path, or a loaded :class:`~lcm_lab.rewards.RewardModel`);
            for toy prompts, overrides the toy-clip folder.
        clip_arch: open_clip architecture of a bare CLIP weights file.
        hps, hps_version, hps_arch: HPSv2 checkpoint (or loaded model), version, architecture.
        inception: InceptionV3 weights file (see :func:`lcm_lab.eval.fid.inception_weights_path`).
        reference: folder of reference images for FID/KID (default for toy prompts: held-out
            real toy images).
        reference_num: number of held-out real toy images (toy FD/FID reference).
        judge: a loaded toy judge (default: the embedded one).
        fid_options: extra keyword arguments of :class:`~lcm_lab.eval.fid.InceptionMetrics`
            (``antialias``, ``inception_dtype``, ``feature``, ``kid_subset_size`` ...).
        batch_size: images per metric-network forward.

    Raises:
        ValueError / FileNotFoundError up front (before anything is generated) when a metric
        cannot be computed: toy metrics without toy prompts, missing weights, no FID reference.
    """

    def __init__(self, metrics: Sequence[str] | None = None, *, toy: bool, device: str | torch.device = "cpu",
                 clip: str | os.PathLike | RewardModel | None = None, clip_arch: str | None = None,
                 hps: str | os.PathLike | RewardModel | None = None, hps_version: str = "v2.1",
                 hps_arch: str | os.PathLike = "ViT-H-14", inception: str | os.PathLike | None = None,
                 reference: str | os.PathLike | None = None, reference_num: int = 1000, judge=None,
                 fid_options: dict | None = None, batch_size: int = 64):
        self.toy = bool(toy)
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.reference_num = int(reference_num)
        if metrics is None:
            metrics = self.default_metrics(toy, clip=clip, hps=hps, reference=reference, inception=inception)
        self.metrics = check_metric_names(metrics, toy)
        fid_kid = "fid" in self.metrics or "kid" in self.metrics
        if ("fd" in self.metrics or (fid_kid and reference is None)) and self.reference_num < 2:
            raise ValueError(f"reference_num must be >= 2 (the toy reference needs a covariance), got "
                             f"{self.reference_num}")
        self.reference_files = None  # checked before any metric network is loaded
        if fid_kid:
            if reference is None and not toy:
                raise ValueError("FID/KID need reference images: pass a folder of real images (--reference DIR)")
            self.reference_files = list_images(reference) if reference is not None else None
            if self.reference_files is not None and len(self.reference_files) < 2:
                raise ValueError(f"FID/KID need at least 2 reference images; {reference} has "
                                 f"{len(self.reference_files)}")
        self.judge = None
        if "fd" in self.metrics or "accuracy" in self.metrics:
            from .toy import load_judge

            self.judge = judge if judge is not None else load_judge()
            self.judge.to(self.device).eval()
        self.clip = load_clip_metric(toy, clip, clip_arch, self.device) if "clip" in self.metrics else None
        self.hps = load_hps_metric(hps, hps_version, hps_arch, self.device) if "hpsv2" in self.metrics else None
        self.inception = None
        if fid_kid:
            from .fid import InceptionMetrics

            self.inception = InceptionMetrics(inception, device=self.device, kid="kid" in self.metrics,
                                              **(fid_options or {}))
        # What the metric values depend on besides the images, recorded in each row: `--resume` reuses a row
        # only if it was measured against the same references and weights. Read from the loaded models (the
        # files the loaders resolved, environment variables included), not from the arguments.
        def loaded_from(model) -> str:
            return str(getattr(model, "checkpoint", None) or getattr(model, "source", None) or type(model).__name__)

        sources = {"reference": reference if fid_kid else None,
                   "reference_num": self.reference_num if "fd" in self.metrics or (fid_kid and reference is None)
                   else None,
                   "judge": loaded_from(self.judge) if self.judge is not None else None,
                   "inception": loaded_from(self.inception) if fid_kid else None,
                   "fid_options": sorted((fid_options or {}).items()) if fid_kid else None,
                   "clip": loaded_from(self.clip) if self.clip is not None else None,
                   "hps": f"{loaded_from(self.hps)} {hps_version} {hps_arch}" if self.hps is not None else None}
        self.sources = "; ".join(f"{k}={v}" for k, v in sources.items() if v is not None)
        self._toy_refs: list = []  # [(vae, floor sample size, ToyReference)]
        self.fid_reference: str | None = None  # how the FID/KID reference was prepared, for the rows
        self._fid_ref_size = None

    @staticmethod
    def default_metrics(toy: bool, clip=None, hps=None, reference=None, inception=None) -> tuple[str, ...]:
        """The metrics computed when none are named: toy -> ``fd, accuracy, clip``; otherwise
        ``clip`` / ``hpsv2`` when their weights are given (argument or environment variable);
        in both cases ``fid, kid`` when a reference folder or Inception weights are given."""
        out = list(TOY_METRICS) if toy else []
        if not toy and (clip is not None or os.environ.get("LCM_LAB_CLIP_CHECKPOINT")):
            out.append("clip")
        if hps is not None or (not toy and os.environ.get("LCM_LAB_HPS_CHECKPOINT")):
            out.append("hpsv2")
        if reference is not None or inception is not None:
            out += ["fid", "kid"]
        return tuple(out)

    # -- references

    def _toy_reference(self, vae, num_samples: int | None = None):
        """:func:`lcm_lab.eval.toy.toy_reference` for ``vae`` with floors at ``num_samples`` generated images
        (default ``reference_num``), computed once per (VAE, size)."""
        from .toy import toy_reference

        num_b = num_samples or self.reference_num
        for known, size, ref in self._toy_refs:
            if known is vae and size == num_b:
                return ref
        ref = toy_reference(self.judge, vae, self.reference_num, num_b)
        self._toy_refs.append((vae, num_b, ref))
        return ref

    def _fid_reference(self, size: int) -> None:
        if self._fid_ref_size == size:
            return
        if self._fid_ref_size is not None:
            self.inception.reset()
        if self.reference_files is None:
            from .toy import real_images

            images, _ = real_images(self.reference_num)
            self.fid_reference = f"held-out toy images (rendered, lossless), {images.shape[-1]} px"
            if images.shape[-1] != size:
                images = torch.nn.functional.interpolate(images, size=(size, size), mode="bicubic",
                                                         antialias=True, align_corners=False).clamp(0, 1)
                self.fid_reference += f", bicubic (antialiased) to {size} px"
            self.inception.update(images, real=True)
        else:
            for start in range(0, len(self.reference_files), self.batch_size):
                chunk = self.reference_files[start:start + self.batch_size]
                self.inception.update(load_reference_images(chunk, size), real=True)
            formats = collections.Counter(p.suffix.lower().lstrip(".") for p in self.reference_files)
            self.fid_reference = (", ".join(f"{n} {ext}" for ext, n in sorted(formats.items()))
                                  + f" files, center-cropped, PIL bicubic to {size} px")
        self._fid_ref_size = size

    # -- one evaluation

    def start(self, vae=None, image_size: int | None = None, num_samples: int | None = None) -> "_Accumulator":
        """A fresh accumulator for one evaluation of ``num_samples`` images (computes references on first use).

        Raises:
            ValueError: ``num_samples`` < 2 with FD, FID or KID (they need a covariance or pairs).
        """
        needs_pairs = [m for m in ("fd", "fid", "kid") if m in self.metrics]
        if num_samples is not None and num_samples < 2 and needs_pairs:
            raise ValueError(f"{', '.join(needs_pairs)} need at least 2 generated images, got num_samples="
                             f"{num_samples}")
        return _Accumulator(self, vae, image_size, num_samples)


class _Accumulator:
    """Streams batches of generated images into every metric of a :class:`MetricSuite`."""

    def __init__(self, suite: MetricSuite, vae, image_size: int | None, num_samples: int | None = None):
        self.suite = suite
        self.count = 0
        self.toy_ref = suite._toy_reference(vae, num_samples) if "fd" in suite.metrics else None
        self.judge_stats = FeatureStats()
        self.acc_sums: dict[str, float] = {}
        self.clip = ScoreMean()
        self.hps = ScoreMean(scale=100.0)
        if suite.inception is not None:
            if image_size is None:
                raise ValueError("FID/KID need the generated image size to prepare the reference")
            suite._fid_reference(image_size)
            suite.inception.reset_fake()

    @torch.no_grad()
    def update(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict]) -> None:
        from .toy import judge_features, prompt_accuracy

        s, n = self.suite, len(images)
        images = images.float()  # a half-precision model's images meet float32 metric networks
        metrics = s.metrics
        if "fd" in metrics:
            self.judge_stats.update(judge_features(s.judge, images.to(s.device)).cpu())
        if "accuracy" in metrics:
            attrs = [m.get("attributes") for m in metadata]
            if any(a is None for a in attrs):
                raise ValueError("accuracy needs toy prompts with attributes in their metadata")
            for k, v in prompt_accuracy(s.judge, images.to(s.device), attrs).items():
                self.acc_sums[k] = self.acc_sums.get(k, 0.0) + v * n
        if s.clip is not None:
            self.clip.update(reward_scores(s.clip, images, prompts, s.batch_size))
        if s.hps is not None:
            self.hps.update(reward_scores(s.hps, images, prompts, s.batch_size), [m.get("style") for m in metadata])
        if s.inception is not None:
            s.inception.update(images, real=False)
        self.count += n

    def result(self) -> dict:
        s, out = self.suite, {}
        if "fd" in s.metrics:
            out["fd"] = fd_between(self.judge_stats, self.toy_ref.recon)
            out["fd_real"] = fd_between(self.judge_stats, self.toy_ref.real)
            out.update(self.toy_ref.floors)
        if "accuracy" in s.metrics:
            out.update({k: v / self.count for k, v in self.acc_sums.items()})
        if s.clip is not None:
            out["clip"] = self.clip.mean()
        if s.inception is not None:
            res = s.inception.compute()
            if "fid" in s.metrics:
                out["fid"] = res["fid"]
            if "kid" in s.metrics:
                out.update(kid=res["kid"], kid_std=res["kid_std"], kid_subset_size=res["kid_subset_size"])
            # the settings FID/KID figures depend on, so that a row says how it was measured
            out["fid_reference_num"] = res["num_real"]
            out["fid_reference"] = s.fid_reference  # file formats and resize: FID figures depend on both
            out["fid_antialias"] = s.inception.antialias  # false: TF-compatible bilinear resize to 299 px
            dtype = s.inception.inception_dtype
            out["inception_dtype"] = None if dtype is None else str(dtype).removeprefix("torch.")
        if s.hps is not None:
            out.update(self.hps.summary("hpsv2"))
        return out


# ----------------------------------------------------------------------------- evaluation


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolve_prompts(prompt_set, num_samples: int | None, tokenizer=None, per_style: int | None = None) -> PromptSet:
    """A :class:`PromptSet` from a spec string, a PromptSet, or a list of prompts / pairs."""
    if isinstance(prompt_set, PromptSet):
        return prompt_set
    if isinstance(prompt_set, (str, os.PathLike)):
        context = getattr(tokenizer, "model_max_length", None)  # the model's own (transformers: 1e30 if unset)
        max_tokens = context if context and context < 10**6 else CLIP_CONTEXT
        return load_prompt_set(str(prompt_set), num=num_samples, tokenizer=tokenizer, per_style=per_style,
                               max_tokens=max_tokens)
    items = [(p, {}) if isinstance(p, str) else (p[0], dict(p[1])) for p in prompt_set]
    if not items:
        raise ValueError("empty prompt list")
    return PromptSet(items, name="list")


def evaluate(model, sampler: str = "ddim", steps: int | None = None, prompt_set="toy",
             num_samples: int | None = None, seeds: int | Sequence[int] = 0, guidance: float | None = None,
             metrics: Sequence[str] | None = None, save_images_dir: str | os.PathLike | None = None,
             batch_size: int = 32, *, suite: MetricSuite | None = None, device: str | torch.device | None = None,
             clip=None, hps=None, inception=None, reference=None, reference_num: int = 1000,
             per_style: int | None = None, truncate: bool = False, gamma: float = 0.3, warmup: bool = True,
             progress: bool = True, name: str | None = None, fid_options: dict | None = None,
             resume_from: Sequence[dict] = ()) -> dict:
    """Generate ``num_samples`` images with one sampler setting and measure them: one row.

    Args:
        model: a diffusers pipeline folder, a loaded
            :class:`~lcm_lab.models.sd.LatentDiffusionModel`, or ``None`` (the toy teacher).
        sampler, steps, guidance, gamma: sampler settings (see :func:`lcm_lab.generation.generate`);
            ``guidance`` defaults to the toy teacher's 5.0.
        prompt_set: ``"toy"``, a text file, ``"hps:DIR"``, ``"coco:FILE"`` (see
            :func:`~lcm_lab.eval.prompts.load_prompt_set`), a :class:`~lcm_lab.eval.prompts.PromptSet`
            or a list of prompts / ``(prompt, metadata)`` pairs.
        num_samples: number of images (default: one per prompt). Image ``i`` uses prompt
            ``i % len(prompts)``.
        seeds: base seed (image ``i`` gets ``seeds + i``) or one seed per image.
        metrics: metric names (see the module docstring); ``None`` for the defaults.
        save_images_dir: write ``{index:05d}.png`` and ``captions.json`` there, once every image is done (they
            replace an earlier run's; other files stay).
        batch_size: images per sampler call.
        suite: a prepared :class:`MetricSuite` (shared across rows); otherwise one is built from
            ``metrics``, ``clip``, ``hps``, ``inception``, ``reference``, ``reference_num``,
            ``fid_options``.
        device: where the model runs (default CUDA when available).
        per_style: HPS prompts per style.
        truncate: truncate over-long prompts instead of failing.
        warmup: generate one untimed, unscored image first so ``sec_per_image`` excludes
            one-time costs.
        name: the ``model`` column (default: the folder path).
        resume_from: rows of an earlier run (e.g. :func:`read_rows`): one with this row's settings, the same
            prompt and seed for every image (``inputs_id``), every requested metric and the same
            ``metric_sources`` (references, weights) is returned as it is, without generating anything.

    Returns:
        ``{model, sampler, steps, guidance, num_samples, seed, prompt_set, <metrics>..., metric_sources,
        sec_per_image, inputs_id}`` (+ ``gamma`` for TCD, ``images_dir`` when images are saved);
        ``inputs_id``: see :func:`inputs_id`.
    """
    from ..generation import as_seeds, check_sampling, generate, sampling_grid
    from ..imaging import save_grid
    from ..models.sd import LatentDiffusionModel, check_prompts, load_ldm

    if guidance is None:
        from ..toy import TEACHER_GUIDANCE

        guidance = TEACHER_GUIDANCE
    if isinstance(model, LatentDiffusionModel):
        ldm = model
    else:
        check_sampling([model], [sampler], [steps] if steps is not None else None, guidance, gamma)
        ldm = load_ldm(model, device=device or _default_device())
    device = ldm.device
    # before the prompts and metrics are prepared
    steps, _ = sampling_grid(ldm.sampling_config, sampler, steps, guidance_scale=guidance, gamma=gamma,
                             schedule=ldm.schedule)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    pset = resolve_prompts(prompt_set, num_samples, ldm.tokenizer, per_style)
    n = len(pset) if num_samples is None else int(num_samples)
    if n < 1:
        raise ValueError(f"num_samples must be >= 1, got {n}")
    prompts = [pset[i % len(pset)][0] for i in range(n)]
    metadata = [pset[i % len(pset)][1] for i in range(n)]
    # fail before generating anything, not in the middle of the run
    check_prompts(ldm.tokenizer, sorted(set(prompts)), truncate=truncate,
                  fix=f"Shorten the prompts of {pset.name} or pass truncate=True (--truncate).")
    if not isinstance(seeds, Sequence) and getattr(seeds, "ndim", None) != 1:  # one base seed (int, numpy, 0-d)
        seed_list = [as_seeds([seeds])[0] + i for i in range(n)]
    else:
        seed_list = as_seeds(seeds)
        if len(seed_list) != n:
            raise ValueError(f"got {len(seed_list)} seeds for {n} images")

    toy = pset.name == "toy"
    if suite is None:
        suite = MetricSuite(metrics, toy=toy, device=device, clip=clip, hps=hps, inception=inception,
                            reference=reference, reference_num=reference_num, fid_options=fid_options)
    settings = {"model": name or str(ldm.path), "sampler": sampler, "steps": int(steps), "guidance": float(guidance),
                "num_samples": n, "seed": seed_list[0], "prompt_set": pset.name,
                **({"gamma": float(gamma)} if sampler == "tcd" else {})}
    inputs = inputs_id(prompts, seed_list)
    for old in resume_from:
        if (all(old.get(k) == v for k, v in settings.items()) and old.get("inputs_id") == inputs
                and all(m in old for m in suite.metrics) and old.get("metric_sources") == suite.sources):
            return dict(old)
    acc = suite.start(vae=ldm.vae, image_size=ldm.image_size, num_samples=n)
    kwargs = dict(sampler=sampler, steps=steps, guidance_scale=guidance, gamma=gamma, truncate=truncate,
                  progress=False, batch_size=batch_size)

    def run(images_dir: Path | None) -> float:
        """Generate and measure every image (saving them to ``images_dir``); returns the generation seconds."""
        if warmup:
            generate(ldm, prompts[:1], seed_list[:1], **kwargs)
        seconds = 0.0
        batches = range(0, n, batch_size)
        for start in tqdm(batches, desc=f"eval {sampler}-{steps}", disable=not progress, unit="batch"):
            chunk = slice(start, start + batch_size)
            _sync(device)
            t0 = time.perf_counter()
            images = generate(ldm, prompts[chunk], seed_list[chunk], **kwargs)
            _sync(device)
            seconds += time.perf_counter() - t0
            acc.update(images, prompts[chunk], metadata[chunk])
            if images_dir is not None:
                for j, image in enumerate(images.cpu()):
                    save_grid(image[None], images_dir / f"{start + j:05d}.png")
        if images_dir is not None:
            captions = [{"file": f"{i:05d}.png", "prompt": p, "seed": s, **m}
                        for i, (p, s, m) in enumerate(zip(prompts, seed_list, metadata))]
            (images_dir / "captions.json").write_text(json.dumps(captions, indent=1) + "\n")
        return seconds

    if save_images_dir is None:
        gen_seconds = run(None)
    else:  # into a temp folder inside it first: a failed run leaves an earlier run's images as they were
        out_dir = Path(save_images_dir)
        tmp = scratch_folder(out_dir, ".images")  # inside: the same filesystem, so the moves below are renames
        try:
            gen_seconds = run(tmp)
            new = {file.name for file in tmp.iterdir()}
            for file_name in sorted(new):
                os.replace(tmp / file_name, out_dir / file_name)
            for earlier in out_dir.glob("*.png"):  # an earlier, larger run's extra images would mix with these
                if earlier.name not in new and earlier.stem.isdigit() and len(earlier.stem) >= 5:
                    earlier.unlink()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    row = dict(settings)
    row.update(acc.result())
    row["metric_sources"] = suite.sources
    row["sec_per_image"] = gen_seconds / n
    row["inputs_id"] = inputs
    if save_images_dir is not None:
        row["images_dir"] = str(save_images_dir)
    return row
