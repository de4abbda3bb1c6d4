"""The stages in order, and the composite ``pipeline`` that runs them all."""

from __future__ import annotations

from typing import Callable

from retro_ray import chunks, index, neighbors, tokenizer, train
from retro_ray.config import Config
from retro_ray.storage import Storage

StageFn = Callable[[Config, Storage, bool], object]

STAGES: dict[str, StageFn] = {
    "tokenizer": tokenizer.run,
    "db": chunks.run,
    "index": index.run,
    "neighbors": neighbors.run,
    "pretrain": train.run,
}
"""Each stage reads the previous stages' folders under ``workdir`` and writes its own."""


def run_pipeline(cfg: Config, storage: Storage, force: bool = False) -> None:
    """Run every stage; finished ones are skipped by their manifests. ``force`` rebuilds all."""
    for run in STAGES.values():
        run(cfg, storage, force)
