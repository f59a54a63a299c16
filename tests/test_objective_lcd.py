"""LCD objective (lcm_lab.objectives.lcd) against an independent step-by-step computation.

The reference side uses only torch, diffusers' ``alphas_cumprod`` and the UNets, and follows
the LCM paper and the diffusers reference script literally: teacher run separately on cond and on
uncond, x0/eps from eps- or v-outputs, LCM-form CFG, DDIM to ``s = max(t - 20, 0)``, boundary scalings
with ``timestep_scaling = 10`` and ``sigma_data = 0.5``, target ``f(x_s, s)`` from the target net,
prediction ``f(x_t, t)`` from the student, l2 or pseudo-Huber loss. The randomness ``(t, s, noise, w)``
is taken from ``LCDLoss.sample_inputs`` with a seeded generator; ``LCDLoss.__call__`` with the same
seed must give the same loss.
"""

import copy
import math

import pytest
import torch
from diffusers import DDIMScheduler, LCMScheduler, UNet2DConditionModel

from lcm_lab.core.parameterization import guidance_scale_embedding
from lcm_lab.core.schedules import NoiseSchedule
from lcm_lab.models.sdxl import make_time_ids, sdxl_uncond
from lcm_lab.models.student import make_w_student
from lcm_lab.core.conditioning import Conditioning
from lcm_lab.objectives.lcd import LCDConfig, LCDLoss

pytestmark = pytest.mark.usefixtures("single_thread_torch")

SD_SCHED = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                steps_offset=1, clip_sample=False, set_alpha_to_one=False)
W_DIM = 32
B = 4
TOL = dict(rtol=1e-5, atol=1e-5)
SEED = 1234
SD_TEXT = 32  # cross_attention_dim of the tiny SD UNet
XL_TEXT = 64  # two 32-wide encoders concatenated
XL_POOLED = 32
XL_TIME_DIM = 8


# ------------------------------------------------------------------------ independent reference


def ref_schedule(prediction_type):
    """(alphas_cumprod, prediction_type) from a diffusers scheduler: eps from DDIM, v from LCM configs."""
    cls = DDIMScheduler if prediction_type == "epsilon" else LCMScheduler
    sched = cls.from_config({**SD_SCHED, "prediction_type": prediction_type})
    return sched.alphas_cumprod.clone(), prediction_type


def ref_abar(abar, t):
    return abar[t].view(-1, 1, 1, 1)


def ref_x0_eps(out, x, abar_t, prediction_type):
    a, s = abar_t.sqrt(), (1 - abar_t).sqrt()
    if prediction_type == "epsilon":
        return (x - s * out) / a, out
    assert prediction_type == "v_prediction"
    return a * x - s * out, a * out + s * x


def ref_w_embedding(w, dim):
    """Sinusoidal guidance embedding: half = dim/2, freq_j = exp(-j ln(1e4)/(half-1)), [sin, cos](1000 w freq)."""
    half = dim // 2
    step = torch.log(torch.tensor(10000.0)) / (half - 1)
    freq = torch.exp(-step * torch.arange(half, dtype=torch.float32))
    arg = (w.float() * 1000.0)[:, None] * freq[None, :]
    return torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)


def ref_scalings(t, timestep_scaling=10.0, sigma_data=0.5):
    st = timestep_scaling * t.double().view(-1, 1, 1, 1)
    c_skip = sigma_data**2 / (st**2 + sigma_data**2)
    c_out = st / torch.sqrt(st**2 + sigma_data**2)
    return c_skip.float(), c_out.float()


def ref_unet(net, x, t, ehs, added=None, w_emb=None):
    kwargs = {} if added is None else {"added_cond_kwargs": added}
    return net(x, t, encoder_hidden_states=ehs, timestep_cond=w_emb, **kwargs).sample.float()


def ref_f(net, x, t, ehs, added, w_emb, abar, prediction_type, **scalings):
    with torch.no_grad():
        out = ref_unet(net, x, t, ehs, added, w_emb)
    x0, _ = ref_x0_eps(out, x, ref_abar(abar, t), prediction_type)
    c_skip, c_out = ref_scalings(t, **scalings)
    return c_skip * x + c_out * x0


def ref_teacher_step(teacher, x_t, t, ehs, added, uncond_ehs, uncond_added, w, abar, prediction_type):
    """Two separate teacher forwards (cond, uncond), LCM-form CFG, DDIM step to max(t - 20, 0)."""
    with torch.no_grad():
        out_c = ref_unet(teacher, x_t, t, ehs, added)
        out_u = ref_unet(teacher, x_t, t, uncond_ehs, uncond_added)
    abar_t = ref_abar(abar, t)
    x0_c, eps_c = ref_x0_eps(out_c, x_t, abar_t, prediction_type)
    x0_u, eps_u = ref_x0_eps(out_u, x_t, abar_t, prediction_type)
    w = w.view(-1, 1, 1, 1)
    x0 = x0_c + w * (x0_c - x0_u)
    eps = eps_c + w * (eps_c - eps_u)
    s = torch.where(t - 20 < 0, torch.zeros_like(t), t - 20)
    abar_s = ref_abar(abar, s)
    return abar_s.sqrt() * x0 + (1 - abar_s).sqrt() * eps


def ref_distance(pred, target, loss_type):
    if loss_type == "l2":
        return ((pred - target) ** 2).mean()
    c = 0.001
    return (torch.sqrt((pred - target) ** 2 + c * c) - c).mean()


def ref_lcd(teacher, student, target, abar, prediction_type, z, ehs, added, uncond_ehs, uncond_added,
            t, noise, w, w_dim, loss_type):
    """The whole LCD step; returns a dict of every intermediate."""
    abar_t = ref_abar(abar, t)
    x_t = abar_t.sqrt() * z + (1 - abar_t).sqrt() * noise
    w_emb = None if w_dim is None else ref_w_embedding(w, w_dim)
    x_s = ref_teacher_step(teacher, x_t, t, ehs, added, uncond_ehs, uncond_added, w, abar, prediction_type)
    s = (t - 20).clamp(min=0)
    tgt = ref_f(target, x_s, s, ehs, added, w_emb, abar, prediction_type)
    pred = ref_f(student, x_t, t, ehs, added, w_emb, abar, prediction_type)
    return dict(x_t=x_t, x_s=x_s, s=s, w_emb=w_emb, target=tgt, pred=pred,
                loss=ref_distance(pred, tgt, loss_type))


def assert_close(ours, ref, what):
    assert torch.isfinite(ref).all(), what
    torch.testing.assert_close(ours, ref, **TOL, msg=lambda m: f"{what}: {m}")


# ------------------------------------------------------------------------ tiny networks


def perturb(net, seed, scale=0.02):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return net


def frozen(net):
    return net.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def sd_nets():
    """teacher (SD-style, eps/v agnostic), w-student (+ target) and plain student (+ target)."""
    torch.manual_seed(0)
    teacher = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=SD_TEXT, norm_num_groups=8, attention_head_dim=8,
    )
    teacher = frozen(teacher)
    torch.manual_seed(1)
    w_student = frozen(perturb(make_w_student(teacher, W_DIM), 2))
    w_target = frozen(perturb(copy.deepcopy(w_student), 3))
    plain_student = frozen(perturb(copy.deepcopy(teacher), 4))
    plain_target = frozen(perturb(copy.deepcopy(plain_student), 5))
    return dict(teacher=teacher, w=(w_student, w_target), plain=(plain_student, plain_target))


@pytest.fixture(scope="module")
def sd_data():
    g = torch.Generator().manual_seed(99)
    z = torch.randn(B, 4, 8, 8, generator=g)
    ehs = torch.randn(B, 7, SD_TEXT, generator=g)
    uncond = torch.randn(1, 7, SD_TEXT, generator=g)  # stands for text_encoder("")
    return z, ehs, uncond


@pytest.fixture(scope="module")
def xl_nets():
    torch.manual_seed(10)
    teacher = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8, transformer_layers_per_block=1, cross_attention_dim=XL_TEXT,
        addition_embed_type="text_time", addition_time_embed_dim=XL_TIME_DIM,
        projection_class_embeddings_input_dim=6 * XL_TIME_DIM + XL_POOLED,
    )
    teacher = frozen(teacher)
    torch.manual_seed(11)
    student = frozen(perturb(make_w_student(teacher, W_DIM), 12))
    target = frozen(perturb(copy.deepcopy(student), 13))
    return teacher, student, target


def xl_cond(time_ids=None):
    g = torch.Generator().manual_seed(77)
    ehs = torch.randn(B, 7, XL_TEXT, generator=g)
    pooled = torch.randn(B, XL_POOLED, generator=g)
    if time_ids is None:
        time_ids = make_time_ids(B, (64, 48), (0, 0), (64, 48))
    return Conditioning(ehs, {"text_embeds": pooled, "time_ids": time_ids})


def make_loss(pred_type, teacher, uncond, w_dim, loss_type="huber", **cfg):
    abar, _ = ref_schedule(pred_type)
    cls = DDIMScheduler if pred_type == "epsilon" else LCMScheduler
    schedule = NoiseSchedule.from_scheduler(cls.from_config({**SD_SCHED, "prediction_type": pred_type}).config)
    assert schedule.prediction_type == pred_type
    assert torch.equal(schedule.alphas_cumprod, abar)
    return LCDLoss(LCDConfig(loss_type=loss_type, **cfg), teacher, schedule, uncond, w_embedding_dim=w_dim), abar


def gen(seed=SEED):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------ config and sampling


def test_config_defaults_and_validation():
    cfg = LCDConfig()
    assert (cfg.num_ddim_timesteps, cfg.w_min, cfg.w_max, cfg.loss_type, cfg.huber_c) == (50, 5.0, 15.0, "huber", 0.001)
    assert (cfg.timestep_scaling, cfg.target_ema_decay) == (10.0, 0.95)
    LCDConfig(loss_type="l2", w_min=3.0, w_max=3.0)
    with pytest.raises(ValueError, match="loss_type"):
        LCDConfig(loss_type="l1")
    with pytest.raises(ValueError, match="w_min"):
        LCDConfig(w_min=10.0, w_max=5.0)
    with pytest.raises(ValueError):
        LCDConfig(w_min=-1.0)
    with pytest.raises(ValueError):
        LCDConfig(huber_c=0.0)
    with pytest.raises(ValueError):
        LCDConfig(target_ema_decay=1.0)
    # sigma_data is fixed by diffusers' LCMScheduler (it has no config entry there), so it has none here
    with pytest.raises(TypeError, match="sigma_data"):
        LCDConfig(sigma_data=1.0)
    for bad in (0.0, -10.0, float("nan")):
        with pytest.raises(ValueError, match="timestep_scaling"):
            LCDConfig(timestep_scaling=bad)
    with pytest.raises(ValueError, match="num_ddim_timesteps"):
        LCDConfig(num_ddim_timesteps=0)
    with pytest.raises(ValueError, match="huber_c"):
        LCDConfig(huber_c=-1e-3)


def test_solver_grid_and_sampling(sd_nets, sd_data):
    _, _, uncond = sd_data
    loss_obj, _ = make_loss("epsilon", sd_nets["teacher"], Conditioning(uncond), W_DIM, w_min=3.0, w_max=15.0)
    grid = list(range(19, 1000, 20))
    assert len(grid) == 50 and grid[-1] == 999
    assert loss_obj.solver_timesteps.tolist() == grid and loss_obj.k == 20
    lat = torch.zeros(6000, 1, 1, 1)
    t, s, noise, w = loss_obj.sample_inputs(lat, gen(0))
    assert t.dtype == torch.long and s.dtype == torch.long
    assert set(t.tolist()) == set(grid)  # every solver step is drawn
    assert torch.equal(s, (t - 20).clamp(min=0))
    assert (s[t == 19] == 0).all() and (s[t == 999] == 979).all()
    assert noise.shape == lat.shape and noise.dtype == torch.float32
    assert abs(noise.mean().item()) < 0.1 and abs(noise.std().item() - 1) < 0.1
    assert w.shape == (6000,) and (w >= 3.0).all() and (w <= 15.0).all()
    assert w.min() < 3.1 and w.max() > 14.9  # spread over the whole range
    # seeded: reproducible; another seed differs
    t2, s2, noise2, w2 = loss_obj.sample_inputs(lat, gen(0))
    assert torch.equal(t, t2) and torch.equal(noise, noise2) and torch.equal(w, w2)
    t3, _, _, w3 = loss_obj.sample_inputs(lat, gen(1))
    assert not torch.equal(t, t3) and not torch.equal(w, w3)
    # a fixed w, and a coarser solver (N = 10 -> k = 100)
    fixed, _ = make_loss("epsilon", sd_nets["teacher"], Conditioning(uncond), W_DIM, w_min=7.0, w_max=7.0,
                         num_ddim_timesteps=10)
    t, s, _, w = fixed.sample_inputs(torch.zeros(500, 1, 1, 1), gen(0))
    assert (w == 7.0).all()
    assert set(t.tolist()) == set(range(99, 1000, 100)) and torch.equal(s, (t - 100).clamp(min=0))


def test_w_embedding_reference_matches_core():
    # sanity of the reference helper against the core function (which LCDLoss uses)
    w = torch.tensor([0.0, 3.0, 7.5, 14.99])
    ref = ref_w_embedding(w, W_DIM)
    assert ref.shape == (4, W_DIM)
    assert torch.equal(ref[0], torch.cat([torch.zeros(W_DIM // 2), torch.ones(W_DIM // 2)]))
    torch.testing.assert_close(guidance_scale_embedding(w, W_DIM), ref, rtol=0, atol=1e-6)
    # the frequencies themselves
    j = torch.arange(W_DIM // 2, dtype=torch.float64)
    freq = torch.exp(-j * math.log(1e4) / (W_DIM // 2 - 1))
    torch.testing.assert_close(torch.asin(ref[1:2, : W_DIM // 2]).double()[0, :3],
                               torch.asin(torch.sin(3000 * freq[:3])), rtol=0, atol=1e-3)


# ------------------------------------------------------------------------ teacher step and f


@pytest.mark.parametrize("pred_type", ["epsilon", "v_prediction"])
def test_teacher_step_matches_reference(sd_nets, sd_data, pred_type):
    z, ehs, uncond = sd_data
    teacher = sd_nets["teacher"]
    loss_obj, abar = make_loss(pred_type, teacher, Conditioning(uncond), W_DIM)
    t = torch.tensor([19, 999, 499, 39])  # includes s = 0 and the noisiest step
    s = (t - 20).clamp(min=0)
    w = torch.tensor([5.0, 15.0, 9.3, 0.0])
    noise = torch.randn(z.shape, generator=gen(5))
    x_t = ref_abar(abar, t).sqrt() * z + (1 - ref_abar(abar, t)).sqrt() * noise
    ours = loss_obj.teacher_step(x_t, t, s, Conditioning(ehs), w)
    ref = ref_teacher_step(teacher, x_t, t, ehs, None, uncond.expand(B, -1, -1), None, w, abar, pred_type)
    assert_close(ours, ref, f"teacher_step x_s ({pred_type})")
    # w = 0 row is the plain conditional DDIM step; the guided rows differ from it
    plain = ref_teacher_step(teacher, x_t, t, ehs, None, uncond.expand(B, -1, -1), None, torch.zeros(B), abar,
                             pred_type)
    assert_close(ours[3], plain[3], "w=0 row")
    assert (ours[:3] - plain[:3]).abs().amax(dim=(1, 2, 3)).min() > 1e-3


@pytest.mark.parametrize("kind", ["w", "plain"])
@pytest.mark.parametrize("pred_type", ["epsilon", "v_prediction"])
def test_f_matches_reference(sd_nets, sd_data, pred_type, kind):
    z, ehs, uncond = sd_data
    student, _ = sd_nets[kind]
    w_dim = W_DIM if kind == "w" else None
    loss_obj, abar = make_loss(pred_type, sd_nets["teacher"], Conditioning(uncond), w_dim)
    t = torch.tensor([0, 19, 500, 999])
    w = torch.tensor([5.0, 6.5, 10.0, 15.0])
    w_emb = None if w_dim is None else ref_w_embedding(w, W_DIM)
    with torch.no_grad():
        ours = loss_obj.f(student, z, t, Conditioning(ehs), w_emb)
    ref = ref_f(student, z, t, ehs, None, w_emb, abar, pred_type)
    assert_close(ours, ref, f"f ({pred_type}, {kind})")
    assert torch.equal(ours[0], z[0])  # boundary condition f(x, 0) = x
    if kind == "w":  # the w-embedding reaches the student
        other = loss_obj.f(student, z, t, Conditioning(ehs), ref_w_embedding(w + 1.0, W_DIM)).detach()
        assert (other[1:] - ours[1:]).abs().max() > 1e-4


def test_boundary_scalings_values_and_config(sd_nets, sd_data):
    # with timestep_scaling 10 the skip term is tiny for t >= 19 (c_skip(19) = 0.25 / (190^2 + 0.25))
    c_skip, c_out = ref_scalings(torch.tensor([0, 19, 999]))
    assert c_skip.flatten().tolist() == pytest.approx([1.0, 0.25 / (190**2 + 0.25), 0.25 / (9990**2 + 0.25)], rel=1e-6)
    assert c_out.flatten().tolist() == pytest.approx([0.0, 190 / math.sqrt(190**2 + 0.25),
                                                      9990 / math.sqrt(9990**2 + 0.25)], rel=1e-6)
    # so check that f honours the config's timestep_scaling where it is visible (sigma_data is fixed at
    # 0.5, the value diffusers' LCMScheduler hardcodes)
    z, ehs, uncond = sd_data
    student, _ = sd_nets["plain"]
    t = torch.tensor([1, 19, 100, 999])
    for scaling in (0.01, 0.05):
        loss_obj, abar = make_loss("v_prediction", sd_nets["teacher"], Conditioning(uncond), None,
                                   timestep_scaling=scaling)
        with torch.no_grad():
            ours = loss_obj.f(student, z, t, Conditioning(ehs), None)
        ref = ref_f(student, z, t, ehs, None, None, abar, "v_prediction", timestep_scaling=scaling)
        assert_close(ours, ref, f"f with timestep_scaling={scaling}")
        default = ref_f(student, z, t, ehs, None, None, abar, "v_prediction")
        assert (ours - default).abs().max() > 1e-2


# ------------------------------------------------------------------------ the full loss


@pytest.mark.parametrize("loss_type", ["l2", "huber"])
@pytest.mark.parametrize("kind", ["w", "plain"])
@pytest.mark.parametrize("pred_type", ["epsilon", "v_prediction"])
def test_loss_matches_reference(sd_nets, sd_data, pred_type, kind, loss_type):
    z, ehs, uncond = sd_data
    teacher = sd_nets["teacher"]
    student, target = sd_nets[kind]
    w_dim = W_DIM if kind == "w" else None
    loss_obj, abar = make_loss(pred_type, teacher, Conditioning(uncond), w_dim, loss_type=loss_type)
    cond = Conditioning(ehs)

    t, s, noise, w = loss_obj.sample_inputs(z, gen())
    ref = ref_lcd(teacher, student, target, abar, pred_type, z, ehs, None, uncond.expand(B, -1, -1), None,
                  t, noise, w, w_dim, loss_type)
    assert torch.equal(s, ref["s"])

    # the pieces, called separately
    x_t = loss_obj.schedule.add_noise(z, noise, t)
    assert_close(x_t, ref["x_t"], "x_t")
    x_s = loss_obj.teacher_step(x_t, t, s, cond, w)
    assert_close(x_s, ref["x_s"], "x_s")
    with torch.no_grad():
        assert_close(loss_obj.f(target, x_s, s, cond, ref["w_emb"]), ref["target"], "target f(x_s, s)")
        assert_close(loss_obj.f(student, x_t, t, cond, ref["w_emb"]), ref["pred"], "prediction f(x_t, t)")

    # __call__ with the same seed draws the same (t, s, noise, w) and gives the same loss
    with torch.no_grad():
        loss, logs = loss_obj(student, target, z, cond, generator=gen())
    assert torch.equal(logs["t"], t) and torch.equal(logs["w"], w)
    assert_close(logs["pred"], ref["pred"], "logs['pred']")
    assert_close(loss, ref["loss"], f"loss ({loss_type})")
    assert loss.ndim == 0 and loss.item() > 0
    # target net actually used: target=student gives another loss
    with torch.no_grad():
        loss_same, _ = loss_obj(student, student, z, cond, generator=gen())
    assert abs(loss_same.item() - loss.item()) > 1e-6 * abs(loss.item())


def test_huber_and_l2_values():
    from lcm_lab.objectives.lcd import consistency_loss

    a = torch.tensor([0.0, 1.0, -2.0, 1e-4])
    b = torch.zeros(4)
    c = 0.001
    expected = sum(math.sqrt(x * x + c * c) - c for x in a.tolist()) / 4
    assert consistency_loss(a, b, "huber", c).item() == pytest.approx(expected, rel=1e-6)
    assert consistency_loss(a, b, "l2").item() == pytest.approx(sum(x * x for x in a.tolist()) / 4, rel=1e-6)
    with pytest.raises(ValueError, match="loss_type.*'l1'"):
        consistency_loss(a, b, "l1")  # used to fall through to pseudo-Huber


# ------------------------------------------------------------------------ gradients


def test_gradients_reach_student_only(sd_nets, sd_data):
    z, ehs, uncond = sd_data
    teacher = copy.deepcopy(sd_nets["teacher"]).requires_grad_(True)
    student, target = (copy.deepcopy(n).requires_grad_(True) for n in sd_nets["w"])
    loss_obj, _ = make_loss("epsilon", teacher, Conditioning(uncond), W_DIM)
    loss, logs = loss_obj(student, target, z, Conditioning(ehs), generator=gen())
    assert loss.requires_grad
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters()), "teacher got gradients"
    assert all(p.grad is None for p in target.parameters()), "target got gradients"
    grads = [p.grad for p in student.parameters()]
    assert all(g is not None for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0
    assert student.time_embedding.cond_proj.weight.grad.abs().sum() > 0  # through the w-embedding
    assert not logs["loss"].requires_grad

    # target = student (LoRA-style, no EMA): same gradient as a detached copy of the student as target
    def grads_with(tgt):
        net = copy.deepcopy(sd_nets["w"][0]).requires_grad_(True)
        loss, _ = loss_obj(net, net if tgt is None else tgt, z, Conditioning(ehs), generator=gen())
        loss.backward()
        return torch.cat([p.grad.flatten() for p in net.parameters()])

    g_self = grads_with(None)
    g_copy = grads_with(frozen(copy.deepcopy(sd_nets["w"][0])))
    torch.testing.assert_close(g_self, g_copy, rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------------ SDXL conditioning


@pytest.mark.parametrize("uncond_time_ids", ["cond", "zeros"])
@pytest.mark.parametrize("pred_type", ["epsilon", "v_prediction"])
def test_sdxl_target_matches_reference(xl_nets, pred_type, uncond_time_ids):
    teacher, student, target = xl_nets
    cond = xl_cond()
    uncond = sdxl_uncond(cond, time_ids=uncond_time_ids)
    assert torch.count_nonzero(uncond.encoder_hidden_states) == 0
    loss_obj, abar = make_loss(pred_type, teacher, uncond, W_DIM, loss_type="l2", w_min=3.0, w_max=15.0)
    z = torch.randn(B, 4, 8, 8, generator=gen(8))

    # reference uncond, built like the reference SDXL script: zero prompt and pooled embeddings, time_ids
    # copied from the conditional added_cond_kwargs (or zeroed, for the "zeros" variant)
    ehs, added = cond.encoder_hidden_states, cond.added_cond_kwargs
    un_added = {"text_embeds": torch.zeros_like(added["text_embeds"]),
                "time_ids": added["time_ids"].clone() if uncond_time_ids == "cond"
                else torch.zeros_like(added["time_ids"])}
    t, s, noise, w = loss_obj.sample_inputs(z, gen())
    ref = ref_lcd(teacher, student, target, abar, pred_type, z, ehs, added, torch.zeros_like(ehs), un_added,
                  t, noise, w, W_DIM, "l2")

    x_s = loss_obj.teacher_step(ref["x_t"], t, s, cond, w)
    assert_close(x_s, ref["x_s"], "SDXL x_s")
    with torch.no_grad():
        assert_close(loss_obj.f(target, x_s, s, cond, ref["w_emb"]), ref["target"], "SDXL target")
        loss, logs = loss_obj(student, target, z, cond, generator=gen())
    assert_close(logs["pred"], ref["pred"], "SDXL prediction")
    assert_close(loss, ref["loss"], "SDXL loss")

    # the added conditioning matters: other pooled embeddings / time_ids change the teacher step
    other = Conditioning(ehs, {"text_embeds": added["text_embeds"] + 1.0, "time_ids": added["time_ids"]})
    assert (loss_obj.teacher_step(ref["x_t"], t, s, other, w) - x_s).abs().max() > 1e-4
    other = Conditioning(ehs, {"text_embeds": added["text_embeds"], "time_ids": added["time_ids"] * 2})
    assert (loss_obj.teacher_step(ref["x_t"], t, s, other, w) - x_s).abs().max() > 1e-4


def test_sdxl_per_sample_time_ids_reference_semantics(xl_nets):
    teacher, _, _ = xl_nets
    ids = make_time_ids(B, [(64, 48), (48, 64), (96, 96), (64, 64)], [(0, 0), (8, 0), (0, 16), (4, 4)], (64, 64))
    cond = xl_cond(ids)
    ehs, added = cond.encoder_hidden_states, cond.added_cond_kwargs
    # uncond without time_ids: each sample's own time_ids are taken from the conditional batch
    uncond = Conditioning(torch.zeros_like(ehs[:1]), {"text_embeds": torch.zeros_like(added["text_embeds"][:1])})
    loss_obj, abar = make_loss("epsilon", teacher, uncond, W_DIM)
    z = torch.randn(B, 4, 8, 8, generator=gen(8))
    t, s, noise, w = loss_obj.sample_inputs(z, gen())
    x_t = ref_abar(abar, t).sqrt() * z + (1 - ref_abar(abar, t)).sqrt() * noise
    ref = ref_teacher_step(teacher, x_t, t, ehs, added, torch.zeros_like(ehs),
                           {"text_embeds": torch.zeros_like(added["text_embeds"]), "time_ids": ids}, w, abar,
                           "epsilon")
    ours = loss_obj.teacher_step(x_t, t, s, cond, w)
    assert_close(ours, ref, "rows with their own time_ids")


def test_uncond_takes_only_time_ids_from_cond(xl_nets):
    teacher, _, _ = xl_nets
    cond = xl_cond(make_time_ids(B, [(64, 48), (48, 64), (96, 96), (64, 64)], (0, 0), (64, 64)))
    added = cond.added_cond_kwargs
    zeros_ehs = torch.zeros_like(cond.encoder_hidden_states[:1])
    # uncond with zero pooled embeddings and no time_ids: time_ids per sample from cond, text_embeds its own
    loss_obj, _ = make_loss("epsilon", teacher, sdxl_uncond(cond), W_DIM)
    un = loss_obj.uncond_for(cond)
    assert torch.equal(un.added_cond_kwargs["time_ids"], added["time_ids"])
    assert torch.count_nonzero(un.added_cond_kwargs["text_embeds"]) == 0
    assert un.added_cond_kwargs["text_embeds"].shape == added["text_embeds"].shape
    # uncond without text_embeds must not silently take the conditional pooled embeddings
    loss_obj, _ = make_loss("epsilon", teacher, Conditioning(zeros_ehs, {"time_ids": added["time_ids"][:1]}), W_DIM)
    with pytest.raises(ValueError, match="'text_embeds'"):
        loss_obj.uncond_for(cond)
    loss_obj, _ = make_loss("epsilon", teacher, Conditioning(zeros_ehs), W_DIM)
    with pytest.raises(ValueError, match="'text_embeds'"):
        loss_obj.uncond_for(cond)


def test_conditioning_cat_requires_matching_added_keys():
    ehs = torch.randn(2, 3, 4)
    added = {"text_embeds": torch.randn(2, 5), "time_ids": torch.randn(2, 6)}
    both = Conditioning.cat(Conditioning(ehs, added), Conditioning(-ehs, {k: -v for k, v in added.items()}))
    assert len(both) == 4 and set(both.added_cond_kwargs) == set(added)
    assert torch.equal(both.added_cond_kwargs["time_ids"], torch.cat([added["time_ids"], -added["time_ids"]]))
    assert Conditioning.cat(Conditioning(ehs), Conditioning(ehs)).added_cond_kwargs is None
    with pytest.raises(ValueError, match="added_cond_kwargs"):
        Conditioning.cat(Conditioning(ehs), Conditioning(ehs, added))  # used to drop b's kwargs
    with pytest.raises(ValueError, match="added_cond_kwargs"):
        Conditioning.cat(Conditioning(ehs, added), Conditioning(ehs))
    with pytest.raises(ValueError, match="text_embeds"):
        Conditioning.cat(Conditioning(ehs, added), Conditioning(ehs, {"time_ids": added["time_ids"]}))
