"""Replay buffers: a small share of past training data is mixed into every batch of new data, so the
shared weights keep serving the earlier domains (experience replay; Chaudhry et al., 2019, "On Tiny
Episodic Memories in Continual Learning").

Three ways to choose what is kept: ``random`` (uniform over all past images), ``reservoir`` (per-domain
reservoir sampling, an equal share per domain, so a scarce domain is not crowded out), ``hardest`` (per
domain, the images with the highest loss under the current model: the ones most at risk).
"""
from __future__ import annotations

from typing import Iterator

import torch

REPLAY_STRATEGIES = ("random", "reservoir", "hardest")


def replay_budget(n_past: int, fraction: float, max_images: int | None = None) -> int:
    """How many past images the buffer keeps: ``fraction`` of them, capped at ``max_images``."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"replay fraction must be within [0, 1], got {fraction}")
    n = int(round(n_past * fraction))
    return min(n, max_images) if max_images is not None else n


def _shares(domains: torch.Tensor, budget: int) -> dict[int, int]:
    """An equal share of ``budget`` per domain; a domain with fewer images gives its rest to the others."""
    sizes = {int(d): int((domains == d).sum()) for d in torch.unique(domains)}
    shares = {d: 0 for d in sizes}
    left = min(budget, sum(sizes.values()))
    while left > 0:
        open_ = [d for d in sorted(sizes) if shares[d] < sizes[d]]
        each = max(1, left // len(open_))
        for d in open_:
            take = min(each, sizes[d] - shares[d], left)
            shares[d] += take
            left -= take
            if left == 0:
                break
    return shares


def _reservoir(stream: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    """Algorithm R (Vitter, 1985) over ``stream``: a uniform sample of k items in one pass, as the data
    arrives, without knowing its length in advance."""
    keep = stream[:k].clone()
    for i in range(k, len(stream)):
        j = int(torch.randint(0, i + 1, (1,), generator=g))
        if j < k:
            keep[j] = stream[i]
    return keep


def select_replay(domains: torch.Tensor, budget: int, strategy: str = "reservoir", seed: int = 0,
                  losses: torch.Tensor | None = None) -> torch.Tensor:
    """Indices (sorted) of the past images the buffer keeps. ``domains``: each past image's domain index;
    ``losses``: each past image's loss under the current model (``hardest`` only)."""
    if strategy not in REPLAY_STRATEGIES:
        raise ValueError(f"unknown replay strategy {strategy!r}; known: {list(REPLAY_STRATEGIES)}")
    n = len(domains)
    if budget <= 0 or n == 0:
        return torch.empty(0, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    if strategy == "random":
        return torch.sort(torch.randperm(n, generator=g)[: min(budget, n)]).values
    if strategy == "hardest" and (losses is None or len(losses) != n):
        raise ValueError("replay strategy 'hardest' needs one loss per past image")
    picked = []
    for d, k in _shares(domains, budget).items():
        idx = torch.nonzero(domains == d).flatten()
        if strategy == "reservoir":
            picked.append(_reservoir(idx[torch.randperm(len(idx), generator=g)], k, g))
        else:
            picked.append(idx[torch.argsort(losses[idx], descending=True)[:k]])
    return torch.sort(torch.cat(picked)).values


def mixed_batches(new: torch.Tensor, replay: torch.Tensor, batch_size: int, replay_per_batch: int, *,
                  epoch: int, seed: int) -> Iterator[torch.Tensor]:
    """One epoch over ``new`` (indices), each batch topped up with ``replay_per_batch`` indices drawn from
    ``replay`` (with replacement when the buffer is small), so every step sees old domains too."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = new[torch.randperm(len(new), generator=g)]
    per_new = max(1, batch_size - (replay_per_batch if len(replay) else 0))
    for start in range(0, max(len(perm) - per_new + 1, 1), per_new):
        idx = perm[start : start + per_new]
        if len(replay) and replay_per_batch > 0:
            idx = torch.cat([idx, replay[torch.randint(0, len(replay), (replay_per_batch,), generator=g)]])
        yield idx


@torch.no_grad()
def per_sample_losses(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, domains: torch.Tensor,
                      batch_size: int = 256) -> torch.Tensor:
    """Cross-entropy of every image under ``model`` (uint8 images, as stored): what ``hardest`` ranks by."""
    from mdcore.data.images import to_float

    model.eval()
    out = [torch.nn.functional.cross_entropy(model(to_float(images[s : s + batch_size]), domains[s : s + batch_size]),
                                             labels[s : s + batch_size], reduction="none")
           for s in range(0, len(images), batch_size)]
    return torch.cat(out) if out else torch.empty(0)
