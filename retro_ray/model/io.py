"""Export any retro-ray model to a Hugging Face style folder (safetensors + config.json), load it back.

    Retro:     config.json, model.safetensors
    RetroFit:  config.json, base/ (the base model's own save_pretrained), retro.safetensors (CCA,
               their norms and the encoder)

``save_decoder_only`` writes the decoder alone (no encoder, no CCA: InstructRetro's finding that
the encoder can be dropped) as a plain Hugging Face model that ``AutoModelForCausalLM`` loads
with no project code: a ``Retro`` as GPT-2, a retro-fitted base as its own architecture.

Weights are read with safetensors only: no pickle, nothing executed from the folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from retro_ray.model.retro import Retro, RetroConfig
from retro_ray.model.retrofit import RetroFit, load_causal_lm

CONFIG = "config.json"
"""The file that makes a folder an exported model (its architecture and ``RetroConfig``)."""

TIED = "lm_head.weight"  # the same tensor as wte.weight


def save_pretrained(model: Retro | RetroFit, folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "retro-ray", "retro": model.cfg.to_dict()}
    if isinstance(model, RetroFit):
        model.base.save_pretrained(folder / "base", safe_serialization=True)
        save_file({k: v.contiguous() for k, v in model.new_state_dict().items()}, folder / "retro.safetensors")
        config["architecture"] = "RetroFit"
    else:  # lm_head is tied to wte: stored once (also when DeepSpeed flattened the parameters)
        weights = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items() if k != TIED}
        save_file(weights, folder / "model.safetensors")
        config["architecture"] = "Retro"
    (folder / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder


def save_decoder_only(model: Retro | RetroFit, folder: str | Path) -> Path:
    """The decoder as a standard Hugging Face causal LM folder; its logits are the model's with
    retrieval off."""
    folder = Path(folder)
    if isinstance(model, RetroFit):
        model.base.save_pretrained(folder, safe_serialization=True)
        return folder
    from transformers import GPT2Config, GPT2LMHeadModel

    c = model.cfg
    gpt2 = GPT2LMHeadModel(GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.max_seq_len, n_embd=c.d_model, n_layer=c.n_layers, n_head=c.n_heads,
        n_inner=c.mlp_ratio * c.d_model, activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, layer_norm_epsilon=1e-5, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=None))
    state = {"transformer.wte.weight": model.wte.weight, "transformer.wpe.weight": model.wpe.weight,
             "transformer.ln_f.weight": model.ln_f.weight, "transformer.ln_f.bias": model.ln_f.bias}
    for i, block in enumerate(model.blocks):  # GPT-2's Conv1D keeps weights as [in, out]
        h = f"transformer.h.{i}."
        state.update({
            h + "ln_1.weight": block.ln1.weight, h + "ln_1.bias": block.ln1.bias,
            h + "attn.c_attn.weight": torch.cat([block.attn.q.weight, block.attn.kv.weight]).T,  # [d, 3d]: q, k, v
            h + "attn.c_attn.bias": torch.cat([block.attn.q.bias, block.attn.kv.bias]),
            h + "attn.c_proj.weight": block.attn.out.weight.T, h + "attn.c_proj.bias": block.attn.out.bias,
            h + "ln_2.weight": block.ln2.weight, h + "ln_2.bias": block.ln2.bias,
            h + "mlp.c_fc.weight": block.mlp.fc.weight.T, h + "mlp.c_fc.bias": block.mlp.fc.bias,
            h + "mlp.c_proj.weight": block.mlp.proj.weight.T, h + "mlp.c_proj.bias": block.mlp.proj.bias})
    missing, unexpected = gpt2.load_state_dict({k: v.detach().contiguous() for k, v in state.items()}, strict=False)
    if unexpected or [k for k in missing if k != TIED and not k.endswith(".attn.bias")]:
        raise ValueError(f"GPT-2 export: missing {missing[:5]}, unexpected {unexpected[:5]}")
    gpt2.save_pretrained(folder, safe_serialization=True)
    return folder


def model_config(config: dict, where: str) -> RetroConfig:
    """The ``RetroConfig`` of an exported model's ``config.json`` (read from ``where``)."""
    if config.get("model_type") != "retro-ray":
        raise ValueError(f"{where} is not a retro-ray model folder")
    return RetroConfig(**config["retro"])


def read_config(storage, uri: str) -> RetroConfig:
    """An exported model's config without its weights, local or on S3 (``storage``: a
    ``retro_ray.core.storage.Storage``)."""
    where = f"{uri.rstrip('/')}/{CONFIG}"
    return model_config(storage.read_json(where), where)


def load_pretrained(folder: str | Path, dtype: torch.dtype | None = None) -> Retro | RetroFit:
    """The model saved by ``save_pretrained`` (on the CPU; move it where you need it)."""
    folder = Path(folder)
    config = json.loads((folder / CONFIG).read_text())
    cfg = model_config(config, str(folder / CONFIG))
    if config["architecture"] == "RetroFit":
        model = RetroFit(load_causal_lm(str(folder / "base"), dtype=dtype), cfg)
        _load_into(model, [folder / "retro.safetensors"], skip="base.")
        return model
    model = Retro(cfg)
    load_weights(model, folder)
    return model.to(dtype) if dtype is not None else model


def load_model(storage, uri: str) -> Retro | RetroFit:
    """An exported model folder, local or on S3 (``storage``: a ``retro_ray.core.storage.Storage``;
    an S3 folder is downloaded to a temporary folder first)."""
    import tempfile

    if "://" in uri:
        with tempfile.TemporaryDirectory() as tmp:
            return load_pretrained(storage.download_dir(uri, tmp))
    return load_pretrained(uri)


def load_weights(model: Retro | RetroFit, folder: str | Path) -> None:
    """Reads the weights ``save_pretrained`` wrote into ``model``, built with the same config, in
    place: no second model (a resumed run at another world size starts this way)."""
    folder = Path(folder)
    if isinstance(model, RetroFit):
        _load_into(model.base, sorted((folder / "base").glob("*.safetensors")))
        _load_into(model, [folder / "retro.safetensors"], skip="base.")
    else:
        _load_into(model, [folder / "model.safetensors"])


def _load_into(module: torch.nn.Module, files: list[Path], skip: str | None = None) -> None:
    """Loads safetensors ``files`` into ``module``; every tensor must be there except tied ones
    (stored once) and names starting with ``skip``."""
    state = {}
    for file in files:
        state.update(load_file(file))
    missing, unexpected = module.load_state_dict(state, strict=False)
    current = module.state_dict()
    loaded = {current[k].data_ptr() for k in state if k in current}
    missing = [k for k in missing if not (skip and k.startswith(skip)) and current[k].data_ptr() not in loaded]
    if not files or unexpected or missing:
        names = ", ".join(str(f) for f in files) or "no .safetensors file"
        raise ValueError(f"{names} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
