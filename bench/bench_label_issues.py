"""Planted label errors: does the label-issue report find them?

On a workspace after ``make demo`` (its training rows and the pretrain stage's self-supervised backbone),
per seed: (a) flip 5 % of one seen domain's training labels to another class (seeded; the domain cycles
with the seed) and count how many flipped rows are among the k lowest label-quality rows (k = number
flipped), over all domains' rows and within that domain's; (b) swap two classes wholesale in one domain
and check the report names that pair there (and no pair anywhere else). Clean labels are scored too
(pairs named with nothing planted = false alarms).

    OMP_NUM_THREADS=1 python -m bench.bench_label_issues --workspace PATH [--seeds 0 1 2] [--folds 5]

Writes bench/results/label_issues.json. Reports only: nothing here chooses a default.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def load(workspace: Path, features: str = "pretrained"):
    from mdcore.data.manifest import class_names, read_manifest
    from mdcore.eval.label_issues import extract_features, label_free_extractor
    from tasks.data import image_roots, load_split, seen_domains
    from tasks.paths import load_paths

    paths = load_paths(workspace)
    found = imagenet_extractor(int(features.split(":")[1])) if features.startswith("imagenet") \
        else label_free_extractor(paths.pretrained)
    if found is None:
        raise SystemExit(f"{paths.pretrained}: no label-free backbone (the pretrain stage learned nothing without labels)")
    extractor, norm, size, source = found
    frame = read_manifest(paths.train_manifest)
    classes = class_names(frame)
    data, rows = load_split(paths.train_manifest, image_roots(paths.raw, paths.synthetic), size, ("train",),
                            synthetic=False, domains=seen_domains(frame), classes=classes)
    t0 = time.perf_counter()
    feats = extract_features(extractor, norm, data.images)
    return rows.reset_index(drop=True), data.labels.numpy(), feats, classes, source, time.perf_counter() - t0


def imagenet_extractor(size: int):
    """The ImageNet-1k EfficientNet-Lite0 of the installed package (``backbone_weights: imagenet``), fed with
    its pretrained_cfg mean/std at ``size`` px: label-free features that never saw these images."""
    from mdcore.models.input_norm import InputNorm, cfg_norm
    from mdcore.models.model import create_backbone

    backbone = create_backbone("tf_efficientnet_lite0", weights="imagenet")
    norm = cfg_norm(backbone.pretrained_cfg)
    return backbone, InputNorm("pretrained", norm["mean"], norm["std"]), size, f"imagenet tf_efficientnet_lite0 at {size} px"


def report(rows, labels, feats, classes, folds, seed):
    from mdcore.eval.label_issues import label_issue_report

    return label_issue_report(rows, feats, labels, classes, folds, seed)


def flipped(rows, labels, classes, domain, share, rng):
    idx = np.flatnonzero(rows["domain"].to_numpy() == domain)
    pick = rng.choice(idx, size=max(1, round(share * len(idx))), replace=False)
    noisy = labels.copy()
    noisy[pick] = (labels[pick] + rng.integers(1, len(classes), size=len(pick))) % len(classes)
    planted = np.zeros(len(labels), bool)
    planted[pick] = True
    return noisy, planted


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workspace", type=Path, default=Path("."))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--share", type=float, default=0.05)
    ap.add_argument("--features", default="pretrained", help="pretrained (the pretrain stage's backbone, as the "
                    "stage uses) or imagenet:SIZE (the package's ImageNet EfficientNet-Lite0 at SIZE px)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "label_issues.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from mdcore.eval.label_issues import top_k_recall

    rows, labels, feats, classes, source, feat_s = load(args.workspace, args.features)
    domains = sorted(rows["domain"].unique())
    names = rows["domain"].to_numpy()
    t0 = time.perf_counter()
    clean = report(rows, labels, feats, classes, args.folds, 0)
    oof_s = time.perf_counter() - t0
    result = {"workspace": str(args.workspace), "features": source, "train_rows": len(rows), "folds": args.folds,
              "feature_s": round(feat_s, 2), "oof_and_cleanlab_s": round(oof_s, 2),
              "clean": {"issues": len(clean.table), "pairs_named": {d: v["swapped_pairs"] for d, v in clean.per_domain.items()
                                                                      if v["swapped_pairs"]}},
              "flip": [], "swap": []}
    for seed in args.seeds:
        rng = np.random.default_rng(seed)
        domain = domains[seed % len(domains)]
        noisy, planted = flipped(rows, labels, classes, domain, args.share, rng)
        issues = report(rows, noisy, feats, classes, args.folds, seed)
        in_domain = names == domain
        flagged_rows = set(issues.table["path"])
        row = {"seed": seed, "domain": domain, "flipped": int(planted.sum()),
               "top_k_recall_all_domains": top_k_recall(issues.scores, planted),
               "top_k_recall_in_domain": top_k_recall(issues.scores[in_domain], planted[in_domain]),
               "flagged": len(issues.table),
               "flagged_that_were_flipped": int(sum(p in flagged_rows for p in rows.loc[planted, "path"]))}
        result["flip"].append(row)
        print("flip", row, flush=True)
        a, b = sorted(rng.choice(len(classes), size=2, replace=False).tolist())
        swap_domain = domains[(seed + 1) % len(domains)]
        swapped = labels.copy()
        mask = names == swap_domain
        swapped[mask & (labels == a)], swapped[mask & (labels == b)] = b, a
        issues = report(rows, swapped, feats, classes, args.folds, seed)
        named = {d: [p["classes"] for p in v["swapped_pairs"]] for d, v in issues.per_domain.items()}
        row = {"seed": seed, "domain": swap_domain, "pair": [classes[a], classes[b]],
               "named_there": [classes[a], classes[b]] in named[swap_domain],
               "named_only_there": [d for d, p in named.items() if p] == [swap_domain],
               "pairs_named": {d: p for d, p in named.items() if p},
               "top_confusions": issues.per_domain[swap_domain]["top_confusions"][:2]}
        result["swap"].append(row)
        print("swap", row, flush=True)
    recalls = [r["top_k_recall_all_domains"] for r in result["flip"]]
    result["mean_top_k_recall_all_domains"] = float(np.mean(recalls))
    result["mean_top_k_recall_in_domain"] = float(np.mean([r["top_k_recall_in_domain"] for r in result["flip"]]))
    result["swaps_named"] = sum(r["named_there"] for r in result["swap"])
    result["swaps_named_only_there"] = sum(r["named_only_there"] for r in result["swap"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("flip", "swap")}, indent=2))


if __name__ == "__main__":
    main()
