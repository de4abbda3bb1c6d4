"""The stages in order, and the composite ``pipeline`` that runs them all."""

from __future__ import annotations

from typing import Callable

from retro_ray import chunks, evaluate, index, instruct, neighbors, tokenizer, train
from retro_ray.config import Config
from retro_ray.runtime import log
from retro_ray.storage import Storage

StageFn = Callable[[Config, Storage, bool], object]

STAGES: dict[str, StageFn] = {
    "tokenizer": tokenizer.run,
    "db": chunks.run,
    "index": index.run,
    "neighbors": neighbors.run,
    "pretrain": train.run,
    "instruct": instruct.run,
    "eval": evaluate.run,
}
"""Each stage reads the previous stages' folders under ``workdir`` and writes its own."""


def run_pipeline(cfg: Config, storage: Storage, force: bool = False) -> None:
    """Run every stage; finished ones are skipped by their manifests. ``force`` rebuilds all.
    Instruction tuning and evaluation run when ``instruct.sources`` names data."""
    for name, run in STAGES.items():
        if name in ("instruct", "eval") and not cfg.instruct.sources:
            log.info("%s: skipped (no instruct.sources in the config)", name)
            continue
        run(cfg, storage, force)
