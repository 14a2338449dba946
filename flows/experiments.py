"""Experiments outside the default pipeline.

``compare_synthetic``: does synthetic data help? Finetune (the same Ray Train stage code) with and
without the synthetic rows of ``data/train_manifest.csv`` for several seeds, evaluate each model per
domain (the evaluate stage's code), and write ``reports/experiments/synthetic.md`` and ``.json`` with
accuracy per domain (mean ± std over seeds) for the scarce domains (those with synthetic rows), the other
seen domains and the held-out domains.

The workspace's outputs are read, never written: each arm trains into a temporary folder. Needs the
stages up to ``pretrain`` to have run (``mdpipe run`` or ``dvc repro pretrain``).

- plain function: ``compare_synthetic(root, seeds=(0, 1, 2), overrides={"epochs": 5})``
- Prefect flow: ``compare_synthetic_flow(root, seeds=[0, 1, 2], overrides=None)`` (each arm is a task)
"""
from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from mdcore.data.io import atomic_write_json, atomic_write_text
from mdcore.data.manifest import read_manifest
from tasks.params import FinetuneParams, load_params, validate_params
from tasks.paths import Paths, load_paths

log = logging.getLogger("mdpipe.experiments")
ARMS = {"with_synthetic": True, "without_synthetic": False}


def experiment_dir(paths: Paths) -> Path:
    return paths.experiments


def run_arm(root: str, params: dict, workdir: str) -> dict:
    """Finetune with ``params`` (FinetuneParams fields) into ``workdir`` and evaluate per domain ->
    {domain: {kind, images, acc, acc_unknown_domain}} plus ``_finetune`` (the finetune metrics)."""
    from mdcore.models.model import load_model
    from tasks import finetune
    from tasks.evaluate import per_domain_accuracy

    paths = load_paths(root)
    work = Path(workdir)
    scratch = Paths(paths.root, {**paths.entries, "finetuned": str(work / "finetuned"),
                                 "finetune_live": str(work / "live")})
    p = FinetuneParams.model_validate(params)
    result = finetune.run(p, scratch)
    table = per_domain_accuracy(load_model(scratch.finetuned), scratch, 256)
    out = {r.domain: {"kind": r.kind, "images": int(r.images), "acc": float(r.accuracy),
                      "acc_unknown_domain": float(r.accuracy_unknown_domain)} for r in table.itertuples()}
    out["_finetune"] = {k: result.metrics.get(k) for k in ("epochs", "val_acc", "train_acc", "fit_wall_s")}
    return out


def _check_inputs(paths: Paths) -> dict:
    missing = [str(p.relative_to(paths.root)) for p in (paths.train_manifest, paths.pretrained / "config.json")
               if not p.exists()]
    if missing:
        raise FileNotFoundError(f"compare_synthetic needs {', '.join(missing)}: run the pipeline up to pretrain "
                                "first (mdpipe run, or dvc repro pretrain)")
    frame = read_manifest(paths.train_manifest)
    synthetic = frame[frame["source"] == "synthetic"]
    return {"synthetic_images": int(len(synthetic)),
            "scarce_domains": sorted(synthetic["domain"].unique()),
            "generators": sorted({g.split("(")[0] for g in synthetic["generator"].dropna()})}


def _mean_std(values: list[float]) -> dict:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "values": a.tolist()}


def aggregate(results: dict[str, dict[int, dict]], scarce: list[str]) -> dict:
    """``results[arm][seed][domain]`` -> per domain: kind, and per arm mean/std over seeds, and the
    paired difference (with - without) per seed."""
    arms = list(results)
    seeds = sorted(set.intersection(*(set(results[a]) for a in arms)))
    domains = sorted({d for a in arms for s in seeds for d in results[a][s] if not d.startswith("_")})
    table = {}
    for d in domains:
        first = next(results[a][s][d] for a in arms for s in seeds if d in results[a][s])
        kind = "scarce" if d in scarce else first["kind"]
        row = {"kind": kind, "images": first["images"]}
        for a in arms:
            row[a] = _mean_std([results[a][s][d]["acc"] for s in seeds])
            row[f"{a}_unknown_domain"] = _mean_std([results[a][s][d]["acc_unknown_domain"] for s in seeds])
        if set(ARMS) <= set(arms):
            with_, without = results["with_synthetic"], results["without_synthetic"]
            row["difference"] = _mean_std([with_[s][d]["acc"] - without[s][d]["acc"] for s in seeds])
        table[d] = row
    return {"seeds": seeds, "domains": table}


def _fmt(ms: dict) -> str:
    return f"{ms['mean']:.3f} ± {ms['std']:.3f}"


def write_report(folder: Path, summary: dict) -> None:
    atomic_write_json(folder / "synthetic.json", summary)
    agg = summary["aggregate"]
    lines = [
        "# Synthetic data: with vs without", "",
        f"Finetune with and without the {summary['inputs']['synthetic_images']} synthetic training rows "
        f"(generators: {', '.join(summary['inputs']['generators']) or 'none'}; scarce domains: "
        f"{', '.join(summary['inputs']['scarce_domains']) or 'none'}), seeds {agg['seeds']}; accuracy on the "
        "test split of seen domains and on every image of held-out domains (with the domain id; held-out "
        "domains are routed). Mean ± std over seeds; difference = paired (with − without) per seed.", "",
        "| domain | kind | images | with synthetic | without synthetic | difference |",
        "|---|---|---:|---:|---:|---:|",
    ]
    order = {"scarce": 0, "seen": 1, "held-out": 2}
    for d, row in sorted(agg["domains"].items(), key=lambda kv: (order.get(kv[1]["kind"], 3), kv[0])):
        diff = _fmt(row["difference"]) if "difference" in row else "-"
        lines.append(f"| {d} | {row['kind']} | {row['images']} | {_fmt(row['with_synthetic'])} | "
                     f"{_fmt(row['without_synthetic'])} | {diff} |")
    lines += ["", f"Finetune parameters: `{json.dumps(summary['finetune_params'], sort_keys=True)}`",
              f"Wall time: {summary['wall_s']:.0f} s."]
    if len(agg["seeds"]) < 3:
        lines += ["", "Fewer than 3 seeds: not evidence that one arm beats the other."]
    atomic_write_text(folder / "synthetic.md", "\n".join(lines) + "\n")


def compare_synthetic(root: str | Path = ".", seeds=(0, 1, 2), overrides: dict | None = None,
                      runner: Callable[[str, dict, str], dict] | None = None) -> dict:
    """Finetune + evaluate with and without synthetic rows for each seed; write the report.

    ``overrides``: FinetuneParams fields on top of ``params/finetune.yaml`` (e.g. ``{"epochs": 5,
    "num_workers": 1}``); ``seed`` and ``use_synthetic`` are set per arm. ``runner(root, params, workdir)``
    replaces :func:`run_arm` (tests, or a Prefect task). Returns the summary written to
    ``reports/experiments/synthetic.json``.
    """
    t0 = time.perf_counter()
    paths = load_paths(root)
    inputs = _check_inputs(paths)
    # both arms start from random weights: the pretrained backbone saw the synthetic rows, so starting the
    # "without" arm from it would not remove them (override init_from_pretrain to compare anyway)
    base = (load_params("finetune", paths.root / "params").model_dump() | {"init_from_pretrain": False}
            | dict(overrides or {}))
    validate_params("finetune", base, "compare_synthetic overrides")
    runner = runner or run_arm
    results: dict[str, dict[int, dict]] = {arm: {} for arm in ARMS}
    finetune_runs = []
    for seed in seeds:
        for arm, flag in ARMS.items():
            params = base | {"seed": int(seed), "use_synthetic": flag}
            with tempfile.TemporaryDirectory(prefix=f"mdpipe-exp-{arm}-{seed}-") as work:
                log.info("compare_synthetic: seed %s, %s", seed, arm)
                out = runner(str(paths.root), params, work)
            finetune_runs.append({"seed": int(seed), "arm": arm, **out.pop("_finetune", {})})
            results[arm][int(seed)] = out
    summary = {
        "inputs": inputs,
        "finetune_params": {k: v for k, v in base.items() if k not in ("seed", "use_synthetic")},
        "aggregate": aggregate(results, inputs["scarce_domains"]),
        "runs": finetune_runs,
        "per_seed": results,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    write_report(experiment_dir(paths), summary)
    return summary


@flow(name="experiment-synthetic", log_prints=True)
def compare_synthetic_flow(root: str = ".", seeds: list[int] = [0, 1, 2],  # noqa: B006 (Prefect form default)
                           overrides: dict | None = None) -> dict:
    """Prefect flow: :func:`compare_synthetic`, each (seed, arm) a task run."""
    arm = task(name="finetune-evaluate-arm", cache_policy=NO_CACHE)(run_arm)
    return compare_synthetic(root, tuple(seeds), overrides, runner=arm)
