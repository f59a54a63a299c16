"""Fréchet distance between Gaussian fits of two feature sets (Heusel et al. 2017).

FD = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1^{1/2} S2 S1^{1/2})^{1/2}).
The trace of the matrix square root is computed from the eigenvalues of the symmetric
PSD matrix S1^{1/2} S2 S1^{1/2} in float64, which avoids the complex round-off of a
general ``sqrtm(S1 @ S2)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class FeatureStats:
    """Running mean and covariance of features, accumulated in float64."""

    num: int = 0
    total: torch.Tensor | None = None
    outer: torch.Tensor | None = None

    def update(self, features: torch.Tensor) -> None:
        """Add a batch of features ``(N, ...)`` (flattened per sample, accumulated in float64)."""
        f = features.detach().to(torch.float64).reshape(len(features), -1)
        if self.total is None:
            self.total = torch.zeros(f.shape[1], dtype=torch.float64)
            self.outer = torch.zeros(f.shape[1], f.shape[1], dtype=torch.float64)
        self.num += len(f)
        self.total += f.sum(0)
        self.outer += f.t() @ f

    @classmethod
    def of(cls, features: torch.Tensor) -> "FeatureStats":
        """The statistics of one tensor of features."""
        stats = cls()
        stats.update(features)
        return stats

    def mean_cov(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and unbiased covariance (float64) of everything added so far."""
        if self.num < 2:
            raise ValueError(f"need at least 2 samples for a covariance, got {self.num}")
        mu = self.total / self.num
        cov = (self.outer - self.num * torch.outer(mu, mu)) / (self.num - 1)
        return mu, cov


def _sqrt_psd(mat: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh((mat + mat.t()) / 2)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.t()


def frechet_distance(mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor) -> float:
    """Fréchet distance between N(mu1, cov1) and N(mu2, cov2), in float64."""
    mu1, cov1, mu2, cov2 = (t.to(torch.float64) for t in (mu1, cov1, mu2, cov2))
    root1 = _sqrt_psd(cov1)
    cross = torch.linalg.eigvalsh(root1 @ cov2 @ root1).clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + cov1.trace() + cov2.trace() - 2 * cross)


def fd_between(a: FeatureStats | torch.Tensor, b: FeatureStats | torch.Tensor) -> float:
    """Fréchet distance between two feature sets (tensors [N, D] or accumulated stats)."""
    sa = a if isinstance(a, FeatureStats) else FeatureStats.of(a)
    sb = b if isinstance(b, FeatureStats) else FeatureStats.of(b)
    return frechet_distance(*sa.mean_cov(), *sb.mean_cov())
