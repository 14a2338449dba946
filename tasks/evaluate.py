"""evaluate: accuracy per domain, on the test split of seen domains and on all images of held-out
domains (which the model has never seen: it routes them on their features); per-class tables, calibration
(temperatures fitted on validation) and selective prediction per domain, Grad-CAM sheets of a seeded sample,
class balance, and the label_issues stage's findings, on one page (``reports/evaluate/index.html``). One
forward pass per split and per with/without domain id gives the logits every figure reads; Grad-CAM is
bounded by ``cam_images`` (0 = off)."""
from __future__ import annotations

import logging
import os

import pandas as pd
import torch
from prefect import task

from mdcore.models.accel import resolve_device
from mdcore.data.io import atomic_dir, sha256_file
from mdcore.models.model import WEIGHTS, MultiDomainModel, load_model
from mdcore.eval.classwise import class_reports
from mdcore.eval.explain import Scored, explain, fit_on_validation, mean_of
from mdcore.eval.html_report import write_report
from mdcore.eval.label_issues import balance_rows, page_section
from mdcore.eval.attribution import cam_sheets
from mdcore.data.manifest import read_manifest
from mdcore.eval.scoring import logits_with_and_without_domain
from tasks.data import image_roots, load_split
from tasks.params import StageParams, EvaluateParams
from tasks.paths import Paths
from tasks.stage import StageResult, execute

log = logging.getLogger("mdpipe.evaluate")


def score(model: MultiDomainModel, paths: Paths, batch_size: int, splits: tuple[str, ...], device="cpu",
          must_have_rows: bool = True, keep_images: bool = False) -> Scored:
    """The model's logits on the real rows of ``splits``, with each row's domain id and without it; the
    model moves to ``device`` and every batch with it. ``keep_images``: the images and paths come along."""
    cfg = model.config
    data, rows = load_split(paths.train_manifest, image_roots(paths.raw, paths.synthetic), cfg.image_size,
                            splits, synthetic=False, domains=cfg.domains, classes=cfg.classes, resize=cfg.resize)
    if must_have_rows and not len(rows):
        raise ValueError(f"{paths.train_manifest} has no rows in splits {list(splits)} to score on"
                         + (" (set ingest.gate_fraction > 0)" if "gate" in splits else ""))
    model.to(device)
    given, routed = logits_with_and_without_domain(model, data, batch_size, device=device)
    return Scored(list(rows["domain"]), data.labels, data.domains, given, routed,
                  data.images if keep_images else None, list(rows["path"]) if keep_images else None)


def accuracy_table(scored: Scored, domains: list[str], classes: list[str]) -> pd.DataFrame:
    """One row per domain (sorted): kind (seen/held-out), images, accuracy with its domain id and without
    it, and the class with the lowest recall (with the id) and that recall (what the gate can compare)."""
    names = sorted(set(scored.names))
    reports = class_reports(scored.logits.argmax(1), scored.labels, scored.names, classes)
    return pd.DataFrame({
        "domain": names,
        "kind": ["seen" if d in domains else "held-out" for d in names],
        "images": [int(scored.rows_of(d).sum()) for d in names],
        "accuracy": [scored.accuracy(d) for d in names],
        "accuracy_unknown_domain": [scored.accuracy(d, routed=True) for d in names],
        "worst_class": [reports[d].worst_class for d in names],
        "worst_class_recall": [reports[d].worst_class_recall for d in names],
    })


def per_domain_accuracy(model: MultiDomainModel, paths: Paths, batch_size: int,
                        splits: tuple[str, ...] = ("test", "holdout"), device="cpu") -> pd.DataFrame:
    """:func:`accuracy_table` on ``splits`` (reporting: test + held-out; the promotion gate: its own
    ``gate`` split)."""
    return accuracy_table(score(model, paths, batch_size, splits, device), model.config.domains,
                          model.config.classes)


def summarize(table: pd.DataFrame, prefix: str = "") -> dict:
    seen = table[table["kind"] == "seen"]
    held = table[table["kind"] == "held-out"]
    return {
        f"{prefix}mean_seen_acc": float(seen["accuracy"].mean()) if len(seen) else None,
        f"{prefix}worst_seen_acc": float(seen["accuracy"].min()) if len(seen) else None,
        f"{prefix}mean_heldout_acc": float(held["accuracy"].mean()) if len(held) else None,
        f"{prefix}per_domain": {r.domain: {"kind": r.kind, "images": r.images, "acc": r.accuracy,
                                           "acc_unknown_domain": r.accuracy_unknown_domain}
                                for r in table.itertuples()},
    }


def plot_accuracy(table: pd.DataFrame, out) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    x = range(len(table))
    ax.bar([i - 0.2 for i in x], table["accuracy"], width=0.4, label="with domain id")
    ax.bar([i + 0.2 for i in x], table["accuracy_unknown_domain"], width=0.4, label="unknown domain (routed)")
    ax.set_xticks(list(x), [f"{d}\n({k})" for d, k in zip(table["domain"], table["kind"])])
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title("Accuracy per domain (test split; held-out domains: all images)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def run(params: EvaluateParams, paths: Paths) -> StageResult:
    device = resolve_device(params.device, "evaluate.device")
    model = load_model(paths.finetuned)
    cfg = model.config
    test = score(model, paths, params.batch_size, ("test", "holdout"), device, keep_images=params.cam_images > 0)
    temps = fit_on_validation(score(model, paths, params.batch_size, ("val",), device, must_have_rows=False),
                              cfg.domains, params.target_precision)
    temps.model_sha256 = sha256_file(paths.finetuned / WEIGHTS)
    table = accuracy_table(test, cfg.domains, cfg.classes)
    metrics = summarize(table)
    figures = explain(test, temps, cfg.classes, params.target_precision, params.ece_bins)
    balance = balance_rows(read_manifest(paths.train_manifest), cfg.domains, cfg.classes)
    section = page_section(paths.label_issues)
    if section is not None:
        section["folder"] = os.path.relpath(paths.label_issues, paths.evaluation)
    with atomic_dir(paths.evaluation) as tmp:
        table.to_csv(tmp / "per_domain.csv", index=False, float_format="%.4f")
        plot_accuracy(table, tmp / "accuracy.png")
        pd.DataFrame([{"domain": b["domain"], "rows": b["rows"], **b["class_counts"],
                       "imbalance_ratio": b["imbalance_ratio"]} for b in balance]).to_csv(
            tmp / "class_balance.csv", index=False, float_format="%.4f")
        cams = {}
        if params.cam_images:
            samples = cam_sheets(model.to(device), test, cfg.classes, params.cam_images, params.seed, tmp)
            pd.DataFrame(samples).to_csv(tmp / "cam_samples.csv", index=False)
            cams = {r["domain"]: r["sheet"] for r in samples}
        write_report(tmp, metrics["per_domain"], figures, temps, model=cfg.backbone, target=params.target_precision,
                     bins=params.ece_bins, classes=cfg.classes, balance=balance, cams=cams, issues=section)
    for name, f in figures.items():
        metrics["per_domain"][name] |= f.summary()
    for b in balance:
        metrics["per_domain"].setdefault(b["domain"], {})["imbalance_ratio"] = b["imbalance_ratio"]
    if section is not None:  # the label_issues stage's figures beside the model's, per domain
        for d, r in section["per_domain"].items():
            metrics["per_domain"].setdefault(d, {}).update(
                label_issues=r["issues"], label_issue_share=r["issue_share"],
                swapped_pairs=", ".join(f"{p['classes'][0]}<->{p['classes'][1]}" for p in r["swapped_pairs"]))
    for r in table.itertuples():
        f = figures[r.domain]
        log.info("%-12s %-8s n=%-5d acc %.3f (unknown-domain %.3f) macro-F1 %.3f worst class %s (recall %.2f) "
                 "ECE %.3f -> %.3f (T %.2f)", r.domain, r.kind, r.images, r.accuracy, r.accuracy_unknown_domain,
                 f.classes.macro_f1, f.classes.worst_class, f.classes.worst_class_recall or 0.0,
                 f.calibration["ece_before"], f.calibration["ece_after"], f.calibration["temperature"])
    metrics |= {
        "mean_seen_ece": mean_of(figures, "seen", "ece_before"),
        "mean_seen_ece_calibrated": mean_of(figures, "seen", "ece_after"),
        "mean_heldout_ece": mean_of(figures, "held-out", "ece_before"),
        "mean_heldout_ece_calibrated": mean_of(figures, "held-out", "ece_after"),
        "target_precision": params.target_precision, "unknown_temperature": temps.unknown,
        "report": str((paths.evaluation / "index.html").relative_to(paths.root)), "device": str(device),
        "cam_images": params.cam_images,
        "label_issues": None if section is None else sum(r["issues"] for r in section["per_domain"].values()),
        "label_issue_features": None if section is None else section["features"]}
    return StageResult({"evaluation": str(paths.evaluation)}, metrics)


@task(name="evaluate")
def evaluate_task(root: str = ".", params: StageParams | None = None) -> dict:
    """Prefect task: the evaluate stage."""
    return execute("evaluate", root, params)
