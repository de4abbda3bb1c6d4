"""The engine's model runner: it executes a ``StepPlan`` and returns the step's tokens.

One forward per step: the decode rows and the prompt slices packed into one pass (each sequence
attends to its own keys where they live in the cache), the encoder run on the chunks whose last
token the pass feeds, logits computed only at the positions that are sampled, one batched argmax
for the greedy ones, and one transfer to the host for the step's tokens. ``use_cache=False``
recomputes each sampled sequence alone from its first token instead: the reference the cache is
tested and benchmarked against. Imports no Ray.

Notation: T tokens in the pass, P sampled positions, V vocabulary, k neighbours, r neighbour length.
"""

from __future__ import annotations

import torch

from retro_ray.model.retro import Retro
from retro_ray.serving.llama import LlamaPass
from retro_ray.serving.memory import (
    KVCache, LayerView, NeighbourState, NewChunk, PassLayout, PassNeighbours, Segment, hf_cache,
    packed_pass, use_packed_attention,
)
from retro_ray.serving.scheduler import StepPlan
from retro_ray.serving.sequence import sample


class ModelRunner:
    """Runs plans on ``model`` (a ``Retro`` or a ``RetroFit``) on ``device``, with a cache of
    ``kv_tokens`` positions and ``max_seqs`` rows of per-sequence CCA state."""

    def __init__(self, model, *, device: torch.device, kv_tokens: int, max_seqs: int, pad: int,
                 use_cache: bool = True):
        self.model, self.device, self.pad, self.use_cache = model, device, pad, use_cache
        self.m, self.k = model.cfg.chunk_length, model.cfg.k
        self.cache = KVCache(kv_tokens, device)
        self.neighbours = NeighbourState(model, max_seqs, kv_tokens) if model.cfg.retrieval else None
        self.hf = not isinstance(model, Retro)
        self.llama = LlamaPass(model) if self.hf and LlamaPass.supports(model.base) else None
        if self.hf and self.llama is None:
            use_packed_attention(model.base)

    @torch.inference_mode()
    def run(self, plan: StepPlan) -> list[int | str]:
        """The plan's pass -> per sampled sequence (``plan.sampled`` order) its token, or the
        message of why it could not be sampled. A failure of the pass itself raises."""
        self._prepare(plan)
        logits = self._pass(plan) if self.use_cache else self._reference(plan)  # [P, V]
        return self._sample(plan, logits)

    def _prepare(self, plan: StepPlan) -> None:
        """Rows moved and admitted, and forks' caches, before the pass."""
        st = self.neighbours
        if st is not None:
            for a, b in plan.moves:
                st.swap(a, b)
            for seq in plan.admitted:
                st.chunk[seq.row] = -1

    def _pass(self, plan: StepPlan) -> torch.Tensor:
        slices = plan.slices
        segments, first = [], 0
        for s in slices:
            segments.append(Segment(first, s.length, s.seq.offset, s.start))
            first += s.length
        layout = PassLayout(segments, self.device)
        ids = [t for s in slices for t in s.seq.ids[s.start:s.start + s.length]]
        tokens = torch.tensor(ids, device=self.device)[None]  # [1, T]
        positions = torch.tensor([p for s in slices for p in range(s.start, s.start + s.length)],
                                 device=self.device)[None]  # [1, T]
        sampled = torch.tensor([seg.first + seg.length - 1 for seg, s in zip(segments, slices) if s.sample],
                               dtype=torch.long, device=self.device)  # [P'] a sampled slice's last position
        retrieved = None
        if self.neighbours is not None and any(s.seq.req.retrieve for s in slices):
            new = [NewChunk(i, u, *s.seq.ready.pop(u)) for i, s in enumerate(slices)
                   for u in range(s.start // self.m, (s.start + s.length) // self.m)
                   if u * self.m + self.m - 1 >= s.start and u in s.seq.ready]
            retrieved = PassNeighbours(self.neighbours, layout, len(plan.decode), [s.seq.row for s in slices],
                                       [s.seq.req.retrieve for s in slices], new)
        if self.llama is not None:
            logits = self.llama(tokens, positions, retrieved, self.cache, layout, sampled)
        elif self.hf:
            with packed_pass(self.cache, layout):
                logits = self.model.decode(tokens, positions, retrieved, hf_cache(self.cache, layout), sampled)
        else:
            caches = [LayerView(self.cache, i, layout) for i in range(len(self.model.blocks))]
            logits = self.model.decode(tokens, positions, retrieved, caches, logits_at=sampled)
        for s in slices:
            for fork in s.forks:  # its parent's prompt, copied (not recomputed)
                self.cache.copy(s.seq.offset, fork.offset, s.seq.prompt_len)
                if self.neighbours is not None:
                    self.neighbours.copy_states(s.seq.offset, fork.offset, s.seq.prompt_len)
                    self.neighbours.copy_row(s.seq.row, fork.row)
        return logits[0]  # [P', V]

    def _reference(self, plan: StepPlan) -> torch.Tensor:
        """Each sampled sequence alone, from its first token -> next-token logits [P', V]."""
        rows = []
        for s in plan.slices:
            if not s.sample:
                continue
            seq, m = s.seq, self.m
            tokens = torch.tensor(seq.ids, device=self.device)[None]  # [1, n]
            neighbors = mask = None
            l = len(seq.ids) // m
            if seq.req.retrieve and self.neighbours is not None and l:
                neighbors = torch.full((1, l, self.k, 2 * m), self.pad, dtype=torch.long, device=self.device)
                mask = torch.zeros((1, l, self.k, 2 * m), dtype=torch.bool, device=self.device)
                for u, (t, msk) in seq.encoded.items():
                    if u < l:
                        neighbors[0, u], mask[0, u] = t, msk
            rows.append(self.model(tokens, neighbors, mask)[0][0, -1])
        return torch.stack(rows)

    def _sample(self, plan: StepPlan, logits: torch.Tensor) -> list[int | str]:
        """logits [P', V] of the sampled slices -> a token (or why not) per sampled sequence; a
        slice's forks sample from its logits with their own settings."""
        row_of = [i for i, s in enumerate(s for s in plan.slices if s.sample) for _ in range(1 + len(s.forks))]
        seqs = plan.sampled
        tokens = torch.zeros(len(seqs), dtype=torch.long, device=logits.device)  # [P]
        greedy = [j for j, seq in enumerate(seqs) if seq.params.greedy]
        if greedy:  # one batched argmax, then its rows (not a gather of [P, V] logits first)
            rows = torch.tensor([row_of[j] for j in greedy], device=logits.device)
            tokens[greedy] = logits.argmax(-1)[rows]
        failed: dict[int, str] = {}
        for j, seq in enumerate(seqs):
            if seq.req.keep_logits:
                seq.logits.append(logits[row_of[j]].float().cpu().numpy())
            if not seq.params.greedy:
                try:  # this request's settings, not the engine's
                    tokens[j] = sample(logits[row_of[j]], seq.params, seq.rng)
                except Exception as e:
                    failed[j] = f"sampling failed: {type(e).__name__}: {e}"
        return [failed.get(j, t) for j, t in enumerate(tokens.tolist())]  # the step's one transfer
