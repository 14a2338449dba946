"""``mdpipe experiment lodo``: the leave-one-domain-out protocol as a Prefect flow.

Every (method, held-out domain, seed) is a Prefect task run. With cores to spare (more than one cell's
``threads``) or a Ray cluster (``RAY_ADDRESS``), the cells run concurrently as Ray tasks; otherwise one
after another in this process. Each finished cell is saved as JSON under
``reports/experiments/lodo/<dataset>/cells/``, keyed by a hash of everything that decides its result, so a
rerun trains only the cells that are missing (a changed budget, method or dataset makes new cells). That
includes the code: the key holds ``flows.cell_cache.code_version()``, a digest of every source file a cell's
training imports (mdcore/, the cell modules), so after a code change every cell trains again; each cell
JSON and the report record it ("code <12 hex>").

Outputs in ``reports/experiments/lodo/<dataset>/``: ``lodo.md`` (the DomainBed table, plus oracle
selection labelled as such), ``lodo.json`` (everything), ``metrics.json`` (for ``dvc metrics show``),
``lodo.png``; and the table as a Prefect artifact.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

log = logging.getLogger("mdpipe.lodo")

# The protocol's documented budget on 2 cores (BENCHMARKS.md): short runs, the same for every method.
DEFAULT_METHODS = ["erm", "randconv", "multidomain+randconv+swad", "multidomain+randconv+linedraw+swad"]
PROTOCOL_VERSION = 1


def dataset_folder(paths, data: str) -> tuple[str, Path]:
    """(dataset name, its folder under reports/experiments/lodo/)."""
    from mdcore.eval.lodo import BUILTIN_DATASETS

    if data in BUILTIN_DATASETS:
        return data, paths.experiments / "lodo" / data
    tree = Path(data).expanduser().resolve()
    if not tree.is_dir():
        raise FileNotFoundError(f"--data {data}: not a built-in dataset {list(BUILTIN_DATASETS)} nor a folder")
    slug = tree.name + "-" + hashlib.sha256(str(tree).encode()).hexdigest()[:8]
    return slug, paths.experiments / "lodo" / slug


@task(name="lodo-prepare-data", cache_policy=NO_CACHE)
def prepare_data(data: str, folder: str, split_seed: int = 0, limit: int | None = None) -> dict:
    """Image root and protocol manifest (every domain split by content hash) of a dataset."""
    from mdcore.data.io import atomic_write_text
    from mdcore.eval.lodo import BUILTIN_DATASETS, materialize_dataset, protocol_manifest
    from mdcore.data.manifest import dataset_version, manifest_csv

    folder = Path(folder)
    root = materialize_dataset(data, folder, limit=limit) if data in BUILTIN_DATASETS else Path(data).expanduser().resolve()
    frame = protocol_manifest(root, split_seed=split_seed)
    if frame["domain"].nunique() < 2:
        raise ValueError(f"{root}: leave-one-domain-out needs at least 2 domains, found {sorted(frame['domain'].unique())}")
    manifest = folder / "manifest.csv"
    atomic_write_text(manifest, manifest_csv(frame))
    return {"image_root": str(root), "manifest": str(manifest), "dataset_version": dataset_version(frame),
            "domains": sorted(frame["domain"].unique()), "images": len(frame)}


# finetune params that only say how the stage's Ray job runs; a cell trains in one process without them
RUNTIME_ONLY = ("num_workers", "cpus_per_worker", "use_gpu", "max_failures", "loader", "loader_workers",
                "decoded_cache")


def demo_holdout(paths, domains: list[str]) -> list[str]:
    """The domains of this dataset that the workspace's own pipeline reports as held out
    (``ingest.holdout_domains``): a table that chooses a default must not contain them (DESIGN.md)."""
    from tasks.params import load_params

    return [d for d in load_params("ingest", paths.root / "params").holdout_domains if d in domains]


def cell_hash(spec: dict) -> str:
    """Key of a cell: everything that decides its result (not where the data lies, nor threads, nor the
    stage's worker layout and loader, which a cell does not use). The flows put the code version
    (``flows.cell_cache.code_version``) in every spec, so changed code makes new keys."""
    keep = {k: v for k, v in spec.items() if k not in ("manifest", "image_root", "threads")}
    finetune = {k: v for k, v in keep.get("finetune", {}).items() if k not in RUNTIME_ONLY}
    if finetune.get("input_norm") == "auto":  # cells start from random weights: auto is the method's own choice,
        finetune.pop("input_norm")  # which the method name in the key already fixes
    if "finetune" in keep:
        keep["finetune"] = finetune
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:12]


@task(name="lodo-cell", cache_policy=NO_CACHE, task_run_name="{spec[method]} | held out {spec[heldout]} | seed {spec[seed]}")
def run_cell(spec: dict, out_file: str, use_ray: bool) -> dict:
    """Train and score one cell (in this process, or as a Ray task), then save its result."""
    from flows.lodo_cell import train_cell
    from mdcore.data.io import atomic_write_json

    if use_ray:
        import ray

        result = ray.get(ray.remote(train_cell).options(num_cpus=spec["threads"]).remote(spec))
    else:
        result = train_cell(spec)
    result["cell_hash"] = cell_hash(spec)
    result["code_version"] = spec.get("code_version")
    atomic_write_json(out_file, result)
    log.info("cell %s held out %s seed %s: held-out %.3f, seen %.3f (%.0f s)", spec["method"], spec["heldout"],
             spec["seed"], result["heldout_acc"], result["seen_acc"], result["train_s"])
    return result


def _parallel_cells(threads: int, workers: int) -> int:
    if workers > 0:
        return workers
    if os.environ.get("RAY_ADDRESS"):
        return 64  # a cluster: as many as it schedules
    return max(1, (os.cpu_count() or 1) // max(threads, 1))


@flow(name="experiment-lodo", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=64))
def lodo_flow(data: str = "digits", methods: list[str] = DEFAULT_METHODS,  # noqa: B006 (UI form default)
              seeds: list[int] = [0, 1, 2], epochs: int = 8, batch_size: int = 32,  # noqa: B006
              heldout: list[str] | None = None, threads: int = 2, workers: int = 0, limit: int | None = None,
              root: str = ".", finetune_overrides: dict | None = None) -> dict:
    """Leave-one-domain-out over every domain of ``data`` (``digits``, ``glyphs`` or a tree path) for each
    method and seed; ``heldout`` restricts the held-out domains. ``epochs``/``batch_size`` are the budget
    every cell gets (other finetune params from params/finetune.yaml, then ``finetune_overrides``, such as
    ``{"method_hparams": {"linedraw_p": 0.15}}``: they enter every cell's key, so overridden cells never
    mix with others); ``threads`` per cell; ``workers`` cells at once (0: every core / a cluster; more than
    one runs them as Ray tasks). Cells are cached by params, data and code (``flows.cell_cache.code_version``,
    computed once per run): after a change to the code a cell's training imports, every cell trains again."""
    from flows.cell_cache import code_version
    from mdcore.eval import lodo
    from mdcore.data.io import atomic_write_json, atomic_write_text
    from mdcore.models.input_norm import input_size, resize_for, timm_default_norm
    from mdcore.models.model import weights_kind
    from mdcore.methods import method_class
    from tasks.params import load_params, merge_fields, validate_params
    from tasks.paths import load_paths

    t0 = time.perf_counter()
    for m in methods:
        method_class(m)  # an unknown name fails before any training
    paths = load_paths(root)
    name, folder = dataset_folder(paths, data)
    info = prepare_data(data if name in lodo.BUILTIN_DATASETS else str(Path(data).expanduser().resolve()),
                        str(folder), limit=limit)
    domains = info["domains"]
    unknown = sorted(set(heldout or []) - set(domains))
    if unknown:
        raise ValueError(f"heldout {unknown} not among the domains of {data}: {domains}")
    # cells start from random weights: one learning rate for all layers (as a plain loop), no pretraining
    finetune = load_params("finetune", paths.root / "params").model_dump() | {
        "epochs": epochs, "batch_size": batch_size, "layer_decay": None, "gradual_unfreeze_every": 0,
        "freeze_stages": 0, "adapters_only": False, "early_stopping_patience": 0}
    if finetune_overrides:
        finetune = merge_fields(finetune, finetune_overrides)
    for m in methods:  # hyper-parameters must fit every method they are given to
        validate_params("finetune", finetune | {"method": m}, f"lodo budget and overrides for method {m!r}")
    pre = load_params("pretrain", paths.root / "params")
    # cells start from random weights, or from weights that never saw the user's images (ImageNet weights of
    # a package or the hub); never from a pretrain-stage file, which may have seen the held-out domain
    start = pre.backbone_weights if weights_kind(pre.backbone_weights) in ("package", "timm-hub") else None
    weights_cfg = timm_default_norm(pre.backbone) if start else None
    image_size = input_size(pre.image_size, weights_cfg, "pretrain.image_size")
    resize = resize_for(pre.resize, weights_cfg, "pretrain.resize")
    code = code_version()  # once per run: the code every cell of this run trains with
    base = {"manifest": info["manifest"], "image_root": info["image_root"], "dataset_version": info["dataset_version"],
            "finetune": {k: v for k, v in finetune.items() if k not in ("seed", "method")},
            "backbone": pre.backbone, "image_size": image_size, "resize": resize, "threads": threads,
            "protocol": PROTOCOL_VERSION,
            "code_version": code, **({"backbone_weights": start} if start else {})}
    cells_dir = folder / "cells"
    results, todo = [], []
    for m in methods:
        for d in heldout or domains:
            for s in seeds:
                spec = base | {"method": m, "heldout": d, "seed": int(s)}
                out = cells_dir / f"{lodo.cell_key(m.replace('+', '-'), d, s)}-{cell_hash(spec)}.json"
                if out.is_file():
                    results.append(json.loads(out.read_text()))
                else:
                    todo.append((spec, out))
    parallel = min(_parallel_cells(threads, workers), max(len(todo), 1))
    use_ray = parallel > 1
    print(f"LODO on {name}: {len(domains)} domains x {len(methods)} methods x {len(seeds)} seeds; "
          f"{len(results)} cells already done, {len(todo)} to train ({parallel} at a time"
          f"{' as Ray tasks' if use_ray else ', in process'})")
    if use_ray and todo:
        from tasks.finetune_ray import init_ray

        init_ray()
        futures = [run_cell.submit(spec, str(out), True) for spec, out in todo]
        results += [f.result() for f in futures]
    else:
        results += [run_cell(spec, str(out), False) for spec, out in todo]
    summary = {"dataset": name, "data": data, "dataset_version": info["dataset_version"], "code_version": code,
               "domains": domains, "seeds": list(seeds), "methods": list(methods),
               "config": {"epochs": epochs, "batch_size": batch_size, "threads": threads, "backbone": pre.backbone,
                          "backbone_weights": start,
                          "image_size": image_size, "resize": resize, **({"finetune_overrides": finetune_overrides}
                                                            if finetune_overrides else {})},
               "aggregate": lodo.aggregate([r for r in results if r["method"] in methods],
                                           choose_without=demo_holdout(paths, domains)),
               "cells_run": len(todo), "cells_cached": len(results) - len(todo),
               "wall_s": round(time.perf_counter() - t0, 1)}
    table = lodo.markdown(summary, f"Leave-one-domain-out on {name}")
    atomic_write_json(folder / "lodo.json", summary | {"cells": results})
    atomic_write_json(folder / "metrics.json", lodo.metrics(summary))
    atomic_write_text(folder / "lodo.md", table)
    lodo.plot(summary, folder / "lodo.png")
    _publish(table, name)
    print(table)
    return summary


def _publish(table: str, name: str) -> None:
    """The table as a Prefect markdown artifact (shown on the flow run's page in the UI)."""
    from prefect.artifacts import create_markdown_artifact

    key = "lodo-" + "".join(c if c.isalnum() else "-" for c in name.lower())
    create_markdown_artifact(key=key, markdown=table, description="Leave-one-domain-out table")
