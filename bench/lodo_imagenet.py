"""The LODO protocol from ImageNet weights, one cell after another in this process (no Ray, no Prefect run).

Builds each cell's spec as ``flows/lodo.py`` does (the protocol's budget: 8 epochs, batch 32, the params
file's other finetune fields, one lr for all layers, no pretraining stage) and trains it with
``flows.lodo_cell.train_cell`` unchanged; only the starting weights (``--weights``, default ``imagenet``),
backbone and input size differ from the scratch rows. Besides the cell's own result it records the shipped
model's accuracy on the training domains' validation split (the only number a variant may be chosen on).
``--recipe`` (linear_probe, adapters_only, gradual_ld) lays ``bench.bench_transfer``'s recipe fields over
that budget, and ``--set`` has the last word. ``--ssl-epochs N`` first continues pretraining the starting
weights in each cell: N epochs of the pretrain stage's SimCLR loop
(``mdcore.train.contrastive.self_supervised``, ``params/pretrain.yaml``'s settings, the cell's seed and
input normalization) on the cell's training images without their labels (never the held-out domain's),
then the cell fine-tunes from the result. Every finished cell is appended to ``--out`` at once; cells
already there are skipped (resume).

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python -m bench.lodo_imagenet --data digits --seeds 0 1 2 \
        --out bench/results/lodo_imagenet_digits.json --work /tmp/lodo25 --stop-at 16:20
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import time
from pathlib import Path


def _now_utc() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _past(stop_at: str | None) -> bool:
    if not stop_at:
        return False
    h, m = (int(v) for v in stop_at.split(":"))
    now = _now_utc()
    return (now.hour, now.minute) >= (h, m)


def main(argv=None) -> None:
    from bench.bench_transfer import RECIPES  # one definition of the recipes for both benches

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="digits")
    ap.add_argument("--heldout", nargs="*", default=None, help="held-out domains (default: every domain)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--method", default=None, help="default: params/finetune.yaml's method")
    ap.add_argument("--backbone", default="tf_efficientnet_lite0")
    ap.add_argument("--weights", default="imagenet")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--input-norm", default="auto", help="finetune.input_norm of the cells (auto|image|pretrained|none)")
    ap.add_argument("--resize", default="bilinear", help="the cells' resize filter (bilinear: the filter of "
                                                          "the cells recorded before it was a choice)")
    ap.add_argument("--recipe", default="full", choices=[r for r in RECIPES if r not in ("default", "scratch")],
                    help="transfer recipe of bench.bench_transfer: its finetune fields, applied over the protocol's budget")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a finetune field for every cell (e.g. domain_bn=false); the cells form their own variant")
    ap.add_argument("--ssl-epochs", type=int, default=0,
                    help="continued self-supervised pretraining of the starting weights in each cell, on its training images")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default="/tmp/lodo25")
    ap.add_argument("--out", required=True)
    ap.add_argument("--stop-at", default=None, help="HH:MM UTC: launch no new cell from then on")
    ap.add_argument("--max-cells", type=int, default=0, help="stop after this many new cells (0: no limit)")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass

    import mdcore.train as mtrain
    from flows import lodo_cell
    from flows.cell_cache import code_version
    from flows.lodo import PROTOCOL_VERSION, cell_hash, demo_holdout, prepare_data
    from mdcore.data.io import atomic_write_json
    from mdcore.eval import lodo
    from mdcore.eval.scoring import evaluate_split
    from tasks.params import load_params, validate_params
    from tasks.paths import load_paths

    paths = load_paths(".")
    folder = Path(args.work) / args.data
    folder.mkdir(parents=True, exist_ok=True)
    info = prepare_data.fn(args.data, str(folder))  # the flow's own data step, called as a plain function
    domains = info["domains"]
    from tasks.params import parse_overrides

    extra = parse_overrides(args.set, "finetune")["finetune"] if args.set else {}
    variant = "+".join([args.input_norm] + ([f"resize={args.resize}"] if args.resize != "bilinear" else [])
                       + ([f"epochs={args.epochs}"] if args.epochs != 8 else [])
                       + ([f"recipe={args.recipe}"] if args.recipe != "full" else [])
                       + ([f"ssl={args.ssl_epochs}"] if args.ssl_epochs else [])
                       + sorted(f"{k}={v}" for k, v in extra.items()))
    # the protocol's budget, then the recipe's fields, then --set (the last word)
    finetune = load_params("finetune", paths.root / "params").model_dump() | {
        "epochs": args.epochs, "batch_size": args.batch_size, "layer_decay": None, "gradual_unfreeze_every": 0,
        "freeze_stages": 0, "adapters_only": False, "early_stopping_patience": 0,
        "input_norm": args.input_norm} | RECIPES[args.recipe] | extra
    method = args.method or finetune["method"]
    validate_params("finetune", finetune | {"method": method}, "lodo_imagenet budget")
    code = code_version()
    base = {"manifest": info["manifest"], "image_root": info["image_root"], "dataset_version": info["dataset_version"],
            "finetune": {k: v for k, v in finetune.items() if k not in ("seed", "method")},
            "backbone": args.backbone, "image_size": args.image_size, "threads": args.threads,
            **({"resize": args.resize} if args.resize != "bilinear" else {}),
            "protocol": PROTOCOL_VERSION, "code_version": code,
            **({"backbone_weights": args.weights} if args.weights else {})}

    out = Path(args.out)
    record = json.loads(out.read_text()) if out.is_file() else {"cells": []}
    record.update({"dataset": args.data, "dataset_version": info["dataset_version"], "domains": domains,
                   "code_version": code, "method": method,
                   "config": {"epochs": args.epochs, "batch_size": args.batch_size, "lr": finetune["lr"],
                              "threads": args.threads, "backbone": args.backbone,
                              "backbone_weights": args.weights, "image_size": args.image_size}})
    done = {(c["method"], c["heldout"], c["seed"], c.get("variant", c["input_norm"])) for c in record["cells"]}

    # capture the model and validation split that train_cell hands to fit (the cell's code is unchanged)
    captured: dict = {}
    real_fit = mtrain.fit

    def capturing_fit(model, method_, train, val, *a, **kw):
        captured.update(model=model, val=val)
        return real_fit(model, method_, train, val, *a, **kw)

    mtrain.fit = capturing_fit
    new = 0
    for seed in args.seeds:  # seed outer: complete seeds first
        for d in args.heldout or domains:
            if (method, d, seed, variant) in done:
                continue
            if _past(args.stop_at) or (args.max_cells and new >= args.max_cells):
                print(f"stopping before {d} seed {seed}: stop time {args.stop_at} / max cells reached", flush=True)
                _write(record, out, atomic_write_json, lodo, demo_holdout(paths, domains))
                return
            spec = base | {"method": method, "heldout": d, "seed": int(seed)}
            started = _now_utc().strftime("%H:%M:%S")
            captured.clear()
            ssl = {}
            if args.ssl_epochs:
                spec["backbone_weights"], ssl = continue_pretraining(spec, args.ssl_epochs, folder / "ssl", paths)
            result = lodo_cell.train_cell(spec) | ssl
            model, val = captured["model"], captured["val"]
            shipped_val = evaluate_split(model, val, [val.domain_names[i] for i in val.domains])
            result |= {"cell_hash": cell_hash(spec), "code_version": code, "input_norm": args.input_norm,
                       "variant": variant, "recipe": args.recipe,
                       "model_input_norm": model.config.input_norm if hasattr(model, "config") else None,
                       "val_acc_shipped": shipped_val["acc"], "val_loss_shipped": shipped_val["loss"],
                       "val_per_domain_shipped": shipped_val["per_domain"], "started_utc": started,
                       "backbone": args.backbone, "backbone_weights": args.weights, "image_size": args.image_size}
            record["cells"].append(result)
            new += 1
            _write(record, out, atomic_write_json, lodo, demo_holdout(paths, domains))
            print(f"{started} {method} {variant} held out {d} seed {seed}: held-out "
                  f"{result['heldout_acc']:.3f} seen {result['seen_acc']:.3f} val(shipped) {shipped_val['acc']:.3f} "
                  f"selected {result['selected_epoch']} {result['train_s']:.0f} s"
                  + (f" (+ {ssl['ssl_s']:.0f} s continued pretraining)" if ssl else ""), flush=True)
    _write(record, out, atomic_write_json, lodo, demo_holdout(paths, domains))


def continue_pretraining(spec: dict, epochs: int, folder: Path, paths) -> tuple[str, dict]:
    """The cell's starting weights after ``epochs`` of SimCLR on its training images (decoded as the cell
    decodes them), saved as the pretrain stage saves them (safetensors + the pretrained_cfg they expect).
    Returns (the file, what to record)."""
    import torch

    from flows.lodo_cell import _all_images, _subset
    from mdcore.data.decode import DEFAULT_RESIZE
    from mdcore.eval.lodo import cell_rows
    from mdcore.models.input_norm import InputNorm, cfg_norm, resolve
    from mdcore.models.model import create_backbone
    from mdcore.train.contrastive import self_supervised
    from tasks.params import load_params
    from tasks.pretrain import exported_norm, save_backbone

    pre = load_params("pretrain", paths.root / "params")
    resize = spec.get("resize", DEFAULT_RESIZE)
    frame, data = _all_images(spec["manifest"], spec["image_root"], int(spec["image_size"]), resize)
    rows = cell_rows(frame, spec["heldout"])
    train = _subset(frame, data, rows.train, rows.training_domains)
    assert spec["heldout"] not in set(rows.train["domain"])
    t0 = time.perf_counter()
    torch.manual_seed(int(spec["seed"]))
    backbone = create_backbone(spec["backbone"], weights=spec.get("backbone_weights"))
    weights_norm = cfg_norm(getattr(backbone, "pretrained_cfg", None))
    # the input path the cell's model will have (auto: the weights' mean/std, as the pretrain stage's auto)
    kind, mean, std = resolve(spec["finetune"]["input_norm"], weights_norm, "image", spec["backbone"], "input_norm")
    history = self_supervised(backbone, train.images, input_norm=InputNorm(kind, mean, std), epochs=epochs,
                              batch_size=pre.batch_size, lr=pre.lr, weight_decay=pre.weight_decay,
                              seed=int(spec["seed"]), temperature=pre.temperature, domains=train.domains,
                              fourier_mix_prob=pre.fourier_mix_prob, fourier_mix_strength=pre.fourier_mix_strength)
    out = folder / f"{spec['heldout']}_seed{spec['seed']}"
    out.mkdir(parents=True, exist_ok=True)
    weights = save_backbone(out, backbone, spec["backbone"], {
        "pretrained_cfg": exported_norm(kind, mean, std, weights_norm, resize, trained=True)})
    return str(weights), {
        "ssl_epochs": epochs, "ssl_images": len(train), "ssl_s": round(time.perf_counter() - t0, 1),
        "ssl_loss": [round(h["ssl_loss"], 4) for h in history]}


def _write(record, out, atomic_write_json, lodo, choose_without) -> None:
    aggregates = {}
    for norm in sorted({c.get("variant", c["input_norm"]) for c in record["cells"]}):
        cells = [c for c in record["cells"] if c.get("variant", c["input_norm"]) == norm]
        agg = lodo.aggregate(cells, choose_without=choose_without)
        for m, row in agg["table"].items():
            seeds = row["seeds"]
            complete = [s for s in seeds if all(any(c["seed"] == s and c["heldout"] == d and c["method"] == m
                                                    for c in cells) for d in agg["domains"])]
            vals = [sum(c["val_acc_shipped"] for c in cells if c["seed"] == s and c["method"] == m)
                    / len(agg["domains"]) for s in complete]
            row["val_shipped_mean_over_cells"] = lodo._ms(vals) if vals else None
        aggregates[norm] = agg
    record["aggregate"] = aggregates
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, record)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
