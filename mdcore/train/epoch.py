"""One training epoch over index batches, and the batches a method trains on."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterable, Iterator

import torch
from torch import nn

from mdcore.data.images import ImageSet, to_float
from mdcore.methods import Batch, Method

if TYPE_CHECKING:
    from mdcore.data.lazy_images import BatchLoader
    from mdcore.models.losses import ClassBalance


def shard_batches(
    n: int, global_batch: int, *, rank: int = 0, world: int = 1, epoch: int = 0, seed: int = 0
) -> Iterator[torch.Tensor]:
    """Index batches of this worker's shard: one seeded permutation per epoch shared by all workers,
    split into disjoint shards, ``global_batch // world`` images per worker and step."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=g)
    per_worker = max(1, global_batch // world)
    steps = n // (per_worker * world)
    for step in range(steps):
        start = step * per_worker * world + rank * per_worker
        yield perm[start : start + per_worker]


def train_epoch(
    model: nn.Module,
    data: ImageSet,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[torch.Tensor],
    method: Method,
    *,
    epoch: int,
    seed: int,
    rank: int = 0,
    label_smoothing: float = 0.0,
    device: torch.device | str = "cpu",
    loader: "BatchLoader | None" = None,
    on_step: Callable[[], None] | None = None,
    balance: "ClassBalance | None" = None,
) -> dict[str, float]:
    """One pass over ``batches`` (index tensors into ``data``: this worker's shard). ``method`` decides
    what the model trains on (``training_view``) and the loss (``loss``), and is told after every step.
    Images decoded on demand decode ahead in ``loader``'s worker processes (made once per run).

    The model is called as ``model(x, domains, return_outputs=True)``: what the method's loss reads
    (features, routing, projections) is computed inside forward, where DDP sees it. ``balance``: the
    class-balanced loss terms of each batch (``mdcore.models.losses.ClassBalance``), None = plain.
    """
    from mdcore.data.lazy_images import batch_images

    model.train()
    g = torch.Generator().manual_seed(seed * 7919 + epoch * 31 + rank)
    total_loss, correct, seen = 0.0, 0, 0
    term_totals: dict[str, float] = {}
    pairs = loader(batches) if loader is not None else batch_images(data.images, batches)
    for idx, raw in pairs:
        # uint8 to the device first (a quarter of float32's bytes), then augment there: on a GPU the
        # per-pixel work (jitter, noise, random convolutions, line drawings) must not run on the CPU
        x = to_float(raw.to(device, non_blocking=True))
        y, d = data.labels[idx].to(device), data.domains[idx].to(device)
        x = method.training_view(x, data.domains[idx], g)
        out = model(x, d, return_outputs=True)
        logits, outputs = out if isinstance(out, tuple) else (out, {})
        weight, offset = balance.terms(y, d) if balance is not None else (None, None)
        loss, terms = method.loss(Batch(x, y, d, epoch, label_smoothing, weight, offset), logits, outputs)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        method.after_step(model)
        if on_step is not None:
            on_step()
        for name, term in terms.items():
            term_totals[name] = term_totals.get(name, 0.0) + float(term.detach()) * len(idx)
        total_loss += float(loss.detach()) * len(idx)
        correct += int((logits.argmax(1) == y).sum())
        seen += len(idx)
    stats = {"loss": total_loss / max(seen, 1), "train_acc": correct / max(seen, 1), "images": seen}
    stats.update({f"aux/{k}": v / max(seen, 1) for k, v in term_totals.items()})
    return stats


def training_view_batches(data: ImageSet, method: Method, batch_size: int, *, seed: int, epoch: int,
                          mix="uniform", generator_seed: int = 0, rank: int = 0, world: int = 1,
                          device="cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, domains) batches of ``data`` (this worker's shard) as ``method`` trains on them: what
    batch-norm statistics are recomputed from after weight averaging."""
    from mdcore.data.sampler import domain_balanced_batches

    g = torch.Generator().manual_seed(generator_seed)
    for idx in domain_balanced_batches(data.domains, batch_size, rank=rank, world=world, epoch=epoch, seed=seed,
                                       mix=mix):
        x = method.training_view(to_float(data.images[idx].to(device)), data.domains[idx], g)
        yield x, data.domains[idx].to(device)
