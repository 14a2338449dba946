"""Forgetting and transfer across a sequence of tasks, as defined in GEM (Lopez-Paz & Ranzato, 2017).

``R[i, j]`` is the test accuracy on task (domain) ``j`` after training on tasks ``0..i``; ``b[j]`` is the
accuracy on task ``j`` of the model before any training (GEM's random-init baseline).
"""
from __future__ import annotations

import numpy as np


def gem_metrics(R, b=None) -> dict[str, float | None]:
    """ACC: mean final accuracy. BWT: mean change of each earlier task from just after it was learned to
    the end (negative = forgetting). FWT: mean accuracy on each task *before* it was learned, above ``b``
    (zero-shot transfer from the earlier tasks); None without ``b``."""
    R = np.asarray(R, dtype=np.float64)
    if R.ndim != 2 or R.shape[0] != R.shape[1] or R.shape[0] < 1:
        raise ValueError(f"R must be a square T x T accuracy matrix, got shape {R.shape}")
    T = R.shape[0]
    acc = float(R[-1].mean())
    bwt = float(np.mean([R[-1, j] - R[j, j] for j in range(T - 1)])) if T > 1 else 0.0
    fwt = None
    if b is not None:
        b = np.asarray(b, dtype=np.float64)
        if b.shape != (T,):
            raise ValueError(f"b must hold one baseline accuracy per task ({T}), got shape {b.shape}")
        fwt = float(np.mean([R[j - 1, j] - b[j] for j in range(1, T)])) if T > 1 else 0.0
    return {"ACC": acc, "BWT": bwt, "FWT": fwt}
