"""Generation on a real tiny run (BPE tokenizer, MiniLM embeddings, exact Faiss index): the KV
cache against full recomputation, retrieval once per completed chunk, batches, sampling, stops."""

import numpy as np
import pytest
import torch
from conftest import LOGITS_ATOL, M, PROMPT, generation_run, make_model, read_split

from retro_ray.core.storage import Storage
from retro_ray.database import tokenizer
from retro_ray.model import Retro, RetroConfig
from retro_ray.retrieval.retriever import run_retriever
from retro_ray.serving.generate import GenerationError, Generator, SamplingParams


@pytest.fixture(scope="module")
def run(built_db, tmp_path_factory):
    cfg = generation_run(built_db, tmp_path_factory.mktemp("generate"))
    return cfg, tokenizer.load_run_tokenizer(cfg, Storage()), run_retriever(cfg, Storage())


@pytest.mark.parametrize("kind", ["retro", "gpt", "llama", "gpt2"])
def test_kv_cache_matches_full_recomputation(run, kind):
    cfg, tok, retriever = run
    model = make_model(kind, len(tok), tok.eos_token_id)
    modes = ["encoder", "off"] if kind != "gpt" else ["off"]
    for mode in modes:
        params = SamplingParams(max_new_tokens=200)
        gen = Generator(model, tok, retriever)
        atol = LOGITS_ATOL[gen.device.type]
        cached = gen.generate([PROMPT], params, mode=mode, keep_logits=True)[0]
        full = Generator(model, tok, retriever, use_cache=False).generate([PROMPT], params, mode=mode,
                                                                          keep_logits=True)[0]
        assert len(cached.tokens) == 200 and cached.prompt_tokens + 200 >= 4 * M  # 3 boundaries crossed
        assert cached.tokens == full.tokens, (kind, mode)
        for step, (a, b) in enumerate(zip(cached.logits, full.logits)):
            assert np.allclose(a, b, atol=atol), (kind, mode, step, float(np.abs(a - b).max()))
        if mode == "encoder":
            off = Generator(model, tok, retriever).generate([PROMPT], params, mode="off", keep_logits=True)[0]
            assert not np.allclose(off.logits[-1], cached.logits[-1], atol=1e-3)  # the neighbours are used


def test_retrieval_once_per_completed_chunk(run):
    cfg, tok, retriever = run
    model = make_model("retro", len(tok), tok.eos_token_id)
    before = retriever.stats.queries
    out = Generator(model, tok, retriever).generate([PROMPT], SamplingParams(max_new_tokens=150))[0]
    fed = out.prompt_tokens + len(out.tokens) - 1  # the last token is never fed back to the model
    assert [r["chunk"] for r in out.retrieved] == list(range(fed // M))  # each once, in order
    assert retriever.stats.queries - before == fed // M
    ids = tok(PROMPT, add_special_tokens=False)["input_ids"] + out.tokens
    for r in out.retrieved:  # the text of a complete chunk, never of a partial one
        assert r["text"] == tok.decode(ids[r["chunk"] * M:(r["chunk"] + 1) * M])
        assert len(r["neighbors"]) == 2 and all(n["text"] for n in r["neighbors"])


def test_a_database_chunk_retrieves_what_the_neighbours_stage_stored(run):
    cfg, tok, retriever = run
    table = read_split(cfg, "train")
    sample = table.slice(0, 1).to_pylist()[0]
    docs = {d for d in sample["chunk_doc_ids"] if d >= 0}
    chunk_ids = [c for c in sample["chunk_ids"] if c >= 0]
    texts = [tok.decode(retriever.store.tokens(c)) for c in chunk_ids]  # as a generated chunk is embedded
    assert texts == [retriever.chunk_texts.get(np.array([c]))[c] for c in chunk_ids]
    found = retriever.retrieve(texts, k=2, exclude_docs=[docs] * len(texts))
    stored = [sample["neighbors"][j] for j, c in enumerate(sample["chunk_ids"]) if c >= 0]
    assert found.chunk_ids.tolist() == stored


def test_batch_of_different_lengths_equals_each_prompt_alone(run):
    cfg, tok, retriever = run
    model = make_model("retro", len(tok), tok.eos_token_id)
    prompts = [PROMPT[:40], PROMPT * 2, PROMPT]
    params = [SamplingParams(max_new_tokens=80), SamplingParams(max_new_tokens=30),  # each request its own
              SamplingParams(max_new_tokens=60, temperature=0.8, seed=3)]
    gen = Generator(model, tok, retriever)
    batch = gen.generate(prompts, params)
    for prompt, p, together in zip(prompts, params, batch):
        alone = gen.generate([prompt], [p])[0]
        assert len(together.tokens) == p.max_new_tokens
        assert together.tokens == alone.tokens and together.retrieved == alone.retrieved


def test_sampling_is_seeded_and_stop_strings_cut_the_output(run):
    cfg, tok, retriever = run
    gen = Generator(make_model("retro", len(tok), tok.eos_token_id), tok, retriever)
    sampled = SamplingParams(max_new_tokens=40, temperature=1.0, top_k=50, top_p=0.9, seed=7)
    first, again = gen.generate([PROMPT, PROMPT], sampled)
    assert first.tokens != again.tokens  # each request its own stream (seed + index)
    assert gen.generate([PROMPT], sampled)[0].tokens == first.tokens
    greedy = gen.generate([PROMPT], SamplingParams(max_new_tokens=40))[0]
    stop = greedy.text[12:16]
    cut = gen.generate([PROMPT], SamplingParams(max_new_tokens=40, stop=[stop]))[0]
    assert cut.text == greedy.text[: greedy.text.find(stop)] and cut.finish_reason == "stop"
    assert greedy.finish_reason == "length"


def test_special_tokens_the_model_writes_are_left_out_of_the_text_unless_kept(run):
    cfg, tok, retriever = run
    model = make_model("retro", len(tok), tok.eos_token_id)
    model.lm_head.register_forward_hook(lambda module, args, logits: logits.index_fill(-1, torch.tensor(
        [tok.eos_token_id], device=logits.device), 1e4))  # the model writes end of text, and goes on (ignore_eos)
    gen = Generator(model, tok, retriever)
    skipped, kept = (gen.generate([PROMPT], SamplingParams(max_new_tokens=3, ignore_eos=True,
                                                           skip_special_tokens=skip))[0] for skip in (True, False))
    assert skipped.tokens == kept.tokens == [tok.eos_token_id] * 3
    assert skipped.text == "" and kept.text == tok.eos_token * 3


def test_clear_errors(run):
    cfg, tok, retriever = run
    model = make_model("retro", len(tok), tok.eos_token_id)
    with pytest.raises(GenerationError, match=r"plus max_new_tokens=500 exceeds the model's context of 512"):
        Generator(model, tok, retriever).generate([PROMPT], SamplingParams(max_new_tokens=500))
    model.cfg.extra["tokenizer"] = "0123456789abcdef"
    with pytest.raises(GenerationError, match=r"trained with tokenizer 0123456789abcdef, but the index's database"):
        Generator(model, tok, retriever)
    small = Retro(RetroConfig(vocab_size=100, d_model=32, n_layers=4, n_heads=4, cca_layers=[2]))
    with pytest.raises(GenerationError, match=r"the tokenizer has \d+ tokens, the model's vocabulary 100"):
        Generator(small, tok, retriever)
    with pytest.raises(GenerationError, match="retrieval mode 'maybe'"):
        Generator(make_model("retro", len(tok), tok.eos_token_id), tok, retriever).generate([PROMPT], mode="maybe")


def test_shard_actors_and_local_index_files_retrieve_the_same(run):
    cfg, tok, local = run
    cluster = run_retriever(cfg, Storage(), local=False)
    texts = [PROMPT, "Python is a programming language", "a chunk of text about music"]
    a, b = local.retrieve(texts, k=4), cluster.retrieve(texts, k=4)
    cluster.searcher.close()
    assert a.chunk_ids.tolist() == b.chunk_ids.tolist() and a.texts == b.texts
    assert np.allclose(a.scores, b.scores, atol=1e-5) and (a.mask.sum(-1) > 0).all()


def test_generate_command_prints_the_continuation_and_each_chunks_neighbours(run, tmp_path, capsys):
    from retro_ray.cli import main
    from retro_ray.model.io import save_pretrained

    cfg, tok, _ = run
    model = make_model("retro", len(tok), tok.eos_token_id)
    save_pretrained(model, tmp_path / "model")
    config_file = tmp_path / "config.yaml"
    config_file.write_text(cfg.to_yaml())
    args = ["generate", "--config", str(config_file), "--model", str(tmp_path / "model"), "--prompt", PROMPT,
            "--max-new-tokens", "70"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.startswith(PROMPT) and "[70 tokens, length]" in out
    assert "chunk 0: " in out and "chunk 1: " in out and out.count("  neighbour (chunk ") == 4
    assert main([*args, "--no-retrieval"]) == 0
    assert "neighbour" not in capsys.readouterr().out
    assert main(["generate", "--config", str(config_file), "--prompt", PROMPT]) == 2  # no pretrained model yet
    assert "no exported model" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["retro", "llama"])
def test_question_mode_feeds_the_questions_top_k_passages_to_every_chunk(run, kind):
    """InstructRetro's QA setting (the reference's --reuse-top): the encoder reads the top-k
    passages retrieved for the question, for every chunk, decoded with the KV cache exactly as a
    full forward pass with those neighbours at every chunk gives it."""
    from retro_ray.training.prompts import format_passage

    cfg, tok, retriever = run
    model = make_model(kind, len(tok), tok.eos_token_id).eval()
    gen = Generator(model, tok, retriever)
    question = "Python is a programming language"
    params = SamplingParams(max_new_tokens=3 * M)
    out = gen.generate([PROMPT], params, mode="question", queries=[question], keep_logits=True)[0]
    top = [format_passage(p["text"], p["title"]) for p in retriever.passages([question], gen.k)[0]]
    assert out.retrieved == []  # no chunk searched for itself
    assert [p["chunk_id"] for p in out.passages] == [p["chunk_id"] for p in retriever.passages([question], gen.k)[0]]
    given = gen.generate([PROMPT], params, mode="question", neighbor_passages=[top], keep_logits=True)[0]
    assert given.tokens == out.tokens  # the same passages, given or retrieved
    tokens, mask = gen.passage_neighbors(top)  # [k, r]
    assert mask[0].any() and tok.decode(tokens[0][mask[0]]).startswith(top[0][:20])
    ids = torch.as_tensor([tok(PROMPT, add_special_tokens=False)["input_ids"] + out.tokens[:-1]], device=gen.device)
    l = ids.shape[1] // M
    with torch.no_grad():
        logits = model(ids, tokens.expand(1, l, *tokens.shape), mask.expand(1, l, *mask.shape))[0][0]  # [n, V]
    n_prompt = out.prompt_tokens
    for step, cached in enumerate(out.logits):
        assert np.allclose(cached, logits[n_prompt - 1 + step].float().cpu().numpy(),
                           atol=LOGITS_ATOL[gen.device.type]), (kind, step)
    encoder = gen.generate([PROMPT], params, mode="encoder", keep_logits=True)[0]
    assert not np.allclose(encoder.logits[-1], out.logits[-1], atol=1e-3)  # other neighbours than per chunk


def test_questions_find_passages_by_title_words_and_bm25(run):
    cfg, tok, retriever = run
    title, text = next(iter(retriever.chunk_texts.all()))
    assert title  # the database keeps each document's title
    words = [w for w in title.split() if len(w) > 3] or title.split()
    query = f"What is known about {' '.join(words)}?"
    for search in ("bm25", "hybrid"):
        found = retriever.retrieve([query], k=5, search=search)
        assert title in found.titles[0], search  # the article the question names
    dense = retriever.retrieve([query], k=5).chunk_ids
    scores, ids = retriever.search([query], 5, "hybrid")
    assert set(ids[0]) <= set(retriever.search([query], 20, "bm25")[1][0]) | set(retriever.search([query], 20)[1][0])
    assert (np.diff(scores[0]) <= 0).all() and dense.shape == ids.shape


def test_hybrid_fusion_weighs_each_lists_normalised_scores():
    from retro_ray.retrieval.retriever import fuse

    dense = (np.array([[0.9, 0.7, 0.1]]), np.array([[1, 2, 3]]))  # normalised: 1 -> 1, 2 -> 0.75, 3 -> 0
    bm25 = (np.array([[12.0, 2.0, -np.inf]]), np.array([[3, 2, -1]]))  # 3 -> 1, 2 -> 0; -1 is no candidate
    assert fuse([dense, bm25], [0.6, 0.4], 3)[1].tolist() == [[1, 2, 3]]  # 0.6, 0.45, 0.4
    scores, ids = fuse([dense, bm25], [0.2, 0.8], 4)
    assert ids.tolist() == [[3, 1, 2, -1]] and np.allclose(scores[0, :3], [0.8, 0.2, 0.15])
    assert fuse([dense, bm25], [1.0, 0.0], 3)[1].tolist() == dense[1].tolist()


def test_passages_are_titled_and_hold_about_n_words_of_their_document(run):
    cfg, tok, retriever = run
    [rows] = retriever.passages([PROMPT], 3)
    [windows] = retriever.passages([PROMPT], 3, words=100)
    for row, window in zip(rows, windows):
        assert row["chunk_id"] == window["chunk_id"] and row["title"] == window["title"] != ""
        chunk = retriever.chunk_texts.get(np.array([row["chunk_id"]]))[row["chunk_id"]]
        assert row["text"].startswith(chunk)  # the chunk and its continuation
        assert " ".join(chunk.split()[1:-1]) in window["text"]  # the chunk's whole words, centred
        assert len(window["text"].split()) <= 100
