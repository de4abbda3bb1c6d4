"""A retro-fitted Llama's (or Qwen2's, Qwen3's or Mistral's: the same layers) packed pass without
the Hugging Face module stack.

Through ``transformers``' Llama, about a third of a one-sequence decode step of SmolLM2-135M on
2 cores is spent outside the matrix products: per layer the decorated module calls and keyword
plumbing, rotate-half twice, the attention interface's dispatch and a ``Cache`` object.
``LlamaPass`` runs the same arithmetic in the same order with the model's own norms, rotary tables
and weights (queries and keys rotated in one go) and reads and writes the engine's cache directly,
with the retro-fit's CCA after its layers: SmolLM2's decode step without retrieval 30.8 -> 28-29.6
ms on 2 cores, the same tokens. Qwen2 (biases on q, k, v), Qwen3 (each head's queries and keys
normalised before the rotation) and Mistral differ from Llama only there and in their
attention's sliding window, which the pass hands to the cache. Models of any other class keep
the Hugging Face pass (``supports``).

Notation as ``memory``: T tokens in the pass, P sampled positions, V vocabulary, d width, h heads,
h_kv key/value heads, e head width. Imports no Ray.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from retro_ray.model.retro import sampled_logits
from retro_ray.serving.memory import KVCache, PassLayout

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""A layer's matrix products the pass runs as ``F.linear`` of their weights: attention's, then the MLP's."""


class LlamaPass:
    """``fit`` (a ``RetroFit`` of a Llama, Qwen2, Qwen3 or Mistral causal LM) over a packed pass of
    the engine's cache."""

    def __init__(self, fit):
        self.fit, self.base = fit, fit.base
        self.heads = self.base.config.num_attention_heads
        self.cca = {int(name) - 1: name for name in fit.cca}  # layer index -> the CCA that follows it
        window = getattr(self.base.config, "sliding_window", None)  # Mistral's; Qwen's attention has its own
        self.windows = [getattr(layer.self_attn, "sliding_window", window) for layer in self.base.model.layers]
        self.qk_norm = hasattr(self.base.model.layers[0].self_attn, "q_norm")

    @staticmethod
    def supports(base) -> bool:
        """A plain ``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ``Qwen3ForCausalLM`` or
        ``MistralForCausalLM``: no quantized, LoRA or otherwise wrapped projection (their own
        modules know how to run them, ``F.linear`` on their weights would not)."""
        from transformers.models.llama.modeling_llama import LlamaForCausalLM
        from transformers.models.mistral.modeling_mistral import MistralForCausalLM
        from transformers.models.qwen2.modeling_qwen2 import Qwen2ForCausalLM
        from transformers.models.qwen3.modeling_qwen3 import Qwen3ForCausalLM

        if type(base) not in (LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, MistralForCausalLM):
            return False
        if getattr(base, "hf_quantizer", None) is not None:
            return False
        return all(type(getattr(part, name)) is nn.Linear for layer in base.model.layers
                   for part, names in ((layer.self_attn, PROJECTIONS[:4]), (layer.mlp, PROJECTIONS[4:]))
                   for name in names)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, retrieved, cache: KVCache,
                 layout: PassLayout, logits_at: torch.Tensor) -> torch.Tensor:
        """tokens, positions [1, T] -> logits [1, P, V] at the pass rows ``logits_at`` [P];
        ``retrieved`` (or None) feeds the CCA layers."""
        from transformers.models.llama.modeling_llama import rotate_half

        model, h_q = self.base.model, self.heads
        x = model.embed_tokens(tokens)  # [1, T, d]
        T = x.shape[1]
        cos, sin = (t[:, :, None] for t in model.rotary_emb(x, positions))  # [1, T, 1, e]
        for i, layer in enumerate(model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            y = layer.input_layernorm(x)
            q = F.linear(y, attn.q_proj.weight, attn.q_proj.bias).view(1, T, h_q, attn.head_dim)
            k = F.linear(y, attn.k_proj.weight, attn.k_proj.bias).view(1, T, -1, attn.head_dim)
            v = F.linear(y, attn.v_proj.weight, attn.v_proj.bias).view(1, T, -1, attn.head_dim)
            if self.qk_norm:  # Qwen3: each head's queries and keys, before the rotation
                q, k = attn.q_norm(q), attn.k_norm(k)
            qk = torch.cat((q, k), 2)  # [1, T, h + h_kv, e]
            qk = qk * cos + rotate_half(qk) * sin
            cache.write(i, qk[:, :, h_q:].transpose(1, 2), v.transpose(1, 2), layout)
            y = cache.attend(i, qk[:, :, :h_q].transpose(1, 2), layout, attn.scaling, self.windows[i])  # [1, T, h, e]
            x = x + F.linear(y.reshape(1, T, -1), attn.o_proj.weight, attn.o_proj.bias)
            y = layer.post_attention_layernorm(x)
            gate = mlp.act_fn(F.linear(y, mlp.gate_proj.weight, mlp.gate_proj.bias))
            x = x + F.linear(gate * F.linear(y, mlp.up_proj.weight, mlp.up_proj.bias), mlp.down_proj.weight,
                             mlp.down_proj.bias)
            if retrieved is not None and i in self.cca:
                x = self.fit.with_cca(self.cca[i], x, retrieved)
        return sampled_logits(self.base.lm_head, model.norm(x)[:, logits_at])  # [1, P, V]
