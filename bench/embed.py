"""Benchmark: the Ray Data database pipeline against a bare embedding loop.

The pipeline (read, tokenise, chunk, embed, write: ``retro_ray.chunks.run``) runs on a fresh
local Ray instance in a child process, once on the full slice and once on half of it; the peak
resident memory of the child's whole process tree (driver, raylet, workers, actors) is sampled.
The baseline embeds the same chunk texts in one process with the same model, batch size and
thread count. Prints a log line per run and one JSON object as the last line.

    python bench/embed.py [--chunks 5000] [--threads 2] [--out bench/out/embed]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, WIKI, PeakRss  # noqa: E402


def config(workdir: Path, max_docs: int | None, threads: int, batch_size: int, tokenizer_path: str | None):
    from retro_ray.config import Config

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
    from retro_ray import chunks, tokenizer
    from retro_ray.runtime import init_ray, setup_logging
    from retro_ray.storage import Storage

    setup_logging()
    cfg = config(Path(args.workdir), args.max_docs, args.threads, args.batch_size, args.tokenizer)
    storage = Storage()
    init_ray(cfg)
    tokenizer.run(cfg, storage)
    start = time.time()
    manifest = chunks.run(cfg, storage, force=True)
    elapsed = time.time() - start
    print(json.dumps({"chunks": manifest.counts["chunks"], "seconds": elapsed}))


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

    from retro_ray.embed import Embedder

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
    parser.add_argument("--out", default=str(ROOT / "bench" / "out" / "embed"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--max-docs", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return run_pipeline_child(args)

    out = Path(args.out)
    # One tokenizer (BPE trained on the slice) shared by both pipeline runs.
    from retro_ray import tokenizer
    from retro_ray.runtime import init_ray, setup_logging
    from retro_ray.storage import Storage

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
    print(json.dumps({
        "chunks": full["chunks"],
        "pipeline_chunks_per_s": round(pipeline_rate, 2),
        "baseline_chunks_per_s": round(baseline_rate, 2),
        "ratio": round(pipeline_rate / baseline_rate, 3),
        "peak_rss_mb": round(peak),
        "peak_rss_mb_half": round(peak_half),
    }))


if __name__ == "__main__":
    main()
