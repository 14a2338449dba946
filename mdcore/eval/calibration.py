"""Calibration: how far a model's confidence can be trusted, per domain, and temperature scaling to fix it.

A temperature per seen domain (fitted on that domain's validation images) and one for unknown domains
(fitted on every validation image scored without its domain id, i.e. routed as an unknown domain would be).
Dividing logits by a positive temperature never changes the argmax, so accuracy stays what it was; only
the confidence moves. The temperatures live in a vector indexed by the domain input, the last entry
being the unknown domain's, so domain ``-1`` picks it in PyTorch and in an ONNX ``Gather`` alike.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.functional.classification import multiclass_calibration_error

CALIBRATION_FILE = "calibration.json"  # in the evaluate stage's output folder (reports/evaluate)
UNKNOWN = -1
T_RANGE = (0.05, 20.0)  # a temperature outside this is a symptom (an empty or perfectly separated set)


@dataclass
class Temperatures:
    """Per-domain temperatures in the model's domain order, plus the unknown-domain one; ``abstain_below``:
    per domain (and ``"unknown"``), the calibrated confidence under which the model should abstain to reach
    ``target_precision`` (None: no threshold reached it on validation)."""

    domains: list[str]
    per_domain: dict[str, float]
    unknown: float
    abstain_below: dict[str, float | None] = field(default_factory=dict)
    target_precision: float | None = None
    fitted_on: str = "val"
    model_sha256: str | None = None  # the weights these were fitted for (deployment checks it)
    pooled_for: list[str] = field(default_factory=list)  # domains too small or error-free to fit their own

    def by_name(self) -> dict[str, float]:
        """{domain: T, "unknown": T}: what an exported ONNX file's metadata carries."""
        return {**self.per_domain, "unknown": self.unknown}

    def vector(self) -> torch.Tensor:
        """(D + 1,) float32: entry i for domain index i, the last (index -1) for an unknown domain."""
        return torch.tensor([*(self.per_domain[d] for d in self.domains), self.unknown], dtype=torch.float32)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Temperatures":
        return cls(**json.loads(Path(path).read_text()))


def fitted_for(file: str | Path, sha256: str, unhashed_ok: bool = False) -> Temperatures | None:
    """The temperatures in ``file`` when they were fitted for the weights with this sha256, else None: a
    temperature fitted for other weights would miscalibrate these. ``unhashed_ok`` accepts a file without a
    hash (older champions saved their temperatures beside their own weights, unhashed)."""
    file = Path(file)
    if not file.is_file():
        return None
    temps = Temperatures.load(file)
    if temps.model_sha256 == sha256 or (unhashed_ok and temps.model_sha256 is None):
        return temps
    return None


def temperature_of(temperatures: Temperatures | torch.Tensor, domains: torch.Tensor) -> torch.Tensor:
    """Each row's temperature: its domain's, or the unknown domain's for index -1."""
    vector = temperatures.vector() if isinstance(temperatures, Temperatures) else temperatures
    return vector.to(domains.device)[domains]


def calibrated_probabilities(logits: torch.Tensor, domains: torch.Tensor | None,
                             temperatures: Temperatures | torch.Tensor) -> torch.Tensor:
    """softmax(logits / T[domain]); ``domains`` None = every row from an unknown domain."""
    if domains is None:
        domains = torch.full((len(logits),), UNKNOWN, dtype=torch.long, device=logits.device)
    t = temperature_of(temperatures, domains).to(logits.dtype)
    return torch.softmax(logits / t[:, None], dim=1)


class CalibratedModel(nn.Module):
    """A multi-domain model that returns calibrated probabilities instead of logits (what the calibrated
    ONNX graph's ``probabilities`` output computes)."""

    def __init__(self, model: nn.Module, temperatures: Temperatures):
        super().__init__()
        self.model = model
        self.register_buffer("temperatures", temperatures.vector())

    def forward(self, images: torch.Tensor, domains: torch.Tensor | None = None) -> torch.Tensor:
        return calibrated_probabilities(self.model(images, domains).float(), domains, self.temperatures)


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float | torch.Tensor = 1.0) -> float:
    if not len(labels):
        return float("nan")
    return float(F.cross_entropy(logits.float() / temperature, labels))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, iters: int = 40) -> float:
    """The temperature minimizing NLL. NLL is convex in 1/T, hence unimodal in log T: a golden-section search
    on log T over ``T_RANGE`` finds it deterministically (no learning rate, no start point). 1.0 with no
    images."""
    if not len(labels):
        return 1.0
    logits = logits.float()
    lo, hi = math.log(T_RANGE[0]), math.log(T_RANGE[1])
    golden = (math.sqrt(5) - 1) / 2
    loss = lambda log_t: nll(logits, labels, math.exp(log_t))  # noqa: E731
    a, b = hi - golden * (hi - lo), lo + golden * (hi - lo)
    fa, fb = loss(a), loss(b)
    for _ in range(iters):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - golden * (hi - lo)
            fa = loss(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + golden * (hi - lo)
            fb = loss(b)
    return round(math.exp((lo + hi) / 2), 4)


MIN_FIT_ROWS = 30  # a domain with fewer validation images, or none misclassified, takes the pooled temperature


def fit_temperatures(domain_names: list[str], logits: torch.Tensor, domains: torch.Tensor, labels: torch.Tensor,
                     routed_logits: torch.Tensor) -> Temperatures:
    """Per seen domain on its own validation rows (``logits``, scored with the domain id), and the unknown
    domain's on every validation row scored without it (``routed_logits``).

    A domain with fewer than ``MIN_FIT_ROWS`` validation images, or with none misclassified, takes the
    temperature of all seen domains' validation rows pooled: with no error to learn from, NLL keeps falling
    as T shrinks, and the fit would sharpen that domain's probabilities to the bound of ``T_RANGE``
    (11 correct `phone` images gave T = 0.05 on the demo). ``pooled_for`` names those domains."""
    pooled = fit_temperature(logits, labels)
    per_domain, pooled_for = {}, []
    for i, name in enumerate(domain_names):
        mask = domains == i
        wrong = int((logits[mask].argmax(1) != labels[mask]).sum()) if mask.any() else 0
        if int(mask.sum()) < MIN_FIT_ROWS or wrong == 0:
            per_domain[name] = pooled
            pooled_for.append(name)
        else:
            per_domain[name] = fit_temperature(logits[mask], labels[mask])
    return Temperatures(list(domain_names), per_domain, fit_temperature(routed_logits, labels),
                        pooled_for=pooled_for)


def ece(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """Expected calibration error (torchmetrics, equal-width confidence bins, L1)."""
    if not len(labels):
        return float("nan")
    return float(multiclass_calibration_error(probs, labels, num_classes=probs.shape[1], n_bins=n_bins,
                                              norm="l1", validate_args=False))


def reliability(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> dict[str, list]:
    """Per equal-width confidence bin: mean confidence, accuracy and count (empty bins: None), the
    reliability diagram's points (the same bins ECE averages over)."""
    conf, pred = probs.max(dim=1)
    correct = (pred == labels).float()
    bins = (conf * n_bins).long().clamp(max=n_bins - 1)
    counts = torch.bincount(bins, minlength=n_bins).float()
    sum_conf = torch.bincount(bins, weights=conf, minlength=n_bins)
    sum_ok = torch.bincount(bins, weights=correct, minlength=n_bins)
    mean = lambda s: [float(v) if n else None for v, n in zip(s / counts.clamp(min=1), counts)]  # noqa: E731
    return {"confidence": mean(sum_conf), "accuracy": mean(sum_ok), "count": [int(n) for n in counts]}


def precision_coverage(probs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Predicting only the k most confident rows, for every k: (coverage k/n, precision among them, the
    k-th confidence), most confident first."""
    conf, pred = probs.max(dim=1)
    order = torch.argsort(conf, descending=True, stable=True)
    correct = (pred == labels)[order].float()
    k = torch.arange(1, len(labels) + 1, dtype=torch.float32)
    return k / max(len(labels), 1), correct.cumsum(0) / k, conf[order]


def abstain_threshold(probs: torch.Tensor, labels: torch.Tensor, target: float) -> dict:
    """The widest coverage whose precision reaches ``target`` on these rows, and the confidence below which
    the model abstains to get it (None and coverage 0 when even the most confident row misses)."""
    coverage, precision, conf = precision_coverage(probs, labels)
    ok = torch.nonzero(precision >= target - 1e-9)[:, 0]
    if not len(ok):
        return {"threshold": None, "coverage": 0.0, "precision": None}
    k = int(ok[-1])
    return {"threshold": float(conf[k]), "coverage": float(coverage[k]), "precision": float(precision[k])}


def at_threshold(probs: torch.Tensor, labels: torch.Tensor, threshold: float | None) -> dict:
    """Coverage and precision when the model answers only at confidence >= ``threshold`` (None = never)."""
    conf, pred = probs.max(dim=1)
    answered = conf >= threshold if threshold is not None else torch.zeros_like(conf, dtype=torch.bool)
    n = int(answered.sum())
    return {"coverage": n / max(len(labels), 1),
            "precision": float((pred[answered] == labels[answered]).float().mean()) if n else None}
