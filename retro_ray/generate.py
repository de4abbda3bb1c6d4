"""Generation with retrieval: one prefill pass, a KV cache, a new retrieval every completed chunk.

The reference (Megatron's Retro text generation) decodes one request at a time, recomputes the
whole sequence for every token and never retrieves after the prompt. Here, as in NeMo's RETRO
inference and better:

- The prompts of a batch are right-padded and prefilled in one forward pass; each then decodes
  one token per step at its own position, with a KV cache (ours for ``Retro``, Hugging Face's
  ``past_key_values`` for a retro-fitted base).
- Retrieval follows training's causal shift: when chunk u of a sequence is complete (from the
  prompt or generated), its text is embedded, the index is queried, and its neighbours (chunk +
  continuation tokens) are encoded once against that chunk's states at the first CCA layer. The
  token that completes chunk u is the first to see them, exactly as in ``Retro.forward``. The
  complete chunks of all prompts are one batched query; so are the chunks completed in a step.
- Modes: ``encoder`` (neighbours through CCA, retrieved for every completed chunk), ``off``
  (decoder only: the encoder dropped, as InstructRetro finds works as well), ``prompt``
  (retrieved passages placed before the prompt, decoder only), ``both``, and ``question``
  (InstructRetro's QA setting, the reference's ``--reuse-top``: every chunk's neighbours are the
  top-k passages retrieved for the question, ``title: .., source: ..`` tokenised and cut to r).
- ``use_cache=False`` recomputes the whole sequence every step (same retrievals), the baseline
  that the tests and ``bench/generate.py`` compare the cache with.

Notation: b sequences, T new positions in a pass, S cache slots, m chunk length, k neighbours,
r neighbour length, d width, d' encoder width, h heads, e head width. Imports no Ray.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Iterator, Literal

import numpy as np
import torch

from retro_ray.errors import UserError
from retro_ray.model.retro import Retro
from retro_ray.model.retrofit import RetroFit
from retro_ray.retrieval import format_passage

Mode = Literal["encoder", "off", "prompt", "both", "question"]
MODES = ("encoder", "off", "prompt", "both", "question")


class GenerationError(UserError, ValueError):
    """A request the model cannot serve: too long, wrong tokenizer, unknown mode."""


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0
    """0: greedy."""
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
class Generation:
    prompt: str
    """The text the model was given (retrieved passages included)."""
    text: str
    tokens: list[int]
    prompt_tokens: int
    finish_reason: str
    """``stop`` (a stop string or end of text) or ``length``."""
    retrieved: list[dict]
    """Per chunk that retrieved: ``chunk`` (its index), ``text`` and its ``neighbors``."""
    passages: list[dict] = field(default_factory=list)
    logits: list[np.ndarray] | None = None
    """With ``keep_logits``: the next-token logits [V] of every step."""


def passages_prompt(passages: list[str], prompt: str) -> str:
    """Retrieved passages (formatted: ``title: .., source: ..``) before the prompt, as the
    ``prompt``, ``both`` and ``question`` modes give them."""
    return "".join(f"{p}\n\n" for p in passages) + prompt


class KVCache:
    """Self-attention keys and values of every decoder layer, written at each token's position.

    ``positions`` [b, T] are the positions of the tokens of the current pass; a token attends to
    the slots of its own sequence up to its position. Slots past a prompt's end hold padding from
    the prefill until the sequence's own tokens overwrite them, one per step.
    """

    def __init__(self, n_layers: int, b: int, h: int, slots: int, e: int, dtype, device):
        self.k = torch.zeros(n_layers, b, h, slots, e, dtype=dtype, device=device)  # [layers, b, h, S, e]
        self.v = torch.zeros_like(self.k)
        self.positions: torch.Tensor | None = None

    def layers(self) -> list["LayerCache"]:
        return [LayerCache(self, i) for i in range(self.k.shape[0])]


class LayerCache:
    """One layer's view of a ``KVCache``; ``Block`` calls ``update`` with the pass's keys and values."""

    def __init__(self, cache: KVCache, layer: int):
        self.cache, self.layer = cache, layer

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """k, v [b, h, T, e] -> (all keys, all values [b, h, S, e], attention mask [b, 1, T, S])."""
        pos = self.cache.positions  # [b, T]
        b, h, T, e = k.shape
        index = pos[:, None, :, None].expand(b, h, T, e)  # [b, h, T, e]
        keys = self.cache.k[self.layer].scatter_(2, index, k)  # [b, h, S, e]
        values = self.cache.v[self.layer].scatter_(2, index, v)
        slots = torch.arange(keys.shape[2], device=k.device)  # [S]
        mask = slots[None, None, None, :] <= pos[:, None, :, None]  # [b, 1, T, S]
        return keys, values, mask


class ChunkNeighbors:
    """What CCA layers read during generation: the encoded neighbours of every completed chunk.

    CCA layers call it as ``retrieved(cca, states)``. At the first CCA layer of a pass it keeps
    that layer's states (the encoder reads a chunk's states there) and encodes the neighbours of
    the chunks completed in this pass; every CCA layer projects their keys and values once (a KV
    cache for CCA: k r keys per chunk would otherwise be projected again for every token) and
    then attends, per token, to the neighbours of the chunk the causal shift gives it: position p
    sees chunk (p - m + 1) // m from p = m - 1.
    """

    def __init__(self, model: Retro | RetroFit, b: int, slots: int):
        self.encoder, self.m = model.encoder, model.cfg.chunk_length
        self.embed = model.wte if isinstance(model, Retro) else model.base.get_input_embeddings()
        self.b, self.slots = b, slots
        self.enc: torch.Tensor | None = None  # [b, L, k, r, d']
        self.mask: torch.Tensor | None = None  # [b, L, k, r]
        self.states: torch.Tensor | None = None  # [b, S, d] at the first CCA layer
        self.encode_s = 0.0
        self.keys: dict = {}  # CCA module -> (keys, values) [b, L, h, k r, e] of its attention
        self._pass: dict = {}

    def prefill(self, neighbors: torch.Tensor, mask: torch.Tensor) -> None:
        """Next pass: the prompts from position 0; neighbors, mask [b, l, k, r] for their l chunks
        (mask False for a chunk a shorter prompt has not completed)."""
        self._pass = {"kind": "prefill", "neighbors": neighbors, "mask": mask}

    def step(self, positions: torch.Tensor, new: dict[int, tuple[int, torch.Tensor, torch.Tensor]]) -> None:
        """Next pass: one token per sequence at ``positions`` [b]; ``new`` maps a sequence whose
        token completes chunk u to (u, neighbour tokens [k, r], mask [k, r])."""
        self._pass = {"kind": "step", "positions": positions, "new": new}

    def _allocate(self, states: torch.Tensor, k: int, r: int) -> None:
        L = self.slots // self.m + 1
        d_enc = self.encoder.ln.normalized_shape[0]
        self.states = states.new_zeros(self.b, self.slots, states.shape[-1])
        self.enc = states.new_zeros(self.b, L, k, r, d_enc)
        self.mask = torch.zeros(self.b, L, k, r, dtype=torch.bool, device=states.device)

    def __call__(self, cca, h: torch.Tensor) -> torch.Tensor:
        """h [b, T, d] states of a CCA layer -> [b, T, d] CCA output."""
        p = self._pass
        if p["kind"] == "prefill":
            neighbors, mask = p["neighbors"], p["mask"]
            if "enc" not in p:  # first CCA layer of the pass
                b, n, d = h.shape
                l = neighbors.shape[1]
                self._allocate(h, *neighbors.shape[2:])
                self.states[:, :n] = h
                if l:
                    start = time.perf_counter()
                    chunks = h[:, : l * self.m].reshape(b, l, self.m, d)  # [b, l, m, d]
                    p["enc"] = self.encoder(self.embed(neighbors).to(h.dtype), mask, chunks)  # [b, l, k, r, d']
                    self.enc[:, :l], self.mask[:, :l] = p["enc"], mask
                    self.encode_s += _elapsed(start, h)
                else:
                    p["enc"] = None
            if p["enc"] is None:
                return torch.zeros_like(h)
            l = p["enc"].shape[1]
            kv = self._project(cca, slice(None), slice(0, l), p["enc"].flatten(0, 1))  # [b l, k, r, d']
            return cca(h, p["enc"], mask, keys_values=kv)
        pos = p["positions"]  # [b]
        rows = torch.arange(self.b, device=h.device)
        if not p.get("seen"):  # first CCA layer of the pass
            p["seen"] = True
            self.states[rows, pos] = h[:, 0]
            if p["new"]:
                start = time.perf_counter()
                seqs = sorted(p["new"])
                us = [p["new"][i][0] for i in seqs]
                tokens = torch.stack([p["new"][i][1] for i in seqs])[:, None]  # [n_new, 1, k, r]
                masks = torch.stack([p["new"][i][2] for i in seqs])[:, None]
                chunks = torch.stack([self.states[i, u * self.m:(u + 1) * self.m] for i, u in zip(seqs, us)])
                enc = self.encoder(self.embed(tokens).to(h.dtype), masks, chunks[:, None])  # [n_new, 1, k, r, d']
                for j, (i, u) in enumerate(zip(seqs, us)):
                    self.enc[i, u], self.mask[i, u] = enc[j, 0], masks[j, 0]
                p["new_enc"] = (seqs, us, enc[:, 0])  # [n_new, k, r, d']
                self.encode_s += _elapsed(start, h)
        if p["new"]:
            seqs, us, enc = p["new_enc"]
            self._project(cca, seqs, us, enc)
        if cca not in self.keys:  # no chunk of any sequence encoded yet: nothing to see
            return torch.zeros_like(h)
        u = torch.div(pos - self.m + 1, self.m, rounding_mode="floor").clamp(min=0)  # [b]
        keys, values = self.keys[cca]
        visible = self.mask[rows, u].flatten(1) & (pos >= self.m - 1)[:, None]  # [b, k r]
        return cca.attn.attend(h, keys[rows, u], values[rows, u], key_mask=visible)  # [b, 1, d]; 0 if none visible

    def _project(self, cca, seqs, us, enc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of ``cca`` for encoded chunks ``enc`` [n, k, r, d'] of (seqs, us), kept
        and returned ([n, h, k r, e] each)."""
        k, v = cca.attn.keys_values(enc.flatten(1, 2))  # [n, h, k r, e] each
        if cca not in self.keys:
            L = self.enc.shape[1]
            self.keys[cca] = (k.new_zeros(self.b, L, *k.shape[1:]), v.new_zeros(self.b, L, *v.shape[1:]))
        keys, values = self.keys[cca]
        if isinstance(seqs, slice):  # prefill: every sequence, chunks us
            b = keys.shape[0]
            keys[:, us], values[:, us] = k.view(b, -1, *k.shape[1:]), v.view(b, -1, *v.shape[1:])
        else:
            keys[seqs, us], values[seqs, us] = k, v
        return k, v


def _elapsed(start: float, like: torch.Tensor) -> float:
    """Seconds since ``start``, after the device has finished its queued work."""
    if like.is_cuda:
        torch.cuda.synchronize(like.device)
    return time.perf_counter() - start


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from next-token logits [V]."""
    if params.temperature <= 0:
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


def settled(text: str, stop: list[str]) -> str:
    """The part of an unfinished output that later tokens cannot change, for streaming: without a
    trailing incomplete character and without an ending that may begin a stop string."""
    text = text.rstrip("\ufffd")
    held = max((n for s in stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
    return text[: len(text) - held]


class Generator:
    """Decodes batches of prompts with a ``Retro`` or ``RetroFit`` model.

    Args:
        model: the model (moved to ``device``; bf16 on CUDA unless ``dtype`` says otherwise).
        tokenizer: the tokenizer it was trained with (a Hugging Face fast tokenizer).
        retriever: a ``retro_ray.retrieval.Retriever`` over the database it was trained with;
            None allows only the ``off`` mode.
        use_cache: False recomputes every step from scratch (the baseline).
    """

    def __init__(self, model: Retro | RetroFit, tokenizer, retriever=None, *, device: str | None = None,
                 dtype: torch.dtype | None = None, use_cache: bool = True):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is None and self.device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.model = model.to(self.device, dtype=dtype).eval() if dtype else model.to(self.device).eval()
        self.cfg, self.tokenizer, self.retriever, self.use_cache = model.cfg, tokenizer, retriever, use_cache
        self.m, self.k = self.cfg.chunk_length, self.cfg.k
        self.eos = tokenizer.eos_token_id
        self.pad = self.eos if self.eos is not None else 0
        if len(tokenizer) > self.cfg.vocab_size:
            raise GenerationError(f"the tokenizer has {len(tokenizer)} tokens, the model's vocabulary "
                                  f"{self.cfg.vocab_size}: they come from different runs")
        self.last_timings: dict[str, float] = {}
        """Of the last ``generate``: ``retrieve_s`` (embed, search, read), ``encode_s`` (the
        retrieval encoder), ``total_s``."""
        model_tok, index_tok = self.cfg.extra.get("tokenizer"), getattr(retriever, "tokenizer_id", None)
        if model_tok and index_tok and model_tok != index_tok:
            raise GenerationError(f"the model was trained with tokenizer {model_tok}, but the index's database "
                                  f"was built with tokenizer {index_tok}: use the index of the model's own run")

    # -- the model, one pass -------------------------------------------------------------------

    def _forward(self, tokens, positions, retrieved, cache, attention_mask=None):
        """tokens, positions [b, T] -> (logits [b, T, V], cache)."""
        if isinstance(self.model, Retro):
            return self.model.decode(tokens, positions, retrieved, cache.layers() if cache else None), cache
        return self.model.decode(tokens, positions, retrieved, attention_mask, cache)

    # -- requests --------------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, prompts: list[str], params: SamplingParams | list[SamplingParams] | None = None,
                 mode: Mode = "encoder", passages: int = 0, keep_logits: bool = False,
                 queries: list[str] | None = None,
                 neighbor_passages: list[list[str]] | None = None) -> list[Generation]:
        """Continue every prompt; one batch, one prefill, then one token per sequence per step.

        ``params``: one per prompt, or one for all (prompt i then samples with ``seed + i``).
        ``passages``: retrieved passages put before each prompt (modes ``prompt``, ``both``,
        ``question``), retrieved for ``queries[i]`` (default: the prompt). Mode ``question``: the
        encoder reads ``neighbor_passages[i]`` (formatted passages) for every chunk, or when not
        given the top-k passages retrieved for the query."""
        if not isinstance(params, list):
            shared = params or SamplingParams()
            params = [replace(shared, seed=None if shared.seed is None else shared.seed + i)
                      for i in range(len(prompts))]
        if len(params) != len(prompts):
            raise GenerationError(f"{len(params)} sampling settings for {len(prompts)} prompts")
        if mode not in MODES:
            raise GenerationError(f"retrieval mode {mode!r}: expected one of {', '.join(MODES)}")
        fetch = passages if mode in ("prompt", "both", "question") else 0
        if mode == "question" and neighbor_passages is None:
            fetch = max(fetch, self.k)
        if fetch and self.retriever is None:
            raise GenerationError(f"retrieval mode {mode!r} needs an index; use mode 'off' for the decoder alone")
        shown, passage_rows = list(prompts), [[] for _ in prompts]
        if fetch:
            passage_rows = self.retriever.passages(list(queries or prompts), fetch)
            if passages:
                shown = [passages_prompt([format_passage(p["text"], p["title"]) for p in rows[:passages]], prompt)
                         for rows, prompt in zip(passage_rows, prompts)]
        fixed = None
        if mode == "question":
            neighbor_passages = neighbor_passages or [[format_passage(p["text"], p["title"]) for p in rows[: self.k]]
                                                      for rows in passage_rows]
            fixed = [self.passage_neighbors(texts) for texts in neighbor_passages]
        start = time.perf_counter()
        seqs = [self.encode_prompt(text, p) for text, p in zip(shown, params)]
        state = self.start(seqs, params, [mode in ("encoder", "both", "question")] * len(prompts), fixed)
        for _ in state.steps(keep_logits):
            pass
        self.last_timings = {"retrieve_s": state.retrieval_s, "encode_s": state.encode_s,
                             "total_s": time.perf_counter() - start}
        return [Generation(prompt=text, text=state.texts[i], tokens=state.generated[i],
                           prompt_tokens=len(state.prompts[i]), finish_reason=state.finish[i],
                           retrieved=state.retrieved[i], passages=passage_rows[i],
                           logits=state.logits[i] if keep_logits else None)
                for i, text in enumerate(shown)]

    def encode_prompt(self, text: str, params: SamplingParams) -> list[int]:
        """A prompt's token ids, checked against the context and the sampling settings."""
        if params.max_new_tokens < 1:
            raise GenerationError("max_new_tokens must be at least 1")
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise GenerationError("an empty prompt: give at least one token of text")
        if len(ids) + params.max_new_tokens > self.cfg.max_seq_len:
            raise GenerationError(
                f"a prompt of {len(ids)} tokens plus max_new_tokens={params.max_new_tokens} exceeds the "
                f"model's context of {self.cfg.max_seq_len} tokens ({text[:40]!r}...)")
        return ids

    def passage_neighbors(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Up to k passages' texts -> the encoder's neighbours of a chunk: tokens, mask [k, r]
        (each passage tokenised and cut to r; missing passages masked)."""
        r = 2 * self.m
        tokens = torch.full((self.k, r), self.pad, dtype=torch.long, device=self.device)
        mask = torch.zeros((self.k, r), dtype=torch.bool, device=self.device)
        for j, text in enumerate(texts[: self.k]):
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"][:r]
            tokens[j, : len(ids)], mask[j, : len(ids)] = torch.as_tensor(ids), True
        return tokens, mask

    def start(self, seqs: list[list[int]], params: list[SamplingParams], retrieve: list[bool],
              fixed: list[tuple[torch.Tensor, torch.Tensor] | None] | None = None) -> "Decoding":
        """The decoding of a batch of prompts (token ids from ``encode_prompt``), for the caller to
        step (``Decoding.steps``): what serving uses to stream tokens and to drop a request
        mid-way. ``retrieve[i]``: prompt i feeds neighbours to the encoder (no effect on a model
        without one): ``fixed[i]`` (``passage_neighbors``) for every chunk when given, else the
        ones retrieved for each completed chunk."""
        fixed = fixed or [None] * len(seqs)
        if self.cfg.retrieval and any(r and f is None for r, f in zip(retrieve, fixed)) and self.retriever is None:
            raise GenerationError("retrieval mode 'encoder' needs an index; use mode 'off' for the decoder alone")
        return Decoding(self, seqs, params, [bool(r and self.cfg.retrieval) for r in retrieve], fixed)


class Decoding:
    """The decoding state of one batch of requests: ``steps`` samples one token per unfinished
    sequence; ``texts``, ``generated``, ``done`` and ``finish`` say where each one stands."""

    def __init__(self, gen: Generator, seqs: list[list[int]], params: list[SamplingParams], retrieve: list[bool],
                 fixed: list[tuple[torch.Tensor, torch.Tensor] | None]):
        self.gen, self.params, self.retrieve, self.fixed = gen, params, retrieve, fixed
        self.encode = any(retrieve)
        self.prompts = [list(s) for s in seqs]
        self.seqs = [list(s) for s in seqs]
        self.b = len(seqs)
        self.slots = max(len(s) + p.max_new_tokens for s, p in zip(seqs, params))
        self.generated: list[list[int]] = [[] for _ in seqs]
        self.texts = [""] * self.b
        self.finish = ["length"] * self.b
        self.done = [False] * self.b
        self.retrieved: list[list[dict]] = [[] for _ in seqs]
        self.logits: list[list[np.ndarray]] = [[] for _ in seqs]
        self.neighbors: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}  # (seq, chunk) -> [k, r]
        self.rngs = [torch.Generator().manual_seed(p.seed if p.seed is not None else time.time_ns() + i)
                     for i, p in enumerate(params)]
        self.retrieval_s = self.encode_s = 0.0

    # -- retrieval ------------------------------------------------------------------------------

    def _retrieve(self, wanted: list[tuple[int, int]]) -> None:
        """Neighbours of chunks (seq, u), one batched query, kept for the rest of the batch (a
        sequence with fixed neighbours takes them instead)."""
        for i, u in wanted:
            if self.fixed[i] is not None:
                self.neighbors[(i, u)] = self.fixed[i]
        wanted = [(i, u) for i, u in wanted if self.fixed[i] is None]
        if not wanted:
            return
        start = time.perf_counter()
        m, tok = self.gen.m, self.gen.tokenizer
        texts = [tok.decode(self.seqs[i][u * m:(u + 1) * m]) for i, u in wanted]
        found = self.gen.retriever.retrieve(texts, self.gen.k)
        device = self.gen.device
        for j, (i, u) in enumerate(wanted):
            self.neighbors[(i, u)] = (torch.as_tensor(found.tokens[j], device=device),
                                      torch.as_tensor(found.mask[j], device=device))
            self.retrieved[i].append({"chunk": u, "text": texts[j], "neighbors": found.describe(j)})
        self.retrieval_s += time.perf_counter() - start

    def _neighbor_tensors(self, l: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[b, l, k, r] tokens and mask of every sequence's chunks 0..l-1 (mask False where absent)."""
        k, r = self.gen.k, 2 * self.gen.m
        tokens = torch.full((self.b, l, k, r), self.gen.pad, dtype=torch.long, device=self.gen.device)
        mask = torch.zeros((self.b, l, k, r), dtype=torch.bool, device=self.gen.device)
        for (i, u), (t, msk) in self.neighbors.items():
            if u < l:
                tokens[i, u], mask[i, u] = t, msk
        return tokens, mask

    # -- decoding -------------------------------------------------------------------------------

    def _padded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every sequence so far, right-padded: tokens [b, n] and attention mask [b, n]."""
        n = max(len(s) for s in self.seqs)
        tokens = torch.full((self.b, n), self.gen.pad, dtype=torch.long)
        mask = torch.zeros((self.b, n), dtype=torch.long)
        for i, s in enumerate(self.seqs):
            tokens[i, : len(s)], mask[i, : len(s)] = torch.as_tensor(s), 1
        return tokens.to(self.gen.device), mask.to(self.gen.device)

    def _last_positions(self) -> torch.Tensor:
        """[b] the position of every sequence's last token."""
        return torch.as_tensor([len(s) - 1 for s in self.seqs], device=self.gen.device)

    def _full(self) -> torch.Tensor:
        """Recompute: the whole sequences -> next-token logits [b, V]."""
        gen = self.gen
        tokens, _ = self._padded()  # right padding: no real token sees a padded one (causal)
        n = tokens.shape[1]
        neighbors, mask = self._neighbor_tensors(n // gen.m) if self.encode else (None, None)
        logits = gen.model(tokens, neighbors, mask)[0]
        return logits[torch.arange(self.b, device=gen.device), self._last_positions()]

    def cancel(self, i: int) -> None:
        """Stop sequence ``i`` (its client left): the batch no longer waits for it."""
        if not self.done[i]:
            self.done[i], self.finish[i] = True, "cancelled"

    @torch.inference_mode()
    def steps(self, keep_logits: bool = False) -> Iterator[None]:
        """Decode, one yield per sampled token (of every unfinished sequence), until all are done."""
        gen, m = self.gen, self.gen.m
        self._retrieve([(i, u) for i, s in enumerate(self.seqs) if self.retrieve[i] for u in range(len(s) // m)])
        cache, retrieved, attention = None, None, None
        if gen.use_cache:
            tokens, attention = self._padded()
            b, n = tokens.shape
            positions = torch.arange(n, device=gen.device).expand(b, n)
            if self.encode:
                retrieved = ChunkNeighbors(gen.model, b, self.slots)
                retrieved.prefill(*self._neighbor_tensors(n // m))
            if isinstance(gen.model, Retro):
                c = gen.cfg
                dtype = next(gen.model.parameters()).dtype
                cache = KVCache(c.n_layers, b, c.n_heads, self.slots, c.d_model // c.n_heads, dtype, gen.device)
                cache.positions = positions
            logits, cache = gen._forward(tokens, positions, retrieved, cache, attention)
            next_logits = logits[torch.arange(b, device=gen.device), self._last_positions()]  # [b, V]
        else:
            next_logits = self._full()
        while True:
            self._append(next_logits, keep_logits)
            yield
            if all(self.done):
                break  # the last tokens are never fed back: no retrieval or pass for them
            completed = [(i, len(s) // m - 1) for i, s in enumerate(self.seqs)
                         if len(s) % m == 0 and not self.done[i] and self.retrieve[i]]
            self._retrieve(completed)
            if not gen.use_cache:
                next_logits = self._full()
                continue
            positions = self._last_positions()  # [b]
            tokens = torch.as_tensor([s[-1] for s in self.seqs], device=gen.device)[:, None]  # [b, 1]
            if retrieved is not None:
                retrieved.step(positions, {i: (u, *self.neighbors[(i, u)]) for i, u in completed})
            if isinstance(cache, KVCache):
                cache.positions = positions[:, None]
            attention = None if attention is None else torch.cat(
                [attention, torch.ones_like(attention[:, :1])], dim=1)
            logits, cache = gen._forward(tokens, positions[:, None], retrieved, cache, attention)
            next_logits = logits[:, -1]
        if retrieved is not None:
            self.encode_s = retrieved.encode_s

    def _append(self, next_logits: torch.Tensor, keep_logits: bool) -> None:
        """Sample each unfinished sequence's next token and apply the stop rules. A finished
        sequence keeps its last token and position: the batch's passes recompute it, unused."""
        for i, params in enumerate(self.params):
            if self.done[i]:
                continue
            if keep_logits:
                self.logits[i].append(next_logits[i].float().cpu().numpy())
            token = sample(next_logits[i], params, self.rngs[i])
            self.seqs[i].append(token)
            if token == self.gen.eos and not params.ignore_eos:
                self.done[i], self.finish[i] = True, "stop"
                continue
            self.generated[i].append(token)
            text = self.gen.tokenizer.decode(self.generated[i])
            cut = min((text.find(s) for s in params.stop if s and s in text), default=-1)
            if cut >= 0:
                text, self.done[i], self.finish[i] = text[:cut], True, "stop"
            elif len(self.generated[i]) == params.max_new_tokens:
                self.done[i] = True
            self.texts[i] = text


def model_path(cfg, storage, given: str | None = None) -> str:
    """The model folder to load: ``given``, else the run's instruction-tuned Retro when it has been
    exported, else its pretrained one; it must exist."""
    from retro_ray.layout import model_dir, tuned
    from retro_ray.storage import join

    tuned_path = model_dir(tuned(cfg))
    path = given or (tuned_path if storage.exists(join(tuned_path, "config.json")) else model_dir(cfg))
    if not storage.exists(join(path, "config.json")):
        raise GenerationError(f"no exported model at {path}: run `retro-ray pretrain` first, or give --model")
    return path


def run_generator(cfg, storage, model: str | None = None, retrieval: bool = True) -> Generator:
    """A generator over a run: its exported model (``model_path``: the tuned Retro, else the
    pretrained one, or ``model``, a folder local or on S3), its tokenizer, and its saved index
    files loaded in this process (none with ``retrieval=False``)."""
    from retro_ray import tokenizer
    from retro_ray.model.io import load_model
    from retro_ray.retrieval import run_retriever

    loaded = load_model(storage, model_path(cfg, storage, model))
    retriever = run_retriever(cfg, storage) if retrieval else None
    return Generator(loaded, tokenizer.load_run_tokenizer(cfg, storage), retriever)


def describe(gen: Generation, width: int = 100) -> str:
    """A generation for the terminal: the continuation, then each chunk's neighbours."""

    def short(text: str) -> str:
        return " ".join(text.split())[:width]

    lines = [gen.prompt + gen.text, f"[{len(gen.tokens)} tokens, {gen.finish_reason}]"]
    for p in gen.passages:
        lines.append(f"passage (chunk {p['chunk_id']}, doc {p['doc_id']}): {short(p['text'])}")
    for r in gen.retrieved:
        lines.append(f"chunk {r['chunk']}: {short(r['text'])}")
        lines.extend(f"  neighbour (chunk {n['chunk_id']}, doc {n['doc_id']}): {short(n['text'])}"
                     for n in r["neighbors"])
    return "\n".join(lines)
