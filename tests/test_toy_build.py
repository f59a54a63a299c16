"""The toy-asset build is deterministic and an interrupted build resumes to the same weights."""

import pytest
import torch
from safetensors.torch import load_file

from lcm_lab.toy import build
from lcm_lab.toy.build import BuildConfig, build_all

pytestmark = pytest.mark.usefixtures("single_thread_torch")


def tiny(tmp, **kw) -> BuildConfig:
    return BuildConfig(**{**dict(out_dir=str(tmp / "out"), work_dir=str(tmp / "work"), num_train_images=48,
                                 num_recon_images=16, vae_steps=2, vae_batch=4, teacher_steps=4, teacher_batch=4,
                                 teacher_warmup=1, reward_steps=2, reward_batch=8, judge_steps=2, judge_batch=8,
                                 checkpoint_every=2), **kw})


def weights(cfg: BuildConfig, part: str) -> dict:
    return load_file(f"{cfg.out_dir}/{part}")


def test_build_is_deterministic_and_resumes(tmp_path, monkeypatch):
    a = tiny(tmp_path / "a")
    manifest = build_all(a)
    assert set(manifest["last_run_seconds"]) == {"data", "vae", "latents", "judge", "reward", "teacher"}
    b = tiny(tmp_path / "b")

    # Interrupt the teacher after step 3 (a checkpoint was written at step 2), then resume.
    update = build._Trainer.update

    def interrupting(self, loss):
        update(self, loss)
        if self.stage == "teacher" and self.step == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(build._Trainer, "update", interrupting)
    with pytest.raises(KeyboardInterrupt):
        build_all(b)
    assert not (tmp_path / "b" / "out" / "teacher").exists()  # nothing half-written
    monkeypatch.setattr(build._Trainer, "update", update)
    # The resumed teacher trains against its checkpoint's text encoder, not one rebuilt from the seed: make the
    # rebuilt one differ, and the build must still equal the uninterrupted one.
    build_text_encoder = build.models.build_text_encoder

    def another_text_encoder():
        encoder = build_text_encoder()
        with torch.no_grad():
            for p in encoder.parameters():
                p.add_(0.5)
        return encoder

    monkeypatch.setattr(build.models, "build_text_encoder", another_text_encoder)
    build_all(b)

    for part in ("teacher/unet/diffusion_pytorch_model.safetensors", "teacher/vae/diffusion_pytorch_model.safetensors",
                 "teacher/text_encoder/model.safetensors",
                 "judge/model.safetensors", "reward/open_clip_model.safetensors"):
        wa, wb = weights(a, part), weights(b, part)
        assert wa.keys() == wb.keys()
        assert all((wa[k] == wb[k]).all() for k in wa), part
    assert not list((tmp_path / "b" / "work").glob("*_ckpt.pt"))  # checkpoints cleaned up

    # Outputs made with other settings are refused, not reused: a finished asset, a work-folder cache...
    with pytest.raises(ValueError, match=r"out holds the teacher stage of a build with teacher_steps=4 \(now 5\)"):
        build_all(tiny(tmp_path / "a", teacher_steps=5))
    with pytest.raises(ValueError, match=r"work holds the data stage of a build with num_train_images=48 \(now 40\)"):
        build_all(tiny(tmp_path / "a", out_dir=str(tmp_path / "c"), num_train_images=40))
    # ...but a work folder may serve a build that differs only in a later stage (a new --out-dir)
    shared = tiny(tmp_path / "a", out_dir=str(tmp_path / "d"), teacher_lr=5e-4)
    assert build_all(shared)["build"]["teacher_lr"] == 5e-4
    # ...and a cache with no record of its settings is refused, not adopted under the current ones
    (tmp_path / "a" / "work" / "settings.json").unlink()
    with pytest.raises(ValueError, match=r"train_data.npz has no record of the settings it was built with"):
        build_all(tiny(tmp_path / "a", out_dir=str(tmp_path / "e")))


def test_a_checkpoint_of_other_settings_is_refused(tmp_path, monkeypatch):
    cfg = tiny(tmp_path)
    update = build._Trainer.update

    def interrupting(self, loss):
        update(self, loss)
        if self.stage == "judge" and self.step == 2:
            self.save()
            raise KeyboardInterrupt

    monkeypatch.setattr(build._Trainer, "update", interrupting)
    with pytest.raises(KeyboardInterrupt):
        build_all(cfg)
    monkeypatch.setattr(build._Trainer, "update", update)
    with pytest.raises(ValueError, match=r"judge_ckpt.pt holds the judge stage of a build with judge_batch=8 "
                                         r"\(now 16\)"):
        build_all(tiny(tmp_path, judge_batch=16))


def test_trainer_update_is_adamw_clip_and_ema(tmp_path):
    """The build's update (fused AdamW, foreach clipping, foreach EMA lerp) against torch's plain
    per-tensor AdamW, clip and an EMA written out: the same training up to float rounding."""
    import copy

    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.GroupNorm(2, 8), torch.nn.Conv2d(8, 4, 1))
    model.register_buffer("count", torch.zeros((), dtype=torch.long))  # a non-float entry the EMA copies
    ref = copy.deepcopy(model)
    cfg = BuildConfig(work_dir=str(tmp_path), checkpoint_every=100)
    trainer = build._Trainer(cfg, "teacher", model, lr=1e-2, steps=10, warmup=2, ema_decay=0.9)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.01, foreach=False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, build._lr_lambda(2, 10))
    ema = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    start = copy.deepcopy(ref.state_dict())
    g = torch.Generator().manual_seed(1)
    for _ in range(6):
        x = torch.randn(4, 3, 6, 6, generator=g)
        model.count += 1
        ref.count += 1
        trainer.update(model(x).square().mean())
        opt.zero_grad(set_to_none=True)
        ref(x).square().mean().backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0, foreach=False)
        opt.step()
        sched.step()
        with torch.no_grad():
            for k, v in ref.state_dict().items():
                ema[k].mul_(0.9).add_(v, alpha=0.1) if v.dtype.is_floating_point else ema[k].copy_(v)
    ours = trainer.finished_weights()
    for (name, a), b in zip(model.named_parameters(), ref.parameters()):
        assert (a - b).abs().max() < 1e-6, name
        assert (a - start[name]).abs().max() > 1e-3, name  # trained: the comparison is not trivial
    assert ours.keys() == ema.keys() and all((ours[k] - ema[k]).abs().max() < 1e-6 for k in ema)
    assert int(ours["count"]) == 6
    assert (ours["0.weight"] - ref.state_dict()["0.weight"]).abs().max() > 1e-3  # the EMA lags


def test_min_snr_weight_matches_the_formula():
    """Min-SNR-gamma for eps-prediction (Hang et al. 2023): w = min(SNR, gamma) / SNR, SNR = abar / (1 - abar)."""
    import torch

    abar = torch.tensor([0.5, 10 / 11, 0.999, 0.01])  # SNR 1, 10, 999, 1/99
    w = build._min_snr_weight(abar, 5.0)
    expected = torch.tensor([1.0, 0.5, 5 / 999, 1.0])
    assert torch.allclose(w, expected, rtol=1e-4, atol=0)  # float32 abar near 1: SNR 999.01


def test_teacher_snr_gamma_changes_only_the_teacher(tmp_path):
    plain, weighted = tiny(tmp_path / "plain"), tiny(tmp_path / "snr", teacher_snr_gamma=5.0)
    build_all(plain)
    build_all(weighted)
    unet = "teacher/unet/diffusion_pytorch_model.safetensors"
    wa, wb = weights(plain, unet), weights(weighted, unet)
    assert any(not (wa[k] == wb[k]).all() for k in wa)  # the weighting reached the teacher's gradients
    for part in ("teacher/vae/diffusion_pytorch_model.safetensors", "judge/model.safetensors",
                 "reward/open_clip_model.safetensors"):
        wa, wb = weights(plain, part), weights(weighted, part)
        assert all((wa[k] == wb[k]).all() for k in wa), part
