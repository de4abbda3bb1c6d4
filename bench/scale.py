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
from common import ROOT, WIKI, wiki_db  # noqa: E402
from conftest import reference_samples  # noqa: E402
from test_scale import READ_SAMPLES, synthetic_run  # noqa: E402

FACTORY, NPROBE = "OPQ16_64,IVF256_HNSW32,PQ16", 16

LOAD_ALL = """
import sys, numpy as np
from retro_ray.core.manifest import Manifest
from retro_ray.core.storage import Storage
from retro_ray.database.files import tokens_uri

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
    me = psutil.Process()
    driver0, machine0 = sum(me.cpu_times()[:2]), machine_cpu_s()
    cfg, manifest, total = wiki_db(out / "run", docs, fresh=True)
    driver, machine = sum(me.cpu_times()[:2]) - driver0, machine_cpu_s() - machine0
    overlap = manifest.timings["chunk_s"] + manifest.timings["embed_s"] - total
    print(f"db: {manifest.counts['chunks']} chunks in {total:.1f}s; driver {driver:.1f} of {machine:.1f} CPU-s "
          f"({driver / machine:.1%}); embedding ran {overlap:.1f}s beside chunking", flush=True)
    return cfg, manifest, driver / machine, overlap, total


def neighbors_stage(cfg) -> dict:
    """The neighbours stage on 2 shard actors (the driver's CPU share, queries/s) against the
    same stage as one process ran it (``reference_samples``: the loop before it was distributed)
    searching the same saved index in-process; and whether both wrote the same files."""
    from index_actors.router import LocalIndex
    from retro_ray.core.layout import index_dir, samples_dir
    from retro_ray.core.storage import Storage
    from retro_ray.retrieval import index, neighbors

    cfg = cfg.model_copy(update={
        "index": cfg.index.model_copy(update={"factory": FACTORY, "nprobe": NPROBE, "shards": 2, "train_size": 10**6}),
        "neighbors": cfg.neighbors.model_copy(update={"seq_len": 512, "samples_per_block": 64, "valid_fraction": 0.05})})
    storage = Storage()
    index.run(cfg, storage, force=True)
    shutil.rmtree(samples_dir(cfg), ignore_errors=True)  # a whole stage: an up-to-date one would be kept
    me = psutil.Process()
    driver0, machine0, start = sum(me.cpu_times()[:2]), machine_cpu_s(), time.time()
    manifest = neighbors.run(cfg, storage, force=True)
    wall = time.time() - start
    driver, machine = sum(me.cpu_times()[:2]) - driver0, machine_cpu_s() - machine0
    queries = sum(b["queries"] for b in manifest.blocks.values())
    local = LocalIndex.load(storage, index_dir(cfg), nprobe=NPROBE)
    start = time.time()
    same = reference_samples(cfg, Path(cfg.workdir) / "one-process-samples", local) == {
        n: b["sha256"] for n, b in manifest.blocks.items()}
    local_s = time.time() - start
    stage_qps, local_qps = queries / wall, queries / local_s
    print(f"neighbours: {queries} queries in {len(manifest.blocks)} sample blocks, {wall:.1f}s ({stage_qps:.0f}/s) "
          f"on 2 shards; the same stage in one process {local_qps:.0f}/s ({stage_qps / local_qps:.2f}; same files: "
          f"{same}); driver {driver:.1f} of "
          f"{machine:.1f} CPU-s ({driver / machine:.1%})", flush=True)
    return {"driver_cpu_share": driver / machine, "stage_qps": stage_qps, "local_qps": local_qps,
            "queries": queries, "blocks": len(manifest.blocks), "seconds": wall, "same_files": same}


def manifest_bytes_per_block(out: Path) -> dict[str, int]:
    """Bytes one finished block's record writes when it is the 100th and the 10,000th."""
    from retro_ray.core.manifest import open_stage
    from test_storage import CountingStorage

    storage, folder = CountingStorage(), str(out / "manifest-stage")
    shutil.rmtree(folder, ignore_errors=True)
    manifest, result = open_stage(storage, folder, "neighbors", "bench", {}), {}
    for n in range(1, 10_001):
        name = f"train/{(n - 1) * 256:010d}-{n * 256:010d}"
        manifest.blocks[name] = {"rows": 256, "sha256": "0" * 64, "no_neighbor": 0, "near_copies": 0, "queries": 8192}
        before = storage.written
        manifest.record(storage, folder, "blocks", name)
        if n in (100, 10_000):
            result[str(n)] = storage.written - before
    shutil.rmtree(folder)
    return result


def units_of_one_big_file(out: Path, mb: int = 200) -> int:
    """Units the chunk pass cuts one ``mb`` MB JSONL file into (default ``corpus.unit_mb``)."""
    from retro_ray.core.config import Config
    from retro_ray.core.storage import Storage
    from retro_ray.database import chunks

    path = out / f"big-{mb}mb.jsonl"
    if not path.exists():
        import pyarrow.parquet as pq

        lines = [json.dumps({"text": t}) for t in pq.read_table(WIKI, columns=["text"]).slice(0, 2000).column("text").to_pylist()]
        block = ("\n".join(lines) + "\n").encode()
        with open(path, "wb") as f:
            for _ in range(-(-mb * 2**20 // len(block))):
                f.write(block)
    cfg = Config.model_validate({"workdir": str(out / "big-run"),
                                 "corpus": {"sources": [{"name": "big", "paths": [str(path)]}]}})
    units = chunks.plan_units(cfg, Storage(), {"big": [str(path)]})
    print(f"one {path.stat().st_size / 2**20:.0f} MB JSONL file: {len(units)} units of at most "
          f"{cfg.corpus.unit_mb:g} MB", flush=True)
    return len(units)


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
    from retro_ray.core.layout import db_dir
    from retro_ray.core.storage import Storage
    from retro_ray.database.files import read_vectors

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
    quantizer = coarse_quantizer(template)
    ways = {"one_pass": ShardedIndex(actors, "ip", quantizer=quantizer, nprobe=NPROBE),  # the default
            "overlapped_1024": ShardedIndex(actors, "ip", quantizer=quantizer, nprobe=NPROBE, sub_batch=1024),
            "overlapped_4096": ShardedIndex(actors, "ip", quantizer=quantizer, nprobe=NPROBE, sub_batch=4096),
            "shards_search_all": ShardedIndex(actors, "ip", nprobe=NPROBE)}
    qps = {name: best_qps(router.search, queries, nc.k_candidates) for name, router in ways.items()}
    ways["one_pass"].close()
    print(f"{FACTORY}, nprobe {NPROBE}, batches of {batch} queries, k {nc.k_candidates}: one process "
          f"{local_qps:.0f} queries/s; router over 2 shards: " +
          ", ".join(f"{name} {q:.0f} ({q / local_qps:.2f})" for name, q in qps.items()), flush=True)
    return {"batch": batch, "local_qps": round(local_qps), "sharded_qps": round(qps["one_pass"]),
            "ratio": round(qps["one_pass"] / local_qps, 3),
            "ratios": {name: round(q / local_qps, 3) for name, q in qps.items()}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=200)
    parser.add_argument("--chunks", type=int, default=500_000)
    parser.add_argument("--out", default=str(ROOT / "bench" / "out" / "scale"))
    parser.add_argument("--big-mb", type=int, default=200, help="size of the one big JSONL file to cut into units")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import ray

    from retro_ray import cli
    from retro_ray.core.runtime import setup_logging

    setup_logging()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    cfg, manifest, driver_share, overlap, db_seconds = build_db(out, args.docs)
    index = sharded_ratio(cfg, manifest, out)
    stage = neighbors_stage(cfg)
    units = units_of_one_big_file(out, args.big_mb)
    ray.shutdown()
    manifest_bytes = manifest_bytes_per_block(out)
    print(f"manifest bytes a block's record writes: {manifest_bytes}", flush=True)
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
        "neighbors_driver_cpu_share": round(stage["driver_cpu_share"], 4),
        "neighbors_vs_local": round(stage["stage_qps"] / stage["local_qps"], 3),
        "manifest_bytes_per_block": manifest_bytes,
        "units_of_one_big_file": units,
        "neighbors": {k: round(v, 1) for k, v in stage.items() if k not in ("driver_cpu_share", "same_files")},
        "neighbors_same_files": stage["same_files"],
        "embed_overlap_s": round(overlap, 1),
        "plan_vs_paper": versus,
        "chunks_n": args.chunks, "load_all_mb_db_n": round(small["load_all"], 1),
        "load_all_mb_db_4n": round(large["load_all"], 1), "db_chunks": manifest.counts["chunks"],
        "db_seconds": round(db_seconds, 1),
        "index": {"factory": FACTORY, "nprobe": NPROBE, **index},
    }))


if __name__ == "__main__":
    main()
