"""The ``index`` stage: a sharded Faiss index over the chunk database, and ``index verify``.

1. Train: draw ``train_size`` chunk ids uniformly at random from the whole database, read only
   their embeddings, train one empty index in a Ray task and save it as ``index/trained.faiss``.
2. Add: database blocks go to shards by chunk-id range; each shard actor starts from the trained
   index, reads its blocks' embeddings itself, adds them with ids = ``chunk_id`` and saves
   ``index/shard-NNNN.faiss``. Finished shards are recorded, so a rerun adds only the rest.
3. ``index/layout.json``: factory, metric, dimension, training-sample size, shard files and ranges.
"""

from __future__ import annotations

import time

import numpy as np

from index_actors.router import ShardedIndex, shard_actor
from index_actors.shard import TrainingSampleError, coarse_quantizer, load_index, min_training_vectors, uses_gpu
from retro_ray.core.config import Config, config_hash
from retro_ray.core.layout import DB, INDEX, db_dir, index_dir
from retro_ray.core.locks import locked
from retro_ray.core.manifest import Manifest, open_stage
from retro_ray.core.runtime import log
from retro_ray.core.storage import Storage, join
from retro_ray.database.files import block_range, embeddings_uri, finished_db, read_vectors


def shard_uri(cfg: Config, shard: int) -> str:
    return join(index_dir(cfg), f"shard-{shard:04d}.faiss")


def assign_blocks(blocks: list[str], n_shards: int) -> list[list[str]]:
    """Contiguous runs of (sorted) blocks per shard, so each shard owns one chunk-id range."""
    return [[b for i, b in enumerate(blocks) if i * n_shards // len(blocks) == s] for s in range(n_shards)]


def uniform_sample(total: int, n: int, seed: int) -> np.ndarray:
    """``n`` sorted distinct chunk ids drawn uniformly from [0, total)."""
    return np.sort(np.random.default_rng(seed).choice(total, size=min(n, total), replace=False))


def _train(cfg: Config, dim: int, vectors: np.ndarray, uri: str) -> None:
    from index_actors.shard import IndexShard

    shard = IndexShard(dim=dim, factory=cfg.index.factory, metric=cfg.index.metric, uri=uri,
                       storage_cfg=cfg.storage)
    shard.train(vectors)
    shard.save()


def _shard_gpus(cfg: Config) -> float:
    import ray

    return 1 if uses_gpu(cfg.index.factory) and ray.cluster_resources().get("GPU", 0) else 0


def _index_config_hash(cfg: Config) -> str:
    """What the saved index depends on (search settings and actor counts are free to change)."""
    built = cfg.index.model_copy(update={"nprobe": 0, "ef_search": 0, "replicas": 1, "num_cpus_per_shard": 1})
    return config_hash(built)


@locked(DB, INDEX)
def run(cfg: Config, storage: Storage, force: bool = False) -> Manifest:
    import ray

    db_manifest = finished_db(cfg, storage)
    blocks = sorted(db_manifest.blocks)
    total = db_manifest.counts["chunks"]
    inputs = {"db": db_manifest.content_hash(), "chunks": total}
    out = index_dir(cfg)
    manifest = open_stage(storage, out, "index", _index_config_hash(cfg), inputs, force)
    if manifest.complete:
        log.info("index: %s is up to date (%d vectors)", out, manifest.counts["vectors"])
        return manifest
    ic = cfg.index
    need = min_training_vectors(ic.factory)
    n_train = min(ic.train_size, total)
    if n_train < need:
        raise TrainingSampleError(
            f"index.factory {ic.factory!r} needs at least {need} training vectors, but the sample has "
            f"{n_train} (index.train_size={ic.train_size}, database: {total} chunks); use fewer IVF "
            f"lists / PQ bits, or a larger database"
        )
    if need and n_train < 39 * need:
        log.warning("index: %d training vectors for %s; Faiss advises at least %d", n_train, ic.factory, 39 * need)
    dim = read_vectors(storage, db_dir(cfg), blocks[:1], np.array([0])).shape[1]
    template = join(out, "trained.faiss") if need else None
    start = time.time()
    if template and "train_s" not in manifest.timings:
        ids = uniform_sample(total, n_train, ic.seed)
        vectors = read_vectors(storage, db_dir(cfg), blocks, ids)  # [n_train, d]
        log.info("index: training %s on %d vectors drawn uniformly from %d", ic.factory, len(ids), total)
        ray.get(ray.remote(_train).options(num_cpus=ic.num_cpus_per_shard, num_gpus=_shard_gpus(cfg),
                                           resources=cfg.resources.index)
                .remote(cfg, dim, vectors, template))
        manifest.timings["train_s"] = time.time() - start
        manifest.counts["train_size"] = len(ids)
        manifest.save(storage, out)

    assignment = assign_blocks(blocks, ic.shards)
    pending = {}
    for s, shard_blocks in enumerate(assignment):
        if f"shard-{s:04d}" in manifest.blocks:
            continue
        storage.delete_file(shard_uri(cfg, s))  # a half-built shard file is rebuilt from the template
        actor = shard_actor(name=None, max_restarts=0, num_cpus=ic.num_cpus_per_shard, resources=cfg.resources.index,
                            num_gpus=_shard_gpus(cfg), dim=dim, factory=ic.factory, metric=ic.metric,
                            uri=shard_uri(cfg, s), template_uri=template, storage_cfg=cfg.storage)
        ref = actor.add_files.remote([embeddings_uri(db_dir(cfg), b) for b in shard_blocks])
        pending[ref] = (s, shard_blocks, actor)
    add_start = time.time()
    while pending:
        [ref], _ = ray.wait(list(pending))
        s, shard_blocks, actor = pending.pop(ref)
        ntotal = ray.get(ref)
        ray.get(actor.save.remote())
        ray.kill(actor)
        ranges = [block_range(shard_blocks[0])[0], block_range(shard_blocks[-1])[1]] if shard_blocks else [0, 0]
        manifest.blocks[f"shard-{s:04d}"] = {"rows": ntotal, "range": ranges, "blocks": len(shard_blocks)}
        manifest.save(storage, out)
        log.info("index: shard %d done (%d vectors, chunks %d-%d)", s, ntotal, *ranges)
    manifest.timings["add_s"] = manifest.timings.get("add_s", 0.0) + time.time() - add_start
    manifest.counts["vectors"] = sum(b["rows"] for b in manifest.blocks.values())
    if manifest.counts["vectors"] != total:
        raise RuntimeError(f"index holds {manifest.counts['vectors']} vectors, the database {total}")
    storage.write_json(join(out, "layout.json"), {
        "factory": ic.factory, "metric": ic.metric, "dim": dim,
        "train_size": manifest.counts.get("train_size", 0),
        "shards": [{"file": f"shard-{s:04d}.faiss", **manifest.blocks[f"shard-{s:04d}"]}
                   for s in range(ic.shards)],
    })
    manifest.complete = True
    manifest.save(storage, out)
    log.info("index: %d vectors in %d shards (%s) -> %s", total, ic.shards, ic.factory, out)
    return manifest


def open_router(cfg: Config, storage: Storage, name: str | None = None) -> ShardedIndex:
    """Serving actors for the saved shards (``index.replicas`` per shard) and their router.

    With ``name``, actors are named ``{name}-shard-S-R`` and reused when they already exist.
    """
    layout = storage.read_json(join(index_dir(cfg), "layout.json"))
    ic = cfg.index
    shards = [
        [shard_actor(name=f"{name}-shard-{s}-{r}" if name else None, num_cpus=ic.num_cpus_per_shard,
                     num_gpus=_shard_gpus(cfg), resources=cfg.resources.index,
                     dim=layout["dim"], factory=layout["factory"], metric=layout["metric"],
                     uri=shard_uri(cfg, s), storage_cfg=cfg.storage, nprobe=ic.nprobe,
                     ef_search=ic.ef_search)
         for r in range(ic.replicas)]
        for s in range(len(layout["shards"]))
    ]
    template = join(index_dir(cfg), "trained.faiss")
    quantizer = coarse_quantizer(load_index(storage, template)) if storage.exists(template) else None
    return ShardedIndex(shards, layout["metric"], quantizer=quantizer, nprobe=ic.nprobe, ef_search=ic.ef_search)


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of the exact top-k ([q, k] ids) that ``found`` ([q, k] ids) contains."""
    k = exact.shape[1]
    return float(np.mean([len(set(f) & set(e[e >= 0])) / k for f, e in zip(found, exact)]))


def verify(cfg: Config, storage: Storage, queries: int = 1000, k: int = 10) -> dict:
    """Recall@k of the sharded index against exact search on a random sample of database chunks."""
    import faiss

    from index_actors.shard import METRICS

    db_manifest = finished_db(cfg, storage)
    blocks = sorted(db_manifest.blocks)
    total = db_manifest.counts["chunks"]
    all_vectors = read_vectors(storage, db_dir(cfg), blocks, np.arange(total))  # [N, d]
    query_ids = uniform_sample(total, queries, cfg.index.seed + 1)
    exact_index = faiss.IndexFlat(all_vectors.shape[1], METRICS[cfg.index.metric])
    exact_index.add(all_vectors)
    _, exact = exact_index.search(all_vectors[query_ids], k)
    router = open_router(cfg, storage)
    start = time.time()
    _, found = router.search(all_vectors[query_ids], k)
    elapsed = time.time() - start
    router.close()
    result = {"queries": len(query_ids), "k": k, f"recall_at_{k}": round(recall_at_k(found, exact), 4),
              "qps": round(len(query_ids) / elapsed, 1), "vectors": total, "factory": cfg.index.factory}
    log.info("index verify: %s", result)
    return result
