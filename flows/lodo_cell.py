"""One cell of the leave-one-domain-out protocol: train (method, held-out domain, seed) in this process
with the finetune stage's own builders and loop, select on training-domain validation, score.

The cell's result is a small JSON-able dict; ``flows/lodo.py`` runs the cells (as Prefect tasks, and as
Ray tasks when there are cores or a cluster to spare) and writes the table.
"""
from __future__ import annotations

import copy
import time
from pathlib import Path

_IMAGES: dict = {}  # decoded once per process: manifest path -> (frame, ImageSet of every row)


def _all_images(manifest: str, image_root: str, size: int):
    import pandas as pd

    from mdcore.images import load_images
    from mdcore.manifest import class_names

    key = (manifest, image_root, size)
    if key not in _IMAGES:
        frame = pd.read_csv(manifest, dtype={"label": str, "domain": str}, keep_default_na=False)
        data = load_images(frame, {"real": Path(image_root)}, size, sorted(frame["domain"].unique()),
                           class_names(frame))
        _IMAGES.clear()
        _IMAGES[key] = (frame, data)
    return _IMAGES[key]


def _subset(frame, data, rows, domains: list[str]):
    """The ImageSet of ``rows`` (a slice of ``frame``) with domain indices in the cell's order
    (the held-out domain, unknown to the model, gets -1)."""
    import torch

    from mdcore.images import ImageSet

    pos = torch.as_tensor(frame.index.get_indexer(rows.index), dtype=torch.long)
    index = {d: i for i, d in enumerate(domains)}
    doms = torch.tensor([index.get(d, -1) for d in rows["domain"]], dtype=torch.long)
    return ImageSet(data.images[pos], data.labels[pos], doms, list(domains), data.class_names)


def train_cell(spec: dict) -> dict:
    """``spec``: manifest, image_root, method, heldout, seed, finetune (FinetuneParams fields), backbone,
    image_size, threads. Returns held-out accuracy (selected on training-domain validation), the oracle
    accuracy (best epoch on the held-out domain's val rows, scored there: reference only), seen-domain
    test accuracy."""
    import torch

    from mdcore.images import to_float
    from mdcore.lodo import cell_rows
    from mdcore.sampler import domain_balanced_batches
    from mdcore.train import evaluate_split, finetune_epoch, training_view_batches
    from tasks.model_setup import build_method, build_model, build_optimizer, epoch_kwargs, on_epoch_start
    from tasks.params import FinetuneParams

    t0 = time.perf_counter()
    torch.set_num_threads(int(spec.get("threads", 2)))
    p = FinetuneParams.model_validate(spec["finetune"] | {"method": spec["method"], "seed": int(spec["seed"])})
    frame, data = _all_images(spec["manifest"], spec["image_root"], int(spec["image_size"]))
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
    model = build_model(p, train, spec["backbone"], int(spec["image_size"]), method=method)
    optimizer, scheduler = build_optimizer(p, model)
    extra = epoch_kwargs(p, train)
    routes = model.adapters is not None or model.routes_inside_backbone
    history, best, best_state = [], -1.0, None
    for epoch in range(p.epochs):
        scheduler.step(epoch)
        on_epoch_start(p, model, optimizer, epoch)
        batches = domain_balanced_batches(train.domains, p.batch_size, epoch=epoch, seed=p.seed, mix=p.domain_mix)
        stats = finetune_epoch(model, train, optimizer, batches, epoch=epoch, seed=p.seed,
                               label_smoothing=p.label_smoothing, method=method, **extra)
        v = evaluate_split(model, val, [domains[d] for d in val.domains])
        method.end_epoch(model, epoch, v)
        if routes:  # prototypes from training images only: how unknown domains are routed
            model.fit_prototypes(to_float(proto.images), proto.domains)
        h = evaluate_split(model, oracle, [spec["heldout"]] * len(oracle), use_domain=False)
        history.append({"epoch": epoch + 1, "train_loss": stats["loss"], "val_loss": v["loss"], "val_acc": v["acc"],
                        "heldout_val_acc": h["acc"]})
        if v["acc"] > best:  # training-domain validation decides; the held-out numbers are only recorded
            best, best_state = v["acc"], copy.deepcopy(model.state_dict())
    selected = max(history, key=lambda r: r["val_acc"])["epoch"]
    finalized = {}
    if method.selects_checkpoint():
        model.load_state_dict(best_state)
    else:
        finalized = method.finalize(model, lambda: training_view_batches(
            train, method, p.batch_size, seed=p.seed, epoch=10_000, mix=p.domain_mix, generator_seed=p.seed))
        selected = "average"
    if routes:
        model.fit_prototypes(to_float(train.images), train.domains)
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
