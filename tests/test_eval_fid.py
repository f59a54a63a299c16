"""FID / KID through torchmetrics with an InceptionV3 loaded from a local file in torch-fidelity's
format (random weights here), the weights lookup and its errors, and the generic FeatureFD."""

import math

import pytest
import torch

from lcm_lab.eval import fid as fidmod
from lcm_lab.eval.fid import (INCEPTION_ENV, INCEPTION_FILE, FeatureFD, InceptionMetrics, fid_kid,
                              inception_weights_path, load_inception)
from lcm_lab.eval.frechet import fd_between

pytestmark = pytest.mark.usefixtures("single_thread_torch")


def random_inception_state_dict(seed: int = 0) -> dict:
    """A random InceptionV3 state dict with exactly torch-fidelity's keys and shapes.

    torch-fidelity's FeatureExtractorInceptionV3 always loads weights in its constructor, so the
    same sub-blocks are assembled here under the same attribute names. Convolutions get He-normal
    weights so activations keep their scale through the 94 layers (PyTorch's default init shrinks
    them to ~1e-8 and every distance would be ~0 for a trivial reason).
    """
    from torch import nn
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    torch.manual_seed(seed)
    net = nn.Module()
    net.Conv2d_1a_3x3 = fe.BasicConv2d(3, 32, kernel_size=3, stride=2)
    net.Conv2d_2a_3x3 = fe.BasicConv2d(32, 32, kernel_size=3)
    net.Conv2d_2b_3x3 = fe.BasicConv2d(32, 64, kernel_size=3, padding=1)
    net.Conv2d_3b_1x1 = fe.BasicConv2d(64, 80, kernel_size=1)
    net.Conv2d_4a_3x3 = fe.BasicConv2d(80, 192, kernel_size=3)
    net.Mixed_5b = fe.InceptionA(192, pool_features=32)
    net.Mixed_5c = fe.InceptionA(256, pool_features=64)
    net.Mixed_5d = fe.InceptionA(288, pool_features=64)
    net.Mixed_6a = fe.InceptionB(288)
    net.Mixed_6b = fe.InceptionC(768, channels_7x7=128)
    net.Mixed_6c = fe.InceptionC(768, channels_7x7=160)
    net.Mixed_6d = fe.InceptionC(768, channels_7x7=160)
    net.Mixed_6e = fe.InceptionC(768, channels_7x7=192)
    net.Mixed_7a = fe.InceptionD(768)
    net.Mixed_7b = fe.InceptionE_1(1280)
    net.Mixed_7c = fe.InceptionE_2(2048)
    net.fc = nn.Linear(2048, 1008)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return net.state_dict()


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / INCEPTION_FILE
    torch.save(random_inception_state_dict(), path)
    return path


@pytest.fixture(scope="module")
def inception64(inception_file):
    """The random Inception at the 64-d tap in float32, loaded once (loading costs seconds on CPU;
    float64 convolutions are ~10x slower than float32 ones there, see test_float64_default)."""
    return load_inception(inception_file, feature=64, dtype=torch.float32)


@pytest.fixture(autouse=True)
def _no_env(monkeypatch, tmp_path):
    monkeypatch.delenv(INCEPTION_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # an empty hub cache


def smooth_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Random low-frequency images in [0.15, 0.85] (noise added later stays mostly unclipped)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    return 0.15 + 0.7 * torch.nn.functional.interpolate(low, size=size, mode="bilinear", align_corners=False)


def noisy(images: torch.Tensor, sigma: float, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (images + sigma * torch.randn(images.shape, generator=g)).clamp(0, 1)


def test_loader_features_equal_torch_fidelity_reference(inception_file):
    """Our loader (torchmetrics' NoTrainInceptionV3, antialias=False) gives torch-fidelity's own
    FeatureExtractorInceptionV3 features for the same file: the weights and the TF-compatible
    resize are really used."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    images = fidmod.to_uint8_tensor(smooth_images(2, size=40))
    ours = load_inception(inception_file, feature=2048, antialias=False, dtype=torch.float32)
    ref = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                      feature_extractor_weights_path=str(inception_file))
    with torch.no_grad():
        a, (b,) = ours(images), ref(images)
    assert a.shape == (2, 2048) and a.dtype == torch.float32
    assert b.abs().mean() > 1e-3  # non-degenerate random features
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def test_float64_default_through_env(inception_file, inception64, monkeypatch):
    """The default precision is float64 (torchmetrics' set_dtype(torch.float64) recommendation) and
    agrees with float32 features to float32 round-off; weights found through the env variable."""
    monkeypatch.setenv(INCEPTION_ENV, str(inception_file))
    metrics = InceptionMetrics(feature=64, kid=False)
    assert next(metrics.inception.parameters()).dtype == torch.float64
    images = smooth_images(2)
    f64 = metrics.features(images)
    assert f64.dtype == torch.float64 and f64.shape == (2, 64)
    with torch.no_grad():
        f32 = inception64(fidmod.to_uint8_tensor(images))
    torch.testing.assert_close(f64.float(), f32, rtol=1e-4, atol=1e-4 * f32.abs().max().item())
    metrics.update_features(f64, real=True)
    metrics.update_features(f64, real=False)
    out = metrics.compute()
    assert "kid" not in out and out["num_fake"] == 2 and abs(out["fid"]) < 1e-6


def test_fid_kid_values(inception64):
    metrics = InceptionMetrics(feature=64, kid_subsets=3, kid_subset_size=1000, inception=inception64)
    base = smooth_images(10)
    feats = metrics.features(base)
    assert feats.dtype == torch.float64 and feats.shape == (10, 64)

    # A set against itself: FID ~ 0, KID ~ 0.
    metrics.update_features(feats, real=True)
    metrics.update_features(feats, real=False)
    same = metrics.compute()
    assert same["num_real"] == same["num_fake"] == 10 and same["kid_subset_size"] == 10

    results = []
    for sigma in (0.03, 0.1, 0.3):
        metrics.reset_fake()  # real statistics stay
        fake = noisy(base, sigma)
        metrics.update(fake, real=False)
        out = metrics.compute()
        assert out["num_real"] == 10 and out["num_fake"] == 10
        # torchmetrics' FID equals our scipy-validated Fréchet distance on the same features.
        fake_feats = metrics.features(fake)
        ref = fd_between(feats, fake_feats)
        assert math.isclose(out["fid"], ref, rel_tol=1e-6, abs_tol=1e-9), (out["fid"], ref)
        # subset size = set size: KID is the plain unbiased MMD^2 of the two sets, std 0.
        assert math.isclose(out["kid"], unbiased_poly_mmd(feats, fake_feats), rel_tol=1e-6, abs_tol=1e-12)
        assert out["kid_std"] < 1e-9 * max(1.0, abs(out["kid"]))
        results.append(out)

    fids = [r["fid"] for r in results]
    kids = [r["kid"] for r in results]
    assert fids[0] < fids[1] < fids[2], fids
    assert kids[0] < kids[1] < kids[2], kids
    assert abs(same["fid"]) < 1e-4 * fids[0], (same["fid"], fids)
    assert abs(same["kid"]) < 0.2 * kids[-1], (same["kid"], kids)


def unbiased_poly_mmd(x: torch.Tensor, y: torch.Tensor) -> float:
    """Bińkowski et al. 2018, eq. (3) with k(a, b) = (a.b / d + 1)^3, written out independently."""
    d, m, n = x.shape[1], len(x), len(y)
    k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    return float((kxx.sum() - kxx.diag().sum()) / (m * (m - 1)) + (kyy.sum() - kyy.diag().sum()) / (n * (n - 1))
                 - 2 * kxy.mean())


def test_kid_subsets_are_seeded_and_capped(inception64):
    metrics = InceptionMetrics(feature=64, kid_subsets=5, kid_subset_size=4, kid_seed=3, inception=inception64)
    g = torch.Generator().manual_seed(0)
    metrics.update_features(torch.randn(12, 64, generator=g, dtype=torch.float64), real=True)
    metrics.update_features(torch.randn(9, 64, generator=g, dtype=torch.float64) + 0.5, real=False)
    a, b = metrics.compute(), metrics.compute()
    assert a["kid_subset_size"] == 4 and a["kid"] == b["kid"] and a["kid_std"] > 0


def test_fid_kid_helper_and_uint8_input(inception64):
    base = smooth_images(4, size=16)
    out = fid_kid(base, [fidmod.to_uint8_tensor(noisy(base, 0.2))[:2], noisy(base, 0.2)[2:]],
                  feature=64, kid_subsets=2, inception=inception64)
    assert out["num_real"] == out["num_fake"] == 4 and out["fid"] > 0 and math.isfinite(out["kid"])
    # the uint8 chunk counts as the same images as their float form: one accumulator over all of them
    ref = InceptionMetrics(feature=64, kid_subsets=2, inception=inception64)
    ref.update(base, real=True)
    ref.update(noisy(base, 0.2), real=False)
    want = ref.compute()
    assert math.isclose(out["fid"], want["fid"], rel_tol=1e-9)
    assert math.isclose(out["kid"], want["kid"], rel_tol=1e-9, abs_tol=1e-15)


def test_images_outside_unit_range_are_an_error():
    images = smooth_images(2, size=16)
    assert int(fidmod.to_uint8_tensor(images * 0 + 1.001).min()) == 255  # decoder rounding overshoot: clamped
    with pytest.raises(ValueError, match=r"expected images as floats in \[0, 1\], got min -0.*x / 2 \+ 0.5"):
        fidmod.to_uint8_tensor(images * 2 - 1)
    with pytest.raises(ValueError, match="NaN or inf"):  # NaN would pass the range check and count as black
        fidmod.to_uint8_tensor(torch.where(images > 0.5, images, torch.nan))


def test_fewer_than_two_samples_is_a_value_error(inception64):
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        InceptionMetrics(feature=64, inception=inception64, batch_size=0)
    metrics = InceptionMetrics(feature=64, inception=inception64)
    images = smooth_images(3, size=16)
    metrics.update(images[:1], real=True)
    metrics.update(images, real=False)
    with pytest.raises(ValueError, match="at least 2 real"):
        metrics.compute()
    fd = FeatureFD(torch.nn.Flatten())
    fd.update(images, real=True)
    fd.update(images[:1], real=False)
    with pytest.raises(ValueError, match="at least 2"):
        fd.compute()


def test_missing_weights_error_names_file_source_and_env(tmp_path, monkeypatch):
    for call in (lambda: inception_weights_path(), lambda: InceptionMetrics(),
                 lambda: inception_weights_path(tmp_path / "nope.pth")):
        with pytest.raises(FileNotFoundError) as info:
            call()
        msg = str(info.value)
        assert INCEPTION_FILE in msg and INCEPTION_ENV in msg and fidmod.INCEPTION_URL in msg
    monkeypatch.setenv(INCEPTION_ENV, str(tmp_path / "missing.pth"))
    with pytest.raises(FileNotFoundError, match=INCEPTION_ENV):
        inception_weights_path()


def test_lookup_order_and_wrong_file(inception_file, tmp_path, monkeypatch):
    cache = tmp_path / "torch_home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / INCEPTION_FILE).symlink_to(inception_file)
    assert inception_weights_path() == cache / INCEPTION_FILE  # $TORCH_HOME/hub/checkpoints
    other = tmp_path / "env.pth"
    other.symlink_to(inception_file)
    monkeypatch.setenv(INCEPTION_ENV, str(other))
    assert inception_weights_path() == other  # the env var wins over the cache
    assert inception_weights_path(inception_file.parent) == inception_file  # explicit (a folder) wins
    bad = tmp_path / "bad.pth"
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="not a torch-fidelity InceptionV3"):
        load_inception(bad)
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read Inception weights .*bad.pth"):
        load_inception(bad)
    state = torch.load(inception_file, weights_only=True)
    state["fc.weight"] = torch.zeros(10, 2048)  # the keys checked up front are there, a shape is wrong
    torch.save(state, bad)
    with pytest.raises(ValueError, match=r"cannot read Inception weights .*bad.pth .*size mismatch for fc.weight"):
        load_inception(bad)
    with pytest.raises(ValueError, match="feature must be one of"):
        load_inception(inception_file, feature=100)


def test_feature_fd_any_extractor():
    torch.manual_seed(0)
    extractor = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(12, 5))
    a, b = smooth_images(20, 8, seed=1), smooth_images(20, 8, seed=2)
    fd = FeatureFD(extractor, batch_size=7)
    fd.update(a, real=True)
    fd.update(a, real=False)
    assert abs(fd.compute()) < 1e-8
    fd.reset_fake()
    fd.update(b[:9], real=False)
    fd.update(b[9:], real=False)
    with torch.no_grad():
        expected = fd_between(extractor(a), extractor(b))
    assert fd.real.num == 20 and fd.fake.num == 20
    assert math.isclose(fd.compute(), expected, rel_tol=1e-6) and expected > 0
