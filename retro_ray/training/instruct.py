"""Instruction data: rows -> prompts in InstructRetro's format -> packed rows with answer-only loss.

Rows come from JSONL or Parquet files, local or on S3, in three layouts (``InstructSource.kind``):
chat (``messages``), prompt/completion and QA (``question``, ``answer``, optional ``context``).
Each becomes a conversation; the prompt is InstructRetro's (``template: retro``)::

    System: This is a chat between a user and ... the context.\\n\\n
    title: {t}, source: {text}\\n\\n ... (the context passages)\\n\\n
    User: Answer the following question with a short span. {question}\\n\\n
    Assistant: The answer is {answer}<eos>

or the reference's Retro-tuning prompt (``template: retro_sft``: a short system line, ``User:
{question} Answer the above question with a short phrase.``), or the tokenizer's chat template
(``template: chat``). As the reference tunes, a QA row keeps its own (gold) context and a row
without one has none (``context: retrieved`` gives it passages retrieved for its question), and
only the final answer and its end-of-turn token are targets (``targets: all``: every assistant
turn): the prompt and every other turn are tokenised as their own pieces (exactly as generation
will see them) with target 0. Each example weighs the same in the loss however packing groups
them (``loss: example``; ``row_batch`` gives each target 1 / its example's target count).

Rows of ``{workdir}/instruct/data/{train,valid}.parquet``: ``tokens`` (int32), ``targets`` (int8,
1 = a token the loss counts) and ``positions`` (int32, restarting at 0 for each packed example, so
the model keeps examples apart: ``packed_causal_mask``). Bad rows are counted per reason in the
manifest, or an error naming file and row under ``strict``.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from typing import Iterator

import numpy as np
import pyarrow as pa
import torch

from retro_ray.core.config import Config, ConfigError, InstructConfig, InstructSource, config_hash
from retro_ray.core.layout import (
    INSTRUCT, index_dir, instruct_data_dir, instruct_dir, pretrained_runs, run_dir, run_folder,
    tuned, tuned_runs,
)
from retro_ray.core.locks import locked
from retro_ray.core.manifest import MANIFEST, EmptyStageError, Manifest, finished_stage, open_stage
from retro_ray.core.storage import Storage, join
from retro_ray.database.corpus import BadInputError, describe_skips
from retro_ray.model.io import read_config
from retro_ray.training.pretrain import TrainData
from retro_ray.training.prompts import Example, format_passage, pieces

TUNING_ONLY = ("lr", "max_steps", "loss", "batch_examples", "weight_decay", "adam_betas", "twin")
"""Instruct settings of the tuning run, not of its data: changing them keeps the data."""
SCHEMA = pa.schema([("tokens", pa.list_(pa.int32())), ("targets", pa.list_(pa.int8())),
                    ("positions", pa.list_(pa.int32()))])


# -- rows -> conversations -------------------------------------------------------------------


class RowError(ValueError):
    """A row that cannot become an example; its ``reason`` (``malformed_json``, ``unknown_format``,
    ``empty_messages``, ``no_answer``; ``too_long`` is found later, once tokenised) is counted in
    the manifest, or is an error naming the row under ``strict``."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}{': ' + detail if detail else ''}")
        self.reason = reason


def _text(value) -> str:
    return value.strip() if isinstance(value, str) else ""


def parse_row(row: dict, kind: str = "auto") -> Example:
    """A chat, prompt/completion or QA row -> an ``Example``; raises ``RowError``."""
    if kind == "auto":
        kind = ("chat" if "messages" in row else "completion" if "prompt" in row and "completion" in row
                else "qa" if "question" in row and "answer" in row else "")
        if not kind:
            raise RowError("unknown_format", f"keys {sorted(row)[:8]}: expected messages, prompt+completion "
                           "or question+answer")
    if kind == "chat":
        messages = [{"role": str(m.get("role", "")), "content": _text(m.get("content"))}
                    for m in row.get("messages") or [] if isinstance(m, dict)]
        messages = [m for m in messages if m["content"]]
        if not any(m["role"] == "user" for m in messages):
            raise RowError("empty_messages", "no user message with text")
        if messages[-1]["role"] != "assistant":
            raise RowError("no_answer", "the last message is not the assistant's")
        return Example(messages)
    if kind == "completion":
        prompt, completion = _text(row.get("prompt")), _text(row.get("completion"))
        if not prompt:
            raise RowError("empty_messages", "empty prompt")
        if not completion:
            raise RowError("no_answer", "empty completion")
        return Example([{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}])
    question, answers = _text(row.get("question")), row.get("answer")
    answers = [answers] if isinstance(answers, str) else list(answers or [])
    answer = next((a.strip() for a in answers if isinstance(a, str) and a.strip()), "")
    if not question:
        raise RowError("empty_messages", "empty question")
    if not answer:
        raise RowError("no_answer", "no answer")
    passages = context_passages(row)
    return Example([{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
                   passages, question=question, has_context=bool(passages))


def context_passages(row: dict) -> list[str]:
    """A QA row's own context as passages: ``context`` is a text (titled by the row's ``title``),
    a ``{"title", "text"}`` object, or a list of either; passages without text are dropped."""
    context = row.get("context")
    out = []
    for c in context if isinstance(context, list) else [context]:
        title, text = (c.get("title"), c.get("text")) if isinstance(c, dict) else (row.get("title"), c)
        if isinstance(text, str) and text.strip():
            out.append(format_passage(text, title if isinstance(title, str) else None))
    return out


def encode(parts: list[tuple[str, bool]], tokenizer, add_eos: bool) -> tuple[list[int], list[int]]:
    """Pieces -> token ids and targets (1 where the loss counts), each piece tokenised on its own;
    ``add_eos`` appends the end-of-text token as a target."""
    tokens, targets = [], []
    for text, target in parts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        tokens += ids
        targets += [int(target)] * len(ids)
    if add_eos:
        tokens.append(tokenizer.eos_token_id)
        targets.append(1)
    return tokens, targets


# -- packing ---------------------------------------------------------------------------------


def pack(examples: list[tuple[list[int], list[int]]], seq_len: int, packed: bool = True) -> list[dict]:
    """Examples (tokens, targets), in order, into rows of at most ``seq_len`` tokens: a row is
    closed when the next example does not fit (``packed=False``: one example per row).
    ``positions`` restart at 0 at each example."""
    rows: list[dict] = []
    row: dict = {"tokens": [], "targets": [], "positions": []}
    for tokens, targets in examples:
        if row["tokens"] and (not packed or len(row["tokens"]) + len(tokens) > seq_len):
            rows.append(row)
            row = {"tokens": [], "targets": [], "positions": []}
        row["tokens"] += tokens
        row["targets"] += targets
        row["positions"] += list(range(len(tokens)))
    if row["tokens"]:
        rows.append(row)
    return rows


def examples_in(row: dict) -> int:
    """How many examples a packed row holds (each starts at position 0)."""
    return sum(1 for p in row["positions"] if p == 0)


def example_weights(targets: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """targets [b, n] bool, positions [b, n] (restarting at 0 per example) -> [b, n] float: each
    target weighs 1 / its example's target count, so every example sums to 1."""
    example = (positions == 0).long().cumsum(-1)  # [b, n] example index within its row (from 1)
    counts = torch.zeros(targets.shape[0], targets.shape[1] + 1, device=targets.device)
    counts.scatter_add_(1, example, targets.float())  # [b, n + 1] targets per example
    return torch.where(targets, 1.0 / counts.gather(1, example).clamp(min=1.0), 0.0)


def row_batch(items: list[dict], device, per_example: bool = False) -> dict[str, torch.Tensor]:
    """Rows -> model inputs, right-padded to the longest row: predict tokens[1:] from tokens[:-1]
    where the target flag is set (``per_example``: weighted so that each example counts once,
    ``example_weights``). Padding is its own example (positions from 0) and no target."""
    n = max(len(it["tokens"]) for it in items)
    tokens = torch.zeros(len(items), n, dtype=torch.long)  # [b, n]
    targets = torch.zeros(len(items), n, dtype=torch.bool)
    positions = torch.zeros(len(items), n, dtype=torch.long)
    for i, it in enumerate(items):
        length = len(it["tokens"])
        tokens[i, :length] = torch.as_tensor(it["tokens"])
        targets[i, :length] = torch.as_tensor(it["targets"]).bool()
        positions[i, :length] = torch.as_tensor(it["positions"])
        positions[i, length:] = torch.arange(n - length)
    weights = example_weights(targets, positions) if per_example else targets  # [b, n]
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": weights[:, 1:],
             "positions": positions[:, :-1]}
    return {k: v.to(device) for k, v in batch.items()}


class TuningData:
    """The packed instruction rows of a run (``instruct/data``), each split in memory (instruction
    data is small next to the database): what the tuning runs read, with answer-only targets
    weighted per example or per token (``instruct.loss``)."""

    name = "instruction rows"

    def __call__(self, cfg: Config, storage: Storage, device) -> TrainData:
        train, valid = (storage.read_parquet(join(instruct_data_dir(cfg), f"{split}.parquet")).to_pylist()
                        for split in ("train", "valid"))
        per_example = cfg.instruct.loss == "example"
        return TrainData(train, valid, lambda items: row_batch(items, device, per_example), examples_in)


# -- the data stage ----------------------------------------------------------------------------


def _copies(source: InstructSource, path: str, row: int) -> int:
    """How often a row is used in the blend: ``weight`` rounded by a stable per-row coin."""
    whole, frac = divmod(source.weight, 1.0)
    digest = hashlib.blake2b(f"{source.name}\0{path}\0{row}".encode(), digest_size=8).digest()
    return int(whole) + int(int.from_bytes(digest, "little") / 2**64 < frac)


def _is_valid(source: str, path: str, row: int, fraction: float) -> bool:
    digest = hashlib.blake2b(f"valid\0{source}\0{path}\0{row}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


def read_rows(storage: Storage, source: InstructSource, limit: int | None) -> Iterator[tuple[str, int, dict | None]]:
    """(path, 1-based row, row or None when the line is not a JSON object) of every file."""
    n = 0
    for pattern in source.paths:
        paths = storage.expand(pattern)
        if not paths:
            raise BadInputError(f"instruct source {source.name!r}: {pattern} matches no file")
        for path in paths:
            fmt = source.format if source.format != "auto" else ("parquet" if path.endswith(".parquet") else "jsonl")
            if fmt == "parquet":
                rows: Iterator = enumerate(storage.read_parquet(path).to_pylist(), 1)
            else:  # 1-based line numbers; blank lines are not rows
                rows = ((i, _json_object(line)) for i, line in enumerate(storage.read_bytes(path).splitlines(), 1)
                        if line.strip())
            for i, row in rows:
                if limit is not None and n >= limit:
                    return
                n += 1
                yield path, i, row


def _json_object(line: bytes) -> dict | None:
    try:
        row = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return row if isinstance(row, dict) else None


def seq_len(cfg: Config) -> int:
    return cfg.instruct.seq_len or cfg.neighbors.seq_len


def prepare(cfg: Config, storage: Storage, force: bool = False) -> Manifest:
    """Read, format, tokenise, pack and write the instruction data; recorded in a manifest."""
    from retro_ray.core.runtime import log
    from retro_ray.database import tokenizer as run_tokenizer

    ic = cfg.instruct
    if not ic.sources:
        raise BadInputError("instruct.sources is empty: give at least one chat, prompt/completion or QA file")
    tok_manifest = run_tokenizer.finished_tokenizer(cfg, storage)
    inputs = {"tokenizer": tok_manifest.content_hash()}
    for source in ic.sources:
        inputs.update({p: storage.fingerprint(p) for pattern in source.paths for p in storage.expand(pattern)})
    inputs["seq_len"] = seq_len(cfg)
    retrieved = ic.context == "retrieved" and ic.context_passages > 0
    if retrieved and storage.exists(join(index_dir(cfg), MANIFEST)):  # what QA contexts come from
        inputs["index"] = finished_stage(storage, index_dir(cfg), "index").content_hash()
    out = instruct_data_dir(cfg)
    defaults = InstructConfig()
    data_settings = ic.model_copy(update={k: getattr(defaults, k) for k in TUNING_ONLY})
    manifest = open_stage(storage, out, "instruct-data", config_hash(data_settings), inputs, force)
    if manifest.complete and cfg.strict and manifest.skipped:
        raise BadInputError(f"{out} was built with bad rows skipped ({describe_skips(manifest.skipped)}), and strict "
                            "is on: rerun with --force to stop at the first")
    if manifest.complete:
        log.info("instruct data: %s is up to date (%d train rows)", out, manifest.counts["train_rows"])
        return manifest
    start = time.time()
    tok = run_tokenizer.load_run_tokenizer(cfg, storage)
    skipped: Counter[str] = Counter()
    examples: list[tuple[Example, str, str, int]] = []  # example, source, path, row
    for source in ic.sources:
        for path, row_no, row in read_rows(storage, source, ic.max_examples):
            try:
                if row is None:
                    raise RowError("malformed_json", "not a JSON object")
                example = parse_row(row, source.kind)
            except RowError as e:
                if cfg.strict:
                    raise BadInputError(f"{path}:{row_no}: {e} (strict: true)") from None
                skipped[e.reason] += 1
                continue
            examples += [(example, source.name, path, row_no)] * _copies(source, path, row_no)
            manifest.counts[f"rows_{source.name}"] = manifest.counts.get(f"rows_{source.name}", 0) + 1
    need = [e for e, *_ in examples if e.question is not None and not e.has_context]
    if need and retrieved:
        from retro_ray.retrieval.retriever import run_retriever

        retriever = run_retriever(cfg, storage)
        questions = sorted({e.question for e in need})
        found = dict(zip(questions, retriever.passages(questions, ic.context_passages)))
        for e in need:
            e.passages = [format_passage(p["text"], p["title"]) for p in found[e.question]]
        manifest.counts["retrieved_contexts"] = len(need)
    manifest.counts["gold_contexts"] = sum(e.has_context for e, *_ in examples)
    length, split_rows = seq_len(cfg), {"train": [], "valid": []}
    add_eos = ic.template != "chat"
    for example, source, path, row_no in examples:
        tokens, targets = encode(pieces(example, ic.template, tok, ic.targets), tok, add_eos)
        if len(tokens) > length:
            if cfg.strict:
                raise BadInputError(f"{path}:{row_no}: too_long: {len(tokens)} tokens, instruct seq_len is {length} "
                                    "(strict: true)")
            skipped["too_long"] += 1
            continue
        split = "valid" if _is_valid(source, path, row_no, ic.valid_fraction) else "train"
        split_rows[split].append((tokens, targets))
    if not split_rows["train"]:
        raise EmptyStageError(f"instruct: no usable example (skipped: {describe_skips(skipped)})")
    if not split_rows["valid"]:
        split_rows["valid"].append(split_rows["train"].pop())
    order = np.random.default_rng(ic.seed).permutation(len(split_rows["train"]))
    split_rows["train"] = [split_rows["train"][i] for i in order]
    for split, rows in split_rows.items():
        packed = pack(rows, length, ic.pack)
        storage.write_parquet(join(out, f"{split}.parquet"), pa.Table.from_pylist(packed, schema=SCHEMA))
        manifest.counts[f"{split}_examples"] = len(rows)
        manifest.counts[f"{split}_rows"] = len(packed)
        manifest.counts[f"{split}_tokens"] = sum(len(t) for t, _ in rows)
        manifest.counts[f"{split}_target_tokens"] = sum(sum(g) for _, g in rows)
    manifest.skipped = dict(sorted(skipped.items()))
    manifest.timings["prepare_s"] = time.time() - start
    manifest.complete = True
    manifest.save(storage, out)
    c = manifest.counts
    log.info("instruct data: %d examples -> %d train rows (%d tokens, %d targets), %d valid rows; skipped: %s",
             c["train_examples"] + c["valid_examples"], c["train_rows"], c["train_tokens"],
             c["train_target_tokens"], c["valid_rows"], describe_skips(manifest.skipped))
    return manifest


# -- the instruct stage ----------------------------------------------------------------------


def tuning_config(cfg: Config) -> Config:
    """The tuning run of a pretrained run's config: ``{run_name}-instruct`` (``layout.tuned``),
    InstructRetro's constant learning rate and AdamW settings, the whole model trained, no
    retrieval; workers, micro-batch and ZeRO stage as ``train`` (the step's size:
    ``instruct.batch_examples``)."""
    ic, tc = cfg.instruct, tuned(cfg).train
    return cfg.model_copy(update={"train": tc.model_copy(update={
        "trainable": "all", "retrieval_lr": None,
        "lr": ic.lr, "min_lr": ic.lr, "warmup_steps": 0, "weight_decay": ic.weight_decay, "adam_betas": ic.adam_betas,
        "max_steps": ic.max_steps, "eval_every": min(tc.eval_every, ic.max_steps),
        "checkpoint_every": min(tc.checkpoint_every, ic.max_steps), "seed": ic.seed})})


@locked(INSTRUCT, *(lambda cfg, name=name: run_folder(tuned(pretrained_runs(cfg)[name])) for name in ("retro", "gpt")))
def run(cfg: Config, storage: Storage, force: bool = False) -> dict:
    """The ``instruct`` stage: the instruction data, then the Retro run and its GPT twin (trained
    first if missing: the same samples and steps without retrieval; not with ``instruct.twin:
    false``), each tuned the same way and exported as ``checkpoints/{run}-instruct/model``.
    ``--force`` redoes the data and the tuning, not the pretraining."""
    from retro_ray.core.runtime import log
    from retro_ray.training import pretrain

    data = prepare(cfg, storage, force)
    results = {}
    for name, run_cfg in tuned_runs(cfg).items():
        pretrained = pretrain.run(run_cfg, storage)
        context = read_config(storage, pretrained["model"]).max_seq_len
        if seq_len(cfg) > context:
            raise ConfigError(f"instruct.seq_len: {seq_len(cfg)} tokens, but {pretrained['model']} reads at most "
                              f"{context}: lower it, or pretrain with a longer neighbors.seq_len")
        init = finished_stage(storage, run_dir(run_cfg), "pretrain")
        inputs = {"data": data.content_hash(), "pretrained": init.content_hash(),
                  "loss": f"{cfg.instruct.loss}, {cfg.instruct.batch_examples} examples a step"}
        results[name] = pretrain.fit(tuning_config(run_cfg), storage, "instruct", inputs, force, data=TuningData(),
                                     init=pretrained["model"])
    storage.write_bytes(join(instruct_dir(cfg), "loss.png"),
                        pretrain.plot_curves({f"{n}-instruct": r["history"] for n, r in results.items()}))
    log.info("instruct: tuned %s", ", ".join(f"{n} -> {r['model']}" for n, r in results.items()))
    return results
