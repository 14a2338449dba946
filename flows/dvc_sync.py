"""Keeping DVC in step with runs made through Prefect: ask whether a stage is stale, and record a stage
that ran outside ``dvc repro`` in dvc.lock (so ``dvc status`` is clean and ``dvc repro`` a no-op)."""
from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
_lock = threading.Lock()  # two dvc operations on one repo at once fail on its rwlock


def _target(root: str | Path, stage: str) -> str:
    """``/abs/root/dvc.yaml:stage``: a bare stage name is resolved against the current directory, which
    for a served deployment (``mdpipe --root WS serve``) is not the workspace (DVC also refuses to work
    from inside another DVC repo, hence the chdir around each call)."""
    return f"{Path(root).resolve() / 'dvc.yaml'}:{stage}"


def is_stale(root: str | Path, stage: str) -> bool:
    from dvc.repo import Repo

    with _lock, contextlib.chdir(root), Repo(str(root)) as repo:
        return bool(repo.status(targets=[_target(root, stage)]))


def record(root: str | Path, stage: str) -> None:
    from dvc.repo import Repo

    with _lock, contextlib.chdir(root), Repo(str(root)) as repo:
        repo.commit(_target(root, stage), force=True)
