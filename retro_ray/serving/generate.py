"""Generation with retrieval: requests in, texts and their neighbours out, on the engine.

The reference (Megatron's Retro text generation) decodes one request at a time, recomputes the
whole sequence for every token and never retrieves after the prompt. Here every request runs on
``retro_ray.serving.engine`` (continuous batching, a KV cache, retrieval for every completed chunk under
training's causal shift), the same loop that serving drives.

- Modes: ``encoder`` (neighbours through CCA, retrieved for every completed chunk), ``off``
  (decoder only: the encoder dropped, as InstructRetro finds works as well), ``prompt``
  (retrieved passages placed before the prompt, decoder only), ``both``, and ``question``
  (InstructRetro's QA setting, the reference's ``--reuse-top``: every chunk's neighbours are the
  top-k passages retrieved for the question, ``title: .., source: ..`` tokenised and cut to r).
- ``use_cache=False`` recomputes each sequence alone every step (same retrievals), the reference
  that the tests and ``bench/generate.py`` compare the cache with.

Imports no Ray.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import torch

from retro_ray.model.retro import Retro
from retro_ray.model.retrofit import RetroFit
from retro_ray.serving.engine import Engine, EngineConfig
from retro_ray.serving.sequence import GenerationError, Request, SamplingParams
from retro_ray.training.prompts import format_passage

__all__ = ["Generator", "Generation", "GenerationError", "SamplingParams", "MODES"]

Mode = Literal["encoder", "off", "prompt", "both", "question"]
MODES = ("encoder", "off", "prompt", "both", "question")
PROMPT_MODES = ("prompt", "both", "question")
"""The modes whose retrieved passages go in the prompt."""
ENCODER_MODES = ("encoder", "both", "question")
"""The modes whose encoder reads neighbours (each chunk's own, or in ``question`` the question's)."""


def passages_to_fetch(mode: str, passages: int, k: int) -> int:
    """How many passages a request in ``mode`` retrieves for its query: ``passages`` for its
    prompt, and in mode ``question`` at least the encoder's ``k`` (0 without an encoder)."""
    fetch = passages if mode in PROMPT_MODES else 0
    return max(fetch, k) if mode == "question" else fetch


def passage_texts(rows: list[dict]) -> list[str]:
    """Retrieved passages ({title, text, ...}) as the prompt and the encoder read them."""
    return [format_passage(p["text"], p["title"]) for p in rows]


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


class Generator:
    """Decodes batches of prompts with a ``Retro`` or ``RetroFit`` model.

    Args:
        model: the model (moved to ``device``; bf16 on CUDA unless ``dtype`` says otherwise).
        tokenizer: the tokenizer it was trained with (a Hugging Face fast tokenizer).
        retriever: a ``retro_ray.retrieval.retriever.Retriever`` over the database it was trained with;
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

    # -- requests --------------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, prompts: list[str], params: SamplingParams | list[SamplingParams] | None = None,
                 mode: Mode = "encoder", passages: int = 0, keep_logits: bool = False,
                 queries: list[str] | None = None,
                 neighbor_passages: list[list[str]] | None = None) -> list[Generation]:
        """Continue every prompt, all on one engine sized for them (every prompt admitted and
        prefilled at the first step, then one token per sequence per step).

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
        fetch = passages_to_fetch(mode, passages, self.k if neighbor_passages is None else 0)
        if fetch and self.retriever is None:
            raise GenerationError(f"retrieval mode {mode!r} needs an index; use mode 'off' for the decoder alone")
        shown, passage_rows = list(prompts), [[] for _ in prompts]
        if fetch:
            passage_rows = self.retriever.passages(list(queries or prompts), fetch)
            if passages:
                shown = [passages_prompt(passage_texts(rows[:passages]), prompt)
                         for rows, prompt in zip(passage_rows, prompts)]
        fixed = None
        if mode == "question":
            neighbor_passages = neighbor_passages or [passage_texts(rows[: self.k]) for rows in passage_rows]
            fixed = [self.passage_neighbors(texts) for texts in neighbor_passages]
        start = time.perf_counter()
        retrieve = mode in ENCODER_MODES and self.cfg.retrieval
        if retrieve and fixed is None and self.retriever is None:
            raise GenerationError("retrieval mode 'encoder' needs an index; use mode 'off' for the decoder alone")
        reqs = [Request(self.encode_prompt(text, p), p, retrieve, None if fixed is None else fixed[i],
                        keep_logits=keep_logits) for i, (text, p) in enumerate(zip(shown, params))]
        engine = Engine(self.model, self.tokenizer, self.retriever, device=self.device, config=EngineConfig(
            kv_tokens=sum(len(r.ids) + r.params.max_new_tokens for r in reqs), max_seqs=len(reqs),
            prefill_tokens=sum(len(r.ids) for r in reqs), use_cache=self.use_cache))
        try:
            seqs = engine.run(reqs)
        finally:
            engine.close()
        failed = next((s.error for s in seqs if s.error is not None), None)
        if failed:
            raise GenerationError(failed)
        neighbours = engine.runner.neighbours
        self.last_timings = {"retrieve_s": engine.stats.retrieval_s,
                             "encode_s": neighbours.encode_s if neighbours else 0.0,
                             "total_s": time.perf_counter() - start}
        return [Generation(prompt=text, text=s.text, tokens=s.generated, prompt_tokens=s.prompt_len,
                           finish_reason=s.finish, retrieved=s.retrieved, passages=passage_rows[i],
                           logits=s.logits if keep_logits else None)
                for i, (text, s) in enumerate(zip(shown, seqs))]

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


def run_generator(cfg, storage, model: str | None = None, retrieval: bool = True) -> Generator:
    """A generator over a run: its exported model (``layout.served_model``: the tuned Retro, else
    the pretrained one, or ``model``, a folder local or on S3), its tokenizer, and its saved index
    files loaded in this process (none with ``retrieval=False``)."""
    from retro_ray.core.layout import served_model
    from retro_ray.database import tokenizer
    from retro_ray.model.io import load_model
    from retro_ray.retrieval.retriever import run_retriever

    loaded = load_model(storage, served_model(cfg, storage, model))
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
