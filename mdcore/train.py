"""Training and prediction loops, shared by every stage (and by Ray workers, which import them)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterable, Iterator

import torch
from torch import nn

from mdcore.augment import fourier_domain_mix, ssl_view, train_view
from mdcore.images import ImageSet, to_float
from mdcore.losses import classification_loss, distillation_loss, nt_xent

if TYPE_CHECKING:
    from mdcore.lazy_images import BatchLoader
    from mdcore.methods import Method
    from mdcore.transfer import DomainWeighting


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


def finetune_epoch(
    model: nn.Module,
    data: ImageSet,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[torch.Tensor],
    *,
    epoch: int,
    seed: int,
    rank: int = 0,
    label_smoothing: float = 0.0,
    on_step: Callable[[], None] | None = None,
    device: torch.device | str = "cpu",
    domain_weighting: "DomainWeighting | None" = None,
    teacher: nn.Module | None = None,
    kd_weight: float = 0.0,
    kd_temperature: float = 4.0,
    kd_domains: int | None = None,
    method: "Method | None" = None,
    loader_workers: int = 0,
    loader: "BatchLoader | None" = None,
) -> dict[str, float]:
    """One pass over ``batches`` (index tensors into ``data``: this worker's shard). Images decoded on
    demand decode ahead in DataLoader worker processes: those of ``loader`` (a
    :class:`mdcore.lazy_images.BatchLoader` over ``data.images``, made once per run so its workers live
    across epochs), or else ``loader_workers`` processes started for this epoch alone.

    The model is called as ``model(x, domains, return_aux=True, labels=y)``, so extra loss terms (load
    balancing, alignment, supervised contrastive, ...) are computed inside forward, where DDP sees them.
    ``domain_weighting`` (mdcore.transfer.DomainWeighting) weights each image's classification loss by its
    domain (inverse frequency, GroupDRO, curriculum) and is updated after every step. ``teacher`` adds
    ``kd_weight`` x the distillation loss towards the teacher's logits (temperature ``kd_temperature``), on
    the images of domains ``0 .. kd_domains - 1`` only when ``kd_domains`` is set (a teacher that predates a
    new domain: replayed images keep its answers, the new domain's images learn freely).
    ``method`` (mdcore.methods) decides each batch's augmentation and style randomization and is told after
    every step; without one, the mild default augmentation (``train_view``) applies.
    """
    model.train()
    g = torch.Generator().manual_seed(seed * 7919 + epoch * 31 + rank)
    total_loss, correct, seen = 0.0, 0, 0
    aux_totals: dict[str, float] = {}
    if teacher is not None:
        teacher.eval()
    from mdcore.lazy_images import batch_images

    pairs = loader(batches) if loader is not None else batch_images(data.images, batches, workers=loader_workers)
    for idx, raw in pairs:
        # uint8 to the device first (a quarter of float32's bytes), then augment there: on a GPU the
        # per-pixel work (jitter, noise, random convolutions, line drawings) must not run on the CPU
        x = to_float(raw.to(device, non_blocking=True))
        y, d = data.labels[idx].to(device), data.domains[idx].to(device)
        # the method decides what the model trains on; without one, the mild default augmentation
        x = train_view(x, g) if method is None else method.training_view(x, data.domains[idx], g)
        out = model(x, d, return_aux=True, labels=y)
        logits, aux = out if isinstance(out, tuple) else (out, {})
        if domain_weighting is None:
            loss = classification_loss(logits, y, label_smoothing)
        else:
            per_sample = classification_loss(logits, y, label_smoothing, reduction="none")
            w = domain_weighting.sample_weights(d, epoch).to(per_sample.dtype)
            loss = (w * per_sample).sum() / w.sum().clamp(min=1e-12)
            domain_weighting.update(per_sample, d)
        if teacher is not None and kd_weight > 0:
            rows = slice(None) if kd_domains is None else (d < kd_domains).nonzero().flatten()
            if kd_domains is None or len(rows):
                with torch.no_grad():
                    t_logits = teacher(x[rows], d[rows])
                aux = dict(aux, kd=kd_weight * distillation_loss(logits[rows], t_logits, kd_temperature))
        for name, term in aux.items():
            loss = loss + term
            aux_totals[name] = aux_totals.get(name, 0.0) + float(term.detach()) * len(idx)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if method is not None:
            method.after_step(model)
        if on_step is not None:
            on_step()
        total_loss += float(loss.detach()) * len(idx)
        correct += int((logits.argmax(1) == y).sum())
        seen += len(idx)
    stats = {"loss": total_loss / max(seen, 1), "train_acc": correct / max(seen, 1), "images": seen}
    stats.update({f"aux/{k}": v / max(seen, 1) for k, v in aux_totals.items()})
    return stats


@torch.no_grad()
def predict(
    model: nn.Module, images: torch.Tensor, domains: torch.Tensor | None, batch_size: int = 256, device="cpu"
) -> torch.Tensor:
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = to_float(images[start : start + batch_size].to(device))
        d = None if domains is None else domains[start : start + batch_size].to(device)
        out.append(model(x, d).argmax(1).cpu())
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


@torch.no_grad()
def evaluate_split(model: nn.Module, data: ImageSet, names: list[str], batch_size: int = 256, device="cpu",
                   use_domain: bool = True) -> dict:
    """Mean cross-entropy and accuracy (overall = mean over domains) and accuracy per domain name."""
    import torch.nn.functional as F

    model.eval()
    losses, preds = [], []
    for start in range(0, len(data), batch_size):
        x = to_float(data.images[start : start + batch_size].to(device))
        d = data.domains[start : start + batch_size].to(device) if use_domain else None
        logits = model(x, d).float()
        losses.append(F.cross_entropy(logits, data.labels[start : start + batch_size].to(device), reduction="none").cpu())
        preds.append(logits.argmax(1).cpu())
    if not preds:
        return {"loss": float("nan"), "acc": float("nan"), "per_domain": {}}
    correct = (torch.cat(preds) == data.labels).numpy()
    per: dict[str, list] = {}
    for name, ok in zip(names, correct):
        per.setdefault(name, []).append(bool(ok))
    per_domain = {n: sum(v) / len(v) for n, v in sorted(per.items())}
    return {"loss": float(torch.cat(losses).mean()), "acc": sum(per_domain.values()) / len(per_domain),
            "per_domain": per_domain}


def accuracy_by_domain(
    model: nn.Module, data: ImageSet, names: list[str], batch_size: int = 256, use_domain: bool = True,
    device="cpu",
) -> dict[str, float]:
    """Accuracy per domain name (``names`` gives each row's domain, whether the model knows it or not);
    ``model`` must already be on ``device``."""
    return evaluate_split(model, data, names, batch_size, device=device, use_domain=use_domain)["per_domain"]


def training_view_batches(data: ImageSet, method: "Method", batch_size: int, *, seed: int, epoch: int,
                          mix="uniform", generator_seed: int = 0, rank: int = 0, world: int = 1,
                          device="cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, domains) batches of ``data`` (this worker's shard) as ``method`` trains on them: what
    batch-norm statistics are recomputed from after weight averaging."""
    from mdcore.sampler import domain_balanced_batches

    g = torch.Generator().manual_seed(generator_seed)
    for idx in domain_balanced_batches(data.domains, batch_size, rank=rank, world=world, epoch=epoch, seed=seed,
                                       mix=mix):
        x = method.training_view(to_float(data.images[idx].to(device)), data.domains[idx], g)
        yield x, data.domains[idx].to(device)


class ContrastiveNet(nn.Module):
    """Backbone + MLP projector for SimCLR; only the backbone is kept after pretraining."""

    def __init__(self, backbone: nn.Module, proj_dim: int = 128, input_norm="image"):
        """``input_norm``: a kind name or an ``mdcore.input_norm.InputNorm`` (what the fine-tuned model will use)."""
        super().__init__()
        from mdcore.input_norm import as_norm

        self.backbone = backbone
        self.input_norm = as_norm(input_norm)
        dim = backbone.num_features
        self.projector = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, proj_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the same input path as MultiDomainModel.features
        return self.projector(self.backbone(self.input_norm(x)))


def contrastive_epoch(
    net: ContrastiveNet,
    images: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    batch_size: int,
    epoch: int,
    seed: int,
    temperature: float,
    domains: torch.Tensor | None = None,
    fourier_mix_prob: float = 0.0,
    fourier_mix_strength: float = 1.0,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """One SimCLR epoch (views drawn on ``device``, their random parameters from the seeded generator; see
    ``mdcore.augment.randn_like_on_device`` for the per-pixel noise). With ``domains`` and ``fourier_mix_prob`` > 0 each view first gets, with that
    probability per image, the Fourier amplitude spectrum of an image of *another* domain mixed in
    (a domain-aware view: the positives differ by domain style, not only by generic jitter)."""
    net.train()
    g = torch.Generator().manual_seed(seed * 104_729 + epoch)
    total, steps = 0.0, 0
    for idx in shard_batches(len(images), batch_size, epoch=epoch, seed=seed):
        x = to_float(images[idx].to(device))

        def view():
            v = x
            if domains is not None and fourier_mix_prob > 0:
                v = fourier_domain_mix(v, domains[idx], g, p=fourier_mix_prob, strength=fourier_mix_strength)
            return ssl_view(v, g)

        loss = nt_xent(net(view()), net(view()), temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += float(loss.detach())
        steps += 1
    return {"ssl_loss": total / max(steps, 1)}
