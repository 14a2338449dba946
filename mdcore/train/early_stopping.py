"""Early stopping on a validation score."""
from __future__ import annotations

import math


class EarlyStopping:
    """Stop when the monitored value (e.g. training-domain validation accuracy) has not improved by more
    than ``min_delta`` for ``patience`` epochs. ``patience`` 0 = never stop. ``mode``: "max" or "min"."""

    def __init__(self, patience: int = 0, min_delta: float = 0.0, mode: str = "max"):
        if mode not in ("max", "min"):
            raise ValueError(f"early stopping mode {mode!r}: expected 'max' or 'min'")
        self.patience, self.min_delta, self.sign = patience, min_delta, 1.0 if mode == "max" else -1.0
        self.best, self.best_epoch, self.bad_epochs = -math.inf, -1, 0

    def step(self, value: float, epoch: int) -> bool:
        """Record this epoch's value; True when training should stop now."""
        score = self.sign * value
        if score > self.best + self.min_delta:
            self.best, self.best_epoch, self.bad_epochs = score, epoch, 0
        else:
            self.bad_epochs += 1
        return self.patience > 0 and self.bad_epochs >= self.patience

    @property
    def best_value(self) -> float:
        return self.sign * self.best
