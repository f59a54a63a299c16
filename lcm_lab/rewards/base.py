"""The reward-model interface, shared image preprocessing, the registry and weighted sums.

Every reward model in :mod:`lcm_lab.rewards` maps a batch of images and their prompts to
one score per image::

    scores = reward(images, prompts)   # images (B, 3, H, W) in [0, 1], prompts: list of B str
                                       # -> scores (B,) float32

Differentiable rewards (CLIP score, HPSv2, PickScore, the aesthetic predictor, ImageReward,
toy-clip) let gradients flow from the score back to the images, which is what reward-guided
latent consistency distillation (RG-LCD, Li et al. 2024, "Reward Guided Latent Consistency
Distillation") needs. The reward networks themselves are frozen: their parameters never
require gradients and they stay in eval mode, and text features are computed without
gradients (only the image branch is differentiated).

Rewards are looked up by name in :data:`REGISTRY` (:func:`load_reward`) and combined into
weighted sums (:class:`WeightedReward`, :func:`parse_reward_spec`), e.g.
``parse_reward_spec("1.0*hpsv2+0.1*imagereward")``.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

RESIZE_MODES = ("shortest", "longest", "squash")


# ----------------------------------------------------------------------------- preprocessing


def _resized_size(height: int, width: int, size: int, resize_mode: str) -> tuple[int, int]:
    """Output (height, width) of the resize step, following torchvision / open_clip rounding."""
    if resize_mode == "squash":
        return size, size
    if resize_mode == "shortest":
        # torchvision ``Resize(int)``: the short side becomes ``size``, the long side is truncated.
        if width <= height:
            return int(size * height / width), size
        return size, int(size * width / height)
    # "longest": the long side becomes ``size`` (HPSv2's ``ResizeMaxSize`` rounding).
    scale = size / max(height, width)
    return round(height * scale), round(width * scale)


def preprocess_images(images: torch.Tensor, size: int, mean: Sequence[float] = OPENAI_CLIP_MEAN,
                      std: Sequence[float] = OPENAI_CLIP_STD, resize_mode: str = "shortest",
                      interpolation: str = "bicubic", antialias: bool = True,
                      fill: float = 0.0) -> torch.Tensor:
    """Differentiable CLIP-style preprocessing: resize, center crop (or pad), normalise.

    The torch counterpart of the PIL/torchvision transforms the reward models were trained
    with (CLIP's ``Resize(size, BICUBIC) -> CenterCrop(size) -> Normalize(mean, std)``), so
    that gradients flow from a reward back to the pixels.

    Args:
        images: ``(B, 3, H, W)`` float images in ``[0, 1]``. They are not clamped (clamping
            would zero the gradient of out-of-range pixels).
        size: side of the square model input.
        mean, std: per-channel normalisation statistics (default: OpenAI CLIP's).
        resize_mode: ``"shortest"`` (the short side becomes ``size``, then a center crop:
            CLIP, PickScore, ImageReward, the aesthetic predictor), ``"longest"`` (the long
            side becomes ``size``, then the short side is padded symmetrically with ``fill``:
            HPSv2's ``ResizeMaxSize``) or ``"squash"`` (resize to ``size x size``). For square
            images all three agree.
        interpolation: ``"bicubic"`` (default, as CLIP) or ``"bilinear"``.
        antialias: the resize is done with ``torch.nn.functional.interpolate``, by default with
            antialiasing when it downscales, like PIL (which the original models were published
            with) and torchvision's tensor ``Resize`` since torchvision 0.17. It stays
            differentiable, and every pixel gets gradient: without it, a 1024 -> 224 px bicubic
            resize reads only a grid of the pixels, and a reward's gradient reaches no others.
            A deliberate difference from RG-LCD's reference code, which pins torchvision 0.16.2,
            whose tensor ``Resize`` does not antialias; each resizing reward's ``antialias=False`` (e.g.
            through RG-LCD's ``reward_kwargs``) resizes as it does.
        fill: padding value (in ``[0, 1]`` pixel units, before normalisation) of ``"longest"``.

    Returns:
        ``(B, 3, size, size)`` float32 tensor: the normalised model input.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    if resize_mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize_mode {resize_mode!r}; expected one of {RESIZE_MODES}")
    if interpolation not in ("bicubic", "bilinear"):
        raise ValueError(f"unknown interpolation {interpolation!r}; expected 'bicubic' or 'bilinear'")
    x = images.float()
    height, width = x.shape[-2:]
    new_h, new_w = _resized_size(height, width, int(size), resize_mode)
    if (new_h, new_w) != (height, width):
        x = F.interpolate(x, size=(new_h, new_w), mode=interpolation, align_corners=False, antialias=antialias)
    if resize_mode == "longest":
        pad_h, pad_w = size - new_h, size - new_w
        if pad_h or pad_w:
            x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=fill)
    elif (new_h, new_w) != (size, size):
        # torchvision ``CenterCrop`` offsets.
        top = int(round((new_h - size) / 2.0))
        left = int(round((new_w - size) / 2.0))
        x = x[..., top:top + size, left:left + size]
    mean_t = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean_t) / std_t


class ImagePreprocessor(torch.nn.Module):
    """A module form of :func:`preprocess_images` holding one model's input settings.

    Args:
        size: side of the square model input.
        mean, std: normalisation statistics (default: OpenAI CLIP's).
        resize_mode, interpolation, antialias, fill: see :func:`preprocess_images`.
    """

    def __init__(self, size: int, mean: Sequence[float] = OPENAI_CLIP_MEAN, std: Sequence[float] = OPENAI_CLIP_STD,
                 resize_mode: str = "shortest", interpolation: str = "bicubic", antialias: bool = True,
                 fill: float = 0.0):
        super().__init__()
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"unknown resize_mode {resize_mode!r}; expected one of {RESIZE_MODES}")
        self.size = int(size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.resize_mode = resize_mode
        self.interpolation = interpolation
        self.antialias = bool(antialias)
        self.fill = float(fill)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return preprocess_images(images, self.size, self.mean, self.std, self.resize_mode, self.interpolation,
                                 self.antialias, self.fill)

    def extra_repr(self) -> str:
        return (f"size={self.size}, mean={self.mean}, std={self.std}, resize_mode={self.resize_mode!r}, "
                f"interpolation={self.interpolation!r}, antialias={self.antialias}")


# ----------------------------------------------------------------------------- base class


class RewardModel(torch.nn.Module):
    """Base class of reward models: ``forward(images, prompts) -> scores``.

    Attributes:
        name: registry name of the reward (e.g. ``"hpsv2"``).
        differentiable: whether scores can be differentiated w.r.t. the images.
        input_size: side of the square input the underlying network sees (``None`` when the
            model takes images of any size).

    Subclasses implement :meth:`score` on validated inputs and call :meth:`freeze` once their
    networks are built. Reward models stay in eval mode: :meth:`train` is a no-op, so a
    reward embedded in a training module never turns its dropout on.
    """

    name: str = "reward"
    differentiable: bool = True
    input_size: int | None = None
    uses_prompts: bool = True

    def freeze(self) -> "RewardModel":
        """Put every sub-network in eval mode and stop its parameters from requiring grad."""
        self.requires_grad_(False)
        super().train(False)
        return self

    def train(self, mode: bool = True) -> "RewardModel":  # noqa: D102 - documented in the class
        return super().train(False)

    @property
    def device(self) -> torch.device:
        for tensor in self.parameters():
            return tensor.device
        for tensor in self.buffers():
            return tensor.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        for tensor in self.parameters():
            return tensor.dtype
        return torch.float32

    def check_inputs(self, images: torch.Tensor, prompts: Sequence[str] | None) -> list[str] | None:
        """Validate shapes and return ``prompts`` as a list (``None`` stays ``None``)."""
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"{self.name}: expected images of shape (B, 3, H, W) in [0, 1], got {shape}")
        if images.shape[0] == 0:
            raise ValueError(f"{self.name}: no images to score (an empty batch)")
        if not images.is_floating_point():  # e.g. uint8 from torchvision.io.read_image: 0..255 would be scored
            raise ValueError(f"{self.name}: expected float images in [0, 1], got {images.dtype} "
                             "(divide uint8 images by 255)")
        if prompts is None:
            if self.uses_prompts:
                raise ValueError(f"{self.name}: prompts are required (one string per image)")
            return None
        if isinstance(prompts, str):
            raise ValueError(f"{self.name}: prompts must be a list of strings, one per image, not a single string")
        prompts = list(prompts)
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{self.name}: got {images.shape[0]} images but {len(prompts)} prompts")
        if not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"{self.name}: prompts must be strings")
        return prompts

    def check_prompt_list(self, prompts: Sequence[str]) -> list[str]:
        """``prompts`` as a non-empty list of strings (for :meth:`score_matrix`)."""
        if isinstance(prompts, str) or not len(prompts) or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"{self.name}: prompts must be a non-empty list of strings")
        return list(prompts)

    def forward(self, images: torch.Tensor, prompts: Sequence[str] | None = None) -> torch.Tensor:
        """Score a batch.

        Args:
            images: ``(B, 3, H, W)`` float images in ``[0, 1]``, on any device.
            prompts: ``B`` prompts (ignored by prompt-free rewards, which also accept ``None``).

        Returns:
            ``(B,)`` float32 scores on the images' device; differentiable w.r.t. ``images``
            when :attr:`differentiable` is true.
        """
        prompts = self.check_inputs(images, prompts)
        scores = self.score(images, prompts)
        return scores.reshape(images.shape[0]).float().to(images.device)

    def score(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        """The model's raw scores of checked inputs (each subclass implements it); call the module instead,
        which checks ``images``/``prompts`` first and returns float32 ``(B,)``."""
        raise NotImplementedError

    def score_matrix(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Every image against every prompt: ``(n_images, n_prompts)`` float32 with
        ``[i, j] = reward(images[i], prompts[j])``.

        The default scores all ``n_images * n_prompts`` pairs with :meth:`forward` (prompt-free
        rewards score each image once); embedding models override it with one product of
        image and text features.
        """
        self.check_inputs(images, None if not self.uses_prompts else ["" for _ in range(images.shape[0])])
        prompts = self.check_prompt_list(prompts)
        n, m = images.shape[0], len(prompts)
        if not self.uses_prompts:
            return self(images).unsqueeze(1).expand(n, m)
        # one image against all prompts per call: memory stays that of an m-image batch
        return torch.stack([self(image.unsqueeze(0).expand(m, -1, -1, -1), prompts) for image in images])

    def extra_repr(self) -> str:
        return f"name={self.name!r}, differentiable={self.differentiable}, input_size={self.input_size}"


def float32_head(head: torch.nn.Module, features: torch.Tensor) -> torch.Tensor:
    """``head(features)`` in float32 with autocast off, as the reference scorers run their small heads
    (the aesthetic MLP, ImageReward's MLP) whatever the backbone's dtype or a caller's mixed precision.
    Casting the input alone would not do: autocast would still run the head's linears in half precision.
    The latent reward model's towers run this way too."""
    with torch.autocast(features.device.type, enabled=False):
        return head(features.float())


# ----------------------------------------------------------------------------- weight files


def resolve_weights(value: str | os.PathLike | None, env_var: str) -> Path | None:
    """The path given as an argument, else the one in ``$env_var``, else ``None``."""
    if value is None or value == "":
        value = os.environ.get(env_var) or None
    return None if value is None else Path(value).expanduser()


def missing_weights(what: str, filename: str, source: str, argument: str, env_var: str,
                    tried: str | os.PathLike | None = None) -> FileNotFoundError:
    """A FileNotFoundError saying which file is missing, where it is published and how to pass it."""
    where = f"{tried} does not exist or lacks it" if tried is not None else "no path was given"
    return FileNotFoundError(
        f"{what}: weights file {filename} not found ({where}). It is published at {source}; download it "
        f"once (for Hugging Face repos: `huggingface-cli download <repo> --local-dir DIR`) and pass its path "
        f"with `{argument}=...` or set the environment variable {env_var}. Nothing is downloaded automatically.")


# ----------------------------------------------------------------------------- registry


REGISTRY: dict[str, Callable[..., RewardModel]] = {}


def register(name: str) -> Callable:
    """Class decorator adding a reward-model class (or factory) to :data:`REGISTRY` as ``name``.

    The class's :attr:`RewardModel.name` is set to ``name`` when it has none of its own.
    """
    key = name.strip().lower()
    if not re.fullmatch(r"[a-z][a-z0-9_.\-]*", key):
        raise ValueError(f"invalid reward name {name!r}: use letters, digits, '_', '.', '-'")

    def decorator(factory):
        existing = REGISTRY.get(key)
        if existing is not None and existing is not factory:
            raise ValueError(f"reward name {key!r} is already registered to {existing!r}")
        REGISTRY[key] = factory
        if isinstance(factory, type) and "name" not in vars(factory):
            factory.name = key
        return factory

    return decorator


def available_rewards() -> list[str]:
    """Sorted names of the registered rewards."""
    return sorted(REGISTRY)


def load_reward(name: str, **kwargs) -> RewardModel:
    """Build the reward registered as ``name`` (case-insensitive) with ``kwargs``.

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    key = str(name).strip().lower()
    if key not in REGISTRY:
        raise ValueError(f"unknown reward {name!r}; known rewards: {', '.join(available_rewards())}")
    return REGISTRY[key](**kwargs)


# ----------------------------------------------------------------------------- weighted sums


class WeightedReward(RewardModel):
    """A weighted sum of reward models: ``sum_i w_i * r_i(images, prompts)``.

    Args:
        models_and_weights: ``(reward_model, weight)`` pairs.

    :attr:`differentiable` is true only if every part is. :meth:`components` returns the
    unweighted per-model scores as a ``(B, n)`` tensor (like TRL's ``_calculate_rewards``),
    and ``forward(..., return_components=True)`` returns both.
    """

    def __init__(self, models_and_weights: Iterable[tuple[RewardModel, float]]):
        super().__init__()
        pairs = list(models_and_weights)
        if not pairs:
            raise ValueError("WeightedReward needs at least one (model, weight) pair")
        for pair in pairs:
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[0], RewardModel)):
                raise ValueError(f"expected (RewardModel, weight) pairs, got {pair!r}")
        weights = [float(w) for _, w in pairs]
        if not all(math.isfinite(w) for w in weights):
            raise ValueError(f"weights must be finite, got {weights}")
        self.models = torch.nn.ModuleList([m for m, _ in pairs])
        self.weights = tuple(weights)
        self.differentiable = all(m.differentiable for m in self.models)
        self.uses_prompts = any(m.uses_prompts for m in self.models)
        self.name = "+".join(f"{w:g}*{m.name}" for m, w in zip(self.models, self.weights))
        self.freeze()

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.models]

    def components(self, images: torch.Tensor, prompts: Sequence[str] | None = None) -> torch.Tensor:
        """Unweighted scores of every part, ``(B, n)`` float32 (column ``i`` = model ``i``)."""
        prompts = self.check_inputs(images, prompts)
        return torch.stack([m(images, prompts) for m in self.models], dim=1)

    def forward(self, images: torch.Tensor, prompts: Sequence[str] | None = None,
                return_components: bool = False):
        """Weighted sum ``(B,)``; with ``return_components=True``, ``(sum, components (B, n))``."""
        parts = self.components(images, prompts)
        weights = torch.tensor(self.weights, dtype=parts.dtype, device=parts.device)
        total = parts @ weights
        return (total, parts) if return_components else total

    def score_matrix(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Weighted sum of the parts' :meth:`RewardModel.score_matrix`."""
        return sum(w * m.score_matrix(images, prompts) for m, w in zip(self.models, self.weights))


_NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_TERM = re.compile(rf"\s*(?:(?P<weight>{_NUMBER})\s*\*\s*)?(?P<name>[A-Za-z][A-Za-z0-9_.\-]*)\s*")


def parse_reward_terms(spec: str) -> list[tuple[float, str]]:
    """Parse ``"w1*name1 + w2*name2 + ..."`` into ``[(w1, "name1"), ...]`` without loading anything.

    A term without ``w*`` has weight 1. Weights may be negative (``-0.5*jpeg-compressibility``)
    or use exponents (``1e-2*clip``). Names are lower-cased; they are not checked against the
    registry here.

    Raises:
        ValueError: empty or malformed spec, non-finite weight or a name given twice.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"empty reward spec {spec!r}; expected e.g. '1.0*hpsv2+0.1*imagereward'")
    terms: list[tuple[float, str]] = []
    pos = 0
    while True:
        match = _TERM.match(spec, pos)
        if match is None:
            raise ValueError(f"malformed reward spec {spec!r} at position {pos} ({spec[pos:]!r}): expected "
                             "'[weight*]name' terms joined by '+', e.g. '1.0*hpsv2+0.1*imagereward'")
        weight = 1.0 if match.group("weight") is None else float(match.group("weight"))
        name = match.group("name").lower()
        if not math.isfinite(weight):
            raise ValueError(f"reward spec {spec!r}: weight of {name!r} is not finite")
        if any(n == name for _, n in terms):
            raise ValueError(f"reward spec {spec!r} names {name!r} twice; add the weights into one term")
        terms.append((weight, name))
        pos = match.end()
        if pos == len(spec):
            return terms
        if spec[pos] != "+":
            raise ValueError(f"malformed reward spec {spec!r} at position {pos} ({spec[pos:]!r}): expected "
                             "'+' between terms, e.g. '1.0*hpsv2+0.1*imagereward'")
        pos += 1


def parse_reward_spec(spec: str, model_kwargs: Mapping[str, Mapping] | None = None,
                      **common_kwargs) -> WeightedReward:
    """Build a :class:`WeightedReward` from a spec such as ``"1.0*hpsv2+0.1*imagereward"``.

    Args:
        spec: ``[weight*]name`` terms joined by ``+`` (see :func:`parse_reward_terms`).
        model_kwargs: per-reward constructor arguments, keyed by reward name, e.g.
            ``{"hpsv2": {"checkpoint": "HPS_v2.1_compressed.pt"}, "imagereward": {"clip_max": 2.0}}``.
        **common_kwargs: arguments passed to every reward (typically ``device=...`` and
            ``dtype=...``, which every registered reward accepts); per-model arguments take
            precedence.

    Raises:
        ValueError: malformed spec, unknown reward name, or ``model_kwargs`` naming a reward
            that is not in the spec.
    """
    terms = parse_reward_terms(spec)
    bad = [k for k, v in (model_kwargs or {}).items() if not isinstance(v, Mapping)]
    if bad:
        raise ValueError(f"model_kwargs maps each reward name to its keyword arguments (a dict), e.g. "
                         f"{{'imagereward': {{'clip_max': 2.0}}}}; got {(model_kwargs or {})[bad[0]]!r} for {bad[0]!r}")
    model_kwargs = {str(k).lower(): dict(v) for k, v in (model_kwargs or {}).items()}
    unused = sorted(set(model_kwargs) - {name for _, name in terms})
    if unused:
        raise ValueError(f"model_kwargs given for {unused}, which the spec {spec!r} does not use")
    unknown = [name for _, name in terms if name not in REGISTRY]
    if unknown:
        raise ValueError(f"reward spec {spec!r}: unknown reward(s) {unknown}; known rewards: "
                         f"{', '.join(available_rewards())}")
    pairs = [(load_reward(name, **{**common_kwargs, **model_kwargs.get(name, {})}), weight) for weight, name in terms]
    return WeightedReward(pairs)
