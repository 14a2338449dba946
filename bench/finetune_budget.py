"""Choose the finetune stage's step budget on training-domain validation: rerun ``mdpipe stage finetune``
in a workspace whose earlier stages have run, once per (budget, seed), and score each shipped model on
the validation split of its training domains (the selection metric). Test and held-out accuracy are
recorded beside it for the report only; they never choose.

    python -m bench.finetune_budget --workspace WS --budgets 128x15 64x15 32x15 [--seeds 0 1 2]

WS is a scratch clone of this repository after ``mdpipe run`` (its params/finetune.yaml is overwritten by
the -S overrides and restored at the end). Writes bench/results/finetune_budget_<name>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from mdcore.eval.lodo import percent_mean_sd


def parse_budget(text: str) -> tuple[int, int]:
    try:
        batch, epochs = (int(x) for x in text.lower().split("x"))
    except ValueError as err:
        raise SystemExit(f"--budgets: expected BATCHxEPOCHS such as 64x15, got {text!r}") from err
    return batch, epochs


def run_finetune(ws: Path, batch: int, epochs: int, seed: int) -> dict:
    cmd = [sys.executable, "-m", "flows.cli", "--root", str(ws), "stage", "finetune",
           "-S", f"batch_size={batch}", "-S", f"epochs={epochs}", "-S", f"seed={seed}"]
    subprocess.run(cmd, cwd=ws, check=True, env=os.environ | {"PYTHONPATH": str(ws)})
    return json.loads((ws / "reports/metrics/finetune.json").read_text())


def score(ws: Path) -> dict:
    """Mean per-domain accuracy of the shipped model on the training domains' val split (selection) and,
    for the report, on their test split and on the held-out domains."""
    from mdcore.models.model import load_model
    from tasks.evaluate import per_domain_accuracy
    from tasks.paths import load_paths

    model = load_model(ws / "models/finetuned")
    paths = load_paths(ws)
    val = per_domain_accuracy(model, paths, 256, splits=("val",))
    rest = per_domain_accuracy(model, paths, 256, splits=("test", "holdout"))
    seen, held = rest[rest["kind"] == "seen"], rest[rest["kind"] == "held-out"]
    return {"val_seen": float(val["accuracy"].mean()),
            "val_seen_pooled": float((val["accuracy"] * val["images"]).sum() / val["images"].sum()),
            "val_per_domain": {r.domain: [float(r.accuracy), int(r.images)] for r in val.itertuples()},
            "test_seen": float(seen["accuracy"].mean()),
            "heldout": {r.domain: float(r.accuracy) for r in held.itertuples()}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workspace", required=True)
    ap.add_argument("--budgets", nargs="+", default=["128x15", "64x15", "32x15"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--name", default=None, help="results file suffix (default: the workspace's folder name)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    ws = Path(args.workspace).resolve()
    params_file = ws / "params/finetune.yaml"
    original = params_file.read_text()
    out = Path(__file__).resolve().parent / "results" / f"finetune_budget_{args.name or ws.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[dict]] = {}
    try:
        for budget in args.budgets:
            batch, epochs = parse_budget(budget)
            for seed in args.seeds:
                fit = run_finetune(ws, batch, epochs, seed)
                row = score(ws) | {"seed": seed, "fit_wall_s": fit.get("fit_wall_s"),
                                   "images_per_s": fit.get("images_per_s")}
                rows.setdefault(budget, []).append(row)
                print(budget, row, flush=True)
                out.write_text(json.dumps({"workspace": str(ws), "rows": rows}, indent=2))
    finally:
        params_file.write_text(original)
    print("| budget (batch x epochs) | val, training domains (selects) | test, seen | held-out (mean) | fit s |")
    print("|---|---:|---:|---:|---:|")
    for budget, runs in rows.items():
        held = [np.mean(list(r["heldout"].values())) for r in runs if r["heldout"]]
        print(f"| {budget} | {percent_mean_sd([r['val_seen'] for r in runs])} | {percent_mean_sd([r['test_seen'] for r in runs])} | "
              f"{percent_mean_sd(held) if held else '-'} | {np.mean([r['fit_wall_s'] or 0 for r in runs]):.0f} |")


if __name__ == "__main__":
    main()
