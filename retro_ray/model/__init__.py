"""Retro decoder, chunked cross-attention and retrieval encoder (no Ray imports)."""

from retro_ray.model.retro import Retro, RetroConfig

__all__ = ["Retro", "RetroConfig"]
