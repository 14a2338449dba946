"""The finetune stage as a real Ray Train job: DDP keeps workers in sync, 2 workers match one worker (the
same worker function in the test process), and a killed worker fails the run (no restarts allowed) or is
replaced; either way the run resumes from its last checkpoint and ships what an uninterrupted run ships (the
default method, SWAD's average included)."""
import json
from pathlib import Path

import pytest

from tasks.params import FinetuneParams, apply_overrides
from tasks.paths import load_paths
from tasks.stage import execute


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A workspace with ingest..pretrain done (pretrain off: random init, quick)."""
    from tests.conftest import make_workspace

    ws = make_workspace(tmp_path_factory.mktemp("ft") / "ws", ingest={"builtin_limit": 500},
                        validate={"min_images_per_class": 0},
                        pretrain={"enabled": False, "backbone": "resnet10t"})
    for stage in ("ingest", "validate", "synthesize", "pretrain"):
        execute(stage, ws)
    return ws


# a method without input randomization: 3 short epochs must learn enough to compare layouts
BASE = {"method": "multidomain", "epochs": 3, "batch_size": 64, "lr": 0.003, "seed": 0, "max_failures": 1}


def finetune(ws, kill_at_epoch=None, **overrides):
    from tasks import finetune as stage

    params = FinetuneParams(**(BASE | overrides))
    return stage.run(params, load_paths(ws), kill_at_epoch=kill_at_epoch).metrics


def finetune_in_this_process(ws, out, **overrides) -> dict:
    """The same worker function as one worker in this process (no Ray, no DDP): the last epoch's metrics."""
    from tasks.finetune_ray import LocalWorker, train_worker, worker_config

    paths = load_paths(ws)
    pre_config = json.loads((paths.pretrained / "config.json").read_text())
    worker = LocalWorker("cpu", out)
    train_worker(worker_config(FinetuneParams(**(BASE | overrides)), paths, pre_config, use_pretrained=False), worker)
    return worker.reports[-1]


@pytest.mark.timeout(600)
def test_two_workers_stay_in_sync_and_match_one_worker(prepared, tmp_path):
    two = finetune(prepared, num_workers=2, cpus_per_worker=1)
    assert two["weights_max_diff_across_workers"] == 0.0
    history = json.loads((load_paths(prepared).finetuned / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2, 3]
    one = finetune_in_this_process(prepared, tmp_path / "one", num_workers=1, cpus_per_worker=2)
    # same global batch and number of steps: the same accuracy within noise (3 epochs on 500 images)
    assert abs(two["val_acc"] - one["val_acc"]) < 0.15, (one["val_acc"], two["val_acc"])
    assert abs(two["train_loss"] - one["train_loss"]) < 0.25


def test_retiring_a_run_drops_finished_checkpoints_and_keeps_unfinished_ones(tmp_path):
    from tasks.finetune import retire_run

    def run_with_checkpoints(name):
        for i in range(2):
            (tmp_path / name / f"checkpoint_{i}").mkdir(parents=True)
            (tmp_path / name / f"checkpoint_{i}" / "model.safetensors").write_bytes(b"x" * 1000)
        (tmp_path / name / "progress.jsonl").write_text("{}\n")
        return tmp_path / name

    old_finished = run_with_checkpoints("finetune-aaaa-done-20260101-000000")  # left by an older version
    unfinished = run_with_checkpoints("finetune-bbbb")  # a failed run a retry will resume
    retired = Path(retire_run(str(run_with_checkpoints("finetune-cccc"))))
    assert retired.name.startswith("finetune-cccc-done-") and (retired / "progress.jsonl").is_file()
    assert not list(retired.glob("checkpoint_*")) and not list(old_finished.glob("checkpoint_*"))
    assert len(list(unfinished.glob("checkpoint_*"))) == 2


def test_a_scaling_config_this_machine_cannot_run_is_a_clear_error(prepared):
    with pytest.raises(ValueError, match="num_workers x finetune.cpus_per_worker"):
        finetune(prepared, num_workers=64, cpus_per_worker=1)


def _shipped(ws) -> dict:
    from safetensors.torch import load_file

    return load_file(str(load_paths(ws).finetuned / "model.safetensors"))


@pytest.mark.timeout(900)
def test_killed_workers_fail_or_restart_the_run_and_it_ships_the_uninterrupted_runs_weights(prepared):
    """The shipped default method (SWAD's weight average) as a 2-worker Ray job, killed twice:
    - a worker killed with no restarts allowed fails the run, and the last good model stays;
    - the retry (Prefect's task retry, or the flow started again) finds the same Ray run and resumes from its
      last checkpoint; a worker killed in it is replaced (``max_failures`` 1) and the run resumes again;
    - it ships the weights the uninterrupted run of the same seed ships (SWAD's sums of the epochs before
      each kill restored: ``swad_min_epoch`` 0 averages from the first epoch)."""
    from tasks.params import load_params

    method = load_params("finetune", prepared / "params").method
    assert "swad" in method
    run = {"method": method, "method_hparams": {"swad_min_epoch": 0}, "num_workers": 2, "cpus_per_worker": 1,
           "epochs": 3}
    reference = finetune(prepared, **run)
    assert reference["selected_epoch"] == "average" and reference["restarts"] == 0
    want = _shipped(prepared)
    model_file = load_paths(prepared).finetuned / "model.safetensors"
    before = model_file.read_bytes()
    with pytest.raises(Exception):
        finetune(prepared, kill_at_epoch=1, max_failures=0, **run)  # after the first epoch
    assert model_file.read_bytes() == before
    resumed = finetune(prepared, kill_at_epoch=2, max_failures=1, **run)  # before the last epoch
    history = json.loads((load_paths(prepared).finetuned / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2, 3]
    # epoch 1 comes from the failed run (its checkpoint was restored, not retrained), the last one from a
    # later attempt; the retry's worker was killed (its marker) and the run still finished, so Ray replaced
    # the worker group (a SIGKILL may lose the checkpoint still being registered, whose epoch the
    # restart then redoes: the attempt count is not the number of kills)
    assert history[0]["attempt"] == 0 and history[-1]["attempt"] >= 1 and resumed["restarts"] >= 1, history
    retired = Path(resumed["ray_storage"])
    assert {f.name for f in retired.glob("injected-failure-*")} == {"injected-failure-epoch-1", "injected-failure-epoch-2"}
    assert resumed["selected_epoch"] == "average"
    assert resumed["swad_averaged_steps"] == reference["swad_averaged_steps"]
    assert resumed["swad_window_epochs"] == reference["swad_window_epochs"]
    got = _shipped(prepared)
    worst = max(float((got[k].double() - want[k].double()).abs().max()) for k in want if want[k].numel())
    assert worst <= 1e-5, f"shipped weights differ from the uninterrupted run by {worst}"
    assert "-done-" in resumed["ray_storage"]  # retired: the same inputs next time train afresh
    assert (retired / "progress.jsonl").is_file()  # the record stays, the checkpoints go
    assert not [f for f in retired.glob("checkpoint_*") if f.is_dir()]
