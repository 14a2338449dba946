"""Recomputing batch-norm running statistics for new weights (after weight averaging the old
statistics belong to none of the averaged models)."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from mdcore.domain_norm import DomainBatchNorm2d


@torch.no_grad()
def recompute_bn_statistics(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> int:
    """Reset every batch-norm layer's running statistics and re-estimate them as a cumulative average
    over ``batches`` of (images, domains), in training mode without gradients. Returns the batches seen."""
    norms = [m for m in model.modules() if isinstance(m, (nn.modules.batchnorm._BatchNorm, DomainBatchNorm2d))]
    if not norms:
        return 0
    saved = {m: m.momentum for m in norms}
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    was_training = model.training
    model.train()
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
