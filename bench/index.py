"""Benchmark: the trained Faiss index and the sharded router against exact search.

Builds (once, then reuses) a chunk database of ``--docs`` Wikipedia articles from
``../shared/data/wiki`` with the ``db`` stage, and on its embeddings measures, on the same
queries (random database chunks):

- recall@10 and queries/s of each trained index in a small grid, against ``IndexFlat``;
- queries/s of the chosen index split over 2 and 4 shard actors behind the router, against the
  same index in one process (``sharded_ratio``);
- build (train + add) time and peak memory of this process tree.

The chosen index is the fastest of the grid with recall@10 >= 0.9. Last line: one JSON object.

    python bench/index.py [--docs 1000] [--queries 2000] [--out bench/out/index]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, PeakRss, wiki_db  # noqa: E402

GRID = [("HNSW32", {"ef_search": 64}), ("HNSW32", {"ef_search": 128}),
        ("IVF1024,Flat", {"nprobe": 8}), ("IVF1024,Flat", {"nprobe": 16}),
        ("IVF1024,Flat", {"nprobe": 32}), ("IVF256,Flat", {"nprobe": 8})]


def timed_search(search, queries: np.ndarray, k: int, repeats: int = 3) -> tuple[np.ndarray, float]:
    """Ids of ``search(queries, k)`` and its best queries/s over ``repeats`` runs."""
    best, ids = 0.0, None
    for _ in range(repeats):
        start = time.perf_counter()
        _, ids = search(queries, k)
        best = max(best, len(queries) / (time.perf_counter() - start))
    return ids, best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--out", default=str(ROOT / "bench" / "out" / "index"))
    args = parser.parse_args()

    import ray

    from index_actors.router import ShardedIndex, shard_actor
    from index_actors.shard import IndexShard, coarse_quantizer, min_training_vectors, new_index, save_index
    from retro_ray.core.layout import db_dir
    from retro_ray.core.runtime import setup_logging
    from retro_ray.core.storage import Storage
    from retro_ray.database.files import read_vectors
    from retro_ray.retrieval.index import recall_at_k, uniform_sample

    setup_logging()
    rss = PeakRss()
    out = Path(args.out)
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    cfg, manifest, _ = wiki_db(out / "run", args.docs, embed={"num_cpus_per_actor": 2})
    total = manifest.counts["chunks"]
    xb = read_vectors(Storage(), db_dir(cfg), sorted(manifest.blocks), np.arange(total))  # [n, d]
    ids = np.arange(total)
    xq = xb[uniform_sample(total, args.queries, seed=1)]  # [q, d]
    dim = xb.shape[1]
    print(f"{total} vectors of {dim} dims, {len(xq)} queries", flush=True)

    flat = faiss.IndexFlatIP(dim)
    flat.add(xb)
    exact, flat_qps = timed_search(flat.search, xq, 10)
    print(f"IndexFlat: {flat_qps:.0f} queries/s", flush=True)

    results = []
    for factory, params in GRID:
        if min_training_vectors(factory) > total:
            print(f"{factory}: skipped, {total} vectors are too few to train it", flush=True)
            continue
        shard = IndexShard(dim=dim, factory=factory, metric="ip", uri=str(out / "unused.faiss"), **params)
        start = time.perf_counter()
        shard.train(xb[uniform_sample(total, min(total, 40 * 1024), seed=0)])
        shard.add(ids, xb)
        build_s = time.perf_counter() - start
        found, qps = timed_search(shard.search, xq, 10)
        recall = recall_at_k(found, exact)
        results.append({"factory": factory, **params, "recall_at_10": round(recall, 4), "qps": round(qps),
                        "build_s": round(build_s, 2), "shard": shard})
        print(f"{factory} {params}: recall@10 {recall:.3f}, {qps:.0f} queries/s "
              f"({qps / flat_qps:.1f}x flat), built in {build_s:.1f}s", flush=True)
    good = [r for r in results if r["recall_at_10"] >= 0.9] or results
    best = max(good, key=lambda r: r["qps"])
    params = {k: best[k] for k in ("nprobe", "ef_search") if k in best}

    # The index stage's way: one trained (empty) index, every shard started from it, and for IVF
    # the router assigning queries to lists once with the shared coarse quantizer.
    template = new_index(dim, best["factory"], "ip")
    template.train(xb[uniform_sample(total, min(total, 40 * 1024), seed=0)])
    save_index(Storage(), str(out / "trained.faiss"), template)
    sharded = {}
    for n_shards in (2, 4):
        actors = []
        for s, part in enumerate(np.array_split(ids, n_shards)):
            actor = shard_actor(name=None, num_cpus=2 / n_shards, dim=dim, factory=best["factory"], metric="ip",
                                uri=str(out / f"shard-{n_shards}-{s}.faiss"), template_uri=str(out / "trained.faiss"),
                                **params)
            ray.get(actor.add.remote(part, xb[part]))
            actors.append([actor])
        router = ShardedIndex(actors, "ip", quantizer=coarse_quantizer(template), nprobe=params.get("nprobe", 16))
        found, qps = timed_search(router.search, xq, 10)
        sharded[n_shards] = (qps, recall_at_k(found, exact))
        print(f"router over {n_shards} shards: {qps:.0f} queries/s, recall@10 {sharded[n_shards][1]:.3f}", flush=True)
        router.close()
    peak = rss.stop()
    print(f"chosen {best['factory']} {params}: {best['qps'] / flat_qps:.1f}x flat; "
          f"router/one process: {sharded[2][0] / best['qps']:.2f} (2 shards), {sharded[4][0] / best['qps']:.2f} (4)")
    print(json.dumps({
        "vectors": total, "factory": best["factory"], **params,
        "recall_at_10": best["recall_at_10"], "qps": best["qps"], "flat_qps": round(flat_qps),
        "speedup_vs_flat": round(best["qps"] / flat_qps, 2),
        "sharded_qps": round(sharded[2][0]), "sharded_ratio": round(sharded[2][0] / best["qps"], 3),
        "sharded_qps_4": round(sharded[4][0]), "sharded_ratio_4": round(sharded[4][0] / best["qps"], 3),
        "build_s": best["build_s"], "peak_rss_mb": round(peak),
        "grid": [{k: v for k, v in r.items() if k != "shard"} for r in results],
    }))


if __name__ == "__main__":
    main()
