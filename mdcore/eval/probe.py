"""Linear probe: how linearly separable the classes are in a frozen backbone's features, per domain.

A multinomial logistic regression (scikit-learn) is fitted on the frozen features of the training split
and scored on the test split of each seen domain and on every image of each held-out domain.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from mdcore.data.images import to_float
from mdcore.models.input_norm import as_norm


@torch.no_grad()
def frozen_features(backbone: nn.Module, images: torch.Tensor, batch_size: int = 256,
                    input_norm="image", device="cpu") -> np.ndarray:
    """Pooled features of uint8 ``images`` (N,3,H,W), backbone in eval mode (restored afterwards);
    ``input_norm``: a kind name or an ``mdcore.models.input_norm.InputNorm``."""
    was_training = backbone.training
    backbone.eval()
    norm = as_norm(input_norm).to(device)
    out = []
    for start in range(0, len(images), batch_size):
        x = to_float(images[start : start + batch_size]).to(device)
        out.append(backbone(norm(x)).float().cpu())
    backbone.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros((0, getattr(backbone, "num_features", 0)), np.float32)


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 test_domains: list[str], max_iter: int = 300, seed: int = 0) -> dict:
    """{"per_domain": {domain: accuracy}, "mean": mean over domains, "train_acc": fit accuracy}."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter, C=1.0, random_state=seed))
    clf.fit(train_x, train_y)
    correct = clf.predict(test_x) == np.asarray(test_y)
    per_domain: dict[str, list[bool]] = {}
    for name, ok in zip(test_domains, correct):
        per_domain.setdefault(name, []).append(bool(ok))
    accs = {d: float(np.mean(v)) for d, v in sorted(per_domain.items())}
    return {"per_domain": accs, "mean": float(np.mean(list(accs.values()))) if accs else None,
            "train_acc": float(clf.score(train_x, train_y))}


def probe_backbone(backbone: nn.Module, train_images: torch.Tensor, train_labels: torch.Tensor,
                   test_images: torch.Tensor, test_labels: torch.Tensor, test_domains: list[str],
                   input_norm="image", seed: int = 0, device="cpu") -> dict:
    """Features of both splits through the frozen ``backbone`` (on ``device``), then ``linear_probe``."""
    kw = dict(input_norm=input_norm, device=device)
    return linear_probe(frozen_features(backbone, train_images, **kw), train_labels.numpy(),
                        frozen_features(backbone, test_images, **kw), test_labels.numpy(),
                        test_domains, seed=seed)


def probe_markdown(before: dict, after: dict, kinds: dict[str, str]) -> str:
    """A small table: per domain, linear-probe accuracy before and after pretraining."""
    lines = ["# Linear probe: frozen backbone features, logistic regression on the train split", "",
             "| domain | kind | before pretraining | after pretraining | change |", "|---|---|---|---|---|"]
    for d in sorted(after["per_domain"]):
        b, a = before["per_domain"].get(d), after["per_domain"][d]
        lines.append(f"| {d} | {kinds.get(d, '?')} | {b:.3f} | {a:.3f} | {a - b:+.3f} |")
    lines.append(f"| **mean** | | {before['mean']:.3f} | {after['mean']:.3f} | {after['mean'] - before['mean']:+.3f} |")
    return "\n".join(lines) + "\n"
