"""The engine on a real tiny run: every request decodes as it would alone against the
full-recompute reference, whenever it was admitted and whatever else runs; a short request is
not held behind a long one; a failing request fails alone; a cancelled one frees its room."""

import os
import time

import numpy as np
import pytest
import torch
from conftest import LOGITS_ATOL, M, PROMPT, generation_run, make_model

from retro_ray.core.storage import Storage
from retro_ray.database import tokenizer
from retro_ray.retrieval.retriever import run_retriever
from retro_ray.serving.engine import Engine, EngineConfig, GenerationError, Request, SamplingParams
from retro_ray.serving.generate import Generator
from retro_ray.serving.sequence import Status


@pytest.fixture(scope="module")
def run(built_db, tmp_path_factory):
    cfg = generation_run(built_db, tmp_path_factory.mktemp("engine"))
    return cfg, tokenizer.load_run_tokenizer(cfg, Storage()), run_retriever(cfg, Storage())


def engine_of(gen, config: EngineConfig) -> Engine:
    return Engine(gen.model, gen.tokenizer, gen.retriever, device=gen.device, config=config)


def _request(gen, prompt: str, params: SamplingParams, retrieve: bool = True, **kw) -> Request:
    return Request(gen.encode_prompt(prompt, params), params, retrieve and gen.cfg.retrieval, **kw)


@pytest.mark.parametrize("kind", ["retro", "llama", "qwen2", "qwen3", "mistral"])
def test_staggered_admission_equals_the_full_recompute_reference_alone(run, kind):
    """Mixed prompt lengths, retrieval on and off, admitted at different steps (one mid-chunk of
    another's decoding), long prompts prefilled in pieces: each equals its own reference."""
    cfg, tok, retriever = run
    model = make_model(kind, len(tok), tok.eos_token_id)
    gen = Generator(model, tok, retriever)
    ref = Generator(model, tok, retriever, use_cache=False)
    cases = [(PROMPT, 90, True), (PROMPT[:30], 70, True), (PROMPT * 3, 40, True), (PROMPT[:50], 60, False),
             (PROMPT * 2, 50, True)]
    arrive = [0, 5, 11, 37, 52]  # steps; 37 is mid-chunk for the first sequence
    engine = engine_of(gen, EngineConfig(kv_tokens=4096, max_seqs=8, prefill_tokens=48))
    assert (engine.runner.llama is not None) == (kind != "retro")  # Llama's family runs its own pass, not HF's
    seqs, step = {}, 0
    while len(seqs) < len(cases) or engine.has_work():
        for i, at in enumerate(arrive):
            if at == step:
                prompt, n, retrieve = cases[i]
                seqs[i] = engine.add(_request(gen, prompt, SamplingParams(max_new_tokens=n), retrieve))[0]
        engine.step()
        step += 1
    assert engine.stats.largest_batch >= 3 and engine.scheduler.space.used() == 0
    for i, (prompt, n, retrieve) in enumerate(cases):
        alone = ref.generate([prompt], SamplingParams(max_new_tokens=n), mode="encoder" if retrieve else "off")[0]
        s = seqs[i]
        assert s.error is None and len(s.generated) == n
        assert s.generated == alone.tokens, (kind, i)
        assert s.text == alone.text and s.retrieved == alone.retrieved
        assert bool(s.retrieved) == retrieve


def test_a_llama_with_a_wrapped_projection_keeps_the_hugging_face_pass(run):
    """The engine's own Llama pass reads plain ``nn.Linear`` weights only; a model with a wrapped
    projection (LoRA, a quantized layer) keeps Hugging Face's pass, which calls the module, and
    decodes as the reference does."""
    cfg, tok, retriever = run
    model = make_model("llama", len(tok), tok.eos_token_id)
    attn = model.base.model.layers[1].self_attn

    class Doubled(torch.nn.Linear):  # an adapter's stand-in: not F.linear of its own weight
        def forward(self, x):
            return 2 * super().forward(x)

    wrapped = Doubled(attn.v_proj.in_features, attn.v_proj.out_features, bias=attn.v_proj.bias is not None)
    wrapped.load_state_dict(attn.v_proj.state_dict())
    attn.v_proj = wrapped
    gen = Generator(model, tok, retriever)
    engine = engine_of(gen, EngineConfig(kv_tokens=512, max_seqs=2))
    assert engine.runner.llama is None
    engine.close()
    params = SamplingParams(max_new_tokens=24)
    alone = Generator(model, tok, retriever, use_cache=False).generate([PROMPT], params, keep_logits=True)[0]
    cached = gen.generate([PROMPT], params, keep_logits=True)[0]
    assert cached.tokens == alone.tokens
    atol = LOGITS_ATOL[gen.device.type]
    assert all(np.allclose(a, b, atol=atol) for a, b in zip(cached.logits, alone.logits))


@pytest.mark.parametrize("kind", ["mistral", "gemma3"])
def test_a_sliding_window_model_decodes_as_its_own_hugging_face_attention(run, kind):
    """A base whose layers attend within a sliding window (Mistral's all, Gemma 3's every other)
    decodes in the engine, past the window, as Hugging Face's own SDPA attention computes it, on
    the engine's own pass (Mistral) and on Hugging Face's (Gemma 3); its full-recompute reference
    too (the window is not lost once the engine's attention is installed)."""
    cfg, tok, retriever = run
    model = make_model(kind, len(tok), tok.eos_token_id)
    window = model.base.config.sliding_window
    params = SamplingParams(max_new_tokens=3 * window)
    gen = Generator(model, tok, retriever)
    engine = engine_of(gen, EngineConfig(kv_tokens=512, max_seqs=2))
    assert (engine.runner.llama is not None) == (kind == "mistral")
    engine.close()
    cached = gen.generate([PROMPT], params, mode="off", keep_logits=True)[0]
    full = Generator(model, tok, retriever, use_cache=False).generate([PROMPT], params, mode="off",
                                                                      keep_logits=True)[0]
    ids = torch.tensor([tok(PROMPT, add_special_tokens=False)["input_ids"] + cached.tokens[:-1]])  # [1, n]
    assert ids.shape[1] > 2 * window
    model.base.set_attn_implementation("sdpa")
    with torch.no_grad():
        own = model.base(ids).logits[0, -len(cached.logits):]  # [new, V]: Hugging Face's own masks
        for holder in (model.base.config, *(layer.self_attn for layer in model.base.model.layers)):
            if getattr(holder, "sliding_window", None):
                holder.sliding_window = 10**6  # a window the sequence never leaves
        unwindowed = model.base(ids).logits[0, -1]
    atol = LOGITS_ATOL[gen.device.type]
    assert cached.tokens == full.tokens
    for step, (a, b, c) in enumerate(zip(cached.logits, full.logits, own.float().cpu().numpy())):
        assert np.allclose(a, c, atol=atol) and np.allclose(b, c, atol=atol), step
    assert not np.allclose(unwindowed.float().cpu().numpy(), cached.logits[-1], atol=1e-3)  # the window matters


def test_a_model_whose_attention_soft_caps_its_logits_is_refused_at_start(run):
    """Gemma 2's attention caps its logits; the packed attention cannot, so the engine says so
    when it starts instead of decoding other logits than the model's."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from retro_ray.core.errors import UserError
    from retro_ray.model.retrofit import RetroFit, retrofit_config

    cfg, tok, retriever = run
    base = Gemma2ForCausalLM(Gemma2Config(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, head_dim=8, intermediate_size=64))
    gen = Generator(RetroFit(base, retrofit_config(base, chunk_length=M, k=2, encoder_layers=1, cca_layers=[2])), tok,
                    retriever)
    with pytest.raises(UserError, match="attn_logit_softcapping=50"):
        engine_of(gen, EngineConfig(kv_tokens=512, max_seqs=2))


def test_a_short_request_finishes_while_a_long_one_decodes(run):
    cfg, tok, retriever = run
    gen = Generator(make_model("retro", len(tok), tok.eos_token_id), tok, retriever)
    engine = engine_of(gen, EngineConfig(kv_tokens=2048, max_seqs=4))
    long = engine.add(_request(gen, PROMPT, SamplingParams(max_new_tokens=200)))[0]
    for _ in range(10):
        engine.step()
    short = engine.add(_request(gen, PROMPT[:20], SamplingParams(max_new_tokens=4)))[0]
    while not short.done:
        engine.step()
    assert not long.done and short.finish == "length" and len(long.generated) < 30


def test_static_policy_admits_only_when_empty(run):
    cfg, tok, retriever = run
    gen = Generator(make_model("retro", len(tok), tok.eos_token_id), tok, retriever)
    engine = engine_of(gen, EngineConfig(kv_tokens=2048, max_seqs=4, policy="static"))
    long = engine.add(_request(gen, PROMPT, SamplingParams(max_new_tokens=40)))[0]
    engine.step()
    short = engine.add(_request(gen, PROMPT[:20], SamplingParams(max_new_tokens=4)))[0]
    while not short.done:
        engine.step()
    assert long.done and long.finish == "length"


def test_a_poisoned_request_fails_alone(run):
    cfg, tok, retriever = run
    gen = Generator(make_model("retro", len(tok), tok.eos_token_id), tok, retriever)
    engine = engine_of(gen, EngineConfig(kv_tokens=4096, max_seqs=8))
    poison = SamplingParams(max_new_tokens=30, temperature=float("nan"))  # no distribution to sample
    reqs = [_request(gen, PROMPT[: 20 + 9 * i], poison if i == 3 else SamplingParams(max_new_tokens=30))
            for i in range(8)]
    seqs = engine.run(reqs)
    assert [s.error is None for s in seqs] == [i != 3 for i in range(8)]
    assert "sampling failed" in seqs[3].error and seqs[3].news() == {"error": seqs[3].error, "fault": "request"}
    assert all(len(s.generated) == 30 for i, s in enumerate(seqs) if i != 3)


def test_a_retrieval_that_fails_or_times_out_fails_its_sequence_alone(run):
    cfg, tok, retriever = run

    class Flaky:
        """The run's retriever, failing or stalling on one text (what a dead shard does)."""
        tokenizer_id = getattr(retriever, "tokenizer_id", None)

        def __init__(self, how):
            self.how = how

        def retrieve(self, texts, k, timeout_s=None):
            if any("Zanzibar" in t for t in texts):
                if self.how == "stall":
                    time.sleep(3)
                raise ConnectionError("shard 0 is gone")
            return retriever.retrieve(texts, k)

    model = make_model("retro", len(tok), tok.eos_token_id)
    for how in ("fail", "stall"):
        gen = Generator(model, tok, Flaky(how))
        engine = engine_of(gen, EngineConfig(kv_tokens=4096, max_seqs=4, retrieval_timeout_s=1.0))
        bad = engine.add(_request(gen, "Zanzibar " * 40, SamplingParams(max_new_tokens=10)))  # a complete chunk
        if how == "stall":
            engine.step()  # its query is out before the other's: they are not one batch
        seqs = bad + engine.add(_request(gen, PROMPT, SamplingParams(max_new_tokens=80)))
        while engine.has_work():
            engine.step()
        assert seqs[0].error == ("retrieval timed out after 1 s" if how == "stall" else
                                 "retrieval failed: ConnectionError: shard 0 is gone")
        assert seqs[1].error is None and len(seqs[1].generated) == 80 and seqs[1].retrieved
        assert engine.scheduler.space.used() == 0


def test_a_cancelled_sequence_frees_its_room_at_the_next_step(run):
    cfg, tok, retriever = run
    gen = Generator(make_model("retro", len(tok), tok.eos_token_id), tok, retriever)
    engine = engine_of(gen, EngineConfig(kv_tokens=700, max_seqs=4))
    first = engine.add(_request(gen, PROMPT, SamplingParams(max_new_tokens=300)))
    for _ in range(3):
        engine.step()
    used = engine.scheduler.space.used()
    waiting = engine.add(_request(gen, PROMPT, SamplingParams(max_new_tokens=300)))[0]  # no room beside it
    engine.step()
    assert used > 0 and waiting.offset < 0 and engine.stats.waiting == 1
    engine.cancel(first)
    engine.step()
    assert first[0].finish == "cancelled" and waiting.offset >= 0 and engine.scheduler.space.used() == used
    with pytest.raises(GenerationError, match="never fit"):
        engine.add(Request(list(range(5, 405)), SamplingParams(max_new_tokens=400)))  # 800 > kv_tokens


def test_n_forks_share_one_prefill_and_each_samples_its_own(run):
    cfg, tok, retriever = run
    gen = Generator(make_model("retro", len(tok), tok.eos_token_id), tok, retriever)
    params = SamplingParams(max_new_tokens=70, temperature=0.9, seed=5)
    engine = engine_of(gen, EngineConfig(kv_tokens=4096, max_seqs=4))
    forks = engine.add(_request(gen, PROMPT * 2, params), n=3)
    while engine.has_work():
        engine.step()
    alone = [gen.generate([PROMPT * 2], [SamplingParams(max_new_tokens=70, temperature=0.9, seed=5 + i)])[0]
             for i in range(3)]
    assert [f.generated for f in forks] == [a.tokens for a in alone]  # forked = prefilled apiece
    assert len({tuple(f.generated) for f in forks}) == 3
    assert all(f.retrieved for f in forks) and engine.scheduler.space.used() == 0


def test_a_malformed_retrieval_fails_its_own_sequence_and_retries_stop_at_the_deadline(run):
    """A retriever that returns the wrong number of rows fails only the sequence whose query it
    cannot answer (asked again alone), and a batch that fails is retried only while time is left:
    the engine goes on, no pool thread is held past the deadline by retries."""
    cfg, tok, retriever = run

    class Short:
        tokenizer_id = getattr(retriever, "tokenizer_id", None)

        def retrieve(self, texts, k, timeout_s=None):
            found = retriever.retrieve(texts, k)
            return found.slice(0, len(texts) - 1) if any("Zanzibar" in t for t in texts) else found

    class Refusing(Short):
        def __init__(self):
            self.calls = []

        def retrieve(self, texts, k, timeout_s=None):
            self.calls.append((len(texts), timeout_s))
            if len(texts) > 1:
                raise ConnectionError("the batch is refused")
            time.sleep(1.5)  # alone, each takes longer than the timeout
            return retriever.retrieve(texts, k)

    model = make_model("retro", len(tok), tok.eos_token_id)
    gen = Generator(model, tok, Short())
    engine = engine_of(gen, EngineConfig(kv_tokens=4096, max_seqs=4))
    bad = engine.add(_request(gen, "Zanzibar " * 40, SamplingParams(max_new_tokens=10)))[0]  # asked together
    good = engine.add(_request(gen, PROMPT, SamplingParams(max_new_tokens=80)))[0]
    while engine.has_work():
        engine.step()
    n = bad.prompt_len // M
    assert bad.error == f"retrieval failed: ValueError: the retriever returned {n - 1} rows for {n} texts"
    assert good.error is None and len(good.generated) == 80 and good.retrieved
    refusing = Refusing()
    gen = Generator(model, tok, refusing)
    engine = engine_of(gen, EngineConfig(kv_tokens=4096, max_seqs=4, retrieval_timeout_s=1.0))
    seqs = [engine.add(_request(gen, p, SamplingParams(max_new_tokens=10)))[0] for p in (PROMPT, PROMPT * 2)]
    chunks = [s.prompt_len // M for s in seqs]
    start = time.perf_counter()
    while engine.has_work():
        engine.step()
    assert time.perf_counter() - start < 1.4 and [s.error for s in seqs] == ["retrieval timed out after 1 s"] * 2
    engine.close()
    engine.pool.shutdown(wait=True)
    assert [n for n, _ in refusing.calls] == [sum(chunks), chunks[0]]  # the batch, one retry; none had time left after
    assert all(0 < left <= 1.0 for _, left in refusing.calls)


def test_a_local_retriever_computes_without_an_openmp_team_of_its_own(run):
    """The engine's retrieval thread runs a local retriever's embedder on one thread, its matrix
    products included (MKL keeps a thread count of its own, used in full once
    ``torch.set_num_threads`` has been called, as replicas and benchmarks do): with a second team
    in the process, libgomp stops spinning between the parallel regions of the decoding thread,
    whose workers then sleep and wake at each of them, for as long as the retrieval thread lives
    (two sleeps a region; 530 a step and 55 ms instead of 30 for the SmolLM2 retro-fit on 2
    cores). The decoding thread, and threads started later, keep torch's thread count."""
    import threading

    import torch

    cfg, tok, retriever = run
    seen = []

    class Counting:
        def retrieve(self, texts, k, timeout_s=None):
            seen.append(torch.get_num_threads())
            return retriever.retrieve(texts, k, timeout_s=timeout_s)

    threads = torch.get_num_threads()
    torch.set_num_threads(threads)  # as a replica or a benchmark sets it: MKL then uses every thread it is given
    gen = Generator(make_model("retro", len(tok), tok.eos_token_id), tok, Counting())
    engine = engine_of(gen, EngineConfig(kv_tokens=2048, max_seqs=2))
    [seq] = engine.add(_request(gen, PROMPT, SamplingParams(max_new_tokens=M)))
    while not seq.done and not (seq.retrieved and seq.status == Status.RUNNING):
        engine.step()  # until the prompt's neighbours are in: the pool's thread has embedded
    a, b = torch.ones(1 << 20), torch.ones(1 << 20)
    sleeps = voluntary_switches()
    for _ in range(100):  # 100 parallel regions on the decoding thread
        a.add_(b)
    sleeps = voluntary_switches() - sleeps
    later = []
    t = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
    t.start()
    t.join()
    engine.close()
    assert seq.error is None and seen and set(seen) == {1}
    assert sleeps < 50, f"the process's threads slept {sleeps} times in 100 parallel regions"
    assert torch.get_num_threads() == threads and later == [threads]


def voluntary_switches() -> int:
    """How many times this process's threads have slept (given up their core) so far."""
    total = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("voluntary_ctxt_switches"))
        except OSError:  # a thread that ended meanwhile
            pass
    return total
