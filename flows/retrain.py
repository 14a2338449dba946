"""Continuous learning: when the data changed, fine-tune the champion on the new data plus replay (warm
start, ``flows/warm_start.py``) or rerun the pipeline, and promote the new model to champion only if no
domain gets worse than the current champion on the same evaluation data.

The champion lives in ``registry/champion/`` (outside the DVC graph, written atomically): the last good
model users rely on is never a plain stage output, so a failed or worse run cannot replace it. Every
scored challenger is kept with its lineage and the decision (``flows/champion.py``).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from prefect import flow, get_run_logger, task

from flows.champion import parts_steps_in_a_row
from flows.pipeline import pipeline
from flows.warm_start import TRAINED_ON, trained_rows
from mdcore.data.io import atomic_write_json, sha256_file
from mdcore.eval.calibration import CALIBRATION_FILE
from mdcore.models.model import load_model
from mdcore.eval.promotion import decide
from mdcore.data.workspace_lock import workspace_lock
from tasks.evaluate import per_domain_accuracy
from tasks.params import load_params
from tasks.paths import load_paths


GATE_SPLITS = ("gate",)


def champion_dir(root: str | Path) -> Path:
    return load_paths(root).registry / "champion"


def data_fingerprint(root: Path) -> str:
    """Cheap identity of the input data: the ingest params plus the source stage's listing of a user tree
    (each file's path, size and modification time; content hashes are the manifest's job)."""
    import hashlib

    from tasks.source import fingerprint

    params = load_params("ingest", root / "params")
    listing = json.dumps(fingerprint(params, root), sort_keys=True)
    return hashlib.sha256((params.model_dump_json() + listing).encode()).hexdigest()[:16]


@task(name="promote-if-no-domain-worse")
def promote(root: str = ".", tolerance: float = 0.0, batch_size: int = 256, candidate: str | None = None,
            lineage: dict | None = None) -> dict:
    """Score champion and candidate (``candidate`` folder, default the finetune stage's model) on the gate
    split of the current data (never trained on, selected on, or reported as test); the candidate becomes
    champion only if no domain is worse by more than ``tolerance`` and, with ``continual.max_class_recall_drop``,
    no domain's worst-class recall fell by more than that (``mdcore.eval.promotion``). Every decision is kept with the
    candidate and its ``lineage`` (run id, dataset and code version, params, metrics): a rejected challenger
    stays in the registry with its reason (``flows.champion``)."""
    from flows.champion import record_challenger

    paths = load_paths(root)
    cand_path = Path(candidate) if candidate else paths.finetuned
    scored = per_domain_accuracy(load_model(cand_path), paths, batch_size, splits=GATE_SPLITS)
    cand_acc = dict(zip(scored["domain"], scored["accuracy"]))
    champ_path = champion_dir(paths.root)
    champ_acc, champ_domains, champion = None, [], None
    if (champ_path / "model.safetensors").is_file():
        champ_model = load_model(champ_path)
        champ_domains = champ_model.config.domains
        champion = per_domain_accuracy(champ_model, paths, batch_size, splits=GATE_SPLITS)
        champ_acc = dict(zip(champion["domain"], champion["accuracy"]))
    max_recall_drop = gate_recall_drop(paths.root)
    decision = decide(champ_acc, cand_acc, tolerance, champion_worst_recall=worst_class_recall(champion),
                      candidate_worst_recall=worst_class_recall(scored), max_class_recall_drop=max_recall_drop)
    record = {"time": time.strftime("%Y%m%d-%H%M%S"), "scored_on": list(GATE_SPLITS), "candidate": cand_acc,
              "champion": champ_acc, "tolerance": tolerance, "max_class_recall_drop": max_recall_drop,
              "candidate_worst_class": worst_class_recall(scored, with_class=True),
              "champion_worst_class": worst_class_recall(champion, with_class=True),
              **(lineage or {}), **asdict(decision),
              "forgetting": forgetting(champ_acc, cand_acc, champ_domains, load_model(cand_path).config.domains)}
    extra = {}
    if not (cand_path / TRAINED_ON).is_file():  # a finetune-stage model: it saw every training row
        extra[TRAINED_ON] = trained_rows(paths.train_manifest)
    calibration = paths.evaluation / CALIBRATION_FILE  # the evaluate stage's temperatures, if fitted for it
    if calibration.is_file() and json.loads(calibration.read_text()).get("model_sha256") == sha256_file(
            cand_path / "model.safetensors"):
        extra[CALIBRATION_FILE] = json.loads(calibration.read_text())
    return record_challenger(paths.registry, cand_path, record, extra)


def gate_recall_drop(root: Path) -> float | None:
    """``continual.max_class_recall_drop`` (its default where the workspace has no params/continual.yaml)."""
    from tasks.params import ContinualParams

    params = root / "params"
    return (load_params("continual", params) if (params / "continual.yaml").is_file()
            else ContinualParams()).max_class_recall_drop


def worst_class_recall(table, with_class: bool = False) -> dict | None:
    """Per domain of a ``per_domain_accuracy`` table: its worst class's recall (None where no class had
    images), or with ``with_class`` ``{"class": name, "recall": r}`` for the decision record."""
    if table is None:
        return None
    recall = {r.domain: None if r.worst_class_recall != r.worst_class_recall else float(r.worst_class_recall)
              for r in table.itertuples()}
    if not with_class:
        return recall
    return {r.domain: {"class": r.worst_class, "recall": recall[r.domain]} for r in table.itertuples()}


def forgetting(champion: dict[str, float] | None, candidate: dict[str, float], champion_domains: list[str],
               candidate_domains: list[str]) -> dict | None:
    """What each domain the champion knew gains (+) or loses (-) on the gate split; ``BWT`` is their mean
    (GEM's backward transfer from one champion to the next). ``new_domains``: those the candidate learned."""
    if champion is None:
        return None
    per = {d: candidate[d] - champion[d] for d in sorted(champion_domains) if d in candidate and d in champion}
    return {"per_domain": per, "BWT": sum(per.values()) / len(per) if per else None,
            "new_domains": sorted(set(candidate_domains) - set(champion_domains))}


def lineage_of(report: dict) -> dict:
    """What the champion record links: the Prefect run, the run record, data, code, params, metrics."""
    from prefect.runtime import flow_run

    evaluate = report.get("stages", {}).get("evaluate", {}).get("metrics", {})
    return {"run_id": str(flow_run.id) if flow_run.id else None, "run_record": report.get("run_record"),
            "dataset_version": report.get("dataset_version"), "code_version": report.get("code_version"),
            "params": report.get("params"), "metrics": {k: v for k, v in evaluate.items() if k != "per_domain"}
            | {"per_domain": evaluate.get("per_domain")}}


def accept_domains(root: str, names: list[str]) -> list[str]:
    """Let validation accept new domain folders: ``validate.known_domains`` becomes the domains it accepts
    today (the param, else the last accepted profile's) plus ``names``, written to params/validate.yaml so
    DVC sees it. A folder nobody named stays an error (a typo must not become a domain)."""
    from tasks.params import apply_overrides
    from tasks.validate import ProfileRegistry, source_profile_name

    paths = load_paths(root)
    params = load_params("validate", paths.root / "params")
    accepted = ProfileRegistry(paths, params.profile or source_profile_name(paths)).current()
    known = list(params.known_domains or (accepted["domains"] if accepted else []))
    domains = sorted(set(known) | set(names))
    if known:  # with nothing known yet every domain is accepted anyway
        apply_overrides(paths.root / "params", {"validate": {"known_domains": domains}})
    return domains


@task(name="warm-start-from-champion")
def warm_start_task(root: str, out: str) -> dict:
    from flows.warm_start import warm_start

    paths = load_paths(root)
    return warm_start(paths, load_params("continual", paths.root / "params"), out)


DATA_STAGES = ("ingest", "validate", "synthesize")


def warm_retrain(root: str, tolerance: float) -> dict:
    """The data stages (as the pipeline runs them), the warm start into a candidate folder in the registry,
    the gate, and a run record with the forgetting report. ``{"skipped": why}`` if warm start cannot apply."""
    import shutil

    from flows import dvc_sync
    from flows.champion import new_id
    from flows.pipeline import STAGE_TASKS, code_version

    paths = load_paths(root)
    stages = {}
    for name in DATA_STAGES:
        external = name == "ingest" and load_params("ingest", paths.root / "params").data_root
        if external or dvc_sync.is_stale(paths.root, name):
            stages[name] = STAGE_TASKS[name](root=str(paths.root))
            dvc_sync.record(paths.root, name)
        else:
            stages[name] = json.loads(paths.metrics_file(name).read_text())
    run_id = new_id()
    out = paths.registry / "candidates" / run_id
    try:
        result = warm_start_task(str(paths.root), str(out))
        if "skipped" in result:
            return result
        from prefect.runtime import flow_run

        lineage = {"run_id": str(flow_run.id) if flow_run.id else None, "run_record": f"registry/runs/{run_id}.json",
                   "dataset_version": stages["validate"].get("dataset_version"), "code_version": code_version(paths.root),
                   "params": {s: load_params(s, paths.root / "params").model_dump(mode="json")
                              for s in ("continual", "finetune", "ingest")},
                   "trained_by": "warm start", "warm_start": {k: v for k, v in result.items() if k != "history"}}
        decision = promote(root=str(paths.root), tolerance=tolerance, candidate=str(out), lineage=lineage)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    record = {"kind": "warm start", "stages": {n: {"metrics": m} for n, m in stages.items()}, "warm_start": result,
              "promotion": decision, "forgetting": decision.get("forgetting"), **{k: lineage[k] for k in (
                  "dataset_version", "code_version", "params", "run_id")}}
    atomic_write_json(paths.registry / "runs" / f"{run_id}.json", record)
    return {"promotion": decision, "warm_start": result, "dataset_version": lineage["dataset_version"],
            "run_record": str((paths.registry / "runs" / f"{run_id}.json").relative_to(paths.root))}


@flow(name="mdpipe-retrain", log_prints=True)
def retrain(root: str = ".", tolerance: float = 0.0, force: bool = False, warm_start: bool | None = None) -> dict:
    """Retrain when the data changed (or ``force``), then promote only if no domain gets worse. With a
    champion and ``warm_start`` (default: params/continual.yaml), fine-tune the champion on the new data plus
    replay instead of rerunning the pipeline (``flows.warm_start``); the pipeline runs when that cannot
    apply (no champion, new classes, nothing new)."""
    logger = get_run_logger()
    paths = load_paths(root)
    # the whole loop holds the workspace (the pipeline flow and the stages inside take it again for free)
    with workspace_lock(paths.root, "retrain flow", log=logger.warning):
        return _retrain(paths, tolerance, force, warm_start, logger)


def _retrain(paths, tolerance: float, force: bool, warm_start: bool | None, logger) -> dict:
    state_file = paths.registry / "last_data.json"
    fingerprint = data_fingerprint(paths.root)
    last = json.loads(state_file.read_text())["fingerprint"] if state_file.is_file() else None
    if fingerprint == last and not force and (champion_dir(paths.root) / "model.safetensors").is_file():
        logger.info("data unchanged since the last retraining (%s): nothing to do", fingerprint)
        return {"retrained": False, "fingerprint": fingerprint}
    cont = load_params("continual", paths.root / "params")
    warm = cont.warm_start if warm_start is None else warm_start
    in_a_row = parts_steps_in_a_row(paths.registry)
    if warm and cont.full_retrain_after_parts and in_a_row >= cont.full_retrain_after_parts:
        logger.info("the last %d champions added domains by their parts only (full_retrain_after_parts: %d): "
                    "running the whole pipeline, so the shared backbone learns them", in_a_row,
                    cont.full_retrain_after_parts)
        warm = False
    if warm and (champion_dir(paths.root) / "model.safetensors").is_file():
        result = warm_retrain(str(paths.root), tolerance)
        if "promotion" in result:
            atomic_write_json(state_file, {"fingerprint": fingerprint, "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
            return result | {"retrained": True, "fingerprint": fingerprint}
        logger.info("warm start does not apply (%s): running the whole pipeline", result["skipped"])
    report = pipeline(root=str(paths.root))
    decision = promote(root=str(paths.root), tolerance=tolerance, lineage=lineage_of(report))
    logger.info("promotion: %s (%s)", "promoted" if decision["promote"] else "kept the champion", decision["reason"])
    atomic_write_json(state_file, {"fingerprint": fingerprint, "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return {"retrained": True, "fingerprint": fingerprint, "promotion": decision,
            "dataset_version": report.get("dataset_version")}
