"""Tiny random pipelines of the wave-2 image families (FLUX.1-Kontext, Qwen-Image and its editing
pipeline, FLUX.2 dev and klein, Z-Image, SANA), built offline from configs."""

from __future__ import annotations

IMAGE_BUILDERS: dict = {}
