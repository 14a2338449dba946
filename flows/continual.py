"""``mdpipe experiment continual``: forgetting across a sequence of domain arrivals, as a Prefect flow.

Each seed is one Prefect task run (``flows/continual_cell.train_sequence``): the first domain trains from
random weights, every later one is added to the model (parts copied from the nearest known domain) and
fine-tuned on its own data, with a replay buffer of past data and without (naive). Each finished seed is
saved as JSON under ``reports/experiments/continual/<dataset>/cells/``, keyed by a hash of everything that
decides its result, so a rerun trains only what is missing. That includes the code: the key holds
``flows.cell_cache.code_version()``, a digest of every source file a seed's training imports (mdcore/, the
cell modules), so after a code change every seed trains again; each cell JSON and the report record it
("code <12 hex>").

Outputs in ``reports/experiments/continual/<dataset>/``: ``continual.md`` (the accuracy matrix R, ACC/BWT/FWT
as in GEM, adding a domain against a full retrain, few-shot and test-time normalization), ``continual.json``
(everything), ``metrics.json`` (for ``dvc metrics show``), ``continual.png``; and the report as a Prefect
artifact.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.lodo import cell_hash, dataset_folder

log = logging.getLogger("mdpipe.continual")
PROTOCOL_VERSION = 2  # 2: each seed also adds the last domain to a champion trained on the others at once
DEFAULT_ORDER = {"digits": ["clean", "phone", "ink", "lowlight"], "glyphs": ["sans", "serif", "mono", "roman", "outline"]}


@task(name="continual-prepare-data", cache_policy=NO_CACHE)
def prepare_data(data: str, folder: str, split_seed: int = 0, limit: int | None = None) -> dict:
    """Image root and manifest (every domain split into train / val / gate / test by content hash)."""
    from mdcore.data.io import atomic_write_text
    from mdcore.eval.lodo import BUILTIN_DATASETS, materialize_dataset
    from mdcore.data.manifest import build_manifest, dataset_version, manifest_csv

    folder = Path(folder)
    root = materialize_dataset(data, folder, limit=limit) if data in BUILTIN_DATASETS else Path(data).expanduser().resolve()
    frame = build_manifest(root, val_fraction=0.15, test_fraction=0.2, gate_fraction=0.1, seed=split_seed)
    if frame["domain"].nunique() < 2:
        raise ValueError(f"{root}: a sequence of domain arrivals needs at least 2 domains, "
                         f"found {sorted(frame['domain'].unique())}")
    manifest = folder / "manifest.csv"
    atomic_write_text(manifest, manifest_csv(frame))
    return {"image_root": str(root), "manifest": str(manifest), "dataset_version": dataset_version(frame),
            "domains": sorted(frame["domain"].unique()), "images": len(frame)}


@task(name="continual-sequence", cache_policy=NO_CACHE, task_run_name="domain arrivals | seed {spec[seed]}")
def run_sequence(spec: dict, out_file: str) -> dict:
    from flows.continual_cell import train_sequence
    from mdcore.data.io import atomic_write_json

    result = train_sequence(spec) | {"cell_hash": cell_hash(spec), "code_version": spec.get("code_version")}
    atomic_write_json(out_file, result)
    m = result["arms"]
    log.info("seed %s: BWT replay %+.3f, naive %+.3f; ACC replay %.3f, naive %.3f (%.0f s)", spec["seed"],
             m["replay"]["metrics"]["BWT"], m["naive"]["metrics"]["BWT"], m["replay"]["metrics"]["ACC"],
             m["naive"]["metrics"]["ACC"], result["wall_s"])
    return result


@flow(name="experiment-continual", log_prints=True)
def continual_flow(data: str = "digits", order: list[str] | None = None, seeds: list[int] = [0, 1, 2],  # noqa: B006
                   method: str = "multidomain", epochs: int = 8, add_epochs: int = 3, batch_size: int = 32,
                   replay_fraction: float = 0.05, replay_strategy: str = "reservoir", replay_per_batch: int = 8,
                   few_shot_k: int = 10, few_shot_epochs: int = 20, tolerance: float = 0.02, threads: int = 2,
                   limit: int | None = None, add_mode: str = "joint", joint_lr_scale: float = 0.1,
                   add_warmup_epochs: int | None = None, replay_kd_weight: float = 0.0, add_lr: float | None = None,
                   parts_lr_scale: float = 1.0, joint_epochs: int = 1, merge_alphas: list[float] | None = None,
                   known_stats: str = "updated", finetune_overrides: dict | None = None, root: str = ".") -> dict:
    """Domains of ``data`` (``digits``, ``glyphs`` or a tree path) arrive in ``order`` (default: a fixed
    order for the built-in data, sorted names for a tree). ``epochs``: the first domain's and the full
    retrain's budget; ``add_epochs``: each arrival's; ``replay_fraction`` of past training images kept
    (``replay_strategy``), ``replay_per_batch`` of them in every batch; ``tolerance``: the gate's allowed
    drop per old domain; ``add_mode``: ``joint`` (every weight learns each arrival), ``parts_first`` (the
    new domain's parts alone first at ``parts_lr_scale`` x lr, then ``joint_epochs`` joint epochs at
    ``joint_lr_scale`` x lr) or ``parts`` (the new domain's parts alone, at ``parts_lr_scale`` x lr, for
    every add epoch: the known domains compute exactly as before, as residual adapters (Rebuffi et al.,
    2017) add domains); ``finetune_overrides``: finetune params for every training (e.g. the model's
    ``stage_adapters``, which give a new domain's parts more to learn with); ``add_warmup_epochs``:
    the joint add step's epochs at 0.1 x lr (None: one when add_epochs > 2, as every other training);
    ``replay_kd_weight``: the joint add step also distils the model before the arrival on the replayed
    images (their logits kept, as in dark experience replay); 0 = off; ``add_lr``: the add step's learning
    rate (None: the finetune params' lr, as every other training here); ``merge_alphas``: the joint add
    step's weights then move back toward the model as grown, by the alpha (of these) best on the known
    domains' validation split (weight-space ensembling, as WiSE-FT; the new domain's rows stay trained);
    ``known_stats``: ``frozen`` normalizes the known domains' images by their running statistics during an
    arrival and never updates them (``updated``: by the few replayed images of each batch). Seeds are cached
    by params, data and code (``flows.cell_cache.code_version``, computed once per run): after a change to
    the code a seed's training imports, every seed trains again."""
    from flows.cell_cache import code_version
    from mdcore.continual import REPLAY_STRATEGIES
    from mdcore.models.input_norm import input_size
    from mdcore.data.io import atomic_write_json, atomic_write_text
    from mdcore.eval.lodo import BUILTIN_DATASETS
    from tasks.params import load_params, validate_params
    from tasks.paths import load_paths

    t0 = time.perf_counter()
    if add_mode not in ("joint", "parts_first", "parts"):
        raise ValueError(f"add_mode {add_mode!r}: expected 'joint', 'parts_first' or 'parts'")
    if merge_alphas and (add_mode != "joint" or not all(0.0 <= a <= 1.0 for a in merge_alphas)):
        raise ValueError(f"merge_alphas {merge_alphas}: values in [0, 1], with add_mode 'joint'")
    if add_mode == "parts_first" and not 1 <= joint_epochs < add_epochs:
        raise ValueError(f"joint_epochs {joint_epochs}: parts_first needs 1 <= joint_epochs < add_epochs ({add_epochs})")
    if known_stats not in ("frozen", "updated"):
        raise ValueError(f"known_stats {known_stats!r}: expected 'frozen' or 'updated'")
    if replay_strategy not in REPLAY_STRATEGIES:
        raise ValueError(f"replay_strategy {replay_strategy!r}: expected one of {list(REPLAY_STRATEGIES)}")
    paths = load_paths(root)
    name, folder = dataset_folder(paths, data)
    folder = folder.parent.parent / "continual" / name
    info = prepare_data(data if name in BUILTIN_DATASETS else str(Path(data).expanduser().resolve()), str(folder),
                        limit=limit)
    order = list(order or DEFAULT_ORDER.get(name, info["domains"]))
    if sorted(order) != sorted(set(order)) or not set(order) <= set(info["domains"]) or len(order) < 2:
        raise ValueError(f"order {order}: give at least 2 distinct domains of {data}: {info['domains']}")
    # from random weights: one learning rate for all layers, no freezing schedule (as the LODO cells)
    finetune = load_params("finetune", paths.root / "params").model_dump() | {
        "method": method, "method_hparams": {}, "epochs": epochs, "batch_size": batch_size, "layer_decay": None,
        "gradual_unfreeze_every": 0, "freeze_stages": 0, "adapters_only": False, "early_stopping_patience": 0}
    finetune |= dict(finetune_overrides or {})
    validate_params("finetune", finetune, "continual budget (method, epochs, batch_size, -S finetune.KEY=VALUE)")
    pre = load_params("pretrain", paths.root / "params")
    image_size = input_size(pre.image_size, None, "pretrain.image_size")  # cells train from random init
    code = code_version()  # once per run: the code every seed of this run trains with
    base = {"manifest": info["manifest"], "image_root": info["image_root"], "dataset_version": info["dataset_version"],
            "finetune": {k: v for k, v in finetune.items() if k != "seed"}, "backbone": pre.backbone,
            "image_size": image_size, "threads": threads, "protocol": PROTOCOL_VERSION, "code_version": code,
            "order": order,
            "add_epochs": add_epochs, "replay_fraction": replay_fraction, "replay_strategy": replay_strategy,
            "replay_per_batch": replay_per_batch, "few_shot_k": few_shot_k, "few_shot_epochs": few_shot_epochs,
            "tolerance": tolerance} | ({"add_mode": add_mode} if add_mode != "joint" else {}) | (
                {"joint_lr_scale": joint_lr_scale} if add_mode == "parts_first" else {}) | (
                {"parts_lr_scale": parts_lr_scale} if add_mode != "joint" and parts_lr_scale != 1.0 else {}) | (
                {"joint_epochs": joint_epochs} if add_mode == "parts_first" and joint_epochs != 1 else {}) | (
                {"add_warmup_epochs": add_warmup_epochs} if add_warmup_epochs is not None else {}) | (
                {"replay_kd_weight": replay_kd_weight} if replay_kd_weight else {}) | (
                {"add_lr": add_lr} if add_lr is not None else {}) | (
                {"merge_alphas": sorted(merge_alphas)} if merge_alphas else {}) | (
                {"known_stats": known_stats} if known_stats != "updated" else {})
    results, todo = [], []
    for s in seeds:
        spec = base | {"seed": int(s)}
        out = folder / "cells" / f"seed{int(s)}-{cell_hash(spec)}.json"
        if out.is_file():
            results.append(json.loads(out.read_text()))
        else:
            todo.append((spec, out))
    print(f"continual on {name}: arrivals {' -> '.join(order)}; {len(seeds)} seeds, {len(results)} already done")
    results += [run_sequence(spec, str(out)) for spec, out in todo]
    results.sort(key=lambda r: r["seed"])
    summary = {"dataset": name, "data": data, "dataset_version": info["dataset_version"], "code_version": code,
               "order": order,
               "seeds": [r["seed"] for r in results],
               "config": {k: base[k] for k in ("add_epochs", "replay_fraction", "replay_strategy", "replay_per_batch",
                                               "few_shot_k", "few_shot_epochs", "tolerance", "backbone", "image_size",
                                               "threads")} | {"method": method, "epochs": epochs, "batch_size": batch_size,
                                             "add_mode": add_mode, "add_warmup_epochs": add_warmup_epochs,
                                             "joint_lr_scale": joint_lr_scale, "parts_lr_scale": parts_lr_scale,
                                             "joint_epochs": joint_epochs, "merge_alphas": merge_alphas, "known_stats": known_stats,
                                             "replay_kd_weight": replay_kd_weight, "add_lr": add_lr},
               "aggregate": aggregate(results), "cells_run": len(todo), "cells_cached": len(results) - len(todo),
               "wall_s": round(time.perf_counter() - t0, 1)}
    report = markdown(summary)
    atomic_write_json(folder / "continual.json", summary | {"cells": results})
    atomic_write_json(folder / "metrics.json", metrics(summary))
    atomic_write_text(folder / "continual.md", report)
    plot(summary, folder / "continual.png")
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(key="continual-" + "".join(c if c.isalnum() else "-" for c in name.lower()),
                             markdown=report, description="Forgetting across domain arrivals (GEM R, ACC, BWT, FWT)")
    print(report)
    return summary


def _ms(values) -> dict:
    a = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if not len(a):
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "n": int(len(a))}


def aggregate(cells: list[dict]) -> dict:
    """Mean ± sd over seeds of every number the report shows."""
    out = {"arms": {}}
    for arm in ("replay", "naive"):
        Rs = np.asarray([c["arms"][arm]["R"] for c in cells])
        out["arms"][arm] = {
            "R_mean": Rs.mean(0).tolist(), "R_std": (Rs.std(0, ddof=1) if len(Rs) > 1 else 0 * Rs[0]).tolist(),
            **{k: _ms([c["arms"][arm]["metrics"][k] for c in cells]) for k in ("ACC", "BWT", "FWT")},
            "gate_pass": [sum(c["arms"][arm]["steps"][t]["gate_pass"] for c in cells)
                          for t in range(len(cells[0]["arms"][arm]["steps"]))],
            "add_s": _ms([sum(s["train_s"] for s in c["arms"][arm]["steps"]) / len(c["arms"][arm]["steps"]) for c in cells]),
            "replay_images": [c["arms"][arm]["steps"][-1]["replay_images"] for c in cells],
            "past_images": [c["arms"][arm]["steps"][-1]["past_images"] for c in cells],
        }
    for key in ("add_domain", "add_to_champion", "few_shot", "test_time_norm"):
        fields = [k for k, v in cells[0][key].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        out[key] = {k: _ms([c[key][k] for c in cells]) for k in fields}
    out["add_domain"]["gate_pass"] = sum(c["add_domain"]["gate_pass"] for c in cells)
    out["add_to_champion"]["gate_pass"] = sum(c["add_to_champion"]["gate_pass"] for c in cells)
    out["add_to_champion"]["full_retrain_gate_pass"] = sum(c["add_to_champion"]["full_retrain_gate_pass"] for c in cells)
    out["add_to_champion"]["champion_old_mean"] = _ms([sum(c["add_to_champion"]["champion_row"][:-1]) /
                                                       (len(c["order"]) - 1) for c in cells])
    out["add_to_champion"]["old_mean_after"] = _ms([sum(c["add_to_champion"]["row"][:-1]) / (len(c["order"]) - 1)
                                                    for c in cells])
    out["few_shot"]["gate_pass"] = sum(c["few_shot"]["gate_pass"] for c in cells)
    out["validation"] = validation(cells)
    out["full_retrain"] = {"train_s": _ms([c["full_retrain"]["train_s"] for c in cells]),
                           "row": np.asarray([c["full_retrain"]["row"] for c in cells]).mean(0).tolist()}
    out["n"] = len(cells)
    return out


def validation(cells: list[dict]) -> dict:
    """The validation split after the last arrival (the numbers that may choose an add-step recipe): the old
    domains' mean, worst and largest drop against before the arrival, and the new domain's accuracy; for the
    sequence's replay arm and for the arrival added to the champion. Empty for cells made before it was
    recorded."""
    out = {}
    for way, get in (("sequence", lambda c: c["arms"]["replay"]["steps"][-1]), ("champion", lambda c: c["add_to_champion"])):
        if not all("val_after" in get(c) for c in cells):
            continue
        old = [[d for d in get(c)["val_before"]] for c in cells]
        out[way] = {
            "old_mean": _ms([np.mean([get(c)["val_after"][d] for d in o]) for c, o in zip(cells, old)]),
            "old_worst": _ms([min(get(c)["val_after"][d] for d in o) for c, o in zip(cells, old)]),
            "old_mean_before": _ms([np.mean([get(c)["val_before"][d] for d in o]) for c, o in zip(cells, old)]),
            "old_worst_drop": _ms([max(get(c)["val_before"][d] - get(c)["val_after"][d] for d in o)
                                   for c, o in zip(cells, old)]),
            "new": _ms([get(c)["val_after"][c["order"][-1]] for c in cells]),
            "per_seed": [{"old_mean": float(np.mean([get(c)["val_after"][d] for d in o])),
                          "new": get(c)["val_after"][c["order"][-1]]} for c, o in zip(cells, old)],
        }
    return out


def _f(ms: dict | None, k: float = 100, sign: bool = False) -> str:
    if not ms or ms.get("mean") is None:
        return "-"
    return f"{ms['mean'] * k:{'+' if sign else ''}.1f} ± {ms['std'] * k:.1f}"


def markdown(summary: dict) -> str:
    agg, order, cfg = summary["aggregate"], summary["order"], summary["config"]
    n = agg["n"]
    lines = [f"# Continual learning on {summary['dataset']}: {' → '.join(order)}", "",
             f"Domains arrive one at a time. The first trains `{cfg['method']}` from random weights for "
             f"{cfg['epochs']} epochs; each later one is added to the model (its per-domain parts copied from the "
             f"nearest known domain by feature prototype) and fine-tuned for {cfg['add_epochs']} epochs on its own "
             f"{ {'parts_first': '(its own parts alone first, one joint epoch last) ', 'parts': '(its own parts only: the other domains compute as before) '}.get(cfg.get('add_mode'), '')}"
             f"training images, **with replay** ({cfg['replay_strategy']} buffer of {cfg['replay_fraction']:.0%} of "
             f"the past training images, {cfg['replay_per_batch']} per batch of {cfg['batch_size']}) or **without** "
             f"(naive fine-tuning). Selection: the known domains' validation split. R[i, j] = test accuracy (%) on "
             f"domain j after arrival i (later domains are routed as unknown). ACC, BWT and FWT as in GEM (FWT "
             f"against the untrained model). Mean ± sd over seeds {summary['seeds']}.", ""]
    lines += ["| arm | ACC | BWT | FWT | gate passed per arrival | s per arrival |", "|---|---:|---:|---:|---|---:|"]
    for arm, a in agg["arms"].items():
        lines.append(f"| {arm} | {_f(a['ACC'])} | **{_f(a['BWT'], sign=True)}** | {_f(a['FWT'], sign=True)} | "
                     f"{', '.join(f'{g}/{n}' for g in a['gate_pass'])} | {_f(a['add_s'], 1)} |")
    for arm, a in agg["arms"].items():
        lines += ["", f"R ({arm}):", "", "| after \\ on | " + " | ".join(order) + " |", "|---|" + "---:|" * len(order)]
        for i, d in enumerate(order):
            lines.append(f"| {d} | " + " | ".join(f"{a['R_mean'][i][j] * 100:.1f} ± {a['R_std'][i][j] * 100:.1f}"
                                                for j in range(len(order))) + " |")
    r = agg["arms"]["replay"]
    lines += ["", f"Replay buffer at the last arrival: {r['replay_images']} of {r['past_images']} past training images.",
              "", f"## The last arrival ({order[-1]}) against a full retrain", "",
              f"Full retrain: `{cfg['method']}` from random weights on every domain for {cfg['epochs']} epochs "
              f"({_f(agg['full_retrain']['train_s'], 1)} s). *before*: the model before {order[-1]} arrived, routing "
              f"it as unknown. *recovered*: (method − before) / (full retrain − before).", "",
              "| way | new-domain test acc | vs full retrain | recovered | train s | old domains in gate |",
              "|---|---:|---:|---:|---:|---|"]
    ad, ac, fs, tt = agg["add_domain"], agg["add_to_champion"], agg["few_shot"], agg["test_time_norm"]
    lines += [f"| full retrain | {_f(ad['full_acc'])} | | | {_f(agg['full_retrain']['train_s'], 1)} | |",
              f"| add domain + replay (all its labels) | {_f(ad['acc'])} | {_f(ad['gap'], sign=True)} | | "
              f"{_f(ad['train_s'], 1)} ({_f(ad['time_share'])} % of full) | {ad['gate_pass']}/{n} |",
              f"| added to a champion trained on the other domains at once (+ replay) | {_f(ac['acc'])} | "
              f"{_f(ac['gap'], sign=True)} | | {_f(ac['train_s'], 1)} ({_f(ac['time_share'])} % of full) | "
              f"{ac['gate_pass']}/{n} |",
              f"| few-shot, k = {cfg['few_shot_k']} per class, its parts only | {_f(fs['acc'])} | | "
              f"{_f(fs['recovered'])} % | {_f(fs['train_s'], 1)} | {fs['gate_pass']}/{n} |",
              f"| test-time norm statistics (no labels) | {_f(tt['acc'])} | | {_f(tt['recovered'])} % | "
              f"{_f(tt['s'], 1)} | unchanged |",
              f"| before (routed as unknown) | {_f(fs['before_acc'])} | | 0 | | |"]
    lines += ["", f"*added to a champion*: the model before {order[-1]} arrived is trained on "
                  f"{', '.join(order[:-1])} at once for {cfg['epochs']} epochs (as the pipeline trains its champion; "
                  f"their mean test accuracy {_f(ac['champion_old_mean'])}, after the arrival "
                  f"{_f(ac['old_mean_after'])}), then {order[-1]} is added with the add step above. The full "
                  f"retrain, put to the same gate against that champion, passes it in "
                  f"{ac['full_retrain_gate_pass']}/{n} seeds."]
    if agg.get("validation"):
        lines += ["", f"## Validation split after the last arrival ({order[-1]}): the numbers that may choose", "",
                  "Accuracy (%) on the validation split, with the domain id: the old domains (known before the "
                  "arrival) and the new one. *worst drop*: the old domain that lost most against before the "
                  "arrival, per seed.", "",
                  "| way | old domains before | old domains after | worst old domain after | worst drop | new domain |",
                  "|---|---:|---:|---:|---:|---:|"]
        names = {"sequence": "the sequence, + replay", "champion": "added to a champion trained at once"}
        for way, v in agg["validation"].items():
            lines.append(f"| {names[way]} | {_f(v['old_mean_before'])} | {_f(v['old_mean'])} | {_f(v['old_worst'])} "
                         f"| {_f(v['old_worst_drop'])} | {_f(v['new'])} |")
    lines += ["", f"Gate: each old domain's accuracy on the gate split may drop by at most {cfg['tolerance']}. "
                  f"Budget `{json.dumps(cfg, sort_keys=True)}`"
                  f"{'; code ' + summary['code_version'][:12] if summary.get('code_version') else ''}; "
                  f"{summary['cells_run']} seeds trained in this run, "
                  f"{summary['cells_cached']} reused; wall time {summary['wall_s']:.0f} s."]
    if n < 3:
        lines += ["", "Fewer than 3 seeds: not evidence."]
    return "\n".join(lines) + "\n"


def metrics(summary: dict) -> dict:
    agg = summary["aggregate"]
    out = {arm: {k: a[k]["mean"] for k in ("ACC", "BWT", "FWT")} for arm, a in agg["arms"].items()}
    out["add_domain"] = {k: agg["add_domain"][k]["mean"] for k in ("acc", "full_acc", "gap", "time_share")}
    out["add_to_champion"] = {k: agg["add_to_champion"][k]["mean"] for k in ("acc", "full_acc", "gap", "time_share")}
    out["few_shot"] = {k: agg["few_shot"][k]["mean"] for k in ("acc", "recovered")}
    out["test_time_norm"] = {k: agg["test_time_norm"][k]["mean"] for k in ("acc", "recovered")}
    return out


def plot(summary: dict, out: Path) -> None:
    """Accuracy on each domain as the domains arrive, with and without replay."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order, arms = summary["order"], summary["aggregate"]["arms"]
    fig, axes = plt.subplots(1, len(arms), figsize=(4.2 * len(arms), 3.6), sharey=True)
    for ax, (arm, a) in zip(np.atleast_1d(axes), arms.items()):
        R, S = np.asarray(a["R_mean"]), np.asarray(a["R_std"])
        for j, d in enumerate(order):
            xs = list(range(j, len(order)))
            ax.errorbar(xs, R[j:, j], yerr=S[j:, j], marker="o", capsize=2, label=d)
        ax.set_xticks(range(len(order)), [f"+{d}" for d in order], fontsize=8)
        ax.set_title(f"{arm}: BWT {a['BWT']['mean'] * 100:+.1f}")
        ax.set_ylim(0, 1)
        ax.set_xlabel("after arrival")
    np.atleast_1d(axes)[0].set_ylabel("test accuracy")
    np.atleast_1d(axes)[-1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
