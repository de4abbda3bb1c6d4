"""A request's whole state in the engine, as one object: its tokens, its one ``Status``, its output
text (detokenised incrementally) and what it has retrieved. Imports no Ray.

Notation: V vocabulary, k neighbours, r neighbour length.
"""

from __future__ import annotations

import enum
import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from retro_ray.core.errors import UserError


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
    skip_special_tokens: bool = True
    """Special tokens (end of text, chat markers) stay out of the text, as in vLLM and Hugging
    Face's pipelines; they stay in the token ids."""

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """One token (a 0-d tensor on the logits' device, no host sync) from next-token logits [V],
    with temperature, top-k and top-p."""
    if not math.isfinite(params.temperature):
        raise ValueError(f"temperature {params.temperature} is not a number")
    logits = logits.float() / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, -1)
        drop = probs.cumsum(-1) - probs >= params.top_p  # keep the first token that reaches top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)[0]


def unsettled(text: str, stop: list[str]) -> int:
    """How many characters at the end of an unfinished output later tokens may still change (not
    streamed yet): a trailing incomplete character, or an ending that may begin a stop string."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    held = max((n for s in stop for n in range(1, len(s)) if text.endswith(s[:n], 0, end)), default=0)
    return len(text) - end + held


class IncrementalText:
    """Detokenises one token at a time at O(new text) cost (the offsets scheme of TGI and vLLM):
    only the last few tokens are decoded again, and a character split across tokens waits;
    special tokens are left out when ``skip_special``."""

    def __init__(self, tokenizer, skip_special: bool = True):
        self.tok, self.ids, self.prefix, self.read = tokenizer, [], 0, 0
        self.skip = skip_special

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip)

    def add(self, token: int) -> str:
        self.ids.append(token)
        before = self.decode(self.ids[self.prefix:self.read])
        now = self.decode(self.ids[self.prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            new = now[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
            return new
        return ""

    def flush(self) -> str:
        """The text ``add`` has held back so far (a trailing incomplete character)."""
        before = self.decode(self.ids[self.prefix:self.read])
        return self.decode(self.ids[self.prefix:])[len(before):]


Neighbours = tuple[torch.Tensor, torch.Tensor]
"""A chunk's neighbours for the encoder: tokens and mask [k, r]."""


@dataclass
class Request:
    ids: list[int]
    """Prompt token ids (checked by ``Generator.encode_prompt``)."""
    params: SamplingParams
    retrieve: bool = False
    """Feed neighbours to the encoder (no effect without one)."""
    fixed: Neighbours | None = None
    """Neighbours for every chunk (question mode) instead of retrieving."""
    listener: Callable[["Sequence", dict], None] | None = None
    """Called from the engine's thread with each step's news (``Sequence.news``)."""
    keep_logits: bool = False


class Fault(enum.Enum):
    """Whose fault a failed sequence is: the request's own (its settings or text: a 400) or the
    server's (retrieval or the model failed: a 503)."""

    REQUEST = "request"
    SERVER = "server"


class Status(enum.Enum):
    """Where a sequence is; the scheduler decides from this alone."""

    WAITING = "waiting"
    """Queued for room (cache positions and a row)."""
    FORKED = "forked"
    """One of a request's n > 1 sequences, admitted, waiting for the first one's prompt."""
    RETRIEVING = "retrieving"
    """Parked until the neighbours of its ``wanted`` chunks are in."""
    PREFILLING = "prefilling"
    """Its prompt enters the cache, a slice per step."""
    RUNNING = "running"
    """One token per step."""
    FINISHED = "finished"
    """Done: ``finish`` says why (stop, length, error, cancelled)."""


class Sequence:
    """One request's state in the engine (a request with n choices has n)."""

    _ids = itertools.count()

    def __init__(self, req: Request, tokenizer, eos: int | None):
        self.id = next(Sequence._ids)
        self.req, self.params = req, req.params
        self.ids, self.prompt_len = list(req.ids), len(req.ids)
        self.need = self.prompt_len + self.params.max_new_tokens
        """Cache positions it holds while it runs: its prompt plus every token it may generate."""
        self.eos = eos
        self.status = Status.WAITING
        self.cancelled = False
        """Set by another thread (its client left); the scheduler finishes it at its next step."""
        self.parent: Sequence | None = None
        """FORKED: the sequence whose prompt cache it starts from."""
        self.fed = 0
        """Tokens whose keys are in the cache."""
        self.offset, self.row = -1, -1
        """Its range of cache positions and its row of per-sequence state, while admitted."""
        self.wanted: list[int] = []
        """RETRIEVING: the chunks whose neighbours it waits for."""
        self.ready: dict[int, Neighbours] = {}
        """Chunks whose neighbours are in and not yet encoded (the pass feeding a chunk's last token does)."""
        self.encoded: dict[int, Neighbours] = {}
        """Every chunk's neighbours so far (only the full-recompute reference reads them)."""
        self.generated: list[int] = []
        self.detok = IncrementalText(tokenizer, self.params.skip_special_tokens)
        self.text, self.sent = "", 0  # the output so far; how much of it has been sent
        self.finish: str | None = None
        self.error: str | None = None
        self.fault: Fault | None = None
        self.retrieved: list[dict] = []
        self.logits: list[np.ndarray] = []
        self.rng: torch.Generator | None = None
        """Set by the engine for sampled (non-greedy) sequences, on its device."""
        self.arrived = time.perf_counter()
        self.first_token_at: float | None = None

    @property
    def done(self) -> bool:
        return self.status is Status.FINISHED

    def end(self, reason: str) -> None:
        if not self.done:
            self.status, self.finish = Status.FINISHED, reason

    def fail(self, message: str, fault: Fault) -> None:
        if not self.done:
            self.end("error")
            self.error, self.fault = message, fault

    def append(self, token: int) -> None:
        """A sampled token: the stop rules, incremental text; the status becomes FINISHED when it ends."""
        p = self.params
        self.ids.append(token)
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if token == self.eos and not p.ignore_eos:
            self.text += self.detok.flush()
            self.end("stop")
            return
        self.generated.append(token)
        start = max(0, len(self.text) - max((len(s) for s in p.stop), default=1) + 1)
        self.text += self.detok.add(token)
        cut = min((i for s in p.stop if s and (i := self.text.find(s, start)) >= 0), default=-1)
        if cut >= 0:
            self.text = self.text[:cut]
            self.end("stop")
        elif len(self.generated) == p.max_new_tokens:
            self.text += self.detok.flush()
            self.end("length")

    def news(self) -> dict:
        """What changed since the last call: ``text`` (the new text that later tokens cannot change),
        ``completion_tokens``, ``finish_reason`` (None while running) and, when done, ``neighbors``;
        or ``error`` and its ``fault``."""
        if self.error is not None:
            return {"error": self.error, "fault": self.fault.value}
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
