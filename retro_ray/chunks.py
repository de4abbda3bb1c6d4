"""Documents -> the Retro chunk database (the ``db`` stage).

Each document is tokenised and cut into chunks of ``chunk_length`` tokens that never cross a
document boundary (the last chunk of a document may be shorter). Rows of ``db/chunks``:

    chunk_id  int64, dense from 0 in corpus order, the same on every rerun
    doc_id    int64, dense from 0 over the documents kept
    doc_pos   int32, index of the chunk within its document
    tokens    list<int32>, at most chunk_length ids
    text      the document text of the chunk; a document's chunk texts concatenate to it

The continuation of chunk c is c + 1 when that chunk has the same ``doc_id``, else none.

Work is cut into blocks of ``block_size`` chunks named by their range
(``{start:012d}-{end:012d}``); the manifest records each finished block, so a build killed
midway and run again writes and embeds only the missing ones.
"""

from __future__ import annotations

import functools
import time
from collections import Counter
from typing import Iterator

import numpy as np
import pyarrow as pa

from retro_ray import corpus, tokenizer
from retro_ray.config import Config, config_hash
from retro_ray.corpus import BAD_INPUT, BadInputError, bad_rows, describe_skips
from retro_ray.dbfiles import CHUNK_SCHEMA, block_name, block_range, chunks_uri, db_dir
from retro_ray.locks import locked
from retro_ray.runtime import log
from retro_ray.storage import EmptyStageError, Manifest, Storage, join, open_stage

# What the chunking tasks emit: chunks of kept documents, and one row per skipped input row.
_CHUNKED_SCHEMA = pa.schema(
    [("path", pa.string()), ("row", pa.int64()), ("skip", pa.string()),
     ("doc_pos", pa.int32()), ("tokens", pa.list_(pa.int32())), ("text", pa.string())]
)


def chunk_spans(n_tokens: int, chunk_length: int) -> list[tuple[int, int]]:
    """Token ranges [start, end) of a document's chunks."""
    return [(s, min(s + chunk_length, n_tokens)) for s in range(0, n_tokens, chunk_length)]


def continuation_ids(chunk_ids: np.ndarray, doc_ids: np.ndarray) -> np.ndarray:
    """The chunk that continues each chunk (the next one of its document), or -1.

    ``chunk_ids`` and ``doc_ids`` are consecutive rows of the database, [n] each; the last row
    gets -1 unless the caller passes one row more.
    """
    nxt = np.full(len(chunk_ids), -1, dtype=np.int64)
    same_doc = doc_ids[1:] == doc_ids[:-1]  # [n - 1]
    nxt[:-1][same_doc] = chunk_ids[1:][same_doc]
    return nxt


@functools.lru_cache(maxsize=2)
def _tokenizer(tokenizer_json: str):
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tokenizer_json)


def chunk_documents(batch: pa.Table, tokenizer_json: str, chunk_length: int) -> pa.Table:
    """Ray Data batch function: corpus rows -> chunk rows (skipped rows pass through)."""
    rows = batch.to_pylist()
    kept = [r for r in rows if not r["skip"]]
    encodings = iter(_tokenizer(tokenizer_json).encode_batch([r["text"] for r in kept],
                                                             add_special_tokens=False))
    out: list[dict] = []
    for r in rows:
        enc = None if r["skip"] else next(encodings)
        spans = chunk_spans(len(enc.ids), chunk_length) if enc is not None else []
        if not spans:
            out.append({"path": r["path"], "row": r["row"], "skip": r["skip"] or "empty",
                        "doc_pos": -1, "tokens": [], "text": None})
            continue
        # Character boundaries: chunk texts tile the document (a character whose bytes
        # two chunks share goes to the later one), so they concatenate to the original.
        ids, offsets = enc.ids, enc.offsets  # each access converts the whole list: once per doc
        bounds = [0] + [offsets[s][0] for s, _ in spans[1:]] + [len(r["text"])]
        for pos, (s, e) in enumerate(spans):
            out.append({"path": r["path"], "row": r["row"], "skip": "", "doc_pos": pos,
                        "tokens": ids[s:e], "text": r["text"][bounds[pos]: bounds[pos + 1]]})
    return pa.Table.from_pylist(out, schema=_CHUNKED_SCHEMA)


def _chunk_stream(cfg: Config, storage: Storage, files: dict[str, list[str]]) -> Iterator[pa.Table]:
    """Chunk rows of the whole corpus, in corpus order (tokenised in parallel Ray tasks)."""
    from ray.data import DataContext

    DataContext.get_current().execution_options.preserve_order = True
    tokenizer_json = storage.read_bytes(join(tokenizer.stage_dir(cfg), "tokenizer.json")).decode()
    for ds in corpus.read_corpus(cfg, storage, files):
        chunked = ds.map_batches(
            chunk_documents,  # tasks, not actors: their CPUs are free again when the pass ends
            fn_kwargs={"tokenizer_json": tokenizer_json, "chunk_length": cfg.db.chunk_length},
            batch_format="pyarrow",
            batch_size=256,
            resources=cfg.resources.chunk,
        )
        yield from chunked.iter_batches(batch_format="pyarrow", batch_size=None)


class _BlockWriter:
    """Assigns dense ids in stream order and writes each full block not already recorded."""

    def __init__(self, cfg: Config, storage: Storage, manifest: Manifest):
        self.cfg, self.storage, self.manifest = cfg, storage, manifest
        self.rows: list[pa.Table] = []
        self.n_rows = 0
        self.next_chunk = 0
        self.next_doc = 0
        self.skipped: Counter[str] = Counter()
        self.tokens = 0
        self.written = 0

    @classmethod
    def after(cls, cfg: Config, storage: Storage, manifest: Manifest, base: Manifest, base_db: str) -> "_BlockWriter":
        """A writer that goes on from the finished database ``base`` (in ``base_db``): its chunk
        and document ids, token and skip counts continue, and its last block, when not full, is
        taken up again to be completed by the new chunks."""
        writer = cls(cfg, storage, manifest)
        writer.next_chunk, writer.next_doc = base.counts["chunks"], base.counts["docs"]
        writer.tokens, writer.skipped = base.counts["tokens"], Counter(base.skipped)
        start, end = block_range(max(base.blocks, key=lambda name: block_range(name)[0]))
        if end - start < cfg.db.block_size:
            writer.rows = [storage.read_parquet(chunks_uri(base_db, block_name(start, end)))]
            writer.n_rows = end - start
        return writer

    def add(self, chunked: pa.Table) -> None:
        """Take the next rows of the stream."""
        skip = chunked.column("skip").to_numpy(zero_copy_only=False)
        bad = skip != ""
        if bad.any():
            for i in np.flatnonzero(bad):
                reason = str(skip[i])
                if self.cfg.strict and reason in BAD_INPUT:
                    row = chunked.slice(int(i), 1).to_pylist()[0]
                    raise BadInputError(f"{corpus.describe_skip(row)} (strict: true)")
                self.skipped[reason] += 1
            chunked = chunked.filter(pa.array(~bad))
        if chunked.num_rows == 0:
            return
        doc_pos = chunked.column("doc_pos").to_numpy()
        doc_ids = self.next_doc - 1 + np.cumsum(doc_pos == 0)  # a chunk at doc_pos 0 opens a document
        self.next_doc = int(doc_ids[-1]) + 1
        chunk_ids = np.arange(self.next_chunk, self.next_chunk + chunked.num_rows, dtype=np.int64)
        self.next_chunk += chunked.num_rows
        self.tokens += int(pa.compute.sum(pa.compute.list_value_length(chunked.column("tokens"))).as_py())
        table = pa.table(
            [chunk_ids, doc_ids, chunked.column("doc_pos"), chunked.column("tokens"), chunked.column("text")],
            schema=CHUNK_SCHEMA,
        )
        self.rows.append(table)
        self.n_rows += table.num_rows
        while self.n_rows >= self.cfg.db.block_size:
            self._flush(self.cfg.db.block_size)

    def _flush(self, n: int) -> None:
        pending = pa.concat_tables(self.rows)
        block, rest = pending.slice(0, n), pending.slice(n)
        self.rows, self.n_rows = [rest], rest.num_rows
        start = block.column("chunk_id")[0].as_py()
        name = block_name(start, start + block.num_rows)
        if name in self.manifest.blocks:
            return  # written by an earlier run of the same config and inputs
        sha = self.storage.write_parquet(chunks_uri(db_dir(self.cfg), name), block.combine_chunks())
        self.manifest.blocks[name] = {"rows": block.num_rows, "chunks_sha256": sha}
        self.manifest.save(self.storage, db_dir(self.cfg))
        self.written += 1

    def close(self) -> None:
        if self.n_rows:
            self._flush(self.n_rows)


def build_chunks(cfg: Config, storage: Storage, manifest: Manifest, files: dict[str, list[str]],
                 writer: _BlockWriter | None = None) -> None:
    """Chunk pass: stream the corpus through the tokeniser into chunk blocks (after the chunks
    ``writer`` already numbered, when given: see ``append_documents``)."""
    start = time.time()
    writer = writer or _BlockWriter(cfg, storage, manifest)
    for chunked in _chunk_stream(cfg, storage, files):
        writer.add(chunked)
    writer.close()
    manifest.skipped = dict(sorted(writer.skipped.items()))
    if writer.next_chunk == 0:  # raised before the manifest is saved: a fixed corpus starts afresh
        raise EmptyStageError(f"db: the corpus gave no chunks: every input row was skipped "
                              f"({describe_skips(manifest.skipped)})")
    manifest.counts.update(docs=writer.next_doc, chunks=writer.next_chunk, tokens=writer.tokens)
    manifest.timings["chunk_s"] = time.time() - start
    manifest.save(storage, db_dir(cfg))
    bad = bad_rows(manifest.skipped)
    log.info(
        "db: %d documents -> %d chunks (%d tokens) in %.1fs; %d blocks written, %d kept from an "
        "earlier run; skipped: %s", writer.next_doc, writer.next_chunk, writer.tokens,
        manifest.timings["chunk_s"], writer.written, len(manifest.blocks) - writer.written,
        describe_skips(manifest.skipped),
    )
    if bad:
        log.warning("db: %d bad input rows skipped (%s); strict: true stops at the first",
                    sum(bad.values()), describe_skips(bad))


def append_documents(cfg: Config, storage: Storage, manifest: Manifest, base: Manifest, base_db: str,
                     sources: list, files: dict[str, list[str]]) -> None:
    """Chunk the documents of ``sources`` into the database ``cfg`` after those of the finished
    database ``base``, whose full blocks ``manifest`` already lists (copied): the same ids for
    the old chunks, the next ones for the new, only new or completed blocks written."""
    only_new = cfg.model_copy(update={"corpus": cfg.corpus.model_copy(update={"sources": sources, "max_docs": None})})
    build_chunks(only_new, storage, manifest, {s.name: files[s.name] for s in sources},
                 _BlockWriter.after(cfg, storage, manifest, base, base_db))


def open_db(cfg: Config, storage: Storage, force: bool = False) -> tuple[Manifest, dict[str, list[str]]]:
    """The db stage's manifest to continue from (see ``open_stage``), and the corpus files."""
    from retro_ray import embed

    tok_manifest = tokenizer.finished_tokenizer(cfg, storage)
    files = corpus.source_files(cfg, storage)
    inputs = {"tokenizer": tok_manifest.content_hash()}
    inputs.update({p: storage.fingerprint(p) for paths in files.values() for p in paths})
    manifest = open_stage(
        storage, db_dir(cfg), "db",
        config_hash(cfg.corpus, cfg.db, embed.output_config(cfg.embed)), inputs, force,
    )
    return manifest, files


@locked("tokenizer", "db")
def run(cfg: Config, storage: Storage, force: bool = False) -> Manifest:
    """The ``db`` stage: chunk blocks, then their embeddings; resumes from the manifest."""
    from retro_ray import embed  # torch: imported here, not in the Ray tasks that only chunk

    manifest, files = open_db(cfg, storage, force)
    if manifest.complete:
        bad = bad_rows(manifest.skipped)
        if cfg.strict and bad:
            raise BadInputError(f"{db_dir(cfg)} was built with {sum(bad.values())} bad input rows skipped "
                                f"({describe_skips(bad)}), and strict is on: rerun with --force to stop at the first")
        log.info("db: %s is up to date (%d chunks; skipped: %s)", db_dir(cfg), manifest.counts["chunks"],
                 describe_skips(manifest.skipped))
        return manifest
    if "chunks" not in manifest.counts:  # the chunk pass did not finish last time
        build_chunks(cfg, storage, manifest, files)
    embed.embed_blocks(cfg, storage, manifest, db_dir(cfg))
    manifest.complete = True
    manifest.save(storage, db_dir(cfg))
    return manifest
