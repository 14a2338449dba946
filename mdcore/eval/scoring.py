"""Scoring a model on an image set: predictions, loss and accuracy per domain."""
from __future__ import annotations

import torch
from torch import nn

from mdcore.data.images import ImageSet, to_float


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


@torch.no_grad()
def logits_of(model: nn.Module, data: ImageSet, batch_size: int = 256, use_domain: bool = True,
              device="cpu") -> torch.Tensor:
    """(N, C) float logits on the CPU, one forward pass: every figure the evaluate stage reports (accuracy,
    per-class tables, calibration) reads these, so adding a figure adds no pass over the images."""
    model.eval()
    out = []
    for start in range(0, len(data), batch_size):
        x = to_float(data.images[start : start + batch_size].to(device))
        d = data.domains[start : start + batch_size].to(device) if use_domain else None
        out.append(model(x, d).float().cpu())
    return torch.cat(out) if out else torch.empty(0, len(data.class_names))


def logits_with_and_without_domain(model: nn.Module, data: ImageSet, batch_size: int = 256,
                                   device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(with each row's domain id, routed as an unknown domain): the routed pass over every row, the
    domain-given pass only over rows of known domains. A row of an unknown domain (-1) is routed either way,
    so its routed logits serve as both (held-out domains: half the passes over their images)."""
    routed = logits_of(model, data, batch_size, use_domain=False, device=device)
    known = data.domains >= 0
    given = routed.clone()
    if bool(known.any()):
        given[known] = logits_of(model, data.subset(known), batch_size, use_domain=True, device=device)
    return given, routed
