"""End to end: `mdpipe run` (Prefect flow, local Ray Train, DVC bookkeeping) on a small unseen tree."""
import json
import os
import re
import subprocess
import sys

from pathlib import Path

import pytest
from dvc.repo import Repo

from mdcore.builtin import BuiltinSpec, materialize
from tasks.params import apply_overrides
from tests.conftest import make_workspace


@pytest.mark.timeout(900)
def test_mdpipe_run_on_a_user_tree_then_dvc_is_in_sync(tmp_path):
    tree = tmp_path / "tree"
    materialize(tree, seed=11, spec=BuiltinSpec(limit=600))
    for old, new in (("clean", "scanner"), ("ink", "notebook"), ("lowlight", "nightcam"), ("phone", "mobile")):
        (tree / old).rename(tree / new)
    ws = make_workspace(tmp_path / "ws", validate={"min_images_per_class": 0})
    cmd = [sys.executable, "-m", "flows.cli", "run", "--data", str(tree), "--holdout", "nightcam",
           "-S", "pretrain.epochs=1", "-S", "finetune.epochs=6", "-S", "finetune.batch_size=32",
           "-S", "finetune.num_workers=2", "-S", "synthesize.target_per_class=8"]
    proc = subprocess.run(cmd, cwd=ws, capture_output=True, text=True, timeout=840)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for word in ("nightcam", "held-out", "scanner", "compressed", "finetune", "Accuracy per domain"):
        assert word in out, word

    evaluation = json.loads((ws / "reports/metrics/evaluate.json").read_text())
    assert evaluation["per_domain"]["nightcam"]["kind"] == "held-out"
    assert evaluation["per_domain"]["scanner"]["kind"] == "seen"
    # learning floor: 10 classes (chance 0.10); a broken loss, optimizer or data path stays near chance
    assert evaluation["mean_seen_acc"] >= 0.3, evaluation["per_domain"]
    assert 0.0 <= evaluation["mean_heldout_acc"] <= 1.0
    compress = json.loads((ws / "reports/metrics/compress.json").read_text())
    variants = compress["variants"]
    assert variants["int8"]["file_bytes"] < 0.4 * variants["fp32"]["file_bytes"]  # a real int8 ONNX file
    assert variants[compress["shipped"]]["accepted"] and (ws / "models/compressed/model.onnx").is_file()
    finetune = json.loads((ws / "reports/metrics/finetune.json").read_text())
    assert finetune["epochs"] == 6 and finetune["num_workers"] == 2
    assert finetune["selected_epoch"] in (1, 2, 3, 4, 5, 6, "average")  # the shipped model is a chosen one
    assert (ws / "models/finetuned/model.safetensors").is_file()
    assert (ws / "reports/finetune/plots/metrics/train_loss.tsv").is_file()
    runs = list((ws / "registry/runs").glob("*.json"))
    assert len(runs) == 1 and json.loads(runs[0].read_text())["dataset_version"]

    with Repo(str(ws)) as repo:
        assert repo.status() == {}  # dvc status: nothing to do, dvc repro is a no-op
    # champion/challenger: the first model becomes champion; the same model again is not worse anywhere
    from flows.retrain import champion_dir, promote

    first = promote.fn(root=str(ws))
    assert first["promote"] and first["reason"] == "no champion yet"
    assert (champion_dir(ws) / "model.safetensors").is_file()
    second = promote.fn(root=str(ws))
    assert second["promote"] and all(abs(d) < 1e-9 for d in second["deltas"].values())
    assert len(list((ws / "registry/decisions").glob("*.json"))) >= 1

    # one changed value in params/finetune.yaml: `dvc repro` reruns finetune and what depends on it
    apply_overrides(ws / "params", {"finetune": {"lr": 0.001}})
    with Repo(str(ws)) as repo:
        stale = {name.rsplit(":", 1)[-1] for name in repo.status()}
    assert stale == {"finetune"}
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    repro = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=ws, capture_output=True, text=True,
                           env=env, timeout=600)
    assert repro.returncode == 0, repro.stdout[-3000:] + repro.stderr[-3000:]
    ran = set(re.findall(r"Running stage '(\w+)'", repro.stdout + repro.stderr))
    assert ran == {"finetune", "evaluate", "compress"}, ran
    with Repo(str(ws)) as repo:
        assert repo.status() == {}
