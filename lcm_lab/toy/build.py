"""Build the toy world's assets: tokenizer, VAE, teacher LDM, reward model and judge.

Deterministic for a seed (the data order, timesteps and noise of step ``k`` are drawn
from generators seeded by ``(seed, stage, k)``, so a resumed run sees what an
uninterrupted one would), resumable (finished stages are skipped; long stages checkpoint
into ``work_dir`` every ``checkpoint_every`` steps; outputs made with other values of the
settings a stage depends on, :data:`DEPENDS`, are refused, not reused), and atomic (every
output folder is written under a temporary name and renamed into place when complete).

Stages: data -> vae -> latents -> teacher, reward, judge -> manifest.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from ..core.schedules import NoiseSchedule
from ..files import atomic_write, atomic_write_text, read_json_object, write_folder_atomically
from ..imaging import to_uint8
from . import models
from .judge import AttributeJudge
from .tokenizer import load_clip_tokenizer, write_clip_tokenizer
from .world import ATTRIBUTE_NAMES, ATTRIBUTES, HELD_OUT, IMAGE_SIZE, ToyWorld

STAGE_IDS = {"vae": 1, "teacher": 2, "reward": 3, "judge": 4}


@dataclass
class BuildConfig:
    """Sizes and budgets of the toy-asset build (defaults: < 1 hour on 2 CPU cores)."""

    out_dir: str = "assets/toy"
    work_dir: str = "assets/.build"
    seed: int = 0
    num_train_images: int = 60_000
    num_recon_images: int = 10_000  # VAE reconstructions mixed into reward/judge training
    vae_steps: int = 2500
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    teacher_steps: int = 9000
    teacher_batch: int = 64
    teacher_lr: float = 1e-3
    teacher_warmup: int = 200
    teacher_snr_gamma: float = 0.0  # Min-SNR-gamma loss weighting (Hang et al. 2023); 0 = plain MSE
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    reward_steps: int = 300
    reward_batch: int = 256
    reward_lr: float = 1e-3
    judge_steps: int = 1000
    judge_batch: int = 128
    judge_lr: float = 2e-3
    checkpoint_every: int = 500


_DATA = ("seed", "num_train_images")
_VAE = _DATA + ("vae_steps", "vae_batch", "vae_lr", "vae_kl_weight")
_LATENTS = _VAE + ("num_recon_images",)
# The settings each stage's output depends on. A cache, checkpoint or finished asset made with other values is
# refused instead of silently reused (a work folder may still be shared by builds that differ elsewhere).
DEPENDS = {
    "data": _DATA,
    "vae": _VAE,
    "latents": _LATENTS,
    "judge": _LATENTS + ("judge_steps", "judge_batch", "judge_lr"),
    "reward": _LATENTS + ("reward_steps", "reward_batch", "reward_lr"),
    "teacher": _LATENTS + ("teacher_steps", "teacher_batch", "teacher_lr", "teacher_warmup", "teacher_snr_gamma",
                           "caption_dropout", "ema_decay"),
}


def _settings(cfg: BuildConfig, stage: str) -> dict:
    return {k: getattr(cfg, k) for k in DEPENDS[stage]}


def _refuse_other_settings(where: str, stage: str, saved: dict, cfg: BuildConfig, hint: str) -> None:
    changed = {k: (v, getattr(cfg, k)) for k, v in saved.items() if k in DEPENDS[stage] and getattr(cfg, k) != v}
    if changed:
        raise ValueError(f"{where} holds the {stage} stage of a build with "
                         + ", ".join(f"{k}={old} (now {new})" for k, (old, new) in changed.items()) + f"; {hint}")


def _check_work_cache(cfg: BuildConfig, stage: str, cache: Path) -> None:
    """Refuse a work-folder cache (``data``, ``vae``, ``latents``) built with other settings, or one with no
    record of them; record the settings of one about to be built (``settings.json`` in the work folder)."""
    record = Path(cfg.work_dir) / "settings.json"
    saved = read_json_object(record, "toy build settings record") if record.exists() else {}
    if stage in saved:
        _refuse_other_settings(cfg.work_dir, stage, saved[stage], cfg,
                               "use another --work-dir (or delete that folder's caches to rebuild them)")
        return
    if cache.exists():
        raise ValueError(f"{cache} has no record of the settings it was built with ({record}): delete it to "
                         "rebuild it, or use another --work-dir")
    saved[stage] = _settings(cfg, stage)
    atomic_write_text(record, json.dumps(saved, indent=2))


def _save_atomic(obj, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _rng(cfg: BuildConfig, stage: str, step: int) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, STAGE_IDS[stage], step])


def _torch_gen(cfg: BuildConfig, stage: str, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(_rng(cfg, stage, step).integers(2**62)))


def _lr_lambda(warmup: int, total: int):
    # Linear warm-up, then cosine decay to 10% of the peak learning rate.
    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return fn


class _Trainer:
    """A resumable optimisation loop over one stage (model + AdamW + schedule + EMA). ``frozen`` modules the
    stage uses but does not train are checkpointed too, so a resumed stage trains against the very same weights
    even where rebuilding them from the seed would not reproduce them (another torch or transformers)."""

    def __init__(self, cfg: BuildConfig, stage: str, model: torch.nn.Module, lr: float, steps: int,
                 warmup: int = 100, ema_decay: float | None = None, weight_decay: float = 0.01,
                 frozen: dict[str, torch.nn.Module] | None = None):
        self.cfg, self.stage, self.model, self.steps = cfg, stage, model, steps
        self.frozen = frozen or {}
        # fused: one kernel over all tensors instead of a loop over them (~4% of a teacher step here);
        # the same AdamW up to float rounding (tested).
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=True)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, _lr_lambda(warmup, steps))
        self.ema = None
        if ema_decay is not None:
            self.ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
            self.ema_decay = ema_decay
        self.step = 0
        self.ckpt = Path(cfg.work_dir) / f"{stage}_ckpt.pt"
        if self.ckpt.exists():
            state = torch.load(self.ckpt, map_location="cpu", weights_only=True)
            _refuse_other_settings(str(self.ckpt), stage, state.get("settings", {}), cfg,
                                   "resume with those settings, or delete the checkpoint to start the stage over")
            model.load_state_dict(state["model"])
            for name, module in self.frozen.items():
                if name not in state.get("frozen", {}):
                    raise ValueError(f"{self.ckpt} holds no {name} (written before frozen modules were saved): "
                                     "delete it to start the stage over")
                module.load_state_dict(state["frozen"][name])
            self.opt.load_state_dict(state["opt"])
            self.sched.load_state_dict(state["sched"])
            if self.ema is not None:
                self.ema = state["ema"]
            self.step = int(state["step"])
            print(f"[{stage}] resuming from step {self.step}")
        if self.ema is not None:  # pair each shadow with the model's own parameter or buffer, once
            live = model.state_dict(keep_vars=True)
            floats = [k for k, v in live.items() if v.dtype.is_floating_point]
            self._ema_floats = ([self.ema[k] for k in floats], [live[k] for k in floats])
            self._ema_others = [(self.ema[k], v) for k, v in live.items() if not v.dtype.is_floating_point]

    def update(self, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss):
            raise FloatingPointError(f"[{self.stage}] non-finite loss at step {self.step}")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0, foreach=True)
        self.opt.step()
        self.sched.step()
        if self.ema is not None:
            with torch.no_grad():
                torch._foreach_lerp_(*self._ema_floats, 1 - self.ema_decay)
                for shadow, live in self._ema_others:
                    shadow.copy_(live)
        self.step += 1
        if self.step % self.cfg.checkpoint_every == 0 and self.step < self.steps:
            self.save()

    def save(self) -> None:
        state = {"model": self.model.state_dict(), "opt": self.opt.state_dict(),
                 "sched": self.sched.state_dict(), "step": self.step, "settings": _settings(self.cfg, self.stage),
                 "frozen": {name: module.state_dict() for name, module in self.frozen.items()}}
        if self.ema is not None:
            state["ema"] = self.ema
        _save_atomic(state, self.ckpt)

    def progress(self):
        return tqdm(range(self.step, self.steps), initial=self.step, total=self.steps, desc=self.stage,
                    mininterval=2.0)

    def finished_weights(self) -> dict:
        return self.ema if self.ema is not None else self.model.state_dict()


# ----------------------------------------------------------------------------- stages


def build_data(cfg: BuildConfig) -> dict:
    """Render the training images once (the world is deterministic, so this is a cache)."""
    path = Path(cfg.work_dir) / "train_data.npz"
    _check_work_cache(cfg, "data", path)
    if not path.exists():
        world = ToyWorld(cfg.seed, "train")
        images = np.empty((cfg.num_train_images, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
        captions, labels = [], []
        for i in tqdm(range(cfg.num_train_images), desc="render", mininterval=2.0):
            s = world[i]
            images[i] = s.image
            captions.append(s.caption)
            labels.append([ATTRIBUTES[k].index(s.attributes[k]) for k in ATTRIBUTE_NAMES])

        def write(tmp: Path) -> None:
            with tmp.open("wb") as f:  # a file object: np.savez would append ".npz" to the temp name
                np.savez(f, images=images, captions=np.array(captions), labels=np.array(labels, np.int64))

        atomic_write(path, write)
    data = np.load(path)
    return {"images": data["images"], "captions": [str(c) for c in data["captions"]], "labels": data["labels"]}


def _to_tensor(images_uint8: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [0, 1]."""
    return torch.from_numpy(images_uint8).permute(0, 3, 1, 2).float() / 255.0


def train_vae(cfg: BuildConfig, data: dict) -> Path:
    """AutoencoderKL trained with MSE + L1 + a small KL; the scaling factor is set, as in
    SD, to 1/std of the latents so that scaled latents have unit variance."""
    final = Path(cfg.work_dir) / "vae"
    _check_work_cache(cfg, "vae", final)
    if final.exists():
        return final
    torch.manual_seed(cfg.seed)
    vae = models.build_vae()
    trainer = _Trainer(cfg, "vae", vae, cfg.vae_lr, cfg.vae_steps)
    images = data["images"]
    bar = trainer.progress()
    for step in bar:
        idx = _rng(cfg, "vae", step).integers(len(images), size=cfg.vae_batch)
        x = _to_tensor(images[idx]) * 2 - 1
        posterior = vae.encode(x).latent_dist
        z = posterior.sample(generator=_torch_gen(cfg, "vae", step))
        recon = vae.decode(z).sample
        mse = F.mse_loss(recon, x)
        loss = mse + 0.1 * F.l1_loss(recon, x) + cfg.vae_kl_weight * posterior.kl().mean()
        trainer.update(loss)
        if step % 50 == 0:
            bar.set_postfix(psnr=f"{10 * math.log10(4 / mse.item()):.1f}")
    vae.eval()
    with torch.no_grad():
        sample = _to_tensor(images[:2000]) * 2 - 1
        std = torch.cat([vae.encode(c).latent_dist.mean for c in sample.split(256)]).std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    write_folder_atomically(final, vae.save_pretrained)
    trainer.ckpt.unlink(missing_ok=True)
    return final


def encode_latents(cfg: BuildConfig, data: dict, vae_dir: Path) -> dict:
    """Posterior mean/std of every training image (teacher data) and VAE reconstructions
    of the first ``num_recon_images`` (so reward model and judge see decoded images)."""
    path = Path(cfg.work_dir) / "latents.pt"
    _check_work_cache(cfg, "latents", path)
    if not path.exists():
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(vae_dir).eval()
        means, stds, recons = [], [], []
        with torch.no_grad():
            for start in tqdm(range(0, len(data["images"]), 500), desc="encode", mininterval=2.0):
                x = _to_tensor(data["images"][start:start + 500]) * 2 - 1
                dist = vae.encode(x).latent_dist
                means.append(dist.mean)
                stds.append(dist.std)
                if start < cfg.num_recon_images:
                    rec = vae.decode(dist.mean[:cfg.num_recon_images - start]).sample  # exactly the first N
                    recons.append(torch.from_numpy(to_uint8(rec / 2 + 0.5)))
        _save_atomic({"mean": torch.cat(means), "std": torch.cat(stds), "recon": torch.cat(recons)}, path)
    return torch.load(path, weights_only=True)


def _distinct_captions(captions: list[str]) -> tuple[list[str], torch.Tensor]:
    """The distinct captions (index 0 is "") and each caption's index into them."""
    unique = [""] + sorted(set(captions))
    lookup = {c: i for i, c in enumerate(unique)}
    return unique, torch.tensor([lookup[c] for c in captions])


def _token_ids(captions: list[str], tokenizer, max_length: int) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=max_length, truncation=True,
                     return_tensors="pt").input_ids


def _text_embeddings(captions: list[str], tokenizer, text_encoder) -> torch.Tensor:
    ids = _token_ids(captions, tokenizer, tokenizer.model_max_length)
    with torch.no_grad():
        return torch.cat([text_encoder(chunk)[0] for chunk in ids.split(512)])


def _min_snr_weight(alpha_bar: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma weight of an eps-prediction loss: min(SNR, gamma) / SNR with SNR = abar / (1 - abar)
    (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy"). It stops the
    nearly noise-free timesteps, whose targets are easy and whose gradients conflict with the rest, from
    dominating training."""
    snr = alpha_bar / (1 - alpha_bar)
    return snr.clamp(max=gamma) / snr


def train_teacher(cfg: BuildConfig, data: dict, latents: dict, vae_dir: Path, tokenizer_dir: Path) -> Path:
    """The teacher: eps-prediction UNet on VAE latents with SD's scaled_linear DDPM schedule,
    conditioned on a frozen CLIP text encoder, with caption dropout (for classifier-free
    guidance). The EMA weights are saved as a stock StableDiffusionPipeline folder."""
    final = Path(cfg.out_dir) / "teacher"
    if final.exists():
        return final
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    torch.manual_seed(cfg.seed)
    text_encoder = models.build_text_encoder().eval().requires_grad_(False)  # frozen, as in SD
    unet = models.build_unet()
    tokenizer = load_clip_tokenizer(tokenizer_dir)
    scheduler = models.build_scheduler()
    schedule = NoiseSchedule.from_scheduler(scheduler)
    scaling = AutoencoderKL.load_config(vae_dir)["scaling_factor"]

    trainer = _Trainer(cfg, "teacher", unet, cfg.teacher_lr, cfg.teacher_steps, cfg.teacher_warmup, cfg.ema_decay,
                       frozen={"text_encoder": text_encoder})
    # The text encoder is frozen (and restored with a resumed stage), so embed each distinct caption once;
    # index 0 is "".
    unique, caption_index = _distinct_captions(data["captions"])
    embeddings = _text_embeddings(unique, tokenizer, text_encoder)
    mean, std = latents["mean"], latents["std"]
    bar = trainer.progress()
    for step in bar:
        rng, gen = _rng(cfg, "teacher", step), _torch_gen(cfg, "teacher", step)
        idx = torch.from_numpy(rng.integers(len(mean), size=cfg.teacher_batch))
        x0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scaling
        cond = caption_index[idx].clone()
        cond[torch.from_numpy(rng.random(cfg.teacher_batch) < cfg.caption_dropout)] = 0
        t = torch.randint(0, scheduler.config.num_train_timesteps, (cfg.teacher_batch,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        xt = schedule.add_noise(x0, noise, t)
        # The attention maps here are 4x4 and 2x2 (16 and 4 queries): torch's plain "math" kernel
        # trains them ~4.5% faster per step than the flash kernel it picks on CPU.
        with sdpa_kernel(SDPBackend.MATH):
            pred = unet(xt, t, embeddings[cond]).sample
        if cfg.teacher_snr_gamma > 0:
            loss = (_min_snr_weight(schedule.alpha_cumprod(t, ndim=1), cfg.teacher_snr_gamma)
                    * F.mse_loss(pred, noise, reduction="none").mean((1, 2, 3))).mean()
        else:
            loss = F.mse_loss(pred, noise)
        trainer.update(loss)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")

    unet.load_state_dict(trainer.finished_weights())
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(vae_dir), text_encoder=text_encoder, tokenizer=tokenizer,
        unet=unet.eval(), scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    write_folder_atomically(final, pipe.save_pretrained)
    trainer.ckpt.unlink(missing_ok=True)
    return final


def _mixed_images(cfg: BuildConfig, data: dict, latents: dict, idx: np.ndarray, rng: np.random.Generator):
    """Real images, with half of those that have one replaced by their VAE reconstruction."""
    images = data["images"][idx].copy()
    recon = latents["recon"].numpy()
    use = (idx < len(recon)) & (rng.random(len(idx)) < 0.5)
    images[use] = recon[idx[use]]
    return _to_tensor(images)


def train_reward(cfg: BuildConfig, data: dict, latents: dict, tokenizer_dir: Path) -> Path:
    """toy-clip: a small open_clip CLIP trained contrastively on (image, caption) pairs.

    Captions with the same attributes describe the same picture, so every pair with the
    same attribute combination counts as a positive (soft multi-positive targets)."""
    final = Path(cfg.out_dir) / "reward"
    if final.exists():
        return final
    from safetensors.torch import save_file

    torch.manual_seed(cfg.seed)
    model = models.build_reward_model()
    tokenizer = load_clip_tokenizer(tokenizer_dir)
    mean = torch.tensor(models.REWARD_PREPROCESS_CONFIG["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(models.REWARD_PREPROCESS_CONFIG["std"]).view(1, 3, 1, 1)
    combo = torch.from_numpy(data["labels"] @ (8 ** np.arange(len(ATTRIBUTE_NAMES))))
    unique, caption_index = _distinct_captions(data["captions"])  # tokenize each caption once
    token_ids = _token_ids(unique, tokenizer, models.CONTEXT_LENGTH)
    trainer = _Trainer(cfg, "reward", model, cfg.reward_lr, cfg.reward_steps, weight_decay=0.1)
    bar = trainer.progress()
    for step in bar:
        rng = _rng(cfg, "reward", step)
        idx = rng.integers(len(data["images"]), size=cfg.reward_batch)
        images = (_mixed_images(cfg, data, latents, idx, rng) - mean) / std
        img, txt, scale = model(images, token_ids[caption_index[idx]])[:3]
        logits = scale * img @ txt.t()
        same = (combo[idx][:, None] == combo[idx][None, :]).float()
        target = same / same.sum(1, keepdim=True)
        loss = 0.5 * (torch.sum(-target * logits.log_softmax(1), 1).mean()
                      + torch.sum(-target * logits.t().log_softmax(1), 1).mean())
        trainer.update(loss)
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")

    def write(tmp: Path) -> None:
        config = {"model_cfg": models.REWARD_MODEL_CONFIG, "preprocess_cfg": models.REWARD_PREPROCESS_CONFIG}
        (tmp / "open_clip_config.json").write_text(json.dumps(config, indent=2))
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "open_clip_model.safetensors"))

    write_folder_atomically(final, write)
    trainer.ckpt.unlink(missing_ok=True)
    return final


def train_judge(cfg: BuildConfig, data: dict, latents: dict) -> Path:
    """The attribute classifier (never a reward): cross-entropy over the six attributes,
    on real images and VAE reconstructions."""
    final = Path(cfg.out_dir) / "judge"
    if final.exists():
        return final
    torch.manual_seed(cfg.seed)
    judge = AttributeJudge()
    labels = torch.from_numpy(data["labels"])
    trainer = _Trainer(cfg, "judge", judge, cfg.judge_lr, cfg.judge_steps)
    bar = trainer.progress()
    for step in bar:
        rng = _rng(cfg, "judge", step)
        idx = rng.integers(len(data["images"]), size=cfg.judge_batch)
        images = _mixed_images(cfg, data, latents, idx, rng)
        logits = judge(images)
        loss = sum(F.cross_entropy(logits[k], labels[idx, j]) for j, k in enumerate(ATTRIBUTE_NAMES))
        trainer.update(loss)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    write_folder_atomically(final, judge.eval().save_pretrained)
    trainer.ckpt.unlink(missing_ok=True)
    return final


def build_all(cfg: BuildConfig) -> dict:
    """Run every stage that is not finished yet and write ``world.json``."""
    out, work = Path(cfg.out_dir), Path(cfg.work_dir)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    if (out / "world.json").exists():  # finished assets are kept: they must be what this build would make
        built = json.loads((out / "world.json").read_text()).get("build", {})
        for stage in ("judge", "reward", "teacher"):
            if (out / stage).exists():
                _refuse_other_settings(str(out), stage, built, cfg,
                                       f"use another --out-dir (or delete {out / stage} to rebuild it)")
    timings = {}

    def timed(name, fn, *args):
        t0 = time.perf_counter()
        result = fn(*args)
        timings[name] = round(time.perf_counter() - t0, 1)
        return result

    tokenizer_dir = work / "tokenizer"
    if not tokenizer_dir.exists():
        write_folder_atomically(tokenizer_dir, lambda tmp: write_clip_tokenizer(tmp, model_max_length=models.CONTEXT_LENGTH))
    data = timed("data", build_data, cfg)
    vae_dir = timed("vae", train_vae, cfg, data)
    latents = timed("latents", encode_latents, cfg, data, vae_dir)
    timed("judge", train_judge, cfg, data, latents)
    timed("reward", train_reward, cfg, data, latents, tokenizer_dir)
    timed("teacher", train_teacher, cfg, data, latents, vae_dir, tokenizer_dir)

    manifest = {
        "image_size": IMAGE_SIZE,
        "attributes": {k: list(v) for k, v in ATTRIBUTES.items()},
        "held_out": sorted(list(t) for t in HELD_OUT),
        "build": asdict(cfg),
        "last_run_seconds": timings,  # per stage, in the run that finished the build (0 if already done)
    }
    atomic_write_text(out / "world.json", json.dumps(manifest, indent=2))
    return manifest
