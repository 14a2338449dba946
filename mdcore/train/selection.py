"""Which epoch's weights ship: the best on training-domain validation (held-out and test numbers never
enter), kept in memory and in every checkpoint so a resumed run selects as an uninterrupted one."""
from __future__ import annotations

import math

from torch import nn


class Selection:
    """Keeps the weights of the epoch with the best validation score, to restore at the end."""

    def __init__(self):
        self.value, self.epoch, self.state = -math.inf, -1, None

    def step(self, model: nn.Module, epoch: int, value: float) -> None:
        if value > self.value:
            self.value, self.epoch = value, epoch
            self.state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

    def restore(self, model: nn.Module) -> None:
        if self.state is not None:
            model.load_state_dict(self.state)

    def state_dict(self) -> dict:
        out: dict = {"epoch": self.epoch, "value": self.value}
        out.update({f"weights/{k}": v for k, v in (self.state or {}).items()})
        return out

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.value = int(state.get("epoch", -1)), float(state.get("value", -math.inf))
        weights = {k[len("weights/"):]: v for k, v in state.items() if k.startswith("weights/")}
        self.state = weights or None
