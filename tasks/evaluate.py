"""evaluate: accuracy per domain, on the test split of seen domains and on all images of held-out
domains (which the model has never seen: it routes them on their features)."""
from __future__ import annotations

import logging

import pandas as pd
from prefect import task

from mdcore.models.accel import resolve_device
from mdcore.data.io import atomic_dir
from mdcore.models.model import MultiDomainModel, load_model
from mdcore.eval.scoring import accuracy_by_domain
from tasks.data import image_roots, load_split
from tasks.params import StageParams, EvaluateParams
from tasks.paths import Paths
from tasks.stage import StageResult, execute

log = logging.getLogger("mdpipe.evaluate")


def per_domain_accuracy(model: MultiDomainModel, paths: Paths, batch_size: int,
                        splits: tuple[str, ...] = ("test", "holdout"), device="cpu") -> pd.DataFrame:
    """One row per domain: kind (seen/held-out), images, accuracy with its domain id and without it,
    on ``splits`` (reporting: test + held-out; the promotion gate: its own ``gate`` split); the model
    moves to ``device`` and every batch with it."""
    cfg = model.config
    data, rows = load_split(paths.train_manifest, image_roots(paths.raw, paths.synthetic), cfg.image_size,
                            splits, synthetic=False, domains=cfg.domains, classes=cfg.classes)
    if not len(rows):
        raise ValueError(f"{paths.train_manifest} has no rows in splits {list(splits)} to score on"
                         + (" (set ingest.gate_fraction > 0)" if "gate" in splits else ""))
    names = list(rows["domain"])
    model.to(device)
    with_id = accuracy_by_domain(model, data, names, batch_size, use_domain=True, device=device)
    without_id = accuracy_by_domain(model, data, names, batch_size, use_domain=False, device=device)
    counts = rows.groupby("domain").size()
    table = pd.DataFrame({
        "domain": list(with_id),
        "kind": ["seen" if d in cfg.domains else "held-out" for d in with_id],
        "images": [int(counts[d]) for d in with_id],
        "accuracy": [with_id[d] for d in with_id],
        "accuracy_unknown_domain": [without_id[d] for d in with_id],
    })
    return table


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
    table = per_domain_accuracy(model, paths, params.batch_size, device=device)
    with atomic_dir(paths.evaluation) as tmp:
        table.to_csv(tmp / "per_domain.csv", index=False, float_format="%.4f")
        plot_accuracy(table, tmp / "accuracy.png")
    for r in table.itertuples():
        log.info("%-12s %-8s n=%-5d acc %.3f (unknown-domain %.3f)", r.domain, r.kind, r.images, r.accuracy,
                 r.accuracy_unknown_domain)
    return StageResult({"evaluation": str(paths.evaluation)}, summarize(table) | {"device": str(device)})


@task(name="evaluate")
def evaluate_task(root: str = ".", params: StageParams | None = None) -> dict:
    """Prefect task: the evaluate stage."""
    return execute("evaluate", root, params)
