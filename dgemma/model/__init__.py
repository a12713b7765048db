"""The DiffusionGemma text model (encoder and decoder modes over one weight set)."""

from dgemma.model.diffusion_gemma import DiffusionGemma

__all__ = ["DiffusionGemma"]
