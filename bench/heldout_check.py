"""The issue's check, as a user would run it: ``mdpipe run --data TREE --holdout A B`` (default params, one
seed per run) beside the plain timm loop and the loop with RandConv trained on the same manifest's train
split (same held-out domains, same backbone, 2 threads), 3 seeds.

    python -m bench.heldout_check --tree TREE --holdout lines dark --workspace CLONE [--seeds 0 1 2]

CLONE is a scratch clone of this repository (its params/ are overwritten by the seeds' -S overrides and its
data/ and models/ by the runs). Prints one markdown table and writes bench/results/heldout_check_<tree>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mdcore.eval.lodo import percent_mean_sd

from bench.lodo_plain_loop import plain_loop


def pipeline_run(workspace: Path, tree: Path, holdout: list[str], seed: int) -> dict:
    sets = [f"{stage}.seed={seed}" for stage in ("synthesize", "pretrain", "finetune")]
    cmd = [sys.executable, "-m", "flows.cli", "--root", str(workspace), "run", "--data", str(tree), "--holdout", *holdout]
    for s in sets:
        cmd += ["-S", s]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=workspace, check=True, env=os.environ | {"PYTHONPATH": str(workspace)})
    ev = json.loads((workspace / "reports/metrics/evaluate.json").read_text())
    per = ev["per_domain"]
    return {"heldout": {d: per[d]["acc"] for d in holdout},
            "seen": {d: v["acc"] for d, v in per.items() if v["kind"] == "seen"}, "wall_s": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tree", required=True)
    ap.add_argument("--holdout", nargs="+", required=True)
    ap.add_argument("--workspace", required=True, help="a scratch clone of this repository")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=15, help="plain loops' epochs (the finetune stage's default)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--backbone", default="resnet10t", help="plain loops' timm model")
    ap.add_argument("--weights", default=None, help="plain loops' starting weights: empty = random, imagenet = the package's")
    ap.add_argument("--image-size", type=int, default=None, help="plain loops' input size (default: the images' own)")
    ap.add_argument("--no-pipeline", action="store_true",
                    help="only the plain loops, on the manifest of the run already in --workspace")
    ap.add_argument("--no-randconv", action="store_true", help="skip the loop with RandConv")
    args = ap.parse_args()
    torch.set_num_threads(2)
    tree, ws = Path(args.tree).resolve(), Path(args.workspace).resolve()
    rows: dict[str, list[dict]] = {"mdpipe run (default params)": [], "plain timm loop": [], "plain loop + RandConv": []}
    if args.no_pipeline:
        del rows["mdpipe run (default params)"]
    if args.no_randconv:
        del rows["plain loop + RandConv"]
    start = dict(backbone=args.backbone, weights=args.weights, size=args.image_size)
    for seed in args.seeds:
        if not args.no_pipeline:
            rows["mdpipe run (default params)"].append(pipeline_run(ws, tree, args.holdout, seed))
            print(rows["mdpipe run (default params)"][-1], flush=True)
        # the same manifest as the run (splits come from content hashes, the same for every seed)
        frame = pd.read_csv(ws / "data/manifest.csv", dtype={"label": str, "domain": str}, keep_default_na=False)
        for name, rc in (("plain timm loop", False), ("plain loop + RandConv", True)):
            if name in rows:
                t0 = time.perf_counter()
                rows[name].append(plain_loop(frame, ws / "data/raw", args.holdout, seed, args.epochs, args.batch, rc, **start)
                                  | {"wall_s": time.perf_counter() - t0})
                print(name, rows[name][-1], flush=True)
    print(f"| | {' | '.join(args.holdout)} | seen (mean) |\n|---|{'---:|' * (len(args.holdout) + 1)}")
    for name, runs in rows.items():
        cols = [percent_mean_sd([r["heldout"][d] for r in runs]) for d in args.holdout]
        print(f"| {name} | {' | '.join(cols)} | {percent_mean_sd([np.mean(list(r['seen'].values())) for r in runs])} |")
    tag = f"_{args.weights or 'scratch'}_{args.backbone}" if args.no_pipeline else ""
    out = Path(__file__).resolve().parent / "results" / f"heldout_check_{tree.name}{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"tree": str(tree), "holdout": args.holdout, "seeds": args.seeds, "rows": rows,
                               "plain_epochs": args.epochs, "plain_batch": args.batch, "plain_start": start}, indent=2))


if __name__ == "__main__":
    main()
