"""Retro-fit a pretrained Hugging Face causal LM: keep its weights, add CCA and a new encoder.

InstructRetro's recipe: take a pretrained GPT, insert chunked cross-attention at the retrieval
layers and a fresh retrieval encoder, and continue pretraining with retrieval. The new parts
start with a zero output projection, so before training the retro-fitted model's logits equal
the base model's: continued pretraining starts from the GPT, not from a damaged copy.

CCA is added to the residual stream right after each chosen decoder layer (a forward hook), so
any Llama-, Mistral-, Qwen-, GPT-2- or GPT-NeoX-style model works unchanged, loaded from a local
folder, a hub name already in the local cache, or a GGUF file (dequantized on load).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from retro_ray.model.retro import ChunkedCrossAttention, RetroConfig, RetroEncoder, lm_loss, make_retriever


def load_causal_lm(path: str, dtype: torch.dtype | None = None):
    """A ``transformers`` causal LM from a folder, a cached hub name, or a ``.gguf`` file."""
    from transformers import AutoModelForCausalLM

    if path.endswith(".gguf"):
        file = Path(path)
        model = AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name, dtype=dtype)
        # The weights are dequantized on load: plain tensors, so the model saves and reloads as
        # any other once the GGUF marker is gone (transformers refuses to save it otherwise).
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        return model
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder layers of a Hugging Face causal LM."""
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        node = model
        for name in path.split("."):
            node = getattr(node, name, None)
        if isinstance(node, nn.ModuleList):
            return node
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")


def retrofit_config(base, **overrides) -> RetroConfig:
    """A ``RetroConfig`` matching ``base``'s width, depth, heads, vocabulary and context."""
    c = base.config
    values = dict(
        vocab_size=c.vocab_size, d_model=c.hidden_size, n_layers=c.num_hidden_layers,
        n_heads=c.num_attention_heads,
        max_seq_len=getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", 2048),
        extra={"base_model_type": c.model_type},
    )
    values.update(overrides)
    return RetroConfig(**values)


class RetroFit(nn.Module):
    """A Hugging Face causal LM with CCA after the configured layers and a retrieval encoder;
    ``forward`` takes the same arguments as ``Retro`` and returns ``(logits, loss)``."""

    def __init__(self, base: nn.Module, cfg: RetroConfig):
        super().__init__()
        self.base, self.cfg = base, cfg
        layers = decoder_layers(base)
        self.cca = nn.ModuleDict({str(i): ChunkedCrossAttention(cfg) for i in cfg.resolved_cca_layers()})
        self.ln_cca = nn.ModuleDict({str(i): nn.LayerNorm(cfg.d_model) for i in cfg.resolved_cca_layers()})
        self.encoder = RetroEncoder(cfg) if cfg.retrieval else None
        dtype = next(base.parameters()).dtype
        for part in (self.cca, self.ln_cca, self.encoder):
            if part is not None:
                part.to(dtype)
        self._retrieved = None
        for i in cfg.resolved_cca_layers():
            layers[i - 1].register_forward_hook(self._after_layer(str(i)))

    def _after_layer(self, name: str):
        def hook(module, args, output):
            if self._retrieved is None:
                return output
            hidden = output[0] if isinstance(output, tuple) else output  # [b, n, d]
            hidden = self.with_cca(name, hidden, self._retrieved)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
        return hook

    def with_cca(self, name: str, hidden: torch.Tensor, retrieved) -> torch.Tensor:
        """hidden [b, n, d] after decoder layer ``name`` (from 1) -> plus that layer's CCA output."""
        return hidden + retrieved(self.cca[name], self.ln_cca[name](hidden))

    def forward(self, tokens: torch.Tensor, neighbors: torch.Tensor | None = None,
                neighbor_mask: torch.Tensor | None = None, targets: torch.Tensor | None = None,
                loss_mask: torch.Tensor | None = None, positions: torch.Tensor | None = None):
        """Shapes as ``Retro.forward``: tokens [b, n], neighbors [b, L, k, r] -> logits [b, n, V].
        Packed examples (``positions`` restarting at 0) are kept apart by the base model's own
        packed-sequence masking."""
        embed = self.base.get_input_embeddings()
        retrieved = make_retriever(self.encoder, embed, self.cfg.chunk_length, neighbors, neighbor_mask,
                                   tokens.shape[1])
        logits = self.decode(tokens, positions, retrieved)  # [b, n, V]
        return logits, lm_loss(logits, targets, loss_mask)

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor | None, retrieved=None, past_key_values=None,
               logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """The base model on tokens [b, T] at positions [b, T], ``retrieved`` feeding the CCA hooks,
        with a cache (``past_key_values``: the engine's) -> logits [b, T, V], or [b, P, V] at the
        positions ``logits_at`` [P] only."""
        self._retrieved = retrieved
        try:
            return self.base(input_ids=tokens, position_ids=positions, past_key_values=past_key_values,
                             use_cache=False, logits_to_keep=0 if logits_at is None else logits_at).logits
        finally:
            self._retrieved = None

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def retrieval_parameters(self) -> set[str]:
        """Names of the parameters the retro-fit added (CCA, their norms, the encoder)."""
        return {n for n, _ in self.named_parameters() if not n.startswith("base.")}

    def new_state_dict(self) -> dict[str, torch.Tensor]:
        """The retro-fitted parts only (CCA, their norms, the encoder)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("base.")}
