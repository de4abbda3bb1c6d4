"""Benchmark: the Ray Data database pipeline against a bare embedding loop.

The pipeline (read, tokenise, chunk, embed, write: ``retro_ray.database.chunks.run``) runs on a fresh
local Ray instance in a child process, once on the full slice and once on half of it; the peak
resident memory of the child's whole process tree (driver, raylet, workers, actors) is sampled.
The baseline embeds the same chunk texts in one process with the same model, batch size and
thread count. Then the full build's blocks are embedded again, in another child, by the db
stage's own actor pool (``EmbedPool``) and by Ray Data (``read_parquet`` -> ``map_batches`` with an
``ActorPoolStrategy`` of the same actors and batch size -> ``write_parquet``), alternately,
``--rounds`` times each; the best round of each is compared (``ray_data_vs_pool``: Ray Data's
chunks/s over the pool's). Prints a log line per run and one JSON object as the last line.

    python bench/embed.py [--chunks 5000] [--threads 2] [--actors 2] [--rounds 2] [--out bench/out/embed]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, WIKI, PeakRss  # noqa: E402


def config(workdir: Path, max_docs: int | None, threads: int, batch_size: int, tokenizer_path: str | None):
    from retro_ray.core.config import Config

    return Config.model_validate({
        "workdir": str(workdir),
        "ray": {"num_cpus": threads},
        "corpus": {"sources": [{"name": "wiki", "paths": [str(WIKI)]}], "max_docs": max_docs},
        "tokenizer": {"path": tokenizer_path, "train_docs": 2000},
        "embed": {"batch_size": batch_size, "min_actors": 1, "max_actors": 1,
                  "num_cpus_per_actor": threads},
    })


def run_pipeline_child(args) -> None:
    """In a child process: build the database and print its timing as JSON."""
    from retro_ray.core.runtime import init_ray, setup_logging
    from retro_ray.core.storage import Storage
    from retro_ray.database import chunks, tokenizer

    setup_logging()
    cfg = config(Path(args.workdir), args.max_docs, args.threads, args.batch_size, args.tokenizer)
    storage = Storage()
    init_ray(cfg)
    tokenizer.run(cfg, storage)
    shutil.rmtree(Path(args.workdir) / "db", ignore_errors=True)  # a finished build would only be resumed
    start = time.time()
    manifest = chunks.run(cfg, storage)
    elapsed = time.time() - start
    print(json.dumps({"chunks": manifest.counts["chunks"], "seconds": elapsed}))


class EmbedBatch:
    """Ray Data's side of the comparison: ``EmbedBlocks``'s model and settings on one batch."""

    def __init__(self, cfg):
        from retro_ray.database.embed import EmbedBlocks

        self.with_title = cfg.embed.with_title
        self.embedder = EmbedBlocks(cfg, db_dir="").embedder  # the db stage's actor builds it, threads included

    def __call__(self, batch):
        import pyarrow as pa

        from retro_ray.database.files import embedding_table

        texts = batch.column("text").to_pylist()
        titles = batch.column("title").to_pylist() if self.with_title else None
        vectors, _ = self.embedder.embed(texts, titles)  # [n, d]
        table = embedding_table(batch.column("chunk_id").to_numpy(), vectors)
        return pa.table({"chunk_id": table.column("chunk_id"), "embedding": table.column("embedding")})


def compare_child(args) -> None:
    """In a child process: the built database's blocks embedded by ``EmbedPool`` and by Ray Data's
    ``map_batches``, alternately; prints {"pool": [s, ...], "ray_data": [s, ...], "chunks": n}."""
    import pyarrow.parquet as pq
    import ray

    from retro_ray.core.runtime import init_ray, setup_logging
    from retro_ray.database.embed import EmbedPool

    setup_logging()
    cfg = config(Path(args.workdir), None, args.threads, args.batch_size, args.tokenizer)
    cfg = cfg.model_copy(update={"embed": cfg.embed.model_copy(update={
        "min_actors": args.actors, "max_actors": args.actors, "num_cpus_per_actor": args.threads / args.actors})})
    init_ray(cfg)
    files = sorted((Path(args.workdir) / "db" / "chunks").glob("*.parquet"))
    scratch = Path(args.workdir) / "compare"
    times: dict[str, list[float]] = {"pool": [], "ray_data": []}
    chunks = 0
    for _ in range(args.rounds):
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.copytree(Path(args.workdir) / "db" / "chunks", scratch / "db" / "chunks")
        start = time.time()
        pool = EmbedPool(cfg, str(scratch / "db"))
        for f in files:
            pool.submit(f.stem, pq.ParquetFile(f).metadata.num_rows)
        pending = dict(pool.dispatch())
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            pool.finish(ref, pending.pop(ref))
            pending.update(pool.dispatch())
        pool.close()
        times["pool"].append(time.time() - start)
        chunks = pool.done

        start = time.time()
        # Ray Data's own tasks (listing the files, reading, writing) ask for CPUs of their own, where
        # the pool's actors read and write their blocks themselves: its actors reserve half a CPU
        # each so that those tasks fit beside them; each still computes with the config's threads.
        io = {"num_cpus": 0.05}
        # One block a file, as the pool takes them: the read returns the small files as one block,
        # which one actor alone would embed.
        ds = ray.data.read_parquet([str(f) for f in files], **io).select_columns(
            ["chunk_id", "text", "title"]).repartition(len(files))
        ds.map_batches(EmbedBatch, fn_constructor_args=(cfg,), batch_size=cfg.embed.batch_size,
                       batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=args.actors),
                       num_cpus=cfg.embed.num_cpus_per_actor / 2).write_parquet(str(scratch / "ray-data"),
                                                                                ray_remote_args=io)
        times["ray_data"].append(time.time() - start)
    print(json.dumps({**times, "chunks": chunks}))


def child(args, *extra: str) -> list[str]:
    """This script with ``extra`` arguments in a child process (its own Ray): its output lines."""
    cmd = [sys.executable, __file__, *extra, "--threads", str(args.threads), "--batch-size", str(args.batch_size),
           "--actors", str(args.actors), "--rounds", str(args.rounds)]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if done.returncode:
        raise SystemExit(f"{extra[0]} child failed with exit code {done.returncode}")
    return done.stdout.splitlines()


def pipeline(args, workdir: Path, max_docs: int, tokenizer_path: str) -> tuple[dict, float]:
    cmd = [sys.executable, __file__, "--child", "--workdir", str(workdir), "--max-docs", str(max_docs),
           "--threads", str(args.threads), "--batch-size", str(args.batch_size), "--tokenizer", tokenizer_path]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(proc.stdout))
    reader.start()
    sampler = PeakRss(proc.pid)
    proc.wait()
    peak = sampler.stop()
    reader.join()
    if proc.returncode:
        raise SystemExit(f"pipeline child failed with exit code {proc.returncode}")
    return json.loads(out[-1]), peak


def baseline(workdir: Path, threads: int, batch_size: int) -> tuple[int, float]:
    """Embed the pipeline's chunk texts in a plain loop; returns (chunks, seconds)."""
    import pyarrow.parquet as pq

    from retro_ray.database.embed import Embedder

    texts = pq.read_table(workdir / "db" / "chunks", columns=["text"]).column("text").to_pylist()
    embedder = Embedder(threads=threads)
    start = time.time()
    for i in range(0, len(texts), batch_size):
        embedder(texts[i: i + batch_size])
    return len(texts), time.time() - start


def docs_for(chunks_wanted: int, tokenizer_path: str, chunk_length: int = 64) -> int:
    """How many leading documents of the slice give at least ``chunks_wanted`` chunks."""
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    total = 0
    for i, text in enumerate(pq.read_table(WIKI, columns=["text"]).column("text").to_pylist(), 1):
        total += -(-len(tok(text)["input_ids"]) // chunk_length)
        if total >= chunks_wanted:
            return i
    raise SystemExit(f"{WIKI} has fewer than {chunks_wanted} chunks")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--chunks", type=int, default=5000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--actors", type=int, default=2, help="embedding actors in the pool comparison")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each in the pool comparison")
    parser.add_argument("--out", default=str(ROOT / "bench" / "out" / "embed"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--compare", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--max-docs", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return run_pipeline_child(args)
    if args.compare:
        return compare_child(args)

    out = Path(args.out)
    # One tokenizer (BPE trained on the slice) shared by both pipeline runs.
    from retro_ray.core.runtime import init_ray, setup_logging
    from retro_ray.core.storage import Storage
    from retro_ray.database import tokenizer

    setup_logging()
    tok_cfg = config(out / "tokenizer-run", None, args.threads, args.batch_size, None)
    init_ray(tok_cfg)
    tokenizer_path = tokenizer.run(tok_cfg, Storage())
    import ray

    ray.shutdown()
    full_docs = docs_for(args.chunks, tokenizer_path)
    half_docs = docs_for(args.chunks // 2, tokenizer_path)

    full, peak = pipeline(args, out / "full", full_docs, tokenizer_path)
    print(f"pipeline: {full['chunks']} chunks in {full['seconds']:.1f}s, peak RSS {peak:.0f} MB", flush=True)
    half, peak_half = pipeline(args, out / "half", half_docs, tokenizer_path)
    print(f"pipeline (half): {half['chunks']} chunks in {half['seconds']:.1f}s, peak RSS {peak_half:.0f} MB",
          flush=True)
    n, seconds = baseline(out / "full", args.threads, args.batch_size)
    print(f"baseline: {n} chunks in {seconds:.1f}s", flush=True)
    pipeline_rate, baseline_rate = full["chunks"] / full["seconds"], n / seconds
    print(f"ratio (pipeline / bare loop): {pipeline_rate / baseline_rate:.3f}")
    compared = json.loads(child(args, "--compare", "--workdir", str(out / "full"), "--tokenizer", tokenizer_path)[-1])
    pool_s, data_s = min(compared["pool"]), min(compared["ray_data"])
    print(f"the same {compared['chunks']} chunks on {args.actors} actors: EmbedPool {pool_s:.1f}s, "
          f"Ray Data map_batches {data_s:.1f}s (rounds: {compared['pool']}, {compared['ray_data']})", flush=True)
    print(json.dumps({
        "chunks": full["chunks"],
        "pipeline_chunks_per_s": round(pipeline_rate, 2),
        "baseline_chunks_per_s": round(baseline_rate, 2),
        "ratio": round(pipeline_rate / baseline_rate, 3),
        "peak_rss_mb": round(peak),
        "peak_rss_mb_half": round(peak_half),
        "pool_s": round(pool_s, 2),
        "ray_data_s": round(data_s, 2),
        "ray_data_vs_pool": round(pool_s / data_s, 3),
    }))


if __name__ == "__main__":
    main()
