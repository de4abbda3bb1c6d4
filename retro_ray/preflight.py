"""Checks that need more than the config's own fields, run when the config loads, before Ray.

Faiss parses the index factory string (at the embedder's real dimension); every model or
tokenizer the config names must be a local file or folder, or a hub name already in the local
Hugging Face cache (unless ``allow_downloads``); every corpus, instruction-data and QA path must
match files, and every Parquet file must have the text column (its footer is read, nothing
more). A mistake here costs seconds, not the hours of embedding that come before the stage that
would have found it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from retro_ray.core.config import Config, ConfigError

_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def check_config(cfg: Config) -> None:
    """Raise ``ConfigError`` naming the field of the first problem; set ``HF_HUB_OFFLINE`` when
    downloads are off, so nothing (Ray workers started later included) reaches the network."""
    if not cfg.allow_downloads:
        os.environ["HF_HUB_OFFLINE"] = "1"
    if cfg.tokenizer.path:
        check_model_source("tokenizer.path", cfg.tokenizer.path, cfg.allow_downloads, "tokenizer_config.json")
    if cfg.model.base:
        check_model_source("model.base", cfg.model.base, cfg.allow_downloads, "config.json")
    if cfg.embed.model:
        check_model_source("embed.model", cfg.embed.model, cfg.allow_downloads, "config.json")
    check_factory(cfg)
    check_corpus(cfg)
    check_task_files(cfg)


def check_model_source(field: str, value: str, allow_downloads: bool, probe_file: str) -> None:
    """``value`` is an existing local file or folder, or a hub name in the local cache."""
    if value.startswith("s3://"):
        return  # read through Storage when used; the store may need credentials to list
    if Path(value).exists():
        if value.endswith(".gguf") and not Path(value).is_file():
            raise ConfigError(f"{field}={value!r}: a .gguf path must be a file")
        return
    looks_local = value.startswith((".", "/", "~")) or value.endswith((".json", ".gguf")) or not _HUB_NAME.match(value)
    if looks_local:
        raise ConfigError(f"{field}={value!r}: no such file or folder (looked in {os.path.abspath(value)})")
    if allow_downloads:
        return
    from huggingface_hub import constants, try_to_load_from_cache

    if try_to_load_from_cache(value, probe_file) is None and try_to_load_from_cache(value, "config.json") is None:
        raise ConfigError(
            f"{field}={value!r}: not a local file or folder, and not in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}); downloads are off: give a local path, or set allow_downloads: true"
        )


def check_corpus(cfg: Config) -> None:
    """Every corpus path matches files, and every Parquet file has the text column (footers only)."""
    from retro_ray.core.storage import Storage
    from retro_ray.database.corpus import source_files

    source_files(cfg, Storage(cfg.storage))


def check_task_files(cfg: Config) -> None:
    """Instruction data and QA files exist (globs match), before any stage runs."""
    from retro_ray.core.storage import Storage

    storage = Storage(cfg.storage)
    for i, source in enumerate(cfg.instruct.sources):
        for pattern in source.paths:
            if not storage.expand(pattern):
                raise ConfigError(f"instruct.sources[{i}] ({source.name!r}): no files match {pattern!r}")
    for i, qa in enumerate(cfg.eval.qa):
        if not storage.exists(qa.path):
            raise ConfigError(f"eval.qa[{i}] ({qa.name!r}): no such file {qa.path!r}")


def embedder_dim(cfg: Config) -> int:
    """The embedding width, read from the encoder's ``config.json`` (no model is loaded)."""
    from retro_ray.database.embed import default_model_path

    folder = Path(cfg.embed.model or default_model_path())
    try:
        return int(json.loads((folder / "config.json").read_text())["hidden_size"])
    except (OSError, KeyError, ValueError):
        return 0  # a hub name: its width is known only once loaded


def check_factory(cfg: Config) -> None:
    """Faiss parses ``index.factory`` at the embedding width (IVF list counts made small, so a
    4M-list string costs nothing), and ``index.train_size`` can train it."""
    import faiss

    from index_actors.shard import METRICS, min_training_vectors

    factory = cfg.index.factory
    dim = embedder_dim(cfg) or 1024
    try:
        faiss.index_factory(dim, re.sub(r"IVF\d+", "IVF4", factory), METRICS[cfg.index.metric])
    except RuntimeError as e:
        reason = str(e).strip().splitlines()[-1]
        reason = re.sub(r"^.*?\.cpp:\d+: ", "", reason)
        raise ConfigError(f"index.factory={factory!r}: Faiss cannot build it for {dim}-dimensional "
                          f"embeddings: {reason}") from None
    need = min_training_vectors(factory)
    if need > cfg.index.train_size:
        raise ConfigError(f"index.factory={factory!r} needs at least {need} training vectors, but "
                          f"index.train_size={cfg.index.train_size}")
