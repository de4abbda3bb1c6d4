"""Documents -> the Retro chunk database (the ``db`` stage).

Each document is tokenised and cut into chunks of ``chunk_length`` tokens that never cross a
document boundary (the last chunk of a document may be shorter). Rows of ``db/chunks``:

    chunk_id  int64, dense from 0 in corpus order, the same on every rerun
    doc_id    int64, dense from 0 over the documents kept
    doc_pos   int32, index of the chunk within its document
    tokens    list<int32>, at most chunk_length ids
    text      the document text of the chunk; a document's chunk texts concatenate to it
    title     the document's title ("" when it has none)

The continuation of chunk c is c + 1 when that chunk has the same ``doc_id``, else none.

Work is cut into blocks of ``block_size`` chunks named by their range
(``{start:012d}-{end:012d}``); the manifest records each finished block, so a build killed
midway and run again writes and embeds only the missing ones.

No chunk passes through the driver. Unit tasks (a file, or a Parquet row group each) chunk the
corpus in parallel and stage their chunks with ids counted from 0; the driver numbers the units
in corpus order by prefix sums of their counts as they finish, and as soon as a block's units are
numbered, a block task writes the block (and its token store file) from the staged rows, and the
embedding pool embeds it. The blocks are the same, byte for byte, as numbering the whole corpus
in one process.
"""

from __future__ import annotations

import functools
import time
from collections import Counter
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from retro_ray.core.config import Config, config_hash
from retro_ray.core.layout import DB, TOKENIZER, db_dir, tokenizer_dir
from retro_ray.core.locks import locked
from retro_ray.core.manifest import EmptyStageError, Manifest, open_stage
from retro_ray.core.runtime import log
from retro_ray.core.storage import Storage, join
from retro_ray.database import corpus, tokenizer
from retro_ray.database.corpus import BAD_INPUT, BadInputError, bad_rows, describe_skips
from retro_ray.database.files import CHUNK_SCHEMA, block_name, block_range, chunks_uri, write_token_block

# What the chunking tasks emit: chunks of kept documents, and one row per skipped input row.
_CHUNKED_SCHEMA = pa.schema(
    [("path", pa.string()), ("row", pa.int64()), ("skip", pa.string()),
     ("doc_pos", pa.int32()), ("tokens", pa.list_(pa.int32())), ("text", pa.string()), ("title", pa.string())]
)


def chunk_spans(n_tokens: int, chunk_length: int) -> list[tuple[int, int]]:
    """Token ranges [start, end) of a document's chunks."""
    return [(s, min(s + chunk_length, n_tokens)) for s in range(0, n_tokens, chunk_length)]


@functools.lru_cache(maxsize=2)
def _tokenizer(tokenizer_json: str):
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tokenizer_json)


def chunk_documents(batch: pa.Table, tokenizer_json: str, chunk_length: int) -> pa.Table:
    """Corpus rows -> chunk rows (skipped rows pass through), in a unit task."""
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
                        "doc_pos": -1, "tokens": [], "text": None, "title": None})
            continue
        # Character boundaries: chunk texts tile the document (a character whose bytes
        # two chunks share goes to the later one), so they concatenate to the original.
        ids, offsets = enc.ids, enc.offsets  # each access converts the whole list: once per doc
        bounds = [0] + [offsets[s][0] for s, _ in spans[1:]] + [len(r["text"])]
        for pos, (s, e) in enumerate(spans):
            out.append({"path": r["path"], "row": r["row"], "skip": "", "doc_pos": pos, "tokens": ids[s:e],
                        "text": r["text"][bounds[pos]: bounds[pos + 1]], "title": r["title"]})
    return pa.Table.from_pylist(out, schema=_CHUNKED_SCHEMA)


@dataclass(frozen=True)
class Unit:
    """One input unit of the chunk pass, read by one task: a file, a row group of a Parquet file
    or rows [``part``) of one, or the lines of a JSONL file that start in bytes [``part``). Rows
    keep their numbers in the file: ``first_row`` rows come before the unit's."""

    source: int  # index of the corpus in ``cfg.corpus.sources``
    path: str
    row_group: int | None = None
    first_row: int = 0
    part: tuple[int, int] | None = None


def _count_newlines(cfg: Config, path: str, lo: int, hi: int) -> int:
    """Ray task: newlines in bytes [lo, hi) of a file."""
    fs, fs_path = Storage(cfg.storage).resolve(path)
    with fs.open_input_file(fs_path) as f:
        return corpus.count_newlines(f, lo, hi)


def _split_jsonl(cfg: Config, storage: Storage, units: list[Unit]) -> list[Unit]:
    """JSONL files above ``corpus.unit_mb`` as byte ranges, each numbered by the lines before it
    (newlines counted by parallel tasks, far cheaper than chunking)."""
    import ray

    unit_bytes = int(cfg.corpus.unit_mb * 2**20)
    ranges = {}  # unit index -> byte ranges of its file
    for i, u in enumerate(units):
        fmt = corpus.detect_format(cfg.corpus.sources[u.source], u.path)
        size = storage.info(u.path).size if fmt == "jsonl" and not u.path.endswith(".gz") else 0
        if size > unit_bytes:
            ranges[i] = [(lo, min(lo + unit_bytes, size)) for lo in range(0, size, unit_bytes)]
    if not ranges:
        return units
    task = ray.remote(_count_newlines).options(num_cpus=0.5, resources=cfg.resources.chunk)
    # lines starting before byte a of a range: one at 0, one after each newline before a - 1
    refs = {i: [task.remote(cfg, units[i].path, max(lo - 1, 0), hi - 1) for lo, hi in r[:-1]]
            for i, r in ranges.items()}  # every file's counts in flight at once
    counts = {i: ray.get(r) for i, r in refs.items()}
    out = []
    for i, u in enumerate(units):
        if i not in ranges:
            out.append(u)
            continue
        before = [0] + [1 + c for c in np.cumsum(counts[i])]
        out += [Unit(u.source, u.path, first_row=int(n), part=r) for n, r in zip(before, ranges[i])]
    return out


def plan_units(cfg: Config, storage: Storage, files: dict[str, list[str]]) -> list[Unit]:
    """The units of the corpus in blend order: config order of the corpora, then files, then
    rows; a file or row group above ``corpus.unit_mb`` in several units."""
    units, unit_bytes = [], cfg.corpus.unit_mb * 2**20
    for i, source in enumerate(cfg.corpus.sources):
        footers = corpus.parquet_footers(source, files[source.name], storage)
        for path in files[source.name]:
            if path not in footers:
                units.append(Unit(i, path))
                continue
            first = 0
            for g in range(footers[path].num_row_groups):
                group = footers[path].row_group(g)
                parts = max(1, min(group.num_rows, int(np.ceil(group.total_byte_size / unit_bytes))))
                cuts = [group.num_rows * p // parts for p in range(parts + 1)]
                if parts == 1:
                    units.append(Unit(i, path, g, first))
                else:
                    units += [Unit(i, path, g, first + lo, (lo, hi)) for lo, hi in zip(cuts, cuts[1:])]
                first += group.num_rows
    return _split_jsonl(cfg, storage, units)


SKIP_REASONS = BAD_INPUT + ("blend_weight",)
"""Skip reasons by code (code 0: kept) in what ``chunk_unit`` returns."""


def chunk_unit(cfg: Config, tokenizer_json: str, unit: Unit, staged_uri: str, max_rows: int | None) -> dict:
    """Ray task: read one unit, chunk it, and write its chunks to ``staged_uri`` in the block
    schema with ids counted from 0 within the unit (``chunk_id``; ``doc_id`` over its kept
    documents). Returns per input row [rows] the chunks, tokens and skip code, and the unit-local
    row and description of the first bad row; the planner numbers units by prefix sums."""
    storage = Storage(cfg.storage)
    source = cfg.corpus.sources[unit.source]
    fmt = corpus.detect_format(source, unit.path)
    fs, fs_path = storage.resolve(unit.path)
    tables, n_rows, first_bad = [], 0, None
    seekable = fmt == "parquet" or unit.part is not None
    with (fs.open_input_file if seekable else fs.open_input_stream)(fs_path) as f:
        groups = None if unit.row_group is None else [unit.row_group]
        for rows in corpus.read_source_file(f, unit.path, fmt, source, max_rows=max_rows, row_groups=groups,
                                            first_row=unit.first_row, part=unit.part):
            n_rows += rows.num_rows
            tables.append(chunk_documents(rows, tokenizer_json, cfg.db.chunk_length))
    chunked = pa.concat_tables(tables) if tables else _CHUNKED_SCHEMA.empty_table()
    local_row = chunked.column("row").to_numpy() - unit.first_row - 1  # [n] 0-based within the unit
    skip = chunked.column("skip").to_numpy(zero_copy_only=False)
    codes = np.array([0 if not r else SKIP_REASONS.index(r) + 1 for r in skip], dtype=np.int8)
    kept = codes == 0
    lengths = pc.list_value_length(chunked.column("tokens")).to_numpy(zero_copy_only=False)
    row_skip = np.zeros(n_rows, dtype=np.int8)
    row_skip[local_row[~kept]] = codes[~kept]
    bad = np.flatnonzero(~kept & (codes <= len(BAD_INPUT)))
    if len(bad):
        first_bad = (int(local_row[bad[0]]), corpus.describe_skip(chunked.slice(int(bad[0]), 1).to_pylist()[0]))
    chunked = chunked.filter(pa.array(kept))
    doc_pos = chunked.column("doc_pos").to_numpy()
    staged = pa.table([np.arange(chunked.num_rows, dtype=np.int64), np.cumsum(doc_pos == 0) - 1, chunked.column("doc_pos"),
                       chunked.column("tokens"), chunked.column("text"), chunked.column("title")], schema=CHUNK_SCHEMA)
    storage.write_parquet(staged_uri, staged, row_group_size=cfg.db.block_size)
    return {"rows": n_rows, "first_bad": first_bad, "row_skip": row_skip,
            "row_chunks": np.bincount(local_row[kept], minlength=n_rows).astype(np.int32),
            "row_tokens": np.bincount(local_row[kept], weights=lengths[kept], minlength=n_rows).astype(np.int64)}


Piece = tuple[str, int, int, int, int]
"""Rows [lo, hi) of a file in the block schema (a staged unit, or a block of a base database),
and what to add to its ``chunk_id`` and ``doc_id`` columns: (uri, lo, hi, chunk_base, doc_base)."""


def _read_rows(storage: Storage, uri: str, lo: int, hi: int) -> pa.Table:
    """Rows [lo, hi) of a Parquet file, reading only the row groups that hold them."""
    fs, path = storage.resolve(uri)
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        groups, first, start = [], None, 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if start < hi and start + n > lo:
                groups.append(g)
                first = start if first is None else first
            start += n
        return pf.read_row_groups(groups).slice(lo - first, hi - lo) if groups else CHUNK_SCHEMA.empty_table()


def write_block(cfg: Config, db: str, name: str, pieces: list[Piece]) -> dict:
    """Ray task: write block ``name`` of database ``db`` from its pieces; its manifest entry."""
    storage = Storage(cfg.storage)
    parts = []
    for uri, lo, hi, chunk_base, doc_base in pieces:
        t = _read_rows(storage, uri, lo, hi)
        parts.append(pa.table([pc.add(t.column("chunk_id"), chunk_base), pc.add(t.column("doc_id"), doc_base),
                               t.column("doc_pos"), t.column("tokens"), t.column("text"), t.column("title")],
                              schema=CHUNK_SCHEMA))
    block = pa.concat_tables(parts).combine_chunks()
    start, end = block_range(name)
    if block.column("chunk_id").to_pylist() != list(range(start, end)):  # a planning error, never bad input
        raise AssertionError(f"db: block {name} got chunk ids that do not match its name")
    return {"rows": block.num_rows, "chunks_sha256": storage.write_parquet(chunks_uri(db, name), block),
            "tokens_sha256": write_token_block(storage, db, name, block)}


class _Planner:
    """The driver's side of the chunk pass: it launches unit tasks, numbers the units in corpus
    order by prefix sums as they finish, and hands out each block once every unit it takes rows
    from is numbered. No chunk passes through it; it records units and blocks in the manifest.

    Units numbered (a prefix of the corpus) are recorded in ``manifest.units`` with their counts,
    so a killed pass reruns only the units after them and writes only the blocks not recorded.
    """

    def __init__(self, cfg: Config, manifest: Manifest, units: list[Unit], carry: Piece | None = None,
                 chunk_base: int = 0, doc_base: int = 0, skipped: Counter | None = None):
        self.cfg, self.manifest, self.units, self.db = cfg, manifest, units, db_dir(cfg)
        self.first_chunk = chunk_base - (carry[2] - carry[1] if carry else 0)  # the first id this pass writes
        self.pieces: list[tuple[int, Piece]] = [(self.first_chunk, carry)] if carry else []  # (first id, piece)
        self.next_chunk, self.next_doc = chunk_base, doc_base
        self.skipped = skipped or Counter()
        self.tokens, self.rows = 0, 0
        self.numbered = 0  # units numbered so far
        self.next_block = self.first_chunk  # start of the next block to hand out
        for i in range(len(units)):  # units a killed run already numbered
            if str(i) not in manifest.units:
                break
            self._number(i, manifest.units[str(i)])

    def staged_uri(self, i: int) -> str:
        return join(self.db, "_staged", f"{i:08d}.parquet")

    def rows_left(self) -> int | None:
        """Input rows still wanted under ``corpus.max_docs`` (None: all)."""
        limit = self.cfg.corpus.max_docs
        return None if limit is None else max(0, limit - self.rows)

    def done(self) -> bool:
        return self.numbered == len(self.units) or self.rows_left() == 0

    def add(self, i: int, result: dict) -> None:
        """Number unit ``i`` (the next in order), cut to the rows ``max_docs`` still wants."""
        n = result["rows"] if self.rows_left() is None else min(result["rows"], self.rows_left())
        first_bad = result["first_bad"]
        if self.cfg.strict and first_bad and first_bad[0] < n:
            raise BadInputError(f"{first_bad[1]} (strict: true)")
        row_chunks = result["row_chunks"][:n]
        skips = np.bincount(result["row_skip"][:n], minlength=len(SKIP_REASONS) + 1)
        record = {"rows": n, "chunks": int(row_chunks.sum()), "docs": int((row_chunks > 0).sum()),
                  "tokens": int(result["row_tokens"][:n].sum()),
                  "skipped": {r: int(c) for r, c in zip(SKIP_REASONS, skips[1:]) if c}}
        self.manifest.units[str(i)] = record
        self._number(i, record)

    def _number(self, i: int, record: dict) -> None:
        if record["chunks"]:
            self.pieces.append((self.next_chunk, (self.staged_uri(i), 0, record["chunks"], self.next_chunk,
                                                  self.next_doc)))
        self.next_chunk += record["chunks"]
        self.next_doc += record["docs"]
        self.tokens += record["tokens"]
        self.rows += record["rows"]
        self.skipped.update(record["skipped"])
        self.numbered = i + 1

    def ready_blocks(self) -> Iterator[tuple[str, list[Piece]]]:
        """Blocks whose chunks are all numbered (the last, short one once every unit is), not
        written yet; pieces no later block needs are forgotten."""
        size = self.cfg.db.block_size
        while self.next_block < self.next_chunk and (self.next_block + size <= self.next_chunk or self.done()):
            start, end = self.next_block, min(self.next_block + size, self.next_chunk)
            pieces = []
            for first, (uri, lo, hi, chunk_base, doc_base) in self.pieces:
                a, b = max(start, first), min(end, first + hi - lo)
                if a < b:
                    pieces.append((uri, lo + a - first, lo + b - first, chunk_base, doc_base))
            self.pieces = [(f, p) for f, p in self.pieces if f + p[2] - p[1] > end]
            self.next_block = end
            if block_name(start, end) not in self.manifest.blocks:
                yield block_name(start, end), pieces


def build_db(cfg: Config, storage: Storage, manifest: Manifest, files: dict[str, list[str]],
             planner: _Planner | None = None) -> None:
    """The chunk pass and the embedding pass as one stream: unit tasks chunk the corpus, block
    tasks write each block as soon as its units are numbered, and the embedding actor pool
    embeds each block as soon as it is written (after the chunks ``planner`` already numbered,
    when given: see ``append_documents``). Resumes from the manifest: only missing work is done."""
    import ray

    from retro_ray.database.embed import EmbedPool

    db = db_dir(cfg)
    pool = EmbedPool(cfg, db)
    for name in sorted(n for n, b in manifest.blocks.items() if "embeddings_sha256" not in b):
        pool.submit(name, manifest.blocks[name]["rows"])
    chunk_pass = "chunks" not in manifest.counts
    if chunk_pass:
        units = plan_units(cfg, storage, files)
        planner = planner or _Planner(cfg, manifest, units)
        tokenizer_json = ray.put(storage.read_bytes(join(tokenizer_dir(cfg), "tokenizer.json")).decode())
        # The embedding actors hold their CPUs from the start. Where they share nodes with
        # chunking, unit tasks are never queued for more CPUs than the actors leave (else an
        # actor can wait behind them), and where the actors would take every CPU, unit tasks
        # reserve none (one at a time, sharing the cores) rather than wait for CPUs the actors
        # never give back. Block tasks only copy staged rows: they reserve no CPU.
        e = cfg.embed
        reserved = 0 if cfg.resources.embed else e.max_actors * e.num_cpus_per_actor
        shares = not cfg.resources.chunk and ray.cluster_resources().get("CPU", 0) - reserved < 1
        unit_task = ray.remote(chunk_unit).options(num_cpus=0 if shares else 1, resources=cfg.resources.chunk)
        block_task = ray.remote(write_block).options(num_cpus=0, resources=cfg.resources.chunk)
        log.info("db: chunking %d input units (files, Parquet row groups) from unit %d on", len(units),
                 planner.numbered)
        pool.start()  # the models load while the first units are read
    start = time.time()
    pending: dict = {}  # ref -> (kind, what)
    results: dict[int, dict] = {}  # finished units not numbered yet
    ready: list[tuple[str, list]] = []  # blocks whose units are numbered, waiting for a block task
    block_window = max(2, int(ray.cluster_resources().get("CPU", 0)))  # block tasks reserve no CPU: bounded here
    launched = planner.numbered if chunk_pass else 0
    written = 0
    while True:
        if chunk_pass:
            free = int(ray.cluster_resources().get("CPU", 0) - reserved)
            window = max(2 if cfg.resources.chunk else 1, 0 if shares else free)
            while (launched < len(units) and not planner.done()
                   and sum(kind == "unit" for kind, _ in pending.values()) < window):
                ref = unit_task.remote(cfg, tokenizer_json, units[launched], planner.staged_uri(launched),
                                       cfg.corpus.max_docs)
                pending[ref] = ("unit", launched)
                launched += 1
        while ready and sum(kind == "block" for kind, _ in pending.values()) < block_window:
            name, pieces = ready.pop(0)
            pending[block_task.remote(cfg, db, name, pieces)] = ("block", name)
        pending.update({ref: ("embed", name) for ref, name in pool.dispatch()})
        if not pending:
            break
        [ref], _ = ray.wait(list(pending), num_returns=1)
        kind, what = pending.pop(ref)
        if kind == "unit":
            results[what] = ray.get(ref)
            while planner.numbered in results and not planner.done():
                planner.add(planner.numbered, results.pop(planner.numbered))
                manifest.record(storage, db, "units", str(planner.numbered - 1))
            ready += planner.ready_blocks()
            if planner.done():
                for other in [r for r, (k, _) in pending.items() if k == "unit"]:  # past max_docs
                    ray.cancel(other)
                    pending.pop(other)
        elif kind == "block":
            manifest.blocks[what] = ray.get(ref)
            manifest.record(storage, db, "blocks", what)
            written += 1
            pool.submit(what, manifest.blocks[what]["rows"])
        else:
            manifest.blocks[what].update(pool.finish(ref, what))
            manifest.record(storage, db, "blocks", what)
        writing = ready or any(k in ("unit", "block") for k, _ in pending.values())
        if chunk_pass and planner.done() and not writing:
            chunk_pass = False
            _finish_chunk_pass(cfg, storage, manifest, planner, written, time.time() - start)
    manifest.timings["embed_s"] = manifest.timings.get("embed_s", 0.0) + pool.close()
    manifest.counts["truncated"] = sum(b.get("truncated", 0) for b in manifest.blocks.values())
    if pool.threads:
        manifest.counts["embed_threads"] = pool.threads  # torch threads of each embedding actor
    if manifest.counts.get("truncated"):
        log.warning("db: %d chunk texts were longer than embed.max_length=%d encoder tokens and "
                    "were truncated", manifest.counts["truncated"], cfg.embed.max_length)


def _finish_chunk_pass(cfg: Config, storage: Storage, manifest: Manifest, planner: _Planner, written: int,
                       seconds: float) -> None:
    manifest.skipped = dict(sorted(planner.skipped.items()))
    if planner.next_chunk == 0:  # raised before the counts are saved: a fixed corpus starts afresh
        raise EmptyStageError(f"db: the corpus gave no chunks: every input row was skipped "
                              f"({describe_skips(manifest.skipped)})")
    manifest.counts.update(docs=planner.next_doc, chunks=planner.next_chunk, tokens=planner.tokens)
    manifest.timings["chunk_s"] = manifest.timings.get("chunk_s", 0.0) + seconds
    manifest.units = {}
    manifest.save(storage, db_dir(cfg))
    storage.delete_dir(join(db_dir(cfg), "_staged"))
    log.info("db: %d documents -> %d chunks (%d tokens) in %.1fs; %d blocks written, %d kept from an "
             "earlier run; skipped: %s", planner.next_doc, planner.next_chunk, planner.tokens, seconds, written,
             len(manifest.blocks) - written, describe_skips(manifest.skipped))
    bad = bad_rows(manifest.skipped)
    if bad:
        log.warning("db: %d bad input rows skipped (%s); strict: true stops at the first",
                    sum(bad.values()), describe_skips(bad))


def append_documents(cfg: Config, storage: Storage, manifest: Manifest, base: Manifest, base_db: str,
                     sources: list, files: dict[str, list[str]]) -> None:
    """Chunk and embed the documents of ``sources`` into the database ``cfg`` after those of the
    finished database ``base``, whose full blocks ``manifest`` already lists (copied): the same
    ids for the old chunks, the next ones for the new, only new or completed blocks written."""
    only_new = cfg.model_copy(update={"corpus": cfg.corpus.model_copy(update={"sources": sources, "max_docs": None})})
    files = {s.name: files[s.name] for s in sources}
    if "chunks" in manifest.counts:  # chunked: what is left is embedding
        return build_db(only_new, storage, manifest, files)
    start, end = block_range(max(base.blocks, key=lambda name: block_range(name)[0]))
    carry = None
    if end - start < cfg.db.block_size:  # the base's short last block is completed by the new chunks
        carry = (chunks_uri(base_db, block_name(start, end)), 0, end - start, 0, 0)
    planner = _Planner(only_new, manifest, plan_units(only_new, storage, files), carry,
                       base.counts["chunks"], base.counts["docs"], Counter(base.skipped))
    planner.tokens = base.counts["tokens"]
    build_db(only_new, storage, manifest, files, planner)


def _write_token_store(cfg: Config, storage: Storage, manifest: Manifest) -> None:
    """Token store files of blocks written before there was a token store (older versions)."""
    import ray

    todo = sorted(n for n, b in manifest.blocks.items() if "tokens_sha256" not in b)
    if not todo:
        return
    log.info("db: writing the token store of %d blocks built by an older version", len(todo))

    def write(name: str) -> str:
        block = storage.read_parquet(chunks_uri(db_dir(cfg), name), columns=["doc_id", "tokens"])
        return write_token_block(storage, db_dir(cfg), name, block)

    task = ray.remote(write).options(num_cpus=1, resources=cfg.resources.chunk)
    for name, sha in zip(todo, ray.get([task.remote(n) for n in todo])):
        manifest.blocks[name]["tokens_sha256"] = sha
    manifest.save(storage, db_dir(cfg))


def open_db(cfg: Config, storage: Storage, force: bool = False) -> tuple[Manifest, dict[str, list[str]]]:
    """The db stage's manifest to continue from (see ``open_stage``), and the corpus files."""
    from retro_ray.database import embed

    tok_manifest = tokenizer.finished_tokenizer(cfg, storage)
    files = corpus.source_files(cfg, storage)
    inputs = {"tokenizer": tok_manifest.content_hash()}
    inputs.update({p: storage.fingerprint(p) for paths in files.values() for p in paths})
    manifest = open_stage(
        storage, db_dir(cfg), "db",
        config_hash(cfg.corpus, cfg.db, embed.output_config(cfg.embed)), inputs, force,
    )
    return manifest, files


@locked(TOKENIZER, DB)
def run(cfg: Config, storage: Storage, force: bool = False) -> Manifest:
    """The ``db`` stage: chunk blocks and their embeddings; resumes from the manifest."""
    manifest, files = open_db(cfg, storage, force)
    if manifest.complete:
        bad = bad_rows(manifest.skipped)
        if cfg.strict and bad:
            raise BadInputError(f"{db_dir(cfg)} was built with {sum(bad.values())} bad input rows skipped "
                                f"({describe_skips(bad)}), and strict is on: rerun with --force to stop at the first")
        log.info("db: %s is up to date (%d chunks; skipped: %s)", db_dir(cfg), manifest.counts["chunks"],
                 describe_skips(manifest.skipped))
        _write_token_store(cfg, storage, manifest)
        return manifest
    build_db(cfg, storage, manifest, files)
    manifest.complete = True
    manifest.save(storage, db_dir(cfg))
    return manifest
