"""ingest: materialize the image tree (built-in digits, or a copy of the user's tree) and its manifest."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

from prefect import task

from mdcore.data.builtin import BuiltinSpec, materialize
from mdcore.data.io import atomic_dir, atomic_write_text
from mdcore.data.manifest import DataLayoutError, build_manifest, dataset_version, manifest_csv, scan_tree, summary
from mdcore.data.unlabelled import copy_unlabelled, scan_unlabelled, write_listing
from tasks.params import StageParams, IngestParams
from tasks.paths import Paths
from tasks.stage import StageResult, execute

log = logging.getLogger("mdpipe.ingest")


def copy_tree(source: Path, dest: Path) -> int:
    """Copy the images of ``source`` (checked: no symlinks, nothing outside it) into ``dest``."""
    rows = scan_tree(source)
    for rel, _, _ in rows:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / rel, target)
    return len(rows)


def run(params: IngestParams, paths: Paths) -> StageResult:
    # a layout error stops the stage before it replaces anything
    unlabelled_rows = scan_unlabelled(_resolve(params.unlabelled_root, paths)) if params.unlabelled_root else None
    with atomic_dir(paths.raw) as tmp:
        if params.data_root:
            source = _resolve(params.data_root, paths)
            if source.resolve() == paths.raw.resolve():
                raise DataLayoutError(f"ingest.data_root {source} is the pipeline's own copy {paths.raw}")
            n = copy_tree(source, tmp)
            log.info("copied %d images from %s", n, source)
            origin = str(source.resolve())
        elif params.builtin == "glyphs":
            from mdcore.data.glyphs import materialize as render_glyphs, per_class_for

            counts = render_glyphs(tmp, seed=params.seed, per_class=per_class_for(params.builtin_limit))
            log.info("built-in glyphs: %s", counts)
            origin = "builtin:matplotlib-typeface-glyphs"
        else:
            counts = materialize(tmp, seed=params.seed, spec=BuiltinSpec(limit=params.builtin_limit))
            log.info("built-in digits: %s", counts)
            origin = "builtin:sklearn-digits"
        frame = build_manifest(
            tmp,
            val_fraction=params.val_fraction,
            test_fraction=params.test_fraction,
            gate_fraction=params.gate_fraction,
            holdout_domains=params.holdout_domains,
            seed=params.seed,
        )
    unlabelled = _ingest_unlabelled(params, paths, unlabelled_rows)
    atomic_write_text(paths.manifest, manifest_csv(frame))
    domains = sorted(frame["domain"].unique())
    metrics = {
        "source": origin,
        "images": len(frame),
        "domains": domains,
        "classes": sorted(frame["label"].unique()),
        "holdout_domains": params.holdout_domains,
        "per_domain": summary(frame),
        "dataset_version": dataset_version(frame),
        "unlabelled_images": len(unlabelled),
        "unlabelled_per_domain": unlabelled["domain"].value_counts().sort_index().to_dict() if len(unlabelled) else {},
    }
    return StageResult({"raw": str(paths.raw), "manifest": str(paths.manifest)}, metrics)


def _resolve(folder: str, paths: Paths) -> Path:
    source = Path(folder).expanduser()
    return source if source.is_absolute() else paths.root / source


def _ingest_unlabelled(params: IngestParams, paths: Paths, scanned: list[tuple[str, str]] | None):
    """Copy ``ingest.unlabelled_root`` (images without labels, for pretraining) into ``paths.unlabelled``;
    without one the folder holds an empty listing, so it is always the same DVC output."""
    with atomic_dir(paths.unlabelled) as tmp:
        if not params.unlabelled_root:
            return write_listing(tmp)
        source = _resolve(params.unlabelled_root, paths)
        frame = copy_unlabelled(source, tmp, scanned)
        log.info("copied %d unlabelled images from %s", len(frame), source)
        return frame


@task(name="ingest")
def ingest_task(root: str = ".", params: StageParams | None = None) -> dict:
    """Prefect task: the ingest stage."""
    return execute("ingest", root, params)
