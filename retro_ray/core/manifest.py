"""A stage's bookkeeping: its ``_manifest.json`` (config hash, input fingerprints, blocks, counts,
skips, timings), the journal of entries finished since it was last saved, and the rules a stage
starts by (``open_stage``: resume, refuse a changed config or input, or rebuild with ``--force``)
and a later stage reads by (``finished_stage``).
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from pydantic import BaseModel

from retro_ray.core.errors import UserError
from retro_ray.core.storage import Storage, join

MANIFEST = "_manifest.json"
JOURNAL = "_journal"
"""A stage folder's records of entries finished since its manifest was last saved."""


class StageMismatchError(UserError, RuntimeError):
    """A stage folder was built from another config or other inputs; ``--force`` rebuilds."""


class MissingStageError(UserError, FileNotFoundError):
    """A stage needs one before it that has not run (or not finished)."""


class EmptyStageError(UserError, RuntimeError):
    """A stage has nothing to work on; the message says what was skipped on the way."""


DERIVED = {"tokens_sha256", "truncated"}
"""Block fields derived from the block's own content (the db's token store, how many of its texts
the embedder truncated): adding them to an older manifest changes nothing the next stage
depends on."""


class Manifest(BaseModel):
    """``_manifest.json`` of a stage folder: what was built, from what, and how it went."""

    stage: str
    config_hash: str
    inputs: dict[str, Any]
    """Fingerprints of the inputs (files: size and mtime; upstream stages: their hash)."""
    blocks: dict[str, dict[str, Any]] = {}
    """Finished blocks by name (``{start}-{end}``) with their row counts and checksums."""
    counts: dict[str, int] = {}
    skipped: dict[str, int] = {}
    """Inputs skipped, per reason; nothing is dropped without a count here."""
    timings: dict[str, float] = {}
    units: dict[str, dict[str, Any]] = {}
    """Input units a pass has read and counted, while it runs (the db stage's chunk pass: files
    and row groups in corpus order), so a killed pass reads only the rest again."""
    complete: bool = False
    updated: float = 0.0
    generation: int = 0
    """Bumped by every ``save``: the journal records of ``generation`` are the ones not folded in."""

    def content_hash(self) -> str:
        """Fingerprint of what the stage wrote, for the next stage: its blocks (with their
        checksums where it has them) and the config it was built from, so a block list that
        looks the same (an index rebuilt with another factory string) still counts as changed."""
        content = {name: {k: v for k, v in block.items() if not k.endswith("_s") and k not in DERIVED}
                   for name, block in self.blocks.items()}
        blob = json.dumps([self.config_hash, content], sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def save(self, storage: Storage, folder: str) -> None:
        """Write the whole manifest, folding in what ``record`` journaled: at a stage's start,
        the end of a pass and completion, never per block (its size grows with the stage)."""
        self.updated = time.time()
        self.generation += 1
        storage.write_json(join(folder, MANIFEST), self.model_dump(mode="json"))
        storage.delete_dir(join(folder, JOURNAL))  # older generations: folded in, never read again

    def record(self, storage: Storage, folder: str, section: str, name: str) -> None:
        """Persist one finished entry, ``self.<section>[name]`` (a block, a unit), by a write
        whose size does not grow with the number of entries: a journal file of its own, which
        ``load`` merges. A record written again (a block's embedding added) replaces the last."""
        if not self.generation:  # first saved, so that every record has the config and inputs it belongs to
            self.save(storage, folder)
        value = getattr(self, section)[name]
        uri = join(folder, JOURNAL, str(self.generation), f"{section}~{name.replace('/', '~')}.json")
        storage.write_json(uri, {"section": section, "name": name, "value": value})

    @classmethod
    def load(cls, storage: Storage, folder: str) -> "Manifest":
        """The stage's manifest as last saved, with the entries recorded since merged in. A
        record that vanishes while it is read was folded into a newer save: read that one."""
        while True:
            manifest = cls.model_validate(storage.read_json(join(folder, MANIFEST)))
            if manifest.complete:  # saved last: nothing journaled after it
                return manifest
            records = storage.expand(join(folder, JOURNAL, str(manifest.generation)))
            try:
                for uri in [u for u in records if u.endswith(".json")]:  # not a write a kill left unfinished
                    entry = storage.read_json(uri)
                    getattr(manifest, entry["section"])[entry["name"]] = entry["value"]
            except FileNotFoundError:  # another process saved meanwhile (a reader watching a stage)
                continue
            return manifest


def finished_stage(storage: Storage, folder: str, stage: str) -> Manifest:
    """The manifest of the ``stage`` in ``folder``, which must be complete (it has run)."""
    path = join(folder, MANIFEST)
    if not storage.exists(path):
        raise MissingStageError(f"{folder} has not been built: run `retro-ray {stage}` first")
    manifest = Manifest.load(storage, folder)
    if not manifest.complete:
        raise MissingStageError(f"{folder} is not finished: run `retro-ray {stage}` again to complete it")
    return manifest


def open_stage(
    storage: Storage,
    folder: str,
    stage: str,
    config_hash: str,
    inputs: dict[str, Any],
    force: bool = False,
) -> Manifest:
    """The stage's manifest to continue from, or a fresh one.

    A folder built from the same config and inputs is resumed (finished blocks are kept);
    one built from others is an error, or is wiped when ``force`` is set.
    """
    path = join(folder, MANIFEST)
    if storage.exists(path):
        old = Manifest.load(storage, folder)
        if old.config_hash == config_hash and old.inputs == inputs:
            return old
        if not force:
            if old.config_hash != config_hash:
                what = f"a different config (hash {old.config_hash} -> {config_hash})"
            else:
                changed = sorted(k for k in set(old.inputs) | set(inputs) if old.inputs.get(k) != inputs.get(k))
                what = f"different inputs ({', '.join(changed[:3])}{', ...' if len(changed) > 3 else ''} changed)"
            raise StageMismatchError(
                f"{folder} was built by stage '{stage}' from {what}; rerun with --force to rebuild it"
            )
        storage.delete_dir(folder)
    elif force:
        storage.delete_dir(folder)
    return Manifest(stage=stage, config_hash=config_hash, inputs=inputs)
