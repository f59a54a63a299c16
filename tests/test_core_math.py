"""Unit tests of the parameterization formulas, seeded noise, the UNet wrapper and the codec's input check."""

from types import SimpleNamespace

import pytest
import torch
from diffusers import LatentConsistencyModelPipeline, LCMScheduler

from lcm_lab.core import (
    LatentCodec,
    NoiseSchedule,
    UNetModel,
    cfg_combine,
    consistency_output,
    ddim_jump,
    ddim_step,
    edm_cm_scalings,
    from_x0_eps,
    generators_for_seeds,
    guidance_scale_embedding,
    lcm_boundary_scalings,
    randn,
    to_eps,
    to_x0,
)

pytestmark = pytest.mark.usefixtures("single_thread_torch")

# ---------------------------------------------------------------------------- parameterization


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_to_x0_to_eps_round_trip(prediction_type):
    torch.manual_seed(0)
    sched = NoiseSchedule.from_config(prediction_type=prediction_type)
    t = torch.tensor([10, 300, 700, 999])
    alpha, sigma = sched.alpha_sigma(t)
    x0 = torch.randn(4, 4, 3, 3)
    eps = torch.randn(4, 4, 3, 3)
    x_t = from_x0_eps(x0, eps, alpha, sigma)
    target = {"epsilon": eps, "v_prediction": alpha * eps - sigma * x0, "sample": x0}[prediction_type]
    assert torch.allclose(to_x0(target, x_t, alpha, sigma, prediction_type), x0, atol=2e-4)
    assert torch.allclose(to_eps(target, x_t, alpha, sigma, prediction_type), eps, atol=2e-4)


def test_to_x0_matches_lcm_scheduler_formulas():
    sched = LCMScheduler(prediction_type="v_prediction")
    abar = sched.alphas_cumprod[500]
    out, x = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    ref = abar.sqrt() * x - (1 - abar).sqrt() * out
    assert torch.equal(to_x0(out, x, abar.sqrt(), (1 - abar).sqrt(), "v_prediction"), ref)


@pytest.mark.parametrize("fn", [to_x0, to_eps])
def test_unknown_prediction_type(fn):
    with pytest.raises(ValueError, match="prediction_type"):
        fn(torch.zeros(1), torch.zeros(1), 1.0, 0.0, "flow")


def test_lcm_boundary_scalings():
    c_skip, c_out = lcm_boundary_scalings(0)
    assert float(c_skip) == 1.0 and float(c_out) == 0.0
    t = torch.tensor([0, 1, 19, 259, 999])
    c_skip, c_out = lcm_boundary_scalings(t)
    sched = LCMScheduler()
    for i, ti in enumerate(t):
        ref_skip, ref_out = sched.get_scalings_for_boundary_condition_discrete(ti)
        assert torch.allclose(c_skip[i], torch.as_tensor(ref_skip, dtype=torch.float32))
        assert torch.allclose(c_out[i], torch.as_tensor(ref_out, dtype=torch.float32))
    x, x0 = torch.randn(2, 3), torch.randn(2, 3)
    cs, co = lcm_boundary_scalings(0)
    assert torch.equal(consistency_output(x, x0, cs, co), x)
    for bad in ({"timestep_scaling": 0.0}, {"timestep_scaling": -10.0}, {"sigma_data": 0.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):  # would flip or zero c_out, or give 0/0
            lcm_boundary_scalings(t, **bad)


def test_lcm_boundary_scalings_float16_t_computed_in_float32():
    # float16 t: s^2 = (10 t)^2 overflows float16 for t >= 26, which used to give c_skip = c_out = 0
    t32 = torch.tensor([0, 1, 19, 26, 259, 999], dtype=torch.float32)
    ref_skip, ref_out = lcm_boundary_scalings(t32)
    c_skip, c_out = lcm_boundary_scalings(t32.half())
    assert c_skip.dtype == torch.float32 and c_out.dtype == torch.float32
    assert torch.equal(c_skip, ref_skip) and torch.equal(c_out, ref_out)
    assert torch.allclose(c_out[3:], torch.ones(3), atol=1e-3)  # ~1 at large t, not 0
    assert lcm_boundary_scalings(t32.bfloat16())[1].dtype == torch.float32
    assert lcm_boundary_scalings(t32.double())[0].dtype == torch.float64


def test_edm_cm_scalings():
    sigma_min, sd = 0.002, 0.5
    c_skip, c_out, c_in, c_noise = edm_cm_scalings(torch.tensor(sigma_min), sigma_min, sd)
    assert float(c_skip) == pytest.approx(1.0, abs=0) and float(c_out) == 0.0
    sigma = torch.tensor([0.01, 1.0, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = edm_cm_scalings(sigma, sigma_min, sd)
    assert torch.allclose(c_in, 1 / torch.sqrt(sigma**2 + sd**2))
    assert torch.allclose(c_noise, 0.25 * torch.log(sigma))
    assert torch.allclose(c_skip, sd**2 / ((sigma - sigma_min) ** 2 + sd**2))
    assert torch.allclose(c_out, sd * (sigma - sigma_min) / torch.sqrt(sigma**2 + sd**2))
    # unit variance input: x = y + sigma * n with std(y) = sd
    assert torch.allclose(c_in**2 * (sd**2 + sigma**2), torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="sigma_data"):
        edm_cm_scalings(sigma, sigma_min, 0.0)
    with pytest.raises(ValueError, match="sigma_min"):
        edm_cm_scalings(sigma, -1.0, sd)


@pytest.mark.parametrize("dim", [256, 32, 31])
def test_guidance_embedding_matches_diffusers(dim):
    w = torch.rand(5) * 14
    ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
    ours = guidance_scale_embedding(w, embedding_dim=dim)
    assert ours.shape == (5, dim)
    assert torch.allclose(ours, ref, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="embedding_dim"):
        guidance_scale_embedding(w, embedding_dim=2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_guidance_embedding_matches_diffusers_low_precision(dtype):
    # the frequencies must not be rounded to `dtype` before the product (that differed by up to ~2)
    w = torch.linspace(0.0, 14.0, 29)
    ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=256, dtype=dtype)
    ours = guidance_scale_embedding(w, embedding_dim=256, dtype=dtype)
    assert ours.dtype == dtype
    assert torch.equal(ours, ref)


def test_ddim_step_and_jump():
    sched = NoiseSchedule.from_config()
    x0, eps = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2)
    a_t, s_t = sched.alpha_sigma(torch.tensor([800, 800]))
    a_s, s_s = sched.alpha_sigma(torch.tensor([300, 300]))
    x_t = from_x0_eps(x0, eps, a_t, s_t)
    assert torch.allclose(ddim_jump(x0, x_t, a_t, s_t, a_s, s_s), ddim_step(x0, eps, a_s, s_s), atol=1e-5)
    with pytest.raises(ValueError, match="noise"):
        ddim_step(x0, eps, a_s, s_s, std=0.1)


def test_cfg_combine():
    u, c = torch.randn(3), torch.randn(3)
    assert torch.allclose(cfg_combine(u, c, 1.0), c, atol=1e-6)
    assert torch.allclose(cfg_combine(u, c, 0.0), u)
    assert torch.allclose(cfg_combine(u, c, 7.5), u + 7.5 * (c - u))


# ---------------------------------------------------------------------------- noise


def test_per_seed_noise_independent_of_batch_composition():
    shape = (3, 4, 8, 8)
    batch = randn(shape, generators_for_seeds([11, 22, 33]))
    for i, seed in enumerate([11, 22, 33]):
        alone = randn((1, 4, 8, 8), generators_for_seeds([seed]))
        assert torch.equal(batch[i : i + 1], alone)
    reordered = randn(shape, generators_for_seeds([33, 11, 22]))
    assert torch.equal(reordered[1], batch[0])
    # subsequent draws (the samplers' fresh noise) stay per-sample too
    gens = generators_for_seeds([11, 22])
    randn((2, 1), gens)
    second = randn((2, 4), gens)
    g = generators_for_seeds([22])
    randn((1, 1), g)
    assert torch.equal(second[1:], randn((1, 4), g))


def test_randn_single_generator_and_errors():
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(randn((2, 3), g1), torch.randn((2, 3), generator=g2))
    assert randn((2, 3), None, dtype=torch.float64).dtype == torch.float64
    with pytest.raises(ValueError, match="generators"):
        randn((3, 2), generators_for_seeds([1, 2]))


# ---------------------------------------------------------------------------- UNet wrapper


class RecordingUNet(torch.nn.Module):
    """Fake UNet: output depends on x, t, text and extra conditioning; records each call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, encoder_hidden_states, timestep_cond=None, added_cond_kwargs=None,
                cross_attention_kwargs=None, return_dict=True):
        self.calls.append(dict(batch=x.shape[0], t=t, timestep_cond=timestep_cond, added=added_cond_kwargs,
                               encoder_hidden_states=encoder_hidden_states))
        out = x * 0.5 + encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1) + t.view(-1, 1, 1, 1) * 1e-3
        if timestep_cond is not None:
            out = out + timestep_cond.mean(dim=1).view(-1, 1, 1, 1)
        if added_cond_kwargs is not None:
            out = out + added_cond_kwargs["text_embeds"].mean(dim=1).view(-1, 1, 1, 1)
        return (out,)


def test_unet_model_cfg_is_one_batched_forward():
    unet = RecordingUNet()
    B = 3
    cond, uncond = torch.randn(B, 5, 8), torch.randn(1, 5, 8)
    x, t = torch.randn(B, 4, 2, 2), torch.full((B,), 500)
    model = UNetModel(unet, cond, uncond=uncond, guidance_scale=7.5)
    out = model(x, t)
    assert len(unet.calls) == 1 and unet.calls[0]["batch"] == 2 * B
    ref_c = unet(x, t, cond)[0]
    ref_u = unet(x, t, uncond.expand(B, -1, -1))[0]
    assert torch.allclose(out, ref_u + 7.5 * (ref_c - ref_u), atol=1e-5)
    # no CFG when guidance_scale == 1 or when uncond is missing
    unet.calls.clear()
    assert torch.allclose(UNetModel(unet, cond, uncond=uncond, guidance_scale=1.0)(x, t), ref_c)
    assert torch.allclose(UNetModel(unet, cond, guidance_scale=7.5)(x, torch.tensor(500)), ref_c)
    assert [c["batch"] for c in unet.calls] == [B, B]


def test_unet_model_conditioning_passthrough():
    unet = RecordingUNet()
    B = 2
    cond, uncond = torch.randn(B, 5, 8), torch.randn(B, 5, 8)
    w_emb = guidance_scale_embedding(torch.full((B,), 7.5), 16)
    added = {"text_embeds": torch.randn(B, 6), "time_ids": torch.randn(B, 6)}
    u_added = {"text_embeds": torch.zeros(B, 6), "time_ids": torch.randn(B, 6)}
    x, t = torch.randn(B, 4, 2, 2), torch.tensor([999, 999])
    UNetModel(unet, cond, timestep_cond=w_emb, added_cond_kwargs=added)(x, t)
    assert torch.equal(unet.calls[-1]["timestep_cond"], w_emb)
    model = UNetModel(unet, cond, uncond=uncond, guidance_scale=3.0, timestep_cond=w_emb,
                      added_cond_kwargs=added, uncond_added_cond_kwargs=u_added)
    model(x, t)
    call = unet.calls[-1]
    assert call["batch"] == 2 * B and call["timestep_cond"].shape == (2 * B, 16)
    assert torch.equal(call["added"]["text_embeds"][:B], u_added["text_embeds"])
    assert torch.equal(call["added"]["text_embeds"][B:], added["text_embeds"])
    with pytest.raises(ValueError, match="uncond_added_cond_kwargs"):  # would condition the uncond pass
        UNetModel(unet, cond, uncond=uncond, guidance_scale=3.0, added_cond_kwargs=added)
    UNetModel(unet, cond, uncond=uncond, guidance_scale=1.0, added_cond_kwargs=added)(x, t)  # no CFG: fine
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        UNetModel(unet, torch.randn(3, 5, 8))(x, t)
    with pytest.raises(ValueError, match=r"added_cond_kwargs\['time_ids'\]. has batch 3"):
        UNetModel(unet, cond, added_cond_kwargs={**added, "time_ids": torch.randn(3, 6)})(x, t)
    with pytest.raises(ValueError, match="different added_cond_kwargs keys"):
        UNetModel(unet, cond, uncond=uncond, guidance_scale=3.0, added_cond_kwargs=added,
                  uncond_added_cond_kwargs={"text_embeds": u_added["text_embeds"]})(x, t)
    with pytest.raises(ValueError, match="`uncond` has batch 3"):
        UNetModel(unet, cond, uncond=torch.randn(3, 5, 8), guidance_scale=3.0)(x, t)
    # batch-1 unconditional conditioning is broadcast, as a pipeline's single negative prompt
    UNetModel(unet, cond, uncond=uncond[:1], guidance_scale=3.0, added_cond_kwargs=added,
              uncond_added_cond_kwargs={k: v[:1] for k, v in u_added.items()})(x, t)
    call = unet.calls[-1]
    assert torch.equal(call["added"]["time_ids"][:B], u_added["time_ids"][:1].expand(B, 6))
    assert torch.equal(call["encoder_hidden_states"][:B], uncond[:1].expand(B, 5, 8))


def test_unet_model_per_sample_guidance():
    unet = RecordingUNet()
    cond, uncond = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    x, t = torch.randn(2, 4, 2, 2), torch.tensor([10, 10])
    g = torch.tensor([1.0, 4.0]).view(2, 1, 1, 1)
    out = UNetModel(unet, cond, uncond=uncond, guidance_scale=g)(x, t)
    ref_c, ref_u = unet(x, t, cond)[0], unet(x, t, uncond)[0]
    assert torch.allclose(out[0], ref_c[0], atol=1e-6)
    assert torch.allclose(out[1], ref_u[1] + 4.0 * (ref_c[1] - ref_u[1]), atol=1e-5)


# ---------------------------------------------------------------------------- latent codec input range


class _IdentityVAE:
    """``encode(x).latent_dist.mode() == x``: enough to see what LatentCodec.encode accepts."""

    config = {"scaling_factor": 1.0}

    def encode(self, x):
        return SimpleNamespace(latent_dist=SimpleNamespace(mode=lambda: x))


def test_codec_encode_rejects_images_outside_minus_one_one():
    codec = LatentCodec(_IdentityVAE())
    ok = torch.tensor([-1.0, 0.0, 1.0, 1.005]).view(1, 1, 2, 2)  # [-1, 1], with a little rounding slack
    assert torch.equal(codec.encode(ok), ok)
    with pytest.raises(ValueError, match=r"\[-1, 1\].*max 255"):
        codec.encode(torch.full((1, 3, 2, 2), 255.0))  # [0, 255] pixels
    with pytest.raises(ValueError, match=r"\[-1, 1\].*min -1.5"):
        codec.encode(torch.full((1, 3, 2, 2), -1.5))
