"""Benchmark: Retro against the GPT baseline of the same decoder, same samples, steps and tokens.

Builds (once, then reuses) a chunk database of ``--docs`` Wikipedia articles under ``--out``,
indexes it, retrieves neighbours for ``--seq-len``-token samples (same-document neighbours
excluded), then ``retro_ray.training.pretrain.compare`` trains both models with Ray Train + DeepSpeed.
Reports step time (median after warm-up), tokens/s, peak memory of the process tree and the
validation perplexity of each. Last line: one JSON object.

    python bench/train.py [--docs 1000] [--steps 100] [--seq-len 512] [--d-model 256] [--layers 6]
                          [--encoder-d-model 64] [--out bench/out/train]

The encoder is d' = 64 wide by default: at full width (Megatron's choice, ``--encoder-d-model
256``) its two layers over k r = 4 m tokens per chunk cost as much as the 6-layer decoder.
``bench/model_step.py`` measures the model's step alone, without Ray (and on a GPU).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, PeakRss, wiki_db  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(ROOT / "bench" / "out" / "train"))
    parser.add_argument("--docs", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--encoder-d-model", type=int, default=64)
    args = parser.parse_args()

    import ray

    from retro_ray.retrieval import index, neighbors

    from retro_ray.core import layout

    from retro_ray.database import tokenizer

    from retro_ray.core.runtime import setup_logging
    from retro_ray.core.storage import Storage
    from retro_ray.training import pretrain

    setup_logging()
    rss = PeakRss()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # Ray's lines: its logs
    cfg, _, _ = wiki_db(Path(args.out) / "run", args.docs)
    cfg = cfg.model_validate({
        **cfg.model_dump(),
        "index": {"factory": "HNSW32", "shards": 2, "ef_search": 128},
        "neighbors": {"seq_len": args.seq_len, "k": 2, "k_candidates": 20, "valid_fraction": 0.05},
        "model": {"d_model": args.d_model, "n_layers": args.layers, "n_heads": 8, "encoder_layers": 2,
                  "encoder_d_model": args.encoder_d_model},
        "train": {"run_name": "bench", "max_steps": args.steps, "micro_batch_size": args.micro_batch,
                  "lr": 1e-3, "min_lr": 1e-4, "warmup_steps": min(10, args.steps), "eval_every": args.steps,
                  "checkpoint_every": args.steps, "eval_batches": 16, "log_every": 10, "cpus_per_worker": 2},
    })
    storage = Storage()
    index.run(cfg, storage, force=True)  # the index and samples are the benchmark's own: always fresh
    neighbors.run(cfg, storage, force=True)
    table = pretrain.compare(cfg, storage, force=True)

    def step_s(name: str) -> float:
        history = storage.read_json(f"{layout.run_dir(layout.pretrained_runs(cfg)[name])}/history.json")
        return float(np.median([h["step_s"] for h in history[min(5, len(history) - 1):]]))

    vocab = len(tokenizer.load_run_tokenizer(cfg, storage))
    params = {}
    for name, retrieval in (("gpt", False), ("retro", True)):
        run_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"retrieval": retrieval})})
        params[name] = pretrain.build_model(run_cfg, vocab, args.seq_len).num_params()
    gpt_s, retro_s = step_s("gpt"), step_s("retro")
    tokens_per_step = args.micro_batch * (args.seq_len - 1)
    peak = rss.stop()
    print(f"GPT {params['gpt'] / 1e6:.2f} M params, {gpt_s:.3f} s/step; Retro {params['retro'] / 1e6:.2f} M, "
          f"{retro_s:.3f} s/step (ratio {retro_s / gpt_s:.2f}); val ppl {table['gpt']['val_ppl']:.2f} vs "
          f"{table['retro']['val_ppl']:.2f} (ratio {table['ppl_ratio']:.3f})")
    print(json.dumps({
        "params_gpt": params["gpt"], "params_retro": params["retro"], "encoder_d_model": args.encoder_d_model,
        "gpt_step_s": round(gpt_s, 4), "retro_step_s": round(retro_s, 4), "step_ratio": round(retro_s / gpt_s, 3),
        "tokens": tokens_per_step * args.steps, "gpt_tokens_per_s": round(tokens_per_step / gpt_s),
        "retro_tokens_per_s": round(tokens_per_step / retro_s),
        "gpt_val_ppl": round(table["gpt"]["val_ppl"], 3), "retro_val_ppl": round(table["retro"]["val_ppl"], 3),
        "ppl_ratio": round(table["ppl_ratio"], 4), "peak_rss_mb": round(peak),
    }))


if __name__ == "__main__":
    main()
