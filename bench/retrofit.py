"""Benchmark: does a retro-fitted GPT use its neighbours? SmolLM2-135M retro-fitted on Wikipedia,
frozen and full, each against the GPT twin continued on the same tokens.

- The database: the first ``--docs`` articles of ``../shared/data/wiki/part-003.parquet`` in
  SmolLM2's tokens (``bench/common.wiki_db``), an HNSW index, samples of ``--seq-len`` tokens whose
  neighbours come from other documents with near-copies dropped (``neighbors.max_overlap`` 0.9):
  what Retro gains here comes from related text, not from the text itself.
- Three runs on the same samples, steps and tokens (Ray Train + DeepSpeed, resumable: run the
  script again and finished or interrupted runs go on where they stopped):
  ``frozen`` (RETRO section 4.2: ``train.trainable: retrieval``, only the encoder and CCA train, at
  ``--new-lr``), ``full`` (InstructRetro: the whole model continues at ``--lr``, the encoder and
  CCA at ``--new-lr``), and ``twin`` (the GPT continued at ``--lr``, no retrieval).
- Validation perplexity every ``--eval-every`` steps (curves at equal tokens:
  ``{out}/retrofit.png``), and at the end on ``--ppl-samples`` validation samples per bucket of
  neighbour overlap (the share of a chunk's 8-grams its visible neighbours hold, as
  ``retro-ray eval`` reports leakage): ``no_overlap`` is the 0-10% bucket.

Last line: ``{"ppl_ratio": {"frozen", "full"}, "ppl_ratio_no_overlap": {"frozen", "full"}, "tokens",
"minutes", ...}``, each ratio Retro's validation perplexity over the twin's.

    python bench/retrofit.py [--docs 2782] [--steps 120] [--eval-every 20] [--out bench/out/retrofit]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, wiki_db  # noqa: E402


def curves(histories: dict[str, list[dict]], tokens_per_step: int) -> bytes:
    """Validation perplexity against training tokens of every run, and Retro over its twin, as PNG."""
    from retro_ray.core.plots import png, subplots


    fig, (ax_ppl, ax_ratio) = subplots(1, 2, figsize=(11, 4))
    points = {name: [(h["step"] * tokens_per_step, h["val_ppl"]) for h in history if "val_ppl" in h]
              for name, history in histories.items()}
    for name, xy in points.items():
        ax_ppl.plot(*zip(*xy), marker="o", label=name)
    twin = dict(points["twin"])
    for name in ("frozen", "full"):
        xy = [(x, y / twin[x]) for x, y in points[name] if x in twin]
        ax_ratio.plot(*zip(*xy), marker="o", label=f"{name} / twin")
    ax_ratio.axhline(1.0, color="grey", lw=0.8)
    ax_ppl.set(xlabel="training tokens", ylabel="validation perplexity", title="SmolLM2-135M continued")
    ax_ratio.set(xlabel="training tokens", ylabel="Retro / GPT perplexity", title="at equal tokens")
    for ax in (ax_ppl, ax_ratio):
        ax.legend()
        ax.grid(alpha=0.3)
    return png(fig)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(ROOT / "bench" / "out" / "retrofit"))
    parser.add_argument("--docs", type=int, default=2782, help="articles of part-003 (all: 2782)")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--lr", type=float, default=2e-5, help="the pretrained weights' peak learning rate")
    parser.add_argument("--new-lr", type=float, default=1e-3, help="the encoder's and CCA's peak learning rate")
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--eval-batches", type=int, default=16)
    parser.add_argument("--ppl-samples", type=int, default=64)
    args = parser.parse_args()

    import ray

    from retro_ray.evaluation import evaluate

    from retro_ray.retrieval import index, neighbors

    from retro_ray.core import layout

    from retro_ray.core.config import smollm2_gguf
    from retro_ray.core.runtime import setup_logging
    from retro_ray.core.storage import Storage
    from retro_ray.training import pretrain

    setup_logging()
    out, storage = Path(args.out), Storage()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # Ray's lines: its logs
    gguf = str(smollm2_gguf())
    start = time.time()
    cfg, db, _ = wiki_db(out / "run", args.docs, tokenizer={"path": gguf}, db={"block_size": 2048},
                         embed={"max_actors": 2})
    cfg = cfg.model_validate({
        **cfg.model_dump(),
        "index": {"factory": "HNSW32", "shards": 2, "ef_search": 128},
        "neighbors": {"seq_len": args.seq_len, "k": 2, "k_candidates": 20, "valid_fraction": 0.02,
                      "max_overlap": 0.9},
        "model": {"base": gguf},
        "train": {"micro_batch_size": args.micro_batch, "lr": args.lr, "min_lr": args.lr / 10,
                  "retrieval_lr": args.new_lr, "warmup_steps": min(10, args.steps), "max_steps": args.steps,
                  "eval_every": args.eval_every, "eval_batches": args.eval_batches,
                  "checkpoint_every": args.eval_every, "log_every": 10, "cpus_per_worker": 2},
        "eval": {"ppl_samples": args.ppl_samples, "batch_size": 4},
    })
    index.run(cfg, storage)
    neighbors.run(cfg, storage)
    db_minutes = (time.time() - start) / 60

    def run_config(name: str, **train_settings):
        return cfg.model_copy(update={"train": cfg.train.model_copy(update={"run_name": name, **train_settings})})

    runs = {"frozen": run_config("frozen", trainable="retrieval"), "full": run_config("full")}
    runs["twin"] = layout.twin(runs["full"])
    start, results = time.time(), {}
    for name, run_cfg in runs.items():
        results[name] = pretrain.run(run_cfg, storage)
    minutes = (time.time() - start) / 60
    tokens_per_step = args.micro_batch * (args.seq_len - 1)
    (out / "retrofit.png").write_bytes(curves({n: r["history"] for n, r in results.items()}, tokens_per_step))

    ppl = evaluate.perplexity(cfg, storage, {name: r["model"] for name, r in results.items()},
                              bucketed=tuple(runs))
    no_overlap = evaluate.BUCKET_NAMES[0]
    final = {name: r["history"][-1]["val_ppl"] for name, r in results.items()}
    buckets = {name: {label: b["ppl"] for label, b in ppl["buckets"][name].items()} for name in runs}
    figures = {
        "ppl_ratio": {n: round(final[n] / final["twin"], 4) for n in ("frozen", "full")},
        "ppl_ratio_no_overlap": {n: round(buckets[n][no_overlap] / buckets["twin"][no_overlap], 4)
                                 for n in ("frozen", "full")},
        "tokens": tokens_per_step * args.steps, "minutes": round(minutes, 1), "db_minutes": round(db_minutes, 1),
        "val_ppl": {n: round(v, 3) for n, v in final.items()},
        "val_ppl_samples": {n: round(v, 3) for n, v in ppl["models"].items()},
        "buckets": buckets, "bucket_tokens": {label: b["tokens"] for label, b in ppl["buckets"]["twin"].items()},
        "near_copy_share": ppl["near_copy_share"], "db_chunks": db.counts["chunks"],
        "settings": {"steps": args.steps, "seq_len": args.seq_len, "lr": args.lr, "new_lr": args.new_lr,
                     "docs": args.docs},
    }
    for name in ("frozen", "full"):
        print(f"{name}: validation perplexity {final[name]:.3f} against the twin's {final['twin']:.3f} "
              f"(ratio {figures['ppl_ratio'][name]:.4f}); with no overlap (0-10% of 8-grams) "
              f"{buckets[name][no_overlap]:.3f} against {buckets['twin'][no_overlap]:.3f} "
              f"(ratio {figures['ppl_ratio_no_overlap'][name]:.4f})")
    print(f"curves: {out / 'retrofit.png'}; {figures['tokens']} tokens a run, {minutes:.1f} minutes for the three runs")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
