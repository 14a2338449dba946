"""One cell of the leave-one-domain-out protocol: train (method, held-out domain, seed) in this process
with the finetune stage's own builders and loop, select on training-domain validation, score.

The cell's result is a small JSON-able dict; ``flows/lodo.py`` runs the cells (as Prefect tasks, and as
Ray tasks when there are cores or a cluster to spare) and writes the table.
"""
from __future__ import annotations

import time
from pathlib import Path

from mdcore.data.decode import DEFAULT_RESIZE
from mdcore.train import Callback

_IMAGES: dict = {}  # decoded once per process: manifest path -> (frame, ImageSet of every row)


def _all_images(manifest: str, image_root: str, size: int, resize: str = DEFAULT_RESIZE):
    import pandas as pd

    from mdcore.data.images import load_images
    from mdcore.data.manifest import class_names

    key = (manifest, image_root, size, resize)
    if key not in _IMAGES:
        frame = pd.read_csv(manifest, dtype={"label": str, "domain": str}, keep_default_na=False)
        data = load_images(frame, {"real": Path(image_root)}, size, sorted(frame["domain"].unique()),
                           class_names(frame), resize=resize)
        _IMAGES.clear()
        _IMAGES[key] = (frame, data)
    return _IMAGES[key]


def _subset(frame, data, rows, domains: list[str]):
    """The ImageSet of ``rows`` (a slice of ``frame``) with domain indices in the cell's order
    (the held-out domain, unknown to the model, gets -1)."""
    import torch

    from mdcore.data.images import ImageSet

    pos = torch.as_tensor(frame.index.get_indexer(rows.index), dtype=torch.long)
    index = {d: i for i, d in enumerate(domains)}
    doms = torch.tensor([index.get(d, -1) for d in rows["domain"]], dtype=torch.long)
    return ImageSet(data.images[pos], data.labels[pos], doms, list(domains), data.class_names)


class OracleScore(Callback):
    """After each epoch's validation: the held-out domain's own val rows, routed (prototypes from a fixed
    sample of training images), recorded as ``heldout_val_acc``. Reference only: it never selects."""

    def __init__(self, model, oracle, proto, heldout: str):
        self.model, self.oracle, self.proto, self.heldout = model, oracle, proto, heldout

    def on_validated(self, epoch: int, metrics: dict) -> None:
        from mdcore.data.images import to_float
        from mdcore.eval.scoring import evaluate_split

        if self.model.adapters is not None or self.model.routes_inside_backbone:
            self.model.fit_prototypes(to_float(self.proto.images), self.proto.domains)
        h = evaluate_split(self.model, self.oracle, [self.heldout] * len(self.oracle), use_domain=False)
        metrics["heldout_val_acc"] = h["acc"]


def train_cell(spec: dict) -> dict:
    """``spec``: manifest, image_root, method, heldout, seed, finetune (FinetuneParams fields), backbone,
    image_size, threads, and optionally backbone_weights (ImageNet weights; default random). Returns held-out accuracy (selected on training-domain validation), the oracle
    accuracy (best epoch on the held-out domain's val rows, scored there: reference only), seen-domain
    test accuracy."""
    import torch

    from mdcore.eval.lodo import cell_rows
    from mdcore.eval.scoring import evaluate_split
    from mdcore.train import fit
    from mdcore.train.setup import build_method, build_model, build_optimizer, fit_config, without_unhosted_parts
    from tasks.params import FinetuneParams

    t0 = time.perf_counter()
    torch.set_num_threads(int(spec.get("threads", 2)))
    # the cell's method replaces the file's: the file's per-domain parts are no request to a method without them
    p = without_unhosted_parts(FinetuneParams.model_validate(
        spec["finetune"] | {"method": spec["method"], "seed": int(spec["seed"])}))
    resize = spec.get("resize", DEFAULT_RESIZE)  # cells keyed before the filter was a choice: bilinear
    frame, data = _all_images(spec["manifest"], spec["image_root"], int(spec["image_size"]), resize)
    rows = cell_rows(frame, spec["heldout"])
    domains = rows.training_domains
    train, val = _subset(frame, data, rows.train, domains), _subset(frame, data, rows.val, domains)
    test, held = _subset(frame, data, rows.test, domains), _subset(frame, data, rows.heldout, domains)
    # the oracle's own selection split: the held-out domain's val rows (DomainBed's test-domain validation)
    oracle = _subset(frame, data, rows.heldout[rows.heldout["split"] == "val"], domains)
    proto = train.subset(torch.randperm(len(train), generator=torch.Generator().manual_seed(0)) < 256)
    assert bool((held.domains == -1).all()) and bool((train.domains >= 0).all()) and bool((val.domains >= 0).all())
    torch.manual_seed(p.seed)
    method = build_method(p)
    model = build_model(p, train, spec["backbone"], int(spec["image_size"]), spec.get("backbone_weights"),
                        method=method, resize=resize)
    optimizer, scheduler = build_optimizer(p, model)
    result = fit(model, method, train, val, fit_config(p, domains), optimizer, scheduler,
                 callbacks=[OracleScore(model, oracle, proto, spec["heldout"])])
    history = [{"epoch": r["epoch"], "train_loss": r["train_loss"], "val_loss": r["val_loss"], "val_acc": r["val_acc"],
                "heldout_val_acc": r["heldout_val_acc"]} for r in result.history]
    selected = result.shipped["selected_epoch"]
    finalized = {k: v for k, v in result.shipped.items() if k != "selected_epoch"}
    seen = evaluate_split(model, test, [domains[d] for d in test.domains])
    final_held = evaluate_split(model, held, [spec["heldout"]] * len(held), use_domain=False)
    return {
        "method": spec["method"], "heldout": spec["heldout"], "seed": int(spec["seed"]),
        "heldout_acc": final_held["acc"], "seen_acc": seen["acc"], "seen_per_domain": seen["per_domain"],
        # oracle: the best epoch on the held-out domain's own val rows, scored there (optimistic; reference only)
        "oracle_heldout_acc": max(r["heldout_val_acc"] for r in history),
        "selected_epoch": selected, "final": finalized, "history": history,
        "train_images": len(train), "heldout_images": len(held),
        "train_s": round(time.perf_counter() - t0, 1),
    }
