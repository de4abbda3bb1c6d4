"""Benchmark: generation with retrieval, KV cache against full recomputation, Retro against its GPT twin.

Two models, each with its own database and index:

- the pipeline's own Retro (6 layers, width 256; ``retro-ray pipeline`` is run first when
  ``--workdir`` has no trained model), on its database of the embedded Python docs;
- SmolLM2-135M-Instruct (GGUF) retro-fitted (CCA after layers 9, 12, ..., 30), on a database of the
  same corpus tokenised with SmolLM2's own tokenizer (tokenizer, db and index stages).

For each: greedy decoding of ``--new-tokens`` tokens (end of text ignored, so every run decodes
the same count) from one prompt with the KV cache and with full recomputation (the same tokens
are checked), the same model decoder-only (encoder dropped: the GPT twin, same weights
otherwise; ``--pairs`` pairs of runs, which of the two goes first alternating, and the median of
the pairs' ratios: a VM's speed drifts between runs by more than the gap between them), the
share of time spent in retrieval (embed + search + read) and in encoding the neighbours, a batch
of 8 prompts together, and the LM head at 1, 8 and 32 sampled positions
(``head_ms``: ``F.linear`` against the product the engine measured faster), and one layer's decode
attention for 1, 8 and 32 rows (``attention_ms``: per-row SDPA against the engine's, the compiled
kernel on a CPU), and the median decode step with 1, 8 and 32 sequences together, with retrieval
and without (``step_ms_by_rows``: what a row adds to a step). Last line: one JSON object.

    python bench/generate.py [--workdir runs/tiny] [--config configs/tiny.yaml] [--new-tokens 256] [--pairs 5]
                             [--no-smollm2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, TINY, db_prompts, step_profile  # noqa: E402

from retro_ray.core.config import load_config, smollm2_gguf  # noqa: E402
from retro_ray.core.layout import model_dir  # noqa: E402
from retro_ray.core.storage import Storage, join  # noqa: E402
from retro_ray.serving.generate import Generator, SamplingParams, run_generator  # noqa: E402


def cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "retro_ray.cli", *args], check=True, cwd=ROOT)


def timed(gen: Generator, prompts: list[str], params: SamplingParams, mode: str) -> tuple[list, float, dict]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = gen.generate(prompts, params, mode=mode)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start, dict(gen.last_timings)


def measure(name: str, gen: Generator, new_tokens: int, pairs: int) -> dict:
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    prompts = db_prompts(gen.retriever.chunk_texts, len(gen.retriever.store), 8)
    gen.generate(prompts[:1], SamplingParams(max_new_tokens=8, ignore_eos=True))  # warm-up
    runs: dict[str, list] = {"encoder": [], "off": []}
    for i in range(pairs):  # Retro first, then its twin first: a slow phase of the machine falls on both
        for mode in ("encoder", "off") if i % 2 == 0 else ("off", "encoder"):
            runs[mode].append(timed(gen, prompts[:1], params, mode))
    (_, retro_s, timings), (_, gpt_s, _) = (sorted(runs[mode], key=lambda r: r[1])[pairs // 2] for mode in runs)
    [retro], [gpt] = runs["encoder"][0][0], runs["off"][0][0]
    ratios = [round(o[1] / e[1], 3) for e, o in zip(runs["encoder"], runs["off"])]  # twin's time over Retro's
    gen.use_cache = False
    [full], full_s, _ = timed(gen, prompts[:1], params, "encoder")
    gen.use_cache = True
    batch, batch_s, _ = timed(gen, prompts, params, "encoder")
    profiles = {mode: decode_profile(gen, prompts[0], mode) for mode in ("encoder", "off")}
    result = {
        "prompt_tokens": retro.prompt_tokens,
        "new_tokens": len(retro.tokens),
        "chunks_retrieved": len(retro.retrieved),
        "kv_tokens_per_s": round(len(retro.tokens) / retro_s, 1),
        "recompute_tokens_per_s": round(len(full.tokens) / full_s, 1),
        "kv_speedup": round(full_s / retro_s, 2),
        "same_tokens": retro.tokens == full.tokens,
        "retro_tokens_per_s": round(len(retro.tokens) / retro_s, 1),
        "gpt_tokens_per_s": round(len(gpt.tokens) / gpt_s, 1),
        "retro_vs_gpt": round(statistics.median(ratios), 3),
        "retro_vs_gpt_pairs": ratios,
        "retrieval_share": round((timings["retrieve_s"] + timings["encode_s"]) / retro_s, 3),
        "retrieve_s": round(timings["retrieve_s"], 3),
        "encode_s": round(timings["encode_s"], 3),
        "batch8_tokens_per_s": round(sum(len(o.tokens) for o in batch) / batch_s, 1),
        "decode_step_ms": {mode: p.pop("step_ms") for mode, p in profiles.items()},
        "decode_profile": profiles,
        "step_ms_by_rows": steps_by_rows(gen, prompts),
        "head_ms": head_products(gen.model),
        "attention_ms": attention_products(gen.model),
    }
    print(f"{name}: {json.dumps(result)}", flush=True)
    print(f"{name}: continuation of prompt 0: {retro.text[:200]!r}", flush=True)
    return result


def decode_profile(gen: Generator, prompt: str, mode: str, steps: int = 32) -> dict:
    """Where one stream's decode steps spend their time (``common.step_profile``), in ``mode``
    (``encoder``: retrieval for every completed chunk; ``off``: the decoder alone), and the mean
    step in milliseconds."""
    engine = decoding(gen, [prompt], mode, 2 * steps + 1)  # the profiled run is a second one
    shares = step_profile(engine, lambda: [engine.step() for _ in range(steps)])
    shares["step_ms"] = round(1000 * shares.pop("seconds") / steps, 2)
    engine.close()
    return shares


def steps_by_rows(gen: Generator, prompts: list[str], rows: tuple[int, ...] = (1, 8, 32), steps: int = 16) -> dict:
    """The median decode step in milliseconds with 1, 8 and 32 sequences decoding together (the
    prompts repeated), with retrieval (``encoder``) and without (``off``): what a row adds to a
    step, which bounds what continuous batching can gain over static batches on this machine."""
    out: dict[str, dict[str, float]] = {"encoder": {}, "off": {}}
    for n in rows:
        for mode in out:
            engine = decoding(gen, [prompts[i % len(prompts)] for i in range(n)], mode, steps + 1)
            times = []
            for _ in range(steps):
                start = time.perf_counter()
                engine.step()
                times.append(time.perf_counter() - start)
            engine.close()
            out[mode][str(n)] = round(1000 * statistics.median(times), 1)
    return out


def decoding(gen: Generator, prompts: list[str], mode: str, new_tokens: int):
    """An engine with ``prompts`` admitted and prefilled, each with room for ``new_tokens`` more:
    from here on every step decodes every sequence. A prompt with no complete chunk starts
    decoding while the others wait for their neighbours: four chunks more of room keep it running."""
    from retro_ray.serving.engine import Engine, EngineConfig, Request

    room = new_tokens + (4 * gen.model.cfg.chunk_length if len(prompts) > 1 else 0)
    params = SamplingParams(max_new_tokens=room, ignore_eos=True)
    reqs = [Request(gen.encode_prompt(p, params), params, retrieve=mode == "encoder") for p in prompts]
    engine = Engine(gen.model, gen.tokenizer, gen.retriever, device=gen.device,
                    config=EngineConfig(kv_tokens=sum(len(r.ids) + room for r in reqs), max_seqs=len(reqs),
                                        prefill_tokens=sum(len(r.ids) for r in reqs)))
    for req in reqs:
        engine.add(req)
    running = engine.scheduler.running
    while engine.stats.admitted < len(reqs) or any(seq.fed < len(seq.req.ids) for seq in running):
        engine.step()
    return engine


def synced(product):
    """``product`` as a call that ends with the device idle, so the next one's clock starts there."""
    def run():
        product()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    return run


def head_products(model, repeats: int = 5) -> dict[str, list[float]]:
    """The LM head at 1, 8 and 32 sampled positions: milliseconds (best of ``repeats``) of
    ``F.linear`` and of ``sampled_logits`` (the engine's: the product it measured faster)."""
    from retro_ray.model.retro import Retro, best_of, sampled_logits

    head = model.lm_head if isinstance(model, Retro) else model.base.get_output_embeddings()
    out = {}
    with torch.inference_mode():
        for positions in (1, 8, 32):
            x = torch.randn(1, positions, head.in_features, dtype=head.weight.dtype, device=head.weight.device)
            products = (lambda: torch.nn.functional.linear(x, head.weight).argmax(-1),
                        lambda: sampled_logits(head, x).argmax(-1))
            out[str(positions)] = [round(1000 * best_of(synced(p), repeats), 2) for p in products]
    return out


def attention_products(model, keys: int = 300, repeats: int = 5) -> dict[str, list[float]]:
    """One layer's decode attention at the model's heads, for 1, 8 and 32 rows of ``keys`` keys
    each: milliseconds (best of ``repeats``) of per-row SDPA and of the engine's cache (the
    compiled kernel on a CPU where it is built, else the same SDPA)."""
    from retro_ray.model.retro import Retro, best_of
    from retro_ray.serving import kernels
    from retro_ray.serving.memory import KVCache, PassLayout, Segment

    if isinstance(model, Retro):
        h = h_kv = model.cfg.n_heads
        e = model.cfg.d_model // h
    else:
        c = model.base.config
        h = c.num_attention_heads
        h_kv, e = getattr(c, "num_key_value_heads", None) or h, getattr(c, "head_dim", None) or c.hidden_size // h
    weight = next(model.parameters())
    ours = kernels.decode_attention() if weight.device.type == "cpu" else None
    out = {}
    with torch.inference_mode():
        for rows in (1, 8, 32):
            history = PassLayout([Segment(i * keys, keys, i * keys, 0) for i in range(rows)], weight.device)
            layout = PassLayout([Segment(i, 1, i * keys, keys - 1) for i in range(rows)], weight.device)
            kv = [torch.randn(1, h_kv, rows * keys, e, dtype=weight.dtype, device=weight.device) for _ in range(2)]
            q = torch.randn(1, h, rows, e, dtype=weight.dtype, device=weight.device)
            out[str(rows)] = []
            for kernel in (None, ours):
                cache = KVCache(rows * keys, weight.device)
                cache.kernel = kernel
                cache.write(0, *kv, history)
                out[str(rows)].append(round(1000 * best_of(synced(lambda: cache.attend(0, q, layout)), repeats), 3))
    return out


def smollm2_generator(workdir: Path) -> Generator:
    """SmolLM2 retro-fitted, over a database of the embedded corpus in SmolLM2's tokens."""
    from retro_ray.database.tokenizer import load_run_tokenizer
    from retro_ray.model.retrofit import RetroFit, load_causal_lm, retrofit_config
    from retro_ray.retrieval.retriever import run_retriever

    gguf = str(smollm2_gguf())
    sets = ["--set", f"workdir={workdir}", "--set", f"tokenizer.path={gguf}"]
    for stage in ("tokenizer", "db", "index"):
        cli(stage, "--config", str(TINY), *sets)
    cfg = load_config(TINY, sets[1::2])
    storage = Storage(cfg.storage)
    base = load_causal_lm(gguf)
    model = RetroFit(base, retrofit_config(base, chunk_length=cfg.db.chunk_length, k=cfg.neighbors.k))
    with torch.no_grad():  # a trained-looking CCA: the zero init would cost the same but change nothing
        for cca in model.cca.values():
            torch.nn.init.normal_(cca.attn.out.weight, std=0.02)
    return Generator(model, load_run_tokenizer(cfg, storage), run_retriever(cfg, storage))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "tiny"))
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--pairs", type=int, default=5, help="alternating runs of Retro and its twin (medians)")
    parser.add_argument("--no-smollm2", action="store_true")
    parser.add_argument("--config", default=str(TINY), help="the config of the run in --workdir")
    args = parser.parse_args()
    if args.pairs < 1:
        parser.error(f"--pairs {args.pairs}: at least one pair of runs")
    cfg = load_config(args.config, [f"workdir={args.workdir}"])
    storage = Storage(cfg.storage)
    if not storage.exists(join(model_dir(cfg), "config.json")):
        cli("pipeline", "--config", args.config, "--set", f"workdir={args.workdir}")
    results = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "torch_threads": torch.get_num_threads()}
    results["retro"] = measure("retro (pipeline model)", run_generator(cfg, storage), args.new_tokens, args.pairs)
    if not args.no_smollm2:
        results["smollm2"] = measure("smollm2 retro-fit", smollm2_generator(ROOT / "bench" / "out" / "generate-smollm2"),
                                     args.new_tokens, args.pairs)
    head = results["retro"]
    print(json.dumps({key: head[key] for key in ("kv_speedup", "retro_tokens_per_s", "gpt_tokens_per_s",
                                                 "retro_vs_gpt", "retrieval_share", "batch8_tokens_per_s")}
                     | {"same_tokens": head["same_tokens"], "smollm2": results.get("smollm2"),
                        "device": results["device"], "torch_threads": results["torch_threads"]}))


if __name__ == "__main__":
    main()
