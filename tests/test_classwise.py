"""Per domain x class figures: torchmetrics' tables agree with counting by hand, undefined figures are NaN,
the worst class is the one with the lowest recall; and the evaluate stage writes them (CSV, pictures,
calibration, one HTML page) next to the accuracy figures other code reads, unchanged."""
import json
import math
import re

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from mdcore.eval.classwise import class_report, class_reports


def by_hand(preds, labels, n):
    rows = []
    for c in range(n):
        tp = sum(p == c and y == c for p, y in zip(preds, labels))
        predicted, support = sum(p == c for p in preds), sum(y == c for y in labels)
        precision = tp / predicted if predicted else math.nan
        recall = tp / support if support else math.nan
        f1 = 2 * tp / (predicted + support) if predicted + support else math.nan
        rows.append((support, precision, recall, f1))
    return rows


def test_class_report_matches_counting_by_hand():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (200,), generator=g)  # class 4 has no images; class 3 is never predicted
    preds = torch.where(torch.rand(200, generator=g) < 0.7, labels, torch.randint(0, 5, (200,), generator=g))
    preds = torch.where(preds == 3, 0, preds)
    r = class_report(preds, labels, ["a", "b", "c", "d", "e"], "dom")
    for i, (support, precision, recall, f1) in enumerate(by_hand(preds.tolist(), labels.tolist(), 5)):
        assert int(r.support[i]) == support
        for got, want in ((r.precision[i], precision), (r.recall[i], recall), (r.f1[i], f1)):
            assert (math.isnan(got) and math.isnan(want)) or float(got) == pytest.approx(want, abs=1e-6)
    assert math.isnan(r.recall[4]) and math.isnan(r.precision[3]) and r.recall[3] == 0
    assert r.worst_class == "d" and r.worst_class_recall == 0.0
    assert r.balanced_acc == pytest.approx(float(np.mean([by_hand(preds.tolist(), labels.tolist(), 5)[i][2]
                                                           for i in range(4)])))
    assert r.confusion.sum() == 200 and torch.equal(r.confusion.sum(1)[:4], r.support[:4])
    assert torch.allclose(r.normalized().sum(1)[:4], torch.ones(4)) and r.normalized()[4].sum() == 0


def test_the_worst_class_is_found_per_domain():
    labels = torch.tensor([0, 1, 2] * 4 + [0, 1, 2] * 4)
    preds = labels.clone()
    preds[12:][labels[12:] == 1] = 2  # domain "b": class 1 always read as 2
    names = ["a"] * 12 + ["b"] * 12
    reports = class_reports(preds, labels, names, ["zero", "one", "two"])
    assert list(reports) == ["a", "b"]
    assert reports["a"].worst_class_recall == 1.0 and reports["a"].macro_f1 == pytest.approx(1.0)
    assert reports["b"].worst_class == "one" and reports["b"].worst_class_recall == 0.0
    assert reports["b"].balanced_acc == pytest.approx(2 / 3) and int(reports["b"].confusion[1, 2]) == 4


def workspace(tmp_path):
    """Three domains of three colour-coded classes (d1, d2 seen; ``held`` held out), with val and test."""
    from tasks.paths import Paths

    rng = np.random.default_rng(0)
    rows = []
    for domain in ("d1", "d2", "held"):
        for i in range(30):
            label = str(i % 3)
            path = f"{domain}/{label}/{i}.png"
            (tmp_path / "raw" / domain / label).mkdir(parents=True, exist_ok=True)
            Image.fromarray((rng.random((32, 32, 3)) * 60 + int(label) * 80).astype(np.uint8)).save(tmp_path / "raw" / path)
            split = "holdout" if domain == "held" else ("train", "val", "test")[i // 3 % 3]
            rows.append(dict(path=path, domain=domain, label=label, split=split, sha256=f"{domain}{i}", width=32,
                             height=32, mode="RGB", source="real", generator=""))
    pd.DataFrame(rows).to_csv(tmp_path / "train_manifest.csv", index=False)
    return Paths(tmp_path, {"raw": "raw", "synthetic": "synthetic", "train_manifest": "train_manifest.csv",
                            "finetuned": "finetuned", "evaluation": "evaluation", "pretrained": "pretrained",
                            "label_issues": "label_issues"})


def test_evaluate_stage_writes_class_tables_calibration_and_one_page(tmp_path):
    from mdcore.eval.calibration import CALIBRATION_FILE, Temperatures
    from mdcore.eval.scoring import accuracy_by_domain
    from mdcore.models.model import ModelConfig, MultiDomainModel, load_model, save_model
    from tasks import evaluate
    from tasks.data import image_roots, load_split
    from tasks.params import EvaluateParams

    paths = workspace(tmp_path)
    torch.manual_seed(0)
    save_model(MultiDomainModel(ModelConfig("test_resnet", ["d1", "d2"], ["0", "1", "2"], adapter_dim=8)), paths.finetuned)
    # Grad-CAM off here: tests/test_evaluate_explains.py covers it
    out = evaluate.run(EvaluateParams(batch_size=7, device="cpu", target_precision=0.9, cam_images=0), paths)
    m = out.metrics
    # the figures other code reads are as the plain accuracy scoring gives them
    model = load_model(paths.finetuned)
    data, rows = load_split(paths.train_manifest, image_roots(paths.raw, paths.synthetic), 32, ("test", "holdout"),
                            synthetic=False, domains=model.config.domains, classes=model.config.classes)
    plain = accuracy_by_domain(model, data, list(rows["domain"]), 7)
    assert set(m["per_domain"]) == {"d1", "d2", "held"}
    for d, row in m["per_domain"].items():
        assert row["acc"] == pytest.approx(plain[d]) and {"kind", "images", "acc_unknown_domain"} <= set(row)
        assert {"macro_f1", "balanced_acc", "worst_class", "worst_class_recall", "ece", "ece_calibrated",
                "temperature", "abstain_below", "selective_coverage"} <= set(row)
        assert row["worst_class"] in {"0", "1", "2"} and 0 <= row["worst_class_recall"] <= row["balanced_acc"]
    assert m["per_domain"]["held"]["kind"] == "held-out" and m["mean_seen_acc"] is not None
    assert m["per_domain"]["held"]["temperature"] == m["unknown_temperature"]
    json.dumps(m, allow_nan=False)  # evaluate.json stays strict JSON (dvc metrics show reads it)
    folder = paths.evaluation
    images = {"d1": 9, "d2": 9, "held": 30}  # the workspace's test rows and held-out images
    assert {d: row["images"] for d, row in m["per_domain"].items()} == images
    per_class = pd.read_csv(folder / "per_class.csv")
    assert per_class.groupby("domain")["support"].sum().to_dict() == images
    confusion = pd.read_csv(folder / "confusion.csv")
    assert confusion.groupby("domain")["count"].sum().to_dict() == images
    calibration = pd.read_csv(folder / "calibration.csv").set_index("domain")
    assert (calibration["acc_before"] == calibration["acc_after"]).all()  # temperature scaling keeps the argmax
    temps = Temperatures.load(folder / CALIBRATION_FILE)
    assert temps.domains == ["d1", "d2"] and set(temps.abstain_below) == {"d1", "d2", "unknown"}
    assert temps.per_domain["d1"] == m["per_domain"]["d1"]["temperature"] and temps.target_precision == 0.9
    page = (folder / "index.html").read_text()
    images = re.findall(r'<img src="([^"]+)"', page)
    assert "accuracy.png" in images and len(images) == 1 + 2 * 3
    assert all((folder / name).is_file() and (folder / name).stat().st_size > 1000 for name in images)
    for d in ("d1", "d2", "held"):
        assert f'id="d-{d}"' in page
    assert "per_class.csv" in page and "calibration.json" in page


def test_evaluate_fits_temperatures_on_validation_only(tmp_path):
    """The temperatures come from the val rows: changing the test rows' labels leaves them as they were."""
    from mdcore.eval.explain import fit_on_validation
    from mdcore.models.model import ModelConfig, MultiDomainModel
    from tasks.evaluate import score

    paths = workspace(tmp_path)
    torch.manual_seed(0)
    model = MultiDomainModel(ModelConfig("test_resnet", ["d1", "d2"], ["0", "1", "2"], adapter_dim=8)).eval()
    first = fit_on_validation(score(model, paths, 16, ("val",)), ["d1", "d2"], 0.9)
    frame = pd.read_csv(paths.train_manifest, dtype={"label": str})
    frame.loc[frame["split"] == "test", "label"] = "0"
    frame.to_csv(paths.train_manifest, index=False)
    assert fit_on_validation(score(model, paths, 16, ("val",)), ["d1", "d2"], 0.9) == first
    frame.loc[frame["split"] == "val", "label"] = "0"
    frame.to_csv(paths.train_manifest, index=False)
    assert fit_on_validation(score(model, paths, 16, ("val",)), ["d1", "d2"], 0.9) != first
