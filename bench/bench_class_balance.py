"""finetune.class_balance on a rare class: none vs reweight vs logit_adjust, same data, seeds and budget.

From a workspace after ``make demo``: the seen domains' real training rows, with one class (drawn per seed)
cut to ``--keep`` of its rows in every seen domain; fine-tuned through the project's own setup
(``mdcore.train.setup`` + ``fit``: method, model from the pretrain stage's backbone, AdamW, cosine) for
``--epochs`` epochs, the best training-domain validation epoch shipped. Scored on the seen domains' test
split: the rare class's recall, balanced accuracy and accuracy (means over domains). Reports only.

    OMP_NUM_THREADS=1 python -m bench.bench_class_balance --workspace PATH [--seeds 0 1 2] [--epochs 6]

Writes bench/results/class_balance.json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def run(paths, p, train, val, test, rare: int) -> dict:
    from mdcore.eval.scoring import logits_of
    from mdcore.train import fit
    from mdcore.train.setup import build_method, build_model, build_optimizer, fit_config

    torch.manual_seed(p.seed)
    method = build_method(p)
    model = build_model(p, train, "resnet10t", 32, str(paths.pretrained / "backbone.safetensors"), method)
    optimizer, scheduler = build_optimizer(p, model)
    fit(model, method, train, val, fit_config(p, train.domain_names), optimizer, scheduler)
    preds = logits_of(model, test, 256).argmax(1)
    recall, balanced, acc = [], [], []
    for d in range(len(test.domain_names)):
        m = test.domains == d
        y, yhat = test.labels[m], preds[m]
        per_class = [float((yhat[y == c] == c).float().mean()) for c in range(len(test.class_names)) if (y == c).any()]
        recall.append(float((yhat[y == rare] == rare).float().mean()))
        balanced.append(float(np.mean(per_class)))
        acc.append(float((yhat == y).float().mean()))
    return {"rare_recall": float(np.mean(recall)), "balanced_acc": float(np.mean(balanced)), "acc": float(np.mean(acc))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workspace", type=Path, default=Path("."))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--keep", type=float, default=0.15)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "class_balance.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from mdcore.models.model import load_config
    from tasks.data import image_roots, load_split
    from tasks.params import FinetuneParams
    from tasks.paths import load_paths

    paths = load_paths(args.workspace)
    cfg, _ = load_config(paths.finetuned)
    roots = image_roots(paths.raw, paths.synthetic)
    kw = dict(synthetic=False, domains=cfg.domains, classes=cfg.classes)
    full, _ = load_split(paths.train_manifest, roots, 32, ("train",), **kw)
    val, _ = load_split(paths.train_manifest, roots, 32, ("val",), **kw)
    test, _ = load_split(paths.train_manifest, roots, 32, ("test",), **kw)
    rows = []
    for seed in args.seeds:
        rng = np.random.default_rng(seed)
        rare = int(rng.integers(len(cfg.classes)))
        keep = np.ones(len(full), bool)
        for d in range(len(cfg.domains)):
            idx = np.flatnonzero((full.domains == d).numpy() & (full.labels == rare).numpy())
            keep[rng.choice(idx, len(idx) - max(2, round(args.keep * len(idx))), replace=False)] = False
        train = full.subset(keep)
        for mode in ("none", "reweight", "logit_adjust"):
            p = FinetuneParams(method="multidomain", epochs=args.epochs, seed=seed, class_balance=mode)
            t0 = time.perf_counter()
            row = {"seed": seed, "rare_class": cfg.classes[rare], "mode": mode, "train_images": int(keep.sum()),
                   **run(paths, p, train, val, test, rare), "train_s": round(time.perf_counter() - t0, 1)}
            rows.append(row)
            print(row, flush=True)
    summary = {m: {k: float(np.mean([r[k] for r in rows if r["mode"] == m])) for k in ("rare_recall", "balanced_acc", "acc")}
               for m in ("none", "reweight", "logit_adjust")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"epochs": args.epochs, "keep": args.keep, "rows": rows, "mean": summary}, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
