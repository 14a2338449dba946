"""Scoring variants side by side: accuracy per domain (torchmetrics), under corruptions, latency, and
the acceptance rule. An ONNX variant is scored through its ONNX Runtime session (the file a user
deploys), the reference through the fp32 PyTorch model in eager mode."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torchmetrics.functional.classification import multiclass_accuracy

from mdcore.deploy.corrupt import CORRUPTIONS, SEVERITIES, corrupt
from mdcore.deploy.export import ort_logits
from mdcore.deploy.measure import latency, with_threads
from mdcore.data.images import ImageSet, to_float

Predict = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


@dataclass
class EvalSets:
    """``select``: seen domains' val + gate rows (acceptance decisions); ``report``: seen test rows and
    held-out rows (reported only); ``names``: each report/select row's domain name."""

    select: ImageSet
    select_names: list[str]
    report: ImageSet
    report_names: list[str]
    corruption: ImageSet  # a seeded subsample of the seen test rows
    select_splits: list[str] | None = None  # each select row's split (val or gate): accuracy recorded per split too


def eager_predict(model: torch.nn.Module, batch_size: int = 256) -> Predict:
    model.eval()

    def predict(images: torch.Tensor, domains: torch.Tensor | None) -> torch.Tensor:
        out = []
        with torch.inference_mode():
            for s in range(0, len(images), batch_size):
                d = None if domains is None else domains[s : s + batch_size]
                out.append(model(to_float(images[s : s + batch_size]), d).float())
        return torch.cat(out)

    return predict


def ort_predict(sess, batch_size: int = 256) -> Predict:
    return lambda images, domains: ort_logits(sess, images, domains, batch_size)


def accuracy_per_domain(predict: Predict, data: ImageSet, names: list[str], use_domain: bool = True) -> dict[str, float]:
    """Accuracy of each domain name's rows (torchmetrics' micro accuracy)."""
    if not len(data):
        return {}
    preds = predict(data.images, data.domains if use_domain else None).argmax(1)
    out = {}
    for name in sorted(set(names)):
        mask = torch.tensor([n == name for n in names])
        out[name] = float(multiclass_accuracy(preds[mask], data.labels[mask], num_classes=len(data.class_names),
                                              average="micro"))
    return out


def corruption_accuracy(predict: Predict, data: ImageSet, seed: int = 0) -> dict[str, float]:
    """Accuracy (all corruption-set images, with their domain ids) per "corruption/severity"."""
    out = {}
    for name in CORRUPTIONS:
        for s in SEVERITIES:
            x = corrupt(data.images, name, s, seed)
            preds = predict(x, data.domains).argmax(1)
            out[f"{name}/{s}"] = float(multiclass_accuracy(preds, data.labels, num_classes=len(data.class_names),
                                                           average="micro"))
    return out


def measure_latency(run: Callable, data: ImageSet, threads: int, batch_sizes=(1, 64), repeats: int = 30,
                    warmup: int = 5) -> dict:
    """Latency at each batch size on seen-domain images (domain ids given), ``threads`` torch threads (the
    ONNX Runtime session carries its own thread count)."""
    out = {}
    with with_threads(threads):
        for b in batch_sizes:
            idx = torch.arange(b) % len(data)
            out[f"b{b}"] = latency(run, data.images[idx], data.domains[idx].clamp(min=0), warmup=min(warmup, repeats),
                                   repeats=repeats if b == 1 else max(3, repeats // 3))
    return out


def measure_latencies(runs: dict[str, Callable], data: ImageSet, threads: int, batch_sizes=(1, 64),
                      repeats: int = 30, rounds: int = 3) -> dict[str, dict]:
    """:func:`measure_latency` of several runners taken in turn, ``rounds`` times over (each round a share
    of ``repeats``), so a machine that speeds up or slows down during the stage favours none of them: the
    ratios between variants are what users read. Per runner and batch size: the median over rounds of
    each round's median and p95, the calls summed."""
    per: dict[str, list[dict]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            per[name].append(measure_latency(run, data, threads, batch_sizes, repeats=max(3, repeats // rounds)))
    out = {}
    for name, results in per.items():
        out[name] = {}
        for b in batch_sizes:
            key = f"b{b}"
            median = float(np.median([r[key]["median_ms"] for r in results]))
            out[name][key] = {"median_ms": median, "p95_ms": float(np.median([r[key]["p95_ms"] for r in results])),
                              "calls": sum(r[key]["calls"] for r in results), "rounds": rounds,
                              "images_per_s": b / (median / 1e3)}
    return out


def decide(reference: dict, row: dict, max_drop: float) -> tuple[bool, str]:
    """Accept a variant unless its worst seen-domain drop on the selection split exceeds ``max_drop`` or
    its batch-1 median latency is above the fp32 reference's. Returns (accepted, reason)."""
    drops = {d: reference["select_acc"][d] - row["select_acc"].get(d, 0.0) for d in reference["select_acc"]}
    worst = max(drops, key=drops.get)
    row["worst_select_drop"] = drops[worst]
    row["worst_select_domain"] = worst
    if "val_acc" in reference and "val_acc" in row:  # recorded beside the rule, not part of it
        val = {d: reference["val_acc"][d] - row["val_acc"].get(d, 0.0) for d in reference["val_acc"]}
        row["worst_val_domain"] = max(val, key=val.get)
        row["worst_val_drop"] = val[row["worst_val_domain"]]
    if drops[worst] > max_drop + 1e-9:
        return False, f"worst-domain drop {100 * drops[worst]:.1f} points on {worst} > max_drop {100 * max_drop:.1f}"
    ref_ms, ms = reference["latency"]["b1"]["median_ms"], row["latency"]["b1"]["median_ms"]
    if ms > ref_ms:
        return False, f"slower than fp32 at batch 1 ({ms:.2f} ms > {ref_ms:.2f} ms)"
    return True, f"worst-domain drop {100 * drops[worst]:.1f} points ({worst}); batch 1 {ms:.2f} ms vs fp32 {ref_ms:.2f} ms"
