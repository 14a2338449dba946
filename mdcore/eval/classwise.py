"""Per domain x class figures (torchmetrics): which classes fail in which domain, not only how many images.

A mean accuracy can rise while one class of one domain collapses; the worst class's recall per domain is
the figure that shows it (and the one the promotion gate can compare, ``mdcore.eval.promotion``).
Undefined figures are NaN, not 0: precision of a class never predicted, recall of a class with no images.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torchmetrics.functional.classification import (multiclass_confusion_matrix, multiclass_f1_score,
                                                    multiclass_precision, multiclass_recall)


@dataclass
class ClassReport:
    """One domain's per-class table; ``confusion[i, j]``: images of class i predicted as j."""

    domain: str
    classes: list[str]
    support: torch.Tensor
    precision: torch.Tensor
    recall: torch.Tensor
    f1: torch.Tensor
    confusion: torch.Tensor
    macro_f1: float
    balanced_acc: float
    worst_class: str | None
    worst_class_recall: float | None

    def normalized(self) -> torch.Tensor:
        """Row-normalized confusion (each true class sums to 1; a class with no images stays 0)."""
        return self.confusion.float() / self.confusion.sum(1, keepdim=True).clamp(min=1)

    def rows(self, kind: str) -> list[dict]:
        return [{"domain": self.domain, "kind": kind, "class": c, "support": int(self.support[i]),
                 "precision": float(self.precision[i]), "recall": float(self.recall[i]), "f1": float(self.f1[i])}
                for i, c in enumerate(self.classes)]

    def summary(self) -> dict:
        """The compact figures evaluate.json carries per domain."""
        return {"macro_f1": self.macro_f1, "balanced_acc": self.balanced_acc, "worst_class": self.worst_class,
                "worst_class_recall": self.worst_class_recall}


def class_report(preds: torch.Tensor, labels: torch.Tensor, classes: list[str], domain: str = "") -> ClassReport:
    """Precision, recall, F1 per class, macro-F1 (over classes with images or predictions), balanced accuracy
    (mean recall over classes with images), the confusion matrix and the class with the lowest recall."""
    n = len(classes)
    kw = {"num_classes": n, "validate_args": False}
    confusion = multiclass_confusion_matrix(preds, labels, **kw) if len(labels) else torch.zeros(n, n, dtype=torch.long)
    support, predicted = confusion.sum(1), confusion.sum(0)
    nan = torch.tensor(float("nan"))
    if len(labels):
        precision = torch.where(predicted > 0, multiclass_precision(preds, labels, average=None, **kw), nan)
        recall = torch.where(support > 0, multiclass_recall(preds, labels, average=None, **kw), nan)
        f1 = torch.where((support + predicted) > 0, multiclass_f1_score(preds, labels, average=None, **kw), nan)
        macro_f1 = float(multiclass_f1_score(preds, labels, average="macro", **kw))
    else:
        precision = recall = f1 = torch.full((n,), float("nan"))
        macro_f1 = float("nan")
    present = support > 0
    balanced = float(recall[present].mean()) if bool(present.any()) else float("nan")
    worst = int(torch.where(present, recall, torch.inf).argmin()) if bool(present.any()) else None
    return ClassReport(domain, list(classes), support, precision, recall, f1, confusion, macro_f1, balanced,
                       classes[worst] if worst is not None else None,
                       float(recall[worst]) if worst is not None else None)


def class_reports(preds: torch.Tensor, labels: torch.Tensor, names: list[str], classes: list[str]) -> dict[str, ClassReport]:
    """One report per domain name (``names``: each row's domain), in sorted domain order."""
    index: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        index.setdefault(name, []).append(i)
    return {d: class_report(preds[rows], labels[rows], classes, d)
            for d, rows in ((d, torch.tensor(index[d])) for d in sorted(index))}
