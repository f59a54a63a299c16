"""RG-LCD: the pairwise KL of the latent reward model, the gradient paths of the two modes, frozen reward
models under training, the LRM learning a non-differentiable expert, exact resume, and config errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lcm_lab.rewards.lrm import LatentRewardModel, LRMTrainer, listwise_kl_loss, pairwise_accuracy, pairwise_kl_loss
from lcm_lab.training import load_method_config
from lcm_lab.training.checkpoint import CheckpointError
from lcm_lab.training.config import ConfigError
from lcm_lab.training.rg_lcd import RGLCDTask
from lcm_lab.training.trainer import step_generator, train

from helpers.tiny_run import tiny_overrides as _tiny_overrides
from helpers.two_ranks import exported_unet, relative_gap, run_two_cpu_ranks

pytestmark = pytest.mark.usefixtures("single_thread_torch")

REPO = Path(__file__).resolve().parents[1]
TOY_LRM = REPO / "configs/toy/rg_lcd.yaml"
TOY_DIRECT = REPO / "configs/toy/rg_lcd_direct.yaml"


RG_TINY = {"reward.lrm_lr": 1e-3, "reward.lrm_subset": 3, "reward.lrm_pretrain_steps": 0}


def tiny_overrides(out: Path, steps: int, **extra) -> list[str]:
    return _tiny_overrides(out, steps, **{**RG_TINY, **extra})


def make_task(out: Path, config: Path, steps: int = 2, **extra) -> RGLCDTask:
    return RGLCDTask(load_method_config("rg_lcd", config, tiny_overrides(out, steps, **extra)))


# ----------------------------------------------------------------------------- (a) pairwise KL


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def test_pairwise_kl_loss_matches_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    n = 5
    expert, lrm = torch.rand(3, n, generator=g), torch.rand(3, n, generator=g) * 2 - 1
    for scale in (1.0, 7.0, 100.0):
        total = 0.0
        for b in range(n):
            for i, j in ((0, 1), (0, 2), (1, 2)):
                # two-way softmax of logits (a, b): log p_a = log sigmoid(a - b); KL(p || q) written out
                e_i, e_j = scale * float(expert[i, b]), scale * float(expert[j, b])
                l_i, l_j = scale * float(lrm[i, b]), scale * float(lrm[j, b])
                lp_i, lp_j = log_sigmoid(e_i - e_j), log_sigmoid(e_j - e_i)
                lq_i, lq_j = log_sigmoid(l_i - l_j), log_sigmoid(l_j - l_i)
                total += math.exp(lp_i) * (lp_i - lq_i) + math.exp(lp_j) * (lp_j - lq_j)
        expected = total / n
        got = pairwise_kl_loss(expert.double(), lrm.double(), scale)
        assert math.isclose(float(got), expected, rel_tol=1e-9, abs_tol=1e-12), (scale, float(got), expected)
    # zero when the LRM's logits equal the expert's; gradients reach the LRM scores only
    assert float(pairwise_kl_loss(expert, expert.clone(), 100.0)) == pytest.approx(0.0, abs=1e-6)
    e, l = expert.clone().requires_grad_(True), lrm.clone().requires_grad_(True)
    pairwise_kl_loss(e, l, 10.0).backward()
    assert e.grad is None and l.grad is not None and l.grad.abs().sum() > 0
    # accuracy: the same ordering everywhere is 1, the reversed one 0
    assert pairwise_accuracy(expert, 2 * expert) == 1.0 and pairwise_accuracy(expert, -expert) == 0.0


def test_listwise_kl_loss_matches_a_hand_computation():
    g = torch.Generator().manual_seed(1)
    n = 4
    expert, lrm = torch.rand(n, n, generator=g), torch.rand(n, n, generator=g) * 2 - 1
    for scale in (1.0, 100.0):
        def kl(p_logits, q_logits):
            zp = math.log(sum(math.exp(v) for v in p_logits))
            zq = math.log(sum(math.exp(v) for v in q_logits))
            return sum(math.exp(a - zp) * ((a - zp) - (b - zq)) for a, b in zip(p_logits, q_logits))

        e, l = (scale * expert.double()).tolist(), (scale * lrm.double()).tolist()
        per_prompt = [kl([e[i][j] for i in range(n)], [l[i][j] for i in range(n)]) for j in range(n)]
        per_latent = [kl(e[i], l[i]) for i in range(n)]
        expected = sum(per_prompt) / n + sum(per_latent) / n
        got = listwise_kl_loss(expert.double(), lrm.double(), scale)
        assert math.isclose(float(got), expected, rel_tol=1e-9), (scale, float(got), expected)
    # with two latents and a constant column the per-prompt term is the pairwise loss of those two latents
    two = torch.rand(2, 1, generator=g)
    other = torch.rand(2, 1, generator=g)
    assert float(listwise_kl_loss(two, other, 10.0)) == pytest.approx(float(pairwise_kl_loss(two, other, 10.0)))
    assert float(listwise_kl_loss(expert, expert.clone())) == pytest.approx(0.0, abs=1e-6)


def test_score_matrix_scores_every_image_against_every_prompt():
    """The embedding shortcut of CLIP-like rewards and the generic all-pairs path give ``reward(image_i, prompt_j)``."""
    from lcm_lab.rewards import parse_reward_spec
    from lcm_lab.toy.world import ToyWorld

    world = ToyWorld(0)
    samples = [world[i] for i in range(3)]
    images = torch.stack([torch.from_numpy(s.image).permute(2, 0, 1).float() / 255 for s in samples])
    prompts = [s.caption for s in samples] + ["a red circle"]
    mix = parse_reward_spec("0.01*toy-clip+0.5*jpeg-compressibility", {"toy-clip": {"clip_at_zero": False}})
    clip, jpeg = mix.models
    with torch.no_grad():
        for reward in (clip, jpeg, mix):
            matrix = reward.score_matrix(images, prompts)
            pairs = torch.stack([reward(images, [p] * 3) for p in prompts], dim=1)
            assert matrix.shape == (3, 4)
            torch.testing.assert_close(matrix, pairs, rtol=1e-5, atol=1e-5)
    assert len(set(clip.score_matrix(images, prompts).flatten().tolist())) == 12  # it does depend on both
    with pytest.raises(ValueError, match="prompts"):
        clip.score_matrix(images, "a red circle")


# ----------------------------------------------------------------------------- (b) gradient paths


def _one_loss(task: RGLCDTask):
    """setup + one micro-batch loss and backward, with the VAE opened to gradients and its decoder watched."""
    from accelerate import Accelerator

    task.setup(Accelerator(cpu=True), channels_last="none")
    vae = task.ldm.vae
    vae.requires_grad_(True)
    calls = {"grad": 0, "no_grad": 0}
    vae.decoder.register_forward_hook(
        lambda *_: calls.__setitem__("grad" if torch.is_grad_enabled() else "no_grad",
                                     calls["grad" if torch.is_grad_enabled() else "no_grad"] + 1))
    batch = next(task.batches(0, 0))
    loss, logs = task.loss(task.student, batch, step_generator(0, 0, 0))
    loss.backward()
    decoder_grads = [p.grad for p in vae.decoder.parameters()]
    student_grad = dict(task.student.named_parameters())["time_embedding.cond_proj.weight"].grad
    return calls, decoder_grads, student_grad, logs


def test_lrm_mode_keeps_the_vae_decoder_out_of_the_student_gradient(tmp_path):
    task = make_task(tmp_path, TOY_LRM)
    calls, decoder_grads, student_grad, logs = _one_loss(task)
    assert calls["grad"] == 0 and calls["no_grad"] == 0, calls  # the loss never decodes
    assert all(g is None for g in decoder_grads)
    assert student_grad is not None and student_grad.abs().sum() > 0
    assert all(p.grad is None for p in task.lrm.parameters())  # the LRM is frozen in the student's step
    assert set(logs) >= {"loss", "lcd_loss", "reward"}
    beta = task.config.reward.reward_scale
    assert float(logs["loss"]) == pytest.approx(float(logs["lcd_loss"]) - beta * float(logs["reward"]), abs=1e-5)
    # the proxy update decodes, without gradient, and leaves the VAE untouched
    step_logs = task.after_step(1)
    assert calls["grad"] == 0 and calls["no_grad"] >= 1
    assert all(p.grad is None for p in task.ldm.vae.decoder.parameters())
    assert {"lrm_loss", "lrm_pairwise_acc", "expert_reward"} <= set(step_logs)


def test_lrm_reward_term_is_the_proxy_score_of_the_prediction_and_trains_the_student(tmp_path):
    """The reward is the frozen LRM's mean score of the student's single-step prediction, and its gradient
    reaches the student: d loss = d consistency_loss(pred, target) - beta d mean LRM(pred), by autograd."""
    from accelerate import Accelerator

    from lcm_lab.objectives.lcd import consistency_loss

    task = make_task(tmp_path, TOY_LRM)
    task.setup(Accelerator(cpu=True), channels_last="none")
    seen = {}
    objective = task.rg_objective

    def recording(student, target, latents, cond, prompts, generator=None):
        loss, logs = objective(student, target, latents, cond, prompts, generator)
        seen.update(logs=logs, cond=cond.encoder_hidden_states)
        return loss, logs

    task.rg_objective = recording
    loss, _ = task.loss(task.student, next(task.batches(0, 0)), step_generator(0, 0, 0))
    logs, beta, ocfg = seen["logs"], task.config.reward.reward_scale, task.config.objective
    score = task.lrm(logs["pred"], seen["cond"]).mean()
    assert float(logs["reward"]) == pytest.approx(score.detach().item(), abs=1e-6)
    param = dict(task.student.named_parameters())["conv_out.weight"]
    (reward_grad,) = torch.autograd.grad(score, param, retain_graph=True)
    assert reward_grad.abs().sum() > 0
    expected = consistency_loss(logs["pred"], logs["target"], ocfg.loss_type, ocfg.huber_c) - beta * score
    (got,) = torch.autograd.grad(loss, param, retain_graph=True)
    (want,) = torch.autograd.grad(expected, param)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)


def test_lrm_update_gets_aligned_prediction_target_data_triplets(tmp_path):
    """The proxy's update sees, for each kept sample, the student's prediction, the LCD target (from the EMA
    target net) and the data latent of the SAME sample, with that sample's prompt and text states."""
    from accelerate import Accelerator

    task = make_task(tmp_path, TOY_LRM)
    task.setup(Accelerator(cpu=True), channels_last="none")
    seen = {}
    objective = task.rg_objective

    class Recording:
        def __call__(self, student, target, latents, cond, prompts, generator=None):
            loss, logs = objective(student, target, latents, cond, prompts, generator)
            seen.update(latents=latents, cond=cond.encoder_hidden_states, prompts=list(prompts), logs=logs,
                        target_net=target)
            return loss, logs

    task.rg_objective = Recording()
    task.loss(task.student, next(task.batches(0, 0)), step_generator(0, 0, 0))
    assert seen["target_net"] is task.ema.model  # the LCD target comes from the EMA target network
    pending = task._pending
    pred, target, data = pending["sets"]
    n = len(pending["prompts"])
    assert n == task.config.reward.lrm_subset == 3 and pred.shape[0] == target.shape[0] == data.shape[0] == n
    for j in range(n):  # find each kept sample in the batch by its data latent
        matches = [i for i in range(len(seen["prompts"])) if torch.equal(seen["latents"][i], data[j])]
        assert len(matches) == 1
        i = matches[0]
        assert torch.equal(pred[j], seen["logs"]["pred"][i].detach())
        assert torch.equal(target[j], seen["logs"]["target"][i])
        assert pending["prompts"][j] == seen["prompts"][i]
        assert torch.equal(pending["text_states"][j], seen["cond"][i])
    assert not pred.requires_grad  # the proxy update never reaches the student


def test_two_cpu_ranks_keep_identical_student_and_lrm(tmp_path):
    """The LRM's gradients are all-reduced like the student's: two CPU ranks (gloo) that train
    on different data end with the same student and the same latent reward model."""
    r0, r1, info = run_two_cpu_ranks(tmp_path, "rg_lcd")
    assert r0.keys() == r1.keys() and any(k.startswith("lrm.") for k in r0)
    assert all(torch.equal(r0[k], r1[k]) for k in r0), [k for k in r0 if not torch.equal(r0[k], r1[k])][:5]
    assert info["world_size"] == 2 and info["batches_differ"] and info["losses_differ"]
    assert info["changed"] == {"student": True, "lrm": True}


@pytest.mark.parametrize("config", ["rg_lcd", "rg_lcd_direct"])
def test_fsdp_follows_ddp(tmp_path, config):
    """RG-LCD with the student sharded over two CPU ranks (configs/accelerate/fsdp.yaml) against DDP, in LRM mode
    and in direct mode (the reward's gradient through the replicated VAE decoder and expert): the exported
    student lands where DDP's does up to the float-sum order of the gradient reduction. In LRM mode the
    replicated proxy stays identical on both ranks and close to DDP's (its preference targets come from the
    student's predictions, so the rounding reaches it too)."""
    from safetensors.torch import load_file

    from lcm_lab.models.sd import toy_teacher_dir

    f0, f1, info = run_two_cpu_ranks(tmp_path / "fsdp", config, fsdp=True)
    d0, _, _ = run_two_cpu_ranks(tmp_path / "ddp", config)
    assert info["sharded"] and info["world_size"] == 2
    lrm = [k for k in d0 if k.startswith("lrm.")]
    assert bool(lrm) == (config == "rg_lcd")
    if lrm:
        assert all(torch.equal(f0[k], f1[k]) for k in lrm)
        proxy = relative_gap(f0, d0, load_file(tmp_path / "ddp" / "lrm_initial.safetensors"), lrm)
        print(f"RG-LCD lrm: |FSDP - DDP| / |DDP - initial| = {proxy:.2g}")  # benchmarks/RESULTS.md
        assert proxy < 0.03
    teacher = load_file(toy_teacher_dir() / "unet/diffusion_pytorch_model.safetensors")
    for unet in ("unet", "unet_target"):
        student = relative_gap(*(exported_unet(tmp_path / mode / "run", unet) for mode in ("fsdp", "ddp")), teacher)
        print(f"{config} {unet}: |FSDP - DDP| / |DDP - teacher| = {student:.2g}")
        assert student < 2e-3, unet


def test_direct_mode_differentiates_through_the_vae_decoder(tmp_path):
    task = make_task(tmp_path, TOY_DIRECT)
    calls, decoder_grads, student_grad, _ = _one_loss(task)
    assert calls["grad"] >= 1
    assert any(g is not None and g.abs().sum() > 0 for g in decoder_grads)
    assert student_grad is not None and student_grad.abs().sum() > 0
    assert all(p.grad is None for p in task.expert.parameters())  # expert frozen: no parameter gradients


def _direct_task_and_batch(tmp_path):
    from accelerate import Accelerator

    task = make_task(tmp_path, TOY_DIRECT)
    task.setup(Accelerator(cpu=True), channels_last="none")
    latents, texts, cond = task._prepare(next(task.batches(0, 0)), step_generator(0, 0, 0))
    return task, latents, texts, cond


def test_direct_mode_reward_is_the_experts_score_of_the_decoded_prediction(tmp_path):
    task, latents, texts, cond = _direct_task_and_batch(tmp_path)
    loss, logs = task.rg_objective(task.student, task.target_net(), latents, cond, texts, step_generator(0, 0, 1))
    with torch.no_grad():  # independently: decode the student's one-step prediction, map to [0, 1], score
        codec = task.ldm.codec
        images = (codec.decode(logs["pred"]) / 2 + 0.5).clamp(0, 1)
        expected = task.expert(images, texts).float().mean()
    assert float(logs["reward"]) == pytest.approx(float(expected), abs=1e-6)
    beta = task.config.reward.reward_scale
    assert loss.item() == pytest.approx(float(logs["lcd_loss"]) - beta * float(expected), abs=1e-6)


def test_direct_mode_decodes_in_the_vaes_dtype_under_mixed_precision(tmp_path):
    task, latents, texts, cond = _direct_task_and_batch(tmp_path)
    dtypes = []
    hook = task.ldm.vae.decoder.conv_out.register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):  # as accelerate's mixed precision
            loss, _ = task.rg_objective(task.student, task.target_net(), latents, cond, texts,
                                        step_generator(0, 0, 1))
    finally:
        hook.remove()
    assert dtypes and set(dtypes) == {torch.float32}  # the float32 VAE stays float32 (SDXL's overflows in fp16)
    assert torch.isfinite(loss)


# ----------------------------------------------------------------------------- (c) frozen reward models


@pytest.mark.parametrize("config", [TOY_LRM, TOY_DIRECT], ids=["lrm", "direct"])
def test_reward_models_are_not_trained_by_the_student_optimizer(tmp_path, monkeypatch, config):
    from lcm_lab.objectives.rg_lcd import build_expert

    task = make_task(tmp_path, config, steps=2)
    student_before = {n: p.detach().clone() for n, p in task.student.named_parameters() if p.requires_grad}
    snapshots: list[tuple[str, dict]] = []

    def lrm_weights():
        return {n: p.detach().clone() for n, p in task.lrm.named_parameters()}

    if task.lrm is not None:
        snapshots.append(("init", lrm_weights()))
        real_loss, real_update = task.loss, LRMTrainer.update

        def loss(student, batch, gen):
            snapshots.append(("loss", lrm_weights()))
            return real_loss(student, batch, gen)

        def update(self, *args, **kwargs):
            snapshots.append(("before_update", lrm_weights()))
            logs = real_update(self, *args, **kwargs)
            snapshots.append(("after_update", lrm_weights()))
            return logs

        monkeypatch.setattr(task, "loss", loss)
        monkeypatch.setattr(LRMTrainer, "update", update)
    train(task.config.train, task)

    student_ids = {id(p) for p in task.student.parameters()}
    assert not any(id(p) in student_ids for p in task.expert.parameters())
    assert all(not p.requires_grad for p in task.expert.parameters())
    fresh = build_expert(task.config.reward).state_dict()
    trained = task.expert.state_dict()
    assert fresh.keys() == trained.keys()
    assert all(torch.equal(fresh[k], trained[k].cpu()) for k in fresh), "the expert's weights changed"
    after = dict(task.student.named_parameters())
    assert all(not torch.equal(p, after[n].detach()) for n, p in student_before.items()), "the student did not learn"

    if task.lrm is not None:
        assert not any(id(p) in student_ids for p in task.lrm.parameters())
        kinds = [k for k, _ in snapshots]
        assert kinds == ["init", "loss", "before_update", "after_update", "loss", "before_update", "after_update"]
        same = lambda a, b: all(torch.equal(a[n], b[n]) for n in a)  # noqa: E731
        for (k0, w0), (k1, w1) in zip(snapshots, snapshots[1:]):
            if k1 == "after_update":
                assert not same(w0, w1), "the LRM update did not change the LRM"
            else:  # the student's forward, backward and optimizer step leave the LRM as it was
                assert same(w0, w1), f"the LRM changed between {k0} and {k1}"


# ----------------------------------------------------------------------------- (d) LRM learns a non-differentiable expert


def test_lrm_learns_jpeg_compressibility_rankings():
    """The expert is only ever called for scores (JPEG size is not differentiable), yet the LRM comes to order
    fixed latents like it. This checks fitting on fixed latents, not generalisation."""
    from diffusers import AutoencoderKL

    from lcm_lab.core.latents import LatentCodec
    from lcm_lab.models.sd import toy_teacher_dir
    from lcm_lab.rewards import load_reward
    from lcm_lab.training.data import ToyImages, collate

    vae = AutoencoderKL.from_pretrained(toy_teacher_dir() / "vae").eval().requires_grad_(False)
    codec = LatentCodec(vae)
    expert = load_reward("jpeg-compressibility")
    assert not expert.differentiable
    n = 12
    clean = codec.encode(collate([ToyImages(n)[i] for i in range(n)])["pixel_values"], no_grad=True)
    g = torch.Generator().manual_seed(0)
    # three sets, each sample with its own noise level: noisier latents decode to less compressible images
    sets = [clean + torch.rand(n, 1, 1, 1, generator=g) * 1.5 * torch.randn(clean.shape, generator=g)
            for _ in range(3)]
    text = torch.zeros(n, 1, 8)  # one prompt for all: the ranking lives in the latents
    torch.manual_seed(0)
    lrm = LatentRewardModel.from_arch("tiny", text_dim=8, latent_channels=4, width=16, embed_dim=32)
    trainer = LRMTrainer(lrm, expert, codec, lr=3e-3, logit_scale=100.0)
    expert_scores = trainer.expert_scores(sets, [""] * n)
    assert len(set(expert_scores.flatten().tolist())) > 3 * n // 2  # the expert does rank them

    def accuracy():
        with torch.no_grad():
            return pairwise_accuracy(expert_scores, torch.stack([lrm(z, text) for z in sets]))

    start = accuracy()
    history = [trainer.update(sets, text, [""] * n) for _ in range(20)]
    assert all(not p.requires_grad for p in lrm.parameters())  # frozen again after its updates
    assert history[-1]["lrm_loss"] < history[0]["lrm_loss"]
    assert accuracy() > 0.9 and accuracy() > start, (start, accuracy())
    assert history[0]["lrm_pairwise_acc"] == pytest.approx(start)  # logged before the step


# ----------------------------------------------------------------------------- checkpoints


def test_lrm_run_resumes_exactly_and_exports_the_lrm(tmp_path):
    from safetensors.torch import load_file

    full, split = tmp_path / "full", tmp_path / "split"
    for out, steps in ((full, 4), (split, 2)):
        torch.manual_seed(0)  # the student's fresh cond_proj is drawn from the global RNG when the task is built
        task = make_task(out, TOY_LRM, steps=steps)
        train(task.config.train, task)
    extra = split / "checkpoints" / "checkpoint-2" / "extra"
    assert (extra / "lrm.safetensors").is_file() and (extra / "lrm_optimizer.safetensors").is_file()
    task = make_task(split, TOY_LRM, steps=4, **{"train.resume_from_checkpoint": "latest"})
    train(task.config.train, task)
    for sub in ("lrm/model.safetensors", "pipeline/unet/diffusion_pytorch_model.safetensors"):
        a, b = load_file(full / "final" / sub), load_file(split / "final" / sub)
        diffs = [k for k in a if not torch.equal(a[k], b[k])]
        assert a.keys() == b.keys() and not diffs, f"{sub}: {len(diffs)} tensors differ after resume"
    reloaded = LatentRewardModel.from_pretrained(full / "final" / "lrm")
    trained = task.lrm.state_dict()
    assert all(torch.equal(v, trained[k].cpu()) for k, v in reloaded.state_dict().items())
    # without the proxy's AdamW moments the resume would not be exact: refused
    (split / "checkpoints" / "checkpoint-4" / "extra" / "lrm_optimizer.safetensors").unlink()
    task = make_task(split, TOY_LRM, steps=5, **{"train.resume_from_checkpoint": "latest"})
    with pytest.raises(CheckpointError, match=r"checkpoint-4: KeyError: .*no lrm_optimizer state"):
        train(task.config.train, task)


# ----------------------------------------------------------------------------- (e) config errors


def test_config_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown reward 'hpsv3'.*known rewards:.*hpsv2"):
        load_method_config("rg_lcd", TOY_LRM, ["reward.reward=hpsv3"])
    with pytest.raises(ConfigError, match=r"unknown reward 'nope'"):
        load_method_config("rg_lcd", None, ["reward.reward=1.0*hpsv2+0.1*nope"])
    with pytest.raises(ConfigError, match="mode must be"):
        load_method_config("rg_lcd", None, ["reward.mode=pixel"])
    with pytest.raises(ConfigError, match="does not use"):
        load_method_config("rg_lcd", None, ["reward.reward=hpsv2", "reward.reward_kwargs.pickscore.model_dir=/x"])
    with pytest.raises(ConfigError, match="proportion_empty_prompts"):
        load_method_config("rg_lcd", None, ["proportion_empty_prompts=0.1"])
    with pytest.raises(ConfigError, match="unknown config key"):
        load_method_config("rg_lcd", None, ["reward.lrm_subsett=4"])
    with pytest.raises(ConfigError, match=r"lrm_pretrain_batch_size \(64\) must be <= train.batch_size \(32\)"):
        load_method_config("rg_lcd", TOY_LRM, ["train.batch_size=32", "reward.lrm_pretrain_batch_size=64"])
    # the shipped configs parse (data.path and model.teacher are the required keys they leave open)
    cfg = load_method_config("rg_lcd", REPO / "configs/sd15/rg_lcd.yaml", ["data.path=/shards", "model.teacher=/sd"])
    assert cfg.reward.reward == "hpsv2" and cfg.reward.reward_scale == 1.0 and cfg.reward.lrm_lr == 3.3e-6
    for name in ("sd21/rg_lcd.yaml", "sd21/rg_lcd_pickscore.yaml", "sd21/rg_lcd_clip.yaml",
                 "sd21/rg_lcd_hps_imagereward.yaml", "sdxl/rg_lcd.yaml"):
        for mode in ("direct", "lrm"):  # lrm mode also checks the pre-training batch against the training batch
            load_method_config("rg_lcd", REPO / "configs" / name,
                               ["data.path=/shards", "model.teacher=/sd", f"reward.mode={mode}"])


def test_clip_experts_train_on_the_raw_cosine_unless_configured():
    from lcm_lab.objectives.rg_lcd import RGLCDConfig, build_expert

    (raw,) = build_expert(RGLCDConfig(reward="0.01*toy-clip", mode="direct")).models
    assert raw.clip_at_zero is False  # no zero-gradient floor below cos = 0 during training
    (clamped,) = build_expert(RGLCDConfig(reward="toy-clip", mode="direct",
                                          reward_kwargs={"toy-clip": {"clip_at_zero": True}})).models
    assert clamped.clip_at_zero is True


def test_direct_mode_rejects_a_non_differentiable_expert():
    from lcm_lab.objectives.rg_lcd import RGLCDConfig, RGLCDLoss, build_expert

    cfg = RGLCDConfig(reward="jpeg-compressibility", mode="direct")
    with pytest.raises(ValueError, match="not differentiable.*mode=lrm"):
        RGLCDLoss(cfg, lcd=None, codec=object(), expert=build_expert(cfg))


def test_cli_lists_rg_lcd(capsys):
    from lcm_lab.cli import main

    assert main(["train", "rg_lcd", "--config", str(TOY_LRM), "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "mode: lrm" in out and "lrm_logit_scale: 100.0" in out


# ----------------------------------------------------------------------------- LRM shapes, pretraining


def test_lrm_reads_toy_and_sd_latents():
    torch.manual_seed(0)
    for arch, text_dim, side, tokens in (("tiny", 64, 8, 32), ("small", 768, 64, 77)):
        lrm = LatentRewardModel.from_arch(arch, text_dim=text_dim)
        with torch.no_grad():
            scores = lrm(torch.randn(2, 4, side, side), torch.randn(2, tokens, text_dim))
        assert scores.shape == (2,) and bool(((scores >= -1) & (scores <= 1)).all())
    # float32 under the student's autocast too: the scores the LRM was trained on, not bf16 ones
    latents, states = torch.randn(2, 4, 64, 64), torch.randn(2, 77, 768)
    with torch.no_grad():
        ref = lrm(latents, states)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = lrm(latents, states)
    assert mixed.dtype == torch.float32 and torch.equal(mixed, ref)
    assert sum(p.numel() for p in lrm.parameters()) < 5_000_000  # "small" stays small


def test_lrm_folder_round_trip_and_a_config_that_does_not_match_its_weights(tmp_path):
    torch.manual_seed(0)
    for depth in (0, 2):
        lrm = LatentRewardModel.from_arch("tiny", text_dim=64, depth=depth)
        folder = lrm.save_pretrained(tmp_path / "lrm")
        loaded = LatentRewardModel.from_pretrained(folder)
        assert loaded.config == lrm.config
        assert all(torch.equal(v, lrm.state_dict()[k]) for k, v in loaded.state_dict().items())
        tensors = [*loaded.parameters(), *loaded.buffers()]  # real (built on the meta device, then assigned)
        assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
        assert all(p.requires_grad for p in loaded.parameters())
    good = (folder / "config.json").read_text()
    # checked against the weights' header before anything is built: depth 10**6 would build for minutes
    for change, match in (({"depth": 10**6}, "config depth 1000000 does not match the weights' 5 image-tower stages"),
                          ({"width": 10**5}, "config.json does not match model.safetensors: .* tensors missing or of "
                                             "another shape"),
                          ({"heads": 4}, "TypeError: .*unexpected keyword argument 'heads'"),
                          ({"depth": None}, "config.json does not match model.safetensors")):  # default depth 3
        config = {k: v for k, v in {**lrm.config, **change}.items() if v is not None}
        (folder / "config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match=f"cannot read LRM folder {folder} .*{match}"):
            LatentRewardModel.from_pretrained(folder)
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="holds a JSON list, not an object"):
        LatentRewardModel.from_pretrained(folder)
    (folder / "config.json").write_text(good)


def test_lrm_pretraining_learns_the_experts_score_matrix(tmp_path, capsys):
    """Pre-training on data: on a batch it did not train on, the proxy's listwise loss against toy-clip halves and
    its agreement on the better latent for each caption rises (slowly); the student is untouched and the online learning
    rate is back afterwards."""
    import itertools

    from accelerate import Accelerator

    steps = 64  # 24 halved the loss but left the agreement flat with the 300-step toy-clip of the current assets
    task = make_task(tmp_path, TOY_LRM, **{"reward.lrm_pretrain_steps": steps, "reward.lrm_pretrain_batch_size": 16,
                                           "reward.lrm_pretrain_lr": 3e-3, "reward.lrm_lr": 1e-5,
                                           "train.batch_size": 16, "data.num_images": 256})
    task.setup(Accelerator(cpu=True), channels_last="none")
    latents, states, prompts = next(itertools.islice(task._pretrain_batches(), steps + 5, None))  # held out
    assert latents.shape[0] == len(prompts) == 16 and len(set(prompts)) > 8
    trainer = task.lrm_trainer
    with torch.no_grad():
        images = trainer.codec.to_unit(trainer.codec.decode(latents, no_grad=True))
        expert = trainer.expert.score_matrix(images, prompts)

    def loss_and_agreement():
        with torch.no_grad():
            lrm = task.lrm.encode_latents(latents) @ task.lrm.encode_text(states).T
        return float(listwise_kl_loss(expert, lrm)), pairwise_accuracy(expert, lrm)

    start = loss_and_agreement()
    student_before = {n: p.detach().clone() for n, p in task.student.named_parameters()}
    real_batches = task.batches

    def batches(rank, start, count_skipped=True):  # as uncached data counts a batch with no readable image
        task.skipped += 1 if count_skipped else 0
        yield from real_batches(rank, start, count_skipped=count_skipped)

    task.batches, task.skipped = batches, 5
    capsys.readouterr()
    task._start_lrm(task.student)
    assert task.skipped == 5  # the loop reads (and counts) those batches itself
    assert "LRM pre-training" not in capsys.readouterr().err  # no bar: the run has train.progress=false
    end = loss_and_agreement()
    assert end[0] < 0.5 * start[0] and end[1] > start[1] + 0.03, (start, end)  # measured: 0.529 -> 0.607
    assert all(torch.equal(p, student_before[n]) for n, p in task.student.named_parameters())
    assert all(group["lr"] == 1e-5 for group in trainer.optimizer.param_groups)
    assert all(not p.requires_grad for p in task.lrm.parameters())


def _one_step_jpeg_kb(task: RGLCDTask, prompts: list[str]) -> float:
    """Mean JPEG size (kB) of the student's one-step samples ``f(x_T, T)`` of ``prompts`` from fixed noise."""
    from lcm_lab.core.latents import LatentCodec
    from lcm_lab.core.parameterization import guidance_scale_embedding
    from lcm_lab.rewards.jpeg import jpeg_sizes_kb

    g = torch.Generator().manual_seed(123)
    n = len(prompts)
    noise = torch.randn(n, 4, 8, 8, generator=g)
    t = torch.full((n,), task.ldm.schedule.num_train_timesteps - 1, dtype=torch.long)
    w_emb = guidance_scale_embedding(torch.full((n,), 4.0), task.w_dim)
    codec = LatentCodec(task.ldm.vae)
    with torch.no_grad():
        x0 = task.objective.f(task.accelerator.unwrap_model(task.student), noise, t,
                              task._encode_text(prompts, g), w_emb)
        return float(jpeg_sizes_kb(codec.to_unit(codec.decode(x0, no_grad=True))).mean())


def test_lrm_mode_with_jpeg_compressibility_makes_samples_more_compressible(tmp_path):
    """The issue's check: LRM mode with the non-differentiable JPEG expert. From the same start and data, a run
    guided by the proxy (pre-trained on data, then online) ends with more compressible one-step samples than the
    same run with beta = 0 (plain LCD); the expert only ever scored images."""
    from lcm_lab.toy.world import ToyWorld

    prompts = [ToyWorld(1, split="eval")[i].caption for i in range(24)]
    sizes = {}
    for beta in (0.0, 30.0):
        torch.manual_seed(0)
        task = make_task(tmp_path / f"beta{beta:g}", TOY_LRM, steps=6, **{
            "reward.reward": "jpeg-compressibility", "reward.reward_kwargs": "{}", "reward.reward_scale": beta,
            "reward.lrm_pretrain_steps": 15, "reward.lrm_pretrain_batch_size": 8, "reward.lrm_pretrain_lr": 3e-3,
            "train.batch_size": 8, "data.num_images": 64})
        train(task.config.train, task)
        sizes[beta] = _one_step_jpeg_kb(task, prompts)
    assert sizes[30.0] < 0.95 * sizes[0.0], sizes  # measured: 1.054 vs 1.202 kB


def test_lora_student_trains_against_the_lrm_and_exports(tmp_path):
    """LoRA student in LRM mode: only the adapters train (the UNet base stays the teacher's) and the run exports
    the LoRA file plus the proxy."""
    task = make_task(tmp_path, TOY_LRM, steps=2, **{"model.lora": True, "model.lora_rank": 4, "model.lora_alpha": 4})
    teacher = {n: p.detach().clone() for n, p in task.ldm.unet.named_parameters()}
    train(task.config.train, task)
    params = dict(task.student.named_parameters())
    trainable = [n for n, p in params.items() if p.requires_grad]
    assert trainable and all("lora" in n for n in trainable)
    assert any(float(params[n].detach().abs().max()) > 0 for n in trainable if "lora_B" in n)  # B starts at zero
    assert all(torch.equal(p, teacher[n]) for n, p in task.ldm.unet.named_parameters())
    assert (tmp_path / "final" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "final" / "lora" / "scheduler" / "scheduler_config.json").is_file()  # the run's LCM grid
    assert LatentRewardModel.from_pretrained(tmp_path / "final" / "lrm").config["text_dim"] == 64
