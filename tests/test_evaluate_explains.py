"""The evaluate stage's Grad-CAM sheets, class balance and label issues: written, linked from the page, in
evaluate.json (strict JSON), a warning in the log and nothing removed; all of it off at 0."""
import json
import logging
import re

import pandas as pd
import torch

from tests.test_classwise import workspace


def run_stage(tmp_path, **params):
    from mdcore.models.model import ModelConfig, MultiDomainModel, save_model
    from tasks import evaluate
    from tasks.params import EvaluateParams
    from tasks.paths import Paths

    paths = workspace(tmp_path)
    paths = Paths(paths.root, paths.entries | {"pretrained": "pretrained"})  # none written: the model's backbone
    torch.manual_seed(0)
    save_model(MultiDomainModel(ModelConfig("test_resnet", ["d1", "d2"], ["0", "1", "2"], adapter_dim=8)), paths.finetuned)
    return paths, evaluate.run(EvaluateParams(batch_size=7, device="cpu", **params), paths)


class Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_sheets_balance_and_label_issues_are_written_linked_and_reported(tmp_path):
    log, seen = logging.getLogger("mdpipe.evaluate"), Collect()
    log.addHandler(seen)
    try:
        paths, out = run_stage(tmp_path, cam_images=2, label_issues_folds=3)
    finally:
        log.removeHandler(seen)
    folder, m = paths.evaluation, out.metrics
    json.dumps(m, allow_nan=False)
    page = (folder / "index.html").read_text()
    images = re.findall(r'<img src="([^"]+)"', page)
    for d in ("d1", "d2", "held"):
        assert f"cam_{d}.png" in images and (folder / f"cam_{d}.png").stat().st_size > 1000
    samples = pd.read_csv(folder / "cam_samples.csv", dtype={"label": str, "predicted": str})
    counts = samples.groupby(["domain", "correct"]).size()
    assert (counts <= 2).all() and set(samples["domain"]) == {"d1", "d2", "held"}
    assert ((samples["label"] == samples["predicted"]) == samples["correct"]).all()
    again = run_stage(tmp_path / "again", cam_images=2, label_issues_folds=3)[0]
    assert pd.read_csv(again.evaluation / "cam_samples.csv")["path"].tolist() == samples["path"].tolist()  # seeded
    balance = pd.read_csv(folder / "class_balance.csv", dtype={"domain": str}).set_index("domain")
    assert balance.loc["d1", ["0", "1", "2"]].tolist() == [4, 4, 4]  # the workspace's train rows by hand
    assert balance.loc["held", ["0", "1", "2"]].tolist() == [10, 10, 10]
    assert m["per_domain"]["d1"]["imbalance_ratio"] == balance.loc["d1", "imbalance_ratio"]
    issues = pd.read_csv(folder / "label_issues.csv")
    assert list(issues.columns)[:6] == ["path", "domain", "label", "split", "sha256", "source"]
    assert set(issues["domain"]) <= {"d1", "d2"} and (issues["split"] == "train").all()
    assert m["label_issues"] == len(issues) and m["label_issue_features"].startswith("finetuned")
    for d in ("d1", "d2"):
        assert {"label_issues", "label_issue_share", "swapped_pairs"} <= set(m["per_domain"][d])
    assert "label_issues.csv" in page and "Class balance" in page
    if len(issues):
        assert "label_issues.png" in images
        assert any("label issues" in m and "nothing was removed" in m for m in seen.messages)
    # a warning only: the training manifest is as it was
    assert pd.read_csv(paths.train_manifest).equals(pd.read_csv(again.train_manifest))


def test_zero_turns_both_off(tmp_path):
    paths, out = run_stage(tmp_path, cam_images=0, label_issues_folds=0)
    names = {p.name for p in paths.evaluation.iterdir()}
    assert not {n for n in names if n.startswith("cam_") or n.startswith("label_issues")}
    assert out.metrics["label_issues"] is None and "class_balance.csv" in names
