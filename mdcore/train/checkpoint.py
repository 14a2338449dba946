"""Checkpoints of a fit as safetensors + JSON (never a pickle): the model, the optimizer (every state
tensor), the selected epoch's weights, the method's state (SWAD's sums, GroupDRO's weights) and the history,
so that a run resumed from epoch k ships what an uninterrupted run of the same seed ships."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

STATE = "training_state.safetensors"
META = "training_meta.json"


def save_training_state(folder: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int,
                        metrics: dict | None = None, *, method_state: dict | None = None,
                        selection: dict | None = None, history: list[dict] | None = None) -> None:
    """Write everything a resume needs into ``folder``. ``epoch``: the last epoch finished (0-based);
    ``method_state``: ``Method.state_dict()`` (tensors and JSON-able values); ``selection``:
    ``Selection.state_dict()``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"model/{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"optim/{index}/{key}"] = t.detach().cpu().contiguous()
    plain = {}
    for prefix, state in (("method", method_state or {}), ("selection", selection or {})):
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{prefix}/{key}"] = value.detach().cpu().contiguous()
            else:
                plain[f"{prefix}/{key}"] = value
    save_file(tensors, str(folder / STATE))
    meta = {"epoch": epoch, "metrics": metrics or {}, "state": plain, "history": history or []}
    (folder / META).write_text(json.dumps(meta, default=float) + "\n")


def load_training_state(folder: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """Restore model and optimizer in place. Load *after* the model is on its training device: the
    optimizer's own ``load_state_dict`` then puts each state tensor where its parameter lives (fused AdamW's
    ``step`` included). Returns ``{"epoch", "history", "method", "selection"}`` (the last two as saved)."""
    folder = Path(folder)
    tensors = load_file(str(folder / STATE))
    meta = json.loads((folder / META).read_text())
    model.load_state_dict({k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}, strict=True)
    if optimizer is not None:
        state: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("optim/"):
                _, index, name = key.split("/", 2)
                state.setdefault(int(index), {})[name] = value
        optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
    parts: dict[str, dict] = {"method": {}, "selection": {}}
    for source in (tensors, meta.get("state", {})):
        for key, value in source.items():
            prefix, _, rest = key.partition("/")
            if prefix in parts:
                parts[prefix][rest] = value
    return {"epoch": int(meta["epoch"]), "history": meta.get("history", []), **parts}
