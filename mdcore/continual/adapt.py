"""Adapting a model to a new domain from little data: k labelled images per class (few-shot: only the
domain's own parts learn), or none at all (test-time normalization: the domain's batch-norm statistics
are recomputed from its unlabelled images; Li et al., 2017, AdaBN)."""
from __future__ import annotations

import torch

from mdcore.models.domain_norm import DomainBatchNorm2d
from mdcore.models.model import MultiDomainModel


def few_shot_mask(labels: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """Boolean mask picking ``k`` images per class at random (all of a class that has fewer)."""
    if k < 1:
        raise ValueError(f"few-shot k must be >= 1, got {k}")
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(len(labels), dtype=torch.bool)
    for c in torch.unique(labels):
        idx = torch.nonzero(labels == c).flatten()
        mask[idx[torch.randperm(len(idx), generator=g)[:k]]] = True
    return mask


@torch.no_grad()
def recompute_domain_norm(model: MultiDomainModel, images: torch.Tensor, domain: int, batch_size: int = 64) -> int:
    """Replace domain ``domain``'s running batch-norm statistics by those of ``images`` (float, unlabelled);
    no weight changes and no other domain's statistics are touched. Returns the batches used."""
    norms = [m for m in model.modules() if isinstance(m, DomainBatchNorm2d)]
    if not norms:
        raise ValueError(f"test-time normalization needs domain batch-norm (domain_bn=true); backbone "
                         f"{model.config.backbone!r} in this model has none")
    saved = [(m, m.momentum) for m in norms]
    for m in norms:
        m.momentum = None  # cumulative average over the batches below
        m.running_mean[domain] = 0.0
        m.running_var[domain] = 1.0
        m._seen = torch.zeros(m.n_domains)
    was = model.training
    model.train()
    batches = 0
    try:
        for s in range(0, len(images), batch_size):
            x = images[s : s + batch_size]
            model(x, torch.full((len(x),), domain, dtype=torch.long))
            batches += 1
    finally:
        for m, momentum in saved:
            m.momentum = momentum
        model.train(was)
    return batches
