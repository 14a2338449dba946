"""The label_issues stage (its own stage, before fine-tuning) and the evaluate stage's Grad-CAM sheets and
class balance: written, linked from the evaluate page, in the metrics (strict JSON), a warning in the log and
nothing removed; off at 0, and skipped (saying why) without a label-free backbone."""
import json
import logging
import re

import pandas as pd
import pytest
import torch

from tests.test_classwise import workspace


def label_free_backbone(paths) -> None:
    """What the pretrain stage writes after self-supervised epochs (here: a random test_resnet, said to
    be pretrained: the mechanics are under test, not the features)."""
    from safetensors.torch import save_file

    from mdcore.models.model import create_backbone
    from tasks.pretrain import BACKBONE_WEIGHTS

    paths.pretrained.mkdir(parents=True)
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in create_backbone("test_resnet").state_dict().items()},
              str(paths.pretrained / BACKBONE_WEIGHTS))
    (paths.pretrained / "config.json").write_text(json.dumps(
        {"backbone": "test_resnet", "image_size": 32, "pretrained": True, "input_norm": "image", "pretrained_cfg": None}))


def run_label_issues(paths, **params):
    from tasks import label_issues
    from tasks.params import LabelIssuesParams

    return label_issues.run(LabelIssuesParams(batch_size=7, device="cpu", **params), paths)


def run_evaluate(paths, **params):
    from mdcore.models.model import ModelConfig, MultiDomainModel, save_model
    from tasks import evaluate
    from tasks.params import EvaluateParams

    torch.manual_seed(0)
    save_model(MultiDomainModel(ModelConfig("test_resnet", ["d1", "d2"], ["0", "1", "2"], adapter_dim=8)), paths.finetuned)
    return evaluate.run(EvaluateParams(batch_size=7, device="cpu", **params), paths)


class Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_label_issues_stage_writes_a_warning_table_that_the_evaluate_page_shows(tmp_path):
    paths = workspace(tmp_path)
    label_free_backbone(paths)
    manifest_before = pd.read_csv(paths.train_manifest)
    log, seen = logging.getLogger("mdpipe.label_issues"), Collect()
    log.addHandler(seen)
    try:
        out = run_label_issues(paths, folds=3)
    finally:
        log.removeHandler(seen)
    m = out.metrics
    json.dumps(m, allow_nan=False)
    issues = pd.read_csv(paths.label_issues / "label_issues.csv")
    assert list(issues.columns)[:6] == ["path", "domain", "label", "split", "sha256", "source"]
    assert set(issues["domain"]) <= {"d1", "d2"} and (issues["split"] == "train").all()
    assert m["issues"] == len(issues) and m["features"].startswith("pretrained") and m["folds"] == 3
    assert set(m["per_domain"]) == {"d1", "d2"}  # seen domains' training rows only
    if len(issues):
        assert (paths.label_issues / "label_issues.png").stat().st_size > 1000
        assert any("label issues" in msg and "nothing was removed" in msg for msg in seen.messages)
    assert pd.read_csv(paths.train_manifest).equals(manifest_before)  # a warning only
    again = run_label_issues(paths, folds=3).metrics
    assert again["per_domain"] == m["per_domain"]  # seeded folds: the same findings

    ev = run_evaluate(paths, cam_images=2).metrics
    page = (paths.evaluation / "index.html").read_text()
    assert ev["label_issues"] == len(issues) and ev["label_issue_features"].startswith("pretrained")
    for d in ("d1", "d2"):
        assert {"label_issues", "label_issue_share", "swapped_pairs"} <= set(ev["per_domain"][d])
    assert 'href="../label_issues/label_issues.csv"' in page
    if len(issues):
        assert "../label_issues/label_issues.png" in re.findall(r'<img src="([^"]+)"', page)
        assert str(issues["path"].iloc[0]) in page  # the most suspect row, in the page's table


def test_cam_sheets_and_class_balance_are_written_linked_and_seeded(tmp_path):
    paths = workspace(tmp_path)
    m = run_evaluate(paths, cam_images=2).metrics
    json.dumps(m, allow_nan=False)
    folder = paths.evaluation
    page = (folder / "index.html").read_text()
    images = re.findall(r'<img src="([^"]+)"', page)
    for d in ("d1", "d2", "held"):
        assert f"cam_{d}.png" in images and (folder / f"cam_{d}.png").stat().st_size > 1000
    samples = pd.read_csv(folder / "cam_samples.csv", dtype={"label": str, "predicted": str})
    counts = samples.groupby(["domain", "correct"]).size()
    assert (counts <= 2).all() and set(samples["domain"]) == {"d1", "d2", "held"}
    assert ((samples["label"] == samples["predicted"]) == samples["correct"]).all()
    again = workspace(tmp_path / "again")
    run_evaluate(again, cam_images=2)
    assert pd.read_csv(again.evaluation / "cam_samples.csv")["path"].tolist() == samples["path"].tolist()  # seeded
    balance = pd.read_csv(folder / "class_balance.csv", dtype={"domain": str}).set_index("domain")
    assert balance.loc["d1", ["0", "1", "2"]].tolist() == [4, 4, 4]  # the workspace's train rows by hand
    assert balance.loc["held", ["0", "1", "2"]].tolist() == [10, 10, 10]
    assert m["per_domain"]["d1"]["imbalance_ratio"] == balance.loc["d1", "imbalance_ratio"]
    assert "Class balance" in page and m["label_issues"] is None  # the label_issues stage has not run


def test_zero_turns_both_off_and_no_label_free_backbone_skips_saying_why(tmp_path):
    paths = workspace(tmp_path)
    off = run_label_issues(paths, folds=0).metrics
    assert off["issues"] is None and "off" in off["skipped"]
    skipped = run_label_issues(paths, folds=3).metrics  # no pretrain output: random features would flag noise
    assert skipped["issues"] is None and "pretrain.enabled" in skipped["skipped"]
    assert json.loads((paths.label_issues / "label_issues.json").read_text())["skipped"] == skipped["skipped"]
    assert not (paths.label_issues / "label_issues.csv").exists()
    out = run_evaluate(paths, cam_images=0)
    names = {p.name for p in paths.evaluation.iterdir()}
    assert not {n for n in names if n.startswith("cam_") or n.startswith("label_issues")}
    assert out.metrics["label_issues"] is None and "class_balance.csv" in names
    assert "label-issues" not in (paths.evaluation / "index.html").read_text()


def test_the_moved_evaluate_key_names_its_new_place():
    from tasks.params import ParamsError, validate_params

    with pytest.raises(ParamsError, match="params/label_issues.yaml"):
        validate_params("evaluate", {"label_issues_folds": 5}, "params/evaluate.yaml")
    with pytest.raises(ParamsError, match="folds"):
        validate_params("label_issues", {"folds": 1}, "params/label_issues.yaml")
