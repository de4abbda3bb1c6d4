"""Export any retro-ray model to a Hugging Face style folder (safetensors + config.json), load it back.

    Retro:     config.json, model.safetensors
    RetroFit:  config.json, base/ (the base model's own save_pretrained), retro.safetensors (CCA,
               their norms and the encoder)

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


def load_pretrained(folder: str | Path, dtype: torch.dtype | None = None) -> Retro | RetroFit:
    """The model saved by ``save_pretrained`` (on the CPU; move it where you need it)."""
    folder = Path(folder)
    config = json.loads((folder / CONFIG).read_text())
    if config.get("model_type") != "retro-ray":
        raise ValueError(f"{folder / CONFIG} is not a retro-ray model folder")
    cfg = RetroConfig(**config["retro"])
    if config["architecture"] == "RetroFit":
        model = RetroFit(load_causal_lm(str(folder / "base"), dtype=dtype), cfg)
        missing, unexpected = model.load_state_dict(load_file(folder / "retro.safetensors"), strict=False)
        if unexpected or any(not k.startswith("base.") for k in missing):
            raise ValueError(f"{folder / 'retro.safetensors'} does not match the config: {unexpected or missing}")
        return model
    model = Retro(cfg)
    missing, unexpected = model.load_state_dict(load_file(folder / "model.safetensors"), strict=False)
    if unexpected or missing != [TIED]:
        raise ValueError(f"{folder / 'model.safetensors'} does not match the config: {unexpected or missing}")
    return model.to(dtype) if dtype is not None else model
