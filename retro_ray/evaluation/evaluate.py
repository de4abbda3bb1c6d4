"""``retro-ray eval``: perplexity of every model, perplexity by neighbour overlap, zero-shot QA.

Writes ``{workdir}/eval/``:

- ``ppl.json`` / ``ppl.png``: validation perplexity of the pretrained GPT twin and Retro and of
  both tuned models; GPT's and Retro's per bucket of how much of each chunk its visible
  neighbours already contain (RETRO's leakage analysis: share of the chunk's 8-grams found in
  the neighbours of the chunk before it, the ones its tokens attend to); the share of training
  chunks with a near-copy neighbour (>= 90% of their 8-grams).
- ``qa.json`` / ``qa.md`` / ``qa.png``: one row per model, one column per QA set, scored two ways
  (``scoring.py``): InstructRetro's own (Megatron's: the whole continuation up to the end of text;
  F1 on the first gold answer) and the official SQuAD script's; greedy decoding of at most
  ``eval.max_new_tokens`` tokens with the tuning template's prompt and the top
  ``eval.prompt_passages`` passages (``title: .., source: ..``) retrieved for the question
  (``eval.search``: dense, BM25 or both fused), or its gold passage (a set's ``context: gold``,
  SQuAD as the paper runs it). Beside them: the share of questions whose answer is in the top
  1, 5 and 20 passages (``answer_recall``) and anywhere in the database (``answer_coverage``),
  and how many steps and examples each tuned model had.

The evidence must be in the database: ``eval.extra_corpus`` and QA sets' own paragraphs
(``add_contexts``) are added to a copy of it in ``eval/db`` (its full blocks are copied, only
the new documents are embedded), with its own index; the run's database is not changed.
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
import time
from collections.abc import Iterator

import numpy as np
import torch

from retro_ray.core.config import Config, CorpusSource, EvalQASet
from retro_ray.core.errors import UserError
from retro_ray.core.layout import DB, TOKENIZER, db_dir, eval_dir, models, qa_workdir, tokenizer_dir
from retro_ray.core.locks import locked
from retro_ray.core.manifest import MANIFEST, finished_stage
from retro_ray.core.plots import png, subplots
from retro_ray.core.runtime import log, progress
from retro_ray.core.storage import Storage, join
from retro_ray.evaluation import scoring
from retro_ray.evaluation.evidence import AnswerMatcher, answer_recall
from retro_ray.model.io import CONFIG, load_model
from retro_ray.training.prompts import format_passage

MODELS = ("gpt", "gpt_rag", "retro_decoder_only", "retro_encoder", "base_rag")
"""Rows of the QA table: the tuned GPT twin without passages, with passages in the prompt; the
tuned Retro with passages, its encoder dropped or reading the question's top-k passages for
every chunk; the base model the run started from, with passages."""
ROWS_NOTE = ("retro_decoder_only is the paper's InstructRetro row: the reference tunes and evaluates with "
             "--retro-attention-gate 0 (Megatron-LM core_r0.15.0, tools/retro/sft/sft_retro_lm.sh and "
             "text_generation/retro_generate.sh; the legacy transformer multiplies the cross-attention output by "
             "that gate), so its decoder reads the passages in its prompt and the encoder adds nothing; "
             "retro_encoder, the encoder reading the question's top k passages for every chunk, is beyond the paper.")
RECALL_AT = (1, 5, 20)
BUCKETS = ((0.0, 0.1), (0.1, 0.5), (0.5, 0.9), (0.9, 1.01))
BUCKET_NAMES = ("0-10%", "10-50%", "50-90%", ">=90%")


class QADataError(UserError, ValueError):
    """A QA file that cannot be read at all; single bad questions are counted instead."""


# -- QA data -------------------------------------------------------------------------------------


def load_qa(storage: Storage, qa: EvalQASet) -> tuple[list[dict], list[dict], list[dict]]:
    """(questions {question, answers, context}, failed {where, reason}, paragraphs {title, text})
    of a SQuAD JSON or a ``{"question", "answer"}`` JSONL file (optional ``context``: its gold
    passage, and ``title``); the first ``max_questions`` in file order."""
    raw = storage.read_bytes(qa.path)
    questions, failed, paragraphs = [], [], []

    def add(where: str, question, answers, context=None, title=None) -> None:
        answers = [answers] if isinstance(answers, str) else answers
        golds = [a for a in answers or [] if isinstance(a, str) and a.strip()] if isinstance(answers, list) else []
        if not isinstance(question, str) or not question.strip():
            failed.append({"where": where, "reason": "no question"})
        elif not golds:
            failed.append({"where": where, "reason": "no answer"})
        elif qa.context == "gold" and not (isinstance(context, str) and context.strip()):
            failed.append({"where": where, "reason": "no context (context: gold)"})
        else:
            titled = title if isinstance(title, str) else None
            gold = format_passage(context, titled) if isinstance(context, str) else None
            questions.append({"question": question.strip(), "answers": golds, "context": gold})

    if qa.path.endswith(".json"):
        try:
            data = json.loads(raw)["data"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise QADataError(f"{qa.path}: not SQuAD-format JSON ({type(e).__name__}: {e})") from None
        for article in data:
            title = str(article.get("title", "")).replace("_", " ")
            for p in article.get("paragraphs", []):
                paragraphs.append({"title": title, "text": p.get("context", "")})
                for q in p.get("qas", []):
                    add(f"{qa.path}: id {q.get('id')}", q.get("question"),
                        [a.get("text") for a in q.get("answers", []) if isinstance(a, dict)], p.get("context"), title)
    else:
        for i, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                failed.append({"where": f"{qa.path}:{i}", "reason": "malformed JSON"})
                continue
            if not isinstance(row, dict):
                failed.append({"where": f"{qa.path}:{i}", "reason": "not a JSON object"})
                continue
            add(f"{qa.path}:{i}", row.get("question"), row.get("answer", row.get("answers")), row.get("context"),
                row.get("title"))
    return questions[: qa.max_questions], failed, paragraphs


# -- the database the QA retrieval searches ----------------------------------------------------


def qa_database(cfg: Config, storage: Storage, paragraphs: dict[str, list[dict]], force: bool = False) -> Config:
    """The config whose db and index QA retrieval uses: the run's own, or (with extra documents)
    a copy in ``eval/db`` holding the run's database followed by them, with its own index
    (``force`` rebuilds a copy made from other documents)."""
    from retro_ray.retrieval import index

    extra = list(cfg.eval.extra_corpus)
    for name, rows in paragraphs.items():
        uri = join(eval_dir(cfg), "extra", f"{name}.jsonl")
        data = "".join(json.dumps(row) + "\n" for row in rows).encode()
        if not storage.exists(uri) or storage.read_bytes(uri) != data:  # unchanged: the copy stays up to date
            storage.write_bytes(uri, data)
        extra.append(CorpusSource(name=f"{name}-contexts", paths=[uri]))
    if not extra:
        return cfg
    copy = cfg.model_copy(update={"workdir": qa_workdir(cfg), "corpus": cfg.corpus.model_copy(
        update={"sources": cfg.corpus.sources + extra})})
    _extend(copy, storage, cfg, extra, force)
    index.run(copy, storage, force)
    return copy


@locked(TOKENIZER, DB)  # the copy's folders
def _extend(copy: Config, storage: Storage, cfg: Config, extra: list[CorpusSource], force: bool = False) -> None:
    """The copy's database: the run's tokenizer and full blocks (chunks and embeddings) copied,
    the extra documents chunked after the run's last chunk, and only the new blocks embedded.
    Resumes like the db stage."""
    from retro_ray.database import chunks
    from retro_ray.database.files import chunks_uri, embeddings_uri, finished_db, tokens_uri

    tok_manifest, copied = join(tokenizer_dir(cfg), MANIFEST), join(tokenizer_dir(copy), MANIFEST)
    if not storage.exists(copied) or storage.read_bytes(copied) != storage.read_bytes(tok_manifest):
        with tempfile.TemporaryDirectory() as tmp:
            storage.upload_dir(storage.download_dir(tokenizer_dir(cfg), tmp), tokenizer_dir(copy))
        storage.write_bytes(copied, storage.read_bytes(tok_manifest))  # expand() does not list it
    manifest, files = chunks.open_db(copy, storage, force)
    if manifest.complete:
        return
    base = finished_db(cfg, storage)
    if "chunks" not in manifest.counts:
        full = {n: b for n, b in base.blocks.items() if b["rows"] == cfg.db.block_size and n not in manifest.blocks}
        for name in full:
            for uri_of in (chunks_uri, embeddings_uri, tokens_uri):
                storage.write_bytes(uri_of(db_dir(copy), name), storage.read_bytes(uri_of(db_dir(cfg), name)))
        manifest.blocks.update(full)
        manifest.save(storage, db_dir(copy))
    chunks.append_documents(copy, storage, manifest, base, db_dir(cfg), extra, files)
    manifest.complete = True
    manifest.save(storage, db_dir(copy))


# -- models ------------------------------------------------------------------------------------


def base_model(cfg: Config):
    """The model the run was retro-fitted from, unchanged (its decoder only), or None."""
    from retro_ray.model.retrofit import RetroFit, load_causal_lm, retrofit_config

    if not cfg.model.base:
        return None
    base = load_causal_lm(cfg.model.base)
    return RetroFit(base, retrofit_config(base, retrieval=False, chunk_length=cfg.db.chunk_length, k=cfg.neighbors.k))


# -- perplexity ----------------------------------------------------------------------------------


@torch.inference_mode()
def token_losses(model, samples, n: int, batch_size: int, retrieval: bool, chunk_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-token losses [s, seq_len - 1] and their mask of the first n samples (loss of
    predicting token p + 1 at index p; padding masked)."""
    from retro_ray.training.pretrain import sample_batch

    model.eval()
    losses, masks = [], []
    for s in range(0, min(n, len(samples)), batch_size):
        items = [samples[i] for i in range(s, min(s + batch_size, n, len(samples)))]
        batch = sample_batch(items, chunk_len, retrieval, "cpu")
        logits = model(batch["tokens"], batch.get("neighbors"), batch.get("neighbor_mask"))[0]  # [b, n, V]
        loss = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), batch["targets"], reduction="none")
        losses.append(loss.numpy())
        masks.append(batch["loss_mask"].numpy())
    return np.concatenate(losses), np.concatenate(masks)


def chunk_overlaps(samples, n: int, chunk_len: int, ngram: int) -> np.ndarray:
    """[s, l] the share of each sample chunk u's n-grams found in the neighbours of chunk u - 1
    (the ones its tokens attend to); NaN for chunk 0 and for chunks without a database chunk."""
    from retro_ray.retrieval.neighbors import ngram_overlap

    rows = []
    for i in range(min(n, len(samples))):
        item = samples[i]
        tokens, lengths, neighbors = item["tokens"], item["chunk_lengths"], item["neighbor_mask"]
        l = len(lengths)
        row = np.full(l, np.nan)
        for u in range(1, l):
            chunk = tokens[u * chunk_len: u * chunk_len + lengths[u]]
            seen = [t[msk] for t, msk in zip(item["neighbors"][u - 1], neighbors[u - 1])]
            row[u] = ngram_overlap(chunk, seen, ngram) if lengths[u] else np.nan
        rows.append(row)
    return np.stack(rows)


def near_copy_share(samples, n: int, chunk_len: int, ngram: int, threshold: float = 0.9) -> float:
    """Share of the sample chunks that have neighbours with one (from another document, as the
    neighbours stage keeps them) holding at least ``threshold`` of their n-grams."""
    from retro_ray.retrieval.neighbors import ngram_overlap

    hits = total = 0
    for i in range(min(n, len(samples))):
        item = samples[i]
        for u, length in enumerate(item["chunk_lengths"]):
            if not item["neighbor_mask"][u].any():  # no database chunk, or no neighbour
                continue
            chunk = item["tokens"][u * chunk_len: u * chunk_len + length]
            total += 1
            hits += any(ngram_overlap(chunk, [t[msk]], ngram) >= threshold
                        for t, msk in zip(item["neighbors"][u], item["neighbor_mask"][u]) if msk.any())
    return hits / max(total, 1)


def perplexity(cfg: Config, storage: Storage, paths: dict[str, str],
               bucketed: tuple[str, ...] = ("gpt", "retro")) -> dict:
    """Validation perplexity of every model in ``paths`` that exists (and of the base model a run
    was retro-fitted from); those named in ``bucketed`` also per overlap bucket."""
    from retro_ray.database.files import ChunkStore, finished_db
    from retro_ray.retrieval.neighbors import RetroSamples

    store = ChunkStore.open(storage, db_dir(cfg), sorted(finished_db(cfg, storage).blocks))
    valid = RetroSamples(cfg, storage, "valid", store)
    ec, m = cfg.eval, cfg.db.chunk_length
    n = min(ec.ppl_samples, len(valid))
    overlaps = chunk_overlaps(valid, n, m, ec.overlap_ngram)  # [s, l]
    # the target at index p is token p + 1, of chunk (p + 1) // m
    chunk_of_target = (np.arange(cfg.neighbors.seq_len - 1) + 1) // m  # [seq_len - 1]
    target_overlap = overlaps[:, chunk_of_target]  # [s, seq_len - 1]
    result: dict = {"samples": n, "models": {}, "buckets": {}}
    models = {name: uri for name, uri in paths.items() if storage.exists(join(uri, CONFIG))}
    if cfg.model.base:
        models["base"] = None
    for name, uri in models.items():
        model = load_model(storage, uri) if uri else base_model(cfg)
        losses, mask = token_losses(model, valid, n, ec.batch_size, model.cfg.retrieval, m)
        result["models"][name] = math.exp(float(losses[mask].mean()))
        if name in bucketed:
            result["buckets"][name] = {}
            for (lo, hi), label in zip(BUCKETS, BUCKET_NAMES):
                inside = mask & (target_overlap >= lo) & (target_overlap < hi)
                result["buckets"][name][label] = {
                    "ppl": math.exp(float(losses[inside].mean())) if inside.any() else None,
                    "tokens": int(inside.sum())}
    train = RetroSamples(cfg, storage, "train", store)
    result["near_copy_share"] = near_copy_share(train, ec.ppl_samples, m, ec.overlap_ngram)
    result["max_overlap"] = cfg.neighbors.max_overlap
    return result


# -- QA ------------------------------------------------------------------------------------------


def answer_questions(generator, tokenizer, questions: list[dict], passages: list[list[str]] | None, mode: str,
                     cfg: Config, label: str = "") -> tuple[list[dict], float]:
    """Greedy answers of every question (its passages in the prompt, as many as fit the
    context; in mode ``question`` the encoder reads the top k of them for every chunk), decoded
    to the end of text or ``eval.max_new_tokens`` as the reference does -> rows (the question,
    both scorings) and seconds per question."""
    from retro_ray.serving.generate import SamplingParams
    from retro_ray.training.prompts import fit_passages, qa_prompt

    ec, template = cfg.eval, cfg.eval.template or cfg.instruct.template
    params = SamplingParams(max_new_tokens=ec.max_new_tokens, skip_special_tokens=False)  # the scoring cuts at them
    room = generator.cfg.max_seq_len - ec.max_new_tokens
    prompts = [fit_passages(lambda given: qa_prompt(q["question"], given, template, tokenizer),
                            passages[i] if passages else [], tokenizer, room)
               for i, q in enumerate(questions)]
    rows, start = [], time.perf_counter()
    for s in range(0, len(questions), ec.batch_size):
        batch = prompts[s: s + ec.batch_size]
        neighbors = [passages[s + j][: generator.k] for j in range(len(batch))] if mode == "question" else None
        outs = generator.generate([p for p, _, _ in batch], params, mode=mode, neighbor_passages=neighbors)
        for q, (_, used, _), out in zip(questions[s: s + ec.batch_size], batch, outs):
            rows.append({"question": q["question"], "answers": q["answers"], **scoring.score(out.text, q["answers"]),
                         "passages": used})
        elapsed = time.perf_counter() - start
        if s // ec.batch_size % 5 == 4 or len(rows) == len(questions):
            log.info("eval qa %s: %d/%d questions %s, %.2f s/question", label, len(rows), len(questions),
                     progress(len(rows), len(questions), elapsed), elapsed / len(rows))
    return rows, (time.perf_counter() - start) / max(len(questions), 1)


def database_documents(cfg: Config, storage: Storage) -> Iterator[str]:
    """Every document of the run's database, with its title, rebuilt from its chunks."""
    from retro_ray.database.files import ChunkStore, ChunkTexts, finished_db

    blocks = sorted(finished_db(cfg, storage).blocks)
    store = ChunkStore.open(storage, db_dir(cfg), blocks)
    doc_ids = (d for b in range(len(blocks)) for d in store.block(b)[1])
    current, parts = None, []
    for doc, (title, text) in zip(doc_ids, ChunkTexts(storage, db_dir(cfg), blocks).all()):
        if doc != current and parts:
            yield "".join(parts)
            parts = []
        parts.append(text if parts else f"{title}\n\n{text}")
        current = doc
    if parts:
        yield "".join(parts)


def tuning_summary(storage: Storage, paths: dict[str, str]) -> dict:
    """How long each tuned model was tuned: {model: {steps, examples, tokens}} from its history."""
    out = {}
    for name in ("retro_instruct", "gpt_instruct"):
        history_file = join(paths[name].rsplit("/", 1)[0], "history.json")
        if storage.exists(history_file):
            last = storage.read_json(history_file)[-1]
            out[name] = {"steps": last["step"], "examples": last.get("examples"), "tokens": last.get("tokens")}
    return out


SETUPS = {"gpt": ("gpt_instruct", False, "off"), "gpt_rag": ("gpt_instruct", True, "off"),
          "retro_decoder_only": ("retro_instruct", True, "off"), "retro_encoder": ("retro_instruct", True, "question"),
          "base_rag": ("base", True, "off")}
"""Each row of the QA table: (model, passages in the prompt, retrieval mode)."""


CELLS = "qa-cells"
"""``eval/qa-cells/{set}~{row}.json``: one finished cell of the QA table, its answers and the key
they were computed under (``cell_key``), written as soon as the cell is done."""


def cell_key(storage: Storage, cfg: Config, model_uri: str | None, setup: tuple, questions: list[dict],
             passages: list[list[str]] | None) -> str:
    """What a cell's answers depend on: the model (its exported files' sizes and times, or the base
    model's name), the row's setup, the decoding settings, and every question with its passages."""
    model = {"base": cfg.model.base} if model_uri is None else {
        uri: storage.fingerprint(uri) for uri in storage.expand(model_uri)}
    blob = json.dumps([model, list(setup), cfg.eval.max_new_tokens, cfg.eval.template or cfg.instruct.template,
                       [[q["question"], q["answers"]] for q in questions], passages], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def qa(cfg: Config, storage: Storage, paths: dict[str, str], force: bool = False) -> dict:
    """The QA table: every row of ``SETUPS`` whose model the run has, on every ``eval.qa`` set, both
    scorings; how well retrieval finds the answers, and how many the database holds."""
    from retro_ray.database import tokenizer as run_tokenizer
    from retro_ray.retrieval.retriever import run_retriever
    from retro_ray.serving.generate import Generator

    ec = cfg.eval
    sets = {}
    for qs in ec.qa:
        questions, failed, paragraphs = load_qa(storage, qs)
        sets[qs.name] = (qs, questions, failed, paragraphs if qs.add_contexts else None)
    db_cfg = qa_database(cfg, storage, {n: p for n, (_, _, _, p) in sets.items() if p}, force)
    retriever = run_retriever(db_cfg, storage)
    tok = run_tokenizer.load_run_tokenizer(cfg, storage)
    db = finished_stage(storage, db_dir(db_cfg), "db")
    report: dict = {"datasets": {}, "rows": {}, "failed": {}, "context": {}, "seconds_per_question": {},
                    "answer_recall": {}, "answer_coverage": {}, "tuning": tuning_summary(storage, paths),
                    "database": {"workdir": db_cfg.workdir, "chunks": db.counts["chunks"], "docs": db.counts["docs"],
                                 "sources": [s.name for s in db_cfg.corpus.sources]},
                    "retrieval": {"search": ec.search, "passage_words": ec.passage_words},
                    "prompt_passages": ec.prompt_passages, "examples": {}, "no_model": {}}
    retrieved = {n: questions for n, (qs, questions, _, _) in sets.items() if qs.context == "retrieved"}
    if retrieved and ec.answer_coverage:
        matcher = AnswerMatcher([q["answers"] for questions in retrieved.values() for q in questions])
        covered: set[int] = set()
        for text in database_documents(db_cfg, storage):
            covered |= matcher.found(text)
        first = 0
        for name, questions in retrieved.items():
            report["answer_coverage"][name] = len(covered & set(range(first, first + len(questions)))) / max(
                len(questions), 1)
            first += len(questions)
    generators: dict = {}
    for name, (qs, questions, failed, _) in sets.items():
        report["rows"][name], report["failed"][name], report["context"][name] = len(questions), failed, qs.context
        if qs.context == "gold":
            passages = [[q["context"]] for q in questions]
        else:
            depth = max(ec.prompt_passages, *RECALL_AT)
            found = retriever.passages([q["question"] for q in questions], depth, ec.search, ec.passage_words)
            passages = [[format_passage(p["text"], p["title"]) for p in rows] for rows in found]
            report["answer_recall"][name] = answer_recall(passages, [q["answers"] for q in questions], RECALL_AT)
            passages = [texts[: ec.prompt_passages] for texts in passages]
        for row, (model_key, with_passages, mode) in SETUPS.items():
            uri = None if model_key == "base" else paths[model_key]
            if not cfg.model.base if uri is None else not storage.exists(join(uri, CONFIG)):
                report["no_model"][row] = "no model.base" if uri is None else f"no model at {uri}"
                continue
            given = passages if with_passages else None
            key = cell_key(storage, cfg, uri, SETUPS[row], questions, given)
            cell_uri = join(eval_dir(cfg), CELLS, f"{name}~{row}.json")
            cell = storage.read_json(cell_uri) if storage.exists(cell_uri) else None
            if cell is not None and cell["key"] == key:
                log.info("eval qa %s %s: answered by an earlier run (same model, questions and settings)", name, row)
            else:
                if model_key not in generators:
                    generators[model_key] = Generator(base_model(cfg) if uri is None else load_model(storage, uri),
                                                      tok, retriever)
                rows, per_q = answer_questions(generators[model_key], tok, questions, given, mode, cfg,
                                               f"{name} {row}")
                cell = {"key": key, "rows": rows, "seconds_per_question": per_q}
                storage.write_json(cell_uri, cell)  # a killed eval resumes from the cells it finished
            rows, per_q = cell["rows"], cell["seconds_per_question"]
            scores = report["datasets"].setdefault(name, {})[row] = scoring.mean_scores(rows)
            report["seconds_per_question"].setdefault(name, {})[row] = per_q
            report["examples"].setdefault(name, {})[row] = rows[:5]
            log.info("eval qa %s %s: EM %.1f F1 %.1f (squad: EM %.1f F1 %.1f) on %d questions (%.2f s/question)",
                     name, row, scores["em"], scores["f1"], scores["em_squad"], scores["f1_squad"], len(rows), per_q)
    return report


def qa_markdown(report: dict) -> str:
    """The QA table (reference EM / F1, then SQuAD's), the sets, retrieval and tuning."""
    names = list(report["datasets"])
    lines = ["| model | " + " | ".join(f"{n} EM | {n} F1 | {n} EM (squad) | {n} F1 (squad)" for n in names) + " |",
             "| --- | " + " | ".join("---: | ---: | ---: | ---:" for _ in names) + " |"]
    for model in MODELS:
        cells = []
        for n in names:
            r = report["datasets"][n].get(model)
            cells.append(f"{r['em']:.1f} | {r['f1']:.1f} | {r['em_squad']:.1f} | {r['f1_squad']:.1f}" if r
                         else "- | - | - | -")
        if any(c != "- | - | - | -" for c in cells):
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("EM and F1: InstructRetro's scoring (Megatron's: the whole answer, F1 on the first gold answer); "
                 "(squad): the official SQuAD script's on the first line of the answer.")
    lines.append("")
    for n in names:
        line = f"- {n}: {report['rows'][n]} questions, {len(report['failed'][n])} failed to parse, " \
               f"context {report['context'][n]}"
        if n in report["answer_recall"]:
            recall = report["answer_recall"][n]
            line += "; answer in the top " + ", ".join(f"{k}: {100 * v:.0f}%" for k, v in recall.items())
        if n in report["answer_coverage"]:
            line += f"; answer anywhere in the database: {100 * report['answer_coverage'][n]:.0f}%"
        lines.append(line)
    db, search = report["database"], report["retrieval"]
    size = f"{search['passage_words']} words" if search["passage_words"] else "a chunk and its continuation"
    lines.append(f"- database: {db['chunks']} chunks of {db['docs']} documents ({', '.join(db['sources'])}); "
                 f"search {search['search']}, passages of {size}")
    for name, t in report["tuning"].items():
        lines.append(f"- {name}: tuned {t['steps']} steps on {t['examples']} examples")
    for row, why in report.get("no_model", {}).items():
        lines.append(f"- {row}: not run, {why}")
    lines.append(f"- {ROWS_NOTE}")
    return "\n".join(lines) + "\n"


def _bars(groups: dict[str, dict[str, float]], ylabel: str, title: str, log_scale: bool = False) -> bytes:
    """Grouped bar chart {group: {series: value}} as PNG bytes."""


    series = sorted({s for g in groups.values() for s in g}, key=lambda s: (MODELS + (s,)).index(s))
    fig, ax = subplots(figsize=(max(6, 1.6 * len(groups) * max(1, len(series)) / 2), 4))
    width = 0.8 / max(1, len(series))
    for j, s in enumerate(series):
        xs = [i + j * width for i in range(len(groups))]
        ax.bar(xs, [g.get(s) or 0 for g in groups.values()], width, label=s)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))], list(groups))
    ax.set(ylabel=ylabel, title=title, yscale="log" if log_scale else "linear")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return png(fig)


def run(cfg: Config, storage: Storage, force: bool = False) -> dict:
    """The ``eval`` stage (always recomputed: it writes reports, not inputs of other stages)."""
    paths = models(cfg)
    out = eval_dir(cfg)
    ppl = perplexity(cfg, storage, paths)
    storage.write_json(join(out, "ppl.json"), ppl)
    buckets = {label: {m: ppl["buckets"][m][label]["ppl"] for m in ppl["buckets"]} for label in BUCKET_NAMES}
    storage.write_bytes(join(out, "ppl.png"), _bars(buckets, "validation perplexity", "perplexity by neighbour overlap",
                                                    log_scale=True))
    log.info("eval ppl: %s; near-copy share %.1f%%", ", ".join(f"{k} {v:.2f}" for k, v in ppl["models"].items()),
             100 * ppl["near_copy_share"])
    result = {"ppl": ppl}
    if cfg.eval.qa:
        report = qa(cfg, storage, paths, force)
        storage.write_json(join(out, "qa.json"), report)
        storage.write_bytes(join(out, "qa.md"), qa_markdown(report).encode())
        storage.write_bytes(join(out, "qa.png"), _bars(
            {f"{n} EM": {m: r["em"] for m, r in rows.items()} for n, rows in report["datasets"].items()},
            "exact match (%)", "zero-shot QA"))
        log.info("eval qa -> %s\n%s", join(out, "qa.md"), qa_markdown(report))
        result["qa"] = report
    return result
