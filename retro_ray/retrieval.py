"""Retrieval for generation and serving: chunk texts in; neighbour ids, documents, tokens, texts out.

One ``Retriever`` over any searcher with ``search(queries [q, d], k) -> ([q, k] scores, [q, k] ids)``:

- ``ShardedIndex`` (``index_actors/router.py``): the index stage's shard actors, on a cluster;
- ``LocalIndex`` (``index_actors/router.py``): the saved shard files loaded into this process,
  for a laptop or a Serve replica without a cluster-wide index.

Both return the same neighbours for the same query. The texts are embedded by the database's own
embedder (same model, length and normalisation), neighbour tokens are chunk + continuation as in
training (``ChunkStore.neighbor_tokens``), and neighbours from ``exclude_docs`` are dropped as the
neighbours stage drops a sample's own documents. Imports no Ray.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from retro_ray.dbfiles import ChunkStore, ChunkTexts


@dataclass
class Neighbors:
    """The neighbours of q query texts: ``chunk_ids``, ``doc_ids``, ``scores`` [q, k] (-1 / -inf
    where fewer than k), ``tokens`` and ``mask`` [q, k, r] (chunk + continuation), ``texts``."""

    chunk_ids: np.ndarray
    doc_ids: np.ndarray
    scores: np.ndarray
    tokens: np.ndarray
    mask: np.ndarray
    texts: list[list[str]]

    def describe(self, i: int) -> list[dict]:
        """Query ``i``'s neighbours as JSON-ready rows."""
        return [{"chunk_id": int(c), "doc_id": int(d), "score": float(s), "text": t}
                for c, d, s, t in zip(self.chunk_ids[i], self.doc_ids[i], self.scores[i], self.texts[i]) if c >= 0]


@dataclass
class RetrievalStats:
    queries: int = 0
    calls: int = 0
    seconds: float = 0.0
    per_call: list[int] = field(default_factory=list)


class Retriever:
    """Embeds chunk texts, searches, and reads the neighbours' tokens and texts from the database.

    Args:
        searcher: ``ShardedIndex`` or ``LocalIndex``.
        embed: [n] texts -> [n, d] vectors, the database's embedder.
        store: every chunk's tokens and document.
        texts: chunk texts read on demand.
        r: neighbour length (2 chunk lengths); pad_id fills what is not a token.
        tokenizer_id: fingerprint of the tokenizer the database was built with.
        k_candidates: retrieved before ``exclude_docs`` are dropped.
    """

    def __init__(self, searcher, embed, store: ChunkStore, texts: ChunkTexts, r: int, pad_id: int,
                 tokenizer_id: str | None = None, k_candidates: int = 20):
        self.searcher, self.embed, self.store, self.chunk_texts = searcher, embed, store, texts
        self.r, self.pad_id, self.tokenizer_id, self.k_candidates = r, pad_id, tokenizer_id, k_candidates
        self.stats = RetrievalStats()

    def retrieve(self, texts: list[str], k: int, exclude_docs: list[set[int]] | None = None) -> Neighbors:
        """The top ``k`` neighbours of each text (one batched search for all of them)."""
        from retro_ray.neighbors import filter_neighbors

        start = time.perf_counter()
        vectors = np.asarray(self.embed(texts), dtype=np.float32)  # [q, d]
        n_candidates = max(k, self.k_candidates) if exclude_docs else k
        scores, ids = self.searcher.search(vectors, n_candidates)  # [q, c] each
        docs = self.store.doc_ids_of(ids)  # [q, c]
        if exclude_docs:
            width = max(1, max(len(e) for e in exclude_docs))
            excluded = np.full((len(texts), width), -1, dtype=np.int64)  # [q, e]
            for i, e in enumerate(exclude_docs):
                excluded[i, : len(e)] = sorted(e)
            kept = filter_neighbors(ids[:, None], docs[:, None], excluded, k)[:, 0]  # [q, k]
            order = np.argmax(ids[:, None, :] == kept[:, :, None], axis=-1)  # [q, k] position among candidates
            scores = np.where(kept >= 0, np.take_along_axis(scores, order, axis=-1), -np.inf)
            ids = kept
            docs = self.store.doc_ids_of(ids)
        tokens, mask = self.store.neighbor_tokens(ids, self.r, self.pad_id)  # [q, k, r]
        found = self.chunk_texts.get(ids[ids >= 0])
        texts_out = [[found[int(c)] if c >= 0 else "" for c in row] for row in ids]
        self.stats.queries += len(texts)
        self.stats.calls += 1
        self.stats.per_call.append(len(texts))
        self.stats.seconds += time.perf_counter() - start
        return Neighbors(ids, docs, scores.astype(np.float32), tokens, mask, texts_out)


def run_retriever(cfg, storage, local: bool = True, router=None) -> Retriever:
    """The retriever of a run: its database, tokenizer and embedder, over the saved index files
    loaded in this process (``local``), or over ``router`` / the index stage's shard actors."""
    from retro_ray import index, tokenizer
    from retro_ray.dbfiles import db_dir, finished_db
    from retro_ray.embed import Embedder
    from retro_ray.storage import finished_stage

    from index_actors.router import LocalIndex

    blocks = sorted(finished_db(cfg, storage).blocks)
    finished_stage(storage, index.stage_dir(cfg), "index")
    searcher = router or (LocalIndex.load(storage, index.stage_dir(cfg), cfg.index.nprobe, cfg.index.ef_search)
                          if local else index.open_router(cfg, storage))
    e = cfg.embed
    embedder = Embedder(e.model, max_length=e.max_length, normalize=e.normalize, device=e.device)
    tok = tokenizer.load_run_tokenizer(cfg, storage)
    return Retriever(searcher, embedder, ChunkStore.open(storage, db_dir(cfg), blocks),
                     ChunkTexts(storage, db_dir(cfg), blocks), r=2 * cfg.db.chunk_length,
                     pad_id=tok.convert_tokens_to_ids(cfg.tokenizer.eod_token),
                     tokenizer_id=tokenizer.finished_tokenizer(cfg, storage).content_hash(),
                     k_candidates=cfg.neighbors.k_candidates)
