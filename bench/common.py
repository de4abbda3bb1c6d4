"""Helpers shared by the benchmarks."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
WIKI = ROOT.parent / "shared" / "data" / "wiki" / "part-003.parquet"
TINY = ROOT / "configs" / "tiny.yaml"
"""The library's defaults: the small from-scratch Retro that the generation and serving benchmarks measure."""


def wiki_db(workdir: Path, docs: int, fresh: bool = False, **sections):
    """The tokenizer and chunk database of the first ``docs`` Wikipedia articles, in Parquet row
    groups of 20 (the units the chunk pass reads in parallel), built under ``workdir`` unless it
    is there already (``fresh``: always rebuilt); extra config ``sections`` override. Returns
    (config, db manifest, seconds the db stage took)."""
    import shutil
    import time

    import pyarrow.parquet as pq

    from retro_ray.core.config import Config
    from retro_ray.core.storage import Storage
    from retro_ray.database import chunks, tokenizer

    workdir.mkdir(parents=True, exist_ok=True)
    corpus = workdir / f"wiki-{docs}.parquet"
    if not corpus.exists():
        pq.write_table(pq.read_table(WIKI, columns=["text"]).slice(0, docs), corpus, row_group_size=20)
    if fresh:
        shutil.rmtree(workdir / "db", ignore_errors=True)
    data = {"workdir": str(workdir), "corpus": {"sources": [{"name": "wiki", "paths": [str(corpus)]}]},
            "tokenizer": {"train_docs": 2000}, "embed": {"batch_size": 64, "min_actors": 1, "max_actors": 1}}
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    cfg = Config.model_validate(data)
    tokenizer.run(cfg, Storage())
    start = time.time()
    manifest = chunks.run(cfg, Storage())
    return cfg, manifest, time.time() - start


def tree_rss_mb(pid: int) -> float:
    """Resident memory of process ``pid`` and all its descendants (Ray's raylet, workers...)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def db_prompts(texts, chunks: int, n: int) -> list[str]:
    """n prompts of two consecutive database chunks each, spread over a database of ``chunks``
    chunks whose texts ``texts`` (a ``ChunkTexts``) reads."""
    import numpy as np

    ids = np.linspace(0, chunks - 3, n).astype(int)
    found = texts.get(np.concatenate([ids, ids + 1]))
    return [found[int(c)] + found[int(c) + 1] for c in ids]


class PeakRss:
    """Samples the resident memory of a process tree (default: this one) in the background."""

    def __init__(self, pid: int | None = None, interval_s: float = 1.0):
        self.pid, self.interval_s, self.peak = pid or os.getpid(), interval_s, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, tree_rss_mb(self.pid))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak


COPY_OPS = ("aten::copy_", "aten::index_copy_", "aten::index", "aten::index_select", "aten::gather", "aten::cat",
            "aten::stack", "aten::clone", "aten::_to_copy", "aten::index_put_", "aten::_index_put_impl_",
            "aten::masked_scatter_", "aten::repeat", "aten::contiguous")
"""Operators that move data rather than compute: the engine's copies of its cache and state."""


def step_profile(engine, run) -> dict[str, float]:
    """Where the time of ``run()`` (engine steps) goes, as shares of its wall time, measured
    without a profiler (whose per-operator cost would swamp a decode step's): ``model`` (the
    runner's passes, ``EngineStats.model_s``), ``copies`` (of that, the operators in ``COPY_OPS``:
    their share of all operators' self time in a second, profiled ``run()``, times ``model``),
    ``stream`` (handing each step's news to its request, ``EngineStats.notify_s``) and ``other``
    (scheduling, retrieval bookkeeping, Python between them); ``seconds``: the unprofiled run's."""
    import time

    from torch.profiler import ProfilerActivity, profile

    stats = engine.stats
    model, stream, start = stats.model_s, stats.notify_s, time.perf_counter()
    run()
    wall = time.perf_counter() - start
    shares = {"model": (stats.model_s - model) / wall, "stream": (stats.notify_s - stream) / wall}
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    ops = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    copied = sum(e.self_cpu_time_total for e in ops if e.key in COPY_OPS)
    shares["copies"] = shares["model"] * copied / max(1e-9, sum(e.self_cpu_time_total for e in ops))
    shares["model"] -= shares["copies"]
    shares["other"] = max(0.0, 1.0 - sum(shares.values()))
    return {k: round(v, 3) for k, v in shares.items()} | {"seconds": round(wall, 3)}
