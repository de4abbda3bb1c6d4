"""Ray Serve: a run's model behind an OpenAI-compatible API, with retrieval.

Three deployments:

- ``Retriever``: the database's embedder and the index (the saved index files loaded in the
  replica, or the index stage's shard actors), answering ``retrieve(texts, k)``.
- ``Generator``: the model on the engine (``retro_ray.serving.engine``: continuous batching, retrieval
  in the loop), stepped by one thread; every request streams from its own queue, and a request
  whose caller has gone (a client that disconnected) leaves at the next step. Its figures go to
  Ray's metrics (``EngineMetrics``).
- ``Ingress``: FastAPI, speaking OpenAI's API (``retro_ray.serving.openai_api``: schemas, limits,
  errors): ``/v1/chat/completions`` and ``/v1/completions`` (server-sent events with
  ``stream: true``), ``/v1/models``, plus ``/v1/retrieve`` and ``/health``. It checks the API
  key, the request and its limits, builds the prompt in the instruction-tuning template with the
  retrieved passages, and counts the tokens. Every bad request gets a 4xx in OpenAI's error
  format; a failure of the server's own (retrieval, the model, a lost replica) a 503.

Beyond OpenAI's fields a request may give ``retrieval`` (``encoder``, ``prompt``, ``both``,
``question``, ``off``), ``passages`` (how many go in the prompt), ``search`` (``dense``, ``bm25``,
``hybrid``) and, for chat, ``short_answer`` (the question is asked as the model was tuned to
answer one: InstructRetro's QA prompt, ending "Assistant: The answer is"); each choice carries
the ``passages`` it was given (``title``, ``text``) and the ``neighbors`` its chunks retrieved.

``cluster/serve.yaml`` deploys ``retro_ray.serving.deployments:app`` with ``serve run`` / ``serve deploy``;
``retro-ray serve`` (``start``) does the same from a run config.
"""


import asyncio
import hmac
import json
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, replace
from pathlib import Path
from typing import AsyncIterator

import yaml
from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from ray import serve

from retro_ray.core.config import Config, ServeConfig, format_errors, load_config
from retro_ray.core.errors import UserError
from retro_ray.core.runtime import log
from retro_ray.core.storage import Storage
from retro_ray.serving.engine import Engine, EngineConfig, EngineStats, GenerationError, SamplingParams
from retro_ray.serving.engine import Request as EngineRequest
from retro_ray.serving.generate import ENCODER_MODES, PROMPT_MODES, passage_texts, passages_prompt, passages_to_fetch
from retro_ray.serving.openai_api import (
    APIError, ChatRequest, CompletionRequest, RetrieveRequest, GenerationRequest, api, api_key,
    failure, read_json, usage,
)
from retro_ray.serving.sequence import Fault

APP_NAME = "retro"


# -- the retriever and the generator ------------------------------------------------------------


@serve.deployment(name="Retriever")
class RetrieverServer:
    """The run's ``Retriever``: embedder, index and chunk store."""

    def __init__(self, cfg: Config):
        from retro_ray.retrieval.retriever import run_retriever

        self.retriever = run_retriever(cfg, Storage(cfg.storage), local=cfg.serve.index == "local")

    def retrieve(self, texts: list[str], k: int):
        return self.retriever.retrieve(texts, k)

    def passages(self, texts: list[str], k: int, search: str, words: int | None) -> list[list[dict]]:
        return self.retriever.passages(texts, k, search, words)


class RemoteRetriever:
    """The engine's retriever over the Retriever deployment (``result()`` blocks the engine's
    retrieval thread, not the replica's event loop)."""

    def __init__(self, handle, tokenizer_id: str):
        self.handle, self.tokenizer_id = handle, tokenizer_id

    def retrieve(self, texts: list[str], k: int, timeout_s: float):
        return self.handle.retrieve.remote(texts, k).result(timeout_s=timeout_s)


class EngineMetrics:
    """The engine's figures through Ray's metrics API (each node's Prometheus endpoint, the
    dashboard), named as vLLM names them under our own prefix (Ray adds ``ray_`` and refuses
    vLLM's ``:``), with a ``model_name`` label: requests running, waiting and parked for their
    neighbours, the cache's usage, time to first token, time per output token, end-to-end latency,
    prompt and generation tokens, retrieval latency, requests refused. Gauges follow the engine
    when it is idle too (zero)."""

    def __init__(self, model_name: str, every_s: float = 0.5):
        from ray.util import metrics

        latency = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]
        p = "retro_ray_"
        made = [
            ("running", metrics.Gauge, "num_requests_running", "Sequences in the engine's running batch."),
            ("waiting", metrics.Gauge, "num_requests_waiting", "Sequences waiting for room in the engine."),
            ("retrieving", metrics.Gauge, "num_requests_retrieving", "Running sequences parked for their neighbours."),
            ("kv", metrics.Gauge, "kv_cache_usage_perc", "Share of the key/value cache's positions held (0-1)."),
            ("prompt_tokens", metrics.Counter, "prompt_tokens", "Prompt tokens admitted."),
            ("tokens", metrics.Counter, "generation_tokens", "Tokens generated."),
            ("rejects", metrics.Counter, "request_rejected", "Requests the engine refused (400)."),
        ]
        for attr, kind, name, doc in made:
            setattr(self, attr, kind(p + name, doc, tag_keys=("model_name",)))
        for attr, name, doc in (("ttft", "time_to_first_token_seconds", "Arrival to first token."),
                                ("tpot", "time_per_output_token_seconds", "Mean seconds per token after the first."),
                                ("e2e", "e2e_request_latency_seconds", "Arrival to the last token."),
                                ("retrieval", "retrieval_latency_seconds", "A batched retriever call of the loop.")):
            setattr(self, attr, metrics.Histogram(p + name, doc, latency, tag_keys=("model_name",)))
        for m in (*[getattr(self, a) for a, *_ in made], self.ttft, self.tpot, self.e2e, self.retrieval):
            m.set_default_tags({"model_name": model_name})
        self.every_s, self.last_at, self.last = every_s, 0.0, EngineStats()

    def step(self, st: EngineStats, force: bool = False) -> None:
        now = time.perf_counter()
        if now - self.last_at < self.every_s and not force:
            return
        self.running.set(st.running)
        self.waiting.set(st.waiting)
        self.retrieving.set(st.retrieving)
        self.kv.set(st.kv_used)
        for name in ("prompt_tokens", "tokens"):
            delta = getattr(st, name) - getattr(self.last, name)
            if delta > 0:
                getattr(self, name).inc(delta)
        calls = st.retrievals - self.last.retrievals
        if calls > 0:
            self.retrieval.observe((st.retrieval_s - self.last.retrieval_s) / calls)
        self.last_at, self.last = now, replace(st)

    def finished(self, seq) -> None:
        end = time.perf_counter()
        self.e2e.observe(end - seq.arrived)
        if seq.first_token_at is None:
            return
        self.ttft.observe(seq.first_token_at - seq.arrived)
        if len(seq.generated) > 1:
            self.tpot.observe((end - seq.first_token_at) / (len(seq.generated) - 1))

    def rejected(self) -> None:
        self.rejects.inc()


def merged(items: list[dict]) -> list[dict]:
    """Stream items that came in one interval -> one per choice: its texts joined, its latest
    counts and finish reason (and neighbours); an error stands alone."""
    out: dict[int, dict] = {}
    for item in items:
        c, last = item["choice"], out.get(item["choice"])
        if last is None or "error" in item or "error" in last:
            out[c] = item if last is None or "error" in item else last
        else:
            out[c] = {**item, "text": last["text"] + item["text"]}
    return list(out.values())


@dataclass
class Job:
    """One prompt to decode ``n`` times: the full prompt text, its sampling, whether it retrieves."""

    prompt: str
    params: SamplingParams
    retrieve: bool
    n: int = 1
    neighbors: list[str] | None = None
    """Passages the encoder reads for every chunk (mode ``question``); None: retrieved per chunk."""
    stream: bool = True
    """Send every step's text as it comes; False: only the whole text at the end."""


@serve.deployment(name="Generator", health_check_period_s=5, health_check_timeout_s=10)
class GeneratorServer:
    """The model on the engine (``retro_ray.serving.engine``): one thread steps it, every request streams
    from its own queue, a request whose caller has gone leaves at the next step. If the engine's
    loop dies, the health check fails and Serve replaces the replica."""

    def __init__(self, cfg: Config, model: str, retriever=None):
        self.interval_s = cfg.serve.stream_interval_ms / 1000
        self.metrics = EngineMetrics(cfg.serve.model_name or model_name(model))
        self.died: str | None = None
        self.closing = threading.Event()
        # The engine's thread loads the model too: every thread that computes with torch brings
        # its own OpenMP team, and a second one slows every step (engine.one_openmp_thread).
        ready: Future = Future()
        self.thread = threading.Thread(target=self._run, args=(cfg, model, retriever, ready), name="retro-ray-engine",
                                       daemon=True)
        self.thread.start()
        ready.result()  # a model that does not load fails the replica here

    def _run(self, cfg: Config, model: str, retriever, ready: Future) -> None:
        try:
            self.generator, self.engine = self._load(cfg, model, retriever)
            ready.set_result(None)
        except BaseException as e:
            ready.set_exception(e)
            return
        self._loop()

    @staticmethod
    def _load(cfg: Config, model: str, retriever) -> tuple:
        from retro_ray.database import tokenizer
        from retro_ray.model.io import load_model
        from retro_ray.serving.generate import Generator

        storage = Storage(cfg.storage)
        loaded = load_model(storage, model)
        remote = None
        sc = cfg.serve
        if retriever is not None and loaded.cfg.retrieval:
            remote = RemoteRetriever(retriever, tokenizer.finished_tokenizer(cfg, storage).content_hash())
        gen = Generator(loaded, tokenizer.load_run_tokenizer(cfg, storage), remote)
        return gen, Engine(gen.model, gen.tokenizer, remote, device=gen.device, config=EngineConfig(
            kv_tokens=sc.kv_tokens, max_seqs=sc.max_seqs, prefill_tokens=sc.prefill_tokens, policy=sc.policy,
            retrieval_timeout_s=sc.retrieval_timeout_s))

    def _loop(self) -> None:
        engine = self.engine
        try:
            while not self.closing.is_set():
                if not engine.has_work():
                    self.metrics.step(engine.stats)  # idle: the gauges go to zero
                    engine.wake.wait(0.1)
                    engine.wake.clear()
                    continue
                engine.step()
                self.metrics.step(engine.stats)
        except BaseException as e:  # the replica is unhealthy from here on; its requests hear why
            self.died = f"{type(e).__name__}: {e}"
            log.exception("serve: the decoding loop died")
            with engine.lock:
                queued = [s for group in (*engine.inbox, *engine.scheduler.waiting) for s in group]
            for seq in [*engine.scheduler.running, *queued]:
                if seq.req.listener is not None:
                    seq.req.listener(seq, {"error": f"the generator failed: {self.died}", "fault": Fault.SERVER.value})

    def check_health(self) -> None:
        if self.died is not None or not self.thread.is_alive():
            raise RuntimeError(f"the decoding loop has stopped: {self.died}")

    def __del__(self):
        self.closing.set()

    def statistics(self) -> dict:
        import psutil
        import torch

        sc = self.engine.scheduler
        return {**vars(self.engine.stats), "kv_used_positions": sc.space.used(), "kv_free_ranges": len(sc.space.free),
                "free_rows": len(sc.free_rows), "torch_threads": torch.get_num_threads(), "died": self.died,
                "rss_mb": psutil.Process().memory_info().rss / 2**20}

    async def stream(self, job: Job) -> AsyncIterator[list[dict]]:
        """Lists of ``{"choice", "text", "completion_tokens", "finish_reason"}`` (a choice's last
        with its chunks' ``neighbors``) or ``{"choice", "error", "fault"}``: with ``job.stream``
        the first token at once, then what came in each ``serve.stream_interval_ms`` (one Ray
        stream item an interval, not one a token); else each choice once, whole, at its end. A
        caller that goes away cancels its sequences."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        choice: dict = {}

        def listener(seq, news: dict) -> None:  # called in the engine's thread
            loop.call_soon_threadsafe(queue.put_nowait, {"choice": choice.get(seq.id, 0), **news})

        if self.died is not None:  # Serve replaces this replica soon; until then, say why, do not hang
            yield [{"choice": 0, "error": f"the generator failed: {self.died}", "fault": Fault.SERVER.value}]
            return
        try:
            ids = self.generator.encode_prompt(job.prompt, job.params)
            fixed = None if job.neighbors is None else self.generator.passage_neighbors(job.neighbors)
            seqs = self.engine.add(EngineRequest(ids, job.params, job.retrieve, fixed, listener), job.n)
        except GenerationError as e:
            self.metrics.rejected()
            yield [{"choice": 0, "error": str(e), "fault": Fault.REQUEST.value}]
            return
        choice.update({s.id: j for j, s in enumerate(seqs)})
        texts, left, first = [""] * job.n, job.n, True
        try:
            while left:
                items = [await queue.get()]
                deadline = loop.time() + (0 if first else self.interval_s)
                while job.stream and (wait := deadline - loop.time()) > 0:
                    try:
                        items.append(await asyncio.wait_for(queue.get(), wait))
                    except asyncio.TimeoutError:
                        break
                first, batch = False, []
                for out in merged(items):
                    done = "error" in out or out["finish_reason"] is not None
                    if done:
                        left -= 1
                        self.metrics.finished(seqs[out["choice"]])
                    if job.stream or "error" in out:
                        batch.append(out)
                        continue
                    texts[out["choice"]] += out["text"]
                    if done:
                        batch.append({**out, "text": texts[out["choice"]]})
                if batch:
                    yield batch
        finally:
            self.engine.cancel([s for s in seqs if not s.done])


# -- the ingress ----------------------------------------------------------------------------------


async def _whole_answers(stream, n: int) -> list[dict]:
    """A job's stream -> per choice its whole text, token count, finish reason and neighbours (or
    its error)."""
    results = [{"text": ""} for _ in range(n)]
    async for batch in stream:
        for out in batch:
            done = results[out["choice"]]
            results[out["choice"]] = out if "error" in out else {**out, "text": done["text"] + out["text"]}
    return results


async def _interleaved(streams: list) -> AsyncIterator[tuple[int, dict]]:
    """(stream index, item) from all ``streams`` of item lists as they come; a stream's failure
    is raised."""
    if len(streams) == 1:
        async for batch in streams[0]:
            for out in batch:
                yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream) -> None:
        try:
            async for batch in stream:
                for out in batch:
                    await queue.put((i, out))
        except Exception as e:  # a lost replica: raised to the consumer, not lost in the task
            await queue.put((i, e))
        finally:
            await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            i, out = await queue.get()
            if out is None:
                running -= 1
            elif isinstance(out, Exception):
                raise out
            else:
                yield i, out
    finally:
        for t in tasks:
            t.cancel()


def model_name(path: str) -> str:
    """``.../checkpoints/pretrain-instruct/model`` -> ``pretrain-instruct``."""
    parts = path.rstrip("/").split("/")
    return parts[-2] if parts[-1] == "model" and len(parts) > 1 else parts[-1]


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    def __init__(self, cfg: Config, model: str, generator, retriever=None):
        from retro_ray.database import tokenizer
        from retro_ray.model.io import read_config

        storage = Storage(cfg.storage)
        self.cfg, self.sc, self.generator, self.retriever = cfg, cfg.serve, generator, retriever
        self.name = cfg.serve.model_name or model_name(model)
        self.tokenizer = tokenizer.load_run_tokenizer(cfg, storage)
        model_cfg = read_config(storage, model)
        self.context, self.encoder = model_cfg.max_seq_len, model_cfg.retrieval
        self.k = model_cfg.k  # the encoder's neighbours per chunk
        self.key = api_key(cfg.serve)
        self.created = int(time.time())
        log.info("serve: model %s (%s), API key %s", self.name, model, "required" if self.key else "not required")

    # -- checks ---------------------------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        if self.key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.key.encode()):
            raise APIError(401, "a valid API key is needed: Authorization: Bearer <key>", code="invalid_api_key",
                           kind="authentication_error")

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.name:
            raise APIError(404, f"the model {model!r} does not exist; this server has {self.name!r}", "model",
                           "model_not_found")

    def _settings(self, req: GenerationRequest, max_tokens: int | None, prompts: int) -> tuple[str, int, int]:
        """(retrieval mode, passages in the prompt, max_tokens) of a request, within the limits."""
        sc = self.sc
        self._check_model(req.model)
        max_tokens = max_tokens or sc.default_max_tokens
        if max_tokens > sc.max_tokens:
            raise APIError(400, f"max_tokens={max_tokens} exceeds the limit of {sc.max_tokens}", "max_tokens")
        if req.n * prompts > sc.max_n:
            raise APIError(400, f"{req.n * prompts} choices (n x prompts) exceed the limit of {sc.max_n}", "n")
        mode = req.retrieval or (sc.retrieval if self.retriever else "off")
        passages = sc.passages if req.passages is None else req.passages
        if passages > sc.max_passages:
            raise APIError(400, f"passages={passages} exceeds the limit of {sc.max_passages}", "passages")
        if mode != "off" and self.retriever is None and (mode != "encoder" or self.encoder):
            raise APIError(400, f"retrieval {mode!r}: this server has no index; use retrieval 'off'", "retrieval")
        return mode, passages if mode in PROMPT_MODES else 0, max_tokens

    async def _passages(self, req: GenerationRequest, query: str, mode: str, k: int) -> list[dict]:
        """The passages of a request's query: ``k`` for the prompt, at least the encoder's k in
        mode ``question`` ({chunk_id, doc_id, score, title, text}, best first)."""
        k = passages_to_fetch(mode, k, self.k if self.encoder else 0)
        if k == 0:
            return []
        return (await self._search([query], k, req.search))[0]

    async def _search(self, queries: list[str], k: int, search: str | None) -> list[list[dict]]:
        """The Retriever's passages of ``queries``, within ``serve.retrieval_timeout_s`` (a 503 after)."""
        timeout = self.sc.retrieval_timeout_s
        try:
            return await asyncio.wait_for(self.retriever.passages.remote(
                queries, k, search or self.sc.search, self.sc.passage_words), timeout)
        except asyncio.TimeoutError:
            raise APIError(503, f"retrieval timed out after {timeout:g} s", code="retrieval_timeout",
                           kind="server_error") from None

    def _fit(self, build, passages: list[dict], max_tokens: int, param: str) -> tuple[str, list[dict], int]:
        """The prompt with as many passages as fit; checked against the prompt and context limits."""
        from retro_ray.training.prompts import fit_passages

        room = min(self.sc.max_prompt_tokens, self.context - max_tokens)
        texts = passage_texts(passages)
        prompt, used, n = fit_passages(build, texts, self.tokenizer, room)
        if n == 0:
            raise APIError(400, "the prompt is empty", param)
        if n > self.sc.max_prompt_tokens:
            raise APIError(400, f"the prompt has {n} tokens, over the limit of {self.sc.max_prompt_tokens}", param,
                           "context_length_exceeded")
        if n + max_tokens > self.context:
            raise APIError(400, f"the prompt's {n} tokens plus max_tokens={max_tokens} exceed the model's context "
                           f"of {self.context} tokens", "max_tokens", "context_length_exceeded")
        return prompt, passages[:used], n

    def _job(self, prompt: str, req: GenerationRequest, mode: str, max_tokens: int, stop: list[str],
             found: list[dict]) -> Job:
        """A prompt's n sequences (choice j samples with ``seed + j``); in mode ``question`` the
        encoder reads the top k of ``found``."""
        neighbors = passage_texts(found[: self.k]) if mode == "question" else None
        return Job(prompt, SamplingParams(max_new_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                                          stop=stop, seed=req.seed, ignore_eos=req.ignore_eos,
                                          skip_special_tokens=req.skip_special_tokens),
                   retrieve=mode in ENCODER_MODES, n=req.n, neighbors=neighbors, stream=req.stream)

    # -- routes ---------------------------------------------------------------------------------

    @api.get("/health")
    async def health(self) -> dict:
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict:
        self._authorize(request)
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": self.created,
                                            "owned_by": "retro-ray"}]}

    @api.post("/v1/retrieve")
    async def retrieve(self, request: Request) -> dict:
        self._authorize(request)
        req = await read_json(request, self.sc.max_body_bytes, RetrieveRequest)
        self._check_model(req.model)
        k = req.k or self.sc.passages or 1
        if k > self.sc.max_passages:
            raise APIError(400, f"k={k} exceeds the limit of {self.sc.max_passages}", "k")
        if self.retriever is None:
            raise APIError(400, "this server has no index", "query")
        queries = [req.query] if isinstance(req.query, str) else req.query
        if not queries or len(queries) > self.sc.max_n or not all(q.strip() for q in queries):
            raise APIError(400, f"give 1 to {self.sc.max_n} non-empty queries", "query")
        found = await self._search(queries, k, req.search)
        return {"object": "list", "data": [{"query": q, "passages": rows} for q, rows in zip(queries, found)]}

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        self._authorize(request)
        req = await read_json(request, self.sc.max_body_bytes, CompletionRequest)
        texts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not texts:
            raise APIError(400, "prompt: give at least one prompt", "prompt")
        mode, k, max_tokens = self._settings(req, req.max_tokens, len(texts))
        stop, jobs, choices = req.stops(), [], []
        for text in texts:
            found = await self._passages(req, text, mode, k)
            prompt, used, n = self._fit(lambda given, text=text: passages_prompt(given, text), found[:k], max_tokens,
                                        "prompt")
            jobs.append(self._job(prompt, req, mode, max_tokens, stop, found))
            choices += [{"prompt": len(choices) // req.n, "passages": used, "prompt_tokens": n}] * req.n
        return await self._respond(req, "text_completion", jobs, choices)

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request):
        from retro_ray.training.prompts import chat_prompt, qa_prompt

        self._authorize(request)
        req = await read_json(request, self.sc.max_body_bytes, ChatRequest)
        mode, k, max_tokens = self._settings(req, req.max_completion_tokens or req.max_tokens, 1)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in req.messages]
        if messages[-1]["role"] != "user" or not messages[-1]["content"].strip():
            raise APIError(400, "messages: the last message must be the user's, with text", "messages")
        template, question = self.cfg.instruct.template, messages[-1]["content"]
        found = await self._passages(req, question, mode, k)

        def build(given: list[str]) -> str:  # short_answer: the QA form the model was tuned on, one line
            if req.short_answer:
                return qa_prompt(question, given, template, self.tokenizer)
            return chat_prompt(messages, given, template, self.tokenizer)

        prompt, used, n = self._fit(build, found[:k], max_tokens, "messages")
        stop = req.stops() + (["\n\nUser:"] if template != "chat" else []) + (["\n"] if req.short_answer else [])
        jobs = [self._job(prompt, req, mode, max_tokens, stop, found)]
        return await self._respond(req, "chat.completion", jobs,
                                   [{"prompt": 0, "passages": used, "prompt_tokens": n}] * req.n)

    # -- answers --------------------------------------------------------------------------------

    async def _respond(self, req: GenerationRequest, kind: str, jobs: list[Job], choices: list[dict]):
        """The whole answer as JSON, or server-sent events as the tokens come."""
        head = {"id": f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex}",
                "object": kind, "created": int(time.time()), "model": self.name}
        streams = [self.generator.options(stream=True).stream.remote(job) for job in jobs]
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self._events(head, streams, choices, include_usage),
                                     media_type="text/event-stream")
        try:
            results = [r for rs in await asyncio.gather(*(_whole_answers(s, req.n) for s in streams)) for r in rs]
        except Exception as e:  # the generator replica died, or could not be reached
            raise APIError(503, f"the generator failed: {type(e).__name__}", code="generation_failed",
                           kind="server_error") from None
        out = []
        for i, (res, choice) in enumerate(zip(results, choices)):
            if "error" in res:
                raise failure(res, "prompt" if kind == "text_completion" else "messages")
            body = ({"message": {"role": "assistant", "content": res["text"]}} if kind == "chat.completion"
                    else {"text": res["text"], "logprobs": None})
            out.append({"index": i, **body, "finish_reason": res["finish_reason"], "passages": choice["passages"],
                        "neighbors": res["neighbors"]})
        return {**head, "choices": out, "usage": usage(choices, results)}

    async def _events(self, head: dict, streams: list, choices: list[dict], include_usage: bool):
        chat = head["object"] == "chat.completion"
        head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
        results = [{"completion_tokens": 0} for _ in choices]

        def event(choice: dict) -> str:
            return f"data: {json.dumps({**head, 'choices': [choice], **({'usage': None} if include_usage else {})})}\n\n"

        if chat:
            for i, choice in enumerate(choices):
                yield event({"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                             "passages": choice["passages"]})
        n = len(choices) // len(streams)
        try:
            async for job, out in _interleaved(streams):
                i = job * n + out["choice"]
                if "error" in out:
                    yield f"data: {json.dumps(failure(out, 'prompt').body())}\n\n"
                    continue
                results[i] = out
                if not out["text"] and out["finish_reason"] is None:
                    continue
                yield event(self._chunk(chat, i, out, choices[i]))
        except Exception as e:  # the generator replica died mid-stream: say so, do not hang
            failed = APIError(503, f"the generator failed: {type(e).__name__}", code="generation_failed",
                              kind="server_error")
            yield f"data: {json.dumps(failed.body())}\n\n"
        if include_usage:
            yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage(choices, results)})}\n\n"
        yield "data: [DONE]\n\n"

    @staticmethod
    def _chunk(chat: bool, i: int, out: dict, choice: dict) -> dict:
        """A streamed choice's news as an OpenAI chunk's choice."""
        body = {"delta": {"content": out["text"]} if out["text"] else {}} if chat else {"text": out["text"],
                                                                                         "logprobs": None}
        chunk = {"index": i, **body, "finish_reason": out["finish_reason"]}
        if out["finish_reason"] is not None:
            chunk["neighbors"] = out.get("neighbors", [])
            if not chat:
                chunk["passages"] = choice["passages"]
        return chunk


# -- building and starting the app ----------------------------------------------------------------


class AppArgs(BaseModel):
    """``args`` of the application in a Serve config file."""

    model_config = ConfigDict(extra="forbid")
    config: str
    """The run's YAML config."""
    serve: dict = {}
    """Overrides of the run config's ``serve`` section."""


def deployment_options(cfg: Config, resources: dict[str, float], options: dict[str, dict] | None = None) -> dict:
    """Each deployment's Serve options on a cluster of ``resources`` (``ray.cluster_resources()``),
    where ``options`` (a Serve config file's) do not say: with GPUs, the Generator one GPU less
    the Retriever's ``serve.retriever_gpus`` (0: the Retriever embeds and searches on the CPU), so
    that one replica of each fits a one-GPU node; without, the Generator all CPUs but one (its
    torch threads; up to 8), the Retriever half a CPU and the Ingress none (it waits on the
    others), so that the app starts on a 2-core laptop. A Retriever on CPUs lets its idle OpenMP
    threads sleep at once (``OMP_WAIT_POLICY=PASSIVE``: it embeds in short bursts, and threads
    spinning after one would take the Generator's cores); the Generator keeps OpenMP's default,
    since sleeping after each of a decoding step's hundreds of parallel regions served its
    model at 0.55 to 0.7 of its speed."""
    import copy

    options = copy.deepcopy(options or {})
    gpus = resources.get("GPU", 0) > 0
    generator_cpus = 1 if gpus else max(1, min(8, int(resources.get("CPU", 2)) - 1))
    for name, count in {"Ingress": 0, "Retriever": 0.5, "Generator": generator_cpus}.items():
        options.setdefault(name, {}).setdefault("ray_actor_options", {}).setdefault("num_cpus", count)
    share = cfg.serve.retriever_gpus
    for name, gpu in (("Generator", 1.0 - share), ("Retriever", share)):
        actor = options[name]["ray_actor_options"]
        if cfg.resources.serve:
            actor.setdefault("resources", dict(cfg.resources.serve))
        if gpus and gpu and "num_gpus" not in actor:
            actor["num_gpus"] = gpu
        if name == "Retriever" and not actor.get("num_gpus"):
            actor.setdefault("runtime_env", {}).setdefault("env_vars", {}).setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return options


def build(cfg: Config, options: dict[str, dict] | None = None):
    """The application: Ingress -> Generator (-> Retriever), with each deployment's Serve
    ``options`` (autoscaling, replicas, actor resources; ``deployment_options`` fills the rest)."""
    import ray

    from retro_ray.core.layout import index_dir
    from retro_ray.core.manifest import MANIFEST
    from retro_ray.core.storage import join
    from retro_ray.core.layout import served_model

    storage = Storage(cfg.storage)
    model = served_model(cfg, storage, cfg.serve.model)
    options = deployment_options(cfg, ray.cluster_resources() if ray.is_initialized() else {}, options)
    retriever = None
    if storage.exists(join(index_dir(cfg), MANIFEST)):
        retriever = RetrieverServer.options(**options["Retriever"]).bind(cfg)
    else:
        log.warning("serve: the run has no index at %s: requests decode without retrieval", index_dir(cfg))
    generator = GeneratorServer.options(**options["Generator"]).bind(cfg, model, retriever)
    return Ingress.options(**options["Ingress"]).bind(cfg, model, generator, retriever)


def _with_overrides(cfg: Config, overrides: dict) -> Config:
    return cfg.model_copy(update={"serve": ServeConfig.model_validate({**cfg.serve.model_dump(), **overrides})})


def app(args: dict):
    """The builder that ``import_path: retro_ray.serving.deployments:app`` names in a Serve config file."""
    parsed = AppArgs.model_validate(args)
    return build(_with_overrides(load_config(parsed.config), parsed.serve))


@dataclass
class ServeFile:
    """What ``retro-ray serve`` takes from a Serve config file: the first application's
    deployment options and ``args.serve``, and the HTTP options."""

    deployments: dict[str, dict]
    http_options: dict
    overrides: dict
    name: str = APP_NAME
    route_prefix: str = "/"


def read_serve_file(path: str | None) -> ServeFile:
    if path is None:
        return ServeFile({}, {}, {})
    from ray.serve.schema import ServeDeploySchema

    try:
        schema = ServeDeploySchema.model_validate(yaml.safe_load(Path(path).read_text()))
        if not schema.applications:
            raise ValueError("no application")
        application = schema.applications[0]
        overrides = AppArgs.model_validate({"config": "", **(application.args or {})}).serve
        ServeConfig.model_validate(overrides)
    except (OSError, yaml.YAMLError, ValueError) as e:  # pydantic's ValidationError is a ValueError
        why = format_errors(e) if isinstance(e, ValidationError) else str(e).splitlines()[0]
        raise UserError(f"{path}: not a Serve config file of retro-ray: {why}") from None
    deployments = {d.name: d.model_dump(exclude_unset=True, exclude={"name"}) for d in application.deployments}
    return ServeFile(deployments, schema.http_options.model_dump(exclude_unset=True), overrides,
                     application.name, application.route_prefix or "/")


def start(cfg: Config, serve_file: str | None = None, host: str | None = None, port: int | None = None) -> str:
    """Deploy the app on the connected Ray cluster (``retro-ray serve``) -> its base URL."""
    spec = read_serve_file(serve_file)
    http = {"host": "127.0.0.1", "port": 8000, **spec.http_options}
    http.update({k: v for k, v in (("host", host), ("port", port)) if v is not None})
    cfg = _with_overrides(cfg, spec.overrides)
    serve.start(http_options=http)
    serve.run(build(cfg, spec.deployments), name=spec.name, route_prefix=spec.route_prefix)
    url = f"http://{http['host']}:{http['port']}{spec.route_prefix.rstrip('/')}"
    log.info("serve: %s/v1 is up (model %s)", url, cfg.serve.model_name or "from the run")
    return url
