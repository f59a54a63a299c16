"""FID and KID with InceptionV3 features, through torchmetrics, from a local weights file.

* FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local
  Nash Equilibrium"): Fréchet distance between Gaussian fits of the pool3 (2048-d) Inception
  features of real and generated images.
* KID (Bińkowski et al. 2018, "Demystifying MMD GANs"): unbiased MMD^2 with the cubic
  polynomial kernel ``k(x, y) = (x.y / d + 1)^3``, averaged over random subsets.

The feature extractor is torchmetrics' ``NoTrainInceptionV3`` (torch-fidelity's port of the
TensorFlow "2015-12-05" Inception graph used by the original FID code) with the weights file
``weights-inception-2015-12-05-6726825d.pth`` read from disk, never downloaded. The file is
looked up as: explicit argument, then ``$LCM_LAB_INCEPTION_WEIGHTS``, then
``torch.hub.get_dir()/checkpoints/`` (``$TORCH_HOME/hub/checkpoints``, default
``~/.cache/torch/hub/checkpoints``, where torch-fidelity itself caches it).

Numerical choices, stated because they change the numbers:

* **Resize: ``antialias=False`` by default.** Images are resized to 299 px with torch-fidelity's
  TensorFlow-1.x-compatible bilinear resize (no antialiasing), which reproduces the original
  TF FID code, torch-fidelity and torchmetrics < 1.8. torchmetrics >= 1.8 defaults to
  ``antialias=True`` (``F.interpolate(..., antialias=True)``), which gives different (for large
  downscaling, noticeably lower) values; pass ``antialias=True`` to get those instead. Compare
  numbers only when both sides used the same setting.
* **Quantisation:** float images in ``[0, 1]`` are rounded to uint8 (``round(255 x)``), as saving
  them to PNG does, so in-memory and on-disk evaluation agree. (torchmetrics'
  ``normalize=True`` truncates instead.)
* **float64:** Inception runs in float64 by default (what ``FrechetInceptionDistance.set_dtype
  (torch.float64)`` does, and what torchmetrics recommends since FID is numerically fragile),
  and the metric states and the final FID/KID computations are float64 (``set_dtype``). Pass
  ``inception_dtype=torch.float32`` for ~3x faster features on CPU; statistics stay float64.
* KID subsets are drawn with a fixed seed, so KID is deterministic given the features; the
  subset size is capped at the smaller set size (torch-fidelity's defaults: 100 subsets of 1000).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch

from ..imaging import unit_range
from ..readable import reading
from .frechet import FeatureStats, fd_between

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
INCEPTION_ENV = "LCM_LAB_INCEPTION_WEIGHTS"
FEATURE_DIMS = (64, 192, 768, 2048)
# A few keys every torch-fidelity InceptionV3 state dict has; used to reject wrong files early.
_INCEPTION_KEYS = ("Conv2d_1a_3x3.conv.weight", "Mixed_7c.branch_pool.conv.weight", "fc.weight")


def inception_weights_path(path: str | os.PathLike | None = None) -> Path:
    """Find the torch-fidelity InceptionV3 weights file.

    Looked up as: ``path`` (a file, or a folder holding the file), ``$LCM_LAB_INCEPTION_WEIGHTS``,
    ``torch.hub.get_dir()/checkpoints/`` (``$TORCH_HOME/hub/checkpoints``). A path given
    explicitly or through the environment variable must exist; there is no fall-through from a
    wrong explicit path to the cache.

    Raises:
        FileNotFoundError: naming the file, where it is published and the environment variable.
    """
    if path is not None and str(path) != "":
        where, candidate = "the given path", Path(path).expanduser()
    elif os.environ.get(INCEPTION_ENV):
        where, candidate = f"${INCEPTION_ENV}", Path(os.environ[INCEPTION_ENV]).expanduser()
    else:
        where, candidate = "the torch hub cache", Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if candidate.is_dir():
        candidate = candidate / INCEPTION_FILE
    if candidate.is_file():
        return candidate
    raise FileNotFoundError(
        f"InceptionV3 weights {INCEPTION_FILE} not found ({where}: {candidate}). It is published at "
        f"{INCEPTION_URL}; download it once and pass its path (--inception PATH / weights=...), set the "
        f"environment variable {INCEPTION_ENV}, or put it in $TORCH_HOME/hub/checkpoints/ "
        f"(default ~/.cache/torch/hub/checkpoints/). Nothing is downloaded automatically.")


def load_inception(weights: str | os.PathLike | None = None, feature: int = 2048, antialias: bool = False,
                   device: str | torch.device = "cpu", dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    """torchmetrics' ``NoTrainInceptionV3`` with weights from a local file.

    Args:
        weights: the weights file (see :func:`inception_weights_path` for the lookup order).
        feature: which features to return: 64, 192, 768 or 2048 (pool3, the FID standard).
        antialias: resize with antialiasing (torchmetrics >= 1.8 default) instead of the TF-1.x
            compatible bilinear resize of the original FID code (default, see the module docstring).
        device, dtype: where and in which precision the network runs.

    Returns:
        a module mapping uint8 images ``(B, 3, H, W)`` to ``(B, feature)`` features in ``dtype``.

    Raises:
        FileNotFoundError: no weights file; ValueError: not an InceptionV3 state dict.
    """
    from torchmetrics.image.fid import NoTrainInceptionV3

    if feature not in FEATURE_DIMS:
        raise ValueError(f"feature must be one of {FEATURE_DIMS}, got {feature!r}")
    path = inception_weights_path(weights)
    # A safe (weights_only) load first: it rejects pickled code and wrong files with a clear
    # message before torch-fidelity loads the file again with weights_only=False.
    with reading(path, "Inception weights"):
        state = torch.load(path, map_location="cpu", weights_only=True)
    missing = [k for k in _INCEPTION_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"{path} is not a torch-fidelity InceptionV3 state dict (lacks {', '.join(missing)}); "
                         f"expected {INCEPTION_FILE} from {INCEPTION_URL}")
    del state
    with reading(path, "Inception weights"):  # the three keys above can hide wrong shapes or missing layers
        net = NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(feature)],
                                 feature_extractor_weights_path=str(path), antialias=antialias)
    net = net.to(device=device, dtype=dtype)
    net._dtype = dtype  # read by torchmetrics' forward to cast the uint8 input (as set_dtype does)
    net.requires_grad_(False)
    net.num_features = feature
    return net


def to_uint8_tensor(images: torch.Tensor) -> torch.Tensor:
    """Float images in ``[0, 1]`` -> uint8 ``round(255 x)`` (what PNG files hold); uint8 passes through."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images
    images = unit_range(images.detach().float(), "images", "convert [-1, 1] images with x / 2 + 0.5")
    return (images * 255).round().to(torch.uint8)


class _Features(torch.nn.Module):
    """Identity 'feature extractor' handed to the torchmetrics metrics.

    Features are computed once by :class:`InceptionMetrics` and fed to both FID and KID, so
    Inception runs once per image instead of once per metric.
    """

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@contextlib.contextmanager
def _seeded(seed: int):
    # manual_seed also reseeds every CUDA generator: fork (and restore) those too.
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class InceptionMetrics:
    """FID and KID of generated ("fake") images against real ones, via torchmetrics.

    Real statistics survive :meth:`reset_fake`, so one reference set serves many evaluations.

    Args:
        weights: InceptionV3 weights file (see :func:`inception_weights_path`).
        feature: Inception feature layer (2048 = pool3, the standard).
        antialias: resize mode, see the module docstring (default ``False``: TF-compatible).
        kid_subsets, kid_subset_size: KID's subset count and size (torch-fidelity defaults 100,
            1000); the size is capped at the smaller set.
        kid_seed: seed of KID's subset sampling.
        device: where Inception and the statistics live.
        inception_dtype: precision of the Inception forward (float64 default, see above).
        batch_size: images per Inception forward.
        kid: also keep features for KID (memory: ``N x feature`` float64 per set).

    Example::

        metrics = InceptionMetrics("weights-inception-2015-12-05-6726825d.pth", device="cuda")
        metrics.update(real_images, real=True)      # [0, 1] floats or uint8, any size
        metrics.update(fake_images, real=False)
        metrics.compute()   # {"fid": ..., "kid": ..., "kid_std": ..., "num_real": ..., "num_fake": ...}
    """

    def __init__(self, weights: str | os.PathLike | None = None, feature: int = 2048, antialias: bool = False,
                 kid_subsets: int = 100, kid_subset_size: int = 1000, kid_seed: int = 0,
                 device: str | torch.device = "cpu", inception_dtype: torch.dtype = torch.float64,
                 batch_size: int = 50, kid: bool = True, inception: torch.nn.Module | None = None):
        self.device = torch.device(device)
        self.feature = feature
        self.antialias = antialias
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.kid_subsets = int(kid_subsets)
        self.kid_subset_size = int(kid_subset_size)
        self.kid_seed = int(kid_seed)
        # the file the weights came from (env var or cache resolved), what a result depends on
        self.checkpoint = None if inception is not None else inception_weights_path(weights)
        self.inception = inception if inception is not None else load_inception(
            self.checkpoint, feature, antialias, self.device, inception_dtype)
        self._fid = self._make_fid()
        self._kid = self._make_kid() if kid else None

    def _make_fid(self):
        from torchmetrics.image.fid import FrechetInceptionDistance

        fid = FrechetInceptionDistance(feature=_Features(self.feature), reset_real_features=False)
        return fid.set_dtype(torch.float64).to(self.device)

    def _make_kid(self):
        from torchmetrics.image.kid import KernelInceptionDistance

        with warnings.catch_warnings():  # "KID keeps all features in memory": known and intended
            warnings.simplefilter("ignore", UserWarning)
            kid = KernelInceptionDistance(feature=_Features(self.feature), subsets=self.kid_subsets,
                                          subset_size=self.kid_subset_size, reset_real_features=False)
        return kid.set_dtype(torch.float64).to(self.device)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Inception features ``(B, feature)`` float64 of images in ``[0, 1]`` (or uint8)."""
        out = [self.inception(to_uint8_tensor(chunk).to(self.device)).to(torch.float64)
               for chunk in images.split(self.batch_size)]
        return torch.cat(out) if out else torch.zeros(0, self.feature, dtype=torch.float64, device=self.device)

    def update(self, images: torch.Tensor, real: bool) -> None:
        """Add a batch of real or generated images (``[0, 1]`` floats or uint8, ``(B, 3, H, W)``)."""
        self.update_features(self.features(images), real)

    def update_features(self, features: torch.Tensor, real: bool) -> None:
        """Add precomputed Inception features ``(B, feature)``."""
        if len(features) == 0:
            return
        feats = features.to(self.device, torch.float64)
        self._fid.update(feats, real=real)
        if self._kid is not None:
            self._kid.update(feats, real=real)

    @property
    def inception_dtype(self) -> torch.dtype | None:
        """Precision of the Inception forward: that of its weights (None for a module without any)."""
        return next((p.dtype for p in self.inception.parameters()), None)

    @property
    def num_real(self) -> int:
        """Real images accumulated so far."""
        return int(self._fid.real_features_num_samples)

    @property
    def num_fake(self) -> int:
        """Generated images accumulated so far."""
        return int(self._fid.fake_features_num_samples)

    def compute(self) -> dict[str, float]:
        """``{"fid", "kid", "kid_std", "kid_subset_size", "num_real", "num_fake"}`` (KID keys only
        when KID is kept).

        Raises:
            ValueError: fewer than 2 real or 2 generated images (no covariance).
        """
        n_real, n_fake = self.num_real, self.num_fake
        if n_real < 2 or n_fake < 2:
            raise ValueError(f"FID/KID need at least 2 real and 2 generated images, got {n_real} real and "
                             f"{n_fake} generated")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            out = {"fid": float(self._fid.compute())}
            if self._kid is not None:
                size = min(self.kid_subset_size, n_real, n_fake)
                self._kid.subset_size = size
                with _seeded(self.kid_seed):
                    mean, std = self._kid.compute()
                out.update({"kid": float(mean), "kid_std": float(std), "kid_subset_size": size})
        out.update({"num_real": n_real, "num_fake": n_fake})
        return out

    def reset_fake(self) -> None:
        """Forget the generated images, keep the real statistics."""
        self._fid.reset()
        if self._kid is not None:
            self._kid.reset()

    def reset(self) -> None:
        """Forget everything (real and generated)."""
        self._fid = self._make_fid()
        self._kid = self._make_kid() if self._kid is not None else None


def fid_kid(real: torch.Tensor | Iterable[torch.Tensor], fake: torch.Tensor | Iterable[torch.Tensor],
            weights: str | os.PathLike | None = None, **kwargs) -> dict[str, float]:
    """FID and KID between two image sets (tensors or iterables of batches, ``[0, 1]`` or uint8).

    Keyword arguments go to :class:`InceptionMetrics`.
    """
    metrics = InceptionMetrics(weights, **kwargs)
    for real_flag, images in ((True, real), (False, fake)):
        for batch in ([images] if isinstance(images, torch.Tensor) else images):
            metrics.update(batch, real=real_flag)
    return metrics.compute()


class FeatureFD:
    """Fréchet distance in the feature space of any network (FD_DINOv2, toy-judge FD, ...).

    Args:
        extractor: module mapping images ``(B, 3, H, W)`` in ``[0, 1]`` to features ``(B, D)``.
        batch_size: images per forward.
        device: where the extractor runs (default: its parameters' device).

    Statistics are accumulated in float64 (:class:`~lcm_lab.eval.frechet.FeatureStats`) and the
    distance is :func:`~lcm_lab.eval.frechet.fd_between` (eigenvalue form, validated against
    scipy); the real statistics survive :meth:`reset_fake`.
    """

    def __init__(self, extractor: torch.nn.Module, batch_size: int = 64, device: str | torch.device | None = None):
        self.extractor = extractor
        self.batch_size = int(batch_size)
        if device is None:
            param = next(iter(extractor.parameters()), None)
            device = param.device if param is not None else "cpu"
        self.device = torch.device(device)
        self.real = FeatureStats()
        self.fake = FeatureStats()

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Extractor features ``(B, D)`` float64 on the CPU."""
        out = []
        for chunk in images.split(self.batch_size):
            f = self.extractor(chunk.to(self.device))
            out.append(f.reshape(len(chunk), -1).to(torch.float64).cpu())
        return torch.cat(out)

    def update(self, images: torch.Tensor, real: bool) -> None:
        """Add a batch of real or generated images in ``[0, 1]``."""
        (self.real if real else self.fake).update(self.features(images))

    def compute(self) -> float:
        """The Fréchet distance between the real and generated feature Gaussians.

        Raises:
            ValueError: fewer than 2 real or 2 generated images.
        """
        if self.real.num < 2 or self.fake.num < 2:
            raise ValueError(f"FD needs at least 2 real and 2 generated images, got {self.real.num} real and "
                             f"{self.fake.num} generated")
        return fd_between(self.real, self.fake)

    def reset_fake(self) -> None:
        """Forget the generated images, keep the real statistics."""
        self.fake = FeatureStats()
