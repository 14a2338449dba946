"""synthesize: labelled synthetic training images for scarce domains, judged before they are used.

For every scarce domain (training set below ``scarce_ratio`` x the largest) and class, the gap up to
``target_per_class`` is split between the generators in ``methods``:

- ``fourier``: other seen domains' images of the class in the scarce domain's style (Fourier amplitude
  swap with a random real image of the domain, plus matching of its mean amplitude spectrum);
- ``stats``: the same content with a real image's per-channel mean and std (AdaIN in pixel space);
- ``augment``: an augmentation policy fitted on the domain's real training images (exposure, contrast,
  tint, blur, noise, uneven light, rotation spread) applied to other domains' (or its own) images.

Each (domain, method) batch is scored before anything is written: *realism* (share the domain judge,
trained to tell the seen domains apart on real images, assigns to the target domain) and *label
agreement* (share the label judge, trained on half of the real training images of all seen domains, the
half the generators never take content from, gives the intended
label, against its accuracy on real validation images of the domain). A batch below ``min_realism`` or
``min_agreement_ratio`` x that accuracy is rejected: not written, not in the manifest, reported.
Synthetic rows only ever join the training split; each carries its generator and parameters. The
generators and judges are `mdcore.synth.generate`; this module adds the manifest, the report and the task.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
from prefect import task

from mdcore.data.io import atomic_dir, atomic_write_text
from mdcore.data.manifest import COLUMNS, class_names, manifest_csv, read_manifest
from mdcore.synth.generate import contact_sheet, generate
from tasks.params import StageParams, SynthesizeParams
from tasks.paths import Paths
from tasks.stage import StageResult, execute

log = logging.getLogger("mdpipe.synthesize")


def report_dir(paths: Paths) -> Path:
    return paths.synthesis_report


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def write_report(folder: Path, report: dict, info: dict, classes: list[str]) -> None:
    for domain, samples in report["samples"].items():
        contact_sheet(domain, samples, classes).save(folder / f"contact_{domain}.png")
    data = {"params": report["params"], "policies": report["policies"], "batches": report["batches"],
            "summary": {k: info.get(k) for k in ("scarce_domains", "accepted_batches", "rejected_batches",
                                                 "planned_images", "shortfall", "accepted_realism",
                                                 "accepted_agreement", "judges")}}
    (folder / "batches.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    lines = ["# Synthetic batches", "",
             "Realism: share of the batch the domain judge (trained on real images of the seen domains) assigns "
             "to the target domain; `real` = its recall on real validation images of that domain. Agreement: "
             "share the label judge gives the intended label; `real` = its accuracy on real validation images "
             "(the reference). FD: Fréchet distance of style features to the domain's real training images, "
             "for the batch and for its content images before the transfer.", "",
             "| batch | images | realism (real) | agreement (real, bar) | FD synthetic / content | verdict |",
             "|---|---:|---:|---:|---:|---|"]
    for b in report["batches"]:
        rr = "-" if b["real_realism"] is None else f"{b['real_realism']:.2f}"
        rs = "not judged" if b["realism"] is None else f"{b['realism']:.2f}"
        verdict = "accepted" if b["accepted"] else "**rejected**: " + "; ".join(b["reasons"])
        lines.append(f"| {b['domain']}/{b['method']} | {b['images']} | {rs} ({rr}) | "
                     f"{b['agreement']:.2f} ({b['real_agreement']:.2f}, {b['agreement_bar']:.2f}) | "
                     f"{_fmt(b['fd_to_real'])} / {_fmt(b['fd_content_to_real'])} | {verdict} |")
    for domain, pol in report["policies"].items():
        lines += ["", f"## Augmentation policy fitted on `{domain}`", "",
                  ", ".join(f"{k} {v}" for k, v in pol.items() if k != "domain")]
    if not report["batches"]:
        lines += ["", "No scarce domain: nothing generated."]
    (folder / "batches.md").write_text("\n".join(lines) + "\n")


def run(params: SynthesizeParams, paths: Paths) -> StageResult:
    frame = read_manifest(paths.validated)
    report = {"params": params.model_dump(mode="json"), "batches": [], "policies": {}, "samples": {}}
    with atomic_dir(paths.synthetic) as tmp:
        if params.enabled:
            synthetic, info, report = generate(frame, params, paths.raw, tmp)
        else:
            synthetic, info = pd.DataFrame(columns=COLUMNS), {"scarce_domains": [], "generated": {}}
        (tmp / "README.txt").write_text("Synthetic training images written by the synthesize stage "
                                        "(accepted batches only; see reports/synthesize/batches.md).\n")
    combined = pd.concat([frame, synthetic], ignore_index=True) if len(synthetic) else frame
    atomic_write_text(paths.train_manifest, manifest_csv(combined))
    with atomic_dir(report_dir(paths)) as tmp:
        write_report(tmp, report, info, class_names(frame))
    log.info("synthetic images: %d for scarce domains %s", len(synthetic), info["scarce_domains"])
    metrics = {"enabled": params.enabled, "synthetic_images": len(synthetic), **info}
    return StageResult({"synthetic": str(paths.synthetic), "train_manifest": str(paths.train_manifest),
                        "report": str(report_dir(paths))}, metrics)


@task(name="synthesize")
def synthesize_task(root: str = ".", params: StageParams | None = None) -> dict:
    """Prefect task: the synthesize stage."""
    return execute("synthesize", root, params)
