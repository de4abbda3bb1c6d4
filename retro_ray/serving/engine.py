"""The decoding engine: continuous batching (Orca's iteration-level scheduling, as vLLM and TGI do)
with retrieval inside the loop, for ``Retro`` and retro-fitted Hugging Face models.

The engine joins two parts that do not know each other, as vLLM v1's engine core does:

- ``scheduler.Scheduler`` decides, from the sequences' states alone, what every step does: who
  joins (cache positions and a row), who decodes, which prompt slices prefill within the step's
  token budget, which chunks' neighbours are asked for;
- ``runner.ModelRunner`` executes that plan: one packed forward, the step's tokens sampled.

``step`` takes the requests added since the last step (from any thread), collects neighbours that
came in, asks the scheduler for a plan, sends its queries to the retriever (a worker thread; the
queries of one step are one batched call), has the runner run the pass, hands the tokens back to
the scheduler, and tells each sequence's listener what changed. Retrieval follows training's
causal shift exactly: the token that completes chunk u is the first to see chunk u's neighbours,
encoded against that chunk's states at the first CCA layer. An error stays with its sequence: a
sampling error, a retrieval that fails, times out or returns the wrong rows; a pass that raises
fails the sequences in it. Imports no Ray.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass

import torch

from retro_ray.serving.runner import ModelRunner
from retro_ray.serving.scheduler import EngineConfig, Scheduler
from retro_ray.serving.sequence import GenerationError, Request, SamplingParams, Sequence, Status

__all__ = ["Engine", "EngineConfig", "EngineStats", "GenerationError", "Request", "SamplingParams", "Sequence"]


@dataclass
class EngineStats:
    """Counters and gauges of an engine's life (fixed size: nothing grows per request)."""

    steps: int = 0
    admitted: int = 0
    finished: int = 0
    failed: int = 0
    cancelled: int = 0
    prompt_tokens: int = 0
    """Prompt tokens admitted."""
    tokens: int = 0
    """Tokens sampled."""
    retrievals: int = 0
    """Batched retriever calls."""
    retrieval_s: float = 0.0
    waiting: int = 0
    running: int = 0
    retrieving: int = 0
    """Sequences parked for their neighbours."""
    kv_used: float = 0.0
    """Share of the cache's positions held."""
    largest_batch: int = 0
    model_s: float = 0.0
    """Time in the runner's passes (the step's one host transfer included) and applying their tokens."""
    notify_s: float = 0.0
    """Time handing each step's news to the requests' listeners."""


@dataclass
class Retrieval:
    """One batched call in flight: per sequence its chunks and their texts."""

    future: Future
    asked: list[tuple[Sequence, list[int], list[str]]]
    deadline: float


class Engine:
    """Continuous batching over ``model`` with ``tokenizer`` (and ``retriever``: ``retrieve(texts, k,
    timeout_s)`` -> ``retrieval.Neighbors``; None: no request may retrieve).

    ``add`` a request (from any thread) and drive ``step`` (one thread), or ``run`` a list of
    requests to their end. Each sequence's news goes to its request's ``listener``.
    """

    def __init__(self, model, tokenizer, retriever=None, *, device: torch.device, config: EngineConfig | None = None):
        self.config = c = config or EngineConfig()
        self.tokenizer, self.retriever, self.device = tokenizer, retriever, device
        self.vocab, self.m, self.k = model.cfg.vocab_size, model.cfg.chunk_length, model.cfg.k
        self.encoder = model.cfg.retrieval
        self.eos = tokenizer.eos_token_id
        self.scheduler = Scheduler(c, self.m)
        self.runner = ModelRunner(model, device=device, kv_tokens=c.kv_tokens, max_seqs=c.max_seqs,
                                  pad=self.eos if self.eos is not None else 0, use_cache=c.use_cache)
        self.lock, self.wake = threading.Lock(), threading.Event()
        self.inbox: list[list[Sequence]] = []  # added by other threads, taken at the next step
        # a stalled call blocks no other; a local retriever's embedder must not slow the step (one_openmp_thread)
        self.pool = ThreadPoolExecutor(4, thread_name_prefix="retro-ray-retrieve", initializer=one_openmp_thread)
        self.inflight: list[Retrieval] = []
        self.stats = EngineStats()

    # -- requests ------------------------------------------------------------------------------

    def add(self, req: Request, n: int = 1) -> list[Sequence]:
        """Queue ``n`` sequences of one request (n > 1: prefilled once, then forked); they start at
        a coming step. A request that can never fit is a ``GenerationError``."""
        if not req.ids or min(req.ids) < 0 or max(req.ids) >= self.vocab:
            raise GenerationError(f"prompt token ids must be 0..{self.vocab - 1}, and at least one")
        req.retrieve = req.retrieve and self.encoder
        if req.retrieve and req.fixed is None and self.retriever is None:
            raise GenerationError("this request retrieves, but the engine has no retriever")
        group = [Sequence(req, self.tokenizer, self.eos) for _ in range(n)]
        self.scheduler.check(group)
        p = req.params
        for i, s in enumerate(group):
            if not p.greedy:
                seed = p.seed + i if p.seed is not None else time.time_ns() + s.id
                s.rng = torch.Generator(self.device).manual_seed(seed % 2**63)
        with self.lock:
            self.inbox.append(group)
        self.wake.set()
        return group

    def cancel(self, seqs: list[Sequence]) -> None:
        """Their client left: they leave at the next step (thread-safe)."""
        for s in seqs:
            s.cancelled = True
        self.wake.set()

    def has_work(self) -> bool:
        return bool(self.inbox or self.scheduler.has_work())

    def run(self, reqs: list[Request]) -> list[Sequence]:
        """Every request to its end (one sequence each), in this thread."""
        seqs = [self.add(r)[0] for r in reqs]
        while self.has_work():
            self.step()
        return seqs

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    # -- one step ------------------------------------------------------------------------------

    def step(self) -> None:
        """Take new requests, collect neighbours, plan, send the plan's queries, run its pass,
        apply its tokens, tell the listeners."""
        self.stats.steps += 1
        with self.lock:
            added, self.inbox = self.inbox, []
        for group in added:
            self.scheduler.add(group)
        touched = self._collect_neighbours()
        plan = self.scheduler.schedule()
        self._send(plan.queries)
        touched += plan.finished
        slices = plan.slices
        if slices:
            self.stats.largest_batch = max(self.stats.largest_batch, len(plan.decode))
            start = time.perf_counter()
            try:
                tokens = self.runner.run(plan)
            except Exception as e:  # the pass's sequences fail; the engine goes on
                for s in slices:
                    for seq in (s.seq, *s.forks):
                        self.scheduler.fail(seq, f"the model failed: {type(e).__name__}: {e}")
                        touched.append(seq)
            else:
                self.scheduler.update(plan, tokens)
                touched += plan.sampled
                self.stats.tokens += sum(isinstance(t, int) for t in tokens)
            self.stats.model_s += time.perf_counter() - start
        st, sc = self.stats, self.scheduler
        st.admitted += len(plan.admitted)
        st.prompt_tokens += sum(s.prompt_len for s in plan.admitted if s.parent is None)
        start = time.perf_counter()
        for seq in dict.fromkeys(touched):  # each once, in order
            self._notify(seq)
        st.notify_s += time.perf_counter() - start
        with self.lock:
            st.waiting = sum(len(g) for g in (*self.inbox, *sc.waiting))
        st.running = len(sc.running)
        st.retrieving = sum(s.status is Status.RETRIEVING for s in sc.running)
        st.kv_used = sc.space.used() / sc.space.tokens
        if not slices and self.inflight:  # every sequence waits for its neighbours
            wait_futures([r.future for r in self.inflight], timeout=0.05, return_when="FIRST_COMPLETED")

    def _notify(self, seq: Sequence) -> None:
        news = seq.news()
        if seq.req.listener is not None and ("error" in news or news["text"] or news["finish_reason"]):
            seq.req.listener(seq, news)
        if seq.done:
            st = self.stats
            st.finished += 1
            st.failed += seq.error is not None
            st.cancelled += seq.finish == "cancelled"

    # -- retrieval -----------------------------------------------------------------------------

    def _send(self, queries: list[tuple[Sequence, list[int]]]) -> None:
        if not queries:
            return
        m = self.m
        asked = [(seq, us, [self.tokenizer.decode(seq.ids[u * m:(u + 1) * m]) for u in us]) for seq, us in queries]
        deadline = time.monotonic() + self.config.retrieval_timeout_s
        future = self.pool.submit(retrieve_apart, self.retriever, [texts for _, _, texts in asked], self.k, deadline)
        self.inflight.append(Retrieval(future, asked, deadline))
        self.stats.retrievals += 1

    def _collect_neighbours(self) -> list[Sequence]:
        """Neighbours that have come in go to their sequences; a failed, late or malformed
        retrieval fails its own sequences, never the engine."""
        touched: list[Sequence] = []
        timeout, now = self.config.retrieval_timeout_s, time.monotonic()
        for r in list(self.inflight):
            if not r.future.done() and now < r.deadline:
                continue
            self.inflight.remove(r)
            if not r.future.done():
                outcomes = [TimeoutError()] * len(r.asked)
            else:
                outcomes, seconds = r.future.result()
                self.stats.retrieval_s += seconds
            for (seq, us, texts), found in zip(r.asked, outcomes):
                if seq.done:
                    continue
                try:
                    if isinstance(found, Exception):
                        raise found
                    given = {u: (torch.as_tensor(found.tokens[i], device=self.device),
                                 torch.as_tensor(found.mask[i], device=self.device)) for i, u in enumerate(us)}
                    seq.retrieved += [{"chunk": u, "text": texts[i], "neighbors": found.describe(i)}
                                      for i, u in enumerate(us)]
                    self.scheduler.deliver(seq, given)
                except Exception as e:  # this sequence's retrieval, not the engine
                    self.scheduler.fail(seq, f"retrieval timed out after {timeout:g} s" if isinstance(e, TimeoutError)
                                        else f"retrieval failed: {type(e).__name__}: {e}")
                    touched.append(seq)
        return touched


def one_openmp_thread() -> None:
    """A helper thread's torch and Faiss operators run on it alone, without an OpenMP team.

    One process's OpenMP runtime (libgomp) counts the threads of every computing thread's team;
    once they outnumber the cores, its workers stop spinning between parallel regions, so each of
    the hundreds of regions in a decode step waits for a wake-up. A local retriever's query
    embedder on this pool with a team of its own made the SmolLM2 retro-fit's decode step 55 ms
    instead of 30 on 2 cores, for as long as the pool's thread lived. Both counts of this thread
    go to one: OpenMP's (torch's loops, Faiss's own libgomp through threadpoolctl) and MKL's (torch's
    matrix products start a team of MKL's count, which only ``torch.set_num_threads`` sets).
    ``torch.set_num_threads`` also sets the count every later thread starts with: a thread that
    computes nothing puts that back at once."""
    from threadpoolctl import threadpool_limits

    count = torch.get_num_threads()  # torch's per-thread set-up first: it would reset the limits at the first operator
    torch.set_num_threads(1)
    restore = threading.Thread(target=torch.set_num_threads, args=(count,), name="retro-ray-threads")
    restore.start()
    restore.join()
    threadpool_limits(1, user_api="openmp")


def retrieve_apart(retriever, groups: list[list[str]], k: int, deadline: float) -> tuple[list, float]:
    """One batched query for the chunk texts of several sequences -> (per sequence its
    ``Neighbors`` or its exception, seconds). If the batch fails, each sequence is asked alone, while
    time is left and with only the time left, so that one bad query fails only its own sequence."""
    start = time.perf_counter()

    def ask(texts: list[str]):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("retrieval timed out before it was retried")
        found = retriever.retrieve(texts, k, timeout_s=left)
        if len(found.chunk_ids) != len(texts):
            raise ValueError(f"the retriever returned {len(found.chunk_ids)} rows for {len(texts)} texts")
        return found

    try:
        found = ask([t for texts in groups for t in texts])
        out, first = [], 0
        for texts in groups:
            out.append(found.slice(first, first + len(texts)))
            first += len(texts)
        return out, time.perf_counter() - start
    except Exception as e:
        if len(groups) == 1:
            return [e], time.perf_counter() - start
    out = []
    for texts in groups:
        try:
            out.append(ask(texts))
        except Exception as e:
            out.append(e)
    return out, time.perf_counter() - start
