"""Noise schedules and timestep grids vs diffusers' schedulers."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, LCMScheduler, TCDScheduler
from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr as diffusers_rescale

from lcm_lab.core import (
    NoiseSchedule,
    ct_sigmas,
    ddim_solver_timesteps,
    ddim_timesteps,
    img2img_timesteps,
    karras_sigmas,
    lcm_timesteps,
    make_betas,
    previous_solver_timestep,
    rescale_zero_terminal_snr,
    tcd_timesteps,
    timesteps_for,
    to_x0,
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
    prediction_type="epsilon",
)


# ---------------------------------------------------------------------------- betas / schedule


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
        dict(beta_schedule="squaredcos_cap_v2"),
        dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, num_train_timesteps=100),
    ],
)
def test_betas_match_diffusers(kwargs):
    ref = DDIMScheduler(**kwargs).betas
    ours = make_betas(**kwargs)
    assert ours.dtype == torch.float32
    assert torch.equal(ours, ref)


def test_rescale_zero_terminal_snr_matches_diffusers():
    betas = make_betas()
    ours = rescale_zero_terminal_snr(betas)
    assert torch.allclose(ours, diffusers_rescale(betas), atol=0, rtol=1e-6)
    assert torch.cumprod(1 - ours, 0)[-1].abs() < 1e-12


@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("set_alpha_to_one", [False, True])
def test_schedule_from_scheduler_matches(rescale, set_alpha_to_one):
    sched = LCMScheduler.from_config(
        {**SD_CONFIG, "rescale_betas_zero_snr": rescale, "set_alpha_to_one": set_alpha_to_one,
         "prediction_type": "v_prediction"}
    )
    s = NoiseSchedule.from_scheduler(sched)
    assert torch.equal(s.alphas_cumprod, sched.alphas_cumprod)
    assert s.final_alpha_cumprod == pytest.approx(float(sched.final_alpha_cumprod), abs=0)
    assert s.prediction_type == "v_prediction"
    assert s.num_train_timesteps == 1000
    # config dict with foreign keys, and a scheduler that has no set_alpha_to_one at all
    s2 = NoiseSchedule.from_scheduler(dict(sched.config))
    assert torch.equal(s2.alphas_cumprod, s.alphas_cumprod)
    # a scheduler without `set_alpha_to_one` in its config falls back to the default (True)
    s3 = NoiseSchedule.from_scheduler(EulerDiscreteScheduler())
    assert s3.final_alpha_cumprod == 1.0
    # ... but diffusers keeps foreign keys when converting configs, so SD's `False` survives via Euler
    s4 = NoiseSchedule.from_scheduler(EulerDiscreteScheduler.from_config(SD_CONFIG))
    assert s4.final_alpha_cumprod == float(DDIMScheduler(**SD_CONFIG).alphas_cumprod[0])


def test_schedule_from_a_config_without_betas_or_with_foreign_trained_betas_is_refused():
    config = {k: v for k, v in SD_CONFIG.items() if k != "beta_schedule"}
    with pytest.raises(ValueError, match="lacks beta_schedule .*disagree on their defaults"):
        NoiseSchedule.from_scheduler(config)  # DDIM would read linear, LCM scaled_linear
    betas = DDIMScheduler(**SD_CONFIG).betas.tolist()
    assert NoiseSchedule.from_scheduler({"trained_betas": betas}).num_train_timesteps == 1000  # betas alone: fine
    with pytest.raises(ValueError, match="1000 trained_betas but num_train_timesteps=500"):
        NoiseSchedule.from_scheduler({"trained_betas": betas, "num_train_timesteps": 500})
    with pytest.raises(ValueError, match="500 trained_betas but num_train_timesteps=1000"):  # diffusers' default T
        NoiseSchedule.from_scheduler({"trained_betas": betas[:500]})


def test_a_model_folder_with_such_a_config_says_why_not_that_it_is_unreadable(tmp_path):
    import json

    from lcm_lab.models.sd import load_schedule

    (tmp_path / "scheduler").mkdir()
    path = tmp_path / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({k: v for k, v in SD_CONFIG.items() if k != "beta_start"}))
    with pytest.raises(ValueError, match="scheduler_config.json: the scheduler config lacks beta_start") as err:
        load_schedule(tmp_path)
    assert "cannot read" not in str(err.value) and "truncated" not in str(err.value)


def test_schedule_from_config_and_trained_betas():
    s = NoiseSchedule.from_config(**{k: v for k, v in SD_CONFIG.items() if k not in ("steps_offset", "clip_sample")})
    ref = DDIMScheduler(**SD_CONFIG)
    assert torch.equal(s.alphas_cumprod, ref.alphas_cumprod)
    assert s.final_alpha_cumprod == float(ref.alphas_cumprod[0])
    betas = torch.linspace(1e-4, 2e-2, 50)
    s_tb = NoiseSchedule.from_config(trained_betas=betas.tolist(), beta_schedule="nonexistent")
    assert torch.allclose(s_tb.alphas_cumprod, torch.cumprod(1 - betas, 0))
    with pytest.raises(TypeError):
        NoiseSchedule.from_config(clip_sample=False)


def test_alpha_sigma_shapes_and_prev():
    s = NoiseSchedule.from_config()
    a, sg = s.alpha_sigma(10)
    assert a.ndim == 0 and torch.allclose(a**2 + sg**2, torch.tensor(1.0))
    t = torch.tensor([0, 500, 999])
    a, sg = s.alpha_sigma(t)
    assert a.shape == (3, 1, 1, 1) and sg.shape == (3, 1, 1, 1)
    assert torch.equal(a.flatten(), s.alphas_cumprod[t].sqrt())
    prev = s.alpha_cumprod_prev(torch.tensor([-1, -20, 5]))
    assert prev.shape == (3, 1, 1, 1)
    assert prev.flatten().tolist() == pytest.approx([1.0, 1.0, float(s.alphas_cumprod[5])])
    assert float(s.alpha_cumprod_prev(-3)) == 1.0
    x0, noise = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    ref = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").add_noise(x0, noise, t)
    assert torch.allclose(s.add_noise(x0, noise, t), ref, atol=1e-6)
    with pytest.raises(ValueError, match="timesteps must be in"):
        s.alpha_sigma(1000)


@pytest.mark.parametrize("bad", ["eps", "v", "flow", ""])
def test_unknown_prediction_type_raises(bad):
    with pytest.raises(ValueError, match="prediction_type"):
        NoiseSchedule.from_config(prediction_type=bad)
    with pytest.raises(ValueError, match="prediction_type"):
        NoiseSchedule(torch.linspace(0.99, 0.01, 10), prediction_type=bad)


def test_zero_terminal_snr_requires_v_prediction():
    # Lin et al. 2024: at abar_{T-1} = 0, x0 = (x - sigma eps) / alpha divides by zero for an eps network
    with pytest.raises(ValueError, match="zero-terminal-SNR.*v_prediction"):
        NoiseSchedule.from_config(rescale_betas_zero_snr=True, prediction_type="epsilon")
    with pytest.raises(ValueError, match="prediction_type='epsilon'"):
        NoiseSchedule.from_scheduler(DDIMScheduler(**SD_CONFIG, rescale_betas_zero_snr=True))
    with pytest.raises(ValueError, match="zero-terminal-SNR"):
        NoiseSchedule(torch.tensor([0.9, 0.5, 0.0]))
    # v (and x0) prediction stay finite at the last timestep
    for prediction_type in ("v_prediction", "sample"):
        s = NoiseSchedule.from_config(rescale_betas_zero_snr=True, prediction_type=prediction_type)
        assert float(s.alphas_cumprod[-1]) == 0.0
        alpha, sigma = s.alpha_sigma(torch.tensor([999]))
        x0 = to_x0(torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2), alpha, sigma, prediction_type)
        assert torch.isfinite(x0).all()
    # a tiny but non-zero terminal abar is still allowed for eps
    NoiseSchedule(torch.tensor([0.9, 0.5, 1e-6]))


def test_unknown_beta_schedule_raises():
    with pytest.raises(ValueError, match="beta_schedule"):
        make_betas(beta_schedule="cosine")


# ---------------------------------------------------------------------------- LCM / TCD grids


def test_lcm_grid_examples():
    assert lcm_timesteps(1).tolist() == [999]
    assert lcm_timesteps(2).tolist() == [999, 499]
    assert lcm_timesteps(4).tolist() == [999, 759, 499, 259]
    assert lcm_timesteps(4, strength=0.8).tolist() == [799, 599, 399, 199]
    assert lcm_timesteps(4).dtype == torch.long
    assert torch.equal(lcm_timesteps(torch.tensor(4)), lcm_timesteps(4))  # 0-dim integer tensors are fine


@pytest.mark.parametrize("strength", [1.0, 0.8, 0.5, 0.3])
@pytest.mark.parametrize("original", [50, 32, 8])
def test_lcm_grid_matches_diffusers(strength, original):
    sched = LCMScheduler()
    for n in range(1, 9):
        if n > int(original * strength):
            with pytest.raises(ValueError):
                lcm_timesteps(n, original_inference_steps=original, strength=strength)
            continue
        sched.set_timesteps(n, original_inference_steps=original, strength=strength)
        ours = lcm_timesteps(n, original_inference_steps=original, strength=strength)
        assert torch.equal(ours, sched.timesteps), (n, strength, original)


@pytest.mark.parametrize("strength", [1.0, 0.75, 0.5])
def test_tcd_grid_matches_diffusers(strength):
    sched = TCDScheduler()
    for n in range(1, 9):
        # original_inference_steps taken from the config
        sched.set_timesteps(n, strength=strength)
        assert torch.equal(tcd_timesteps(n, strength=strength), sched.timesteps)
        # original_inference_steps passed explicitly: diffusers draws from all training timesteps
        sched.set_timesteps(n, original_inference_steps=50, strength=strength)
        assert torch.equal(tcd_timesteps(n, strength=strength, dense_origin=True), sched.timesteps)
    assert tcd_timesteps(4).tolist() == [999, 759, 499, 259]
    assert tcd_timesteps(4, dense_origin=True).tolist() == [999, 749, 499, 249]


# ---------------------------------------------------------------------------- DDIM grids


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps_offset", [0, 1])
def test_ddim_grid_matches_diffusers(spacing, steps_offset):
    sched = DDIMScheduler(timestep_spacing=spacing, steps_offset=steps_offset)
    for n in [1, 2, 3, 4, 7, 10, 25, 50, 333, 999]:
        sched.set_timesteps(n)
        ours = ddim_timesteps(n, timestep_spacing=spacing, steps_offset=steps_offset)
        assert torch.equal(ours, sched.timesteps.long()), (spacing, steps_offset, n)


def test_img2img_timesteps_like_sd_pipeline():
    grid = ddim_timesteps(50, steps_offset=1)
    for strength in [1.0, 0.8, 0.75, 0.5, 0.31, 0.02]:
        n = len(grid)
        init = min(int(n * strength), n)
        expected = grid[max(n - init, 0):]
        assert torch.equal(img2img_timesteps(grid, strength), expected)
    assert img2img_timesteps(grid, 0.5).tolist()[0] == 481
    with pytest.raises(ValueError, match="keeps no step"):
        img2img_timesteps(grid, 0.01)


def test_timesteps_for():
    s = NoiseSchedule.from_config()
    assert torch.equal(timesteps_for("lcm", 4, s), lcm_timesteps(4))
    assert torch.equal(timesteps_for("lcm", 4, s, strength=0.5), lcm_timesteps(4, strength=0.5))
    assert torch.equal(timesteps_for("tcd", 4, s), tcd_timesteps(4))
    sched = DDIMScheduler.from_config(SD_CONFIG)
    sched.set_timesteps(50)
    assert torch.equal(timesteps_for("ddim", 50, s), sched.timesteps)
    assert torch.equal(timesteps_for("ddim", 50, s, strength=0.5), sched.timesteps[25:])
    with pytest.raises(ValueError, match="sampler_name"):
        timesteps_for("euler", 4, s)


# ---------------------------------------------------------------------------- impossible arguments


@pytest.mark.parametrize("fn", [lcm_timesteps, tcd_timesteps])
def test_consistency_grid_errors(fn):
    with pytest.raises(ValueError, match="original_inference_steps"):
        fn(51, original_inference_steps=50)
    for strength in [0, -0.1, 1.5]:
        with pytest.raises(ValueError, match=r"strength.*\(0, 1\]"):
            fn(4, strength=strength)
    with pytest.raises(ValueError, match="strength"):
        fn(8, original_inference_steps=10, strength=0.5)  # int(10 * 0.5) = 5 < 8
    for n in [0, -1]:
        with pytest.raises(ValueError, match="num_inference_steps"):
            fn(n)
    with pytest.raises(ValueError, match="num_inference_steps"):
        fn(2.5)


def test_lcm_original_steps_larger_than_train_timesteps():
    with pytest.raises(ValueError, match="original_inference_steps"):
        lcm_timesteps(4, num_train_timesteps=100, original_inference_steps=200)


def test_ddim_grid_errors():
    for n in [0, -3, 1001]:
        with pytest.raises(ValueError, match="num_inference_steps"):
            ddim_timesteps(n)
    with pytest.raises(ValueError, match="timestep_spacing"):
        ddim_timesteps(10, timestep_spacing="karras")
    for strength in [0, -0.1, 1.5]:
        with pytest.raises(ValueError, match="strength"):
            img2img_timesteps(ddim_timesteps(10), strength)


# ---------------------------------------------------------------------------- solver grids and sigmas


def test_ddim_solver_timesteps():
    ts = ddim_solver_timesteps(1000, 50)
    assert ts.tolist() == list(range(19, 1000, 20))
    assert ts.dtype == torch.long
    assert previous_solver_timestep(torch.tensor([999, 19, 5]), 20).tolist() == [979, 0, 0]
    with pytest.raises(ValueError, match="num_ddim_timesteps"):
        ddim_solver_timesteps(1000, 0)


def test_karras_and_ct_sigmas():
    k = karras_sigmas(10)
    assert k[0].item() == pytest.approx(80.0) and k[-1].item() == pytest.approx(0.002)
    assert bool((k[1:] < k[:-1]).all())
    c = ct_sigmas(10)
    assert torch.allclose(c, k.flip(0))
    rho, lo, hi, N = 7.0, 0.002, 80.0, 11
    expected = [(lo ** (1 / rho) + (i - 1) / (N - 1) * (hi ** (1 / rho) - lo ** (1 / rho))) ** rho for i in range(1, N + 1)]
    assert ct_sigmas(N).tolist() == pytest.approx(expected, rel=1e-6)
    assert karras_sigmas(1).tolist() == [80.0]
    with pytest.raises(ValueError, match="N"):
        ct_sigmas(1)
    with pytest.raises(ValueError, match="sigma_min"):
        karras_sigmas(5, sigma_min=1.0, sigma_max=0.5)
    assert math.isclose(float(karras_sigmas(3, rho=1.0)[1]), 40.001, rel_tol=1e-6)
