"""Fitting: the one training loop (``fit``), its epoch, the freezing schedule, selection, full-state
checkpoints, and contrastive pretraining."""
from mdcore.train.loop import Callback, FitConfig, FitResult, Runtime, fit

__all__ = ["Callback", "FitConfig", "FitResult", "Runtime", "fit"]
