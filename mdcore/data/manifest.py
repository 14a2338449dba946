"""The manifest: one row per image (path, domain, label, split, hash, size, mode, source).

Every later stage reads only this table. Its content hash is the dataset version.
"""
from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from mdcore.data.io import sha256_bytes

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
COLUMNS = ["path", "domain", "label", "split", "sha256", "width", "height", "mode", "source", "generator"]
SPLITS = ("train", "val", "test", "gate", "holdout")


class DataLayoutError(ValueError):
    """The image tree does not follow ROOT/<domain>/<class>/<image>, or escapes its root."""


def scan_tree(root: str | Path) -> list[tuple[str, str, str]]:
    """List ``(relative path, domain, class)`` for every image under ``root/<domain>/<class>/``.

    Symlinks and anything that resolves outside ``root`` are refused: a manifest must describe
    files that live in the tree it names. (One ``scandir`` per folder; the entries' types come with it,
    so a tree of 70,000 files is listed in well under a second.)
    """
    root = Path(root)
    if not root.is_dir():
        raise DataLayoutError(f"data root {root} is not a folder")
    real_root = root.resolve()
    rows = []

    def walk(here: Path, rel: tuple[str, ...]) -> None:
        if not here.resolve().is_relative_to(real_root):
            raise DataLayoutError(f"{here}: resolves outside the data root {root}")
        with os.scandir(here) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            if entry.is_symlink():
                raise DataLayoutError(
                    f"{here / entry.name}: symlinks are refused (the path could escape the data root {root})")
        depth = len(rel)
        for entry in entries:  # files first, as os.walk lists them, then the sub-folders
            if entry.name.startswith(".") or entry.is_dir(follow_symlinks=False):
                continue
            suffix = os.path.splitext(entry.name)[1].lower()
            if depth != 2:
                if suffix in IMAGE_EXTENSIONS:
                    raise DataLayoutError(
                        f"{here / entry.name}: images must sit at ROOT/<domain>/<class>/<image>, found at depth {depth}"
                    )
                continue
            if suffix in IMAGE_EXTENSIONS:
                rows.append(("/".join((*rel, entry.name)), rel[0], rel[1]))
        for entry in entries:
            if entry.is_dir(follow_symlinks=False) and not entry.name.startswith("."):
                walk(here / entry.name, (*rel, entry.name))

    walk(root, ())
    if not rows:
        raise DataLayoutError(f"no images found under {root} (expected ROOT/<domain>/<class>/*.png|jpg)")
    return rows


def resolve_in(root: str | Path, rel: str) -> Path:
    """``root / rel``, refusing a manifest path that is absolute or climbs out of ``root`` (``..``)."""
    root = Path(root)
    path = (root / rel)
    if Path(rel).is_absolute() or ".." in Path(rel).parts or not path.resolve().is_relative_to(root.resolve()):
        raise DataLayoutError(f"manifest path {rel!r} escapes its root {root}")
    return path


def describe_bytes(data: bytes) -> tuple[str, int, int, str]:
    """Content hash, width, height and colour mode of one image's bytes; mode ``unreadable`` if they do
    not decode."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # decode fully: a truncated file fails here, not in training
            width, height = img.size
            mode = img.mode
    except Exception:  # recorded, and refused by the validate stage with the file's name
        return sha256_bytes(data), 0, 0, "unreadable"
    return sha256_bytes(data), width, height, mode


def describe_image(path: Path) -> tuple[str, int, int, str]:
    """Content hash, width, height and colour mode of one image (read once); mode ``unreadable`` if it
    does not decode."""
    return describe_bytes(Path(path).read_bytes())


def describe_chunk(root: str, rels: list[str]) -> list[tuple[str, int, int, str]]:
    """:func:`describe_image` of ``root/rel`` for each ``rel`` (a pool worker's unit of work)."""
    return [describe_image(Path(root, rel)) for rel in rels]


def split_of(sha256: str, val_fraction: float, test_fraction: float, seed: int = 0, gate_fraction: float = 0.0) -> str:
    """The split of one image, from its content hash alone: adding or removing other images never moves
    it, and identical content always lands in the same split (no duplicate leaks across splits).

    ``gate`` is the promotion gate's own split: neither trained on, nor selected on, nor reported as test."""
    u = int.from_bytes(hashlib.sha256(f"{seed}/{sha256}".encode()).digest()[:8], "little") / 2.0**64
    for name, share in (("test", test_fraction), ("val", val_fraction), ("gate", gate_fraction)):
        if u < share:
            return name
        u -= share
    return "train"


def assign_splits(
    frame: pd.DataFrame, val_fraction: float, test_fraction: float, holdout_domains: list[str], seed: int,
    gate_fraction: float = 0.0,
) -> pd.Series:
    """Per-domain splits drawn from each file's content hash (``split_of``), so the class mix of every
    split follows the domain's (stratified in expectation); held-out domains go entirely to ``holdout``."""
    split = pd.Series(
        [split_of(h, val_fraction, test_fraction, seed, gate_fraction) for h in frame["sha256"]], index=frame.index, dtype=object)
    split[frame["domain"].isin(holdout_domains)] = "holdout"
    return split


def build_manifest(
    root: str | Path,
    *,
    val_fraction: float = 0.15,
    test_fraction: float = 0.2,
    holdout_domains: list[str] | None = None,
    seed: int = 0,
    workers: int = 0,
    gate_fraction: float = 0.0,
) -> pd.DataFrame:
    """The manifest of the tree at ``root``; images are described by ``workers`` processes (0 = all cores)."""
    root = Path(root)
    holdout_domains = list(holdout_domains or [])
    rows = scan_tree(root)
    domains = sorted({d for _, d, _ in rows})
    unknown = [d for d in holdout_domains if d not in domains]
    if unknown:
        raise DataLayoutError(f"holdout_domains {unknown} not found under {root}; domains there: {domains}")
    if len(set(domains) - set(holdout_domains)) == 0:
        raise DataLayoutError("holdout_domains holds out every domain: nothing is left to train on")
    frame = pd.DataFrame(rows, columns=["path", "domain", "label"])
    from mdcore.data.pool import map_chunks  # files are read and decoded in parallel, once each

    described = map_chunks(describe_chunk, list(frame["path"]), str(root), workers=workers)
    frame["sha256"], frame["width"], frame["height"], frame["mode"] = zip(*described)
    if val_fraction + test_fraction + gate_fraction >= 1:
        raise ValueError(f"val_fraction {val_fraction} + test_fraction {test_fraction} + gate_fraction "
                         f"{gate_fraction} leave nothing to train on")
    frame["split"] = assign_splits(frame, val_fraction, test_fraction, holdout_domains, seed, gate_fraction)
    frame["source"] = "real"
    frame["generator"] = ""
    return frame[COLUMNS].sort_values("path").reset_index(drop=True)


def read_manifest(path: str | Path) -> pd.DataFrame:
    frame = pd.read_csv(path, dtype={"label": str, "domain": str, "generator": str}, keep_default_na=False)
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: manifest lacks columns {missing}")
    return frame


def manifest_csv(frame: pd.DataFrame) -> str:
    return frame[COLUMNS].to_csv(index=False, lineterminator="\n")


def dataset_version(frame: pd.DataFrame) -> str:
    """Content hash of the manifest: same images, labels and splits -> same version."""
    return sha256_bytes(manifest_csv(frame).encode())[:16]


def class_names(frame: pd.DataFrame) -> list[str]:
    return sorted(frame["label"].unique(), key=lambda s: (len(s), s) if s.isdigit() else (1 << 30, s))


def summary(frame: pd.DataFrame) -> dict:
    counts = frame.groupby(["domain", "split"]).size().unstack(fill_value=0)
    return {d: {k: int(v) for k, v in row.items()} for d, row in counts.iterrows()}
