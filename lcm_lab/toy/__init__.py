"""The embedded toy world: dataset, tokenizer, model architectures, judge and asset build."""

TEACHER_GUIDANCE = 5.0
"""The toy teacher's default classifier-free guidance scale (diffusers convention)."""
