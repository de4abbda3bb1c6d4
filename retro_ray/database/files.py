"""The chunk database's files: block names, schemas and readers, shared by every stage.

    db/chunks/{start:012d}-{end:012d}.parquet      chunk_id, doc_id, doc_pos, tokens, text, title
    db/embeddings/{start:012d}-{end:012d}.parquet  chunk_id, embedding (float16 [d])
    db/tokens/{start:012d}-{end:012d}.arrow        doc_id, tokens: the token store (Arrow IPC,
                                                   uncompressed, memory-mapped by readers)
    db/_manifest.json                              blocks, counts, skipped inputs, timings

Imports neither torch nor Ray, so index shards and data loaders read the database cheaply.
"""

from __future__ import annotations

import functools
from typing import Iterator

import numpy as np
import pyarrow as pa

from retro_ray.core.config import Config
from retro_ray.core.layout import db_dir
from retro_ray.core.manifest import Manifest, finished_stage
from retro_ray.core.storage import Storage, join

CHUNK_SCHEMA = pa.schema(
    [("chunk_id", pa.int64()), ("doc_id", pa.int64()), ("doc_pos", pa.int32()),
     ("tokens", pa.list_(pa.int32())), ("text", pa.string()), ("title", pa.string())]
)


def block_name(start: int, end: int) -> str:
    return f"{start:012d}-{end:012d}"


def block_range(name: str) -> tuple[int, int]:
    start, end = name.split("-")
    return int(start), int(end)


def chunks_uri(db: str, name: str) -> str:
    return join(db, "chunks", f"{name}.parquet")


def tokens_uri(db: str, name: str) -> str:
    return join(db, "tokens", f"{name}.arrow")


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


TOKEN_SCHEMA = pa.schema([("doc_id", pa.int64()), ("tokens", pa.list_(pa.int32()))])


def write_token_block(storage: Storage, db: str, name: str, block: pa.Table) -> str:
    """The token store's file of a chunk block: its ``doc_id`` and ``tokens`` as an Arrow IPC
    file, memory-mapped by readers; returns its SHA-256."""
    return storage.write_arrow(tokens_uri(db, name), block.select(TOKEN_SCHEMA.names).cast(TOKEN_SCHEMA))


class ChunkStore:
    """Chunk tokens and document ids of a database, read on demand from its token store.

    Each block's file is memory-mapped when first needed (at most ``open_blocks`` at a time), so
    a reader's memory holds the pages it touches, not the database: samples, neighbour tokens
    and training workers stay flat as the database grows. Within a block ``b``, ``flat``
    [tokens] int32 holds its chunks back to back, chunk ``start + i`` at
    ``flat[offsets[i]:offsets[i + 1]]``; ``doc_ids`` [rows] int64.
    """

    def __init__(self, starts: np.ndarray, ends: np.ndarray, load, open_blocks: int = 256):
        self.starts, self.ends = starts, ends  # [n_blocks] each
        self._block = functools.lru_cache(maxsize=open_blocks)(load)  # block -> (flat, offsets, doc_ids)

    @classmethod
    def open(cls, storage: Storage, db: str, blocks: list[str]) -> "ChunkStore":
        names = sorted(blocks)
        ranges = np.array([block_range(n) for n in names], dtype=np.int64).reshape(-1, 2)

        def load(b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            batch = storage.open_arrow(tokens_uri(db, names[b])).combine_chunks().to_batches()[0]  # one batch
            tokens = batch.column("tokens")  # views of the mapped file, not copies
            return tokens.values.to_numpy(), tokens.offsets.to_numpy(), batch.column("doc_id").to_numpy()

        return cls(ranges[:, 0], ranges[:, 1], load)

    @classmethod
    def from_arrays(cls, flat: np.ndarray, offsets: np.ndarray, doc_ids: np.ndarray) -> "ChunkStore":
        """One in-memory block of chunks 0..n (for small tables and tests)."""
        return cls(np.array([0]), np.array([len(doc_ids)]), lambda b: (flat, offsets, doc_ids))

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def _find(self, c: int) -> tuple[int, int]:
        b = int(np.searchsorted(self.starts, c, side="right")) - 1
        return b, c - int(self.starts[b])

    def tokens(self, chunk_id: int) -> np.ndarray:
        b, i = self._find(chunk_id)
        flat, offsets, _ = self._block(b)
        return flat[offsets[i]: offsets[i + 1]]

    def doc_id(self, chunk_id: int) -> int:
        b, i = self._find(chunk_id)
        return int(self._block(b)[2][i])

    def doc_ids_of(self, ids: np.ndarray) -> np.ndarray:
        """The documents of chunk ``ids`` [...] (any order), -1 where an id is -1."""
        out = np.full(ids.shape, -1, dtype=np.int64)
        real = ids >= 0
        blocks = np.searchsorted(self.starts, ids[real], side="right") - 1
        docs = np.empty(len(blocks), dtype=np.int64)
        for b in np.unique(blocks):
            at = blocks == b
            docs[at] = self._block(int(b))[2][ids[real][at] - self.starts[b]]
        out[real] = docs
        return out

    def is_last_of_doc(self, chunk_id: int) -> bool:
        return chunk_id + 1 == len(self) or self.doc_id(chunk_id + 1) != self.doc_id(chunk_id)

    def block(self, b: int) -> tuple[int, np.ndarray, np.ndarray]:
        """Block ``b``: (first chunk id, [rows] doc ids, [rows] token counts)."""
        _, offsets, doc_ids = self._block(b)
        return int(self.starts[b]), doc_ids, np.diff(offsets)

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
            piece = self.tokens(c)
            if len(piece) < r and not self.is_last_of_doc(c):
                piece = np.concatenate([piece, self.tokens(c + 1)])
            piece = piece[:r]
            out[index][: len(piece)] = piece
            mask[index][: len(piece)] = True
        return out, mask


class ChunkTexts:
    """Chunk texts and their documents' titles read on demand, a few blocks cached: what a
    retriever shows of a neighbour."""

    def __init__(self, storage: Storage, db: str, blocks: list[str], cache_blocks: int = 8):
        self.storage, self.db = storage, db
        self.blocks = sorted(blocks)
        self.starts = np.array([block_range(b)[0] for b in self.blocks])
        self._block = functools.lru_cache(maxsize=cache_blocks)(self._read)

    def _read(self, name: str) -> dict[str, list[str]]:
        table = self.storage.read_parquet(chunks_uri(self.db, name), columns=["text", "title"])
        return {column: table.column(column).to_pylist() for column in ("text", "title")}

    def all(self) -> Iterator[tuple[str, str]]:
        """(title, text) of every chunk in id order."""
        for name in self.blocks:
            block = self._block(name)
            yield from zip(block["title"], block["text"])

    def get(self, ids: np.ndarray, column: str = "text") -> dict[int, str]:
        """The texts (or ``column="title"``: the titles) of chunk ``ids`` (any order), by id."""
        out = {}
        for c in np.unique(ids):
            name = self.blocks[int(np.searchsorted(self.starts, c, side="right")) - 1]
            out[int(c)] = self._block(name)[column][int(c) - block_range(name)[0]]
        return out
