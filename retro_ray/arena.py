"""The engine's memory, allocated once and reused: every sequence's keys and values in one arena
of token positions (``Arena``; as a Hugging Face ``Cache`` for retro-fitted models), and what
the CCA layers read (``ChunkStore``: the decoder states the encoder reads, each sequence's
current chunk's CCA keys; ``PassNeighbors``: one pass's view, encoding the chunks it completes).

Notation: b sequences in a pass, T positions per sequence in a pass, S positions read, N arena
positions, m chunk length, k neighbours, r neighbour length, d width, d' encoder width, h heads,
e head width. Imports no Ray.
"""

from __future__ import annotations

import time

import torch

from retro_ray.model.retro import Retro


class Arena:
    """Keys and values of every sequence in one preallocated run of ``tokens`` positions per layer
    (allocated at a layer's first write, reused for the engine's life). A sequence owns a contiguous
    range (``alloc``); a pass writes its tokens at ``offset + position`` and reads each sequence's
    range up to its own position."""

    def __init__(self, tokens: int, device: torch.device):
        self.tokens, self.device = tokens, device
        self.free: list[tuple[int, int]] = [(0, tokens)]  # (start, length), sorted, coalesced
        self.k: dict[int, torch.Tensor] = {}  # layer -> [h, N, e]
        self.v: dict[int, torch.Tensor] = {}
        self.write = self.read = self.mask = None

    def alloc(self, n: int) -> int | None:
        """First fit: the start of ``n`` free positions, or None."""
        for j, (start, length) in enumerate(self.free):
            if length >= n:
                self.free[j:j + 1] = [(start + n, length - n)] if length > n else []
                return start
        return None

    def release(self, start: int, n: int) -> None:
        self.free.append((start, n))
        self.free.sort()
        merged = [self.free[0]]
        for s, length in self.free[1:]:
            ps, pl = merged[-1]
            if ps + pl == s:
                merged[-1] = (ps, pl + length)
            else:
                merged.append((s, length))
        self.free = merged

    def used(self) -> int:
        return self.tokens - sum(length for _, length in self.free)

    def begin(self, offsets: torch.Tensor, positions: torch.Tensor) -> None:
        """The next pass: sequences at ``offsets`` [b], tokens at ``positions`` [b, T]."""
        slots = torch.arange(int(positions.max()) + 1, device=self.device)  # [S]
        self.write = (offsets[:, None] + positions).flatten()  # [b T]
        self.read = (offsets[:, None] + slots).clamp(max=self.tokens - 1)  # [b, S]
        self.mask = slots[None, None, None, :] <= positions[:, None, :, None]  # [b, 1, T, S]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """k, v [b, h, T, e] of a pass -> (keys, values [b, h, S, e], mask [b, 1, T, S])."""
        b, h, T, e = k.shape
        if layer not in self.k:
            self.k[layer] = k.new_zeros(h, self.tokens, e)
            self.v[layer] = v.new_zeros(h, self.tokens, e)
        keys, values = self.k[layer], self.v[layer]
        keys.index_copy_(1, self.write, k.permute(1, 0, 2, 3).reshape(h, b * T, e))
        values.index_copy_(1, self.write, v.permute(1, 0, 2, 3).reshape(h, b * T, e))
        return keys[:, self.read].transpose(0, 1), values[:, self.read].transpose(0, 1), self.mask

    def copy(self, src: int, dst: int, n: int) -> None:
        """Positions src..src+n-1 -> dst..dst+n-1 in every layer (a forked sequence)."""
        for store in (*self.k.values(), *self.v.values()):
            store[:, dst:dst + n] = store[:, src:src + n]


class LayerView:
    """One ``Retro`` layer's cache: ``Block`` calls ``update(k, v)``."""

    def __init__(self, arena: Arena, layer: int):
        self.arena, self.layer = arena, layer

    def update(self, k, v):
        return self.arena.update(self.layer, k, v)


def hf_cache(arena: Arena):
    """The arena as a Hugging Face ``Cache``: every attention layer writes and reads through it;
    its 4-D mask goes in as ``attention_mask`` (each sequence at its own position)."""
    from transformers.cache_utils import Cache

    class ArenaCache(Cache):
        def __init__(self):
            super().__init__(layers=[])

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            keys, values, _ = arena.update(layer_idx, key_states, value_states)
            return keys, values

        def get_seq_length(self, layer_idx: int = 0) -> int:
            return 0  # positions are always given

    return ArenaCache()


class ChunkStore:
    """What CCA layers read: the decoder states at the first CCA layer of every arena position (the
    encoder reads a chunk's states there), and each sequence row's current chunk's CCA keys and
    values (a decode token only ever sees its current chunk: position p sees chunk (p - m + 1) // m)."""

    def __init__(self, model, max_seqs: int, tokens: int):
        self.encoder, self.m = model.encoder, model.cfg.chunk_length
        self.embed = model.wte if isinstance(model, Retro) else model.base.get_input_embeddings()
        self.rows, self.tokens = max_seqs, tokens
        self.states: torch.Tensor | None = None  # [N, d]
        self.keys: dict = {}  # CCA module -> (keys, values) [rows, h, k r, e]
        self.mask: torch.Tensor | None = None  # [rows, k r]
        self.chunk = [-1] * max_seqs  # the chunk each row's keys are of
        self.encode_s = 0.0

    def copy_row(self, src: int, dst: int) -> None:
        for keys, values in self.keys.values():
            keys[dst], values[dst] = keys[src], values[src]
        if self.mask is not None:
            self.mask[dst] = self.mask[src]
        self.chunk[dst] = self.chunk[src]


class PassNeighbors:
    """``retrieved(cca, states)`` for one pass: b sequence rows at positions [b, T] (decode: T = 1;
    prefill: b = 1), and the chunks whose neighbours are encoded in it (their last position is in
    the pass): ``new[i] = [(u, tokens [k, r], mask [k, r]), ...]``."""

    def __init__(self, store: ChunkStore, rows: list[int], offsets: torch.Tensor, positions: torch.Tensor,
                 new: list[list[tuple]]):
        self.store, self.rows, self.offsets, self.positions, self.new = store, rows, offsets, positions, new
        self.enc: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] | None = None  # (i, u) -> enc, mask
        self.visible: torch.Tensor | None = None  # decode: [b, k r] the keys each row sees
        self.row_index: torch.Tensor | None = None  # decode: [b] the rows as a tensor

    def _first_layer(self, h: torch.Tensor) -> None:
        """Keep the states, encode the new chunks' neighbours."""
        st, m = self.store, self.store.m
        if st.states is None:
            st.states = h.new_zeros(st.tokens, h.shape[-1])
        st.states[(self.offsets[:, None] + self.positions).flatten()] = h.flatten(0, 1)
        self.enc = {}
        todo = [(i, u, t, msk) for i, items in enumerate(self.new) for u, t, msk in items]
        if not todo:
            return
        start = time.perf_counter()
        chunks = torch.stack([st.states[int(self.offsets[i]) + u * m:int(self.offsets[i]) + (u + 1) * m]
                              for i, u, _, _ in todo])  # [n, m, d]
        tokens = torch.stack([t for _, _, t, _ in todo])[:, None]  # [n, 1, k, r]
        masks = torch.stack([msk for _, _, _, msk in todo])[:, None]
        enc = st.encoder(st.embed(tokens).to(h.dtype), masks, chunks[:, None])[:, 0]  # [n, k, r, d']
        for j, (i, u, _, msk) in enumerate(todo):
            self.enc[(i, u)] = (enc[j], msk.flatten())
        if h.is_cuda:
            torch.cuda.synchronize(h.device)
        st.encode_s += time.perf_counter() - start

    def __call__(self, cca, h: torch.Tensor) -> torch.Tensor:
        """h [b, T, d] states of a CCA layer -> [b, T, d] CCA output."""
        if self.enc is None:
            self._first_layer(h)
        st, m = self.store, self.store.m
        projected = {key: cca.attn.keys_values(enc.flatten(0, 1)[None]) for key, (enc, _) in self.enc.items()}
        if cca not in st.keys:
            if not projected:
                return torch.zeros_like(h)  # no chunk of any sequence encoded yet: nothing to see
            k0 = next(iter(projected.values()))[0]  # [1, h, k r, e]
            st.keys[cca] = (k0.new_zeros(st.rows, *k0.shape[1:]), k0.new_zeros(st.rows, *k0.shape[1:]))
            if st.mask is None:
                st.mask = torch.zeros(st.rows, k0.shape[2], dtype=torch.bool, device=h.device)  # [rows, k r]
        keys, values = st.keys[cca]
        b, T, _ = h.shape
        if T == 1:  # decode: every row reads its current chunk, newly encoded ones first stored
            for (i, u), (k, v) in projected.items():
                keys[self.rows[i]], values[self.rows[i]] = k[0], v[0]
            if self.visible is None:  # the same for every CCA layer of the pass
                for (i, u), (_, mask) in self.enc.items():
                    st.mask[self.rows[i]], st.chunk[self.rows[i]] = mask, u
                self.row_index = self.offsets.new_tensor(self.rows)  # [b]
                has = torch.as_tensor([st.chunk[r] >= 0 for r in self.rows], device=h.device)
                self.visible = st.mask[self.row_index] & (has & (self.positions[:, 0] >= m - 1))[:, None]  # [b, k r]
            rows = self.row_index
            return cca.attn.attend(h, keys[rows], values[rows], key_mask=self.visible)  # [b, 1, d]
        # prefill of one row: the pass's tokens grouped by the chunk they see
        row, pos = self.rows[0], self.positions[0]  # [T]
        out = torch.zeros_like(h)
        sees = torch.div(pos - m + 1, m, rounding_mode="floor")  # [T]; < 0: none yet
        for u in sorted(set(sees.tolist())):
            if u < 0:
                continue
            if (0, u) in projected:
                k, v = projected[(0, u)]
                visible = self.enc[(0, u)][1][None]  # [1, k r]
            elif st.chunk[row] == u:
                k, v, visible = keys[row][None], values[row][None], st.mask[row][None]
            else:
                continue  # that chunk has no neighbours (retrieval off for this sequence)
            at = (sees == u).nonzero().flatten()
            out[:, at] = cca.attn.attend(h[:, at], k, v, key_mask=visible)
        if projected:
            (i, u) = max(projected)
            keys[row], values[row] = projected[(i, u)][0][0], projected[(i, u)][1][0]
            st.mask[row], st.chunk[row] = self.enc[(i, u)][1], u
        return out
