"""Training objectives as loss objects over the sampler core (one training loop runs them all)."""

from .lcd import LCDConfig, LCDLoss, consistency_loss
from .rg_lcd import RGLCDConfig, RGLCDLoss

__all__ = ["LCDConfig", "LCDLoss", "consistency_loss", "RGLCDConfig", "RGLCDLoss"]
