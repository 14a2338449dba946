"""Label issues: planted flips rank at the top of the out-of-fold label-quality list, a pair swapped in one
domain is named there (and nowhere on clean labels), class balance counts as by hand, and the features come
from the pretrain stage's label-free backbone when it has one."""
import json

import numpy as np
import pandas as pd
import torch

from mdcore.eval.label_issues import (ROW_COLUMNS, class_balance, label_free_extractor, label_issue_report,
                                      top_k_recall)

CLASSES = ["a", "b", "c", "d"]


def clustered(seed: int = 0, per: int = 40):
    """Three domains of four classes: shared class centres, a shift and scale of each domain's own."""
    g = np.random.default_rng(seed)
    centres = g.normal(0, 2.0, size=(4, 8))
    feats, labels, names = [], [], []
    for k, d in enumerate(["d1", "d2", "d3"]):
        shift, scale = g.normal(0, 3, size=8), 1 + 0.5 * k
        for c in range(4):
            feats.append((centres[c] + g.normal(0, 0.8, size=(per, 8))) * scale + shift)
            labels += [c] * per
            names += [d] * per
    rows = pd.DataFrame({"path": [f"{d}/{i}.png" for i, d in enumerate(names)], "domain": names,
                         "label": [CLASSES[c] for c in labels], "split": "train", "sha256": "x", "source": "real"})
    return rows, np.concatenate(feats), np.array(labels)


def test_flipped_labels_rank_at_the_top_and_clean_labels_name_no_pair():
    rows, feats, labels = clustered()
    clean = label_issue_report(rows, feats, labels, CLASSES, folds=5, seed=0)
    assert all(not r["swapped_pairs"] for r in clean.per_domain.values())
    assert len(clean.table) <= 0.03 * len(rows)
    g = np.random.default_rng(1)
    pick = g.choice(np.flatnonzero(rows["domain"] == "d2"), 8, replace=False)
    noisy = labels.copy()
    noisy[pick] = (labels[pick] + g.integers(1, 4, size=8)) % 4
    planted = np.zeros(len(rows), bool)
    planted[pick] = True
    issues = label_issue_report(rows, feats, noisy, CLASSES, folds=5, seed=0)
    assert top_k_recall(issues.scores, planted) >= 0.75
    assert list(issues.table.columns) == ROW_COLUMNS + ["suggested", "label_quality", "reason"]
    flagged = issues.table.set_index("path")
    for i in pick:  # flagged planted rows suggest their true class
        if rows.loc[i, "path"] in flagged.index:
            assert flagged.loc[rows.loc[i, "path"], "suggested"] == CLASSES[labels[i]]
    assert issues.table["label_quality"].is_monotonic_increasing
    assert issues.per_domain["d2"]["issues"] >= 6 > issues.per_domain["d1"]["issues"]
    json.dumps(issues.summary(), allow_nan=False)


def test_a_pair_swapped_in_one_domain_is_named_there_only():
    rows, feats, labels = clustered(2)
    swapped = labels.copy()
    in_d3 = (rows["domain"] == "d3").to_numpy()
    swapped[in_d3 & (labels == 1)], swapped[in_d3 & (labels == 3)] = 3, 1
    issues = label_issue_report(rows, feats, swapped, CLASSES, folds=5, seed=0)
    pairs = {d: [p["classes"] for p in r["swapped_pairs"]] for d, r in issues.per_domain.items()}
    assert pairs == {"d1": [], "d2": [], "d3": [["b", "d"]]}
    pair = issues.per_domain["d3"]["swapped_pairs"][0]
    assert pair["votes"] == pair["witnesses"] == 2 and pair["against"] == ["d1", "d2"]


def test_class_balance_counts_and_ratio():
    out = class_balance(np.array([0, 0, 0, 1, 2, 2]), ["x", "y", "z"])
    assert out == {"class_counts": {"x": 3, "y": 1, "z": 2}, "imbalance_ratio": 3.0, "missing_classes": []}
    out = class_balance(np.array([0, 0]), ["x", "y"])
    assert out["imbalance_ratio"] is None and out["missing_classes"] == ["y"]


def test_features_come_from_the_label_free_backbone_when_pretrain_learned_one(tmp_path):
    from safetensors.torch import save_file

    from mdcore.eval.label_issues import PRETRAINED_WEIGHTS, extract_features
    from mdcore.models.model import ModelConfig, MultiDomainModel, create_backbone
    from tasks.pretrain import BACKBONE_WEIGHTS

    assert PRETRAINED_WEIGHTS == BACKBONE_WEIGHTS
    torch.manual_seed(0)
    model = MultiDomainModel(ModelConfig("test_resnet", ["d1"], CLASSES, adapters=False)).eval()
    images = torch.randint(0, 255, (5, 3, 32, 32), dtype=torch.uint8)
    assert label_free_extractor(tmp_path / "absent") is None  # no pretrain output: nothing label-free
    backbone = create_backbone("test_resnet")
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, str(tmp_path / PRETRAINED_WEIGHTS))
    config = {"backbone": "test_resnet", "image_size": 32, "pretrained": True, "input_norm": "image", "pretrained_cfg": None}
    (tmp_path / "config.json").write_text(json.dumps(config))
    extractor, norm, size, source = label_free_extractor(tmp_path)
    assert source.startswith("pretrained") and size == 32
    feats = extract_features(extractor, norm, images, batch_size=2)
    from mdcore.eval.probe import frozen_features

    widths = [dict(s)["num_chs"] for s in backbone.feature_info][-3:]  # the last three stages, pooled
    assert feats.shape == (5, sum(widths))
    assert np.allclose(feats[:, -widths[-1]:], frozen_features(backbone, images, input_norm="image"), atol=1e-5)
    (tmp_path / "config.json").write_text(json.dumps(config | {"pretrained": False}))  # random weights: no
    assert label_free_extractor(tmp_path) is None
