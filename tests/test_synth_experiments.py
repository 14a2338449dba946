"""The with/without-synthetic experiment: arms, seeds, aggregation and the report (a fake runner stands
in for the Ray Train finetune; the real one is exercised by the finetune tests)."""
import json

import pytest

from flows.experiments import compare_synthetic, experiment_dir
from tasks.params import apply_overrides
from tasks.paths import load_paths
from tasks.stage import execute


def test_compare_synthetic_runs_both_arms_per_seed_and_writes_the_report(workspace):
    for stage in ("ingest", "validate", "synthesize"):
        execute(stage, workspace)
    apply_overrides(workspace / "params", {"pretrain": {"enabled": False}})
    execute("pretrain", workspace)
    calls = []

    def fake_runner(root, params, workdir):
        calls.append((params["seed"], params["use_synthetic"], params["epochs"]))
        bonus = 0.1 if params["use_synthetic"] else 0.0
        return {
            "phone": {"kind": "seen", "images": 5, "acc": 0.6 + bonus + 0.01 * params["seed"],
                      "acc_unknown_domain": 0.5},
            "clean": {"kind": "seen", "images": 20, "acc": 0.9, "acc_unknown_domain": 0.9},
            "lowlight": {"kind": "held-out", "images": 90, "acc": 0.4 + bonus / 2, "acc_unknown_domain": 0.4},
            "_finetune": {"epochs": params["epochs"], "val_acc": 0.8},
        }

    summary = compare_synthetic(workspace, seeds=(0, 1, 2), overrides={"epochs": 1}, runner=fake_runner)
    assert sorted(calls) == sorted((s, flag, 1) for s in (0, 1, 2) for flag in (True, False))
    rows = summary["aggregate"]["domains"]
    assert rows["phone"]["kind"] == "scarce" and rows["lowlight"]["kind"] == "held-out"
    assert rows["phone"]["with_synthetic"]["mean"] == pytest.approx(0.71)
    assert rows["phone"]["with_synthetic"]["std"] == pytest.approx(0.01)
    assert rows["phone"]["difference"]["mean"] == pytest.approx(0.1)
    assert rows["lowlight"]["difference"]["mean"] == pytest.approx(0.05)
    out = experiment_dir(load_paths(workspace))
    assert json.loads((out / "synthetic.json").read_text())["inputs"]["scarce_domains"] == ["phone"]
    md = (out / "synthetic.md").read_text()
    assert "| phone | scarce |" in md and "0.710 ± 0.010" in md and "| lowlight | held-out |" in md


def test_compare_synthetic_needs_the_upstream_stages(workspace):
    with pytest.raises(FileNotFoundError, match="pretrain"):
        compare_synthetic(workspace, seeds=(0,), runner=lambda *a: {})
