"""Images without labels (``ingest.unlabelled_root``): what self-supervised pretraining may also learn from.

Labels are the scarce part: a site often has thousands of images and a few dozen labelled ones. Continued
pretraining pays when it sees more images than fine-tuning does (BENCHMARKS.md, "Resize filter, the
frozen-backbone recipes and continued pretraining from ImageNet"), so these images join the pretrain stage's
SimCLR and nothing else. The layout is ``ROOT/<domain>/.../<image>``: the first folder names the domain (the
domain-aware view mixes across domains), deeper folders are free. Ingest copies them into the workspace
(``paths.unlabelled``) with a listing, so DVC versions them like the labelled tree.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pandas as pd

from mdcore.data.io import sha256_file
from mdcore.data.manifest import IMAGE_EXTENSIONS, DataLayoutError

LISTING = "listing.csv"
COLUMNS = ["path", "domain", "sha256"]


def scan_unlabelled(root: str | Path, field: str = "ingest.unlabelled_root") -> list[tuple[str, str]]:
    """``(relative path, domain)`` of every image under ``root/<domain>/``; symlinks and images directly
    under ``root`` (no domain) are errors that name the file and ``field``."""
    root = Path(root)
    if not root.is_dir():
        raise DataLayoutError(f"{field} {root} is not a folder")
    rows = []
    for here, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel = Path(here).relative_to(root)
        for name in sorted(files):
            path = Path(here) / name
            if name.startswith(".") or path.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            if path.is_symlink():
                raise DataLayoutError(f"{path}: symlinks are refused in {field}")
            if rel == Path("."):
                raise DataLayoutError(f"{path}: {field} lays images out as ROOT/<domain>/<image>; this one has no domain")
            rows.append(((rel / name).as_posix(), rel.parts[0]))
        for d in dirs:
            if (Path(here) / d).is_symlink():
                raise DataLayoutError(f"{Path(here) / d}: symlinks are refused in {field}")
    if not rows:
        raise DataLayoutError(f"{field} {root} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return rows


def copy_unlabelled(source: str | Path, dest: Path, scanned: list[tuple[str, str]] | None = None) -> pd.DataFrame:
    """Copy the images of ``source`` (``scanned``: its :func:`scan_unlabelled` rows, when already listed) into
    ``dest`` and write ``dest/listing.csv`` (path, domain, sha256)."""
    rows = []
    for rel, domain in scanned if scanned is not None else scan_unlabelled(source):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(source) / rel, target)
        rows.append((rel, domain, sha256_file(target)))
    return write_listing(dest, pd.DataFrame(rows, columns=COLUMNS))


def write_listing(dest: Path, frame: pd.DataFrame | None = None) -> pd.DataFrame:
    """Write (and return) the listing; written even when there are no images, so the folder is always a DVC
    output."""
    frame = frame if frame is not None else pd.DataFrame(columns=COLUMNS)
    frame.to_csv(dest / LISTING, index=False)
    return frame


def read_listing(folder: str | Path) -> pd.DataFrame:
    """The listing of ``folder`` (empty when the folder or listing is missing: a workspace from before)."""
    file = Path(folder) / LISTING
    if not file.is_file():
        return pd.DataFrame(columns=COLUMNS)
    return pd.read_csv(file, dtype=str, keep_default_na=False)


def usable_for_pretraining(listing: pd.DataFrame, manifest: pd.DataFrame, holdout_allowed: bool,
                           field: str = "ingest.unlabelled_root") -> tuple[pd.DataFrame, int]:
    """The unlabelled rows pretraining may see, and how many were dropped because their content equals a
    labelled image outside the training split (validation, test, gate or held-out: what chooses, promotes or
    reports must stay unseen). Images of a held-out domain are an error unless ``holdout_allowed`` (domain
    adaptation, ``pretrain.include_holdout_unlabelled``)."""
    holdout_domains = set(manifest.loc[manifest["split"] == "holdout", "domain"])
    leaking = sorted(set(listing["domain"]) & holdout_domains)
    if leaking and not holdout_allowed:
        raise DataLayoutError(
            f"{field} has images of the held-out domain(s) {leaking}: pretraining on them would adapt to the "
            "domain the run measures generalization on; move them out, or set "
            "pretrain.include_holdout_unlabelled: true for domain adaptation")
    seen_splits = ["train", "holdout"] if holdout_allowed else ["train"]
    protected = set(manifest.loc[~manifest["split"].isin(seen_splits), "sha256"])
    keep = ~listing["sha256"].isin(protected)
    return listing[keep].reset_index(drop=True), int((~keep).sum())
