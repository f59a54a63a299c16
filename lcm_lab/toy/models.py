"""Architectures of the toy world's models, all built from stock library classes.

The teacher is a Stable-Diffusion-shaped latent diffusion model in diffusers classes
(AutoencoderKL, UNet2DConditionModel, CLIPTextModel + CLIPTokenizer, DDIM scheduler with
SD's scaled_linear betas), so every code path that loads SD also loads it. The sizes are
chosen for 2 CPU cores: 32x32 images, 8x8x4 latents, a 32-token text context.
"""

from __future__ import annotations

CONTEXT_LENGTH = 32  # captions are < 25 tokens; a short context keeps cross-attention cheap
TEXT_WIDTH = 64

# SD 1.x/2.x noise schedule and scheduler settings (diffusers' SD scheduler configs).
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}

VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [16, 32, 64],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 32,
    "mid_block_add_attention": False,
}

UNET_CONFIG = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [32, 64, 128],
    "layers_per_block": 1,
    # Cross-attention at 4x4 (and in the 2x2 mid block): at 8x8 it triples the CPU cost.
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "cross_attention_dim": TEXT_WIDTH,
    "attention_head_dim": 8,
    "norm_num_groups": 16,
}

TEXT_ENCODER_CONFIG = {
    "vocab_size": 49408,
    "hidden_size": TEXT_WIDTH,
    "intermediate_size": 4 * TEXT_WIDTH,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": CONTEXT_LENGTH,
    "projection_dim": TEXT_WIDTH,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}

# open_clip custom model config of the toy reward model ("toy-clip").
REWARD_MODEL_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "patch_size": 4, "width": 128, "layers": 3, "head_width": 32, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": CONTEXT_LENGTH, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
# Preprocessing the reward model expects (OpenAI CLIP statistics, 32 px).
REWARD_PREPROCESS_CONFIG = {
    "size": 32,
    "mean": [0.48145466, 0.4578275, 0.40821073],
    "std": [0.26862954, 0.26130258, 0.27577711],
    "interpolation": "bicubic",
    "resize_mode": "shortest",
}


def build_vae():
    """The toy VAE architecture (random weights)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(**VAE_CONFIG)


def build_unet():
    """The toy teacher UNet architecture (random weights)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**UNET_CONFIG)


def build_text_encoder():
    """The toy CLIP text encoder architecture (random weights)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER_CONFIG))


def build_scheduler():
    """The toy teacher's DDIM noise schedule."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SCHEDULER_CONFIG)


def build_reward_model():
    """The toy-clip reward model: an open_clip CLIP with a ViT on 32 px images."""
    import open_clip

    return open_clip.CLIP(**REWARD_MODEL_CONFIG)
