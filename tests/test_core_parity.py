"""Sampler parity with diffusers' scheduler loops on a tiny random-weight UNet.

Both sides use the same UNet, the same initial latents and identically seeded per-sample generators for
the fresh noise. The reference side is written the way diffusers pipelines call the UNet (scalar ``t``,
CFG as one batched forward over ``[uncond; cond]``).
"""

import pytest
import torch
from diffusers import DDIMScheduler, LCMScheduler, TCDScheduler, UNet2DConditionModel

from lcm_lab.core import (
    NoiseSchedule,
    UNetModel,
    generators_for_seeds,
    guidance_scale_embedding,
    lcm_timesteps,
    noised_start,
    randn,
    sample_ddim,
    sample_lcm,
    sample_tcd,
    tcd_timesteps,
    timesteps_for,
)

pytestmark = pytest.mark.usefixtures("single_thread_torch")

SD_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    clip_sample=False,
    set_alpha_to_one=False,
)
SEEDS = [0, 1, 2]
SHAPE = (3, 4, 8, 8)
TOL = 1e-5
W_DIM = 32


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    net = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=8,
        attention_head_dim=8,
        time_cond_proj_dim=W_DIM,  # w-conditioned like an LCM student; timestep_cond stays optional
    )
    return net.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def text():
    g = torch.Generator().manual_seed(123)
    return torch.randn(3, 7, 32, generator=g), torch.randn(1, 7, 32, generator=g)


def pipeline_unet(unet, cond, uncond=None, guidance_scale=1.0, timestep_cond=None):
    """The UNet call as written in diffusers pipelines (reference side)."""

    def call(x, t):
        if uncond is None or guidance_scale == 1.0:
            return unet(x, t, encoder_hidden_states=cond, timestep_cond=timestep_cond, return_dict=False)[0]
        ehs = torch.cat([uncond.expand_as(cond), cond])
        tc = None if timestep_cond is None else torch.cat([timestep_cond, timestep_cond])
        out = unet(torch.cat([x] * 2), t, encoder_hidden_states=ehs, timestep_cond=tc, return_dict=False)[0]
        out_uncond, out_text = out.chunk(2)
        return out_uncond + guidance_scale * (out_text - out_uncond)

    return call


def scheduler_loop(scheduler, call, latents, generator, **step_kwargs):
    x = latents
    for t in scheduler.timesteps:
        x = scheduler.step(call(x, t), t, x, generator=generator, **step_kwargs).prev_sample
    return x


def initial_latents():
    return randn(SHAPE, generators_for_seeds(SEEDS))


def assert_close(ours, ref, tol=TOL):
    diff = (ours - ref).abs().max().item()
    assert torch.isfinite(ref).all()
    assert diff <= tol, f"max abs diff {diff:.3g} > {tol} (max |ref| {ref.abs().max().item():.3g})"


# ---------------------------------------------------------------------------- LCM


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
@torch.no_grad()
def test_lcm_parity(unet, text, prediction_type, steps):
    cond, _ = text
    w_emb = guidance_scale_embedding(torch.full((3,), 7.5 - 1), W_DIM)
    sched = LCMScheduler.from_config({**SD_CONFIG, "prediction_type": prediction_type})
    sched.set_timesteps(steps)
    ref = scheduler_loop(sched, pipeline_unet(unet, cond, timestep_cond=w_emb), initial_latents(),
                         generators_for_seeds(SEEDS))

    schedule = NoiseSchedule.from_scheduler(sched)
    ts = lcm_timesteps(steps)
    assert torch.equal(ts, sched.timesteps)
    seen = []
    ours = sample_lcm(UNetModel(unet, cond, timestep_cond=w_emb), initial_latents(), schedule, ts,
                      generator=generators_for_seeds(SEEDS), callback=lambda i, t, x: seen.append((i, t)))
    assert_close(ours, ref)
    assert seen == list(enumerate(ts.tolist()))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@torch.no_grad()
def test_lcm_parity_non_default_grid_and_boundary_scaling(unet, text, prediction_type):
    """A student distilled with N = 20 and timestep_scaling 5 (what an export's LCMScheduler then carries)."""
    cond, _ = text
    w_emb = guidance_scale_embedding(torch.full((3,), 3.0), W_DIM)
    sched = LCMScheduler.from_config({**SD_CONFIG, "prediction_type": prediction_type,
                                      "original_inference_steps": 20, "timestep_scaling": 5.0})
    sched.set_timesteps(3)
    ref = scheduler_loop(sched, pipeline_unet(unet, cond, timestep_cond=w_emb), initial_latents(),
                         generators_for_seeds(SEEDS))
    ts = lcm_timesteps(3, original_inference_steps=20)
    assert torch.equal(ts, sched.timesteps)
    ours = sample_lcm(UNetModel(unet, cond, timestep_cond=w_emb), initial_latents(), NoiseSchedule.from_scheduler(sched),
                      ts, generator=generators_for_seeds(SEEDS), timestep_scaling=5.0)
    assert_close(ours, ref)
    assert not torch.equal(ts, lcm_timesteps(3))  # N = 20 picks other timesteps than the default N = 50


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@torch.no_grad()
def test_lcm_parity_with_cfg(unet, text, prediction_type):
    cond, uncond = text
    sched = LCMScheduler.from_config({**SD_CONFIG, "prediction_type": prediction_type})
    sched.set_timesteps(4)
    ref = scheduler_loop(sched, pipeline_unet(unet, cond, uncond, 2.0), initial_latents(),
                         generators_for_seeds(SEEDS))
    ours = sample_lcm(UNetModel(unet, cond, uncond=uncond, guidance_scale=2.0), initial_latents(),
                      NoiseSchedule.from_scheduler(sched), lcm_timesteps(4), generator=generators_for_seeds(SEEDS))
    assert_close(ours, ref)


@torch.no_grad()
def test_lcm_img2img_parity(unet, text):
    """LatentConsistencyModelImg2ImgPipeline: strength-reduced grid, add_noise at timesteps[0], LCM loop."""
    cond, _ = text
    clean = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))
    sched = LCMScheduler.from_config(SD_CONFIG)
    sched.set_timesteps(4, strength=0.5)
    gens = generators_for_seeds(SEEDS)
    start = sched.add_noise(clean, randn(SHAPE, gens), sched.timesteps[:1])
    ref = scheduler_loop(sched, pipeline_unet(unet, cond), start, gens)

    schedule = NoiseSchedule.from_scheduler(sched)
    ts = timesteps_for("lcm", 4, schedule, strength=0.5)
    assert ts.tolist() == sched.timesteps.tolist() == [499, 379, 259, 139]
    gens = generators_for_seeds(SEEDS)
    x = noised_start(clean, schedule, ts[0], randn(SHAPE, gens))
    assert_close(x, start)
    ours = sample_lcm(UNetModel(unet, cond), x, schedule, ts, generator=gens)
    assert_close(ours, ref)


# ---------------------------------------------------------------------------- DDIM


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@torch.no_grad()
def test_ddim_cfg_parity_50_steps(unet, text, prediction_type):
    cond, uncond = text
    sched = DDIMScheduler(**SD_CONFIG, prediction_type=prediction_type)
    sched.set_timesteps(50)
    ref = scheduler_loop(sched, pipeline_unet(unet, cond, uncond, 7.5), initial_latents(), None)

    schedule = NoiseSchedule.from_scheduler(sched)
    ts = timesteps_for("ddim", 50, schedule)
    assert torch.equal(ts, sched.timesteps)
    ours = sample_ddim(UNetModel(unet, cond, uncond=uncond, guidance_scale=7.5), initial_latents(), schedule, ts)
    assert_close(ours, ref)


@torch.no_grad()
def test_ddim_eta_and_trailing_parity(unet, text):
    """eta > 0 (fresh noise from per-sample generators) on a 'trailing' grid where T % n != 0.

    On this grid DDIMScheduler's literal rule ``prev = t - T // n`` differs from the next grid point, so
    ``step_ratio`` is passed to reproduce it.
    """
    cond, _ = text
    n = 7
    sched = DDIMScheduler(**SD_CONFIG, timestep_spacing="trailing")
    sched.set_timesteps(n)
    ref = scheduler_loop(sched, pipeline_unet(unet, cond), initial_latents(), generators_for_seeds(SEEDS), eta=0.5)
    schedule = NoiseSchedule.from_scheduler(sched)
    ours = sample_ddim(UNetModel(unet, cond), initial_latents(), schedule, sched.timesteps,
                       generator=generators_for_seeds(SEEDS), eta=0.5, step_ratio=1000 // n)
    # eta > 0: we form sqrt(sigma_prev^2 - std^2) from sigma_prev = sqrt(1 - abar_prev), diffusers
    # sqrt(1 - abar_prev - std^2) directly; that one-ulp difference is scaled by the (large, random-UNet)
    # latents, so the bound here is relative to their magnitude.
    assert_close(ours, ref, tol=TOL * max(1.0, ref.abs().max().item()))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@torch.no_grad()
def test_x0_clipping_parity(unet, text, prediction_type):
    """clip_sample on (a scheduler config's clip_sample + clip_sample_range): DDIM clamps x0_hat after taking
    eps_hat from the raw prediction, LCM before its boundary scalings; both as the diffusers schedulers."""
    cond, _ = text
    config = {**SD_CONFIG, "prediction_type": prediction_type, "clip_sample": True, "clip_sample_range": 0.3}
    ddim = DDIMScheduler(**config)
    ddim.set_timesteps(5)
    ref = scheduler_loop(ddim, pipeline_unet(unet, cond), initial_latents(), None)
    schedule = NoiseSchedule.from_scheduler(ddim)
    ours = sample_ddim(UNetModel(unet, cond), initial_latents(), schedule, ddim.timesteps, clip_sample=0.3)
    assert_close(ours, ref)
    assert (sample_ddim(UNetModel(unet, cond), initial_latents(), schedule, ddim.timesteps) - ref).abs().max() > 1e-2

    w_emb = guidance_scale_embedding(torch.full((3,), 3.0), W_DIM)
    lcm = LCMScheduler.from_config(config)
    lcm.set_timesteps(4)
    ref = scheduler_loop(lcm, pipeline_unet(unet, cond, timestep_cond=w_emb), initial_latents(),
                         generators_for_seeds(SEEDS))
    ours = sample_lcm(UNetModel(unet, cond, timestep_cond=w_emb), initial_latents(), schedule, lcm.timesteps,
                      generator=generators_for_seeds(SEEDS), clip_sample=0.3)
    assert_close(ours, ref)
    with pytest.raises(ValueError, match="clip_sample"):
        sample_lcm(UNetModel(unet, cond), initial_latents(), schedule, lcm.timesteps, clip_sample=0.0)


@torch.no_grad()
def test_ddim_img2img_grid_parity(unet, text):
    """SD img2img: full leading grid, keep the last int(n * strength) steps; prev = next grid point."""
    cond, _ = text
    clean = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    noise = randn(SHAPE, generators_for_seeds(SEEDS))
    sched = DDIMScheduler(**SD_CONFIG)
    sched.set_timesteps(10)
    sched.timesteps = sched.timesteps[10 - int(10 * 0.6):]
    start = sched.add_noise(clean, noise, sched.timesteps[:1])
    ref = scheduler_loop(sched, pipeline_unet(unet, cond), start, None)
    schedule = NoiseSchedule.from_scheduler(sched)
    ts = timesteps_for("ddim", 10, schedule, strength=0.6)
    assert torch.equal(ts, sched.timesteps)
    ours = sample_ddim(UNetModel(unet, cond), noised_start(clean, schedule, ts[0], noise), schedule, ts)
    assert_close(ours, ref)


# ---------------------------------------------------------------------------- TCD


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("gamma", [0.3, 0.0])
@torch.no_grad()
def test_tcd_parity(unet, text, prediction_type, gamma):
    cond, _ = text
    sched = TCDScheduler.from_config({**SD_CONFIG, "prediction_type": prediction_type})
    sched.set_timesteps(4)
    ref = scheduler_loop(sched, pipeline_unet(unet, cond), initial_latents(), generators_for_seeds(SEEDS), eta=gamma)

    schedule = NoiseSchedule.from_scheduler(sched)
    ts = tcd_timesteps(4)
    assert torch.equal(ts, sched.timesteps)
    ours = sample_tcd(UNetModel(unet, cond), initial_latents(), schedule, ts,
                      generator=generators_for_seeds(SEEDS), gamma=gamma)
    assert_close(ours, ref)


# ---------------------------------------------------------------------------- batch composition / errors


@torch.no_grad()
def test_lcm_samples_independent_of_batch_composition(unet, text):
    cond, _ = text
    schedule = NoiseSchedule.from_config(**{k: v for k, v in SD_CONFIG.items() if k not in ("steps_offset", "clip_sample")})
    ts = lcm_timesteps(4)
    batch = sample_lcm(UNetModel(unet, cond), randn(SHAPE, generators_for_seeds(SEEDS)), schedule, ts,
                       generator=generators_for_seeds(SEEDS))
    alone = sample_lcm(UNetModel(unet, cond[1:2]), randn((1, *SHAPE[1:]), generators_for_seeds([SEEDS[1]])),
                       schedule, ts, generator=generators_for_seeds([SEEDS[1]]))
    # batched vs single-sample convolutions differ in float32 summation order only
    assert torch.allclose(batch[1:2], alone, rtol=1e-5, atol=1e-5)


def test_sampler_argument_errors(text):
    schedule = NoiseSchedule.from_config()
    model = lambda x, t: torch.zeros_like(x)  # noqa: E731
    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match="descending"):
        sample_lcm(model, x, schedule, [259, 499])
    with pytest.raises(ValueError, match="timesteps"):
        sample_lcm(model, x, schedule, [1000, 10])
    with pytest.raises(ValueError, match="timesteps"):
        sample_lcm(model, x, schedule, [])
    with pytest.raises(ValueError, match="gamma"):
        sample_tcd(model, x, schedule, [999], gamma=1.5)
    with pytest.raises(ValueError, match="eta"):
        sample_ddim(model, x, schedule, [999], eta=-0.1)
    with pytest.raises(ValueError, match="step_ratio"):
        sample_ddim(model, x, schedule, [999], step_ratio=0)
    with pytest.raises(ValueError, match=r"noise shape \(2, 4, 2, 2\) differs"):  # would broadcast to batch 2
        noised_start(x, schedule, 999, torch.zeros(2, 4, 2, 2))
