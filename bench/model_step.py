"""Benchmark: one training step (forward, backward, AdamW) of Retro against the GPT baseline of the
same decoder, without Ray or DeepSpeed: the model's own cost, on CUDA in bf16 when present.

Runs where Ray is not installed (the GPU machine). Both models step in turn on the same random
batch (step time does not depend on token values). Reports the median step time, tokens/s, the
FLOPs of a step as torch's ``FlopCounterMode`` counts them (matmuls and attention; causal attention
counted in full), achieved TFLOP/s and model FLOPs utilisation against the card's dense bf16 peak
(known cards, or ``--peak-tflops``). Last line: one JSON object.

    python bench/model_step.py                        # CPU size: 6 x 256, d' 64
    python bench/model_step.py --layers 24 --d-model 1024 --heads 16 --encoder-d-model 256 \\
        --seq-len 2048 --micro-batch 8 --vocab 32000  # GPU size
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from retro_ray.model import Retro, RetroConfig  # noqa: E402

PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "A100": 312.0}
"""Dense bf16 tensor-core peaks from the vendor's data sheets (SXM unless named)."""


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf for card, tf in PEAK_BF16_TFLOPS.items() if card in name), None)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--encoder-d-model", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's peak, if not a known card")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    torch.manual_seed(0)
    shape = dict(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                 max_seq_len=args.seq_len, encoder_d_model=args.encoder_d_model)
    b, n = args.micro_batch, args.seq_len
    tokens = torch.randint(0, args.vocab, (b, n + 1), device=device)  # [b, n + 1]
    models = {"gpt": Retro(RetroConfig(retrieval=False, **shape)).to(device),
              "retro": Retro(RetroConfig(**shape)).to(device)}
    cfg = models["retro"].cfg
    neighbors = torch.randint(0, args.vocab, (b, n // cfg.chunk_length, cfg.k, cfg.neighbor_len), device=device)
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-4, fused=device.type == "cuda")
                  for name, m in models.items()}

    def step(name: str) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            _, loss = models[name](tokens[:, :-1], neighbors if name == "retro" else None, None, tokens[:, 1:])
        loss.backward()
        optimizers[name].step()
        optimizers[name].zero_grad(set_to_none=True)

    flops = {}
    for name in models:
        with FlopCounterMode(display=False) as counter:
            step(name)
        flops[name] = counter.get_total_flops()
    for _ in range(args.warmup):
        for name in models:
            step(name)
    times = {name: [] for name in models}
    for _ in range(args.steps):
        for name in models:  # in turn, so both see the same machine load
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step(name)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)

    peak = args.peak_tflops or peak_tflops(device)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "dtype": "bf16" if bf16 else "fp32", "layers": args.layers, "d_model": args.d_model,
              "encoder_d_model": args.encoder_d_model, "tokens_per_step": b * n}
    for name, model in models.items():
        step_s = statistics.median(times[name])
        tflops = flops[name] / step_s / 1e12
        result.update({f"params_{name}": model.num_params(), f"{name}_step_s": round(step_s, 4),
                       f"{name}_tokens_per_s": round(b * n / step_s), f"{name}_tflops": round(tflops, 3),
                       f"{name}_mfu": round(tflops / peak, 4) if peak else None})
    result["step_ratio"] = round(result["retro_step_s"] / result["gpt_step_s"], 3)
    result["flops_ratio"] = round(flops["retro"] / flops["gpt"], 3)
    result["peak_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
                                  else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(f"{result['device']} {result['dtype']}: GPT {result['gpt_step_s']:.4f} s/step, Retro "
          f"{result['retro_step_s']:.4f} s/step (ratio {result['step_ratio']:.2f}, FLOPs ratio "
          f"{result['flops_ratio']:.2f}); MFU {result['gpt_mfu']} vs {result['retro_mfu']}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
