"""Instruction data, answer-only loss with packing, QA scoring, overlap, and a tiny tune + eval run."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import copy_database

from retro_ray.core.config import EvalQASet, InstructSource, StorageConfig
from retro_ray.core.storage import Storage
from retro_ray.database import tokenizer
from retro_ray.database.corpus import BadInputError
from retro_ray.database.files import ChunkStore
from retro_ray.evaluation import evaluate
from retro_ray.model import Retro, RetroConfig
from retro_ray.retrieval import index, neighbors
from retro_ray.retrieval.neighbors import drop_near_copies, ngram_overlap
from retro_ray.training import instruct
from retro_ray.training.instruct import encode, pack, parse_row, read_rows
from retro_ray.training.prompts import SYSTEM, format_passage, pieces, qa_prompt


def test_qa_prompt_with_0_1_and_5_passages():
    head = SYSTEM + "\n\n"
    turn = "User: Answer the following question with a short span. Who wrote Hamlet?\n\nAssistant: The answer is"
    assert qa_prompt("Who wrote Hamlet?", []) == head + turn
    one = [format_passage("Hamlet is a  tragedy\nby Shakespeare.", "Hamlet")]
    assert one == ["title: Hamlet, source: Hamlet is a tragedy by Shakespeare."]
    assert qa_prompt("Who wrote Hamlet?", one) == head + one[0] + "\n\n" + turn
    five = [format_passage(f"passage {i}") for i in range(5)]
    assert qa_prompt("Who wrote Hamlet?", five) == head + "".join(
        f"title: , source: passage {i}\n\n" for i in range(5)) + turn
    # the training text is the prompt followed by the answer
    example = parse_row({"question": "Who wrote Hamlet?", "answer": ["Shakespeare"], "context": "Hamlet is by him."})
    assert "".join(t for t, _ in pieces(example)) == (
        head + "title: , source: Hamlet is by him.\n\n" + turn + " Shakespeare")


def test_sources_are_read_from_s3_jsonl_and_parquet(s3_endpoint):
    import pyarrow as pa

    storage = Storage(StorageConfig(s3_endpoint=s3_endpoint))
    storage.write_bytes("s3://retro/instruct/qa.jsonl", b'{"question": "q1", "answer": ["a1"]}\n\n[1, 2]\n')
    storage.write_parquet("s3://retro/instruct/t0.parquet",
                          pa.Table.from_pylist([{"prompt": "p1", "completion": "c1"}, {"prompt": "p2", "completion": "c2"}]))
    source = InstructSource(name="mix", paths=["s3://retro/instruct/*"])
    rows = list(read_rows(storage, source, None))
    assert rows == [("s3://retro/instruct/qa.jsonl", 1, {"question": "q1", "answer": ["a1"]}),
                    ("s3://retro/instruct/qa.jsonl", 3, None),  # line 3, not an object: malformed
                    ("s3://retro/instruct/t0.parquet", 1, {"prompt": "p1", "completion": "c1"}),
                    ("s3://retro/instruct/t0.parquet", 2, {"prompt": "p2", "completion": "c2"})]
    assert len(list(read_rows(storage, source, 2))) == 2


@pytest.fixture(scope="module")
def bpe():
    texts = ["The answer is Paris. Who wrote Hamlet? Shakespeare wrote it. User: Assistant: System:"] * 20
    return tokenizer.train_bpe(texts, 400, "<|endoftext|>")


def test_loss_mask_covers_only_answers_and_eos_with_packing(bpe):
    rows = [parse_row({"question": "Who wrote Hamlet?", "answer": "Shakespeare"}),
            parse_row({"prompt": "Name a city.", "completion": "Paris"}),
            parse_row({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                                    {"role": "user", "content": "more"}, {"role": "assistant", "content": "ok"}]})]
    encoded = [encode(pieces(e, targets="all"), bpe, add_eos=True) for e in rows]
    packed = pack(encoded, seq_len=10_000)
    assert len(packed) == 1 and len(packed[0]["tokens"]) == sum(len(t) for t, _ in encoded)
    row = packed[0]
    eos = bpe.eos_token_id
    spans, current = [], []
    for token, target in zip(row["tokens"], row["targets"]):
        if target:
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    spans.append(current)
    assert [bpe.decode(s) for s in spans] == [" Shakespeare<|endoftext|>", " Paris<|endoftext|>", " hello",
                                              " ok<|endoftext|>"]
    assert sum(t == eos for t in row["tokens"]) == 3
    # positions restart at each example; the batch predicts token p + 1 at p where it is a target
    starts = [i for i, p in enumerate(row["positions"]) if p == 0]
    assert starts == [0, len(encoded[0][0]), len(encoded[0][0]) + len(encoded[1][0])]
    batch = instruct.row_batch(packed, "cpu")
    assert torch.equal(batch["targets"][0][batch["loss_mask"][0]], torch.as_tensor(sum(spans, [])))
    assert len(pack(encoded, seq_len=10_000, packed=False)) == 3
    # by default only the final answer is a target, as the reference tunes
    final = encode(pieces(rows[2]), bpe, add_eos=True)
    assert bpe.decode([t for t, g in zip(*final) if g]) == " ok<|endoftext|>"


def test_each_example_weighs_the_same_however_it_is_packed(bpe):
    """The per-example loss mean survives packing: a packed batch and the same examples one by
    one give the same loss (a short answer counts as much as a long completion)."""
    torch.manual_seed(0)
    model = Retro(RetroConfig(vocab_size=len(bpe), d_model=32, n_layers=2, n_heads=4, max_seq_len=1024,
                              chunk_length=16, retrieval=False)).eval()
    rows = [parse_row({"question": "Who wrote Hamlet?", "answer": "Shakespeare"}),
            parse_row({"prompt": "Name a city.", "completion": "Paris is a city. The answer is Paris. " * 3}),
            parse_row({"question": "Q?", "answer": "A"})]
    encoded = [encode(pieces(e), bpe, add_eos=True) for e in rows]

    def loss(batch):
        with torch.no_grad():
            return model(batch["tokens"], None, None, batch["targets"], batch["loss_mask"],
                         positions=batch["positions"])[1]

    alone = torch.stack([loss(instruct.row_batch(pack([e], 10_000), "cpu", per_example=True)) for e in encoded])
    packed = instruct.row_batch(pack(encoded, 10_000), "cpu", per_example=True)  # one row of three
    padded = instruct.row_batch(pack(encoded[:2], 10_000, packed=False) + pack(encoded[2:], 10_000), "cpu",
                                 per_example=True)  # padding, three rows
    assert torch.allclose(loss(packed), alone.mean(), atol=1e-6)
    assert torch.allclose(loss(padded), alone.mean(), atol=1e-6)
    assert packed["loss_mask"].sum() == pytest.approx(3.0)  # each example sums to one
    per_token = loss(instruct.row_batch(pack(encoded, 10_000), "cpu"))  # the long completion dominates
    assert not torch.allclose(per_token, alone.mean(), atol=1e-3)


def test_packed_examples_do_not_see_each_other():
    torch.manual_seed(0)
    model = Retro(RetroConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, chunk_length=8,
                              retrieval=False)).eval()
    a, b = torch.randint(0, 50, (1, 11)), torch.randint(0, 50, (1, 6))
    positions = torch.cat([torch.arange(11), torch.arange(6)])[None]
    with torch.no_grad():
        packed = model(torch.cat([a, b], 1), positions=positions)[0]
        assert torch.allclose(packed[:, :11], model(a)[0], atol=1e-5)
        assert torch.allclose(packed[:, 11:], model(b)[0], atol=1e-5)


def test_retro_without_retrieval_has_the_loss_of_its_gpt_path(bpe):
    torch.manual_seed(0)
    common = dict(vocab_size=len(bpe), d_model=32, n_layers=4, n_heads=4, max_seq_len=2048, chunk_length=16,
                  encoder_layers=1, cca_layers=[2, 4])
    retro = Retro(RetroConfig(retrieval=True, **common))
    for p in retro.parameters():  # CCA with real weights: it must be off, not merely zero
        torch.nn.init.normal_(p, std=0.05)
    gpt = Retro(RetroConfig(retrieval=False, **common))
    missing, unexpected = gpt.load_state_dict(retro.state_dict(), strict=False)
    assert not missing and all(k.startswith("encoder.") or ".cca." in k or ".ln_cca." in k for k in unexpected)
    rows = [encode(pieces(parse_row({"question": f"Q{i}?", "answer": f"A{i}"})), bpe, True) for i in range(4)]
    batch = instruct.row_batch(pack(rows, 700), "cpu")  # 2 rows of 2 examples
    args = (batch["tokens"], None, None, batch["targets"], batch["loss_mask"])
    with torch.no_grad():
        assert retro(*args, positions=batch["positions"])[1] == gpt(*args, positions=batch["positions"])[1]


def test_overlap_of_a_chunk_with_its_neighbours():
    chunk = np.arange(16)
    assert ngram_overlap(chunk, [np.arange(16)]) == 1.0
    assert ngram_overlap(chunk, [np.arange(100, 116)]) == 0.0
    assert ngram_overlap(chunk, [np.arange(0, 12)]) == 5 / 9  # 8-grams starting at 0..4 of 0..8
    assert ngram_overlap(chunk, [np.arange(0, 8), np.arange(8, 16)]) == 2 / 9  # [0..7] and [8..15] only
    assert ngram_overlap(np.arange(5), [np.arange(5)]) == 0.0  # shorter than n


def test_max_overlap_drops_a_near_copy():
    # chunks: 0 the query; 1 a near-copy (one token changed) in another document; 2 unrelated
    query, copy, other = np.arange(32), np.arange(32), np.arange(500, 532)
    copy[30] = 999
    flat = np.concatenate([query, copy, other]).astype(np.int32)
    store = ChunkStore.from_arrays(flat, np.array([0, 32, 64, 96]), np.array([0, 1, 2]))
    candidates = np.array([[[1, 2, -1]]])
    kept, dropped = drop_near_copies(store, np.array([[0]]), candidates, r=64, max_overlap=0.9)
    assert dropped == 1 and kept.tolist() == [[[-1, 2, -1]]]
    kept, dropped = drop_near_copies(store, np.array([[0]]), candidates, r=64, max_overlap=1.0)
    assert dropped == 0


# -- the tiny run -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(built_db, tmp_path_factory, wiki_docs):
    """A copy of the tiny database with an exact index, samples of 512 tokens, and data files."""
    cfg, _ = built_db
    root = tmp_path_factory.mktemp("instruct")
    copy_database(cfg, root / "run")
    qa_rows = [{"question": f"What is article {i} about?", "answer": [d["title"]]} for i, d in enumerate(wiki_docs)]
    for i, row in enumerate(qa_rows[:4]):  # gold context: a titled text, a {title, text} object
        row.update({"context": wiki_docs[i]["text"][:300], "title": wiki_docs[i]["title"]} if i % 2 else
                   {"context": {"title": wiki_docs[i]["title"], "text": wiki_docs[i]["text"][:300]}})
    bad = [b'{"question": "no answer here", "answer": []}', b'{"prompt": "p", "completion": ""}',
           b'{"messages": []}', b"{not json", b'{"something": "else"}',
           json.dumps({"prompt": "Write a long story.", "completion": "once upon a time " * 400}).encode()]
    data = root / "qa.jsonl"
    data.write_bytes(b"\n".join([json.dumps(r).encode() for r in qa_rows] + bad) + b"\n")
    chat = root / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Say {w}."},
                                                     {"role": "assistant", "content": w}]}) + "\n"
                            for w in ["yes", "no", "maybe", "later"]))
    squad = root / "squad.json"
    squad.write_text(json.dumps({"data": [{"title": d["title"], "paragraphs": [{
        "context": f"The secret word of {d['title']} is zebra{i}.",
        "qas": [{"id": str(i), "question": f"What is the secret word of {d['title']}?",
                 "answers": [{"text": f"zebra{i}"}]}]}]} for i, d in enumerate(wiki_docs[:6])]}))
    cfg = cfg.model_copy(update={
        "workdir": str(root / "run"),
        "index": cfg.index.model_copy(update={"factory": "Flat", "shards": 1}),
        "neighbors": cfg.neighbors.model_copy(update={"seq_len": 512, "k_candidates": 8, "valid_fraction": 0.25}),
        "train": cfg.train.model_copy(update={"max_steps": 2, "checkpoint_every": 2, "eval_every": 2,
                                              "eval_batches": 1, "micro_batch_size": 2}),
        "instruct": cfg.instruct.model_copy(update={
            "sources": [InstructSource(name="qa", paths=[str(data)]),
                        InstructSource(name="chat", paths=[str(chat)], weight=2.0)],
            "max_steps": 2, "lr": 1e-4, "valid_fraction": 0.1}),
        "eval": cfg.eval.model_copy(update={
            "qa": [EvalQASet(name="squad", path=str(squad), add_contexts=True),
                   EvalQASet(name="squad-gold", path=str(squad), context="gold"),
                   EvalQASet(name="jsonl", path=str(data), max_questions=8)],
            "prompt_passages": 2, "max_new_tokens": 8, "ppl_samples": 4}),
    })
    storage = Storage()
    index.run(cfg, storage)
    neighbors.run(cfg, storage)
    return cfg


def test_bad_rows_are_counted_and_strict_names_the_row(run):
    manifest = instruct.prepare(run, Storage())
    assert manifest.skipped == {"empty_messages": 1, "malformed_json": 1, "no_answer": 2, "too_long": 1,
                                "unknown_format": 1}
    c = manifest.counts
    assert c["rows_qa"] == 13 and c["rows_chat"] == 4
    assert c["gold_contexts"] == 4 and "retrieved_contexts" not in c  # gold context or none, as the reference
    assert c["train_examples"] + c["valid_examples"] == 12 + 2 * 4  # chat weight 2: each twice
    retrieved = run.model_copy(update={"workdir": run.workdir + "-retrieved",
                                       "instruct": run.instruct.model_copy(update={"context": "retrieved"})})
    shutil.copytree(run.workdir, retrieved.workdir, ignore=shutil.ignore_patterns("_locks", "instruct"))
    assert instruct.prepare(retrieved, Storage()).counts["retrieved_contexts"] == 8  # the rows without one
    strict = run.model_copy(update={"strict": True, "workdir": run.workdir + "-strict"})
    shutil.copytree(run.workdir, strict.workdir, ignore=shutil.ignore_patterns("_locks", "instruct"))
    with pytest.raises(BadInputError, match=r"qa\.jsonl:13: no_answer"):
        instruct.prepare(strict, Storage())
    with pytest.raises(BadInputError, match="strict is on"):
        instruct.prepare(run.model_copy(update={"strict": True}), Storage())


@pytest.mark.slow  # a whole tuning (Retro and twin) and evaluation
def test_tiny_tune_and_eval_produce_the_tables(run, wiki_docs):
    storage = Storage()
    results = instruct.run(run, storage)
    assert set(results) == {"retro", "gpt"} and all(r["step"] == 2 for r in results.values())
    workdir = run.workdir
    for name in ("pretrain-instruct", "pretrain-gpt-instruct"):
        config = json.loads(open(f"{workdir}/checkpoints/{name}/model/config.json").read())
        assert config["retro"]["retrieval"] == (name == "pretrain-instruct")  # Retro keeps its encoder
    from retro_ray.core.layout import served_model

    assert served_model(run, storage) == f"{workdir}/checkpoints/pretrain-instruct/model"  # generate, export, serve
    report = evaluate.run(run, storage)
    assert evaluate.run(run, storage)["qa"]["database"] == report["qa"]["database"]  # a rerun reuses the copy
    assert set(report["ppl"]["models"]) == {"retro", "gpt", "retro_instruct", "gpt_instruct"}
    assert set(report["ppl"]["buckets"]["retro"]) == {"0-10%", "10-50%", "50-90%", ">=90%"}
    qa = report["qa"]
    assert set(qa["datasets"]) == {"squad", "squad-gold", "jsonl"}
    assert set(qa["datasets"]["squad"]) == {"gpt", "gpt_rag", "retro_decoder_only", "retro_encoder"}
    assert set(qa["datasets"]["squad"]["gpt"]) == {"em", "f1", "em_squad", "f1_squad", "n"}
    assert qa["rows"] == {"squad": 6, "squad-gold": 6, "jsonl": 8} and len(qa["failed"]["jsonl"]) == 6
    assert qa["context"] == {"squad": "retrieved", "squad-gold": "gold", "jsonl": "retrieved"}
    assert qa["database"]["sources"] == ["wiki", "squad-contexts"]
    assert set(qa["answer_recall"]) == {"squad", "jsonl"} and set(qa["answer_recall"]["squad"]) == {"1", "5", "20"}
    assert qa["answer_coverage"]["squad"] == 1.0  # its paragraphs were added
    assert qa["answer_recall"]["squad"]["20"] == 1.0  # the database is small: every paragraph is in the top 20
    for name in ("retro_instruct", "gpt_instruct"):  # how much each model was tuned
        assert qa["tuning"][name]["steps"] == 2 and qa["tuning"][name]["examples"] > 0
    gold = qa["examples"]["squad-gold"]["gpt_rag"][0]
    assert gold["passages"] == 1  # its own paragraph, as the paper evaluates SQuAD
    # the copy holds the run's chunks under the same ids, then the paragraphs (one chunk each here)
    import pyarrow.parquet as pq

    def chunk_rows(db: str) -> list[dict]:
        return pq.read_table(f"{db}/chunks", columns=["chunk_id", "doc_id", "title", "text"]).sort_by(
            "chunk_id").to_pylist()

    original, copied = chunk_rows(f"{workdir}/db"), chunk_rows(f"{qa['database']['workdir']}/db")
    assert copied[: len(original)] == original
    assert [(r["title"], r["text"]) for r in copied[len(original):]] == [
        (d["title"], f"The secret word of {d['title']} is zebra{i}.") for i, d in enumerate(wiki_docs[:6])]
    assert [r["doc_id"] for r in copied[len(original):]] == list(range(original[-1]["doc_id"] + 1,
                                                                      original[-1]["doc_id"] + 7))
    # the SQuAD paragraphs are in the copy and retrieved for their questions
    top = qa["examples"]["squad"]["gpt_rag"][0]
    assert top["passages"] >= 1
    from retro_ray.retrieval.retriever import run_retriever

    db_cfg = run.model_copy(update={"workdir": qa["database"]["workdir"]})
    title = top["question"].removeprefix("What is the secret word of ").rstrip("?")
    [[found]] = run_retriever(db_cfg, storage).passages([f"The secret word of {title} is zebra0."], 1)
    assert "zebra0" in found["text"] and found["title"] == title
    for name in ("qa.json", "qa.md", "qa.png", "ppl.json", "ppl.png"):
        assert (storage.read_bytes(f"{workdir}/eval/{name}"))
    assert "| gpt_rag |" in storage.read_bytes(f"{workdir}/eval/qa.md").decode()
    # another evidence corpus: its database copy is refused as stale, and rebuilt with --force
    from retro_ray.core.config import CorpusSource
    from retro_ray.core.manifest import StageMismatchError

    extra = f"{workdir}/more.jsonl"
    storage.write_bytes(extra, json.dumps({"title": "Zebra", "text": "A zebra is striped."}).encode() + b"\n")
    more = run.model_copy(update={"eval": run.eval.model_copy(update={
        "extra_corpus": [CorpusSource(name="more", paths=[extra])]})})
    paragraphs = {"squad": evaluate.load_qa(storage, run.eval.qa[0])[2]}
    with pytest.raises(StageMismatchError, match="rerun with --force"):
        evaluate.qa_database(more, storage, paragraphs)
    rebuilt = evaluate.qa_database(more, storage, paragraphs, force=True)
    assert [s.name for s in rebuilt.corpus.sources] == ["wiki", "more", "squad-contexts"]
    assert evaluate.qa_database(more, storage, paragraphs).corpus == rebuilt.corpus  # and then up to date
    # the tuned InstructRetro without its encoder, as a plain Hugging Face model
    from transformers import AutoModelForCausalLM

    from retro_ray.cli import main
    from retro_ray.model.io import load_model

    config = f"{workdir}/config.yaml"
    storage.write_bytes(config, run.to_yaml().encode())
    assert main(["export", "--config", config, "--decoder-only", "--out", f"{workdir}/hf"]) == 0
    hf = AutoModelForCausalLM.from_pretrained(f"{workdir}/hf").eval()
    tuned = load_model(storage, f"{workdir}/checkpoints/pretrain-instruct/model").eval()
    tokens = torch.randint(0, 300, (1, 100))
    with torch.no_grad():
        assert torch.allclose(hf(tokens).logits, tuned(tokens)[0], atol=1e-5)
    assert (storage.read_bytes(f"{workdir}/hf/tokenizer.json"))


@pytest.mark.slow  # a whole tuning (Retro and twin) and evaluation
def test_a_killed_qa_eval_resumes_from_its_finished_cells_and_a_changed_model_recomputes_its_own(run):
    """Each (set, row) cell of the QA table is written when it finishes, keyed by the model, the
    questions and the settings: what a kill left unfinished is computed again, nothing else."""
    import os

    from retro_ray.core.layout import eval_dir, models

    storage = Storage()
    instruct.run(run, storage)  # tuned already when the test above ran
    paths = models(run)
    first = evaluate.qa(run, storage, paths, force=True)  # the database copy of this run (the test above left another)
    cells = {p.name: p for p in (Path(eval_dir(run)) / evaluate.CELLS).iterdir()}
    assert set(cells) == {f"{name}~{row}.json" for name, rows in first["datasets"].items() for row in rows}
    stamps = {name: p.stat().st_mtime_ns for name, p in cells.items()}
    lost = cells.pop("jsonl~retro_encoder.json")
    lost.unlink()  # a kill before this cell was written
    again = evaluate.qa(run, storage, paths)
    assert again["datasets"] == first["datasets"]
    assert lost.exists() and all(p.stat().st_mtime_ns == stamps[name] for name, p in cells.items())
    weights = Path(paths["gpt_instruct"]) / "model.safetensors"
    os.utime(weights)  # the twin retuned: its files changed
    evaluate.qa(run, storage, paths)
    changed = {name for name, p in cells.items() if p.stat().st_mtime_ns != stamps[name]}
    assert changed == {name for name in cells if name.split("~")[1].removesuffix(".json") in ("gpt", "gpt_rag")}
