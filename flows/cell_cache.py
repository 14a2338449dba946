"""The code version that keys cached experiment cells (``flows/lodo.py``, ``flows/continual.py``).

A cell's result depends on its params, its data and the code that trains it. :func:`code_version` is a
digest of that code: every ``.py`` file under ``mdcore/`` and the modules a cell's training runs
(:data:`CELL_SOURCES`), by path and content. Any change to them gives cells new keys, so a rerun never
reuses a cell trained by other code. The flows compute it once per run and put it in every cell's spec.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

# the source a cell's training imports: the whole core library and the cell modules outside it
CELL_SOURCES = ("mdcore", "flows/lodo_cell.py", "flows/continual_cell.py", "tasks/params.py")
SOURCE_ROOT = Path(__file__).resolve().parent.parent  # the folder holding mdcore/, flows/ and tasks/


def source_files(root: Path, sources=CELL_SOURCES) -> list[str]:
    """Paths (relative to ``root``, ``/``-separated, sorted) of the .py files of ``sources``: folders are
    searched recursively (``__pycache__`` aside), files taken as they are, even when missing."""
    files = set()
    for name in sources:
        path = root / name
        if path.is_dir():
            files.update(p.relative_to(root).as_posix() for p in path.rglob("*.py") if "__pycache__" not in p.parts)
        else:
            files.add(Path(name).as_posix())
    return sorted(files)


def code_version(root: str | Path | None = None, sources=CELL_SOURCES) -> str:
    """sha256 (hex) over the path and the content's sha256 of every source file a cell's training imports,
    in sorted order; a missing file counts as such. ``root``: the source tree (default: this checkout's)."""
    root = Path(root) if root is not None else SOURCE_ROOT
    h = hashlib.sha256()
    for rel in source_files(root, sources):
        path = root / rel
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing"
        h.update(f"{rel}\0{digest}\n".encode())
    return h.hexdigest()
