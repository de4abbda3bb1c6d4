"""The router: N shard actors (optionally replicated), queries fanned out, top-k merged.

A ``ShardedIndex`` holds only actor handles, so it can be passed to Ray tasks, Ray Data actors
and Serve deployments. Every shard actor is created with ``max_restarts`` and
``max_task_retries``: a killed shard restarts, reloads its saved file and answers the calls
that were in flight, so a query never comes back short.
"""

from __future__ import annotations

import faiss
import numpy as np

from index_actors.shard import IndexShard
from retro_ray.core.storage import join


def merge_topk(results: list[tuple[np.ndarray, np.ndarray]], k: int, metric: str
               ) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard ([q, k_s] distances, [q, k_s] ids) into the global top-k.

    Missing results (id -1) never displace a real one and stay -1 in the output.
    """
    nq = results[0][0].shape[0]
    heap = faiss.ResultHeap(nq, k, keep_max=metric == "ip")
    for dist, ids in results:
        dist = np.where(ids < 0, -np.inf if metric == "ip" else np.inf, dist).astype(np.float32)
        heap.add_result(np.ascontiguousarray(dist), np.ascontiguousarray(ids, dtype=np.int64))
    heap.finalize()
    return heap.D, heap.I


def shard_actor(*, name: str | None, max_restarts: int = -1, num_cpus: float = 1, num_gpus: float = 0,
                resources: dict[str, float] | None = None, **shard_kwargs):
    """A restartable ``IndexShard`` actor; ``name`` makes it findable with ``ray.get_actor``;
    ``resources``: the custom resources (node type labels) it needs."""
    import ray

    options = {"max_restarts": max_restarts, "max_task_retries": -1, "num_cpus": num_cpus,
               "num_gpus": num_gpus, "resources": resources or {}}
    if name:
        options.update(name=name, get_if_exists=True)
    return ray.remote(IndexShard).options(**options).remote(**shard_kwargs)


class ShardedIndex:
    """Queries every shard at once (one replica each, round robin) and merges the top-k.

    With ``quantizer`` (the serialised coarse quantizer that IVF shards trained from one index
    share) and ``nprobe``, the router assigns queries to inverted lists once and the shards only
    scan those lists, instead of every shard repeating the coarse search. With ``sub_batch``, a
    batch is cut into sub-batches: the router assigns the next while the shards scan this one
    (``bench/scale.py`` measures it; on 2 cores, where the router and the shards share the CPUs,
    one pass is faster, so it is not the default).
    """

    def __init__(self, shards: list[list], metric: str, quantizer: bytes | None = None, nprobe: int = 16,
                 ef_search: int = 64, sub_batch: int | None = None):
        if not shards or any(not replicas for replicas in shards):
            raise ValueError("ShardedIndex needs at least one replica for every shard")
        self.shards, self.metric = shards, metric
        self.quantizer_bytes, self.nprobe, self.ef_search = quantizer, nprobe, ef_search
        self.sub_batch = sub_batch
        self._quantizer = None
        self._turn = 0

    def __getstate__(self) -> dict:  # Faiss objects do not pickle: ship the bytes
        return {**self.__dict__, "_quantizer": None}

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """[q, d] queries -> ([q, k] distances, [q, k] chunk ids), best first, -1 padded."""
        import ray

        self._turn += 1
        replicas = [r[self._turn % len(r)] for r in self.shards]
        queries = np.ascontiguousarray(queries, dtype=np.float32)  # [q, d]
        if self.quantizer_bytes is None:
            shared = ray.put(queries)  # sent once, read by every shard
            return merge_topk(ray.get([shard.search.remote(shared, k) for shard in replicas]), k, self.metric)
        if self._quantizer is None:
            self._quantizer = faiss.deserialize_index(np.frombuffer(self.quantizer_bytes, dtype=np.uint8))
            self._set_quantizer_search()
        parts = []  # per sub-batch: the shards' calls, in flight while the next is assigned
        step = self.sub_batch or max(len(queries), 1)
        for lo in range(0, max(len(queries), 1), step):  # at least one pass: no queries, no results
            sub = queries[lo: lo + step]  # [s, d]
            list_dist, lists = self._quantizer.search(sub, self.nprobe)  # [s, nprobe] each
            shared, lists_ref, dist_ref = ray.put(sub), ray.put(lists), ray.put(list_dist)
            parts.append([shard.search_preassigned.remote(shared, k, lists_ref, dist_ref) for shard in replicas])
        merged = [merge_topk(ray.get(refs), k, self.metric) for refs in parts]
        return np.concatenate([d for d, _ in merged]), np.concatenate([i for _, i in merged])

    def _set_quantizer_search(self) -> None:
        """An HNSW coarse quantizer (behind OPQ or not) searches with efSearch >= nprobe."""
        inner = faiss.downcast_index(self._quantizer)
        if isinstance(inner, faiss.IndexPreTransform):
            inner = faiss.downcast_index(inner.index)
        if isinstance(inner, faiss.IndexHNSW):
            inner.hnsw.efSearch = max(self.ef_search, self.nprobe)

    def ntotal(self) -> int:
        import ray

        return sum(ray.get([replicas[0].ntotal.remote() for replicas in self.shards]))

    def set_search(self, nprobe: int, ef_search: int) -> None:
        import ray

        ray.get([r.set_search.remote(nprobe, ef_search) for replicas in self.shards for r in replicas])
        self.nprobe, self.ef_search = nprobe, ef_search
        if self._quantizer is not None:
            self._set_quantizer_search()

    def close(self) -> None:
        """Stop every shard actor (they hold CPUs or GPUs until then)."""
        import ray

        for replicas in self.shards:
            for actor in replicas:
                ray.kill(actor)


class LocalIndex:
    """The saved shards loaded into this process, searched one after another and merged like the
    router: for a laptop, a notebook or a Serve replica without a cluster-wide index."""

    def __init__(self, shards: list[IndexShard], metric: str):
        self.shards, self.metric = shards, metric

    @classmethod
    def load(cls, storage, index_dir: str, nprobe: int = 16, ef_search: int = 64) -> "LocalIndex":
        """The shards an ``index`` stage saved under ``index_dir`` (its ``layout.json``)."""
        layout = storage.read_json(join(index_dir, "layout.json"))
        shards = [IndexShard(dim=layout["dim"], factory=layout["factory"], metric=layout["metric"],
                             uri=join(index_dir, s["file"]), storage_cfg=storage.cfg,
                             nprobe=nprobe, ef_search=ef_search)
                  for s in layout["shards"]]
        return cls(shards, layout["metric"])

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """[q, d] queries -> ([q, k] distances, [q, k] chunk ids), best first, -1 padded."""
        return merge_topk([shard.search(queries, k) for shard in self.shards], k, self.metric)

    def close(self) -> None:
        self.shards = []
