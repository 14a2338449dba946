"""The finetune worker function on an explicit device, outside Ray, through the same code path the Ray
workers run (data, model, methods, selection, checkpoints, resume); on a GPU machine the same function
runs with device="cuda" (bench/gpu_check.sh)."""
import json

import pytest
import torch

from tasks.finetune_ray import LocalWorker, train_worker, worker_config
from tasks.params import FinetuneParams
from tasks.paths import load_paths
from tasks.stage import execute
from tests.conftest import make_workspace


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    ws = make_workspace(tmp_path_factory.mktemp("local") / "ws", ingest={"builtin_limit": 300},
                        validate={"min_images_per_class": 0}, pretrain={"enabled": False})
    for stage in ("ingest", "validate", "synthesize", "pretrain"):
        execute(stage, ws)
    return ws


def test_worker_function_learns_on_an_explicit_device_and_resumes_from_its_checkpoint(prepared, tmp_path):
    paths = load_paths(prepared)
    pre_config = json.loads((paths.pretrained / "config.json").read_text())
    params = FinetuneParams(epochs=3, batch_size=32, lr=0.004, num_workers=1, cpus_per_worker=2, seed=0)
    cfg = worker_config(params, paths, pre_config, use_pretrained=False)
    worker = LocalWorker("cpu", tmp_path / "run")
    train_worker(cfg, worker)
    assert [m["epoch"] for m in worker.reports] == [1, 2, 3]
    # learning floors (3 short epochs on 300 digits, 10 classes, chance 0.1): the loss falls and validation
    # accuracy is at least twice chance; a broken loss, optimizer or data path fails both
    assert worker.reports[-1]["train_loss"] < 0.92 * worker.reports[0]["train_loss"], worker.reports
    assert max(m["val_acc"] for m in worker.reports) >= 0.2, worker.reports
    assert worker.reports[-1]["shipped/selected_epoch"] in (1, 2, 3, "average")

    # resume from the epoch-2 checkpoint: only epoch 3 runs, with the optimizer state restored
    params4 = params.model_copy(update={"epochs": 4, "loader": "stream", "loader_workers": 1})  # on demand
    again = LocalWorker("cpu", tmp_path / "again", resume_from=tmp_path / "run" / "checkpoint_000002")
    train_worker(worker_config(params4, paths, pre_config, use_pretrained=False), again)
    assert [m["epoch"] for m in again.reports] == [3, 4] and again.reports[0]["attempt"] == 1
    assert (tmp_path / "again" / "checkpoint_000002" / "model" / "model.safetensors").is_file()
