"""The chunk database's files: block names, schemas and readers, shared by every stage.

    db/chunks/{start:012d}-{end:012d}.parquet      chunk_id, doc_id, doc_pos, tokens, text
    db/embeddings/{start:012d}-{end:012d}.parquet  chunk_id, embedding (float16 [d])
    db/_manifest.json                              blocks, counts, skipped inputs, timings

Imports neither torch nor Ray, so index shards and data loaders read the database cheaply.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from retro_ray.config import Config
from retro_ray.storage import Manifest, Storage, finished_stage, join

CHUNK_SCHEMA = pa.schema(
    [("chunk_id", pa.int64()), ("doc_id", pa.int64()), ("doc_pos", pa.int32()),
     ("tokens", pa.list_(pa.int32())), ("text", pa.string())]
)


def db_dir(cfg: Config) -> str:
    return join(cfg.workdir, "db")


def block_name(start: int, end: int) -> str:
    return f"{start:012d}-{end:012d}"


def block_range(name: str) -> tuple[int, int]:
    start, end = name.split("-")
    return int(start), int(end)


def chunks_uri(db: str, name: str) -> str:
    return join(db, "chunks", f"{name}.parquet")


def embeddings_uri(db: str, name: str) -> str:
    return join(db, "embeddings", f"{name}.parquet")


def embedding_table(chunk_ids: np.ndarray, vectors: np.ndarray) -> pa.Table:
    """[n] ids and [n, d] float16 vectors -> an embedding block."""
    _, d = vectors.shape
    values = pa.array(vectors.reshape(-1), type=pa.float16())
    return pa.table({"chunk_id": pa.array(chunk_ids, pa.int64()),
                     "embedding": pa.FixedSizeListArray.from_arrays(values, d)})


def read_embeddings(storage: Storage, uri: str) -> tuple[np.ndarray, np.ndarray]:
    """An embedding block -> ([n] chunk ids, [n, d] float16 vectors)."""
    table = storage.read_parquet(uri)
    emb = table.column("embedding").combine_chunks()
    vectors = emb.flatten().to_numpy(zero_copy_only=False).reshape(-1, emb.type.list_size)
    return table.column("chunk_id").to_numpy(), vectors


def finished_db(cfg: Config, storage: Storage) -> Manifest:
    """The database manifest, which must be complete (the ``db`` stage has run)."""
    return finished_stage(storage, db_dir(cfg), "db")


def read_vectors(storage: Storage, db: str, blocks: list[str], ids: np.ndarray) -> np.ndarray:
    """The float32 embeddings [len(ids), d] of sorted chunk ``ids``, reading only needed blocks."""
    parts = []
    for name in blocks:
        start, end = block_range(name)
        lo, hi = np.searchsorted(ids, [start, end])
        if hi > lo:
            _, vectors = read_embeddings(storage, embeddings_uri(db, name))
            parts.append(vectors[ids[lo:hi] - start].astype(np.float32))
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


class ChunkStore:
    """Every chunk's tokens in memory, to lay out samples and fetch neighbour tokens.

    ``flat`` [total_tokens] int32 holds the chunks back to back, chunk c at
    ``flat[offsets[c]:offsets[c + 1]]``; ``doc_ids`` [n_chunks] int64. About 4 bytes a token:
    360 MB for 90 M tokens.
    """

    def __init__(self, flat: np.ndarray, offsets: np.ndarray, doc_ids: np.ndarray):
        self.flat, self.offsets, self.doc_ids = flat, offsets, doc_ids

    @classmethod
    def load(cls, storage: Storage, db: str, blocks: list[str]) -> "ChunkStore":
        flats, lengths, docs = [], [], []
        for name in sorted(blocks):
            table = storage.read_parquet(chunks_uri(db, name), columns=["doc_id", "tokens"])
            tokens = table.column("tokens").combine_chunks()
            flats.append(tokens.values.to_numpy().astype(np.int32))
            lengths.append(np.diff(tokens.offsets.to_numpy()))
            docs.append(table.column("doc_id").to_numpy())
        offsets = np.concatenate([[0], np.cumsum(np.concatenate(lengths))]).astype(np.int64)
        return cls(np.concatenate(flats), offsets, np.concatenate(docs))

    def __len__(self) -> int:
        return len(self.doc_ids)

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def tokens(self, chunk_id: int) -> np.ndarray:
        return self.flat[self.offsets[chunk_id]: self.offsets[chunk_id + 1]]

    def is_last_of_doc(self, chunk_id: int) -> bool:
        return chunk_id + 1 == len(self) or self.doc_ids[chunk_id + 1] != self.doc_ids[chunk_id]

    def neighbor_tokens(self, ids: np.ndarray, r: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Neighbour ids [...] -> (tokens [..., r] int64, mask [..., r] bool).

        A neighbour's tokens are its chunk followed by its continuation (the next chunk of the
        same document), cut to ``r``; the rest, and all of an absent (-1) neighbour, is padding.
        """
        out = np.full((*ids.shape, r), pad_id, dtype=np.int64)
        mask = np.zeros((*ids.shape, r), dtype=bool)
        for index, c in np.ndenumerate(ids):
            if c < 0:
                continue
            end = self.offsets[c + 1] if self.is_last_of_doc(c) else self.offsets[c + 2]
            piece = self.flat[self.offsets[c]: min(end, self.offsets[c] + r)]
            out[index][: len(piece)] = piece
            mask[index][: len(piece)] = True
        return out, mask


class ChunkTexts:
    """Chunk texts read on demand, a few blocks cached: what a retriever shows of a neighbour."""

    def __init__(self, storage: Storage, db: str, blocks: list[str], cache_blocks: int = 8):
        self.storage, self.db = storage, db
        self.blocks = sorted(blocks)
        self.starts = np.array([block_range(b)[0] for b in self.blocks])
        self._cache: dict[str, list[str]] = {}
        self.cache_blocks = cache_blocks

    def _block(self, name: str) -> list[str]:
        if name not in self._cache:
            if len(self._cache) >= self.cache_blocks:
                self._cache.pop(next(iter(self._cache)))
            self._cache[name] = self.storage.read_parquet(chunks_uri(self.db, name), columns=["text"]).column(
                "text").to_pylist()
        return self._cache[name]

    def get(self, ids: np.ndarray) -> dict[int, str]:
        """The texts of chunk ``ids`` (any order), by id."""
        out = {}
        for c in np.unique(ids):
            name = self.blocks[int(np.searchsorted(self.starts, c, side="right")) - 1]
            out[int(c)] = self._block(name)[int(c) - block_range(name)[0]]
        return out
