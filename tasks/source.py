"""source: fingerprint of the data the pipeline reads, so an external tree is a real DVC dependency.

DVC cannot hash a folder outside the workspace cheaply on every status, and the user's tree is not ours
to track. This stage runs on every ``dvc repro`` (``always_changed``) and writes the tree's listing
(relative path, size, modification time of every file) to ``data/source.json``; ingest depends on that
file, so it reruns exactly when a file was added, removed or rewritten, and DVC's run-cache restores a
tree it has seen before. A built-in dataset's fingerprint is its name (its code is ingest's dependency).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from mdcore.data.io import atomic_write_text
from tasks.params import IngestParams
from tasks.paths import Paths
from tasks.stage import StageResult, execute


def tree_listing(root: Path) -> list[str]:
    rows = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.name.startswith("."):
            st = p.stat()
            rows.append(f"{p.relative_to(root).as_posix()}|{st.st_size}|{st.st_mtime_ns}")
    return rows


def _listed(value: str, field: str, root: Path) -> tuple[Path, list[str], str]:
    source = Path(value).expanduser()
    source = source if source.is_absolute() else root / source
    if not source.is_dir():
        raise FileNotFoundError(f"{field} {source} is not a folder (params/ingest.yaml)")
    rows = tree_listing(source)
    return source, rows, hashlib.sha256("\n".join(rows).encode()).hexdigest()


def fingerprint(params: IngestParams, root: Path) -> dict:
    if not params.data_root:
        info = {"kind": "builtin", "builtin": params.builtin}
    else:
        source, rows, digest = _listed(params.data_root, "ingest.data_root", root)
        info = {"kind": "tree", "data_root": str(source.resolve()), "files": len(rows), "listing_sha256": digest}
    if params.unlabelled_root:
        source, rows, digest = _listed(params.unlabelled_root, "ingest.unlabelled_root", root)
        info["unlabelled"] = {"root": str(source.resolve()), "files": len(rows), "listing_sha256": digest}
    return info


def run(params: IngestParams, paths: Paths) -> StageResult:
    info = fingerprint(params, paths.root)
    atomic_write_text(paths.source, json.dumps(info, indent=2, sort_keys=True) + "\n")
    return StageResult(outputs={"source": str(paths.source)}, metrics=dict(info))


def _source_task(root: str = ".") -> dict:
    return execute("source", root)


def __getattr__(name: str):
    """``source_task``, the Prefect task, made on first use: ``dvc repro`` runs this stage every time, and
    importing Prefect would triple its cost (a no-op ``dvc repro`` in under 3 s)."""
    if name == "source_task":
        from prefect import task

        globals()["source_task"] = task(name="source", retries=0)(_source_task)
        return globals()["source_task"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
