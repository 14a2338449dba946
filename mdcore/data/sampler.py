"""A domain-balanced sampler that knows about distribution.

Every global batch has a set per-domain mix (natural frequencies, uniform over domains, or explicit
weights); every worker takes a disjoint slice of it. All workers draw the same global batches from the
same seed, so no communication is needed and each global batch keeps the configured mix exactly.
"""
from __future__ import annotations

from typing import Iterator, Mapping

import numpy as np
import torch


def domain_quota(counts: Mapping[int, int], global_batch: int, mix: str | Mapping[int, float]) -> dict[int, int]:
    """Images per domain in each global batch (largest-remainder rounding, sums to ``global_batch``)."""
    domains = sorted(d for d, n in counts.items() if n > 0)
    if mix == "natural":
        weights = np.array([counts[d] for d in domains], dtype=float)
    elif mix == "uniform":
        weights = np.ones(len(domains))
    elif isinstance(mix, Mapping):
        unknown = sorted(set(mix) - set(domains))
        if unknown:
            raise ValueError(f"domain_mix names domains {unknown} that have no training images")
        weights = np.array([float(mix.get(d, 0.0)) for d in domains])
        if weights.sum() <= 0:
            raise ValueError("domain_mix weights must not all be zero")
    else:
        raise ValueError(f"domain_mix {mix!r}: expected 'natural', 'uniform' or a mapping of domain weights")
    share = weights / weights.sum() * global_batch
    quota = np.floor(share).astype(int)
    for i in np.argsort(-(share - quota), kind="stable")[: global_batch - quota.sum()]:
        quota[i] += 1
    return {d: int(q) for d, q in zip(domains, quota)}


def domain_balanced_batches(
    domains: torch.Tensor,
    global_batch: int,
    *,
    rank: int = 0,
    world: int = 1,
    epoch: int = 0,
    seed: int = 0,
    mix: str | Mapping[int, float] = "uniform",
    steps: int | None = None,
) -> Iterator[torch.Tensor]:
    """Yield this worker's index batches for one epoch.

    ``steps`` defaults to one pass over the data (``len(domains) // global_batch``). Domains drawn more
    often than they have images cycle through fresh permutations (oversampling the scarce ones).
    """
    if global_batch % world:
        raise ValueError(f"global batch {global_batch} must be divisible by the {world} workers")
    dom = domains.cpu().numpy()
    counts = {int(d): int((dom == d).sum()) for d in np.unique(dom)}
    quota = domain_quota(counts, global_batch, mix)
    steps = steps if steps is not None else max(1, len(dom) // global_batch)  # a tiny dataset still trains
    rng = np.random.default_rng([seed, epoch, 7])
    pools = {d: np.flatnonzero(dom == d) for d in quota}
    streams = {d: _cycle(pools[d], rng) for d in quota}
    per_worker = global_batch // world
    for _ in range(steps):
        batch = np.concatenate([np.fromiter((next(streams[d]) for _ in range(q)), int, q) for d, q in quota.items()])
        rng.shuffle(batch)
        yield torch.from_numpy(batch[rank * per_worker : (rank + 1) * per_worker])


def _cycle(pool: np.ndarray, rng: np.random.Generator):
    while True:
        yield from rng.permutation(pool)
