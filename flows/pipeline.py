"""The whole DAG as one Prefect flow: ingest -> validate -> synthesize -> pretrain -> finetune ->
evaluate -> compress. Each step is the stage's Prefect task (the same code ``dvc repro`` runs); a stage
DVC reports up to date is skipped, and each stage that ran is recorded in dvc.lock."""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel, Field

from flows import dvc_sync
from mdcore.io import atomic_write_json
from tasks.compress import compress_task
from tasks.evaluate import evaluate_task
from tasks.finetune import finetune_task
from tasks.ingest import ingest_task
from tasks.params import (CompressParams, EvaluateParams, FinetuneParams, IngestParams, PretrainParams,
                          SynthesizeParams, ValidateParams, load_params, write_params)
from tasks.paths import load_paths
from tasks.pretrain import pretrain_task
from tasks.stage import STAGES
from tasks.synthesize import synthesize_task
from tasks.validate import validate_task

STAGE_TASKS = {
    "ingest": ingest_task, "validate": validate_task, "synthesize": synthesize_task, "pretrain": pretrain_task,
    "finetune": finetune_task, "evaluate": evaluate_task, "compress": compress_task,
}


class PipelineParams(BaseModel):
    """Every stage's parameters: the run form of the Prefect UI. What runs is written to params/*.yaml."""

    ingest: IngestParams = Field(default_factory=IngestParams, description="ingest stage")
    validate_: ValidateParams = Field(default_factory=ValidateParams, alias="validate", description="validate stage")
    synthesize: SynthesizeParams = Field(default_factory=SynthesizeParams, description="synthesize stage")
    pretrain: PretrainParams = Field(default_factory=PretrainParams, description="pretrain stage")
    finetune: FinetuneParams = Field(default_factory=FinetuneParams, description="finetune stage")
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams, description="evaluate stage")
    compress: CompressParams = Field(default_factory=CompressParams, description="compress stage")

    model_config = {"populate_by_name": True}

    def stage(self, name: str):
        return getattr(self, "validate_" if name == "validate" else name)

    @classmethod
    def from_files(cls, params_dir: str | Path) -> "PipelineParams":
        return cls(**{("validate_" if s == "validate" else s): load_params(s, params_dir) for s in STAGES})


def code_version(root: Path) -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                 capture_output=True, text=True).stdout.splitlines()
        # dvc.lock and params/*.yaml are written by runs themselves; only code changes make it dirty
        dirty = [line for line in changed if not line[3:].startswith(("dvc.lock", "params/"))]
        return rev.stdout.strip() + ("+dirty" if dirty else "")
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"


@flow(name="mdpipe-pipeline", log_prints=True)
def pipeline(params: PipelineParams | None = None, root: str = ".", force: bool = False) -> dict:
    """Run every stage in order; skip the ones DVC reports up to date unless ``force``."""
    logger = get_run_logger()
    paths = load_paths(root)
    if params is not None:
        for name in STAGES:
            if write_params(name, params.stage(name), paths.root / "params"):
                logger.info("params/%s.yaml updated from the run's parameters", name)
    params = PipelineParams.from_files(paths.root / "params")
    report = {"stages": {}, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for name in STAGES:
        # an external data tree may have changed behind the same path: ingest is cheap, always rerun it
        external = name == "ingest" and params.ingest.data_root
        if not force and not external and not dvc_sync.is_stale(paths.root, name):
            logger.info("stage %s is up to date (dvc status): skipped", name)
            metrics = json.loads(paths.metrics_file(name).read_text())
            report["stages"][name] = {"ran": False, "wall_s": 0.0, "metrics": metrics}
            continue
        metrics = STAGE_TASKS[name](root=str(paths.root))
        dvc_sync.record(paths.root, name)
        report["stages"][name] = {"ran": True, "wall_s": metrics["wall_s"], "metrics": metrics}
    report["dataset_version"] = report["stages"]["validate"]["metrics"].get("dataset_version")
    report["code_version"] = code_version(paths.root)
    report["params"] = params.model_dump(mode="json", by_alias=True)
    run_file = paths.registry / "runs" / f"{time.strftime('%Y%m%d-%H%M%S')}.json"
    atomic_write_json(run_file, report)
    report["run_record"] = str(run_file.relative_to(paths.root))
    create_markdown_artifact(key="mdpipe-summary", markdown=markdown_summary(report),
                             description="Accuracy per domain and stage timings")
    return report


def markdown_summary(report: dict) -> str:
    ev = report["stages"]["evaluate"]["metrics"]
    comp = report["stages"]["compress"]["metrics"]
    lines = ["| domain | kind | images | accuracy | compressed |", "|---|---|---|---|---|"]
    for d, row in ev["per_domain"].items():
        lines.append(f"| {d} | {row['kind']} | {row['images']} | {row['acc']:.3f} | "
                     f"{comp['per_domain'][d]['acc']:.3f} |")
    lines += ["", "| stage | ran | wall s |", "|---|---|---|"]
    lines += [f"| {n} | {s['ran']} | {s['wall_s']:.1f} |" for n, s in report["stages"].items()]
    return "\n".join(lines)
