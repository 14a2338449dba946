"""The one training loop. The finetune stage's Ray workers, the leave-one-domain-out and continual
experiments, the ablation, the warm start and compress's distillation all call :func:`fit`.

``fit`` owns the epoch loop: the learning-rate schedule, the freezing schedule (layer-wise freezing and
gradual unfreezing), the epoch, validation on the training domains, selection (the best validation epoch,
or the method's own, as SWAD's average), early stopping, and a checkpoint of *all* state after every epoch
(model, optimizer, selection, the method's state), so a resumed run equals an uninterrupted one. Where it
runs (device, rank, world, DDP wrapping, reduction over workers) is a :class:`Runtime`; what happens
around it (reporting to Ray, progress, experiment bookkeeping) are :class:`Callback` objects.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from mdcore.data.images import ImageSet
from mdcore.data.sampler import domain_balanced_batches
from mdcore.eval.scoring import evaluate_split
from mdcore.methods import Method
from mdcore.models.losses import ClassBalance
from mdcore.train.checkpoint import load_training_state, save_training_state
from mdcore.train.early_stopping import EarlyStopping
from mdcore.train.epoch import train_epoch, training_view_batches
from mdcore.train.freezing import apply_freezing, backbone_groups, frozen_group_count
from mdcore.train.selection import Selection


@dataclasses.dataclass
class FitConfig:
    """How to fit. ``domain_mix``: each global batch's share per domain index (``uniform``, ``natural`` or
    ``{index: weight}``); ``select``: ship the best training-domain-validation epoch (for methods that do
    not choose their own weights); ``refit_prototypes``: at the end, refit unknown-domain routing on the
    training images (off when a caller refits only some domains)."""

    epochs: int
    batch_size: int
    seed: int = 0
    label_smoothing: float = 0.0
    domain_mix: str | dict[int, float] = "uniform"
    select: bool = True
    patience: int = 0
    min_delta: float = 0.0
    freeze_stages: int = 0
    adapters_only: bool = False
    gradual_unfreeze_every: int = 0
    refit_prototypes: bool = True
    class_balance: str = "none"  # none, reweight or logit_adjust (mdcore.models.losses.ClassBalance)

    @property
    def freezes(self) -> bool:
        return self.adapters_only or self.freeze_stages > 0 or self.gradual_unfreeze_every > 0


class Runtime:
    """Where the loop runs: one process on ``device`` (rank 0 of 1). The Ray worker's subclass adds DDP
    wrapping and the reductions over workers."""

    rank, world = 0, 1

    def __init__(self, device: torch.device | str = "cpu", wrap: Callable[[nn.Module], nn.Module] | None = None):
        self.device = torch.device(device)
        self._wrap = wrap

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module the training steps call (DDP, mixed precision, torch.compile around ``model``)."""
        return model if self._wrap is None else self._wrap(model)

    def sum(self, values: list[float]) -> list[float]:
        return list(values)

    def average_buffers(self, model: nn.Module) -> None:
        pass

    def weights_max_diff(self, model: nn.Module) -> float:
        return 0.0


class Callback:
    """Hooks around the loop (every method optional)."""

    def on_epoch_start(self, epoch: int) -> None:
        pass

    def on_validated(self, epoch: int, metrics: dict) -> None:
        """After validation, before selection and shipping: add to ``metrics`` (the model as trained)."""

    def on_epoch_end(self, epoch: int, metrics: dict, save: Callable[[str | Path], None]) -> None:
        """``metrics`` of the finished epoch; ``save(folder)`` writes a checkpoint of the whole state."""


@dataclasses.dataclass
class FitResult:
    history: list[dict]
    shipped: dict
    train_s: float
    images_seen: int


def fit(model: nn.Module, method: Method, train: ImageSet, val: ImageSet | None, config: FitConfig,
        optimizer: torch.optim.Optimizer, scheduler, *, runtime: Runtime | None = None,
        batches: Callable[[int], Iterable[torch.Tensor]] | None = None, loader=None,
        callbacks: Iterable[Callback] = (), resume_from: str | Path | None = None) -> FitResult:
    """Train ``model`` (a ``MultiDomainModel``, not wrapped) in place with ``method`` and return what was
    done. ``optimizer`` and ``scheduler`` (timm, stepped per epoch) are built by the caller over ``model``'s
    parameters; ``method`` must be attached to ``model`` already (``method.attach``).

    ``batches(epoch)``: this worker's index batches into ``train`` (default: domain-balanced over
    ``config.domain_mix``). ``val``: the training domains' validation images (None: no selection, the last
    epoch ships). ``resume_from``: a checkpoint folder written through a callback's ``save``: training
    continues after its epoch with every piece of state restored. ``loader``: a
    ``mdcore.data.lazy_images.BatchLoader`` over ``train.images`` (images decoded on demand).
    """
    runtime = runtime or Runtime()
    callbacks = list(callbacks)
    device = runtime.device
    t0 = time.perf_counter()
    model.to(device)
    method.bind(train.domains, len(train.domain_names))
    balance = (ClassBalance(config.class_balance, train.labels, train.domains, len(train.domain_names),
                            len(train.class_names)) if config.class_balance != "none" else None)
    best, history, start = Selection(), [], 0
    if resume_from is not None:  # after the model is on its device: the optimizer state follows it there
        restored = load_training_state(resume_from, model, optimizer)
        start, history = restored["epoch"] + 1, restored["history"]
        method.load_state_dict(restored["method"])
        best.load_state_dict(restored["selection"])
    stopper = EarlyStopping(config.patience, config.min_delta, mode="max")
    for row in history:  # the epochs already done decide early stopping as they did
        if row["val_acc"] == row["val_acc"]:  # not NaN (no validation rows)
            stopper.step(row["val_acc"], row["epoch"] - 1)
    step_model = runtime.wrap(model)
    if batches is None:
        def batches(epoch):
            return domain_balanced_batches(train.domains, config.batch_size, rank=runtime.rank, world=runtime.world,
                                           epoch=epoch, seed=config.seed, mix=config.domain_mix)
    val_names = [] if val is None else [train.domain_names[d] for d in val.domains]
    images_seen, shipped = 0, {}
    for epoch in range(start, config.epochs):
        for cb in callbacks:
            cb.on_epoch_start(epoch)
        t_epoch = time.perf_counter()
        scheduler.step(epoch)
        frozen = _freeze(model, config, epoch)
        stats = train_epoch(step_model, train, optimizer, batches(epoch), method, epoch=epoch, seed=config.seed,
                            rank=runtime.rank, label_smoothing=config.label_smoothing, device=device, loader=loader,
                            balance=balance)
        loss_sum, acc_sum, seen = runtime.sum([stats["loss"] * stats["images"], stats["train_acc"] * stats["images"],
                                               stats["images"]])
        images_seen += int(seen)
        elapsed = time.perf_counter() - t_epoch
        runtime.average_buffers(model)  # per-domain normalization statistics: one value on every worker
        v = (evaluate_split(model, val, val_names, 256, device=device) if val is not None and len(val)
             else {"acc": float("nan"), "loss": float("nan"), "per_domain": {}})
        method.end_epoch(model, epoch, v)
        metrics = {
            "epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1), "train_acc": acc_sum / max(seen, 1),
            "val_acc": v["acc"], "val_loss": v["loss"], "lr": optimizer.param_groups[-1]["lr"],
            "images": int(seen), "images_per_s": seen / max(elapsed, 1e-9),
            **{f"val_domain_acc/{d}": a for d, a in v["per_domain"].items()},
            **{k: val_ for k, val_ in stats.items() if k.startswith("aux/")},
            **{f"frozen/{k}": n for k, n in frozen.items() if isinstance(n, (int, float))},
        }
        for cb in callbacks:
            cb.on_validated(epoch, metrics)
        has_val = bool(v["per_domain"])
        if config.select:
            best.step(model, epoch, v["acc"] if has_val else epoch - 1e6)  # no val rows: the last epoch
        stop = has_val and stopper.step(v["acc"], epoch)  # the same decision on every rank
        last = epoch == config.epochs - 1 or stop
        if last:
            shipped = _ship(model, method, train, config, best, runtime)
        metrics.update({"early_stopped": stop, **{f"shipped/{k}": s for k, s in shipped.items()}})
        if last:
            metrics["weights_max_diff_across_workers"] = runtime.weights_max_diff(model)
        history.append(metrics)

        def save(folder, epoch=epoch, metrics=metrics):
            save_training_state(folder, model, optimizer, epoch, metrics, method_state=method.state_dict(),
                                selection=best.state_dict(), history=history)

        for cb in callbacks:
            cb.on_epoch_end(epoch, metrics, save)
        if stop:
            break
    return FitResult(history, shipped, time.perf_counter() - t0, images_seen)


def _freeze(model: nn.Module, config: FitConfig, epoch: int) -> dict:
    """The freezing schedule at ``epoch`` (applied after wrapping, so DDP registered every parameter)."""
    if not config.freezes:
        return {}
    n_groups = len(backbone_groups(model.backbone))
    n_frozen = frozen_group_count(epoch, n_groups, config.freeze_stages, config.adapters_only,
                                  config.gradual_unfreeze_every)
    return apply_freezing(model, n_frozen)


def _ship(model, method: Method, train: ImageSet, config: FitConfig, best: Selection, runtime: Runtime) -> dict:
    """Turn ``model`` into what ships: the best validation epoch, or the method's own choice (SWAD's
    average, batch-norm statistics recomputed on the training images as the method sees them)."""
    if method.selects_checkpoint():
        if config.select and best.state is not None:
            best.restore(model)
            shipped = {"selected_epoch": best.epoch + 1}
        else:
            shipped = {"selected_epoch": "last"}
    else:
        shipped = method.finalize(model, lambda: training_view_batches(
            train, method, config.batch_size, seed=config.seed, epoch=config.epochs, mix=config.domain_mix,
            generator_seed=config.seed + 1, rank=runtime.rank, world=runtime.world, device=runtime.device))
        shipped["selected_epoch"] = "average"
        runtime.average_buffers(model)  # statistics recomputed on each worker's shard: one value everywhere
    if config.refit_prototypes:
        model.fit_prototypes(train.images, train.domains)
    return shipped
