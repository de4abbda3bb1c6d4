"""Retro: a GPT decoder with chunked cross-attention (CCA) to encoded retrieved neighbours.

RETRO: Borgeaud et al. 2022, https://arxiv.org/abs/2112.04426
Megatron Retro (Shall we pretrain with retrieval?): Wang et al. 2023, https://arxiv.org/abs/2304.06762
InstructRetro: Wang et al. 2024, https://arxiv.org/abs/2310.07713

Notation (as in Megatron): b batch, n tokens, m chunk length, l chunks (n // m), k neighbours per
chunk, r neighbour length (chunk + continuation = 2 m), d width, h heads, e = d / h head width,
d' encoder width (RETRO's d'; Megatron uses d' = d), h' = d' / e encoder heads.

Every attention (causal self-attention, CCA, the encoder's self- and cross-attention) goes
through ``torch.nn.functional.scaled_dot_product_attention``, so GPUs get fused kernels. With
``retrieval=False`` the same code is the GPT baseline. Imports no Ray.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class RetroConfig:
    vocab_size: int = 8192
    d_model: int = 256
    n_layers: int = 12
    n_heads: int = 8
    max_seq_len: int = 2048
    mlp_ratio: int = 4
    dropout: float = 0.0
    retrieval: bool = True
    """False: the GPT baseline (no encoder, no CCA), otherwise the same model."""
    chunk_length: int = 64
    k: int = 2
    encoder_layers: int = 2
    encoder_d_model: int | None = None
    """d': the encoder's width (None: d_model, as Megatron; RETRO gives the encoder its own
    width). The encoder reads k r = 4 m tokens per decoder chunk, so at full width its two
    layers cost about as much as eight decoder layers: a narrow encoder keeps small models cheap."""
    cca_layers: list[int] | None = None
    """1-based decoder layers with CCA; None is Megatron's default: 6, 9, 12, ... for up to 15
    layers, 9, 12, ... above (the first is also where the encoder reads the decoder)."""
    extra: dict = field(default_factory=dict)
    """Free-form provenance (base model, tokenizer) saved with the config."""

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not a multiple of n_heads={self.n_heads}")
        if self.encoder_width % (self.d_model // self.n_heads):
            raise ValueError(f"encoder_d_model={self.encoder_width} is not a multiple of the head width "
                             f"{self.d_model // self.n_heads} (d_model / n_heads)")
        if self.retrieval and not self.resolved_cca_layers():
            raise ValueError(f"no CCA layer fits in {self.n_layers} layers; set cca_layers")
        bad = [i for i in self.resolved_cca_layers() if not 1 <= i <= self.n_layers]
        if bad:
            raise ValueError(f"cca_layers {bad} outside 1..{self.n_layers}")

    @property
    def neighbor_len(self) -> int:
        """r: a neighbour chunk and its continuation."""
        return 2 * self.chunk_length

    @property
    def encoder_width(self) -> int:
        """d'."""
        return self.encoder_d_model or self.d_model

    @property
    def encoder_heads(self) -> int:
        """h': the encoder keeps the decoder's head width e."""
        return self.encoder_width // (self.d_model // self.n_heads)

    def resolved_cca_layers(self) -> list[int]:
        if not self.retrieval:
            return []
        if self.cca_layers is not None:
            return sorted(self.cca_layers)
        return list(range(6 if self.n_layers <= 15 else 9, self.n_layers + 1, 3))

    def to_dict(self) -> dict:
        return asdict(self)


# -- building blocks, smallest first ----------------------------------------------------------


class Attention(nn.Module):
    """Multi-head attention of ``x`` over ``context`` (itself for self-attention), via SDPA. The
    context may have another width ``d_context`` (the encoder's d' in CCA, d in the encoder)."""

    def __init__(self, d: int, h: int, dropout: float, d_context: int | None = None):
        super().__init__()
        self.h, self.dropout = h, dropout
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d_context or d, 2 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                key_mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        """x [B, T, d], context [B, S, d_context], key_mask [B, S] (True = attend) -> [B, T, d]."""
        k, v = self.keys_values(x if context is None else context)
        return self.attend(x, k, v, key_mask=key_mask, causal=causal)

    def keys_values(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """context [B, S, d_context] -> keys, values [B, h, S, e] (what a KV cache keeps)."""
        B, S, _ = context.shape
        e = self.q.out_features // self.h
        k, v = self.kv(context).view(B, S, 2, self.h, e).permute(2, 0, 3, 1, 4)  # [B, h, S, e] each
        return k, v

    def attend(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None,
               causal: bool = False, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, d] attends to k, v [B, h, S, e]; key_mask [B, S] or attn_mask [B, 1, T, S]
        (True = attend) -> [B, T, d]. A query with no key to see outputs exactly 0 (not the output
        projection's bias): all neighbours masked is the same as no neighbours."""
        B, T, d = x.shape
        q = self.q(x).view(B, T, self.h, d // self.h).transpose(1, 2)  # [B, h, T, e]
        mask = attn_mask
        if key_mask is not None:
            # A query whose keys are all masked would give NaN: let it see key 0, zero it below
            # (element-wise, so the device never waits for the host).
            empty = ~key_mask.any(-1, keepdim=True)  # [B, 1]
            first = torch.zeros_like(key_mask)
            first[:, 0] = True
            mask = (key_mask | (empty & first))[:, None, None, :]  # [B, 1, 1, S]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = self.out(y.transpose(1, 2).reshape(B, T, d))  # [B, T, d]
        return y.masked_fill(empty[:, :, None], 0.0) if key_mask is not None else y


class MLP(nn.Module):
    def __init__(self, d: int, ratio: int, dropout: float):
        super().__init__()
        self.fc = nn.Linear(d, ratio * d)
        self.proj = nn.Linear(ratio * d, d)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class EncoderLayer(nn.Module):
    """Bidirectional self-attention over a neighbour, cross-attention to its chunk, MLP."""

    def __init__(self, cfg: RetroConfig):
        super().__init__()
        d, h = cfg.encoder_width, cfg.encoder_heads
        self.ln1, self.attn = nn.LayerNorm(d), Attention(d, h, cfg.dropout)
        self.ln2, self.cross = nn.LayerNorm(d), Attention(d, h, cfg.dropout, d_context=cfg.d_model)
        self.ln3, self.mlp = nn.LayerNorm(d), MLP(d, cfg.mlp_ratio, cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, chunk: torch.Tensor) -> torch.Tensor:
        """x [b l, k, r, d'] neighbour states, mask [b l, k, r], chunk [b l, m, d] -> [b l, k, r, d']."""
        B, k, r, d = x.shape
        x = x + self.attn(self.ln1(x).view(B * k, r, d), key_mask=mask.reshape(B * k, r)).view(B, k, r, d)
        # All k neighbours of a chunk attend to the same chunk states: one query sequence of k r
        # tokens per chunk projects the chunk's keys and values once, not k times.
        x = x + self.cross(self.ln2(x).view(B, k * r, d), chunk).view(B, k, r, d)
        return x + self.mlp(self.ln3(x))


class RetroEncoder(nn.Module):
    """Encodes each neighbour conditioned on the decoder states of the chunk it was retrieved for."""

    def __init__(self, cfg: RetroConfig):
        super().__init__()
        d, d_enc = cfg.d_model, cfg.encoder_width
        self.proj = nn.Linear(d, d_enc, bias=False) if d_enc != d else nn.Identity()
        self.pos = nn.Embedding(cfg.neighbor_len, d_enc)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.encoder_layers))
        self.ln = nn.LayerNorm(d_enc)

    def forward(self, emb: torch.Tensor, mask: torch.Tensor, chunks: torch.Tensor) -> torch.Tensor:
        """emb [b, l, k, r, d] embedded neighbour tokens, mask [b, l, k, r], chunks [b, l, m, d]
        -> [b, l, k, r, d']."""
        b, l, k, r, d = emb.shape
        x = (self.proj(emb) + self.pos.weight[:r]).reshape(b * l, k, r, -1)  # [b l, k, r, d']
        ctx = chunks.reshape(b * l, -1, d)  # [b l, m, d]
        flat_mask = mask.reshape(b * l, k, r)
        for layer in self.layers:
            x = layer(x, flat_mask, ctx)
        return self.ln(x).view(b, l, k, r, -1)


class ChunkedCrossAttention(nn.Module):
    """CCA with RETRO's causal shift: token i of chunk u attends to the neighbours of chunk u only
    from the chunk's last token on (i >= u m + m - 1), so no token sees neighbours retrieved with
    tokens it has not seen. The output projection starts at zero: a new CCA changes nothing."""

    def __init__(self, cfg: RetroConfig):
        super().__init__()
        self.m = cfg.chunk_length
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.dropout, d_context=cfg.encoder_width)
        nn.init.zeros_(self.attn.out.weight)
        nn.init.zeros_(self.attn.out.bias)

    def forward(self, x: torch.Tensor, enc: torch.Tensor, mask: torch.Tensor,
                keys_values: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x [b, n, d], enc [b, l, k, r, d'], mask [b, l, k, r] -> [b, n, d] (zero where no
        neighbours are visible yet). ``keys_values``: enc already projected by ``attn`` ([b l, h,
        k r, e] each), as generation keeps them."""
        b, n, d = x.shape
        m, l = self.m, enc.shape[1]
        shifted = x[:, m - 1: m - 1 + l * m]  # [b, <= l m, d]: position u m + m - 1 starts chunk u
        pad = l * m - shifted.shape[1]
        shifted = F.pad(shifted, (0, 0, 0, pad))  # [b, l m, d]
        q = shifted.reshape(b * l, m, d)  # [b l, m, d]
        k, v = keys_values or self.attn.keys_values(enc.reshape(b * l, -1, enc.shape[-1]))  # [b l, h, k r, e]
        y = self.attn.attend(q, k, v, key_mask=mask.reshape(b * l, -1))  # [b l, m, d]
        y = y.reshape(b, l * m, d)[:, : l * m - pad]  # [b, <= l m, d]
        return F.pad(y, (0, 0, m - 1, n - (m - 1) - y.shape[1]))  # [b, n, d]: shift back


class Block(nn.Module):
    """Decoder layer: causal self-attention, CCA (on retrieval layers), MLP; pre-LayerNorm."""

    def __init__(self, cfg: RetroConfig, cca: bool):
        super().__init__()
        d = cfg.d_model
        self.ln1, self.attn = nn.LayerNorm(d), Attention(d, cfg.n_heads, cfg.dropout)
        self.ln_cca = nn.LayerNorm(d) if cca else None
        self.cca = ChunkedCrossAttention(cfg) if cca else None
        self.ln2, self.mlp = nn.LayerNorm(d), MLP(d, cfg.mlp_ratio, cfg.dropout)

    def forward(self, x: torch.Tensor, retrieved=None, cache=None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [b, T, d]; ``retrieved(cca, states)`` -> the CCA output [b, T, d] on CCA layers;
        ``cache`` (generation): ``attend(attn, h)`` -> the self-attention's output [b, T, d] over
        the cached keys; ``attn_mask`` [b, 1, T, T] replaces the causal mask (packed examples)."""
        h = self.ln1(x)
        if cache is not None:
            x = x + cache.attend(self.attn, h)
        elif attn_mask is not None:
            x = x + self.attn.attend(h, *self.attn.keys_values(h), attn_mask=attn_mask)
        else:
            x = x + self.attn(h, causal=True)
        if self.cca is not None and retrieved is not None:
            x = x + retrieved(self.cca, self.ln_cca(x))
        return x + self.mlp(self.ln2(x))


# -- the model -----------------------------------------------------------------------------


class Retro(nn.Module):
    """Decoder-only LM with retrieval; ``forward`` returns ``(logits, loss)``."""

    def __init__(self, cfg: RetroConfig):
        super().__init__()
        self.cfg = cfg
        cca = set(cfg.resolved_cca_layers())
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i + 1 in cca) for i in range(cfg.n_layers))
        self.encoder = RetroEncoder(cfg) if cfg.retrieval else None
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in GPT-2
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2: scaled init of residual projections
            if name.endswith(("attn.out.weight", "mlp.proj.weight")) and ".cca." not in name:
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, ChunkedCrossAttention):  # applied after its children: stays zero
            nn.init.zeros_(module.attn.out.weight)
            nn.init.zeros_(module.attn.out.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def retrieval_parameters(self) -> set[str]:
        """Names of the retrieval encoder's and the CCA layers' parameters (with their norms)."""
        return {n for n, _ in self.named_parameters() if n.startswith("encoder.") or ".cca." in n or ".ln_cca." in n}

    def forward(self, tokens: torch.Tensor, neighbors: torch.Tensor | None = None,
                neighbor_mask: torch.Tensor | None = None, targets: torch.Tensor | None = None,
                loss_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Shapes: tokens [b, n]; neighbors [b, L, k, r] token ids with L >= n // m (only the
        first n // m chunks, those complete in ``tokens``, are used); neighbor_mask [b, L, k, r]
        (True = real token; default: all real); targets [b, n] (-100 = ignore);
        loss_mask [b, n] (0 = ignore); positions [b, n]: packed examples, each restarting at 0
        and attending only to itself (default: one sequence, 0..n-1). Returns logits
        [b, n, vocab] and the mean loss or None.
        """
        b, n = tokens.shape
        if n > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {n} tokens exceeds max_seq_len={self.cfg.max_seq_len}")
        attn_mask = None if positions is None else packed_causal_mask(positions)
        if positions is None:
            positions = torch.arange(n, device=tokens.device)  # [n]
        retrieved = self._retriever(neighbors, neighbor_mask, n)
        logits = self.decode(tokens, positions, retrieved, attn_mask=attn_mask)  # [b, n, vocab]
        return logits, lm_loss(logits, targets, loss_mask)

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, retrieved=None, caches=None,
               attn_mask: torch.Tensor | None = None, logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """The decoder on tokens [b, T] at positions [b, T] (or [T]) -> logits [b, T, vocab], or
        [b, P, vocab] at the positions ``logits_at`` [P] only. ``retrieved`` feeds the CCA layers;
        ``caches`` (one per layer) make it incremental."""
        x = self.drop(self.wte(tokens) + self.wpe(positions))  # [b, T, d]
        for block, cache in zip(self.blocks, caches or [None] * len(self.blocks)):
            x = block(x, retrieved, cache, attn_mask)
        if logits_at is None:
            return self.lm_head(self.ln_f(x))
        return sampled_logits(self.lm_head, self.ln_f(x[:, logits_at]))

    def _retriever(self, neighbors, neighbor_mask, n: int):
        return make_retriever(self.encoder, self.wte, self.cfg.chunk_length, neighbors, neighbor_mask, n)


def packed_causal_mask(positions: torch.Tensor) -> torch.Tensor:
    """positions [b, n] of packed examples (each restarts at 0) -> attention mask [b, 1, n, n]:
    causal, and no token sees another example's (the rule Hugging Face models apply to
    ``position_ids`` that restart)."""
    first = positions[:, :1] - 1
    example = (torch.diff(positions, prepend=first, dim=-1) != 1).cumsum(-1)  # [b, n]
    n = positions.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=positions.device).tril()  # [n, n]
    return (causal & (example[:, :, None] == example[:, None, :]))[:, None]  # [b, 1, n, n]


def lm_loss(logits: torch.Tensor, targets: torch.Tensor | None, loss_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Next-token cross entropy over the targets [b, n], averaged with the weights loss_mask [b, n]:
    a bool mask takes the mean over its targets, float weights a weighted mean (1 / its target
    count for each example's tokens: the mean of per-example means)."""
    if targets is None:
        return None
    losses = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none")
    if loss_mask is None:
        return losses.mean()
    weights = loss_mask.reshape(-1).to(losses.dtype)  # [b n]
    return (losses * weights).sum() / weights.sum()


_VOCABULARY_FIRST: dict[tuple, bool] = {}
"""(head shape, dtype) -> whether ``sampled_logits`` computes that head vocabulary first on a CPU."""


def sampled_logits(head: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The LM head at a few sampled positions: x [b, P, d] -> logits [b, P, vocab] (a view that may
    not be contiguous). On a CPU the same product can be computed vocabulary first, (W x^T)^T, with
    the vocabulary as the long side of the BLAS product and 2 positions at least (a one-row
    product takes a matrix-vector path). Which of the two is faster depends on the BLAS and the
    CPU, so it is measured once per head shape and kept. With MKL on 2 Zen 4 cores, SmolLM2's head
    (49152 x 576, fp32): 1 position 10 -> 3 to 5 ms, 2: 24 -> 3 to 5, 8: 16 to 19 -> 7 to 15, 32:
    27 to 28 -> 20 to 25."""
    b, P, d = x.shape
    if x.device.type != "cpu" or head.bias is not None or type(head) is not nn.Linear:
        return head(x)
    key = (tuple(head.weight.shape), head.weight.dtype)
    if key not in _VOCABULARY_FIRST:
        probes = [torch.ones(n, d, dtype=x.dtype) for n in (1, 16)]  # no draw from the global generator
        _VOCABULARY_FIRST[key] = (best_of(lambda: [_vocabulary_first(head.weight, p) for p in probes])
                                  < best_of(lambda: [F.linear(p, head.weight) for p in probes]))
    if not _VOCABULARY_FIRST[key]:
        return head(x)
    return _vocabulary_first(head.weight, x.reshape(b * P, d)).view(b, P, -1)


def _vocabulary_first(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """weight [vocab, d], x [P, d] -> x W^T [P, vocab] as (W x^T)^T, a one-row x doubled."""
    P = x.shape[0]
    both = torch.cat([x, x]) if P == 1 else x  # [max(P, 2), d]
    return (weight @ both.t())[:, :P].t()  # [P, vocab], strides (1, max(P, 2))


def best_of(run, repeats: int = 3) -> float:
    """The fastest of ``repeats`` timed calls of ``run`` (after one untimed)."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def make_retriever(encoder: RetroEncoder | None, embed: nn.Embedding, m: int, neighbors, neighbor_mask, n: int):
    """The function CCA layers call as ``retrieved(cca, states)`` with their input states
    [b, n, d] to get their output [b, n, d]; None without retrieval. The encoder runs once, at the
    first CCA layer, on that layer's states (as in Megatron), and is reused by later layers.
    Only the l = n // m chunks complete in the input have their neighbours used. A neighbour token
    id of -1 is padding, the same as a masked one."""
    l = n // m
    if encoder is None or neighbors is None or l == 0:
        return None
    neighbors = neighbors[:, :l]  # [b, l, k, r]
    mask = torch.ones_like(neighbors, dtype=torch.bool) if neighbor_mask is None else neighbor_mask[:, :l]
    mask = mask & (neighbors >= 0)
    neighbors = neighbors.clamp(min=0)
    encoded: list = []

    def retrieved(cca: "ChunkedCrossAttention", states: torch.Tensor) -> torch.Tensor:
        if not encoded:
            b, _, d = states.shape
            chunks = states[:, : l * m].reshape(b, l, m, d)  # [b, l, m, d]
            encoded.append(encoder(embed(neighbors).to(states.dtype), mask, chunks))  # [b, l, k, r, d']
        return cca(states, encoded[0], mask)

    return retrieved
