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

from retro_ray import index as index_stage
from retro_ray import tokenizer
from retro_ray.config import Config, config_hash
from retro_ray.dbfiles import ChunkStore, finished_db, read_vectors
from retro_ray.errors import UserError
from retro_ray.layout import db_dir, index_dir, samples_dir
from retro_ray.locks import locked
from retro_ray.runtime import log, progress
from retro_ray.storage import EmptyStageError, Manifest, Storage, finished_stage, join, open_stage

SPLITS = ("train", "valid")


def is_valid_doc(doc_id: int, fraction: float) -> bool:
    """Stable held-out choice of a document."""
    digest = hashlib.blake2b(str(doc_id).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


@dataclass
class Layout:
    """Where every sample chunk of a split comes from: [n_samples, l] arrays."""

    chunk_ids: np.ndarray
    doc_ids: np.ndarray
    lengths: np.ndarray


def layout_split(store: ChunkStore, in_split: np.ndarray, chunk_len: int, n_chunks: int) -> Layout:
    """Pack the chunks of the documents ``in_split`` ([n_docs] bool) into samples of
    ``n_chunks`` chunks, reading the token store a block at a time."""
    chunk_ids, doc_ids, lengths = [], [], []
    for start, block_docs, block_lengths in store.iter_blocks():
        for i in np.flatnonzero(in_split[block_docs]):
            c, doc, n = start + int(i), int(block_docs[i]), int(block_lengths[i])
            chunk_ids.append(c)
            doc_ids.append(doc)
            if not store.is_last_of_doc(c):
                lengths.append(n)
            elif n < chunk_len:
                lengths.append(n + 1)  # room for EOD in the last chunk
            else:  # a full last chunk: EOD opens a chunk of its own
                lengths.append(chunk_len)
                chunk_ids.append(-1)
                doc_ids.append(doc)
                lengths.append(1)
    pad = -len(chunk_ids) % n_chunks
    chunk_ids += [-1] * pad
    doc_ids += [-1] * pad
    lengths += [0] * pad
    shape = (-1, n_chunks)
    return Layout(np.array(chunk_ids, np.int64).reshape(shape), np.array(doc_ids, np.int64).reshape(shape),
                  np.array(lengths, np.int32).reshape(shape))


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


def _block_table(first_id: int, tokens, layout: Layout, sl: slice, neighbors: np.ndarray) -> pa.Table:
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


@locked("tokenizer", "db", "index", "samples")
def run(cfg: Config, storage: Storage, force: bool = False) -> Manifest:
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
    store = ChunkStore.open(storage, db_dir(cfg), blocks)
    eod = tokenizer.load_run_tokenizer(cfg, storage).convert_tokens_to_ids(cfg.tokenizer.eod_token)
    all_docs = np.arange(db_manifest.counts["docs"])  # doc ids are dense
    valid = np.array([is_valid_doc(int(d), nc.valid_fraction) for d in all_docs], dtype=bool)
    n_chunks = nc.seq_len // m
    splits = {"train": all_docs[~valid], "valid": all_docs[valid]}
    layouts = {"train": layout_split(store, ~valid, m, n_chunks), "valid": layout_split(store, valid, m, n_chunks)}
    for split, layout in layouts.items():
        if len(layout.chunk_ids) == 0:
            raise EmptyStageError(
                f"neighbors: the {split} split is empty ({len(all_docs)} documents, neighbors.valid_fraction="
                f"{nc.valid_fraction}): add documents or change valid_fraction")
    router = index_stage.open_router(cfg, storage)
    for split, layout in layouts.items():
        n_samples = len(layout.chunk_ids)
        manifest.counts[f"{split}_samples"] = n_samples
        manifest.counts[f"{split}_docs"] = len(splits[split])
        start, queried, first_todo = time.time(), 0, None
        for first in range(0, n_samples, nc.samples_per_block):
            sl = slice(first, min(first + nc.samples_per_block, n_samples))
            name = f"{split}/{sl.start:010d}-{sl.stop:010d}"
            if name in manifest.blocks:
                continue
            first_todo = first if first_todo is None else first_todo
            chunk_ids = layout.chunk_ids[sl]  # [b, l]
            real = chunk_ids >= 0
            queries = read_vectors(storage, db_dir(cfg), blocks, chunk_ids[real])  # [q, d]; ids ascend
            candidates = np.full((*chunk_ids.shape, nc.k_candidates), -1, dtype=np.int64)  # [b, l, c]
            if len(queries):
                candidates[real] = router.search(queries, nc.k_candidates)[1]
            dropped = 0
            if nc.max_overlap is not None:
                candidates, dropped = drop_near_copies(store, chunk_ids, candidates, 2 * m, nc.max_overlap)
            candidate_docs = store.doc_ids_of(candidates)
            neighbors = filter_neighbors(candidates, candidate_docs, layout.doc_ids[sl], nc.k)
            tokens = sample_tokens(store, chunk_ids, m, eod)
            sha = storage.write_parquet(join(out, f"{name}.parquet"),
                                        _block_table(sl.start, tokens, layout, sl, neighbors))
            manifest.blocks[name] = {"rows": sl.stop - sl.start, "sha256": sha,
                                     "no_neighbor": int((neighbors[real] < 0).sum()), "near_copies": dropped}
            manifest.save(storage, out)
            queried += int(real.sum())
            log.info("neighbors: %s %d/%d samples %s, %.0f queries/s", split, sl.stop, n_samples,
                     progress(sl.stop - first_todo, n_samples - first_todo, time.time() - start),
                     queried / max(time.time() - start, 1e-9))
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


def read_split(storage: Storage, cfg: Config, split: str) -> pa.Table:
    """All samples of a split, in sample order (small splits: see ``RetroSamples``)."""
    return pa.concat_tables([storage.read_parquet(uri) for uri, _ in split_blocks(storage, cfg, split)])


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
