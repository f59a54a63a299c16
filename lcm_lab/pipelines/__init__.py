"""Stock diffusers artifacts from lcm_lab students (see :mod:`lcm_lab.pipelines.export`)."""

from .export import export_lcm_pipeline, export_lcm_sdxl_pipeline, export_lora

__all__ = ["export_lcm_pipeline", "export_lcm_sdxl_pipeline", "export_lora"]
