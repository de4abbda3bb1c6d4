"""Benchmark: the retrieval database at scale.

- Driver: the ``db`` stage on ``--docs`` Wikipedia articles (a fresh build each run; Parquet
  row groups of 20 articles, the units the chunk pass reads in parallel), the CPU
  seconds of this process (the driver) against those of the whole machine while it runs
  (``driver_cpu_share``; run it on a quiet machine), and the seconds embedding ran while
  chunking was still going on (``embed_overlap_s``, from the manifest's timings).
- Memory: a reader of samples (``RetroSamples``, 512 random samples, as a training worker reads
  them) on a synthetic finished database of ``--chunks`` chunks and on one 4x larger: its
  private memory (``RssAnon``: file pages of the memory-mapped token store are not held, the
  kernel drops them) against the same process loading every chunk's tokens as readers did before.
- Index: the neighbour stage's real query batches (``samples_per_block`` x ``seq_len / m``
  queries, ``k_candidates``) through the router over 2 shard actors against the same trained
  index searched in one process, for the paper's index family at small scale.
- Plan: ``retro-ray plan --paper``'s figures over the paper's.

Last line: one JSON object.

    python bench/scale.py [--docs 200] [--chunks 500000] [--out bench/out/scale]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from common import ROOT, WIKI  # noqa: E402
from test_scale import READ_SAMPLES, synthetic_run  # noqa: E402

FACTORY, NPROBE = "OPQ16_64,IVF256_HNSW32,PQ16", 16

LOAD_ALL = """
import sys, numpy as np
from retro_ray.dbfiles import tokens_uri
from retro_ray.storage import Manifest, Storage

def anon_mb():
    return int(next(l for l in open("/proc/self/status") if l.startswith("RssAnon")).split()[1]) / 1024

db = sys.argv[1] + "/db"
blocks = sorted(Manifest.model_validate(Storage().read_json(db + "/_manifest.json")).blocks)
tables = [Storage().open_arrow(tokens_uri(db, b)) for b in blocks]
flat = np.concatenate([t.column("tokens").combine_chunks().values.to_numpy() for t in tables])  # [tokens]
docs = np.concatenate([t.column("doc_id").to_numpy() for t in tables])  # [chunks]
print(0.0, anon_mb())
"""


def machine_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy since boot (/proc/stat)."""
    fields = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    busy = sum(fields[:8]) - fields[3] - fields[4]  # all but idle and iowait
    return busy / os.sysconf("SC_CLK_TCK")


def build_db(out: Path, docs: int):
    import pyarrow.parquet as pq

    from retro_ray import chunks, tokenizer
    from retro_ray.config import Config
    from retro_ray.storage import Storage

    shutil.rmtree(out / "run" / "db", ignore_errors=True)
    corpus = out / "wiki.parquet"
    pq.write_table(pq.read_table(WIKI, columns=["text"]).slice(0, docs), corpus, row_group_size=20)
    cfg = Config.model_validate({
        "workdir": str(out / "run"),
        "corpus": {"sources": [{"name": "wiki", "paths": [str(corpus)]}]},
        "tokenizer": {"train_docs": 2000},
        "embed": {"batch_size": 64, "min_actors": 1, "max_actors": 1},
    })
    tokenizer.run(cfg, Storage())
    me = psutil.Process()
    driver0, machine0, start = sum(me.cpu_times()[:2]), machine_cpu_s(), time.time()
    manifest = chunks.run(cfg, Storage())
    driver, machine, total = sum(me.cpu_times()[:2]) - driver0, machine_cpu_s() - machine0, time.time() - start
    overlap = manifest.timings["chunk_s"] + manifest.timings["embed_s"] - total
    print(f"db: {manifest.counts['chunks']} chunks in {total:.1f}s; driver {driver:.1f} of {machine:.1f} CPU-s "
          f"({driver / machine:.1%}); embedding ran {overlap:.1f}s beside chunking", flush=True)
    return cfg, manifest, driver / machine, overlap, total


def reader_memory(out: Path, src_workdir: Path, n_chunks: int) -> dict:
    """Private MB of a sample reader (and of loading every token) on a database of ``n_chunks``."""
    run = out / f"synthetic-{n_chunks}"
    if not (run / "samples" / "_manifest.json").exists():
        shutil.rmtree(run, ignore_errors=True)
        synthetic_run(run, src_workdir, n_chunks)
    result = {}
    for name, script in (("reader", READ_SAMPLES), ("load_all", LOAD_ALL)):
        proc = subprocess.run([sys.executable, "-c", script, str(run)], capture_output=True, text=True, check=True)
        result[name] = float(proc.stdout.split()[1])
    print(f"{n_chunks} chunks: sample reader holds {result['reader']:.0f} MB; loading every token "
          f"{result['load_all']:.0f} MB", flush=True)
    return result


def best_qps(search, queries: np.ndarray, k: int, repeats: int = 3) -> float:
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        search(queries, k)
        best = max(best, len(queries) / (time.perf_counter() - start))
    return best


def sharded_ratio(cfg, manifest, out: Path) -> dict:
    import ray

    from index_actors.router import ShardedIndex, shard_actor
    from index_actors.shard import IndexShard, coarse_quantizer, new_index, save_index
    from retro_ray.dbfiles import read_vectors
    from retro_ray.layout import db_dir
    from retro_ray.storage import Storage

    total = manifest.counts["chunks"]
    xb = read_vectors(Storage(), db_dir(cfg), sorted(manifest.blocks), np.arange(total))  # [n, d]
    nc = cfg.neighbors
    batch = nc.samples_per_block * (nc.seq_len // cfg.db.chunk_length)  # the stage's queries per call
    queries = xb[np.random.default_rng(0).choice(total, size=batch, replace=batch > total)]  # [batch, d]
    template = new_index(xb.shape[1], FACTORY, "ip")
    template.train(xb)
    save_index(Storage(), str(out / "trained.faiss"), template)
    one = IndexShard(dim=xb.shape[1], factory=FACTORY, metric="ip", uri=str(out / "one.faiss"),
                     template_uri=str(out / "trained.faiss"), nprobe=NPROBE)
    one.add(np.arange(total), xb)
    local_qps = best_qps(one.search, queries, nc.k_candidates)
    actors = []
    for s, part in enumerate(np.array_split(np.arange(total), 2)):
        actor = shard_actor(name=None, num_cpus=1, dim=xb.shape[1], factory=FACTORY, metric="ip", nprobe=NPROBE,
                            uri=str(out / f"shard-{s}.faiss"), template_uri=str(out / "trained.faiss"))
        ray.get(actor.add.remote(part, xb[part]))
        actors.append([actor])
    router = ShardedIndex(actors, "ip", quantizer=coarse_quantizer(template), nprobe=NPROBE)
    sharded_qps = best_qps(router.search, queries, nc.k_candidates)
    router.close()
    print(f"{FACTORY}, nprobe {NPROBE}, batches of {batch} queries, k {nc.k_candidates}: one process "
          f"{local_qps:.0f} queries/s, router over 2 shards {sharded_qps:.0f} ({sharded_qps / local_qps:.2f})",
          flush=True)
    return {"batch": batch, "local_qps": round(local_qps), "sharded_qps": round(sharded_qps),
            "ratio": round(sharded_qps / local_qps, 3)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=200)
    parser.add_argument("--chunks", type=int, default=500_000)
    parser.add_argument("--out", default=str(ROOT / "bench" / "out" / "scale"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import ray

    from retro_ray import cli
    from retro_ray.runtime import setup_logging

    setup_logging()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    cfg, manifest, driver_share, overlap, db_seconds = build_db(out, args.docs)
    index = sharded_ratio(cfg, manifest, out)
    ray.shutdown()
    small = reader_memory(out, Path(cfg.workdir), args.chunks)
    large = reader_memory(out, Path(cfg.workdir), 4 * args.chunks)
    answer = io.StringIO()
    with contextlib.redirect_stdout(answer):  # the command a user runs: retro-ray plan --paper
        cli.main(["plan", "--paper", "--json"])
    versus = {k: round(v, 3) for k, v in json.loads(answer.getvalue())["vs_paper"].items()}
    print(f"reader memory, 4x database / database: {large['reader'] / small['reader']:.3f} "
          f"(loading every token: {large['load_all'] / small['load_all']:.2f}); plan / paper: {versus}")
    print(json.dumps({
        "driver_cpu_share": round(driver_share, 4),
        "rss_mb_db_n": round(small["reader"], 1), "rss_mb_db_4n": round(large["reader"], 1),
        "sharded_ratio_real_batches": index["ratio"],
        "embed_overlap_s": round(overlap, 1),
        "plan_vs_paper": versus,
        "chunks_n": args.chunks, "load_all_mb_db_n": round(small["load_all"], 1),
        "load_all_mb_db_4n": round(large["load_all"], 1), "db_chunks": manifest.counts["chunks"],
        "db_seconds": round(db_seconds, 1),
        "index": {"factory": FACTORY, "nprobe": NPROBE, **index},
    }))


if __name__ == "__main__":
    main()
