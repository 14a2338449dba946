"""The evaluate stage's figures per domain, all from logits already computed (one forward pass per split and
per with/without domain id): per-class tables, calibration before and after temperature scaling, and
selective prediction.

Which numbers choose: temperatures and abstain thresholds are fitted on the validation split (seen domains
with their id; the unknown-domain ones on every validation image routed without it). The test split of
seen domains and held-out domains only report what those choices give.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mdcore.eval.calibration import (Temperatures, abstain_threshold, at_threshold, calibrated_probabilities,
                                     ece, fit_temperatures, nll, precision_coverage, reliability)
from mdcore.eval.classwise import ClassReport, class_report

UNKNOWN_KEY = "unknown"  # abstain_below's entry for a domain the model does not know


@dataclass
class Scored:
    """A split's rows and the model's logits on them, with the domain id (``logits``) and without (``routed``);
    ``images`` (uint8) and ``paths`` when a figure needs the pictures themselves (Grad-CAM sheets)."""

    names: list[str]
    labels: torch.Tensor
    domains: torch.Tensor
    logits: torch.Tensor
    routed: torch.Tensor
    images: torch.Tensor | None = field(default=None, repr=False)
    paths: list[str] | None = field(default=None, repr=False)

    def rows_of(self, name: str) -> torch.Tensor:
        return torch.tensor([n == name for n in self.names], dtype=torch.bool)

    def accuracy(self, name: str, routed: bool = False) -> float:
        mask = self.rows_of(name)
        logits = (self.routed if routed else self.logits)[mask]
        return float((logits.argmax(1) == self.labels[mask]).double().mean())  # as count / n


@dataclass
class DomainFigures:
    """Everything the report shows for one domain (``kind``: seen or held-out)."""

    domain: str
    kind: str
    classes: ClassReport
    calibration: dict
    reliability_before: dict
    reliability_after: dict
    selective: dict
    curve: tuple[torch.Tensor, torch.Tensor] = field(repr=False, default=None)

    def summary(self) -> dict:
        """Compact per-domain figures for evaluate.json (the full tables go to CSV)."""
        cal, sel = self.calibration, self.selective
        return self.classes.summary() | {
            "temperature": cal["temperature"], "ece": cal["ece_before"], "ece_calibrated": cal["ece_after"],
            "nll": cal["nll_before"], "nll_calibrated": cal["nll_after"],
            "abstain_below": sel["threshold"], "selective_coverage": sel["coverage"],
            "selective_precision": sel["precision"], "coverage_at_target": sel["coverage_at_target"]}


def fit_on_validation(val: Scored, domain_names: list[str], target_precision: float) -> Temperatures:
    """Temperatures per seen domain and for unknown domains, then the abstain threshold of each on the
    calibrated validation probabilities."""
    temps = fit_temperatures(domain_names, val.logits, val.domains, val.labels, val.routed)
    probs = calibrated_probabilities(val.logits, val.domains, temps)
    for i, name in enumerate(domain_names):
        mask = val.domains == i
        temps.abstain_below[name] = abstain_threshold(probs[mask], val.labels[mask], target_precision)["threshold"]
    routed = calibrated_probabilities(val.routed, None, temps)
    temps.abstain_below[UNKNOWN_KEY] = abstain_threshold(routed, val.labels, target_precision)["threshold"]
    temps.target_precision = target_precision
    return temps


def explain(test: Scored, temps: Temperatures, class_names: list[str], target_precision: float,
            n_bins: int = 15) -> dict[str, DomainFigures]:
    """Per domain of ``test`` (sorted): seen domains scored with their id and temperature, held-out ones as
    unknown domains (index -1: routed, the unknown temperature and threshold)."""
    before = torch.softmax(test.logits, dim=1)
    after = calibrated_probabilities(test.logits, test.domains, temps)
    out = {}
    for name in sorted(set(test.names)):
        mask = test.rows_of(name)
        seen = name in temps.per_domain
        y, b, a = test.labels[mask], before[mask], after[mask]
        t = temps.per_domain[name] if seen else temps.unknown
        threshold = temps.abstain_below.get(name if seen else UNKNOWN_KEY)
        coverage, precision, _ = precision_coverage(a, y)
        calibration = {"temperature": t, "ece_before": ece(b, y, n_bins), "ece_after": ece(a, y, n_bins),
                       "nll_before": nll(test.logits[mask], y), "nll_after": nll(test.logits[mask], y, t),
                       "acc_before": float((b.argmax(1) == y).float().mean()),
                       "acc_after": float((a.argmax(1) == y).float().mean())}
        selective = {"threshold": threshold, **at_threshold(a, y, threshold),
                     "coverage_at_target": abstain_threshold(a, y, target_precision)["coverage"]}
        report = class_report(a.argmax(1), y, class_names, name)
        out[name] = DomainFigures(name, "seen" if seen else "held-out", report, calibration,
                                  reliability(b, y, n_bins), reliability(a, y, n_bins), selective, (coverage, precision))
    return out


def mean_of(figures: dict[str, DomainFigures], kind: str, key: str) -> float | None:
    values = [f.calibration[key] for f in figures.values() if f.kind == kind]
    return sum(values) / len(values) if values else None
