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
    # what ships: the best validation epoch, or (SWAD, the default) the average of the steps of its window of
    # low-validation-loss epochs, never the first (warm-up); and the shipped model itself predicts the
    # training domains' validation images clearly above chance
    from mdcore.eval.scoring import evaluate_split
    from mdcore.methods import create_method
    from mdcore.models.model import load_model
    from tasks.data import load_split

    last = worker.reports[-1]
    if create_method(params.method, params.method_hparams).selects_checkpoint():
        assert last["shipped/selected_epoch"] == max(worker.reports, key=lambda m: m["val_acc"])["epoch"], last
    else:
        window = last["shipped/swad_window_epochs"]
        assert last["shipped/selected_epoch"] == "average" and window and set(window) <= {2, 3}, last
        steps = sum(m["images"] // params.batch_size for m in worker.reports if m["epoch"] in window)
        assert last["shipped/swad_averaged_steps"] == steps, (last, steps)
    shipped = load_model(tmp_path / "run" / "checkpoint_000003" / "model")
    # random weights (the demo profile): resized bilinearly, in training and in the model's input contract
    assert cfg["resize"] == pre_config["resize"] == shipped.config.resize == "bilinear"
    val, _ = load_split(paths.train_manifest, {"real": paths.raw, "synthetic": paths.synthetic},
                        pre_config["image_size"], ("val",), synthetic=False, domains=shipped.config.domains,
                        classes=shipped.config.classes)
    shipped_acc = evaluate_split(shipped, val, [shipped.config.domains[d] for d in val.domains])["acc"]
    # chance 0.1; seen 0.48 (0.36-0.60 over seeds 0-2, 38 validation images)
    assert shipped_acc >= 0.25, (shipped_acc, [m["val_acc"] for m in worker.reports])

    # resume from the epoch-2 checkpoint: only epoch 3 runs, with the optimizer state restored
    params4 = params.model_copy(update={"epochs": 4, "loader": "stream", "loader_workers": 1})  # on demand
    again = LocalWorker("cpu", tmp_path / "again", resume_from=tmp_path / "run" / "checkpoint_000002")
    train_worker(worker_config(params4, paths, pre_config, use_pretrained=False), again)
    assert [m["epoch"] for m in again.reports] == [3, 4] and again.reports[0]["attempt"] == 1
    assert (tmp_path / "again" / "checkpoint_000002" / "model" / "model.safetensors").is_file()
