"""The decoding engine: continuous batching (Orca's iteration-level scheduling, as vLLM and TGI do)
with retrieval inside the loop, for ``Retro`` and retro-fitted Hugging Face models.

Every ``step``: finished and cancelled sequences leave, waiting ones are admitted while the token
budget has room, newcomers are prefilled (a long prompt in pieces of ``prefill_tokens``, so the
others keep decoding while it enters), and every running sequence decodes one token, sampled with
its own settings. When a sequence completes a chunk, its query goes to the retriever in a worker
thread; the queries of one step are one batched call, the sequence waits (parked) for its
neighbours and the others go on. Retrieval follows training's causal shift exactly: the token that
completes chunk u is the first to see chunk u's neighbours, encoded against that chunk's states at
the first CCA layer. An error in one sequence (sampling, its retrieval failing or timing out) ends
that sequence alone.

Memory is allocated once and reused (``retro_ray.arena``): the keys and values of every sequence
live in one arena of ``kv_tokens`` positions (a sequence reserves its prompt plus
``max_new_tokens``); per-sequence state (the CCA keys of its current chunk) lives in ``max_seqs`` rows.

``use_cache=False`` recomputes each sequence alone from scratch every step (the same schedule,
retrievals and sampling): the reference that the cache is tested and benchmarked against.

Notation: b sequences in a pass, T positions per sequence in a pass, V vocabulary. Imports no Ray.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from typing import Callable, Literal

import numpy as np
import torch

from retro_ray.arena import Arena, ChunkStore, LayerView, PassNeighbors, hf_cache
from retro_ray.errors import UserError
from retro_ray.model.retro import Retro


class GenerationError(UserError, ValueError):
    """A request the model cannot serve: too long, wrong tokenizer, unknown mode, bad settings."""


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0
    """Below 1e-5 (0 included): greedy, as vLLM does (logits / 1e-30 overflow)."""
    top_k: int = 0
    """Sample among the k most likely tokens; 0: all."""
    top_p: float = 1.0
    """Sample among the most likely tokens whose probabilities add up to top_p."""
    stop: list[str] = field(default_factory=list)
    """The output ends before the first of these strings (end of text ends it too)."""
    seed: int | None = None
    ignore_eos: bool = False
    """Decode past the end of text (benchmarks: every run decodes the same number of tokens)."""


@dataclass
class EngineConfig:
    kv_tokens: int = 16384
    """Positions of the key/value arena shared by all sequences; each reserves prompt + max_new_tokens."""
    max_seqs: int = 32
    """Sequences decoded together at most."""
    prefill_tokens: int = 256
    """Prompt tokens prefilled per step (chunked prefill): bounds the pause a newcomer causes."""
    policy: Literal["continuous", "static"] = "continuous"
    """``static`` admits only when the engine is empty (a batch runs to its end): the baseline."""
    retrieval_timeout_s: float = 30.0
    use_cache: bool = True


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from next-token logits [V]."""
    if params.temperature < 1e-5:
        return int(torch.argmax(logits))
    logits = logits.float() / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, -1)
        drop = probs.cumsum(-1) - probs >= params.top_p  # keep the first token that reaches top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return int(torch.multinomial(torch.softmax(logits, -1).cpu(), 1, generator=generator))


def unsettled(text: str, stop: list[str]) -> int:
    """How many characters at the end of an unfinished output later tokens may still change (not
    streamed yet): a trailing incomplete character, or an ending that may begin a stop string."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    held = max((n for s in stop for n in range(1, len(s)) if text.endswith(s[:n], 0, end)), default=0)
    return len(text) - end + held


# -- sequences ----------------------------------------------------------------------------------


class IncrementalText:
    """Detokenises one token at a time at O(new text) cost (the offsets scheme of TGI and vLLM):
    only the last few tokens are decoded again, and a character split across tokens waits."""

    def __init__(self, tokenizer):
        self.tok, self.ids, self.prefix, self.read = tokenizer, [], 0, 0

    def add(self, token: int) -> str:
        self.ids.append(token)
        before = self.tok.decode(self.ids[self.prefix:self.read])
        now = self.tok.decode(self.ids[self.prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            new = now[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
            return new
        return ""

    def flush(self) -> str:
        """The text ``add`` has held back so far (a trailing incomplete character)."""
        before = self.tok.decode(self.ids[self.prefix:self.read])
        return self.tok.decode(self.ids[self.prefix:])[len(before):]


@dataclass
class Request:
    ids: list[int]
    """Prompt token ids (checked by ``Generator.encode_prompt``)."""
    params: SamplingParams
    retrieve: bool = False
    """Feed neighbours to the encoder (no effect without one)."""
    fixed: tuple[torch.Tensor, torch.Tensor] | None = None
    """Neighbours [k, r] (tokens, mask) for every chunk (question mode) instead of retrieving."""
    listener: Callable[["Sequence", dict], None] | None = None
    """Called from the engine's thread with each step's news (``Sequence.news``)."""
    keep_logits: bool = False


class Sequence:
    """One request's state in the engine."""

    _ids = itertools.count()

    def __init__(self, req: Request, tokenizer, eos: int | None):
        self.id = next(Sequence._ids)
        self.req, self.params = req, req.params
        self.ids, self.prompt_len = list(req.ids), len(req.ids)
        self.need = self.prompt_len + self.params.max_new_tokens
        self.eos = eos
        self.generated: list[int] = []
        self.detok = IncrementalText(tokenizer)
        self.text, self.sent = "", 0  # the output so far; how much of it has been sent
        self.finish: str | None = None
        self.error: str | None = None
        self.cancelled = False
        self.fork_of: Sequence | None = None
        """Set until its parent's prompt is in: then it starts from a copy of the parent's cache."""
        self.fed = 0  # tokens whose keys are in the cache
        self.offset, self.row = -1, -1
        self.ready: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # chunk -> neighbours not yet encoded
        self.encoded: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # all of them (use_cache=False only)
        self.pending: tuple[Future, int, list[int], list[str]] | None = None
        """A retrieval in flight: (future, this sequence's place in its batch, chunks, their texts)."""
        self.pending_since = 0.0
        self.retrieved: list[dict] = []
        self.logits: list[np.ndarray] = []
        self.rng = torch.Generator().manual_seed(self.params.seed if self.params.seed is not None
                                                 else time.time_ns() + self.id)
        self.arrived = time.perf_counter()
        self.first_token_at: float | None = None

    @property
    def done(self) -> bool:
        return self.finish is not None

    def fail(self, message: str) -> None:
        if not self.done:
            self.error, self.finish = message, "error"

    def append(self, token: int) -> None:
        """A sampled token: the stop rules, incremental text."""
        p = self.params
        self.ids.append(token)
        if token == self.eos and not p.ignore_eos:
            self.text, self.finish = self.text + self.detok.flush(), "stop"
            return
        self.generated.append(token)
        start = max(0, len(self.text) - max((len(s) for s in p.stop), default=1) + 1)
        self.text += self.detok.add(token)
        cut = min((i for s in p.stop if s and (i := self.text.find(s, start)) >= 0), default=-1)
        if cut >= 0:
            self.text, self.finish = self.text[:cut], "stop"
        elif len(self.generated) == p.max_new_tokens:
            self.text, self.finish = self.text + self.detok.flush(), "length"

    def news(self) -> dict:
        """What changed since the last call: ``text`` (the new text that later tokens cannot change),
        ``completion_tokens``, ``finish_reason`` (None while running) and, when done, ``neighbors``;
        or ``error``."""
        if self.error is not None:
            return {"error": self.error}
        ready = len(self.text) - (0 if self.done else unsettled(self.text, self.params.stop))
        delta = self.text[self.sent:ready]  # O(new text): a stop string is cut after what was sent
        self.sent = max(self.sent, ready)
        out = {"text": delta, "completion_tokens": len(self.ids) - self.prompt_len,
               "finish_reason": self.finish}
        if self.done:
            out["neighbors"] = [{"chunk": r["chunk"], "neighbors": [
                {k: n[k] for k in ("chunk_id", "doc_id", "score")} for n in r["neighbors"]]}
                for r in self.retrieved]
        return out


# -- the engine ---------------------------------------------------------------------------------


@dataclass
class EngineStats:
    """Counters and gauges of an engine's life (fixed size: nothing grows per request)."""

    steps: int = 0
    admitted: int = 0
    finished: int = 0
    failed: int = 0
    cancelled: int = 0
    tokens: int = 0
    """Tokens sampled."""
    retrievals: int = 0
    """Batched retriever calls."""
    retrieval_s: float = 0.0
    waiting: int = 0
    running: int = 0
    largest_batch: int = 0


class Engine:
    """Continuous batching over a ``Generator``'s model, tokenizer and retriever.

    ``add`` a request (from any thread) and drive ``step`` (one thread), or ``run`` a list of
    requests to their end. Each sequence's news goes to its request's ``listener``.
    """

    def __init__(self, gen, config: EngineConfig | None = None):
        self.gen, self.config = gen, config or EngineConfig()
        self.model, self.m, self.k = gen.model, gen.m, gen.k
        c = self.config
        self.arena = Arena(c.kv_tokens, gen.device)
        self.hf_cache = None if isinstance(self.model, Retro) else hf_cache(self.arena)
        self.store = ChunkStore(self.model, c.max_seqs, c.kv_tokens) if gen.cfg.retrieval else None
        self.free_rows = list(range(c.max_seqs))[::-1]
        self.waiting: deque[list[Sequence]] = deque()  # groups: a request's n sequences enter together
        self.running: list[Sequence] = []
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.pool = ThreadPoolExecutor(4, thread_name_prefix="retro-ray-retrieve")  # a stalled call blocks no other
        self.queries: list[tuple[Sequence, list[int]]] = []  # this step's chunks to retrieve
        self.stats = EngineStats()

    # -- requests ------------------------------------------------------------------------------

    def add(self, req: Request, n: int = 1) -> list[Sequence]:
        """Queue ``n`` sequences of one request (n > 1: prefilled once, then forked); they start at
        a coming step. A request that can never fit is a ``GenerationError``."""
        vocab = self.gen.cfg.vocab_size
        if not req.ids or min(req.ids) < 0 or max(req.ids) >= vocab:
            raise GenerationError(f"prompt token ids must be 0..{vocab - 1}, and at least one")
        seqs = [Sequence(req, self.gen.tokenizer, self.gen.eos) for _ in range(n)]
        need = seqs[0].need * n
        if need > self.config.kv_tokens or n > self.config.max_seqs:
            raise GenerationError(
                f"{n} sequence(s) of {seqs[0].need} tokens (prompt + max_tokens) never fit this engine "
                f"(kv_tokens={self.config.kv_tokens}, max_seqs={self.config.max_seqs})")
        if n > 1 and req.params.seed is not None:
            for i, s in enumerate(seqs):
                s.rng.manual_seed(req.params.seed + i)
        for child in seqs[1:]:
            child.fork_of = seqs[0]
        with self.lock:
            self.waiting.append(seqs)
        self.wake.set()
        return seqs

    def cancel(self, seqs: list[Sequence]) -> None:
        """Their client left: they leave at the next step (thread-safe)."""
        for s in seqs:
            s.cancelled = True
        self.wake.set()

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def run(self, reqs: list[Request]) -> list[Sequence]:
        """Every request to its end (one sequence each), in this thread."""
        seqs = [self.add(r)[0] for r in reqs]
        while self.has_work():
            self.step()
        return seqs

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    # -- one step ------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> None:
        """Drop the finished and the cancelled, collect retrievals, admit, decode a token for every
        running sequence, prefill newcomers (``prefill_tokens`` at most), send retrieval queries."""
        self.stats.steps += 1
        touched: set[Sequence] = set()
        self._drop_cancelled()
        self._collect(touched)
        self._admit()
        ran = self._decode(touched)
        ran = self._prefill(touched) or ran
        self._send_queries()
        for seq in sorted(touched, key=lambda s: s.id):
            self._notify(seq)
        with self.lock:
            self.stats.waiting = sum(len(g) for g in self.waiting)
        self.stats.running = len(self.running)
        if not ran and not touched:  # every sequence waits for its neighbours
            pending = {s.pending[0] for s in self.running if s.pending is not None}
            if pending:
                wait_futures(pending, timeout=0.05, return_when="FIRST_COMPLETED")

    def _notify(self, seq: Sequence) -> None:
        news = seq.news()
        if seq.req.listener is not None and ("error" in news or news["text"] or news["finish_reason"]):
            seq.req.listener(seq, news)
        if seq.done:
            self._release(seq)
            st = self.stats
            st.finished += 1
            st.failed += seq.error is not None

    def _release(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
            self.arena.release(seq.offset, seq.need)
            self.free_rows.append(seq.row)
            seq.ready.clear()
            seq.encoded.clear()

    def _drop_cancelled(self) -> None:
        for seq in [s for s in self.running if s.cancelled and not s.done]:
            seq.finish = "cancelled"
            self.stats.cancelled += 1
            self._release(seq)
        with self.lock:
            self.waiting = deque(g for g in self.waiting if not all(s.cancelled for s in g))

    def _admit(self) -> None:
        if self.config.policy == "static" and self.running:
            return
        with self.lock:
            while self.waiting and len(self.free_rows) >= len(self.waiting[0]):
                group = self.waiting[0]
                offsets = [self.arena.alloc(s.need) for s in group]
                if None in offsets:
                    for s, off in zip(group, offsets):
                        if off is not None:
                            self.arena.release(off, s.need)
                    break  # first come, first served: the head waits for room, nobody overtakes it
                self.waiting.popleft()
                for s, off in zip(group, offsets):
                    s.offset, s.row = off, self.free_rows.pop()
                    if self.store is not None:
                        self.store.chunk[s.row] = -1
                    self.running.append(s)
                self.stats.admitted += len(group)
                head = group[0]
                if head.req.retrieve:
                    self._want(head, list(range(head.prompt_len // self.m)))

    # -- retrieval -----------------------------------------------------------------------------

    def _want(self, seq: Sequence, chunks: list[int]) -> None:
        """Neighbours for ``chunks`` of ``seq``: its fixed ones at once, else queued for this
        step's batched query (the sequence waits for them)."""
        if not chunks:
            return
        if seq.req.fixed is not None:
            for u in chunks:
                self._give(seq, u, seq.req.fixed)
            return
        seq.pending = (None, 0, chunks, [])
        self.queries.append((seq, chunks))

    def _give(self, seq: Sequence, u: int, neighbors: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Chunk u's neighbours (tokens, mask [k, r]): encoded at the pass that feeds its last
        token (kept for every later step by the reference, which recomputes from scratch)."""
        seq.ready[u] = neighbors
        if not self.config.use_cache:
            seq.encoded[u] = neighbors

    def _send_queries(self) -> None:
        if not self.queries:
            return
        m, tok = self.m, self.gen.tokenizer
        texts = [tok.decode(seq.ids[u * m:(u + 1) * m]) for seq, us in self.queries for u in us]
        sizes = [len(us) for _, us in self.queries]
        future = self.pool.submit(_retrieve_apart, self.gen.retriever, texts, sizes, self.k)
        first, now = 0, time.perf_counter()
        for j, (seq, us) in enumerate(self.queries):
            seq.pending, seq.pending_since = (future, j, us, texts[first:first + len(us)]), now
            first += len(us)
        self.queries = []
        self.stats.retrievals += 1

    def _collect(self, touched: set) -> None:
        """Neighbours that have come in; a failed or timed-out retrieval fails its sequences."""
        timeout, device = self.config.retrieval_timeout_s, self.gen.device
        seen: set[int] = set()
        for seq in self.running:
            if seq.pending is None or seq.done:
                continue
            future, j, us, texts = seq.pending
            if not future.done():
                if time.perf_counter() - seq.pending_since > timeout:
                    seq.pending = None
                    seq.fail(f"retrieval timed out after {timeout:g} s")
                    touched.add(seq)
                continue
            seq.pending = None
            found, first, seconds = future.result()[j]
            if id(future) not in seen:
                seen.add(id(future))
                self.stats.retrieval_s += seconds
            if isinstance(found, Exception):  # the retriever's failure is this sequence's, not the engine's
                seq.fail(f"retrieval failed: {type(found).__name__}: {found}")
                touched.add(seq)
                continue
            for i, u in enumerate(us):
                self._give(seq, u, (torch.as_tensor(found.tokens[first + i], device=device),
                                    torch.as_tensor(found.mask[first + i], device=device)))
                seq.retrieved.append({"chunk": u, "text": texts[i], "neighbors": found.describe(first + i)})

    # -- passes --------------------------------------------------------------------------------

    def _decode(self, touched: set) -> bool:
        """One token for every running sequence whose last token is not in the cache yet."""
        rows = [s for s in self.running if not s.done and s.pending is None and s.fed >= s.prompt_len
                and s.fed == len(s.ids) - 1]
        if not rows:
            return False
        self.stats.largest_batch = max(self.stats.largest_batch, len(rows))
        try:
            if self.config.use_cache:
                device = self.gen.device
                tokens = torch.as_tensor([s.ids[-1] for s in rows], device=device)[:, None]  # [b, 1]
                positions = torch.as_tensor([s.fed for s in rows], device=device)[:, None]  # [b, 1]
                new = [self._completed(s, s.fed, s.fed + 1) for s in rows]
                logits = self._forward(rows, tokens, positions, new)[:, -1]  # [b, V]
            else:
                logits = torch.stack([self._reference(s) for s in rows])  # [b, V]
        except Exception as e:
            self._fail_pass(rows, e, touched)
            return True
        for i, s in enumerate(rows):
            s.fed += 1
            self._sample(s, logits[i], touched)
        return True

    def _prefill(self, touched: set) -> bool:
        """Newcomers' prompts, at most ``prefill_tokens`` this step; a prompt that is all in
        samples its first token (and its forks theirs)."""
        budget, ran = self.config.prefill_tokens, False
        for s in list(self.running):
            if budget <= 0:
                break
            if s.fork_of is not None and s.fork_of.done:  # its parent failed before forking
                s.fail(s.fork_of.error or "its request ended before it started")
                touched.add(s)
            if s.done or s.pending is not None or s.fed >= s.prompt_len or s.fork_of is not None:
                continue
            T = min(budget, s.prompt_len - s.fed) if self.config.use_cache else s.prompt_len - s.fed
            try:
                if self.config.use_cache:
                    device = self.gen.device
                    tokens = torch.as_tensor(s.ids[s.fed:s.fed + T], device=device)[None]  # [1, T]
                    positions = torch.arange(s.fed, s.fed + T, device=device)[None]  # [1, T]
                    logits = self._forward([s], tokens, positions, [self._completed(s, s.fed, s.fed + T)])[0, -1]
                else:
                    logits = self._reference(s)
            except Exception as e:
                self._fail_pass([s], e, touched)
                continue
            s.fed += T
            budget -= T
            ran = True
            if s.fed == s.prompt_len:
                for child in self._forks(s):
                    self._sample(child, logits, touched)
                self._sample(s, logits, touched)
        return ran

    def _forks(self, parent: Sequence) -> list[Sequence]:
        """The sequences forked from ``parent`` once its prompt is in: its cache copied, not recomputed."""
        children = [c for c in self.running if c.fork_of is parent]
        for c in children:
            self.arena.copy(parent.offset, c.offset, parent.prompt_len)
            if self.store is not None:
                if self.store.states is not None:
                    self.store.states[c.offset:c.offset + parent.prompt_len] = \
                        self.store.states[parent.offset:parent.offset + parent.prompt_len]
                self.store.copy_row(parent.row, c.row)
            c.fed, c.fork_of = parent.prompt_len, None
            c.retrieved = list(parent.retrieved)
            c.encoded = dict(parent.encoded)
        return children

    def _completed(self, s: Sequence, start: int, end: int) -> list[tuple]:
        """The chunks whose last position is in start..end-1 and whose neighbours are in: encoded
        in this pass."""
        m = self.m
        return [(u, *s.ready.pop(u)) for u in range(start // m, end // m) if u * m + m - 1 >= start and u in s.ready]

    def _forward(self, rows: list[Sequence], tokens: torch.Tensor, positions: torch.Tensor, new) -> torch.Tensor:
        """tokens, positions [b, T] of sequences ``rows`` -> logits [b, T, V], through the arena."""
        offsets = torch.as_tensor([s.offset for s in rows], device=tokens.device)
        self.arena.begin(offsets, positions)
        retrieved = None
        if self.store is not None and any(s.req.retrieve for s in rows):
            retrieved = PassNeighbors(self.store, [s.row for s in rows], offsets, positions, new)
        if self.hf_cache is None:
            layers = [LayerView(self.arena, i) for i in range(len(self.model.blocks))]
            return self.model.decode(tokens, positions, retrieved, layers)
        logits, _ = self.model.decode(tokens, positions, retrieved, self.arena.mask, self.hf_cache)
        return logits

    def _reference(self, s: Sequence) -> torch.Tensor:
        """use_cache=False: sequence ``s`` alone, from scratch -> next-token logits [V]."""
        gen, m = self.gen, self.m
        tokens = torch.as_tensor(s.ids, device=gen.device)[None]  # [1, n]
        neighbors = mask = None
        l = len(s.ids) // m
        if s.req.retrieve and self.store is not None and l:
            k, r = self.k, 2 * m
            neighbors = torch.full((1, l, k, r), gen.pad, dtype=torch.long, device=gen.device)
            mask = torch.zeros((1, l, k, r), dtype=torch.bool, device=gen.device)
            for u, (t, msk) in s.encoded.items():
                if u < l:
                    neighbors[0, u], mask[0, u] = t, msk
        return self.model(tokens, neighbors, mask)[0][0, -1]

    def _sample(self, s: Sequence, logits: torch.Tensor, touched: set) -> None:
        """Sequence ``s``'s next token from logits [V]; a chunk it completes is queried."""
        touched.add(s)
        try:
            if s.req.keep_logits:
                s.logits.append(logits.float().cpu().numpy())
            s.append(sample(logits, s.params, s.rng))
        except Exception as e:  # this request's settings or text, not the engine
            s.fail(f"sampling failed: {type(e).__name__}: {e}")
            return
        self.stats.tokens += 1
        if s.first_token_at is None:
            s.first_token_at = time.perf_counter()
        if not s.done and s.req.retrieve and self.store is not None and len(s.ids) % self.m == 0:
            self._want(s, [len(s.ids) // self.m - 1])

    def _fail_pass(self, rows: list[Sequence], e: Exception, touched: set) -> None:
        for s in rows:
            s.fail(f"the model failed: {type(e).__name__}: {e}")
            touched.add(s)


def _retrieve_apart(retriever, texts: list[str], sizes: list[int], k: int) -> list[tuple]:
    """One batched query for the chunks of several sequences (``sizes`` texts each) -> per
    sequence (found or its exception, its first row in found, seconds). If the batch fails, each
    sequence is asked again alone, so that one bad query fails only its own sequence."""
    start = time.perf_counter()
    firsts = [sum(sizes[:j]) for j in range(len(sizes))]
    try:
        found = retriever.retrieve(texts, k)
        return [(found, first, time.perf_counter() - start) for first in firsts]
    except Exception as e:
        if len(sizes) == 1:
            return [(e, 0, time.perf_counter() - start)]
    out = []
    for first, n in zip(firsts, sizes):
        try:
            out.append((retriever.retrieve(texts[first:first + n], k), 0, 0.0))
        except Exception as e:
            out.append((e, 0, 0.0))
    out[0] = (out[0][0], out[0][1], time.perf_counter() - start)
    return out
