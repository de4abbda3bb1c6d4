"""Benchmark: zero-shot QA of InstructRetro against its GPT twin, on SmolLM2-135M-Instruct.

Runs ``configs/smollm2-instruct.yaml`` end to end (tokenizer, db, index, neighbours, pretrain of
Retro and of the GPT twin on the same samples, instruction tuning of both, eval) in
``--workdir``; finished stages are kept, so a second run only evaluates again. Then prints the
QA table (EM / F1 per model and dataset), the tokens each model was trained on and the seconds
per question. Last line: one JSON object
``{"datasets": {NAME: {MODEL: {"em", "f1", "n"}}}, "tokens": {...}, ...}``.

    python bench/qa.py [--questions 300] [--workdir bench/out/qa-smollm2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--questions", type=int, default=300, help="per dataset (CPU: at least 300)")
    parser.add_argument("--workdir", default=str(ROOT / "bench" / "out" / "qa-smollm2"))
    parser.add_argument("--config", default=str(ROOT / "configs" / "smollm2-instruct.yaml"))
    args = parser.parse_args()
    os.chdir(ROOT)  # the config's data paths are relative to the repository root

    from retro_ray.config import load_config
    from retro_ray.evaluate import qa_markdown
    from retro_ray.pipeline import run_pipeline
    from retro_ray.preflight import check_config
    from retro_ray.runtime import init_ray, setup_logging
    from retro_ray.storage import Storage, join

    setup_logging()
    cfg = load_config(args.config, [f"workdir={args.workdir}"])
    cfg.eval.qa = [q.model_copy(update={"max_questions": args.questions}) for q in cfg.eval.qa]
    check_config(cfg)
    storage = Storage(cfg.storage)
    init_ray(cfg, None)
    start = time.time()
    run_pipeline(cfg, storage)
    wall = time.time() - start

    report = storage.read_json(join(cfg.workdir, "eval", "qa.json"))
    ppl = storage.read_json(join(cfg.workdir, "eval", "ppl.json"))

    def trained(run: str) -> int:
        history = storage.read_json(join(cfg.workdir, "checkpoints", run, "history.json"))
        return int(history[-1].get("tokens", 0))

    name = cfg.train.run_name
    pre = {"retro": trained(name), "gpt": trained(f"{name}-gpt")}
    tuned = {"retro": trained(f"{name}-instruct"), "gpt": trained(f"{name}-gpt-instruct")}
    tokens = {"gpt": pre["gpt"] + tuned["gpt"], "gpt_rag": pre["gpt"] + tuned["gpt"],
              "retro_decoder_only": pre["retro"] + tuned["retro"], "retro_encoder": pre["retro"] + tuned["retro"],
              "base_rag": 0, "pretrain": pre, "instruct": tuned}
    print(qa_markdown(report))
    print(f"tokens trained (pretrain + instruct): {json.dumps(tokens)}")
    print(f"seconds per question: {json.dumps(report['seconds_per_question'])}")
    print(f"validation perplexity: {json.dumps(ppl['models'])}; by overlap: {json.dumps(ppl['buckets'])}")
    print(json.dumps({"datasets": report["datasets"], "tokens": tokens,
                      "seconds_per_question": report["seconds_per_question"], "rows": report["rows"],
                      "database": report["database"], "ppl": ppl["models"], "ppl_buckets": ppl["buckets"],
                      "near_copy_share": ppl["near_copy_share"], "wall_s": round(wall, 1)}))


if __name__ == "__main__":
    main()
