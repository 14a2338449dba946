"""Keeping DVC in step with runs made through Prefect: ask whether a stage is stale, and record a stage
that ran outside ``dvc repro`` in dvc.lock (so ``dvc status`` is clean and ``dvc repro`` a no-op)."""
from __future__ import annotations

import os
import threading
from pathlib import Path

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
_lock = threading.Lock()  # two dvc operations on one repo at once fail on its rwlock


def is_stale(root: str | Path, stage: str) -> bool:
    from dvc.repo import Repo

    with _lock, Repo(str(root)) as repo:
        return bool(repo.status(targets=[stage]))


def record(root: str | Path, stage: str) -> None:
    from dvc.repo import Repo

    with _lock, Repo(str(root)) as repo:
        repo.commit(stage, force=True)
