"""The stages in order, and the composite ``pipeline`` that runs them all."""

from __future__ import annotations

import json
import urllib.request
from typing import Callable

from retro_ray.core.config import Config
from retro_ray.core.layout import eval_dir
from retro_ray.core.runtime import log
from retro_ray.core.storage import Storage, join
from retro_ray.database import chunks, tokenizer
from retro_ray.evaluation import evaluate
from retro_ray.retrieval import index, neighbors
from retro_ray.training import instruct, pretrain


StageFn = Callable[[Config, Storage, bool], object]

STAGES: dict[str, StageFn] = {
    "tokenizer": tokenizer.run,
    "db": chunks.run,
    "index": index.run,
    "neighbors": neighbors.run,
    "pretrain": pretrain.run,
    "instruct": instruct.run,
    "eval": evaluate.run,
}
"""Each stage reads the previous stages' folders under ``workdir`` and writes its own."""


def run_pipeline(cfg: Config, storage: Storage, force: bool = False) -> None:
    """Run every stage; finished ones are skipped by their manifests. ``force`` rebuilds all.
    Instruction tuning and evaluation run when ``instruct.sources`` names data."""
    for i, (name, run) in enumerate(STAGES.items(), 1):
        if name in ("instruct", "eval") and not cfg.instruct.sources:
            log.info("pipeline: stage %d/%d %s skipped (no instruct.sources in the config)", i, len(STAGES), name)
            continue
        log.info("pipeline: stage %d/%d %s", i, len(STAGES), name)
        run(cfg, storage, force)


def ask(url: str, question: str, api_key: str | None = None, timeout_s: float = 300) -> dict:
    """One chat request to the served model over HTTP (its name from ``/v1/models``), the way
    any OpenAI client sends it, asked as a short-answer question (the tuning template's QA form;
    the answer ends with its line); greedy, so a rerun prints the same answer."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}

    def call(route: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        with urllib.request.urlopen(urllib.request.Request(f"{url}{route}", data, headers), timeout=timeout_s) as r:
            return json.load(r)

    model = call("/v1/models")["data"][0]["id"]
    return call("/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": question}],
                                         "temperature": 0, "max_tokens": 64, "short_answer": True})


def demo(cfg: Config, storage: Storage, url: str, api_key: str | None = None) -> dict:
    """Ask every question of ``serve.demo`` -> {asked, correct, rows: [{question, answer, answers,
    correct}]}, written to ``eval/demo.json``; correct: the answer holds a gold answer."""
    from retro_ray.core.config import EvalQASet
    from retro_ray.evaluation.evaluate import load_qa
    from retro_ray.evaluation.evidence import AnswerMatcher

    questions, _, _ = load_qa(storage, EvalQASet(name="demo", path=cfg.serve.demo))
    rows = []
    for q in questions:
        answer = ask(url, q["question"], api_key)["choices"][0]["message"]["content"].strip()
        rows.append({"question": q["question"], "answer": answer, "answers": q["answers"],
                     "correct": bool(AnswerMatcher([q["answers"]]).found(answer))})
    result = {"asked": len(rows), "correct": sum(r["correct"] for r in rows), "rows": rows}
    storage.write_json(join(eval_dir(cfg), "demo.json"), result)
    return result


def demo_text(result: dict, source: str) -> str:
    lines = [f"demo questions ({source}): {result['correct']} of {result['asked']} answers hold a gold answer"]
    for r in result["rows"]:
        lines.append(f"  [{'x' if r['correct'] else ' '}] {r['question']} -> {' '.join(r['answer'].split())[:100]}")
    return "\n".join(lines)


def reports(cfg: Config, storage: Storage) -> list[str]:
    """The files a person looks at after a run: QA table, perplexities, loss curves."""
    names = [join(eval_dir(cfg), n) for n in ("qa.md", "qa.png", "ppl.json", "ppl.png", "gpt_vs_retro.png",
                                              "demo.json")]
    names += sorted(storage.expand(join(cfg.workdir, "checkpoints", "*", "loss.png")))
    return [n for n in names if storage.exists(n)]


def answer_text(response: dict) -> str:
    """The answer, then the passages it was given, numbered, one line each."""
    choice = response["choices"][0]
    lines = [choice["message"]["content"].strip() or "(empty answer)", "", "passages retrieved:"]
    for i, p in enumerate(choice.get("passages", []), 1):
        text = " ".join(p["text"].split())
        lines.append(f"  [{i}] doc {p['doc_id']}, chunk {p['chunk_id']} (score {p['score']:.3f}): "
                     f"{p.get('title') or '(no title)'}: {text[:160]}")
    return "\n".join(lines)
