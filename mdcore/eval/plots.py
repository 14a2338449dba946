"""The evaluate report's per-domain pictures (matplotlib, Agg: no display needed): confusion matrices, and
calibration (reliability before/after temperature scaling, precision against coverage)."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from mdcore.eval.classwise import ClassReport


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def file_stem(domain: str) -> str:
    """A domain name made safe for a file name (domains come from folder names: mostly already safe)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", domain) or "_"


def plot_confusion(report: ClassReport, out: str | Path, kind: str = "") -> None:
    """Counts (annotated) and row-normalized (each true class's share, so a small class's errors show)."""
    plt = pyplot()
    n = len(report.classes)
    side = min(4.2, 1.6 + 0.26 * n)
    fig, axes = plt.subplots(1, 2, figsize=(1.75 * side + 0.5, side))
    panels = ((axes[0], report.confusion, "counts"),
              (axes[1], report.normalized(), "share of each true class (white 0, blue 1)"))
    for ax, matrix, title in panels:
        ax.imshow(matrix.numpy(), cmap="Blues", vmin=0, vmax=None if title == "counts" else 1)
        ax.set_title(f"{report.domain} ({kind}): {title}" if kind else f"{report.domain}: {title}", fontsize=9)
        ax.set_xticks(range(n), report.classes, fontsize=7)
        ax.set_yticks(range(n), report.classes, fontsize=7)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_ylabel("true", fontsize=8)
    if n <= 15:  # numbers on the counts panel only: legible, and cheap to draw
        top = max(int(report.confusion.max()), 1)
        for k, v in enumerate(report.confusion.flatten().tolist()):
            i, j = divmod(k, n)
            if v:
                axes[0].text(j, i, str(v), ha="center", va="center", fontsize=6,
                             color="white" if v > top / 2 else "black")
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.13, top=0.91, wspace=0.22)  # tight_layout: 2x the time
    fig.savefig(out, dpi=90)
    plt.close(fig)


def plot_calibration(domain: str, before: dict, after: dict, coverage: torch.Tensor, precision: torch.Tensor,
                     target: float, chosen: dict, out: str | Path) -> None:
    """Left: reliability diagram (accuracy per confidence bin, before and after temperature scaling; the
    diagonal is perfect calibration). Right: precision of the answered images against the share answered,
    with the target precision and the coverage the validation-chosen threshold gives here."""
    plt = pyplot()
    fig, (rel, sel) = plt.subplots(1, 2, figsize=(8.4, 3.4))
    rel.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
    for points, label, marker in ((before, "uncalibrated", "o"), (after, "temperature-scaled", "s")):
        xy = [(c, a) for c, a in zip(points["confidence"], points["accuracy"]) if c is not None]
        if xy:
            rel.plot(*zip(*xy), marker=marker, ms=3.5, lw=1, label=label)
    rel.set_xlim(0, 1), rel.set_ylim(0, 1.02)
    rel.set_xlabel("confidence (bin mean)", fontsize=8), rel.set_ylabel("accuracy", fontsize=8)
    rel.set_title(f"{domain}: reliability", fontsize=9)
    rel.legend(fontsize=7, loc="upper left")
    if len(coverage):
        sel.plot(coverage.numpy(), precision.numpy(), lw=1.2)
    sel.axhline(target, color="tab:red", lw=0.8, ls="--", label=f"target precision {target:g}")
    if chosen.get("coverage"):
        sel.axvline(chosen["coverage"], color="tab:green", lw=0.8, ls="--", label="threshold chosen on validation")
    sel.set_xlim(0, 1), sel.set_ylim(0, 1.02)
    sel.set_xlabel("coverage (share answered, most confident first)", fontsize=8)
    sel.set_ylabel("precision of answered", fontsize=8)
    sel.set_title(f"{domain}: selective prediction", fontsize=9)
    sel.legend(fontsize=7, loc="lower left")
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.14, top=0.91, wspace=0.22)
    fig.savefig(out, dpi=90)
    plt.close(fig)


def image_grid(images: torch.Tensor, captions: list[str], title: str, out: str | Path, cols: int = 6,
               scale: int = 3) -> None:
    """uint8 images (N,3,H,W) in a captioned grid: one mosaic in one axes, quick at any count."""
    import numpy as np

    plt = pyplot()
    n, (h, w) = len(images), images.shape[-2:]
    cols = max(1, min(cols, n))
    rows = max(1, -(-n // cols))
    ch, cw, gap = h * scale, w * scale, 14
    mosaic = np.full((rows * (ch + gap), cols * (cw + 6), 3), 255, np.uint8)
    fig, ax = plt.subplots(figsize=(mosaic.shape[1] / 60, mosaic.shape[0] / 60 + 0.5))
    for i in range(n):
        y, x = (i // cols) * (ch + gap) + gap, (i % cols) * (cw + 6)
        mosaic[y : y + ch, x : x + cw] = images[i].repeat_interleave(scale, 1).repeat_interleave(scale, 2).permute(1, 2, 0).numpy()
        ax.text(x, y - 2, captions[i], fontsize=6.5, va="bottom")
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
