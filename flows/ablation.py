"""Component ablation: plain ERM (no per-domain parts) vs each per-domain component alone vs the full
model, at the same seeds and budget, on the workspace's data.

Each (variant, seed) trains in this process (no Ray: one worker, ``torch`` threads = ``threads``) with
the finetune stage's own builders (``mdcore.train.setup``) and loop (``mdcore.train.fit``: the best
training-domain validation epoch ships, as in the stage), then is scored per domain on the test split of seen domains and on every image of held-out domains, with
the domain id and without it (unknown-domain routing). Writes ``reports/experiments/ablation.md`` and
``.json`` (mean ± std over seeds). Needs the stages up to ``pretrain`` (``mdpipe run`` or
``dvc repro pretrain``); the workspace's outputs are read, never written.

- plain function: ``run_ablation(root, seeds=(0, 1, 2), epochs=None, variants=None, overrides=None)``
- Prefect flow: ``ablation_flow(root, seeds=[0, 1, 2], ...)`` (each variant x seed is a task run)
- shell: ``python -m flows.ablation --epochs 6 --seeds 0 1 2`` or ``mdpipe experiment ablation``
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Callable

import numpy as np
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

log = logging.getLogger("mdpipe.ablation")

# every per-domain part and training control off: the ERM baseline every variant starts from (the
# multidomain method, so that the finetune default's input and weight-averaging parts do not confound it)
ERM = dict(method="multidomain", method_hparams={}, adapters=False, stage_adapters=[], domain_bn=False, head="linear", supcon_weight=0.0, align="none",
           align_weight=0.0, domain_weighting="uniform", curriculum="none", adapters_only=False, freeze_stages=0,
           gradual_unfreeze_every=0)
COMPONENTS: dict[str, dict] = {
    "adapters": dict(adapters=True),
    "stage_adapters": dict(stage_adapters=[-3, -2]),
    "domain_bn": dict(domain_bn=True),
    "moe_head": dict(head="moe"),
    "supcon": dict(supcon_weight=0.1),
    "coral": dict(align="coral", align_weight=0.1),
    "groupdro": dict(domain_weighting="groupdro"),
}
VARIANTS: dict[str, dict] = {"erm": {}, **COMPONENTS,
                             "full": {k: v for c in COMPONENTS.values() for k, v in c.items()}}
# arms on the shipped finetune params (no ERM reset): one default switched, the rest as shipped; not in the
# default list, named with --variants (e.g. ``--variants shipped no_domain_bn``)
SHIPPED_ARMS: dict[str, dict] = {"shipped": {}, "no_domain_bn": dict(domain_bn=False)}


def list_variants() -> list[str]:
    return list(VARIANTS)


def variant_params(name: str, base: dict) -> dict:
    """FinetuneParams fields of variant ``name``: ``base`` with every component off, then the variant's
    (a ``SHIPPED_ARMS`` name: ``base`` as it is, then the arm's)."""
    if name in SHIPPED_ARMS:
        return base | SHIPPED_ARMS[name]
    if name not in VARIANTS:
        raise ValueError(f"unknown ablation variant {name!r}; known: {list_variants() + list(SHIPPED_ARMS)}")
    return base | ERM | VARIANTS[name]


def load_inputs(root: str | Path) -> dict:
    """Training images (train split), evaluation images (test of seen + all held-out) and the backbone."""
    from tasks.data import image_roots
    from tasks.paths import load_paths

    paths = load_paths(root)
    config_file = paths.pretrained / "config.json"
    missing = [str(p) for p in (paths.train_manifest, config_file) if not p.exists()]
    if missing:
        raise FileNotFoundError(f"the ablation needs {', '.join(missing)}: run the pipeline up to pretrain first "
                                "(mdpipe run, or dvc repro pretrain)")
    pre = json.loads(config_file.read_text())
    roots = image_roots(paths.raw, paths.synthetic)
    return {"paths": paths, "pre": pre, "roots": roots,
            "weights": str(paths.pretrained / "backbone.safetensors") if pre.get("pretrained") else None}


_DATA: dict = {}


def run_variant(root: str, name: str, params: dict, threads: int = 2) -> dict:
    """Train variant ``name`` with ``params`` (FinetuneParams fields) in process; per-domain accuracy."""
    import torch

    from mdcore.eval.scoring import accuracy_by_domain
    from mdcore.data.decode import DEFAULT_RESIZE
    from mdcore.train import fit
    from tasks.data import load_split
    from mdcore.train.setup import build_method, build_model, build_optimizer, fit_config
    from tasks.params import FinetuneParams

    t0 = time.perf_counter()
    torch.set_num_threads(threads)
    p = FinetuneParams.model_validate(params)
    inputs = load_inputs(root)
    size, paths = inputs["pre"]["image_size"], inputs["paths"]
    resize = inputs["pre"].get("resize", DEFAULT_RESIZE)
    key = (str(paths.train_manifest), size, resize, p.use_synthetic)
    if key not in _DATA:  # decoded once per process, shared by every variant and seed
        train, _ = load_split(paths.train_manifest, inputs["roots"], size, ("train",), synthetic=p.use_synthetic,
                              resize=resize)
        val, _ = load_split(paths.train_manifest, inputs["roots"], size, ("val",), synthetic=False,
                            domains=train.domain_names, classes=train.class_names, resize=resize)
        _DATA.clear()
        _DATA[key] = (train, val, *load_split(paths.train_manifest, inputs["roots"], size, ("test", "holdout"),
                                              synthetic=False, domains=train.domain_names, classes=train.class_names,
                                              resize=resize))
    train, val, test, rows = _DATA[key]
    torch.manual_seed(p.seed)
    method = build_method(p)
    model = build_model(p, train, inputs["pre"]["backbone"], size,
                        inputs["weights"] if p.init_from_pretrain else None, method=method, resize=resize)
    optimizer, scheduler = build_optimizer(p, model)
    # the finetune stage's loop and selection: the best training-domain validation epoch ships
    result = fit(model, method, train, val, fit_config(p, train.domain_names), optimizer, scheduler)
    history = result.history
    train_s = time.perf_counter() - t0
    names = list(rows["domain"])
    with_id = accuracy_by_domain(model, test, names, 256, use_domain=True)
    # the seen domains' validation split (what chose the checkpoint, and what may choose a default)
    val_acc = accuracy_by_domain(model, val, [val.domain_names[i] for i in val.domains.tolist()], 256)
    without_id = accuracy_by_domain(model, test, names, 256, use_domain=False)
    counts = rows.groupby("domain").size()
    out = {d: {"kind": "seen" if d in train.domain_names else "held-out", "images": int(counts[d]),
               "acc": with_id[d], "acc_unknown_domain": without_id[d]} | ({"val_acc": val_acc[d]} if d in val_acc else {})
           for d in with_id}
    out["_run"] = {"variant": name, "seed": p.seed, "epochs": p.epochs, "train_s": round(train_s, 1),
                   "s_per_epoch": round(train_s / max(p.epochs, 1), 2), "final_train_loss": history[-1]["train_loss"],
                   "selected_epoch": result.shipped.get("selected_epoch"),
                   "parameters": sum(t.numel() for t in model.parameters())}
    log.info("ablation %s seed %d: %s", name, p.seed,
             ", ".join(f"{d} {v['acc']:.3f}/{v['acc_unknown_domain']:.3f}" for d, v in out.items() if d[0] != "_"))
    return out


def _ms(values) -> dict:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "values": a.tolist()}


def aggregate(results: dict[str, dict[int, dict]]) -> dict:
    """``results[variant][seed][domain]`` -> per variant: per domain and summary (mean seen, worst seen,
    mean held-out; with and without the domain id) as mean/std over seeds."""
    table = {}
    for variant, by_seed in results.items():
        seeds = sorted(by_seed)
        domains = sorted(d for d in by_seed[seeds[0]] if not d.startswith("_"))
        kinds = {d: by_seed[seeds[0]][d]["kind"] for d in domains}
        row = {"domains": {}, "summary": {}}
        for d in domains:
            row["domains"][d] = {"kind": kinds[d], "acc": _ms([by_seed[s][d]["acc"] for s in seeds]),
                                 "acc_unknown_domain": _ms([by_seed[s][d]["acc_unknown_domain"] for s in seeds])}
            if "val_acc" in by_seed[seeds[0]][d]:
                row["domains"][d]["val_acc"] = _ms([by_seed[s][d]["val_acc"] for s in seeds])
        for key in ("acc", "acc_unknown_domain"):
            seen = [[by_seed[s][d][key] for d in domains if kinds[d] == "seen"] for s in seeds]
            held = [[by_seed[s][d][key] for d in domains if kinds[d] == "held-out"] for s in seeds]
            row["summary"][f"mean_seen_{key}"] = _ms([np.mean(v) for v in seen])
            row["summary"][f"worst_seen_{key}"] = _ms([np.min(v) for v in seen])
            if held[0]:
                row["summary"][f"mean_heldout_{key}"] = _ms([np.mean(v) for v in held])
        val = [[by_seed[s][d]["val_acc"] for d in domains if "val_acc" in by_seed[s][d]] for s in seeds]
        if all(val):  # the seen domains' validation split: the columns a default may be chosen on
            row["summary"]["mean_seen_val_acc"] = _ms([np.mean(v) for v in val])
            row["summary"]["worst_seen_val_acc"] = _ms([np.min(v) for v in val])
        row["s_per_epoch"] = _ms([by_seed[s]["_run"]["s_per_epoch"] for s in seeds])
        row["parameters"] = by_seed[seeds[0]]["_run"]["parameters"]
        table[variant] = row
    return table


def _f(ms: dict | None) -> str:
    return "-" if ms is None else f"{ms['mean']:.3f} ± {ms['std']:.3f}"


def write_report(folder: Path, summary: dict) -> None:
    from mdcore.data.io import atomic_write_json, atomic_write_text

    atomic_write_json(folder / "ablation.json", summary)
    agg, seeds = summary["aggregate"], summary["seeds"]
    lines = [
        "# Ablation: per-domain components", "",
        f"Each variant = plain ERM (shared backbone + linear head, no per-domain parts) plus one component; "
        f"`full` = all of them. Same seeds {seeds}, {summary['epochs']} epochs each, trained in process "
        f"(1 worker, {summary['threads']} threads), otherwise `params/finetune.yaml`. Accuracy on the test "
        "split of seen domains and on every image of held-out domains; *routed* = without the domain id "
        "(unknown-domain routing). Mean ± std over seeds. s/epoch is wall time on this machine, other load "
        "included: compare per-step costs with a quiet machine (bench/) before trusting it.", "",
        "*val* = the seen domains' validation split (mean and worst domain): the only columns that may choose "
        "a default; test and held-out columns report only.", "",
        "| variant | mean seen val | worst seen val | mean seen | worst seen | mean held-out | mean seen (routed) "
        "| held-out (routed) | s/epoch | params |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for variant, row in agg.items():
        s = row["summary"]
        lines.append(f"| {variant} | {_f(s.get('mean_seen_val_acc'))} | {_f(s.get('worst_seen_val_acc'))} | "
                     f"{_f(s['mean_seen_acc'])} | {_f(s['worst_seen_acc'])} | "
                     f"{_f(s.get('mean_heldout_acc'))} | {_f(s['mean_seen_acc_unknown_domain'])} | "
                     f"{_f(s.get('mean_heldout_acc_unknown_domain'))} | {row['s_per_epoch']['mean']:.1f} | "
                     f"{row['parameters'] / 1e6:.2f}M |")
    domains = list(next(iter(agg.values()))["domains"])
    lines += ["", "Per domain (with the domain id; held-out domains are always routed):", "",
              "| variant | " + " | ".join(f"{d} ({next(iter(agg.values()))['domains'][d]['kind']})" for d in domains) + " |",
              "|---|" + "---:|" * len(domains)]
    for variant, row in agg.items():
        lines.append(f"| {variant} | " + " | ".join(_f(row["domains"][d]["acc"]) for d in domains) + " |")
    seen = [d for d in domains if "val_acc" in next(iter(agg.values()))["domains"][d]]
    if seen:
        lines += ["", "Per seen domain, validation split:", "", "| variant | " + " | ".join(seen) + " |",
                  "|---|" + "---:|" * len(seen)]
        for variant, row in agg.items():
            lines.append(f"| {variant} | " + " | ".join(_f(row["domains"][d]["val_acc"]) for d in seen) + " |")
    shipped = [k for k in SHIPPED_ARMS if k in agg]
    lines += ["", "Variants: " + "; ".join(f"`{k}` = `{json.dumps(v, sort_keys=True)}`" for k, v in
                                            (VARIANTS | {k: SHIPPED_ARMS[k] for k in shipped}).items() if v)
              + (f" ({', '.join(f'`{k}`' for k in shipped)}: on `params/finetune.yaml` as it is, no ERM reset)"
                 if shipped else ""),
              f"Wall time: {summary['wall_s']:.0f} s."]
    if len(seeds) < 3:
        lines += ["", "Fewer than 3 seeds: not evidence that one variant beats another."]
    atomic_write_text(folder / "ablation.md", "\n".join(lines) + "\n")


def run_ablation(root: str | Path = ".", seeds=(0, 1, 2), epochs: int | None = None,
                 variants: list[str] | tuple[str, ...] | None = None, overrides: dict | None = None,
                 threads: int = 2, runner: Callable[..., dict] | None = None) -> dict:
    """Train and score every variant at every seed; write ``reports/experiments/ablation.{md,json}``.

    ``epochs`` (default: ``params/finetune.yaml``) and ``overrides`` (FinetuneParams fields) apply to every
    variant; ``variants`` defaults to all of ``list_variants()``. ``runner(root, name, params, threads)``
    replaces :func:`run_variant` (a Prefect task, or tests). Returns the summary written to the JSON.
    """
    from tasks.params import load_params, validate_params
    from tasks.paths import load_paths

    t0 = time.perf_counter()
    paths = load_paths(root)
    variants = list(variants or list_variants())
    for v in variants:
        variant_params(v, {})  # unknown names fail before any training
    base = load_params("finetune", paths.root / "params").model_dump() | dict(overrides or {})
    if epochs is not None:
        base["epochs"] = int(epochs)
    validate_params("finetune", base, "ablation overrides")
    runner = runner or run_variant
    results: dict[str, dict[int, dict]] = {v: {} for v in variants}
    runs = []
    for seed in seeds:
        for v in variants:
            out = runner(str(paths.root), v, variant_params(v, base) | {"seed": int(seed)}, threads)
            runs.append(out.pop("_run", {}) | {"variant": v, "seed": int(seed)})
            out["_run"] = runs[-1]
            results[v][int(seed)] = out
    summary = {"seeds": [int(s) for s in seeds], "epochs": base["epochs"], "threads": threads,
               "variants": {v: (VARIANTS | SHIPPED_ARMS)[v] for v in variants},
               "finetune_params": {k: v for k, v in base.items() if k != "seed"},
               "aggregate": aggregate(results), "runs": runs, "wall_s": round(time.perf_counter() - t0, 1)}
    write_report(paths.experiments, summary)
    return summary


@flow(name="experiment-ablation", log_prints=True)
def ablation_flow(root: str = ".", seeds: list[int] = [0, 1, 2],  # noqa: B006 (Prefect form default)
                  epochs: int | None = None, variants: list[str] | None = None,
                  overrides: dict | None = None) -> dict:
    """Prefect flow: :func:`run_ablation`, each (variant, seed) a task run."""
    arm = task(name="ablation-variant", cache_policy=NO_CACHE)(run_variant)
    return run_ablation(root, tuple(seeds), epochs, variants, overrides, runner=arm)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=".")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=None, help="default: params/finetune.yaml")
    parser.add_argument("--variants", nargs="+", default=None, choices=list_variants() + list(SHIPPED_ARMS))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    summary = run_ablation(args.root, tuple(args.seeds), args.epochs, args.variants, threads=args.threads)
    from tasks.paths import load_paths

    print((load_paths(args.root).experiments / "ablation.md").read_text())
    print(f"wall time {summary['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
