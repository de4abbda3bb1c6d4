"""``retro-ray eval``: perplexity of every model, perplexity by neighbour overlap, zero-shot QA.

Writes ``{workdir}/eval/``:

- ``ppl.json`` / ``ppl.png``: validation perplexity of the pretrained GPT twin and Retro and of
  both tuned models; GPT's and Retro's per bucket of how much of each chunk its visible
  neighbours already contain (RETRO's leakage analysis: share of the chunk's 8-grams found in
  the neighbours of the chunk before it, the ones its tokens attend to); the share of training
  chunks with a near-copy neighbour (>= 90% of their 8-grams).
- ``qa.json`` / ``qa.md`` / ``qa.png``: one row per model, one column per QA set, EM and F1 as
  SQuAD scores them (normalised: lower case, no punctuation, no articles, single spaces; the
  best over the gold answers), greedy decoding of at most ``eval.max_new_tokens`` tokens with
  InstructRetro's prompt and the top ``eval.prompt_passages`` passages retrieved for the question.

The evidence must be in the database: ``eval.extra_corpus`` and QA sets' own paragraphs
(``add_contexts``) are added to a copy of it in ``eval/db`` (its full blocks are copied, only
the new documents are embedded), with its own index; the run's database is not changed.
"""

from __future__ import annotations

import collections
import json
import math
import re
import string
import tempfile
import time

import numpy as np
import torch

from retro_ray.config import Config, CorpusSource, EvalQASet
from retro_ray.errors import UserError
from retro_ray.generate import load_model
from retro_ray.locks import locked
from retro_ray.runtime import log, progress
from retro_ray.storage import MANIFEST, Storage, finished_stage, join

MODELS = ("gpt", "gpt_rag", "retro_decoder_only", "retro_encoder", "base_rag")
"""Rows of the QA table: the tuned GPT twin without passages, with passages in the prompt; the
tuned Retro with passages, its encoder dropped or fed (2 neighbours per chunk); the base model
the run started from, with passages."""
BUCKETS = ((0.0, 0.1), (0.1, 0.5), (0.5, 0.9), (0.9, 1.01))
BUCKET_NAMES = ("0-10%", "10-50%", "50-90%", ">=90%")
PUNCTUATION = set(string.punctuation)


class QADataError(UserError, ValueError):
    """A QA file that cannot be read at all; single bad questions are counted instead."""


# -- scoring -------------------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no a/an/the, whitespace collapsed."""
    text = "".join(ch for ch in text.lower() if ch not in PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, golds: list[str]) -> float:
    return max((float(normalize_answer(prediction) == normalize_answer(g)) for g in golds), default=0.0)


def f1_score(prediction: str, golds: list[str]) -> float:
    """Unigram F1 of the normalised answers, the best over the golds."""
    def f1(pred: list[str], gold: list[str]) -> float:
        common = sum((collections.Counter(pred) & collections.Counter(gold)).values())
        if not pred or not gold:
            return float(pred == gold)
        if common == 0:
            return 0.0
        precision, recall = common / len(pred), common / len(gold)
        return 2 * precision * recall / (precision + recall)

    tokens = normalize_answer(prediction).split()
    return max((f1(tokens, normalize_answer(g).split()) for g in golds), default=0.0)


def extract_answer(text: str) -> str:
    """The answer span of a generation: its first line, without a leading "The answer is"."""
    line = text.strip().split("\n")[0].strip()
    return re.sub(r"^(the answer is)\s*:?\s*", "", line, flags=re.IGNORECASE).strip()


# -- QA data -------------------------------------------------------------------------------------


def load_qa(storage: Storage, qa: EvalQASet) -> tuple[list[dict], list[dict], list[str]]:
    """(questions {question, answers}, failed {where, reason}, paragraphs) of a SQuAD JSON or a
    ``{"question", "answer"}`` JSONL file; the first ``max_questions`` in file order."""
    raw = storage.read_bytes(qa.path)
    questions, failed, paragraphs = [], [], []

    def add(where: str, question, answers) -> None:
        answers = [answers] if isinstance(answers, str) else answers
        golds = [a for a in answers or [] if isinstance(a, str) and a.strip()] if isinstance(answers, list) else []
        if not isinstance(question, str) or not question.strip():
            failed.append({"where": where, "reason": "no question"})
        elif not golds:
            failed.append({"where": where, "reason": "no answer"})
        else:
            questions.append({"question": question.strip(), "answers": golds})

    if qa.path.endswith(".json"):
        try:
            data = json.loads(raw)["data"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise QADataError(f"{qa.path}: not SQuAD-format JSON ({type(e).__name__}: {e})") from None
        for article in data:
            for p in article.get("paragraphs", []):
                paragraphs.append(f"{article.get('title', '').replace('_', ' ')}\n\n{p.get('context', '')}")
                for q in p.get("qas", []):
                    add(f"{qa.path}: id {q.get('id')}", q.get("question"),
                        [a.get("text") for a in q.get("answers", []) if isinstance(a, dict)])
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
            add(f"{qa.path}:{i}", row.get("question"), row.get("answer", row.get("answers")))
    return questions[: qa.max_questions], failed, paragraphs


# -- the database the QA retrieval searches ----------------------------------------------------


def qa_database(cfg: Config, storage: Storage, paragraphs: dict[str, list[str]]) -> Config:
    """The config whose db and index QA retrieval uses: the run's own, or (with extra documents)
    a copy in ``eval/db`` holding the run's database followed by them, with its own index."""
    from retro_ray import index

    extra = list(cfg.eval.extra_corpus)
    for name, texts in paragraphs.items():
        uri = join(cfg.workdir, "eval", "extra", f"{name}.jsonl")
        data = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
        if not storage.exists(uri) or storage.read_bytes(uri) != data:  # unchanged: the copy stays up to date
            storage.write_bytes(uri, data)
        extra.append(CorpusSource(name=f"{name}-contexts", paths=[uri]))
    if not extra:
        return cfg
    copy = cfg.model_copy(update={"workdir": join(cfg.workdir, "eval", "db"), "corpus": cfg.corpus.model_copy(
        update={"sources": cfg.corpus.sources + extra})})
    _extend(copy, storage, cfg, extra)
    index.run(copy, storage)
    return copy


@locked("tokenizer", "db")  # the copy's folders
def _extend(copy: Config, storage: Storage, cfg: Config, extra: list[CorpusSource]) -> None:
    """The copy's database: the run's tokenizer and full blocks (chunks and embeddings) copied,
    the extra documents chunked after the run's last chunk, and only the new blocks embedded.
    Resumes like the db stage."""
    from retro_ray import chunks, tokenizer
    from retro_ray.dbfiles import chunks_uri, db_dir, embeddings_uri, finished_db, tokens_uri

    if not storage.exists(join(tokenizer.stage_dir(copy), MANIFEST)):
        with tempfile.TemporaryDirectory() as tmp:
            storage.upload_dir(storage.download_dir(tokenizer.stage_dir(cfg), tmp), tokenizer.stage_dir(copy))
        tok_manifest = join(tokenizer.stage_dir(cfg), MANIFEST)  # expand() does not list it
        storage.write_bytes(join(tokenizer.stage_dir(copy), MANIFEST), storage.read_bytes(tok_manifest))
    manifest, files = chunks.open_db(copy, storage)
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


def model_paths(cfg: Config) -> dict[str, str]:
    """Exported model folders: pretrained ``gpt`` / ``retro`` and tuned ``gpt_instruct`` / ``retro_instruct``."""
    from retro_ray.instruct import models, tuning_config
    from retro_ray.train import MODEL_DIR, run_dir

    paths = {}
    for name, run_cfg in models(cfg).items():
        paths[name] = join(run_dir(run_cfg), MODEL_DIR)
        paths[f"{name}_instruct"] = join(run_dir(tuning_config(run_cfg)), MODEL_DIR)
    return paths


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
    from retro_ray.train import make_batch

    model.eval()
    losses, masks = [], []
    for s in range(0, min(n, len(samples)), batch_size):
        items = [samples[i] for i in range(s, min(s + batch_size, n, len(samples)))]
        batch = make_batch(items, chunk_len, retrieval, "cpu")
        logits = model(batch["tokens"], batch.get("neighbors"), batch.get("neighbor_mask"))[0]  # [b, n, V]
        loss = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), batch["targets"], reduction="none")
        losses.append(loss.numpy())
        masks.append(batch["loss_mask"].numpy())
    return np.concatenate(losses), np.concatenate(masks)


def chunk_overlaps(samples, n: int, chunk_len: int, ngram: int) -> np.ndarray:
    """[s, l] the share of each sample chunk u's n-grams found in the neighbours of chunk u - 1
    (the ones its tokens attend to); NaN for chunk 0 and for chunks without a database chunk."""
    from retro_ray.neighbors import ngram_overlap

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
    from retro_ray.neighbors import ngram_overlap

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


def perplexity(cfg: Config, storage: Storage, paths: dict[str, str]) -> dict:
    """Validation perplexity of every model (and of the base model a run was retro-fitted from);
    GPT's and Retro's per overlap bucket."""
    from retro_ray.dbfiles import ChunkStore, db_dir, finished_db
    from retro_ray.neighbors import RetroSamples

    store = ChunkStore.open(storage, db_dir(cfg), sorted(finished_db(cfg, storage).blocks))
    valid = RetroSamples(cfg, storage, "valid", store)
    ec, m = cfg.eval, cfg.db.chunk_length
    n = min(ec.ppl_samples, len(valid))
    overlaps = chunk_overlaps(valid, n, m, ec.overlap_ngram)  # [s, l]
    # the target at index p is token p + 1, of chunk (p + 1) // m
    chunk_of_target = (np.arange(cfg.neighbors.seq_len - 1) + 1) // m  # [seq_len - 1]
    target_overlap = overlaps[:, chunk_of_target]  # [s, seq_len - 1]
    result: dict = {"samples": n, "models": {}, "buckets": {}}
    models = {name: uri for name, uri in paths.items() if storage.exists(join(uri, "config.json"))}
    if cfg.model.base:
        models["base"] = None
    for name, uri in models.items():
        model = load_model(storage, uri) if uri else base_model(cfg)
        losses, mask = token_losses(model, valid, n, ec.batch_size, model.cfg.retrieval, m)
        result["models"][name] = math.exp(float(losses[mask].mean()))
        if name in ("gpt", "retro"):
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
    context) -> rows {question, prediction, em, f1, passages} and seconds per question."""
    from retro_ray.generate import SamplingParams
    from retro_ray.instruct import fit_passages, qa_prompt

    ec, template = cfg.eval, cfg.instruct.template
    params = SamplingParams(max_new_tokens=ec.max_new_tokens, stop=["\n"])
    room = generator.cfg.max_seq_len - ec.max_new_tokens
    prompts = [fit_passages(lambda given: qa_prompt(q["question"], given, template, tokenizer),
                            passages[i] if passages else [], tokenizer, room)
               for i, q in enumerate(questions)]
    rows, start = [], time.perf_counter()
    for s in range(0, len(questions), ec.batch_size):
        batch = prompts[s: s + ec.batch_size]
        outs = generator.generate([p for p, _, _ in batch], params, mode=mode)
        for q, (_, used, _), out in zip(questions[s: s + ec.batch_size], batch, outs):
            answer = extract_answer(out.text)
            rows.append({"question": q["question"], "answers": q["answers"], "prediction": answer,
                         "em": exact_match(answer, q["answers"]), "f1": f1_score(answer, q["answers"]),
                         "passages": used})
        elapsed = time.perf_counter() - start
        if s // ec.batch_size % 5 == 4 or len(rows) == len(questions):
            log.info("eval qa %s: %d/%d questions %s, %.2f s/question", label, len(rows), len(questions),
                     progress(len(rows), len(questions), elapsed), elapsed / len(rows))
    return rows, (time.perf_counter() - start) / max(len(questions), 1)


def qa(cfg: Config, storage: Storage, paths: dict[str, str]) -> dict:
    """The QA table: every model of ``MODELS`` that the run has, on every ``eval.qa`` set."""
    from retro_ray import tokenizer as run_tokenizer
    from retro_ray.generate import Generator
    from retro_ray.instruct import retrieve_passages
    from retro_ray.retrieval import run_retriever

    sets = {}
    for qs in cfg.eval.qa:
        questions, failed, paragraphs = load_qa(storage, qs)
        sets[qs.name] = (questions, failed, paragraphs if qs.add_contexts else None)
    db_cfg = qa_database(cfg, storage, {n: p for n, (_, _, p) in sets.items() if p})
    retriever = run_retriever(db_cfg, storage)
    tok = run_tokenizer.load_run_tokenizer(cfg, storage)
    db = finished_stage(storage, join(db_cfg.workdir, "db"), "db")
    report: dict = {"datasets": {}, "rows": {}, "failed": {}, "seconds_per_question": {},
                    "database": {"workdir": db_cfg.workdir, "chunks": db.counts["chunks"], "docs": db.counts["docs"],
                                 "sources": [s.name for s in db_cfg.corpus.sources]},
                    "prompt_passages": cfg.eval.prompt_passages, "examples": {}}
    setups = {"gpt": ("gpt_instruct", False, "off"), "gpt_rag": ("gpt_instruct", True, "off"),
              "retro_decoder_only": ("retro_instruct", True, "off"), "retro_encoder": ("retro_instruct", True, "encoder"),
              "base_rag": ("base", True, "off")}
    generators: dict = {}
    for name, (questions, failed, _) in sets.items():
        report["rows"][name] = len(questions)
        report["failed"][name] = failed
        passages = retrieve_passages(retriever, [q["question"] for q in questions], cfg.eval.prompt_passages)
        for row, (model_key, with_passages, mode) in setups.items():
            if model_key not in generators:
                model = base_model(cfg) if model_key == "base" else (
                    load_model(storage, paths[model_key]) if storage.exists(join(paths[model_key], "config.json")) else None)
                generators[model_key] = Generator(model, tok, retriever) if model is not None else None
            generator = generators[model_key]
            if generator is None:
                continue
            rows, per_q = answer_questions(generator, tok, questions, passages if with_passages else None, mode, cfg,
                                           f"{name} {row}")
            n = max(len(rows), 1)
            report["datasets"].setdefault(name, {})[row] = {
                "em": 100 * sum(r["em"] for r in rows) / n, "f1": 100 * sum(r["f1"] for r in rows) / n, "n": len(rows)}
            report["seconds_per_question"].setdefault(name, {})[row] = per_q
            report["examples"].setdefault(name, {})[row] = rows[:5]
            log.info("eval qa %s %s: EM %.1f F1 %.1f on %d questions (%.2f s/question)", name, row,
                     report["datasets"][name][row]["em"], report["datasets"][name][row]["f1"], len(rows), per_q)
    return report


def qa_markdown(report: dict) -> str:
    names = list(report["datasets"])
    lines = ["| model | " + " | ".join(f"{n} EM | {n} F1" for n in names) + " |",
             "| --- | " + " | ".join("---: | ---:" for _ in names) + " |"]
    for model in MODELS:
        cells = []
        for n in names:
            r = report["datasets"][n].get(model)
            cells.append(f"{r['em']:.1f} | {r['f1']:.1f}" if r else "- | -")
        if any(c != "- | -" for c in cells):
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"- {n}: {report['rows'][n]} questions, {len(report['failed'][n])} failed to parse" for n in names]
    db = report["database"]
    lines.append(f"- database: {db['chunks']} chunks of {db['docs']} documents ({', '.join(db['sources'])})")
    return "\n".join(lines) + "\n"


def _bars(groups: dict[str, dict[str, float]], ylabel: str, title: str, log_scale: bool = False) -> bytes:
    """Grouped bar chart {group: {series: value}} as PNG bytes."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = sorted({s for g in groups.values() for s in g}, key=lambda s: (MODELS + (s,)).index(s))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups) * max(1, len(series)) / 2), 4))
    width = 0.8 / max(1, len(series))
    for j, s in enumerate(series):
        xs = [i + j * width for i in range(len(groups))]
        ax.bar(xs, [g.get(s) or 0 for g in groups.values()], width, label=s)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))], list(groups))
    ax.set(ylabel=ylabel, title=title, yscale="log" if log_scale else "linear")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def run(cfg: Config, storage: Storage, force: bool = False) -> dict:
    """The ``eval`` stage (always recomputed: it writes reports, not inputs of other stages)."""
    paths = model_paths(cfg)
    out = join(cfg.workdir, "eval")
    ppl = perplexity(cfg, storage, paths)
    storage.write_json(join(out, "ppl.json"), ppl)
    buckets = {label: {m: ppl["buckets"][m][label]["ppl"] for m in ppl["buckets"]} for label in BUCKET_NAMES}
    storage.write_bytes(join(out, "ppl.png"), _bars(buckets, "validation perplexity", "perplexity by neighbour overlap",
                                                    log_scale=True))
    log.info("eval ppl: %s; near-copy share %.1f%%", ", ".join(f"{k} {v:.2f}" for k, v in ppl["models"].items()),
             100 * ppl["near_copy_share"])
    result = {"ppl": ppl}
    if cfg.eval.qa:
        report = qa(cfg, storage, paths)
        storage.write_json(join(out, "qa.json"), report)
        storage.write_bytes(join(out, "qa.md"), qa_markdown(report).encode())
        storage.write_bytes(join(out, "qa.png"), _bars(
            {f"{n} EM": {m: r["em"] for m, r in rows.items()} for n, rows in report["datasets"].items()},
            "exact match (%)", "zero-shot QA"))
        log.info("eval qa -> %s\n%s", join(out, "qa.md"), qa_markdown(report))
        result["qa"] = report
    return result
