"""Leave-one-domain-out (LODO), the DomainBed protocol: for every domain of a dataset, train on the
others, choose the checkpoint on the *training* domains' validation split, and score the held-out one.

This module is the pure part: which rows each cell may use (with a guard that no held-out image leaks
into training, validation or selection), and turning cell results into the DomainBed table.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from mdcore.data.manifest import build_manifest

BUILTIN_DATASETS = ("digits", "glyphs")


class LeakageError(AssertionError):
    """A held-out image reached training, validation, prototypes or selection."""


def materialize_dataset(name: str, folder: Path, seed: int = 0, limit: int | None = None) -> Path:
    """Write built-in dataset ``name`` under ``folder`` (once) and return the image root."""
    raw = folder / "raw"
    if (raw / ".complete").is_file():
        return raw
    from mdcore.data.io import atomic_dir

    with atomic_dir(raw) as tmp:
        if name == "digits":
            from mdcore.data.builtin import BuiltinSpec, materialize

            materialize(tmp, seed=seed, spec=BuiltinSpec(limit=limit))
        elif name == "glyphs":
            from mdcore.data.glyphs import materialize as glyphs

            from mdcore.data.glyphs import per_class_for

            glyphs(tmp, seed=seed, per_class=per_class_for(limit))
        else:
            raise ValueError(f"unknown built-in dataset {name!r}; built-in: {list(BUILTIN_DATASETS)} (or a tree path)")
        (tmp / ".complete").write_text("ok\n")
    return raw


def protocol_manifest(image_root: Path, val_fraction: float = 0.2, test_fraction: float = 0.2,
                      split_seed: int = 0) -> pd.DataFrame:
    """Every domain split into train / val / test by content hash (no domain held out here: each cell
    holds out one)."""
    return build_manifest(image_root, val_fraction=val_fraction, test_fraction=test_fraction,
                          holdout_domains=[], seed=split_seed)


@dataclass
class CellRows:
    train: pd.DataFrame  # training domains, train split: what the model learns from
    val: pd.DataFrame  # training domains, val split: checkpoint selection (and SWAD's window)
    test: pd.DataFrame  # training domains, test split: seen-domain accuracy (reported only)
    heldout: pd.DataFrame  # every image of the held-out domain (reported only)

    @property
    def training_domains(self) -> list[str]:
        return sorted(self.train["domain"].unique())


def cell_rows(frame: pd.DataFrame, heldout: str) -> CellRows:
    domains = sorted(frame["domain"].unique())
    if heldout not in domains:
        raise ValueError(f"held-out domain {heldout!r} is not in the data; domains: {domains}")
    seen = frame[frame["domain"] != heldout]
    rows = CellRows(seen[seen["split"] == "train"], seen[seen["split"] == "val"], seen[seen["split"] == "test"],
                    frame[frame["domain"] == heldout])
    # the guard, once for the cell: train rows also give the prototypes, val rows also decide selection
    assert_no_leak(rows.heldout, {"training and prototypes": rows.train, "validation and selection": rows.val})
    return rows


def assert_no_leak(heldout: pd.DataFrame, used: dict[str, pd.DataFrame]) -> None:
    """Raise if any held-out image (by path or by content) is among the rows a run ``used``."""
    paths, hashes = set(heldout["path"]), set(heldout["sha256"])
    for role, rows in used.items():
        bad = rows[rows["path"].isin(paths) | rows["sha256"].isin(hashes)]
        if len(bad):
            raise LeakageError(f"{len(bad)} held-out image(s) reached {role}, e.g. {bad['path'].iloc[0]}")


def cell_key(method: str, heldout: str, seed: int) -> str:
    return f"{method}__{heldout}__{seed}"


def _ms(values) -> dict:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "n": int(len(a))}


def aggregate(cells: list[dict], choose_without: list[str] | tuple[str, ...] = ()) -> dict:
    """Cell results -> per method: per held-out domain, the average over domains, and seen-domain accuracy,
    each as mean ± std over seeds (the average is computed per seed first, as DomainBed does).

    ``choose_without``: domains a choosing table must not contain (the domains the demo reports as held out):
    ``average_choosing`` averages the other columns, the number a default may be chosen on; ``average``
    (every column) then only reports."""
    table: dict[str, dict] = {}
    methods = sorted({c["method"] for c in cells})
    domains = sorted({c["heldout"] for c in cells})
    for m in methods:
        mine = [c for c in cells if c["method"] == m]
        seeds = sorted({c["seed"] for c in mine})
        row = {"heldout": {}, "oracle": {}, "seeds": seeds}
        for d in domains:
            here = [c for c in mine if c["heldout"] == d]
            if here:
                row["heldout"][d] = _ms([c["heldout_acc"] for c in here])
                row["oracle"][d] = _ms([c["oracle_heldout_acc"] for c in here])
        complete = [s for s in seeds if all(any(c["seed"] == s and c["heldout"] == d for c in mine) for d in domains)]
        per_seed = {s: [c for c in mine if c["seed"] == s] for s in complete}
        row["average"] = _ms([np.mean([c["heldout_acc"] for c in per_seed[s]]) for s in complete]) if complete else None
        allowed = [d for d in domains if d not in choose_without]
        if choose_without and allowed and complete:
            row["average_choosing"] = _ms([np.mean([c["heldout_acc"] for c in per_seed[s] if c["heldout"] in allowed])
                                           for s in complete])
        row["oracle_average"] = (_ms([np.mean([c["oracle_heldout_acc"] for c in per_seed[s]]) for s in complete])
                                 if complete else None)
        row["seen"] = _ms([np.mean([c["seen_acc"] for c in per_seed[s]]) for s in complete]) if complete else None
        row["train_s"] = _ms([c["train_s"] for c in mine])
        table[m] = row
    return {"methods": methods, "domains": domains, "table": table,
            "choose_without": [d for d in choose_without if d in domains]}


def percent_mean_sd(values) -> str:
    """Accuracies (0-1) over seeds as "mean ± sd" in percent, the format of every table in BENCHMARKS.md."""
    return _f(_ms(values))


def _f(ms: dict | None, pct: bool = True) -> str:
    if not ms:
        return "-"
    k = 100 if pct else 1
    return f"{ms['mean'] * k:.1f} ± {ms['std'] * k:.1f}"


def markdown(summary: dict, title: str) -> str:
    agg = summary["aggregate"]
    domains, table = agg["domains"], agg["table"]
    excluded = agg.get("choose_without") or []
    choosing = f"avg without {', '.join(excluded)} (chooses)" if excluded else ""
    lines = [f"# {title}", "",
             "Leave-one-domain-out: each column holds out one domain, trains on the others and chooses the "
             "checkpoint on the training domains' validation split (training-domain validation). Accuracy "
             "(%) on every image of the held-out domain, mean ± sd over seeds; *avg* averages the held-out "
             "domains per seed first; *seen* is the mean test accuracy of the training domains."
             + (f" A default may be chosen only on *{choosing}*: {', '.join(excluded)} is what the demo reports "
                "as held out, so *avg* (every column) only reports." if excluded else ""), "",
             "| method | " + " | ".join(domains) + " | avg |" + (f" {choosing} |" if excluded else "")
             + " seen | s/cell |",
             "|---|" + "---:|" * (len(domains) + 3 + bool(excluded))]
    for m, row in table.items():
        cells = " | ".join(_f(row["heldout"].get(d)) for d in domains)
        chosen = f" **{_f(row.get('average_choosing'))}** |" if excluded else ""
        avg = _f(row["average"]) if excluded else f"**{_f(row['average'])}**"
        lines.append(f"| {m} | {cells} | {avg} |{chosen} {_f(row['seen'])} | "
                     f"{row['train_s']['mean']:.0f} |")
    lines += ["", "Oracle selection (checkpoint chosen on the held-out domain itself; optimistic, for reference "
                  "only, never used to choose anything):", "",
              "| method | " + " | ".join(domains) + " | avg |", "|---|" + "---:|" * (len(domains) + 1)]
    for m, row in table.items():
        lines.append(f"| {m} | " + " | ".join(_f(row["oracle"].get(d)) for d in domains)
                     + f" | {_f(row['oracle_average'])} |")
    cfg = summary.get("config", {})
    code = f"; code {summary['code_version'][:12]}" if summary.get("code_version") else ""
    lines += ["", f"Seeds {summary.get('seeds')}; budget: `{json.dumps(cfg, sort_keys=True)}`{code}; "
                  f"{summary.get('cells_run', 0)} cells trained in this run, {summary.get('cells_cached', 0)} "
                  f"reused; wall time {summary.get('wall_s', 0):.0f} s."]
    if min((len(r["seeds"]) for r in table.values()), default=0) < 3:
        lines += ["", "Fewer than 3 seeds: not evidence that one method beats another."]
    return "\n".join(lines) + "\n"


def metrics(summary: dict) -> dict:
    """Flat numbers for ``dvc metrics show``: per method, the average and each held-out domain."""
    out = {}
    for m, row in summary["aggregate"]["table"].items():
        out[m] = {"avg_heldout_acc": row["average"]["mean"] if row["average"] else None,
                  **({"avg_heldout_acc_choosing": row["average_choosing"]["mean"]} if row.get("average_choosing") else {}),
                  "seen_acc": row["seen"]["mean"] if row["seen"] else None,
                  **{f"heldout_acc/{d}": ms["mean"] for d, ms in row["heldout"].items()}}
    return out


def plot(summary: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = summary["aggregate"]
    domains, table = agg["domains"] + ["avg"], agg["table"]
    methods = list(table)
    width = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(domains), 3.8))
    for i, m in enumerate(methods):
        vals = [table[m]["heldout"].get(d) for d in agg["domains"]] + [table[m]["average"]]
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(domains))]
        ax.bar(xs, [v["mean"] if v else 0 for v in vals], width, yerr=[v["std"] if v else 0 for v in vals],
               label=m, capsize=2)
    ax.set_xticks(range(len(domains)), domains)
    ax.set_ylim(0, 1)
    ax.set_ylabel("held-out accuracy")
    ax.set_title("Leave-one-domain-out (training-domain validation selection)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
