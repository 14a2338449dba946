"""finetune: train the multi-domain model with Ray Train (``TorchTrainer``, DDP over N workers).

Local Ray by default; with ``RAY_ADDRESS`` set, the job joins that cluster. Every epoch rank 0 reports
a checkpoint (safetensors: model, optimizer, epoch); a restarted worker group resumes from it. The job
itself (workers, training loop, ``fit``) is ``tasks/finetune_ray.py``; this module is the stage: it ships
the selected model, the dvclive curves and the metrics, and wraps it as a Prefect task.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from prefect import task

from mdcore.data.io import atomic_dir
from mdcore.models.model import CONFIG, STARTING_WEIGHTS, WEIGHTS
from tasks.finetune_ray import fit
from tasks.params import StageParams, FinetuneParams
from tasks.paths import Paths
from tasks.stage import StageResult, execute

log = logging.getLogger("mdpipe.finetune")


def retire_run(run_path: str) -> str:
    """A finished run moves aside, so the same inputs later train afresh. Its record (per-epoch progress,
    Ray's checkpoint list) stays for inspection; its checkpoints go: the stage has shipped the selected
    model, and at about 100 MB each, kept checkpoints of every finished run filled users' disks."""
    done = Path(run_path).with_name(f"{Path(run_path).name}-done-{time.strftime('%Y%m%d-%H%M%S')}")
    Path(run_path).rename(done)
    drop_finished_checkpoints(done.parent)
    return str(done)


def drop_finished_checkpoints(storage: Path) -> int:
    """Delete the checkpoint folders of every retired run in Ray's storage (also those left by versions
    that kept them); an unfinished run keeps its own, since a retry resumes from them. Returns bytes freed."""
    freed = 0
    for folder in storage.glob("*-done-*/checkpoint_*"):
        if folder.is_dir():
            freed += sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
            shutil.rmtree(folder, ignore_errors=True)
    if freed:
        log.info("freed %.0f MB of finished runs' checkpoints in %s", freed / 1e6, storage)
    return freed


def write_live(history: list[dict], folder: Path) -> None:
    """Per-epoch curves through dvclive (``dvc plots show`` draws them); no DVC experiment is saved."""
    from dvclive import Live

    class CurvesOnly(Live):
        """dvclive's metric files without its DVC and Git lookup: the stage saves no experiment and writes
        no dvc.yaml (the project's declares the plots), and the lookup fails in a Git repository with no
        commit yet (``git init``, then a first run: dvclive 3.49 asks Git for HEAD before it checks)."""

        def _init_dvc(self):
            pass

    with CurvesOnly(dir=str(folder), save_dvc_exp=False, dvcyaml=None, report=None) as live:
        for row in history:
            for key, value in row.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    live.log_metric(key, value, plot=True)
            live.next_step()


def starting_weights(paths: Paths, params: FinetuneParams) -> dict:
    """Where the fine-tuned backbone started (the model card's licence and source line): the pretrain
    stage's record of its starting weights, with its self-supervised epochs; random when not used."""
    pre = json.loads((paths.pretrained / "config.json").read_text())
    if not (params.init_from_pretrain and pre.get("pretrained", False)):
        return {"kind": "random"}
    return {**pre.get("weights_source", {"kind": "unrecorded"}),
            "self_supervised_epochs": pre.get("self_supervised_epochs", 0)}


def run(params: FinetuneParams, paths: Paths, kill_at_epoch: int | None = None) -> StageResult:
    """``kill_at_epoch`` (tests only) SIGKILLs the last worker after that many epochs, once per run."""
    t0 = time.perf_counter()
    result = fit(params, paths, kill_at_epoch)
    if result.checkpoint is None:
        raise RuntimeError(f"finetune: Ray Train returned no checkpoint (error: {result.error})")
    with result.checkpoint.as_directory() as folder:
        folder = Path(folder)
        history = json.loads((folder / "history.json").read_text())
        with atomic_dir(paths.finetune_live) as tmp:  # first: a failure here leaves the last model in place
            write_live(history, tmp)
        with atomic_dir(paths.finetuned) as tmp:
            for name in (WEIGHTS, CONFIG):
                shutil.copyfile(folder / "model" / name, tmp / name)
            (tmp / "history.json").write_text(json.dumps(history, indent=2) + "\n")
            (tmp / STARTING_WEIGHTS).write_text(json.dumps(starting_weights(paths, params), indent=2) + "\n")
    last = history[-1]
    metrics = {
        "epochs": len(history),
        "num_workers": params.num_workers,
        "train_loss": last["train_loss"],
        "train_acc": last["train_acc"],
        "val_acc": last["val_acc"],
        "selected_epoch": last.get("shipped/selected_epoch"),
        "best_val_acc": max(r["val_acc"] for r in history),
        "method": params.method,
        **{k.split("/", 1)[1]: v for k, v in last.items() if k.startswith("shipped/") and k != "shipped/selected_epoch"},
        "images_per_s": sum(r["images_per_s"] for r in history) / len(history),
        "fit_wall_s": round(time.perf_counter() - t0, 2),
        "restarts": max(r.get("attempt", 0) for r in history),
        "weights_max_diff_across_workers": last.get("weights_max_diff_across_workers"),
        "domain_mix": params.domain_mix,
        "precision": params.precision,
        "ray_storage": retire_run(result.path),
    }
    return StageResult({"model": str(paths.finetuned), "live": str(paths.finetune_live)}, metrics)


def transient(task, task_run, state) -> bool:
    """Retry a failure of Ray or of the machine (a lost worker, node or connection): the retry finds the
    same Ray run and resumes from its last checkpoint. A bad parameter or bad data fails at once."""
    try:
        state.result(raise_on_failure=True)
    except Exception as e:  # noqa: BLE001 - classify, never raise from here
        module = type(e).__module__ or ""
        return module.startswith("ray") or isinstance(e, (ConnectionError, TimeoutError))
    return False


@task(name="finetune", retries=1, retry_delay_seconds=5, retry_condition_fn=transient)
def finetune_task(root: str = ".", params: StageParams | None = None) -> dict:
    """Prefect task: the finetune stage (a Ray Train job); retried once on a transient failure."""
    return execute("finetune", root, params)
