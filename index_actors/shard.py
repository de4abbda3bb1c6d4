"""One shard of the chunk index: a Faiss index with explicit methods, persisted through storage.

``IndexShard`` imports no Ray: the router wraps it in ``ray.remote(...).options(max_restarts=...)``.
Its constructor loads the shard's saved file when there is one, so a restarted actor serves
exactly what was saved, and a query retried on it returns the same answer.
"""

from __future__ import annotations

import re

import faiss
import numpy as np

from retro_ray.core.config import StorageConfig
from retro_ray.core.errors import UserError
from retro_ray.core.storage import Storage
from retro_ray.database.files import read_embeddings

METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}


class TrainingSampleError(UserError, ValueError):
    """The training sample is too small for the factory string."""


def min_training_vectors(factory: str) -> int:
    """The fewest training vectors Faiss accepts for ``factory`` (0 when it needs no training).

    IVF{n} needs n (one per list; Faiss advises 39 n); PQ{m}[x{b}] and OPQ need 2^b per
    sub-quantizer centroid set (b = 8 by default).
    """
    need = 0
    for nlist in re.findall(r"IVF(\d+)", factory):
        need = max(need, int(nlist))
    for _, bits in re.findall(r"(?<!O)PQ(\d+)(?:x(\d+))?", factory):
        need = max(need, 2 ** int(bits or 8))
    return need


def new_index(dim: int, factory: str, metric: str) -> faiss.Index:
    """A fresh index whose ids are ours (``add_with_ids``): IVF keeps ids, others get an IDMap."""
    index = faiss.index_factory(dim, factory, METRICS[metric])
    if faiss.try_extract_index_ivf(index) is None:
        index = faiss.IndexIDMap2(index)
    return index


def _unwrap(index: faiss.Index) -> faiss.Index:
    return faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index


def _on_gpu(index: faiss.Index) -> bool:
    return "Gpu" in type(faiss.downcast_index(index)).__name__


def set_search_params(index: faiss.Index, nprobe: int, ef_search: int) -> None:
    """Apply ``nprobe`` to IVF indexes and ``efSearch`` to HNSW ones (an HNSW coarse quantizer
    searches with at least ``nprobe``); others ignore both."""
    ps = faiss.GpuParameterSpace() if _on_gpu(index) else faiss.ParameterSpace()
    ivf = faiss.try_extract_index_ivf(_unwrap(index))
    if ivf is not None:
        ps.set_index_parameter(index, "nprobe", nprobe)
        if isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexHNSW):
            ps.set_index_parameter(index, "quantizer_efSearch", max(ef_search, nprobe))
    if isinstance(_unwrap(index), faiss.IndexHNSW):
        ps.set_index_parameter(index, "efSearch", ef_search)


def save_index(storage: Storage, uri: str, index: faiss.Index) -> None:
    if _on_gpu(index):
        index = faiss.index_gpu_to_cpu(index)
    storage.write_bytes(uri, faiss.serialize_index(index).tobytes())


def load_index(storage: Storage, uri: str) -> faiss.Index:
    return faiss.deserialize_index(np.frombuffer(storage.read_bytes(uri), dtype=np.uint8))


def coarse_quantizer(index: faiss.Index) -> bytes | None:
    """The serialised coarse quantizer of a trained IVF index (None for other types), behind the
    index's vector transforms (OPQ) when it has them, so it takes raw queries. Shards started
    from one trained index share it, so a router can assign queries to lists once."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return None
    quantizer = faiss.downcast_index(ivf.quantizer)
    outer = faiss.downcast_index(index)  # a view: ``index`` must stay referenced, it owns them all
    if isinstance(outer, faiss.IndexPreTransform):
        chained = faiss.IndexPreTransform(quantizer)
        for i in reversed(range(outer.chain.size())):
            chained.prepend_transform(outer.chain.at(i))
        quantizer = chained
    return faiss.serialize_index(quantizer).tobytes()


def apply_transforms(index: faiss.Index, x: np.ndarray) -> np.ndarray:
    """[q, d] vectors -> what the index's IVF part sees: after its transforms (OPQ), if any."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            x = index.chain.at(i).apply(x)
    return x


def uses_gpu(factory: str) -> bool:
    """Whether shards of ``factory`` run on a GPU when there is one (IVF indexes do)."""
    return "IVF" in factory


def to_gpu_if_present(index: faiss.Index) -> faiss.Index:
    """A GPU copy of an IVF ``index`` with a flat coarse quantizer when Faiss sees a GPU (Faiss's
    GPU IVF needs one; HNSW, HNSW-quantized IVF and IDMap stay on the CPU)."""
    ivf = faiss.try_extract_index_ivf(index)
    if faiss.get_num_gpus() == 0 or ivf is None or not isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexFlat):
        return index
    return faiss.index_cpu_to_all_gpus(index)


class IndexShard:
    """A Faiss index over one range of chunk ids.

    Args:
        uri: where the shard is saved; loaded at construction when it exists.
        template_uri: a trained empty index to start from when ``uri`` does not exist yet.
    """

    def __init__(self, *, dim: int, factory: str, metric: str, uri: str,
                 template_uri: str | None = None, storage_cfg: StorageConfig | None = None,
                 nprobe: int = 16, ef_search: int = 64):
        self.storage = Storage(storage_cfg)
        self.uri, self.metric = uri, metric
        self.nprobe, self.ef_search = nprobe, ef_search
        if self.storage.exists(uri):
            index = load_index(self.storage, uri)
        elif template_uri and self.storage.exists(template_uri):
            index = load_index(self.storage, template_uri)
        else:
            index = new_index(dim, factory, metric)
        self._set(index)

    def _set(self, index: faiss.Index) -> None:
        self.index = to_gpu_if_present(index)
        set_search_params(self.index, self.nprobe, self.ef_search)

    def train(self, vectors: np.ndarray) -> None:
        """Train on [n, d] vectors (a no-op for indexes that need no training). With a GPU, the
        IVF k-means runs on it whatever the coarse quantizer (an HNSW one stays on the CPU)."""
        if self.index.is_trained:
            return
        ivf = faiss.try_extract_index_ivf(self.index)
        if ivf is not None and faiss.get_num_gpus() and not _on_gpu(self.index):
            ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(ivf.d))
        self.index.train(np.ascontiguousarray(vectors, dtype=np.float32))

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> int:
        """Add [n] chunk ids with their [n, d] vectors; returns the shard's size."""
        self.index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32),
                                np.ascontiguousarray(ids, dtype=np.int64))
        return self.index.ntotal

    def add_files(self, uris: list[str]) -> int:
        """Add embedding blocks (``db/embeddings/*.parquet``) read from storage; returns the size."""
        for uri in uris:
            self.add(*read_embeddings(self.storage, uri))
        return self.index.ntotal

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """[q, d] queries -> ([q, k] distances, [q, k] chunk ids, -1 where fewer than k)."""
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)

    def search_preassigned(self, queries: np.ndarray, k: int, lists: np.ndarray, list_dist: np.ndarray
                           ) -> tuple[np.ndarray, np.ndarray]:
        """IVF only: search the inverted lists ``lists`` [q, nprobe] (with their coarse distances)
        that the router chose once for all shards -> ([q, k] distances, [q, k] chunk ids)."""
        ivf = faiss.extract_index_ivf(self.index)
        queries = apply_transforms(self.index, np.ascontiguousarray(queries, dtype=np.float32))
        return ivf.search_preassigned(np.ascontiguousarray(queries), k,
                                      np.ascontiguousarray(lists, dtype=np.int64),
                                      np.ascontiguousarray(list_dist, dtype=np.float32))

    def ntotal(self) -> int:
        return self.index.ntotal

    def set_search(self, nprobe: int, ef_search: int) -> None:
        self.nprobe, self.ef_search = nprobe, ef_search
        set_search_params(self.index, nprobe, ef_search)

    def save(self, uri: str | None = None) -> str:
        """Write the index (atomically) to ``uri`` (default: the shard's own file)."""
        save_index(self.storage, uri or self.uri, self.index)
        return uri or self.uri
