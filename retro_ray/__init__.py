"""retro-ray: retrieval-augmented language models the InstructRetro way, on Ray.

Stages, each ``run(cfg, storage, force)``: ``tokenizer``, ``db`` (``chunks``: chunks and
embeddings), ``index``, ``neighbors``, ``pretrain`` (``train``); see ``pipeline.STAGES``.
"""

from retro_ray.config import Config, ConfigError, load_config
from retro_ray.storage import Manifest, Storage

__all__ = ["Config", "ConfigError", "Manifest", "Storage", "load_config"]
