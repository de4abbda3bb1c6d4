"""The engine's memory on the device, allocated once and reused, and the attention that reads it
where it lives.

- ``KVCache``: every sequence's keys and values, one tensor of ``tokens`` positions per layer; a
  sequence owns a contiguous range (``scheduler.KVSpace`` decides which). A pass packs its
  sequences' tokens one after another (``PassLayout``); each layer writes its new keys at their
  positions and each sequence attends to its own range where it lives: no per-step copy of the
  cache. On a CPU the decode rows of a layer attend in one call of the compiled kernel
  (``kernels``; one per eight query heads of a key head), which reads keys stored in blocks of
  ``kernels.BLOCK`` positions; prompt slices, GPUs, and a CPU without the kernel use SDPA per
  segment. Grouped-query heads share the keys they read (folded into SDPA's query length), so
  keys are never repeated; a layer with a sliding window (Mistral, Qwen2, Gemma) reads only the
  window's keys.
  Hugging Face models use it through their attention interface (``hf_attention``, with their mask
  interface ``hf_mask``) and a ``Cache`` (``hf_cache``), so the same packed pass runs a
  retro-fitted GPT-2 or any other base; a Llama runs its own pass over it (``llama.LlamaPass``).
- ``NeighbourState``: what the CCA layers read: the decoder states the encoder reads (every cache
  position's, at the first CCA layer) and each row's current chunk's projected CCA keys, rows kept
  in decode order by the scheduler so a pass reads them as one slice. ``PassNeighbours`` is one
  pass's view of it, encoding the chunks whose last token the pass feeds.

Notation: T tokens in a packed pass, b decode rows, S positions a sequence sees, N cache
positions, m chunk length, k neighbours, r neighbour length, d width, d' encoder width, h heads,
h_kv key/value heads, g = h / h_kv, e head width. Imports no Ray.
"""

from __future__ import annotations

import contextvars
import functools
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from retro_ray.core.errors import UserError
from retro_ray.model.retro import Retro
from retro_ray.serving import kernels
from retro_ray.serving.kernels import BLOCK


@dataclass(frozen=True)
class Segment:
    """One sequence's tokens in a packed pass: pass rows ``first`` .. ``first + length - 1``, at
    positions ``start`` .. ``start + length - 1`` of its cache range, which begins at ``offset``."""

    first: int
    length: int
    offset: int
    start: int

    @property
    def seen(self) -> int:
        """Positions its last token attends to."""
        return self.start + self.length


class PassLayout:
    """A packed pass: its segments, where its keys are written, and the causal mask of every
    segment of more than one token (a prompt slice sees its earlier positions and itself; within a
    sliding window, only the window's: ``mask``)."""

    def __init__(self, segments: list[Segment], device: torch.device):
        self.segments = segments
        self.write = torch.cat([torch.arange(s.offset + s.start, s.offset + s.seen) for s in segments]).to(device)  # [T]
        self.masks = {i: (torch.arange(s.seen)[None, :] <= torch.arange(s.start, s.seen)[:, None]).to(device)
                      for i, s in enumerate(segments) if s.length > 1}  # [length, seen]
        self.windowed: dict[tuple[int, int], torch.Tensor] = {}
        self.decode = [i for i, s in enumerate(segments) if s.length == 1]  # segments of one token
        self.ranges: dict[int | None, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @functools.cached_property
    def blocked_write(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The pass's key positions in the blocked cache: (block, lane) [T] each."""
        return self.write // BLOCK, self.write % BLOCK

    def first_key(self, i: int, window: int | None) -> int:
        """The first position segment i's earliest query sees: with a sliding ``window`` (a query at
        position p sees p - window + 1 .. p, as Hugging Face's sliding-window masks), else 0."""
        return 0 if window is None else max(0, self.segments[i].start - window + 1)

    def keys_seen(self, i: int, window: int | None) -> tuple[int, int]:
        """The cache positions segment i attends to: lo .. hi - 1."""
        s = self.segments[i]
        return s.offset + self.first_key(i, window), s.offset + s.seen

    def decode_ranges(self, window: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The one-token segments' pass rows, and the cache positions each sees (lo, hi): [b] each."""
        if window not in self.ranges:
            seen = [self.keys_seen(i, window) for i in self.decode]
            self.ranges[window] = (torch.tensor([self.segments[i].first for i in self.decode]),
                                   *torch.tensor(seen, dtype=torch.long).reshape(-1, 2).t().contiguous())
        return self.ranges[window]

    def mask(self, i: int, window: int | None) -> torch.Tensor:
        """Segment i's causal mask [length, seen - first_key], within ``window`` if one is given."""
        if window is None:
            return self.masks[i]
        if (i, window) not in self.windowed:
            s, lo, causal = self.segments[i], self.first_key(i, window), self.masks[i]
            keys, queries = (torch.arange(a, s.seen, device=causal.device) for a in (lo, s.start))
            self.windowed[i, window] = causal[:, lo:] & (keys[None, :] > queries[:, None] - window)
        return self.windowed[i, window]


class KVCache:
    """Keys and values of every layer in ``tokens`` positions (allocated at a layer's first write).
    Where the CPU kernel runs (float32, a head width it is built for), a layer's keys are blocked,
    [h_kv, N / BLOCK, e, BLOCK], else [h_kv, N, e]; values are always [h_kv, N, e]."""

    def __init__(self, tokens: int, device: torch.device):
        self.tokens, self.device = tokens, device
        self.kernel = kernels.decode_attention() if device.type == "cpu" else None
        self.k: dict[int, torch.Tensor] = {}  # layer -> [h_kv, N, e] or blocked [h_kv, N / BLOCK, e, BLOCK]
        self.v: dict[int, torch.Tensor] = {}  # layer -> [h_kv, N, e]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, layout: PassLayout) -> None:
        """k, v [1, h_kv, T, e] of a pass, at its positions."""
        if layer not in self.k:
            h_kv, e = k.shape[1], k.shape[3]
            if self.kernel is not None and k.dtype == torch.float32 and e in kernels.WIDTHS:
                blocks = -(-self.tokens // BLOCK)
                self.k[layer] = k.new_zeros(h_kv, blocks, e, BLOCK)
                self.v[layer] = v.new_zeros(h_kv, blocks * BLOCK, e)
            else:
                self.k[layer] = k.new_zeros(h_kv, self.tokens, e)
                self.v[layer] = v.new_zeros(h_kv, self.tokens, e)
        if self.k[layer].dim() == 4:
            block, lane = layout.blocked_write
            self.k[layer][:, block, :, lane] = k[0].transpose(0, 1)  # [T, h_kv, e]
        else:
            self.k[layer].index_copy_(1, layout.write, k[0])
        self.v[layer].index_copy_(1, layout.write, v[0])

    def keys(self, layer: int, lo: int, hi: int) -> torch.Tensor:
        """Positions lo .. hi - 1 of a layer's keys -> [1, h_kv, hi - lo, e] (from blocked keys, a copy)."""
        keys = self.k[layer]
        if keys.dim() == 3:
            return keys[None, :, lo:hi]
        first, last = lo // BLOCK, -(-hi // BLOCK)
        flat = keys[:, first:last].transpose(2, 3).reshape(1, keys.shape[0], -1, keys.shape[2])
        return flat[:, :, lo - first * BLOCK:hi - first * BLOCK]

    def attend(self, layer: int, q: torch.Tensor, layout: PassLayout, scale: float | None = None,
               window: int | None = None) -> torch.Tensor:
        """q [1, h, T, e] -> [1, T, h, e]: every segment's queries over its own keys, read in place
        (the last ``window`` positions only, for a layer with a sliding window)."""
        values = self.v[layer][None]  # [1, h_kv, N, e]
        h_kv, e = values.shape[1], values.shape[3]
        h, T = q.shape[1], q.shape[2]
        g = h // h_kv
        by_token = q[0].view(h_kv, g, T, e).permute(2, 0, 1, 3)  # [T, h_kv, g, e]: a view
        out = q.new_empty(T, h_kv, g, e)
        kernel = self.k[layer].dim() == 4 and bool(layout.decode)
        if kernel:  # every decode row at once, each over its own keys
            rows, lo, hi = layout.decode_ranges(window)
            keys, scaling = self.k[layer], e ** -0.5 if scale is None else scale
            qs = by_token[rows].contiguous()  # [b, h_kv, g, e]
            if g <= kernels.GROUPS:
                out[rows] = self.kernel(qs, keys, self.v[layer], lo, hi, scaling)
            else:  # a multi-query model: GROUPS query heads per key head a call
                out[rows] = torch.cat([self.kernel(qs[:, :, j:j + kernels.GROUPS].contiguous(), keys, self.v[layer],
                                                   lo, hi, scaling) for j in range(0, g, kernels.GROUPS)], 2)
        for i, s in enumerate(layout.segments):
            if s.length == 1 and kernel:
                continue  # attended above
            lo, hi = layout.keys_seen(i, window)
            if s.length == 1:  # a decode row: its g query heads per key head, so keys are never repeated
                out[s.first] = F.scaled_dot_product_attention(by_token[s.first:s.first + 1], self.keys(layer, lo, hi),
                                                              values[:, :, lo:hi], scale=scale)[0]  # [h_kv, g, e]
                continue
            qs = q[:, :, s.first:s.first + s.length].reshape(1, h_kv, g * s.length, e)  # [1, h_kv, g length, e]
            y = F.scaled_dot_product_attention(qs, self.keys(layer, lo, hi), values[:, :, lo:hi],
                                               attn_mask=layout.mask(i, window).repeat(g, 1), scale=scale)
            out[s.first:s.first + s.length] = y.view(h_kv, g, s.length, e).permute(2, 0, 1, 3)  # [length, h_kv, g, e]
        return out.reshape(1, T, h, e)

    def copy(self, src: int, dst: int, n: int) -> None:
        """Positions src..src+n-1 -> dst..dst+n-1 in every layer (a forked sequence)."""
        at, to = torch.arange(src, src + n), torch.arange(dst, dst + n)
        for keys in self.k.values():
            if keys.dim() == 4:
                keys[:, to // BLOCK, :, to % BLOCK] = keys[:, at // BLOCK, :, at % BLOCK]
            else:
                keys[:, dst:dst + n] = keys[:, src:src + n]
        for values in self.v.values():
            values[:, dst:dst + n] = values[:, src:src + n]

    def allocated_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k.values(), *self.v.values()))


class LayerView:
    """One ``Retro`` layer's cache for a pass: ``Block`` calls ``attend(attn, h)``."""

    def __init__(self, cache: KVCache, layer: int, layout: PassLayout):
        self.cache, self.layer, self.layout = cache, layer, layout

    def attend(self, attn, h: torch.Tensor) -> torch.Tensor:
        """h [1, T, d] -> the self-attention's output [1, T, d], its keys written to the cache."""
        _, T, d = h.shape
        q = attn.q(h).view(1, T, attn.h, d // attn.h).transpose(1, 2)  # [1, h, T, e]
        self.cache.write(self.layer, *attn.keys_values(h), self.layout)
        y = self.cache.attend(self.layer, q, self.layout)  # [1, T, h, e]
        return attn.out(y.reshape(1, T, d))


# -- Hugging Face models ---------------------------------------------------------------------------

HF_ATTENTION = "retro_ray_packed"
"""The attention implementation name a retro-fitted Hugging Face model runs with in the engine."""
_PASS: contextvars.ContextVar[tuple[KVCache, PassLayout] | None] = contextvars.ContextVar("retro_ray_pass",
                                                                                            default=None)


def hf_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
                 **kwargs):
    """Hugging Face's attention interface: in an engine pass, the packed attention over the cache
    (within the layer's sliding window, if it has one); elsewhere (training, the full-recompute
    reference) SDPA with the mask ``hf_mask`` built."""
    current = _PASS.get()
    if current is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      sliding_window=sliding_window, **kwargs)
    cache, layout = current
    return cache.attend(module.layer_idx, query, layout, scaling, sliding_window), None  # [1, T, h, e]


def hf_mask(*args, **kwargs):
    """Hugging Face's mask interface: in an engine pass none (``KVCache.attend`` masks each
    segment itself); elsewhere SDPA's, so sliding windows and packed examples stay masked there."""
    from transformers.masking_utils import sdpa_mask

    return None if _PASS.get() is not None else sdpa_mask(*args, **kwargs)


def use_packed_attention(model) -> None:
    """Make a Hugging Face model's attention the engine's (outside a pass it stays SDPA). A model
    whose attention soft-caps its logits (Gemma 2) is refused: the packed attention has no cap."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    cap = getattr(model.config, "attn_logit_softcapping", None)
    if cap is not None:
        raise UserError(f"{model.config.model_type}: the engine cannot serve a model whose attention soft-caps "
                        f"its logits (attn_logit_softcapping={cap})")
    AttentionInterface.register(HF_ATTENTION, hf_attention)
    AttentionMaskInterface.register(HF_ATTENTION, hf_mask)
    model.set_attn_implementation(HF_ATTENTION)


class packed_pass:
    """``with packed_pass(cache, layout):`` the Hugging Face model's attention reads the cache."""

    def __init__(self, cache: KVCache, layout: PassLayout):
        self.value = (cache, layout)

    def __enter__(self):
        self.token = _PASS.set(self.value)

    def __exit__(self, *exc):
        _PASS.reset(self.token)


def hf_cache(cache: KVCache, layout: PassLayout):
    """The cache as a Hugging Face ``Cache`` for one pass: every attention layer writes its keys."""
    from transformers.cache_utils import Cache

    class PassCache(Cache):
        def __init__(self):
            super().__init__(layers=[])

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            cache.write(layer_idx, key_states, value_states, layout)
            return key_states, value_states  # the attention reads the cache (hf_attention), not these

        def get_seq_length(self, layer_idx: int = 0) -> int:
            return 0  # positions are always given

    return PassCache()


# -- what CCA reads --------------------------------------------------------------------------------


class NeighbourState:
    """The decoder states at the first CCA layer of every cache position (the encoder reads a
    chunk's states there), and per row the current chunk's projected CCA keys and values (a decode
    token only ever sees its current chunk: position p sees chunk (p - m + 1) // m)."""

    def __init__(self, model, rows: int, tokens: int):
        self.encoder, self.m = model.encoder, model.cfg.chunk_length
        self.embed = model.wte if isinstance(model, Retro) else model.base.get_input_embeddings()
        self.rows, self.tokens = rows, tokens
        self.states: torch.Tensor | None = None  # [N, d]
        self.keys: dict = {}  # CCA module -> (keys, values) [rows, h, k r, e]
        self.mask: torch.Tensor | None = None  # [rows, k r]
        self.chunk = [-1] * rows  # host: the chunk each row's keys are of (-1: none)
        self.encode_s = 0.0

    def swap(self, a: int, b: int) -> None:
        """Rows a and b trade places (the scheduler keeps the decoding rows first), as copies of
        whole rows: advanced indexing (``t[[a, b]] = t[[b, a]]``) gathers and scatters element by
        element, ten times slower for rows this size (16 tensors of [32, 9, 256, 64]: 8 ms a swap
        against 0.8 on 2 cores)."""
        for t in (*(t for pair in self.keys.values() for t in pair), *([] if self.mask is None else [self.mask])):
            row = t[a].clone()
            t[a] = t[b]
            t[b] = row
        self.chunk[a], self.chunk[b] = self.chunk[b], self.chunk[a]

    def copy_row(self, src: int, dst: int) -> None:
        for keys, values in self.keys.values():
            keys[dst], values[dst] = keys[src], values[src]
        if self.mask is not None:
            self.mask[dst] = self.mask[src]
        self.chunk[dst] = self.chunk[src]

    def copy_states(self, src: int, dst: int, n: int) -> None:
        if self.states is not None:
            self.states[dst:dst + n] = self.states[src:src + n]


@dataclass
class NewChunk:
    """A chunk whose neighbours a pass encodes: segment ``segment``'s sequence, its chunk ``u``."""

    segment: int
    u: int
    tokens: torch.Tensor  # [k, r]
    mask: torch.Tensor  # [k, r]


class PassNeighbours:
    """``retrieved(cca, states)`` for one packed pass: decode rows 0..b-1 first (one token each,
    row i of ``NeighbourState``), then prompt slices; ``new``: the chunks whose neighbours the
    pass encodes (their last position is in it); ``uses[i]``: whether segment i's sequence reads
    neighbours at all; ``rows[i]``: its row."""

    def __init__(self, state: NeighbourState, layout: PassLayout, decode: int, rows: list[int], uses: list[bool],
                 new: list[NewChunk]):
        self.state, self.layout, self.decode, self.rows, self.uses, self.new = state, layout, decode, rows, uses, new
        self.enc: torch.Tensor | None = None  # [n, k, r, d'] the new chunks' encodings
        self.visible: torch.Tensor | None = None  # [b, k r] what each decode row sees
        self.started = False

    def _first_layer(self, h: torch.Tensor) -> None:
        """Keep the pass's states; encode the new chunks against their chunk's states."""
        st, m = self.state, self.state.m
        if st.states is None:
            st.states = h.new_zeros(st.tokens, h.shape[-1])
        st.states.index_copy_(0, self.layout.write, h[0])
        if not self.new:
            return
        start = time.perf_counter()
        segments = self.layout.segments
        at = torch.cat([torch.arange(m) + segments[c.segment].offset + c.u * m for c in self.new]).to(h.device)
        chunks = st.states[at].view(len(self.new), 1, m, -1)  # [n, 1, m, d]
        tokens = torch.stack([c.tokens for c in self.new])[:, None]  # [n, 1, k, r]
        masks = torch.stack([c.mask for c in self.new])[:, None]
        self.enc = st.encoder(st.embed(tokens).to(h.dtype), masks, chunks)[:, 0]  # [n, k, r, d']
        if h.is_cuda:  # the encoder's own time, for the benchmark's share (the engine's one sync)
            torch.cuda.synchronize(h.device)
        st.encode_s += time.perf_counter() - start

    def __call__(self, cca, h: torch.Tensor) -> torch.Tensor:
        """h [1, T, d] states of a CCA layer -> [1, T, d] CCA output."""
        st, m, b, segments = self.state, self.state.m, self.decode, self.layout.segments
        first = not self.started
        if first:
            self._first_layer(h)
            self.started = True
            self.newest = {c.segment: j for j, c in sorted(enumerate(self.new), key=lambda jc: jc[1].u)}
            # a prompt slice's first tokens may see the chunk its row held before this pass
            self.before = {i: st.chunk[self.rows[i]] for i in range(b, len(segments))}
            self.before_mask = {i: st.mask[self.rows[i]].clone() for i in range(b, len(segments))
                                if st.mask is not None and self.before[i] >= 0}
        k_new = v_new = None
        if self.new:
            k_new, v_new = cca.attn.keys_values(self.enc.flatten(1, 2))  # [n, h, k r, e] each
        if cca not in st.keys:
            if k_new is None:
                return torch.zeros_like(h)  # no chunk of any sequence encoded yet: nothing to see
            st.keys[cca] = (k_new.new_zeros(st.rows, *k_new.shape[1:]), v_new.new_zeros(st.rows, *v_new.shape[1:]))
            if st.mask is None:
                st.mask = torch.zeros(st.rows, k_new.shape[2], dtype=torch.bool, device=h.device)  # [rows, k r]
        keys, values = st.keys[cca]
        if first:
            for i, j in self.newest.items():
                st.mask[self.rows[i]], st.chunk[self.rows[i]] = self.new[j].mask.flatten(), self.new[j].u
        decoded = None
        if b:
            for i, j in self.newest.items():
                if i < b:  # a decode row reads its chunk's keys from its row
                    keys[self.rows[i]], values[self.rows[i]] = k_new[j], v_new[j]
            if first:  # what each decode row sees, the same at every CCA layer of the pass
                sees = [self.uses[i] and st.chunk[i] >= 0 and segments[i].start >= m - 1 for i in range(b)]
                visible = st.mask[:b] & torch.tensor(sees, device=h.device)[:, None]  # [b, k r]
                self.empty = ~visible.any(-1)[:, None, None]  # [b, 1, 1]: nothing to see, output 0
                key0 = torch.zeros_like(visible)
                key0[:, 0] = True  # a row that sees nothing attends to key 0, zeroed after (no NaN, no sync)
                self.visible = (visible | (self.empty[:, 0] & key0))[:, None, None, :]  # [b, 1, 1, k r]
            y = cca.attn.attend(h[0, :b, None], keys[:b], values[:b], attn_mask=self.visible)  # [b, 1, d]
            decoded = y.masked_fill(self.empty, 0.0)
            if b == len(segments):
                return decoded.transpose(0, 1)  # [1, b, d]: a decode-only pass
        out = torch.zeros_like(h)
        if b:
            out[0, :b] = decoded[:, 0]
        for i in range(b, len(segments)):  # a prompt slice: its tokens grouped by the chunk they see
            if not self.uses[i]:
                continue
            s, row = segments[i], self.rows[i]
            mine = {c.u: j for j, c in enumerate(self.new) if c.segment == i}
            for u in range(max(0, (s.start - m + 1) // m), (s.seen - m) // m + 1):
                first_at = max(s.start, u * m + m - 1)
                last_at = min(s.seen, u * m + 2 * m - 1)  # positions first_at..last_at-1 see chunk u
                if u in mine:
                    j = mine[u]
                    k, v, visible = k_new[j:j + 1], v_new[j:j + 1], self.new[j].mask.flatten()[None]
                elif self.before[i] == u:
                    k, v, visible = keys[row][None], values[row][None], self.before_mask[i][None]
                else:
                    continue  # that chunk has no neighbours
                at = slice(s.first + first_at - s.start, s.first + last_at - s.start)
                out[:, at] = cca.attn.attend(h[:, at], k, v, key_mask=visible)
        for i, j in self.newest.items():
            if i >= b:  # a prompt's last chunk stays in its row for its decoding
                keys[self.rows[i]], values[self.rows[i]] = k_new[j], v_new[j]
        return out
