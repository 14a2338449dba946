"""Recomputing batch-norm running statistics for new weights (after weight averaging the old
statistics belong to none of the averaged models)."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from mdcore.models.domain_norm import DomainBatchNorm2d


@torch.no_grad()
def recompute_bn_statistics(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> int:
    """Reset the running statistics of every batch-norm layer that trains and re-estimate them as a
    cumulative average over ``batches`` of (images, domains), in training mode without gradients. Layers the
    model keeps in eval mode while training (a frozen stage's, ``MultiDomainModel.frozen_norms``) keep their
    statistics: their weights did not move, and a reset layer in eval mode would never be re-estimated.
    Returns the batches seen."""
    was_training = model.training
    model.train()
    norms = [m for m in model.modules()
             if isinstance(m, (nn.modules.batchnorm._BatchNorm, DomainBatchNorm2d)) and m.training]
    if not norms:
        model.train(was_training)
        return 0
    saved = {m: m.momentum for m in norms}
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    seen = 0
    try:
        for images, domains in batches:
            model(images, domains)
            seen += 1
    finally:
        for m, momentum in saved.items():
            m.momentum = momentum
        model.train(was_training)
    return seen
