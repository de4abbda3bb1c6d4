"""Retrieval for generation and serving: chunk texts in; neighbour ids, documents, tokens, texts out.

One ``Retriever`` over any searcher with ``search(queries [q, d], k) -> ([q, k] scores, [q, k] ids)``:

- ``ShardedIndex`` (``index_actors/router.py``): the index stage's shard actors, on a cluster;
- ``LocalIndex`` (``index_actors/router.py``): the saved shard files loaded into this process,
  for a laptop or a Serve replica without a cluster-wide index.

Both return the same neighbours for the same query. The texts are embedded by the database's own
embedder (same model, length and normalisation), neighbour tokens are chunk + continuation as in
training (``ChunkStore.neighbor_tokens``), and neighbours from ``exclude_docs`` are dropped as the
neighbours stage drops a sample's own documents.

Questions may also be searched by BM25 over the chunks' titles and texts, alone or fused with the
dense search by a weighted sum of normalised scores (``search: hybrid``), and their ``passages`` are the chunk with
its continuation or a window of about N words around it. Imports no Ray.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from retro_ray.database.files import ChunkStore, ChunkTexts


Search = Literal["dense", "bm25", "hybrid"]
SEARCHES = ("dense", "bm25", "hybrid")


@dataclass
class Neighbors:
    """The neighbours of q query texts: ``chunk_ids``, ``doc_ids``, ``scores`` [q, k] (-1 / -inf
    where fewer than k), ``tokens`` and ``mask`` [q, k, r] (chunk + continuation), ``texts`` and
    their documents' ``titles``."""

    chunk_ids: np.ndarray
    doc_ids: np.ndarray
    scores: np.ndarray
    tokens: np.ndarray
    mask: np.ndarray
    texts: list[list[str]]
    titles: list[list[str]]

    def slice(self, first: int, stop: int) -> "Neighbors":
        """Queries first..stop-1 of these."""
        rows = slice(first, stop)
        return Neighbors(self.chunk_ids[rows], self.doc_ids[rows], self.scores[rows], self.tokens[rows],
                         self.mask[rows], self.texts[rows], self.titles[rows])

    def describe(self, i: int) -> list[dict]:
        """Query ``i``'s neighbours as JSON-ready rows."""
        return [{"chunk_id": int(c), "doc_id": int(d), "score": float(s), "title": h, "text": t}
                for c, d, s, t, h in zip(self.chunk_ids[i], self.doc_ids[i], self.scores[i], self.texts[i],
                                         self.titles[i]) if c >= 0]


@dataclass
class RetrievalStats:
    queries: int = 0
    calls: int = 0
    seconds: float = 0.0
    per_call: list[int] = field(default_factory=list)


class LexicalIndex:
    """BM25 (``bm25s``, English stop words, no stemming: measured no better on NQ) over (title,
    text) pairs, every chunk's for a ``Retriever``, built in memory when first needed. Memory and
    build time grow with the database: meant for question retrieval on databases of up to a few
    million chunks."""

    def __init__(self, pairs: Iterable[tuple[str, str]]):
        import bm25s

        logging.getLogger("bm25s").setLevel(logging.NOTSET)  # it sets DEBUG on import: follow the process's level
        corpus = [f"{title} {text}" for title, text in pairs]
        self.bm25 = bm25s.BM25()
        self.bm25.index(bm25s.tokenize(corpus, stopwords="en", show_progress=False), show_progress=False)
        self.size = len(corpus)

    def search(self, queries: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """[q] texts -> ([q, k] scores, [q, k] chunk ids); -inf / -1 where fewer than k match."""
        import bm25s

        k_found = min(k, self.size)
        tokens = bm25s.tokenize(queries, stopwords="en", return_ids=False, show_progress=False)
        ids, scores = self.bm25.retrieve(tokens, k=k_found, show_progress=False)  # [q, k_found] each
        ids = np.where(scores > 0, ids, -1).astype(np.int64)  # no shared word: no match
        out_ids = np.full((len(queries), k), -1, dtype=np.int64)
        out_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        out_ids[:, :k_found], out_scores[:, :k_found] = ids, np.where(ids >= 0, scores, -np.inf)
        return out_scores, out_ids


def fuse(lists: list[tuple[np.ndarray, np.ndarray]], weights: list[float], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Convex combination of ranked lists ((scores, ids) [q, c_j] each, -1 / -inf = none): each
    list's scores min-max normalised per query over its candidates, weighted, summed per id ->
    ([q, k] fused scores, [q, k] ids), best first (Bruch et al. 2023, "An Analysis of Fusion
    Functions for Hybrid Retrieval": tuned, it beats reciprocal rank fusion, which throws the
    scores' gaps away). An id missing from a list gets 0 from it."""
    q = lists[0][0].shape[0]
    out_scores = np.full((q, k), -np.inf, dtype=np.float32)
    out_ids = np.full((q, k), -1, dtype=np.int64)
    for i in range(q):
        total: dict[int, float] = {}
        for (scores, ids), weight in zip(lists, weights):
            found = ids[i] >= 0
            if not found.any():
                continue
            s = scores[i][found].astype(np.float64)
            normed = (s - s.min()) / (s.max() - s.min()) if s.max() > s.min() else np.ones_like(s)
            for c, v in zip(ids[i][found], normed):
                total[int(c)] = total.get(int(c), 0.0) + weight * float(v)
        best = sorted(total.items(), key=lambda item: -item[1])[:k]  # stable: first seen wins ties
        out_ids[i, : len(best)] = [c for c, _ in best]
        out_scores[i, : len(best)] = [v for _, v in best]
    return out_scores, out_ids


class Retriever:
    """Embeds chunk texts, searches, and reads the neighbours' tokens and texts from the database.

    Args:
        searcher: ``ShardedIndex`` or ``LocalIndex``.
        embed: [n] texts -> [n, d] vectors, the database's embedder.
        store: every chunk's tokens and document.
        texts: chunk texts read on demand.
        r: neighbour length (2 chunk lengths); pad_id fills what is not a token.
        tokenizer_id: fingerprint of the tokenizer the database was built with.
        k_candidates: retrieved before ``exclude_docs`` are dropped (and per list before fusion).
    """

    def __init__(self, searcher, embed, store: ChunkStore, texts: ChunkTexts, r: int, pad_id: int,
                 tokenizer_id: str | None = None, k_candidates: int = 20, dense_weight: float = 0.5):
        self.searcher, self.embed, self.store, self.chunk_texts = searcher, embed, store, texts
        self.r, self.pad_id, self.tokenizer_id, self.k_candidates = r, pad_id, tokenizer_id, k_candidates
        self.dense_weight = dense_weight
        self.stats = RetrievalStats()
        self._lexical: LexicalIndex | None = None

    @property
    def lexical(self) -> LexicalIndex:
        if self._lexical is None:
            self._lexical = LexicalIndex(self.chunk_texts.all())
        return self._lexical

    def search(self, texts: list[str], k: int, search: Search = "dense") -> tuple[np.ndarray, np.ndarray]:
        """[q] texts -> ([q, k] scores, [q, k] chunk ids): by embedding (``dense``), by BM25, or
        both fused (``hybrid``: each list ``max(k, k_candidates)`` deep, their normalised scores
        weighted ``dense_weight`` and 1 - it)."""
        if search not in SEARCHES:
            raise ValueError(f"search {search!r}: expected one of {', '.join(SEARCHES)}")
        if search == "bm25":
            return self.lexical.search(texts, k)
        depth = max(k, self.k_candidates) if search == "hybrid" else k
        vectors = np.asarray(self.embed(texts), dtype=np.float32)  # [q, d]
        dense = self.searcher.search(vectors, depth)  # ([q, depth] scores, [q, depth] ids)
        if search == "dense":
            return dense
        return fuse([dense, self.lexical.search(texts, depth)], [self.dense_weight, 1 - self.dense_weight], k)

    def retrieve(self, texts: list[str], k: int, exclude_docs: list[set[int]] | None = None,
                 search: Search = "dense", timeout_s: float | None = None) -> Neighbors:
        """The top ``k`` neighbours of each text (one batched search for all of them). A search
        that ends after ``timeout_s`` raises ``TimeoutError`` instead of reading its neighbours
        (a search in this process cannot be stopped midway; the engine gives up on it at the
        deadline all the same)."""
        from retro_ray.retrieval.neighbors import filter_neighbors

        start = time.perf_counter()
        n_candidates = max(k, self.k_candidates) if exclude_docs else k
        scores, ids = self.search(texts, n_candidates, search)  # [q, c] each
        if timeout_s is not None and time.perf_counter() - start > timeout_s:
            raise TimeoutError(f"the search took more than {timeout_s:g} s")
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
        found = ids[ids >= 0]
        texts_of, titles_of = self.chunk_texts.get(found), self.chunk_texts.get(found, "title")
        self.stats.queries += len(texts)
        self.stats.calls += 1
        self.stats.per_call.append(len(texts))
        self.stats.seconds += time.perf_counter() - start
        return Neighbors(ids, docs, scores.astype(np.float32), tokens, mask,
                         [[texts_of[int(c)] if c >= 0 else "" for c in row] for row in ids],
                         [[titles_of[int(c)] if c >= 0 else "" for c in row] for row in ids])

    def passages(self, texts: list[str], k: int, search: Search = "dense",
                 words: int | None = None) -> list[list[dict]]:
        """The top ``k`` passages of each text: ``{chunk_id, doc_id, score, title, text}``, the
        text being the chunk with its continuation (the r tokens the encoder sees), or with
        ``words`` about that many words of its document around the chunk (DPR's 100-word passages)."""
        found = self.retrieve(texts, k, search=search)
        out = []
        for i in range(len(texts)):
            rows = found.describe(i)
            for row in rows:
                c = row["chunk_id"]
                row["text"] = self._window(c, words) if words else self._with_continuation(c)
            out.append(rows)
        return out

    def _with_continuation(self, c: int) -> str:
        ids = [c] if self.store.is_last_of_doc(c) else [c, c + 1]
        found = self.chunk_texts.get(np.asarray(ids, dtype=np.int64))
        return "".join(found[i] for i in ids)

    def _window(self, c: int, words: int) -> str:
        """About ``words`` words of chunk ``c``'s document centred on it (fewer in a short document)."""
        doc = self.store.doc_id(c)
        ids = [i for i in range(max(0, c - 3), min(len(self.store), c + 4)) if self.store.doc_id(i) == doc]
        found = self.chunk_texts.get(np.asarray(ids, dtype=np.int64))
        text = "".join(found[i] for i in ids)  # chunk texts tile their document
        start = sum(len(found[i]) for i in ids if i < c)
        spans = [m.span() for m in re.finditer(r"\S+", text)]
        inside = [j for j, (a, b) in enumerate(spans) if b > start and a < start + len(found[c])]
        if not inside:
            return found[c]
        first, last = inside[0], inside[-1] + 1  # the chunk's words: [first, last)
        if last - first >= words:
            first += (last - first - words) // 2
            last = first + words
        else:
            room = words - (last - first)
            before = min(first, max(room // 2, room - (len(spans) - last)))
            first, last = first - before, min(len(spans), last + room - before)
        return text[spans[first][0]: spans[last - 1][1]]


def run_retriever(cfg, storage, local: bool = True, router=None) -> Retriever:
    """The retriever of a run: its database, tokenizer and embedder, over the saved index files
    loaded in this process (``local``), or over ``router`` / the index stage's shard actors."""
    from retro_ray.core.layout import db_dir, index_dir
    from retro_ray.core.manifest import finished_stage
    from retro_ray.database import tokenizer
    from retro_ray.database.embed import Embedder
    from retro_ray.database.files import finished_db
    from retro_ray.retrieval import index

    from index_actors.router import LocalIndex

    blocks = sorted(finished_db(cfg, storage).blocks)
    finished_stage(storage, index_dir(cfg), "index")
    searcher = router or (LocalIndex.load(storage, index_dir(cfg), cfg.index.nprobe, cfg.index.ef_search)
                          if local else index.open_router(cfg, storage))
    e = cfg.embed
    embedder = Embedder(e.model, max_length=e.max_length, normalize=e.normalize, device=e.device)
    tok = tokenizer.load_run_tokenizer(cfg, storage)
    return Retriever(searcher, embedder.queries, ChunkStore.open(storage, db_dir(cfg), blocks),
                     ChunkTexts(storage, db_dir(cfg), blocks), r=2 * cfg.db.chunk_length,
                     pad_id=tok.convert_tokens_to_ids(cfg.tokenizer.eod_token),
                     tokenizer_id=tokenizer.finished_tokenizer(cfg, storage).content_hash(),
                     k_candidates=cfg.neighbors.k_candidates, dense_weight=cfg.index.hybrid_dense_weight)
