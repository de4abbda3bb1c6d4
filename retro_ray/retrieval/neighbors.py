"""The ``neighbors`` stage: pretraining samples and the retrieved neighbours of their chunks.

Documents are split into train and valid by a stable hash of ``doc_id`` (held-out documents),
then packed in ``doc_id`` order into samples of ``seq_len`` tokens. Every document starts on a
chunk boundary and is followed by the end-of-document token; the rest of its last chunk is
padding (also the EOD token, excluded from the loss by ``chunk_lengths``). So each sample chunk
is a database chunk (plus EOD and padding at a document's end): its query embedding is the
database's, never computed again. A document ending exactly on a chunk boundary gets one more
chunk holding only EOD, with no database chunk (``chunk_ids`` -1, no neighbours).

Rows of ``samples/{train,valid}/{start:010d}-{end:010d}.parquet``:

    sample_id      int64, dense per split
    tokens         [seq_len] int32
    chunk_ids      [n_chunks] int64, the database chunk of each sample chunk, or -1
    chunk_doc_ids  [n_chunks] int64, the document of each sample chunk, or -1 (tail padding)
    chunk_lengths  [n_chunks] int32, tokens of each chunk that are not padding (EOD counted)
    neighbors      [n_chunks, k] int64, retrieved chunk ids, -1 = none; never a chunk of a
                   document that occurs anywhere in the same sample

Notation: b samples, l = n_chunks chunks per sample, m chunk length, k neighbours,
c = k_candidates, r = 2 m neighbour length (chunk + continuation).
"""

from __future__ import annotations

import functools
import hashlib
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from retro_ray.core.config import Config, config_hash
from retro_ray.core.errors import UserError
from retro_ray.core.layout import DB, INDEX, SAMPLES, TOKENIZER, db_dir, index_dir, samples_dir
from retro_ray.core.locks import locked
from retro_ray.core.manifest import EmptyStageError, Manifest, finished_stage, open_stage
from retro_ray.core.runtime import log, progress
from retro_ray.core.storage import Storage, join
from retro_ray.database import tokenizer
from retro_ray.database.files import ChunkStore, finished_db, read_vectors
from retro_ray.retrieval import index as index_stage

SPLITS = ("train", "valid")


def is_valid_doc(doc_id: int, fraction: float) -> bool:
    """Stable held-out choice of a document."""
    digest = hashlib.blake2b(str(doc_id).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


@dataclass
class SampleLayout:
    """Where sample chunks come from: [n_samples, l] arrays (or [e] while still flat)."""

    chunk_ids: np.ndarray
    doc_ids: np.ndarray
    lengths: np.ndarray
    docs: int = 0
    """Documents whose last chunk is among these (set by ``block_layout``)."""

    @classmethod
    def concat(cls, parts: list["SampleLayout"]) -> "SampleLayout":
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("chunk_ids", "doc_ids", "lengths")))

    def __getitem__(self, sl: slice) -> "SampleLayout":
        return SampleLayout(self.chunk_ids[sl], self.doc_ids[sl], self.lengths[sl])

    def __len__(self) -> int:
        return len(self.chunk_ids)


def block_layout(store: ChunkStore, b: int, valid_fraction: float, chunk_len: int) -> dict[str, SampleLayout]:
    """The sample chunks that database block ``b`` gives each split, in order, flat ([e] each).

    A split's samples are its blocks' entries one after another, cut every l: each chunk of a
    document in the split, with EOD counted in its last chunk; a full last chunk is followed by an
    entry of its own holding only EOD (chunk id -1)."""
    start, docs, lengths = store.block(b)  # [n] doc ids and token counts
    n = len(docs)
    next_doc = np.append(docs[1:], store.doc_id(start + n) if start + n < len(store) else -1)
    last = next_doc != docs  # [n] the last chunk of its document
    chosen = {int(d): is_valid_doc(int(d), valid_fraction) for d in np.unique(docs)}
    in_valid = np.array([chosen[int(d)] for d in docs], dtype=bool)
    out = {}
    for split, mask in (("train", ~in_valid), ("valid", in_valid)):
        sel = np.flatnonzero(mask)
        length, is_last = lengths[sel].astype(np.int32), last[sel]
        eod_chunk = is_last & (length >= chunk_len)  # EOD opens a chunk of its own
        reps = 1 + eod_chunk.astype(np.int64)
        at = np.cumsum(reps) - reps  # where each database chunk lands
        chunk_ids = np.full(int(reps.sum()), -1, dtype=np.int64)
        chunk_ids[at] = start + sel
        entry_lengths = np.ones(len(chunk_ids), dtype=np.int32)
        entry_lengths[at] = np.where(is_last & ~eod_chunk, length + 1, length)  # room for EOD
        out[split] = SampleLayout(chunk_ids, np.repeat(docs[sel].astype(np.int64), reps), entry_lengths, int(is_last.sum()))
    return out


def count_entries(cfg: Config, blocks: list[str], first: int, last: int) -> np.ndarray:
    """Ray task: [last - first, 4] for database blocks first..last: the entries they give train
    and valid, and the documents of train and valid that end in them."""
    store = ChunkStore.open(Storage(cfg.storage), db_dir(cfg), blocks)
    layouts = [block_layout(store, b, cfg.neighbors.valid_fraction, cfg.db.chunk_length) for b in range(first, last)]
    return np.array([[len(x[s]) for s in SPLITS] + [x[s].docs for s in SPLITS] for x in layouts],
                    dtype=np.int64).reshape(-1, 4)


def entries(store: ChunkStore, cfg: Config, split: str, offsets: np.ndarray, lo: int, hi: int) -> SampleLayout:
    """Entries [lo, hi) of ``split``, whose database block b starts at entry ``offsets[b]``
    ([blocks + 1] prefix sums), padded with empty ones past the split's end."""
    first = int(np.searchsorted(offsets, lo, side="right")) - 1
    parts, b = [], first
    while b < len(offsets) - 1 and offsets[b] < hi:
        parts.append(block_layout(store, b, cfg.neighbors.valid_fraction, cfg.db.chunk_length)[split])
        b += 1
    flat = SampleLayout.concat(parts)[lo - int(offsets[first]): hi - int(offsets[first])] if parts else None
    pad = hi - lo - (len(flat) if flat else 0)
    padding = SampleLayout(np.full(pad, -1, np.int64), np.full(pad, -1, np.int64), np.zeros(pad, np.int32))
    return SampleLayout.concat([flat, padding]) if flat else padding


def sample_tokens(store: ChunkStore, chunk_ids: np.ndarray, chunk_len: int, eod: int) -> np.ndarray:
    """[b, l] chunk ids -> [b, l * m] tokens: chunk tokens, then EOD after a document's last chunk,
    then EOD padding to the chunk boundary."""
    b, n_chunks = chunk_ids.shape
    out = np.full((b, n_chunks, chunk_len), eod, dtype=np.int32)  # [b, l, m]
    for (i, j), c in np.ndenumerate(chunk_ids):
        if c >= 0:
            toks = store.tokens(c)
            out[i, j, : len(toks)] = toks
    return out.reshape(b, n_chunks * chunk_len)


def filter_neighbors(candidates: np.ndarray, candidate_docs: np.ndarray, sample_docs: np.ndarray,
                     k: int) -> np.ndarray:
    """Keep the first ``k`` candidates whose document is not in the sample.

    candidates, candidate_docs: [b, l, c] (id -1 = none); sample_docs: [b, l] (-1 = padding).
    Returns [b, l, k] chunk ids, -1 where fewer than k remain.
    """
    same = (candidate_docs[..., None] == sample_docs[:, None, None, :]).any(-1)  # [b, l, c]
    ok = (candidates >= 0) & ~same  # [b, l, c]
    order = np.argsort(~ok, axis=-1, kind="stable")[..., :k]  # kept ones first, rank preserved
    kept = np.take_along_axis(candidates, order, axis=-1)  # [b, l, k]
    return np.where(np.take_along_axis(ok, order, axis=-1), kept, -1)


_POWERS = np.array([pow(1_000_003, j, 2**64) for j in range(64)], dtype=np.uint64)


def ngram_hashes(tokens: np.ndarray, n: int = 8) -> np.ndarray:
    """[t] token ids -> [t - n + 1] hashes of their n-grams (empty when t < n)."""
    if len(tokens) < n:
        return np.empty(0, dtype=np.uint64)
    windows = np.lib.stride_tricks.sliding_window_view(np.asarray(tokens, dtype=np.uint64), n)  # [g, n]
    return (windows * _POWERS[:n]).sum(-1)  # arithmetic mod 2**64


def ngram_overlap(chunk: np.ndarray, others: list[np.ndarray], n: int = 8) -> float:
    """The share of ``chunk``'s n-grams that occur in any of ``others`` (RETRO's measure of how
    much of a chunk its neighbours already contain); 0 for a chunk shorter than n."""
    grams = ngram_hashes(chunk, n)
    if not len(grams):
        return 0.0
    seen = np.concatenate([ngram_hashes(o, n) for o in others] or [np.empty(0, dtype=np.uint64)])
    return float(np.isin(grams, seen).mean())


def drop_near_copies(store: ChunkStore, chunk_ids: np.ndarray, candidates: np.ndarray, r: int,
                     max_overlap: float, n: int = 8) -> tuple[np.ndarray, int]:
    """Candidates [b, l, c] with -1 for every one whose tokens (chunk + continuation, r) hold
    more than ``max_overlap`` of its query chunk's n-grams; and how many were dropped."""
    out = candidates.copy()
    dropped = 0
    for b, u in zip(*np.nonzero(chunk_ids >= 0)):
        row = candidates[b, u]  # [c]
        tokens, mask = store.neighbor_tokens(row[None], r, -1)  # [1, c, r]
        chunk = store.tokens(int(chunk_ids[b, u]))
        for j in np.flatnonzero(row >= 0):
            if ngram_overlap(chunk, [tokens[0, j][mask[0, j]]], n) > max_overlap:
                out[b, u, j] = -1
                dropped += 1
    return out, dropped


def _block_table(first_id: int, tokens, layout: SampleLayout, sl: slice, neighbors: np.ndarray) -> pa.Table:
    b, n_chunks = layout.chunk_ids[sl].shape
    k = neighbors.shape[-1]
    return pa.table({
        "sample_id": pa.array(np.arange(first_id, first_id + b), pa.int64()),
        "tokens": pa.FixedSizeListArray.from_arrays(pa.array(tokens.reshape(-1), pa.int32()), tokens.shape[1]),
        "chunk_ids": pa.FixedSizeListArray.from_arrays(pa.array(layout.chunk_ids[sl].reshape(-1)), n_chunks),
        "chunk_doc_ids": pa.FixedSizeListArray.from_arrays(pa.array(layout.doc_ids[sl].reshape(-1)), n_chunks),
        "chunk_lengths": pa.FixedSizeListArray.from_arrays(pa.array(layout.lengths[sl].reshape(-1)), n_chunks),
        "neighbors": pa.FixedSizeListArray.from_arrays(
            pa.FixedSizeListArray.from_arrays(pa.array(neighbors.reshape(-1), pa.int64()), k), n_chunks),
    })


def sample_block_name(split: str, first: int, stop: int) -> str:
    """The manifest name of samples [first, stop) of a split (its file: ``{name}.parquet``)."""
    return f"{split}/{first:010d}-{stop:010d}"


class SampleWriter:
    """The neighbours stage's worker (an actor): writes the sample blocks it is given, keeping
    the token store and the router (its coarse quantizer loaded once) across blocks."""

    def __init__(self, cfg: Config, shared: dict, router, eod: int):
        import ray

        self.cfg, self.router, self.eod = cfg, router, eod
        self.blocks = ray.get(shared["blocks"])  # the database's block names
        self.offsets = ray.get(shared["offsets"])  # per split: [blocks + 1] first entry of each block
        self.storage = Storage(cfg.storage)
        self.store = ChunkStore.open(self.storage, db_dir(cfg), self.blocks)

    def write(self, split: str, first: int, stop: int) -> dict:
        """Sample block ``split/first-stop``: lay out its chunks, query the index actors for their
        candidates, drop near-copies (when asked) and the sample's own documents, write its
        Parquet file; its manifest entry."""
        cfg, store, storage = self.cfg, self.store, self.storage
        nc, m = cfg.neighbors, cfg.db.chunk_length
        n_chunks = nc.seq_len // m
        flat = entries(store, cfg, split, self.offsets[split], first * n_chunks, stop * n_chunks)
        layout = SampleLayout(*(a.reshape(-1, n_chunks) for a in (flat.chunk_ids, flat.doc_ids, flat.lengths)))  # [b, l]
        real = layout.chunk_ids >= 0
        queries = read_vectors(storage, db_dir(cfg), self.blocks, layout.chunk_ids[real])  # [q, d]; ids ascend
        candidates = np.full((*layout.chunk_ids.shape, nc.k_candidates), -1, dtype=np.int64)  # [b, l, c]
        if len(queries):
            candidates[real] = self.router.search(queries, nc.k_candidates)[1]
        dropped = 0
        if nc.max_overlap is not None:
            candidates, dropped = drop_near_copies(store, layout.chunk_ids, candidates, 2 * m, nc.max_overlap)
        neighbors = filter_neighbors(candidates, store.doc_ids_of(candidates), layout.doc_ids, nc.k)
        tokens = sample_tokens(store, layout.chunk_ids, m, self.eod)
        sha = storage.write_parquet(join(samples_dir(cfg), f"{sample_block_name(split, first, stop)}.parquet"),
                                    _block_table(first, tokens, layout, slice(None), neighbors))
        return {"rows": stop - first, "sha256": sha, "no_neighbor": int((neighbors[real] < 0).sum()),
                "near_copies": dropped, "queries": int(real.sum())}


@locked(TOKENIZER, DB, INDEX, SAMPLES)
def run(cfg: Config, storage: Storage, force: bool = False) -> Manifest:
    """The ``neighbors`` stage. The driver only plans and records: tasks count each database
    block's sample chunks per split (numbered by prefix sums, never laid out in the driver), and
    a pool of ``SampleWriter`` actors writes the sample blocks, as many at once as keep every
    shard actor's queue filled. Resumes from the manifest; the files are the same whatever ran
    before. (A Ray Data ``map_batches`` actor pool did the same 41% slower: README.)"""
    import ray

    nc, m = cfg.neighbors, cfg.db.chunk_length
    db_manifest = finished_db(cfg, storage)
    index_manifest = finished_stage(storage, index_dir(cfg), "index")
    inputs = {"db": db_manifest.content_hash(), "index": index_manifest.content_hash()}
    out = samples_dir(cfg)
    manifest = open_stage(storage, out, "neighbors", config_hash(cfg.neighbors, cfg.tokenizer), inputs, force)
    if manifest.complete:
        log.info("neighbors: %s is up to date", out)
        return manifest
    blocks = sorted(db_manifest.blocks)
    eod = tokenizer.load_run_tokenizer(cfg, storage).convert_tokens_to_ids(cfg.tokenizer.eod_token)
    n_chunks = nc.seq_len // m
    router = index_stage.open_router(cfg, storage)
    # Sample blocks in flight, one per writer: at least two, so every shard always has a batch
    # waiting. Shard actors hold their CPUs; the writers share what is left (none: they reserve
    # none and share the cores), so every writer can start.
    ic = cfg.index
    free = max(0.0, ray.cluster_resources().get("CPU", 0) - ic.shards * ic.replicas * ic.num_cpus_per_shard)
    window = max(2, int(free))
    cpus = min(1.0, free / window)

    shared = ray.put(blocks)
    group = 64  # database blocks counted per task
    count = ray.remote(count_entries).options(num_cpus=cpus, resources=cfg.resources.chunk)
    per_block = np.concatenate(ray.get([count.remote(cfg, shared, g, min(g + group, len(blocks)))
                                        for g in range(0, len(blocks), group)]))  # [blocks, 4]
    offsets = {split: np.concatenate([[0], np.cumsum(per_block[:, i])]) for i, split in enumerate(SPLITS)}
    todo = []
    for split in SPLITS:
        n_samples = -(-int(offsets[split][-1]) // n_chunks)
        if n_samples == 0:
            raise EmptyStageError(
                f"neighbors: the {split} split is empty ({db_manifest.counts['docs']} documents, "
                f"neighbors.valid_fraction={nc.valid_fraction}): add documents or change valid_fraction")
        manifest.counts[f"{split}_samples"] = n_samples
        manifest.counts[f"{split}_docs"] = int(per_block[:, 2 + SPLITS.index(split)].sum())
        todo += [(split, first, min(first + nc.samples_per_block, n_samples))
                 for first in range(0, n_samples, nc.samples_per_block)]
    todo = [t for t in todo if sample_block_name(*t) not in manifest.blocks]
    total = sum(stop - first for _, first, stop in todo)
    start, done, queried = time.time(), 0, 0
    writer = ray.remote(SampleWriter).options(num_cpus=cpus, resources=cfg.resources.chunk)
    shared = {"blocks": shared, "offsets": ray.put(offsets)}  # by reference: large on a large database
    idle = [writer.remote(cfg, shared, router, eod) for _ in range(min(window, len(todo)))]
    pending = {}  # ref -> (writer, block name)
    while todo or pending:
        while todo and idle:
            t = todo.pop(0)
            actor = idle.pop()
            pending[actor.write.remote(*t)] = (actor, sample_block_name(*t))
        [ref], _ = ray.wait(list(pending))
        actor, name = pending.pop(ref)
        idle.append(actor)
        manifest.blocks[name] = ray.get(ref)
        manifest.record(storage, out, "blocks", name)
        done += manifest.blocks[name]["rows"]
        queried += manifest.blocks[name]["queries"]
        elapsed = time.time() - start
        log.info("neighbors: %s, %d/%d samples %s, %.0f queries/s", name, done, total,
                 progress(done, total, elapsed), queried / max(elapsed, 1e-9))
    for actor in idle:
        ray.kill(actor)
    router.close()
    manifest.counts["no_neighbor"] = sum(b["no_neighbor"] for b in manifest.blocks.values())
    manifest.counts["near_copies_dropped"] = sum(b.get("near_copies", 0) for b in manifest.blocks.values())
    manifest.complete = True
    manifest.save(storage, out)
    log.info("neighbors: %d train and %d valid samples of %d tokens -> %s", manifest.counts["train_samples"],
             manifest.counts["valid_samples"], nc.seq_len, out)
    return manifest


def split_blocks(storage: Storage, cfg: Config, split: str) -> list[tuple[str, int]]:
    """(file, rows) of each block of a split, in sample order: what the manifest lists, never a glob."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    manifest = finished_stage(storage, samples_dir(cfg), "neighbors")
    names = sorted(n for n in manifest.blocks if n.startswith(f"{split}/"))
    return [(join(samples_dir(cfg), f"{n}.parquet"), manifest.blocks[n]["rows"]) for n in names]


class RetroSamples:
    """Map-style dataset (works with ``torch.utils.data.DataLoader``) of one split.

    Item ``i``: ``tokens`` [seq_len] int64; ``neighbors`` [l, k, r] int64, each neighbour's chunk
    and continuation, EOD-padded; ``neighbor_mask`` [l, k, r] bool, False on padding and on
    absent (-1) neighbours; ``chunk_lengths`` [l] int64, the non-padding tokens per chunk.

    Sample blocks are read on demand, ``cache_blocks`` at a time (on S3, through the node's file
    cache), and neighbour tokens come from the memory-mapped token store: memory stays flat
    however large the split and the database are.
    """

    def __init__(self, cfg: Config, storage: Storage, split: str, store: ChunkStore | None = None,
                 cache_blocks: int = 8):
        blocks = split_blocks(storage, cfg, split)
        self.storage = storage
        self.uris = [uri for uri, _ in blocks]
        self.starts = np.cumsum([0] + [rows for _, rows in blocks])  # [blocks + 1]
        self._sample_block = functools.lru_cache(maxsize=cache_blocks)(self._read_block)
        db_manifest = finished_db(cfg, storage)
        self.store = store or ChunkStore.open(storage, db_dir(cfg), sorted(db_manifest.blocks))
        self.r = 2 * cfg.db.chunk_length
        self.eod = tokenizer.load_run_tokenizer(cfg, storage).convert_tokens_to_ids(cfg.tokenizer.eod_token)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _read_block(self, b: int) -> dict[str, np.ndarray]:
        table = pq.read_table(self.storage.local_path(self.uris[b]), columns=["tokens", "neighbors", "chunk_lengths"])
        return {"tokens": _fixed_list_numpy(table.column("tokens"), 1),  # [n, seq_len]
                "neighbors": _fixed_list_numpy(table.column("neighbors"), 2),  # [n, l, k]
                "chunk_lengths": _fixed_list_numpy(table.column("chunk_lengths"), 1)}  # [n, l]

    def row(self, i: int) -> dict[str, np.ndarray]:
        """Sample ``i`` as stored: ``tokens`` [seq_len], ``neighbors`` [l, k] chunk ids, ``chunk_lengths`` [l]."""
        if not 0 <= i < len(self):
            raise IndexError(i)
        b = int(np.searchsorted(self.starts, i, side="right")) - 1
        return {k: v[i - self.starts[b]] for k, v in self._sample_block(b).items()}

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        row = self.row(i)
        neighbors, mask = self.store.neighbor_tokens(row["neighbors"], self.r, self.eod)  # [l, k, r]
        return {"tokens": row["tokens"].astype(np.int64), "neighbors": neighbors,
                "neighbor_mask": mask, "chunk_lengths": row["chunk_lengths"].astype(np.int64)}


def _fixed_list_numpy(column: pa.ChunkedArray, depth: int) -> np.ndarray:
    """A (nested) fixed-size-list column -> a numpy array [rows, *sizes]."""
    arr = column.combine_chunks()
    shape = [len(arr)]
    for _ in range(depth):
        shape.append(arr.type.list_size)
        arr = arr.flatten()
    return arr.to_numpy(zero_copy_only=False).reshape(shape)


def show(cfg: Config, storage: Storage, sample_id: int, split: str = "train", width: int = 160) -> str:
    """A sample's chunks, each with the text of its neighbours (``retro-ray neighbors show``)."""
    data = RetroSamples(cfg, storage, split)
    if not 0 <= sample_id < len(data):
        raise UserError(f"sample {sample_id} not in the {split} split (0..{len(data) - 1})")
    tok = tokenizer.load_run_tokenizer(cfg, storage)
    m = cfg.db.chunk_length
    item = data[sample_id]

    def text(ids) -> str:
        return " ".join(tok.decode(ids).split())[:width]

    lines = [f"{split} sample {sample_id}: {len(item['tokens'])} tokens"]
    for j, length in enumerate(item["chunk_lengths"]):
        if length == 0:
            continue
        lines.append(f"chunk {j}: {text(item['tokens'][j * m: j * m + length])}")
        for n, (ids, mask) in enumerate(zip(item["neighbors"][j], item["neighbor_mask"][j])):
            cid = int(data.row(sample_id)["neighbors"][j, n])
            lines.append(f"  neighbour {n} (chunk {cid}): {text(ids[mask]) if cid >= 0 else '(none)'}")
    return "\n".join(lines)
