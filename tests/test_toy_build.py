"""The toy-asset build is deterministic and an interrupted build resumes to the same weights."""

import pytest
from safetensors.torch import load_file

from lcm_lab.toy import build
from lcm_lab.toy.build import BuildConfig, build_all

pytestmark = pytest.mark.usefixtures("single_thread_torch")


def tiny(tmp, **kw) -> BuildConfig:
    return BuildConfig(out_dir=str(tmp / "out"), work_dir=str(tmp / "work"), num_train_images=48,
                       num_recon_images=16, vae_steps=2, vae_batch=4, teacher_steps=4, teacher_batch=4,
                       teacher_warmup=1, reward_steps=2, reward_batch=8, judge_steps=2, judge_batch=8,
                       checkpoint_every=2, **kw)


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
    build_all(b)

    for part in ("teacher/unet/diffusion_pytorch_model.safetensors", "teacher/vae/diffusion_pytorch_model.safetensors",
                 "judge/model.safetensors", "reward/open_clip_model.safetensors"):
        wa, wb = weights(a, part), weights(b, part)
        assert wa.keys() == wb.keys()
        assert all((wa[k] == wb[k]).all() for k in wa), part
    assert not list((tmp_path / "b" / "work").glob("*_ckpt.pt"))  # checkpoints cleaned up
