"""Reading the training manifest into memory, the same way in every stage and every Ray worker."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from mdcore.data.decode import DEFAULT_RESIZE
from mdcore.data.images import ImageSet, load_images
from mdcore.data.manifest import class_names, read_manifest


def image_roots(raw: str | Path, synthetic: str | Path) -> dict[str, Path]:
    return {"real": Path(raw), "synthetic": Path(synthetic)}


def seen_domains(frame: pd.DataFrame) -> list[str]:
    """Domains with training rows (held-out domains have none)."""
    return sorted(frame.loc[frame["split"] == "train", "domain"].unique())


def load_split(
    manifest: str | Path, roots: dict[str, Path], size: int, splits: tuple[str, ...], *,
    synthetic: bool = True, domains: list[str] | None = None, classes: list[str] | None = None,
    lazy: bool = False, cache_dir: str | Path | None = None, resize: str = DEFAULT_RESIZE,
) -> tuple[ImageSet, pd.DataFrame]:
    frame = read_manifest(manifest)
    domains = domains if domains is not None else seen_domains(frame)
    classes = classes if classes is not None else class_names(frame)
    rows = frame[frame["split"].isin(splits) & (synthetic | (frame["source"] == "real"))]
    return load_images(rows, roots, size, domains, classes, lazy=lazy, cache_dir=cache_dir, resize=resize), rows


def guard_holdout(manifest: str | Path, used: dict[str, pd.DataFrame]) -> None:
    """Raise ``mdcore.eval.lodo.LeakageError`` if any held-out image (by path or content) is among ``used``
    (role -> rows): held-out domains measure generalization only if nothing of them was learned from."""
    from mdcore.eval.lodo import assert_no_leak

    frame = read_manifest(manifest)
    assert_no_leak(frame[frame["split"] == "holdout"], used)
