"""The baselines a user would write instead of mdpipe, run on the LODO protocol's own cells (same
manifest, same held-out domains, same budget and cores): a plain single-process timm loop (about forty
lines, no per-domain parts) and the same loop with RandConv (about ten lines more).

    python -m bench.lodo_plain_loop --data digits|glyphs|TREE --seeds 0 1 2 [--randconv] [--heldout D ...]
        [--backbone tf_efficientnet_lite0 --weights imagenet --image-size 64] [--out FILE]

The data comes from the protocol's own data step (``flows.lodo.prepare_data``: the same manifest and splits
as the cells). Prints a markdown row per loop and writes bench/results/lodo_plain_<data>[_<weights>].json
(or ``--out``). The last epoch's model is scored, as a plain loop does.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import timm
import torch
import torch.nn.functional as F
from PIL import Image

from mdcore.eval.lodo import percent_mean_sd


def load(frame: pd.DataFrame, root: Path, classes: list[str], size: int | None = None):
    """Images scaled to [-1, 1] (mean/std 0.5: what the ImageNet EfficientNet-Lite0 expects), resized
    (bilinear) to ``size`` when given."""
    def read(p):
        img = Image.open(root / p).convert("RGB")
        return np.asarray(img.resize((size, size), Image.Resampling.BILINEAR) if size else img)

    x = torch.from_numpy(np.stack([read(p) for p in frame["path"]]))
    x = x.permute(0, 3, 1, 2).float() / 127.5 - 1
    return x, torch.tensor([classes.index(c) for c in frame["label"]])


def plain_model(backbone: str, weights: str | None, num_classes: int) -> torch.nn.Module:
    """timm's model with a new head: from random weights, or (``weights="imagenet"``) from the ImageNet weights
    of the installed package, as ``timm.create_model(..., pretrained=True, num_classes=N)`` would online."""
    if not weights:
        return timm.create_model(backbone, num_classes=num_classes)
    from mdcore.models.packaged_weights import find, load_classifier

    model = load_classifier(find(weights, backbone))
    model.reset_classifier(num_classes)
    return model


def randconv(x: torch.Tensor) -> torch.Tensor:
    """Xu et al. (2021), mixing variant: a random 1/3/5/7 conv per batch, blended per image, p = 0.5."""
    k = int(np.random.choice([1, 3, 5, 7]))
    out = F.conv2d(x, torch.randn(3, 3, k, k) / (3 * k * k) ** 0.5, padding=k // 2)
    out = (out - out.mean((1, 2, 3), keepdim=True)) / out.std((1, 2, 3), keepdim=True).clamp(min=1e-4)
    out = out * x.std((1, 2, 3), keepdim=True) + x.mean((1, 2, 3), keepdim=True)
    a = torch.rand(len(x), 1, 1, 1)
    return torch.where(torch.rand(len(x), 1, 1, 1) < 0.5, a * x + (1 - a) * out, x)


def plain_loop(frame, root, heldout: list[str], seed, epochs, batch, use_randconv, backbone: str = "resnet10t",
               weights: str | None = None, size: int | None = None) -> dict:
    """Train on the other domains' train split, score the last epoch: {"heldout": {d: acc}, "seen": {d: acc}}
    (held-out domains on every image, seen domains on their test split)."""
    classes = sorted(frame["label"].unique())
    seen = frame[~frame["domain"].isin(heldout)]
    x, y = load(seen[seen["split"] == "train"], root, classes, size)
    torch.manual_seed(seed), np.random.seed(seed)
    model = plain_model(backbone, weights, len(classes))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * (len(x) // batch))
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x)).split(batch)[: len(x) // batch]:
            xb = randconv(x[idx]) if use_randconv else x[idx]
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad(), loss.backward(), opt.step(), sched.step()
    model.eval()

    def acc(rows):
        xs, ys = load(rows, root, classes, size)
        with torch.no_grad():
            return float(torch.cat([model(xs[i : i + 256]).argmax(1) for i in range(0, len(xs), 256)]).eq(ys).float().mean())

    test = seen[seen["split"] == "test"]
    return {"heldout": {d: acc(frame[frame["domain"] == d]) for d in heldout},
            "seen": {d: acc(test[test["domain"] == d]) for d in sorted(test["domain"].unique())}}


def plain_cell(frame, root, heldout, seed, epochs, batch, use_randconv, **start) -> dict:
    """One LODO cell: ``heldout`` alone held out (``start``: backbone, weights, size of ``plain_loop``)."""
    out = plain_loop(frame, root, [heldout], seed, epochs, batch, use_randconv, **start)
    return {"heldout_acc": out["heldout"][heldout], "seen_acc": float(np.mean(list(out["seen"].values())))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="digits")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--randconv", action="store_true")
    ap.add_argument("--heldout", nargs="+", help="hold out only these domains (default: each in turn)")
    ap.add_argument("--backbone", default="resnet10t")
    ap.add_argument("--weights", default=None, help="imagenet: the installed package's ImageNet weights")
    ap.add_argument("--image-size", type=int, default=None, help="resize (bilinear) to this size")
    ap.add_argument("--work", default="/tmp/lodo_plain", help="where the protocol's data step writes")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from flows.lodo import prepare_data

    info = prepare_data.fn(args.data, str(Path(args.work) / Path(args.data).name))
    frame = pd.read_csv(info["manifest"], dtype={"label": str, "domain": str}, keep_default_na=False)
    root = Path(info["image_root"])
    domains = info["domains"]
    heldout = args.heldout or domains
    start = {"backbone": args.backbone, "weights": args.weights, "size": args.image_size}
    name = "plain timm loop" + (" + RandConv" if args.randconv else "")
    slug = Path(args.data).name + ("_randconv" if args.randconv else "") + (f"_{args.weights}" if args.weights else "")
    out = Path(args.out) if args.out else Path("bench/results") / f"lodo_plain_{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    cells, t0 = [], time.perf_counter()
    for d in heldout:
        for s in args.seeds:
            t = time.perf_counter()
            cells.append({"heldout": d, "seed": s, **plain_cell(frame, root, d, s, args.epochs, args.batch,
                                                               args.randconv, **start),
                          "train_s": time.perf_counter() - t})
            print(cells[-1], flush=True)
            out.write_text(json.dumps({"loop": name, "domains": domains, "heldout": heldout, "cells": cells,
                                       "wall_s": time.perf_counter() - t0, "dataset_version": info["dataset_version"],
                                       "epochs": args.epochs, "batch": args.batch, "threads": args.threads,
                                       "backbone": args.backbone, "weights": args.weights,
                                       "image_size": args.image_size}, indent=2))
    print(f"| {name} | {row(cells, heldout, args.seeds)}")


def row(cells: list[dict], heldout: list[str], seeds: list[int]) -> str:
    """The markdown row: held-out accuracy per domain, their average and the seen average (mean ± sd over seeds)."""
    per_seed = [np.mean([c["heldout_acc"] for c in cells if c["seed"] == s]) for s in seeds]
    seen = [np.mean([c["seen_acc"] for c in cells if c["seed"] == s]) for s in seeds]
    cols = " | ".join(percent_mean_sd([c["heldout_acc"] for c in cells if c["heldout"] == d]) for d in heldout)
    return f"{cols} | **{percent_mean_sd(per_seed)}** | {percent_mean_sd(seen)} |"


if __name__ == "__main__":
    main()
