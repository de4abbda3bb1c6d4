"""Benchmark: the Serve app under 1, 8 and 32 concurrent clients, against the generator in one process.

On the pipeline's own Retro (``retro-ray pipeline`` is run first when ``--workdir`` has no model),
served on 127.0.0.1 with one replica per deployment (no autoscaling: the figures are one
replica's). Every client sends a fixed number of streaming completion requests (greedy,
retrieval through the encoder, prompts of two database chunks); every request has a timeout and
the answers are checked equal to the direct ones.

(a) per concurrency: p50 and p99 latency, requests/s, time to first token, failed requests;
(b) the same 8-client requests made to a ``Generator`` in this process, in batches of 8 (what
    ``@serve.batch`` gathers): ``serve_overhead`` = direct requests/s / Serve's at 8 clients
    with whole answers (``stream: false``, as the direct call returns them);
    ``serve_overhead_streaming`` against the streaming clients of (a);
(c) ``@serve.batch`` off (max_batch_size 1) at 8 clients: ``batch_gain`` = on / off requests/s.

Last line: one JSON object.

    python bench/serve.py [--workdir runs/tiny] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, TINY, db_prompts  # noqa: E402

from retro_ray.config import load_config  # noqa: E402
from retro_ray.storage import Storage, join  # noqa: E402
from retro_ray.layout import model_dir  # noqa: E402

REQUESTS_PER_CLIENT = {1: 8, 8: 4, 32: 2}
TIMEOUT_S = 300
GENERATOR_CPUS = 2


def prompts(cfg, storage, n: int) -> list[str]:
    """n prompts of two consecutive chunks each, from the run's database."""
    from retro_ray.dbfiles import ChunkTexts, finished_db
    from retro_ray.layout import db_dir

    db = finished_db(cfg, storage)
    return db_prompts(ChunkTexts(storage, db_dir(cfg), sorted(db.blocks)), db.counts["chunks"], n)


def deploy(cfg, max_batch_size: int, port: int) -> str:
    from ray import serve

    from retro_ray.serve import build

    cfg = cfg.model_copy(update={"serve": cfg.serve.model_copy(update={"max_batch_size": max_batch_size})})
    options = {"Ingress": {"num_replicas": 1, "max_ongoing_requests": 64, "ray_actor_options": {"num_cpus": 0}},
               "Generator": {"num_replicas": 1, "max_ongoing_requests": 2 * max_batch_size,
                             "ray_actor_options": {"num_cpus": GENERATOR_CPUS}},
               "Retriever": {"num_replicas": 1, "max_ongoing_requests": 16,  # its embedder: as many threads
                             "ray_actor_options": {"num_cpus": GENERATOR_CPUS}}}
    serve.run(build(cfg, options), name="retro", route_prefix="/")
    return f"http://127.0.0.1:{port}/v1"


def load(url: str, model: str, texts: list[str], clients: int, per_client: int, max_tokens: int,
         stream: bool = True) -> dict:
    """``clients`` threads, each sending ``per_client`` completion requests one after another
    (streaming: server-sent events read as they come). A plain HTTP client, so that the clients'
    own parsing takes as little as possible of the cores the server runs on."""
    import requests

    session = requests.Session()
    session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=clients))

    def one(i: int) -> dict:
        body = {"model": model, "prompt": texts[i % len(texts)], "max_tokens": max_tokens, "temperature": 0,
                "stream": stream, "retrieval": "encoder"}
        start, first, text = time.perf_counter(), None, []
        try:
            with session.post(f"{url}/completions", json=body, stream=stream, timeout=TIMEOUT_S) as r:
                if r.status_code != 200:
                    return {"i": i, "failed": f"HTTP {r.status_code}: {r.text[:200]}"}
                if not stream:
                    first = time.perf_counter()
                    text.append(r.json()["choices"][0]["text"])
                for line in r.iter_lines(decode_unicode=True) if stream else ():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    choices = json.loads(line[6:])["choices"]
                    if choices and choices[0]["text"]:
                        first = first or time.perf_counter()
                        text.append(choices[0]["text"])
        except requests.RequestException as e:
            return {"i": i, "failed": f"{type(e).__name__}: {e}"}
        end = time.perf_counter()
        return {"i": i, "latency": end - start, "ttft": (first or end) - start, "text": "".join(text)}

    def client_loop(c: int) -> list[dict]:
        return [one(c * per_client + r) for r in range(per_client)]

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for rows in pool.map(client_loop, range(clients)) for r in rows]
    wall = time.perf_counter() - start
    ok = [r for r in results if "failed" not in r]
    lat = np.array([r["latency"] for r in ok]) * 1000
    out = {"p50_ms": round(float(np.percentile(lat, 50)), 1) if ok else None,
           "p99_ms": round(float(np.percentile(lat, 99)), 1) if ok else None,
           "rps": round(len(ok) / wall, 3),
           "ttft_ms": round(float(np.median([r["ttft"] for r in ok])) * 1000, 1) if ok else None,
           "failed": len(results) - len(ok), "requests": len(results), "wall_s": round(wall, 2)}
    failures = [r["failed"] for r in results if "failed" in r][:3]
    print(f"serve: {clients} clients{'' if stream else ' (not streaming)'}: {json.dumps(out)}"
          f"{' failures: ' + str(failures) if failures else ''}", flush=True)
    out["_texts"] = {r["i"]: r["text"] for r in ok}
    return out


def direct(cfg, storage, texts: list[str], n: int, batch: int, max_tokens: int) -> tuple[float, dict[int, str]]:
    """The same requests through a Generator in this process, ``batch`` at a time -> (requests/s, texts)."""
    import torch

    from retro_ray.generate import SamplingParams, model_path, run_generator

    torch.set_num_threads(GENERATOR_CPUS)
    gen = run_generator(cfg, storage, model_path(cfg, storage))
    params = SamplingParams(max_new_tokens=max_tokens)
    gen.generate(texts[:1], SamplingParams(max_new_tokens=4))  # warm-up
    out, start = {}, time.perf_counter()
    for s in range(0, n, batch):
        ids = list(range(s, min(n, s + batch)))
        for i, g in zip(ids, gen.generate([texts[i % len(texts)] for i in ids], params, mode="encoder")):
            out[i] = g.text
    rps = n / (time.perf_counter() - start)
    print(f"direct: {n} requests in batches of {batch}: {rps:.3f} requests/s "
          f"(torch threads {torch.get_num_threads()})", flush=True)
    return rps, out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "tiny"))
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--port", type=int, default=8471)
    args = parser.parse_args()
    import ray
    from ray import serve

    from retro_ray.serve import _model_name
    from retro_ray.generate import model_path

    cfg = load_config(TINY, [f"workdir={args.workdir}"])
    storage = Storage(cfg.storage)
    if not storage.exists(join(model_dir(cfg), "config.json")):
        subprocess.run([sys.executable, "-m", "retro_ray.cli", "pipeline", "--config", str(TINY), "--set", f"workdir={args.workdir}"],
                       check=True, cwd=ROOT)
    model = _model_name(model_path(cfg, storage))
    texts = prompts(cfg, storage, 64)
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    results: dict = {"concurrency": {}}
    try:
        url = deploy(cfg, cfg.serve.max_batch_size, args.port)
        load(url, model, texts, 2, 1, 4)  # warm-up
        for clients, per_client in REQUESTS_PER_CLIENT.items():
            results["concurrency"][clients] = load(url, model, texts, clients, per_client, args.max_tokens)
        whole = load(url, model, texts, 8, REQUESTS_PER_CLIENT[8], args.max_tokens, stream=False)
        serve.delete("retro")
        url = deploy(cfg, 1, args.port)
        load(url, model, texts, 2, 1, 4)
        unbatched = load(url, model, texts, 8, REQUESTS_PER_CLIENT[8], args.max_tokens)
    finally:
        serve.shutdown()
        ray.shutdown()
    eight = results["concurrency"][8]
    direct_rps, direct_texts = direct(cfg, storage, texts, eight["requests"], cfg.serve.max_batch_size, args.max_tokens)
    same = sum(whole["_texts"].get(i) == t == eight["_texts"].get(i) for i, t in direct_texts.items())
    for row in (*results["concurrency"].values(), unbatched):
        row.pop("_texts")
    results.update({
        "serve_overhead": round(direct_rps / whole["rps"], 3),
        "serve_overhead_streaming": round(direct_rps / eight["rps"], 3),
        "batch_gain": round(eight["rps"] / unbatched["rps"], 3),
        "direct_rps": round(direct_rps, 3), "unbatched_rps": unbatched["rps"],
        "same_text_as_direct": round(same / len(direct_texts), 3), "max_tokens": args.max_tokens, "model": model,
        "max_batch_size": cfg.serve.max_batch_size, "generator_cpus": GENERATOR_CPUS})
    print(json.dumps(results))


if __name__ == "__main__":
    main()
