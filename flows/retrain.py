"""Continuous learning: rerun the pipeline when the data changed, and promote the new model to
champion only if no domain gets worse than the current champion on the same evaluation data.

The champion lives in ``registry/champion/`` (outside the DVC graph, written atomically): the last good
model users rely on is never a plain stage output, so a failed or worse run cannot replace it.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from prefect import flow, get_run_logger, task

from flows.pipeline import pipeline
from mdcore.io import atomic_write_json
from mdcore.model import load_model
from mdcore.promotion import decide
from tasks.evaluate import per_domain_accuracy
from tasks.params import load_params
from tasks.paths import load_paths


GATE_SPLITS = ("gate",)


def champion_dir(root: str | Path) -> Path:
    return load_paths(root).registry / "champion"


def data_fingerprint(root: Path) -> str:
    """Cheap identity of the input data: the ingest params plus, for a user tree, each image's path,
    size and modification time (content hashes are the manifest's job)."""
    import hashlib

    params = load_params("ingest", root / "params")
    h = hashlib.sha256(params.model_dump_json().encode())
    if params.data_root:
        for p in sorted(Path(params.data_root).rglob("*")):
            if p.is_file():
                st = p.stat()
                h.update(f"{p.relative_to(params.data_root)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


@task(name="promote-if-no-domain-worse")
def promote(root: str = ".", tolerance: float = 0.0, batch_size: int = 256, candidate: str | None = None,
            lineage: dict | None = None) -> dict:
    """Score champion and candidate (``candidate`` folder, default the finetune stage's model) on the gate
    split of the current data (never trained on, selected on, or reported as test); the candidate becomes
    champion only if no domain is worse by more than ``tolerance``. Every decision is kept with the
    candidate and its ``lineage`` (run id, dataset and code version, params, metrics): a rejected challenger
    stays in the registry with its reason (``flows.champion``)."""
    from flows.champion import record_challenger

    paths = load_paths(root)
    cand_path = Path(candidate) if candidate else paths.finetuned
    scored = per_domain_accuracy(load_model(cand_path), paths, batch_size, splits=GATE_SPLITS)
    cand_acc = dict(zip(scored["domain"], scored["accuracy"]))
    champ_path = champion_dir(paths.root)
    champ_acc = None
    if (champ_path / "model.safetensors").is_file():
        champion = per_domain_accuracy(load_model(champ_path), paths, batch_size, splits=GATE_SPLITS)
        champ_acc = dict(zip(champion["domain"], champion["accuracy"]))
    decision = decide(champ_acc, cand_acc, tolerance)
    record = {"time": time.strftime("%Y%m%d-%H%M%S"), "scored_on": list(GATE_SPLITS), "candidate": cand_acc,
              "champion": champ_acc, "tolerance": tolerance, **(lineage or {}), **asdict(decision)}
    return record_challenger(paths.registry, cand_path, record)


def lineage_of(report: dict) -> dict:
    """What the champion record links: the Prefect run, the run record, data, code, params, metrics."""
    from prefect.runtime import flow_run

    evaluate = report.get("stages", {}).get("evaluate", {}).get("metrics", {})
    return {"run_id": str(flow_run.id) if flow_run.id else None, "run_record": report.get("run_record"),
            "dataset_version": report.get("dataset_version"), "code_version": report.get("code_version"),
            "params": report.get("params"), "metrics": {k: v for k, v in evaluate.items() if k != "per_domain"}
            | {"per_domain": evaluate.get("per_domain")}}


@flow(name="mdpipe-retrain", log_prints=True)
def retrain(root: str = ".", tolerance: float = 0.0, force: bool = False) -> dict:
    """Retrain when the data changed (or ``force``), then promote only if no domain gets worse."""
    logger = get_run_logger()
    paths = load_paths(root)
    state_file = paths.registry / "last_data.json"
    fingerprint = data_fingerprint(paths.root)
    last = json.loads(state_file.read_text())["fingerprint"] if state_file.is_file() else None
    if fingerprint == last and not force and (champion_dir(paths.root) / "model.safetensors").is_file():
        logger.info("data unchanged since the last retraining (%s): nothing to do", fingerprint)
        return {"retrained": False, "fingerprint": fingerprint}
    report = pipeline(root=str(paths.root))
    decision = promote(root=str(paths.root), tolerance=tolerance, lineage=lineage_of(report))
    logger.info("promotion: %s (%s)", "promoted" if decision["promote"] else "kept the champion", decision["reason"])
    atomic_write_json(state_file, {"fingerprint": fingerprint, "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return {"retrained": True, "fingerprint": fingerprint, "promotion": decision,
            "dataset_version": report.get("dataset_version")}
