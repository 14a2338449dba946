"""The whole DAG as one Prefect flow: ingest -> validate -> synthesize -> pretrain -> label_issues ->
finetune -> evaluate -> compress. Each step is the stage's Prefect task (the same code ``dvc repro`` runs); a stage
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
from mdcore.data.io import atomic_write_json
from mdcore.data.workspace_lock import workspace_lock
from tasks.compress import compress_task
from tasks.evaluate import evaluate_task
from tasks.finetune import finetune_task
from tasks.ingest import ingest_task
from tasks.label_issues import label_issues_task
from tasks.params import (CompressParams, EvaluateParams, FinetuneParams, IngestParams, LabelIssuesParams, PretrainParams,
                          SynthesizeParams, ValidateParams, load_params, merge_fields, params_kept_on_failure,
                          write_params)
from tasks.paths import load_paths
from tasks.preflight import check_run, data_choice
from tasks.pretrain import pretrain_task
from tasks.source import source_task
from tasks.stage import STAGES
from tasks.synthesize import synthesize_task
from tasks.validate import validate_task

STAGE_TASKS = {
    "ingest": ingest_task, "validate": validate_task, "synthesize": synthesize_task, "pretrain": pretrain_task,
    "label_issues": label_issues_task, "finetune": finetune_task, "evaluate": evaluate_task, "compress": compress_task,
}


class PipelineParams(BaseModel):
    """Every stage's parameters: the run form of the Prefect UI. What runs is written to params/*.yaml."""

    ingest: IngestParams = Field(default_factory=IngestParams, description="ingest stage")
    validate_: ValidateParams = Field(default_factory=ValidateParams, alias="validate", description="validate stage")
    synthesize: SynthesizeParams = Field(default_factory=SynthesizeParams, description="synthesize stage")
    pretrain: PretrainParams = Field(default_factory=PretrainParams, description="pretrain stage")
    label_issues: LabelIssuesParams = Field(default_factory=LabelIssuesParams, description="label_issues stage")
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


class QuickSettings(BaseModel):
    """The settings users change most, first in the run form; each one left empty keeps params/*.yaml."""

    data_root: str | None = Field(None, description="Your image folder, laid out as ROOT/DOMAIN/CLASS/IMAGE "
                                  "(ingest.data_root); empty keeps the params file")
    holdout_domains: list[str] | None = Field(None, description="Domains kept out of training, to measure "
                                              "transfer (ingest.holdout_domains)")
    epochs: int | None = Field(None, ge=1, description="Fine-tuning epochs (finetune.epochs)")
    num_workers: int | None = Field(None, ge=1, description="Ray Train workers (finetune.num_workers)")

    def apply(self, params: "PipelineParams", root: str | Path = ".") -> "PipelineParams":
        """``params`` with the settings given here; ``data_root`` acts as ``mdpipe run --data`` does (a folder's
        held-out domains are none unless given; a built-in name picks that dataset)."""
        ingest = data_choice(self.data_root, Path(root)) if self.data_root is not None else {}
        if self.holdout_domains is not None:
            ingest["holdout_domains"] = self.holdout_domains
        finetune = {k: v for k, v in {"epochs": self.epochs, "num_workers": self.num_workers}.items() if v is not None}
        for stage, fields in {"ingest": ingest, "finetune": finetune}.items():
            if fields:
                current = params.stage(stage)
                setattr(params, stage, current.model_validate({**current.model_dump(), **fields}))
        return params


def changed_fields(shown: dict, submitted: dict) -> dict:
    """The fields of ``submitted`` that differ from ``shown`` (nested mappings compared key by key)."""
    out = {}
    for key, value in submitted.items():
        before = shown.get(key)
        if isinstance(value, dict) and isinstance(before, dict):
            inner = changed_fields(before, value)
            if inner:
                out[key] = inner
        elif value != before:
            out[key] = value
    return out


def run_params(quick: QuickSettings | None, params: PipelineParams | None, params_dir: Path,
               form_defaults: dict | None = None) -> PipelineParams:
    """What a run uses: ``params/*.yaml`` as they are now, with what the run was given laid over them.

    From a deployment's run form (``form_defaults``: the deployment's own ``params``, what the form showed),
    only the fields the user changed apply, so a form opened before the files changed cannot reset them;
    ``params`` passed in code apply whole. ``quick`` applies last."""
    files = PipelineParams.from_files(params_dir)
    if params is None:
        params = files
    elif form_defaults is not None:
        submitted = params.model_dump(mode="json", by_alias=True)
        try:
            shown = PipelineParams.model_validate(form_defaults).model_dump(mode="json", by_alias=True)
        except ValueError:
            shown = form_defaults
        merged = files.model_dump(mode="json", by_alias=True)
        for stage, fields in changed_fields(shown, submitted).items():
            merged[stage] = merge_fields(merged[stage], fields)
        params = PipelineParams.model_validate(merged)
    if quick is not None:
        params = quick.apply(params, params_dir.parent)
    return params


def form_parameters(root: str) -> dict:
    """A deployment's parameters: what the run form opens on (the quick settings empty, every stage as
    ``params/*.yaml`` has it; invalid files are refused here). :func:`run_params` applies only what changed."""
    files = PipelineParams.from_files(Path(root) / "params")
    return {"root": root, "quick": QuickSettings().model_dump(mode="json"),
            "params": files.model_dump(mode="json", by_alias=True)}


def record_failed_run(flow, flow_run, state) -> None:
    """on_failure hook: a failed run leaves a run record saying where and why it failed. It never touches
    the champion (registry/champion), and DVC keeps the last good outputs of the stages that failed."""
    root = Path((flow_run.parameters or {}).get("root", "."))
    try:
        paths = load_paths(root)
    except Exception:  # noqa: BLE001 - a hook must not mask the run's own error
        return
    record = {"state": "failed", "flow_run_id": str(flow_run.id), "flow_run_name": flow_run.name,
              "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "message": state.message,
              "code_version": code_version(paths.root)}
    atomic_write_json(paths.registry / "runs" / f"{time.strftime('%Y%m%d-%H%M%S')}-failed.json", record)


@flow(name="mdpipe-pipeline", log_prints=True, on_failure=[record_failed_run])
def pipeline(quick: QuickSettings | None = None, params: PipelineParams | None = None, root: str = ".",
             force: bool = False, wait_if_busy: bool = True) -> dict:
    """Run every stage in order; skip the ones DVC reports up to date unless ``force``.

    ``quick`` (data, held-out domains, epochs, workers) and ``params`` (every stage) override
    params/*.yaml, which keep what ran. One run at a time per workspace: a second one waits
    (``wait_if_busy``) or is refused."""
    logger = get_run_logger()
    paths = load_paths(root)
    from prefect.runtime import flow_run as current

    with workspace_lock(paths.root, f"pipeline flow run {current.name}", wait=wait_if_busy, log=logger.warning):
        return _run_stages(quick, params, paths, force, logger)


def deployment_form_params() -> dict | None:
    """The ``params`` the run form showed: those of the deployment this run came from (None outside one)."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.runtime import deployment

    if not deployment.id:
        return None
    with get_client(sync_client=True) as client:
        return (client.read_deployment(UUID(deployment.id)).parameters or {}).get("params")


def _run_stages(quick, params, paths, force, logger) -> dict:
    params = run_params(quick, params, paths.root / "params", deployment_form_params() if params is not None else None)
    check_run(params, paths.root)  # before any params file is written
    logger.info("training %s at %d px (pretrain.image_size) on %s", params.pretrain.backbone,
                params.pretrain.image_size, params.ingest.data_root or f"the built-in {params.ingest.builtin}")
    with params_kept_on_failure(paths.root / "params", log=logger.warning):
        for name in STAGES:
            if write_params(name, params.stage(name), paths.root / "params"):
                logger.info("params/%s.yaml updated from the run's parameters", name)
        return _run_checked(paths, force, logger)


def _run_checked(paths, force, logger) -> dict:
    params = PipelineParams.from_files(paths.root / "params")
    report = {"stages": {}, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    report["source"] = source_task(root=str(paths.root))  # the data's listing: ingest is stale if it changed
    dvc_sync.record(paths.root, "source")
    for name in STAGES:
        if not force and not dvc_sync.is_stale(paths.root, name):
            logger.info("stage %s is up to date (dvc status): skipped", name)
            metrics = json.loads(paths.metrics_file(name).read_text())
            report["stages"][name] = {"ran": False, "wall_s": 0.0, "metrics": metrics}
            continue
        metrics = STAGE_TASKS[name](root=str(paths.root), params=params.stage(name))  # read once, above
        dvc_sync.record(paths.root, name)
        report["stages"][name] = {"ran": True, "wall_s": metrics["wall_s"], "metrics": metrics}
    report["state"] = "completed"
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
    lines += ["", "Evaluation report (per class, calibration, selective prediction, per domain): "
              f"`{ev.get('report', 'reports/evaluate/index.html')}`"]
    return "\n".join(lines)
