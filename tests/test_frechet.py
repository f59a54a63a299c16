"""Fréchet distance against an independent float64 scipy computation."""

import numpy as np
import pytest
import scipy.linalg
import torch

from lcm_lab.eval.frechet import FeatureStats, fd_between


def _scipy_fd(a: np.ndarray, b: np.ndarray) -> float:
    m1, m2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_matches_scipy_and_streaming():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(600, 24))
    b = rng.normal(size=(500, 24)) @ rng.normal(size=(24, 24)) * 0.4 + 0.2
    ref = _scipy_fd(a, b)
    assert fd_between(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(ref, rel=1e-6)
    stats = FeatureStats()
    for chunk in np.array_split(a, 7):  # accumulating in chunks gives the same statistics
        stats.update(torch.from_numpy(chunk).float())
    assert fd_between(stats, torch.from_numpy(b)) == pytest.approx(ref, rel=1e-4)


def test_zero_for_same_set_and_grows_with_shift():
    x = torch.randn(400, 16, generator=torch.Generator().manual_seed(1))
    assert abs(fd_between(x, x)) < 1e-9
    fds = [fd_between(x, x + s) for s in (0.1, 0.3, 1.0)]
    assert fds == sorted(fds)
    assert fds[-1] == pytest.approx(16.0, rel=1e-6)  # a pure mean shift adds ||delta||^2


def test_needs_two_samples():
    with pytest.raises(ValueError, match="at least 2"):
        fd_between(torch.randn(1, 4), torch.randn(5, 4))
