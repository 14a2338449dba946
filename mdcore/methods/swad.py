"""SWAD (Cha et al., 2021, "SWAD: Domain Generalization by Seeking Flat Minima"): average the weights
of every training step within the low-loss part of training, which lands in a flatter minimum; the
window is chosen on training-domain validation loss, and batch-norm statistics are recomputed for the
averaged weights.

Every step's weights are added to a running sum for its epoch; at the end the window is the span of
epochs whose validation loss is within ``swad_tolerance`` x the best, and the averaged weights are
the sum over that window divided by its steps (dense averaging, chosen after the fact).
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from mdcore.models.bn_stats import recompute_bn_statistics
from mdcore.methods.base import ERM, register_method


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / FastForward / torch.compile wrappers (their state-dict keys differ)."""
    for _ in range(8):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner
    return model


def _averaged_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    model = _unwrap(model)
    return {k: v for k, v in model.state_dict().items() if v.is_floating_point() and "running_" not in k}


@register_method
class SWAD(ERM):
    """Dense weight averaging over the low validation-loss window, then batch-norm recomputation."""

    name = "swad"

    @dataclasses.dataclass
    class Hparams:
        swad_tolerance: float = 1.2  # epochs with val loss <= this x the best one form the window
        swad_min_epoch: int = 1  # never average the first epochs (warm-up, far from any minimum)

    def __init__(self, hparams: dict | None = None):
        super().__init__(hparams)
        self._sums: dict[int, dict[str, torch.Tensor]] = {}
        self._steps: dict[int, int] = {}
        self._val_loss: dict[int, float] = {}
        self._epoch = 0

    def after_step(self, model: nn.Module) -> None:
        super().after_step(model)
        if self._epoch < self.hparams["swad_min_epoch"]:
            return
        with torch.no_grad():
            current = _averaged_tensors(model)
            sums = self._sums.get(self._epoch)
            if sums is None:
                self._sums[self._epoch] = {k: v.detach().float().clone() for k, v in current.items()}
            else:
                for k, v in current.items():
                    sums[k].add_(v.detach().float())
        self._steps[self._epoch] = self._steps.get(self._epoch, 0) + 1

    def end_epoch(self, model: nn.Module, epoch: int, val: dict[str, float]) -> None:
        super().end_epoch(model, epoch, val)
        if "loss" in val:
            self._val_loss[epoch] = float(val["loss"])
        self._epoch = epoch + 1

    def window(self) -> list[int]:
        scored = {e: loss for e, loss in self._val_loss.items() if e in self._sums}
        if not scored:
            return sorted(self._sums)[-1:]
        best = min(scored.values())
        good = [e for e, loss in scored.items() if loss <= best * self.hparams["swad_tolerance"]]
        return list(range(min(good), max(good) + 1))

    def selects_checkpoint(self) -> bool:
        return False

    def finalize(self, model, batches) -> dict:
        done = super().finalize(model, batches)
        window = [e for e in self.window() if e in self._sums]
        if not window:
            return done
        steps = sum(self._steps[e] for e in window)
        total = {k: sum(self._sums[e][k] for e in window) for k in self._sums[window[0]]}
        state = _unwrap(model).state_dict()
        with torch.no_grad():
            for k, v in total.items():
                state[k].copy_((v / steps).to(state[k].dtype))
        recompute_bn_statistics(model, batches())
        self._sums.clear()
        return done | {"swad_window_epochs": [e + 1 for e in window], "swad_averaged_steps": steps}

    def state_dict(self) -> dict:
        state = super().state_dict()
        state.update({f"swad/sum/{e}/{k}": v for e, sums in self._sums.items() for k, v in sums.items()})
        state["swad/steps"] = {str(e): n for e, n in self._steps.items()}
        state["swad/val_loss"] = {str(e): v for e, v in self._val_loss.items()}
        state["swad/epoch"] = self._epoch
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._sums = {}
        for key, value in state.items():
            if key.startswith("swad/sum/"):
                epoch, name = key[len("swad/sum/"):].split("/", 1)
                self._sums.setdefault(int(epoch), {})[name] = value.clone()
        self._steps = {int(e): int(n) for e, n in state.get("swad/steps", {}).items()}
        self._val_loss = {int(e): float(v) for e, v in state.get("swad/val_loss", {}).items()}
        self._epoch = int(state.get("swad/epoch", 0))
