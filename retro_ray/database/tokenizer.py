"""Load a Hugging Face tokenizer, or train a byte-level BPE on the corpus; saved under the run.

Workers only need the ``tokenizer.json`` string (``tokenizers.Tokenizer.from_str``), so the
tokenizer travels to Ray tasks as text and no stage re-declares it.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from retro_ray.core.config import Config, ConfigError, config_hash
from retro_ray.core.layout import TOKENIZER, tokenizer_dir
from retro_ray.core.locks import locked
from retro_ray.core.manifest import EmptyStageError, Manifest, finished_stage, open_stage
from retro_ray.core.runtime import log
from retro_ray.core.storage import Storage

if TYPE_CHECKING:  # transformers is imported where used: Ray tasks that only chunk never pay for it
    from transformers import PreTrainedTokenizerFast


def load_pretrained(path: str) -> "PreTrainedTokenizerFast":
    """A fast tokenizer from a folder, a ``tokenizer.json`` file, a ``.gguf`` model file, or a
    locally cached hub name."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if path.endswith(".json") and Path(path).is_file():
        return PreTrainedTokenizerFast(tokenizer_file=path)
    if path.endswith(".gguf"):  # the tokenizer inside a GGUF model file (SmolLM2, Llama.cpp models)
        tok = AutoTokenizer.from_pretrained(str(Path(path).parent), gguf_file=Path(path).name)
    else:
        tok = AutoTokenizer.from_pretrained(path)
    if not tok.is_fast:
        raise ConfigError(f"tokenizer {path!r} has no fast (Rust) version; convert it to tokenizer.json")
    return tok


def train_bpe(texts, vocab_size: int, eod_token: str) -> "PreTrainedTokenizerFast":
    """A GPT-2 style byte-level BPE trained on ``texts`` (an iterable of documents)."""
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[eod_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eod_token)


@locked(TOKENIZER)
def run(cfg: Config, storage: Storage, force: bool = False) -> str:
    """Tokenizer stage: write ``tokenizer/`` (Hugging Face layout) and its manifest."""
    from retro_ray.database import corpus

    out = tokenizer_dir(cfg)
    inputs = {"tokenizer": cfg.tokenizer.path} if cfg.tokenizer.path else {
        path: storage.fingerprint(path)
        for paths in corpus.source_files(cfg, storage).values() for path in paths
    }
    manifest = open_stage(storage, out, "tokenizer", config_hash(cfg.tokenizer, cfg.corpus), inputs, force)
    if manifest.complete:
        log.info("tokenizer: %s is up to date", out)
        return out
    start = time.time()
    if cfg.tokenizer.path:
        tok = load_pretrained(cfg.tokenizer.path)
        manifest.counts["docs"] = 0
    else:
        sample, skipped = _training_sample(cfg, storage)
        manifest.skipped = dict(sorted(skipped.items()))
        if not sample:
            raise EmptyStageError(
                f"tokenizer: no document to train on: every input row was skipped "
                f"({corpus.describe_skips(skipped) if skipped else 'no rows at all'})")
        log.info("tokenizer: training byte-level BPE (vocab %d) on %d documents",
                 cfg.tokenizer.vocab_size, len(sample))
        tok = train_bpe(sample, cfg.tokenizer.vocab_size, cfg.tokenizer.eod_token)
        manifest.counts["docs"] = len(sample)
        if len(tok) < cfg.tokenizer.vocab_size:
            log.warning("tokenizer: the trained vocabulary has %d tokens, not the %d asked: %d documents "
                        "hold too little text for more merges", len(tok), cfg.tokenizer.vocab_size, len(sample))
    manifest.counts["vocab_size"] = len(tok)
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        storage.upload_dir(tmp, out)
        digest = hashlib.sha256(Path(tmp, "tokenizer.json").read_bytes()).hexdigest()
    manifest.blocks = {"tokenizer.json": {"sha256": digest}}  # what later stages fingerprint
    manifest.timings["total_s"] = time.time() - start
    manifest.complete = True
    manifest.save(storage, out)
    log.info("tokenizer: %d tokens -> %s", len(tok), out)
    return out


def _training_sample(cfg: Config, storage: Storage) -> tuple[list[str], Counter[str]]:
    """The first ``train_docs`` documents, and the skip reasons of the rows read to find them."""
    from retro_ray.database import corpus

    sample: list[str] = []
    skipped: Counter[str] = Counter()
    for ds in corpus.read_corpus(cfg, storage, corpus.source_files(cfg, storage)):
        for batch in ds.select_columns(["text", "skip"]).iter_batches(batch_format="pyarrow"):
            for text, skip in zip(batch.column("text").to_pylist(), batch.column("skip").to_pylist()):
                if skip:
                    skipped[skip] += 1
                elif len(sample) < cfg.tokenizer.train_docs:
                    sample.append(text)
            if len(sample) >= cfg.tokenizer.train_docs:
                return sample, skipped
    return sample, skipped


def finished_tokenizer(cfg: Config, storage: Storage) -> Manifest:
    """The tokenizer stage's manifest, which must be complete."""
    return finished_stage(storage, tokenizer_dir(cfg), "tokenizer")


def load_run_tokenizer(cfg: Config, storage: Storage) -> "PreTrainedTokenizerFast":
    """The tokenizer the run's ``tokenizer`` stage saved."""
    with tempfile.TemporaryDirectory() as tmp:
        return load_pretrained(str(storage.download_dir(tokenizer_dir(cfg), tmp)))
