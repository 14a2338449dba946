"""Model compression: global magnitude pruning and int8 weight quantization, saved as safetensors.

A compressed variant is a folder with ``model.safetensors`` (int8 weights + per-channel scales),
the model's ``config.json`` and a ``recipe.json`` it can be rebuilt from. No pickled modules.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils import prune

from mdcore.io import atomic_dir
from mdcore.model import CONFIG, WEIGHTS, MultiDomainModel, ModelConfig, load_config

RECIPE = "recipe.json"
_Q, _S = ".__int8", ".__scale"


def prunable(model: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(m, "weight") for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def prune_global(model: nn.Module, amount: float) -> float:
    """Zero the ``amount`` fraction of smallest-magnitude conv/linear weights (across all layers); returns sparsity."""
    params = prunable(model)
    if amount > 0:
        prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=amount)
        for module, name in params:
            prune.remove(module, name)
    total = sum(getattr(m, n).numel() for m, n in params)
    zeros = sum(int((getattr(m, n) == 0).sum()) for m, n in params)
    return zeros / max(total, 1)


def quantize_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Symmetric per-output-channel int8 for every weight matrix/kernel; everything else stays float32."""
    out = {}
    for name, t in state.items():
        t = t.detach().cpu()
        # weights only: buffers such as per-domain batch-norm statistics or prototypes stay float32
        if t.is_floating_point() and t.ndim >= 2 and name.endswith("weight"):
            flat = t.reshape(t.shape[0], -1)
            scale = flat.abs().amax(dim=1).clamp(min=1e-12) / 127.0
            q = torch.round(flat / scale[:, None]).clamp(-127, 127).to(torch.int8).reshape(t.shape)
            out[name + _Q] = q.contiguous()
            out[name + _S] = scale.float().contiguous()
        else:
            out[name] = t.contiguous()
    return out


def dequantize_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = {}
    for name, t in tensors.items():
        if name.endswith(_Q):
            base = name[: -len(_Q)]
            scale = tensors[base + _S]
            state[base] = (t.float().reshape(t.shape[0], -1) * scale[:, None]).reshape(t.shape)
        elif not name.endswith(_S):
            state[name] = t
    return state


def save_compressed(model: MultiDomainModel, folder: str | Path, recipe: dict, quantize: bool) -> None:
    state = {k: v for k, v in model.state_dict().items()}
    tensors = quantize_state(state) if quantize else {k: v.detach().cpu().contiguous() for k, v in state.items()}
    with atomic_dir(folder) as tmp:
        save_file(tensors, str(tmp / WEIGHTS))
        from dataclasses import asdict

        (tmp / CONFIG).write_text(json.dumps(asdict(model.config) | {"extra": {}}, indent=2) + "\n")
        (tmp / RECIPE).write_text(json.dumps(recipe, indent=2, sort_keys=True) + "\n")


def load_compressed(folder: str | Path) -> MultiDomainModel:
    folder = Path(folder)
    config, _ = load_config(folder)
    model = MultiDomainModel(config)
    model.load_state_dict(dequantize_state(load_file(str(folder / WEIGHTS))), strict=True)
    return model.eval()
