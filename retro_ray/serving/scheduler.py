"""The engine's scheduler: it only decides, from the sequences' states, as vLLM v1's scheduler does.

Each ``schedule`` returns a ``StepPlan``: the sequences that leave (cancelled), those admitted (a
range of cache positions and a row each), the row moves that keep the decoding rows first, the
decode slices (one token for every RUNNING sequence), the prompt slices that fit the step's token
budget (chunked prefill), and the chunks whose neighbours to ask for. ``update`` applies the
tokens the runner sampled: stop rules, a chunk completed (its neighbours are then wanted), rows
and positions freed. No tensors are read here and no model is needed: every rule is tested alone.

Notation: m chunk length.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Literal

from retro_ray.core.config import ServeConfig
from retro_ray.serving.sequence import Fault, GenerationError, Neighbours, Sequence, Status


_SERVE = ServeConfig()


@dataclass
class EngineConfig:
    """The engine's knobs; their defaults are the Serve app's (``ServeConfig``, documented there)."""

    kv_tokens: int = _SERVE.kv_tokens
    """Positions of the key/value cache shared by all sequences; each reserves prompt + max_new_tokens."""
    max_seqs: int = _SERVE.max_seqs
    """Sequences decoded together at most (the rows of per-sequence state)."""
    prefill_tokens: int = _SERVE.prefill_tokens
    """Prompt tokens prefilled per step (chunked prefill): bounds the pause a newcomer causes."""
    policy: Literal["continuous", "static"] = _SERVE.policy
    """``static`` admits only when the engine is empty (a batch runs to its end): the baseline."""
    retrieval_timeout_s: float = _SERVE.retrieval_timeout_s
    use_cache: bool = True
    """False recomputes each sampled sequence alone from its first token: the reference."""


class KVSpace:
    """Which of ``tokens`` cache positions are free: each sequence holds one contiguous range
    (first fit; ranges merge again when freed). Positions only: the tensors are the runner's."""

    def __init__(self, tokens: int):
        self.tokens = tokens
        self.free: list[tuple[int, int]] = [(0, tokens)]  # (start, length), sorted, coalesced

    def alloc(self, n: int) -> int | None:
        """The start of ``n`` free positions, or None."""
        for j, (start, length) in enumerate(self.free):
            if length >= n:
                self.free[j:j + 1] = [(start + n, length - n)] if length > n else []
                return start
        return None

    def release(self, start: int, n: int) -> None:
        merged: list[tuple[int, int]] = []
        for s, length in sorted([*self.free, (start, n)]):
            if merged and merged[-1][0] + merged[-1][1] == s:
                merged[-1] = (merged[-1][0], merged[-1][1] + length)
            else:
                merged.append((s, length))
        self.free = merged

    def used(self) -> int:
        return self.tokens - sum(length for _, length in self.free)


@dataclass
class Slice:
    """Tokens of one sequence fed in a pass: positions ``start`` .. ``start + length - 1``."""

    seq: Sequence
    start: int
    length: int
    sample: bool
    """The last position's next token is sampled (a decode, or the end of a prompt)."""
    forks: list[Sequence] = field(default_factory=list)
    """Sequences that start from this prompt's cache (n > 1): each samples its own first token
    from the same logits, after the runner copies the prompt's cache to it."""


@dataclass
class StepPlan:
    finished: list[Sequence] = field(default_factory=list)
    """Left before the pass (cancelled, or their request's first sequence failed)."""
    admitted: list[Sequence] = field(default_factory=list)
    moves: list[tuple[int, int]] = field(default_factory=list)
    """Row swaps, applied in order before the pass, after which decode slice i is row i."""
    decode: list[Slice] = field(default_factory=list)
    prefill: list[Slice] = field(default_factory=list)
    queries: list[tuple[Sequence, list[int]]] = field(default_factory=list)
    """Chunks whose neighbours to ask the retriever for (one batched call)."""

    @property
    def slices(self) -> list[Slice]:
        """The pass's slices in the order it packs them: decode rows, then prompt slices."""
        return self.decode + self.prefill

    @property
    def sampled(self) -> list[Sequence]:
        """The sequences that get a token from this pass, in the order of the runner's tokens."""
        return [seq for s in self.slices if s.sample for seq in (s.seq, *s.forks)]


class Scheduler:
    """Decides every step (``schedule``) and applies its outcome (``update``); owns the waiting
    queue, the running sequences, the cache positions and the rows."""

    def __init__(self, config: EngineConfig, chunk_length: int):
        self.config, self.m = config, chunk_length
        self.space = KVSpace(config.kv_tokens)
        self.free_rows = list(range(config.max_seqs))[::-1]
        self.waiting: deque[list[Sequence]] = deque()  # groups: a request's n sequences enter together
        self.running: list[Sequence] = []  # admitted and not finished, in admission order

    # -- requests --------------------------------------------------------------------------------

    def check(self, group: list[Sequence]) -> None:
        """A request that can never fit is a ``GenerationError`` (one that does not fit now waits)."""
        c = self.config
        if group[0].need * len(group) > c.kv_tokens or len(group) > c.max_seqs:
            raise GenerationError(
                f"{len(group)} sequence(s) of {group[0].need} tokens (prompt + max_tokens) never fit this engine "
                f"(kv_tokens={c.kv_tokens}, max_seqs={c.max_seqs})")

    def add(self, group: list[Sequence]) -> None:
        self.check(group)
        for child in group[1:]:
            child.parent = group[0]
        self.waiting.append(group)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- deciding ---------------------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        self._leave(plan)
        self._admit(plan)
        for seq in self.running:
            if seq.status is Status.RETRIEVING and seq.wanted:
                plan.queries.append((seq, seq.wanted))
                seq.wanted = []
        decoding = sorted((s for s in self.running if s.status is Status.RUNNING), key=lambda s: s.row)
        plan.moves = self._compact(decoding)
        plan.decode = [Slice(s, len(s.ids) - 1, 1, sample=True) for s in sorted(decoding, key=lambda s: s.row)]
        budget = self.config.prefill_tokens if self.config.use_cache else float("inf")
        for s in self.running:
            if s.status is not Status.PREFILLING or budget <= 0:
                continue
            n = int(min(budget, s.prompt_len - s.fed))
            last = s.fed + n == s.prompt_len
            forks = [c for c in self.running if c.parent is s] if last else []
            plan.prefill.append(Slice(s, s.fed, n, sample=last, forks=forks))
            budget -= n
        return plan

    def _leave(self, plan: StepPlan) -> None:
        """Cancelled sequences, and forks whose first sequence ended before its prompt was in."""
        for seq in list(self.running):
            if seq.cancelled:
                seq.end("cancelled")
            elif seq.status is Status.FORKED and seq.parent.done:
                seq.fail(seq.parent.error or "its request ended before it started", seq.parent.fault or Fault.SERVER)
            if seq.done:
                self._release(seq)
                plan.finished.append(seq)
        for group in [g for g in self.waiting if all(s.cancelled for s in g)]:
            self.waiting.remove(group)
            for seq in group:
                seq.end("cancelled")
                plan.finished.append(seq)

    def _admit(self, plan: StepPlan) -> None:
        """First come, first served: the head waits for room and nobody overtakes it."""
        if self.config.policy == "static" and self.running:
            return
        while self.waiting and len(self.free_rows) >= len(self.waiting[0]):
            group = self.waiting[0]
            offsets = [self.space.alloc(s.need) for s in group]
            if None in offsets:
                for s, off in zip(group, offsets):
                    if off is not None:
                        self.space.release(off, s.need)
                return
            self.waiting.popleft()
            for s, off in zip(group, offsets):
                s.offset, s.row = off, self.free_rows.pop()
                s.status = Status.FORKED if s.parent is not None else Status.PREFILLING
                self.running.append(s)
                plan.admitted.append(s)
            head = group[0]
            self._want(head, list(range(head.prompt_len // self.m)))

    def _compact(self, decoding: list[Sequence]) -> list[tuple[int, int]]:
        """Row swaps after which the b decoding sequences hold rows 0..b-1, so the pass reads
        their state as one slice. Only a decoding sequence beyond row b-1 moves, into a row below
        b that none holds: one that parks costs one swap (the last decoding row takes its place),
        not a shift of every row after it (each swap moves every CCA layer's keys of two rows)."""
        b = len(decoding)
        by_row = {s.row: s for s in self.running}
        held = {s.row for s in decoding}
        holes = [i for i in range(b) if i not in held]
        moves = []
        for seq, i in zip([s for s in decoding if s.row >= b], holes):
            other = by_row.pop(i, None)
            moves.append((seq.row, i))
            if other is None:  # row i is free: the sequence moves there
                self.free_rows.remove(i)
                self.free_rows.append(seq.row)
                del by_row[seq.row]
            else:
                other.row, by_row[seq.row] = seq.row, other
            seq.row, by_row[i] = i, seq
        return moves

    # -- applying -----------------------------------------------------------------------------------

    def update(self, plan: StepPlan, tokens: list[int | str]) -> None:
        """The pass's outcome: every slice's tokens are in the cache; each sampled sequence (in
        ``plan.sampled`` order) gets its token, or fails with the message in its place (its
        sampling settings: the request's fault)."""
        for s in plan.slices:
            s.seq.fed += s.length
            for fork in s.forks:  # from here on its own: the prompt's cache and neighbours are copied
                fork.fed, fork.parent = s.seq.prompt_len, None
                fork.encoded, fork.retrieved = dict(s.seq.encoded), list(s.seq.retrieved)
        for seq, token in zip(plan.sampled, tokens):
            if isinstance(token, str):
                seq.fail(token, Fault.REQUEST)
            else:
                seq.append(token)
            if seq.done:
                self._release(seq)
            elif len(seq.ids) % self.m == 0:  # the token completes a chunk: its neighbours come first
                seq.status = Status.RUNNING
                self._want(seq, [len(seq.ids) // self.m - 1])
            else:
                seq.status = Status.RUNNING

    def _want(self, seq: Sequence, chunks: list[int]) -> None:
        """Neighbours for ``chunks`` before ``seq`` goes on: its fixed ones at once, else asked
        for at the next step (it is parked till they come)."""
        if not (chunks and seq.req.retrieve):
            return
        if seq.req.fixed is not None:
            self.deliver(seq, {u: seq.req.fixed for u in chunks})
            return
        seq.wanted, seq.status = chunks, Status.RETRIEVING

    def deliver(self, seq: Sequence, found: dict[int, Neighbours]) -> None:
        """The neighbours of the chunks a sequence waited for: it goes on."""
        seq.ready.update(found)
        seq.encoded.update(found)
        if seq.status is Status.RETRIEVING:
            seq.status = Status.PREFILLING if seq.fed < seq.prompt_len else Status.RUNNING

    def fail(self, seq: Sequence, message: str, fault: Fault = Fault.SERVER) -> None:
        seq.fail(message, fault)
        self._release(seq)

    def _release(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
            self.space.release(seq.offset, seq.need)
            self.free_rows.append(seq.row)
            seq.ready.clear()
            seq.encoded.clear()
