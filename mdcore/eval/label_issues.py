"""Label issues per domain: which training images look mislabelled, and which class pairs a domain's
annotators may have swapped, from out-of-fold probabilities and ``cleanlab``.

Why out-of-fold: a model scores the labels it was trained on as right, noise included; a classifier that
never saw an image's label judges it. Cheaply: frozen features of a label-free backbone (the pretrain
stage's self-supervised one) and one logistic regression per fold, fitted on every seen domain's training
rows together, so a domain whose labels disagree with the other domains' stands out.

Only a warning: nothing here deletes or moves a row. The table has the quarantine file's columns (plus the
suggested label and its quality), so a person can act on it in the vocabulary the validate stage uses.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

ROW_COLUMNS = ["path", "domain", "label", "split", "sha256", "source"]  # of the manifest (quarantine.csv's too)
SUMMARY = "label_issues.json"  # the label_issues stage's summary, beside label_issues.csv and the sheet
SHOWN = 20  # rows of the table on the evaluate page


def out_of_fold_probabilities(features: np.ndarray, labels: np.ndarray, n_classes: int, folds: int = 5,
                              seed: int = 0, c: float = 0.5, max_iter: int = 300) -> np.ndarray:
    """(N, n_classes) probabilities, each row from a logistic regression fitted on the other folds
    (stratified by label, seeded). A class absent from a fold's training part gets probability 0 there."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.preprocessing import StandardScaler

    labels = np.asarray(labels)
    probs = np.zeros((len(labels), n_classes))
    splits = max(2, min(folds, int(np.bincount(labels).max())))  # sklearn refuses more folds than the largest class

    with warnings.catch_warnings():  # a class rarer than the folds: sklearn warns, the fold still works
        warnings.simplefilter("ignore", UserWarning)
        for train, held in StratifiedKFold(splits, shuffle=True, random_state=seed).split(features, labels):
            scaler = StandardScaler().fit(features[train])
            clf = LogisticRegression(C=c, max_iter=max_iter, random_state=seed)
            clf.fit(scaler.transform(features[train]), labels[train])
            probs[np.ix_(held, clf.classes_)] = clf.predict_proba(scaler.transform(features[held]))
    return probs


@dataclass
class LabelIssues:
    """``table``: flagged rows, worst label quality first; ``per_domain``: counts, swapped pairs, balance."""

    table: pd.DataFrame
    per_domain: dict[str, dict]
    features: str = ""
    scores: np.ndarray = field(default=None, repr=False)  # label quality of every row (lower = more suspect)
    flagged: np.ndarray = field(default=None, repr=False)  # row positions of ``table``'s rows, in its order
    folds: int = 0

    def summary(self) -> dict:
        return {"features": self.features, "folds": self.folds, "issues": int(len(self.table)),
                "per_domain": self.per_domain}


def class_balance(labels: np.ndarray, class_names: list[str]) -> dict:
    """Images per class and the imbalance ratio (largest / smallest class; None when a class has none)."""
    counts = np.bincount(np.asarray(labels, dtype=int), minlength=len(class_names))
    present = counts[counts > 0]
    return {"class_counts": {c: int(n) for c, n in zip(class_names, counts)},
            "imbalance_ratio": float(present.max() / present.min()) if len(present) == len(class_names) and len(present) else None,
            "missing_classes": [c for c, n in zip(class_names, counts) if n == 0]}


def confident_joint(labels: np.ndarray, probs: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """cleanlab's confident joint, counted on these rows: C[given, true] over rows whose probability of
    some class reaches that class's threshold (the most probable such class is the 'true' one)."""
    n = probs.shape[1]
    above = probs >= thresholds[None, :]
    joint = np.zeros((n, n), dtype=int)
    for y, p, ok in zip(labels, probs, above):
        if ok.any():
            joint[y, int(np.argmax(np.where(ok, p, -1)))] += 1
    return joint


def swapped_pairs(joint: np.ndarray, class_names: list[str], min_share: float = 0.5, min_count: int = 2) -> list[dict]:
    """Class pairs (a, b) where most of a's rows look like b *and* most of b's look like a in ``joint``
    (given x predicted counts): the mark of annotators who swapped two names."""
    rows = joint.sum(1)
    out = []
    for a in range(len(class_names)):
        for b in range(a + 1, len(class_names)):
            ab, ba = int(joint[a, b]), int(joint[b, a])
            if (ab >= min_count and ba >= min_count and ab >= min_share * max(rows[a], 1)
                    and ba >= min_share * max(rows[b], 1)):
                out.append({"classes": [class_names[a], class_names[b]], "a_as_b": ab, "b_as_a": ba,
                            "share": round(float(min(ab / rows[a], ba / rows[b])), 4)})
    return sorted(out, key=lambda p: -p["share"])


def standardize_per_domain(features: np.ndarray, names: np.ndarray) -> np.ndarray:
    """Each domain's features to zero mean, unit variance: removes most of the shift between domains
    (measured: a classifier fitted on one digits domain and scored on another, 0.53 -> 0.76 accuracy)."""
    out = np.empty_like(features, dtype=np.float64)
    for d in set(names):
        m = names == d
        out[m] = (features[m] - features[m].mean(0)) / (features[m].std(0) + 1e-6)
    return out


def _rest_accuracy(joint: np.ndarray, pair: list[int]) -> float:
    """Accuracy of ``joint`` (given x predicted) on the classes outside ``pair``."""
    keep = np.ones(len(joint), bool)
    keep[pair] = False
    rows = joint[keep].sum()
    return float(np.trace(joint[np.ix_(keep, keep)]) / rows) if rows else 0.0


def cross_domain_swaps(features: np.ndarray, labels: np.ndarray, names: np.ndarray, class_names: list[str],
                       c: float = 0.5, max_iter: int = 300, min_rest_accuracy: float = 0.5) -> dict[str, list[dict]]:
    """Per domain, the class pairs its labels swap relative to the other domains. Labels inside one domain
    cannot reveal a swap (they are just names); other domains can: a classifier fitted on domain e's rows
    (features standardized per domain) predicts domain d's, and a pair swapped in d's confusion is a vote
    against d. A pair is named in the domain(s) with the most votes (two domains that disagree tie: both
    are named, since nothing tells which annotators were right). A witness whose accuracy on d's other
    classes is below ``min_rest_accuracy`` is not counted: random features swap pairs by chance."""
    from sklearn.linear_model import LogisticRegression

    x = standardize_per_domain(features, names)
    domains = sorted(set(names))
    votes: dict[tuple, dict[str, list]] = {}
    fitted = {}
    for e in domains:
        m = names == e
        if len(set(labels[m])) >= 2:
            fitted[e] = LogisticRegression(C=c, max_iter=max_iter).fit(x[m], labels[m])
    n = len(class_names)
    for d in domains:
        md = names == d
        for e, clf in fitted.items():
            if e == d:
                continue
            joint = np.zeros((n, n), dtype=int)
            np.add.at(joint, (labels[md], clf.predict(x[md])), 1)
            for p in swapped_pairs(joint, class_names):
                if _rest_accuracy(joint, [class_names.index(c) for c in p["classes"]]) < min_rest_accuracy:
                    continue  # a witness that cannot read d's other classes either has no say on this pair
                votes.setdefault(tuple(p["classes"]), {}).setdefault(d, []).append({**p, "witness": e})
    out: dict[str, list[dict]] = {d: [] for d in domains}
    for pair, by_domain in votes.items():
        top = max(len(v) for v in by_domain.values())
        for d, found in by_domain.items():
            if len(found) == top:
                witnesses = len([e for e in fitted if e != d])
                out[d].append({"classes": list(pair), "votes": len(found), "witnesses": witnesses,
                               "against": sorted(f["witness"] for f in found),
                               "share": max(f["share"] for f in found),
                               "also_named_in": sorted(set(k for k, v in by_domain.items() if len(v) == top) - {d})})
    return out


def top_confusions(joint: np.ndarray, class_names: list[str], k: int = 3) -> list[dict]:
    """The k largest off-diagonal cells of the confident joint (given -> looks like), with their share of
    the given class's rows."""
    off = joint.copy()
    np.fill_diagonal(off, 0)
    rows = joint.sum(1)
    cells = [(int(off[a, b]), a, b) for a in range(len(off)) for b in range(len(off)) if off[a, b]]
    return [{"given": class_names[a], "looks_like": class_names[b], "count": n, "share": round(n / rows[a], 4)}
            for n, a, b in sorted(cells, reverse=True)[:k]]


RANKING = "normalized_margin"  # cleanlab's label-quality score; chosen over self_confidence on seeds 100-111
                               # of bench/bench_label_issues.py (flips in the domain's top-k: 0.86 vs 0.84;
                               # over all domains 0.77 vs 0.79), not on the seeds it reports


def find_label_issues(rows: pd.DataFrame, labels: np.ndarray, probs: np.ndarray, class_names: list[str],
                      swaps: dict[str, list[dict]] | None = None, features: str = "") -> LabelIssues:
    """The flagged rows (``cleanlab.filter.find_label_issues`` on out-of-fold ``probs``, worst first) and,
    per domain of ``rows``: how many, the class balance, the swapped pairs (``swaps``, from
    :func:`cross_domain_swaps`) and the confident joint's largest confusions."""
    from cleanlab.count import get_confident_thresholds
    from cleanlab.filter import find_label_issues as cl_find
    from cleanlab.rank import get_label_quality_scores

    labels = np.asarray(labels, dtype=int)
    probs = np.clip(probs, 1e-6, None)
    probs = probs / probs.sum(1, keepdims=True)
    scores = get_label_quality_scores(labels, probs, method=RANKING)
    with warnings.catch_warnings():  # a class without rows: cleanlab warns, the others are still judged
        warnings.simplefilter("ignore")
        flagged = cl_find(labels, probs, return_indices_ranked_by=RANKING, n_jobs=1)
        thresholds = get_confident_thresholds(labels, probs)
    table = rows.iloc[flagged][[c for c in ROW_COLUMNS if c in rows.columns]].copy()
    suggested = probs[flagged].argmax(1)
    table["suggested"] = [class_names[i] for i in suggested]
    table["label_quality"] = scores[flagged]
    table["reason"] = [f"label_issue: looks like {s}" for s in table["suggested"]]
    names = rows["domain"].to_numpy()
    flagged_domains = names[flagged]
    per_domain = {}
    for d in sorted(set(names)):
        mask = names == d
        n_issues = int((flagged_domains == d).sum())
        per_domain[d] = {"images": int(mask.sum()), "issues": n_issues,
                         "issue_share": round(n_issues / int(mask.sum()), 4),
                         "swapped_pairs": (swaps or {}).get(d, []),
                         "top_confusions": top_confusions(confident_joint(labels[mask], probs[mask], thresholds),
                                                          class_names),
                         **class_balance(labels[mask], class_names)}
    return LabelIssues(table.reset_index(drop=True), per_domain, features, scores, np.asarray(flagged, dtype=int))


def label_issue_report(rows: pd.DataFrame, features: np.ndarray, labels: np.ndarray, class_names: list[str],
                       folds: int = 5, seed: int = 0, source: str = "") -> LabelIssues:
    """Everything above from one feature matrix: out-of-fold probabilities over all rows, the flagged
    rows, and the cross-domain swap votes."""
    labels = np.asarray(labels, dtype=int)
    probs = out_of_fold_probabilities(features, labels, len(class_names), folds, seed)
    swaps = cross_domain_swaps(features, labels, rows["domain"].to_numpy(), class_names)
    issues = find_label_issues(rows, labels, probs, class_names, swaps, source)
    issues.folds = folds
    return issues


def top_k_recall(scores: np.ndarray, planted: np.ndarray, k: int | None = None) -> float:
    """Share of the ``planted`` (boolean) rows among the k lowest label-quality rows (k = how many were planted)."""
    planted = np.asarray(planted, dtype=bool)
    k = int(planted.sum()) if k is None else k
    if k == 0:
        return math.nan
    return float(planted[np.argsort(scores, kind="stable")[:k]].sum() / planted.sum())


PRETRAINED_WEIGHTS = "backbone.safetensors"  # what the pretrain stage writes (tasks.pretrain.BACKBONE_WEIGHTS)


def label_free_extractor(pretrained_dir) -> tuple[object, object, int, str] | None:
    """(backbone, input norm, image size, source) of the pretrain stage's output when it learned something
    without labels (self-supervised epochs, or given weights); None otherwise: random features would flag
    noise, and a fine-tuned model has fitted the very labels it would judge."""
    import json
    from pathlib import Path

    from mdcore.models.input_norm import InputNorm, cfg_norm
    from mdcore.models.model import create_backbone

    folder = Path(pretrained_dir)
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    if not (config.get("pretrained") and (folder / PRETRAINED_WEIGHTS).is_file()):
        return None
    backbone = create_backbone(config["backbone"], weights=str(folder / PRETRAINED_WEIGHTS))
    kind, norm = config.get("input_norm", "image"), cfg_norm(config.get("pretrained_cfg")) or {}
    return (backbone, InputNorm(kind, norm.get("mean"), norm.get("std")), int(config["image_size"]),
            "pretrained (label-free)")


STAGES = 3  # pooled outputs of the backbone's last three feature stages, side by side: on seeds 100-111 of
            # bench/bench_label_issues.py 0.86 of the flips in the domain's top-k against 0.82 for the last
            # stage alone (the seeds it reports are others)


def extract_features(extractor, norm, images, batch_size: int = 256, device="cpu", stages: int = STAGES) -> np.ndarray:
    """Features of uint8 ``images`` in eval mode: a backbone's last ``stages`` feature stages (timm
    ``feature_info``), each average-pooled, concatenated (its pooled output when it has no feature_info)."""
    import torch

    from mdcore.data.images import to_float

    was = extractor.training
    extractor.eval().to(device)
    norm = norm.to(device)
    taps, hooks = {}, []
    for i, s in enumerate([dict(s) for s in (getattr(extractor, "feature_info", None) or [])][-stages:]):
        hooks.append(extractor.get_submodule(s["module"]).register_forward_hook(
            lambda m, a, o, i=i: taps.__setitem__(i, o.float().mean((2, 3)))))
    out = []
    try:
        with torch.no_grad():
            for s in range(0, len(images), batch_size):
                x = to_float(images[s : s + batch_size]).to(device)
                pooled = extractor(norm(x)).float()
                out.append(torch.cat([taps[i] for i in sorted(taps)], 1).cpu() if taps else pooled.cpu())
    finally:
        for h in hooks:
            h.remove()
        extractor.train(was)
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def balance_rows(frame: pd.DataFrame, seen: list[str], class_names: list[str]) -> list[dict]:
    """Class counts per domain from the manifest (no decoding): seen domains' training rows (real and
    synthetic: what the loss sees), held-out domains' rows (all of them: what their figures rest on)."""
    out = []
    for d in sorted(frame["domain"].unique()):
        split = "train" if d in seen else "holdout"
        rows = frame[(frame["domain"] == d) & (frame["split"] == split)]
        index = {c: i for i, c in enumerate(class_names)}
        labels = np.array([index[c] for c in rows["label"].astype(str) if c in index], dtype=int)
        out.append({"domain": d, "rows": "training" if d in seen else "all (held-out)",
                    **class_balance(labels, class_names)})
    return out


def page_section(folder) -> dict | None:
    """The evaluate page's label-issue section, read from the label_issues stage's output ``folder``
    (None: the stage has not run, or was off or skipped)."""
    import json
    from pathlib import Path

    folder = Path(folder)
    if not (folder / SUMMARY).is_file():
        return None
    summary = json.loads((folder / SUMMARY).read_text())
    if summary.get("skipped"):
        return None
    table = pd.read_csv(folder / "label_issues.csv", keep_default_na=False,
                        dtype={c: str for c in (*ROW_COLUMNS, "suggested", "reason")})
    shown = int(summary.get("shown", SHOWN))
    return {"features": summary["features"], "folds": summary["folds"], "per_domain": summary["per_domain"],
            "sheet": summary.get("sheet"), "top": table.head(shown).to_dict("records"),
            "more": max(0, len(table) - shown)}
