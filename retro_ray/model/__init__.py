"""The model layer: ``Retro`` (a GPT decoder with chunked cross-attention to encoded neighbours,
or the GPT baseline), ``RetroFit`` (CCA and an encoder added to a Hugging Face causal LM), and
export to and from Hugging Face style folders. Imports nothing else of retro-ray, and no Ray:
it runs on a bare GPU box."""

from retro_ray.model.retro import Retro, RetroConfig

__all__ = ["Retro", "RetroConfig"]
