"""LatentCodec on a tiny random AutoencoderKL."""

import pytest
import torch
from diffusers import AutoencoderKL

from lcm_lab.core import LatentCodec, generators_for_seeds

pytestmark = pytest.mark.usefixtures("single_thread_torch")


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    net = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
        scaling_factor=0.18215,
    )
    return net.eval()


@pytest.fixture()
def images():
    return torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_encode_decode_shapes_and_scaling(vae, images):
    codec = LatentCodec(vae)
    assert codec.scaling_factor == pytest.approx(0.18215)
    with torch.no_grad():
        z = codec.encode(images)
        assert z.shape == (5, 4, 8, 8)
        mode = vae.encode(images).latent_dist.mode()
        assert torch.allclose(z, mode * 0.18215, atol=1e-6)
        x = codec.decode(z)
    assert x.shape == images.shape
    u = LatentCodec.to_unit(x)
    assert u.min() >= 0 and u.max() <= 1
    assert torch.equal(LatentCodec.to_unit(torch.tensor([-3.0, -1.0, 0.0, 1.0])), torch.tensor([0.0, 0.0, 0.5, 1.0]))


def test_scaling_override_and_vaes_that_ask_for_more(vae, images):
    codec = LatentCodec(vae, scaling_factor=1.5)
    with torch.no_grad():
        z = codec.encode(images, no_grad=True)
        assert torch.allclose(z, vae.encode(images).latent_dist.mode() * 1.5, atol=1e-6)
        assert torch.allclose(codec.decode(z), vae.decode(z / 1.5).sample, atol=1e-5)
    for extra in ({"shift_factor": 0.1159}, {"latents_mean": [0.0] * 4, "latents_std": [1.0] * 4}):
        other = AutoencoderKL(**{**vae.config, **extra})  # the SD/SDXL pipelines would ignore these, or not
        with pytest.raises(ValueError, match=f"sets {next(iter(extra))} .*scaling_factor alone"):
            LatentCodec(other)


def test_chunking_matches_unchunked(vae, images):
    codec = LatentCodec(vae)
    with torch.no_grad():
        assert torch.allclose(codec.encode(images, chunk_size=2), codec.encode(images), atol=1e-5)
        z = codec.encode(images)
        assert torch.allclose(codec.decode(z, chunk_size=2), codec.decode(z), atol=1e-5)
        # posterior samples with per-sample generators do not depend on chunking either
        a = codec.encode(images, generator=generators_for_seeds(range(5)), sample=True, chunk_size=2)
        b = codec.encode(images, generator=generators_for_seeds(range(5)), sample=True)
        assert torch.allclose(a, b, atol=1e-5)
        assert not torch.allclose(a, z, atol=1e-3)
    with pytest.raises(ValueError, match="chunk_size"):
        codec.decode(z, chunk_size=0)


def test_decode_is_differentiable(vae, images):
    codec = LatentCodec(vae)
    with torch.no_grad():
        z = codec.encode(images[:2])
    z = z.clone().requires_grad_(True)
    codec.decode(z, chunk_size=1).square().mean().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert not codec.decode(z, no_grad=True).requires_grad
