"""label_issues: which training images look mislabelled, and which class pairs a domain's annotators may
have swapped, before any fine-tuning. Out-of-fold probabilities of a logistic regression on the pretrain
stage's label-free backbone features, judged by cleanlab (``mdcore.eval.label_issues``).

A stage of its own because it reads only the data and the pretrained backbone: it reruns when they change,
not when fine-tuning does, and its warning comes before the long fine-tuning run. A warning only: nothing is
removed; the table has the quarantine file's columns so a person can act on it. The evaluate page shows
its section. ``folds: 0`` turns it off; without a label-free backbone (``pretrain.enabled: false`` and no
``backbone_weights``) it is skipped and says why (random features would flag noise)."""
from __future__ import annotations

import json
import logging

import torch
from prefect import task

from mdcore.data.decode import DEFAULT_RESIZE
from mdcore.data.io import atomic_dir
from mdcore.data.manifest import class_names, read_manifest
from mdcore.eval import label_issues as li
from mdcore.models.accel import resolve_device
from tasks.data import image_roots, load_split, seen_domains
from tasks.params import LabelIssuesParams, StageParams
from tasks.paths import Paths
from tasks.stage import StageResult, execute

log = logging.getLogger("mdpipe.label_issues")


def run(params: LabelIssuesParams, paths: Paths) -> StageResult:
    frame = read_manifest(paths.train_manifest)
    domains, classes = seen_domains(frame), class_names(frame)
    issues, images, skipped = None, None, None
    if not params.folds:
        skipped = "off (label_issues.folds: 0)"
    else:
        found = li.label_free_extractor(paths.pretrained)
        if found is None:
            skipped = ("no label-free backbone: the pretrain stage learned nothing without labels "
                       "(set pretrain.enabled: true or pretrain.backbone_weights)")
        else:
            issues, images, skipped = _find(found, paths, params, domains, classes)
    with atomic_dir(paths.label_issues) as tmp:
        summary = ({"skipped": skipped} if issues is None else
                   issues.summary() | {"sheet": _write(issues, images, tmp), "shown": li.SHOWN})
        (tmp / li.SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    if issues is None:
        log.info("label issues: skipped: %s", skipped)
        return StageResult({"label_issues": str(paths.label_issues)}, {"skipped": skipped, "issues": None})
    _warn(issues, paths)
    per_domain = {d: {"images": r["images"], "issues": r["issues"], "issue_share": r["issue_share"],
                      "swapped_pairs": ", ".join(f"{p['classes'][0]}<->{p['classes'][1]}" for p in r["swapped_pairs"]),
                      "imbalance_ratio": r["imbalance_ratio"]} for d, r in issues.per_domain.items()}
    return StageResult({"label_issues": str(paths.label_issues)},
                       {"skipped": None, "issues": int(len(issues.table)), "features": issues.features,
                        "folds": issues.folds, "per_domain": per_domain})


def _find(found, paths: Paths, params: LabelIssuesParams, domains, classes):
    """(issues, images, None), or (None, None, why) when the rows are too few to fold."""
    extractor, norm, size, source = found
    # resized as the pretrain stage resized them (found implies its config.json)
    resize = json.loads((paths.pretrained / "config.json").read_text()).get("resize", DEFAULT_RESIZE)
    data, rows = load_split(paths.train_manifest, image_roots(paths.raw, paths.synthetic), size, ("train",),
                            synthetic=False, domains=domains, classes=classes, resize=resize)
    if len(set(data.labels.tolist())) < 2 or len(data) < 2 * params.folds:
        return None, None, (f"{len(data)} real training rows of {len(set(data.labels.tolist()))} classes: "
                            f"too few for {params.folds} folds")
    device = resolve_device(params.device, "label_issues.device")
    features = li.extract_features(extractor, norm, data.images, params.batch_size, device)
    issues = li.label_issue_report(rows.reset_index(drop=True), features, data.labels.numpy(), classes,
                                   params.folds, params.seed, source)
    return issues, data.images, None


def _write(issues: li.LabelIssues, images: torch.Tensor, folder) -> str | None:
    """label_issues.csv and the sheet of the most suspect images; the sheet's file name (None: no issue)."""
    from mdcore.eval.plots import image_grid

    issues.table.to_csv(folder / "label_issues.csv", index=False, float_format="%.4f")
    if not len(issues.table):
        return None
    top = issues.table.head(18)
    image_grid(images[torch.from_numpy(issues.flagged[: len(top)])],
               [f"{d}: {g} \u2192 {s}?" for d, g, s in zip(top["domain"], top["label"], top["suggested"])],
               "Most suspect training labels (domain: given \u2192 suggested)", folder / "label_issues.png")
    return "label_issues.png"


def _warn(issues: li.LabelIssues, paths: Paths) -> None:
    if not len(issues.table) and not any(r["swapped_pairs"] for r in issues.per_domain.values()):
        return
    pairs = "; ".join(f"{d}: " + ", ".join(f"{p['classes'][0]}<->{p['classes'][1]}" for p in r["swapped_pairs"])
                      for d, r in issues.per_domain.items() if r["swapped_pairs"])
    log.warning("label issues: %d training images look mislabelled (%s)%s; see %s (a warning: nothing was removed)",
                len(issues.table), ", ".join(f"{d} {r['issues']}" for d, r in issues.per_domain.items()),
                f"; swapped class pairs: {pairs}" if pairs else "",
                (paths.label_issues / "label_issues.csv").relative_to(paths.root))


@task(name="label_issues")
def label_issues_task(root: str = ".", params: StageParams | None = None) -> dict:
    """Prefect task: the label_issues stage."""
    return execute("label_issues", root, params)
