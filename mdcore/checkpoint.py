"""Training checkpoints as safetensors (model + optimizer state + epoch): resumable, and never a pickle."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

STATE = "training_state.safetensors"
META = "training_meta.json"


def save_training_state(folder: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int,
                        metrics: dict | None = None) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"model/{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"optim/{index}/{key}"] = t.detach().cpu().contiguous()
    save_file(tensors, str(folder / STATE))
    (folder / META).write_text(json.dumps({"epoch": epoch, "metrics": metrics or {}}, default=float) + "\n")


def load_training_state(folder: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> int:
    """Restore model (and optimizer) in place; returns the epoch the checkpoint finished."""
    folder = Path(folder)
    tensors = load_file(str(folder / STATE))
    model.load_state_dict({k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}, strict=True)
    if optimizer is not None:
        state: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("optim/"):
                _, index, name = key.split("/", 2)
                state.setdefault(int(index), {})[name] = value
        optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
    return int(json.loads((folder / META).read_text())["epoch"])
