"""One run at a time per workspace: an OS file lock (``fcntl.flock``) on ``.mdpipe/run.lock``.

Two runs on one workspace (a scheduled and a manual one, a deployment and ``dvc repro``) would write the
same data, models and dvc.lock. The OS releases the lock when its process dies, so a killed run never
leaves the workspace locked. Re-entrant within a process: the pipeline flow holds it and the stages it
calls in-process take it again for free.
"""
from __future__ import annotations

import fcntl
import json
import os
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

_held: dict[str, tuple[int, int]] = {}  # lock path -> (fd, depth) for this process
_guard = threading.Lock()


class WorkspaceBusy(RuntimeError):
    """Another process holds the workspace; the message says which run and how to wait for it."""


def lock_path(root: str | Path) -> Path:
    return Path(root).resolve() / ".mdpipe" / "run.lock"


def holder(root: str | Path) -> dict:
    """What the lock file says about the run holding it (empty when none ever held it)."""
    try:
        return json.loads(lock_path(root).read_text() or "{}")
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def describe(info: dict) -> str:
    if not info:
        return "another mdpipe run"
    return (f"the run started {info.get('started', '?')} by pid {info.get('pid', '?')} "
            f"({info.get('what', '?')})")


@contextmanager
def workspace_lock(root: str | Path, what: str, wait: bool = True, poll_s: float = 2.0, log=None):
    """Hold the workspace for ``what``. Busy: wait (``wait=True``, saying so once) or raise WorkspaceBusy."""
    path = lock_path(root)
    key = str(path)
    with _guard:
        if key in _held:
            fd, depth = _held[key]
            _held[key] = (fd, depth + 1)
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield
        finally:
            with _guard:
                fd, depth = _held[key]
                _held[key] = (fd, depth - 1)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    announced = False
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                busy = (f"workspace {Path(root).resolve()} is busy: {describe(holder(root))} is still running "
                        f"(lock {path})")
                if not wait:
                    raise WorkspaceBusy(busy + "; try again when it has finished, or let this run wait for it")
                if not announced and log is not None:
                    log(busy + "; waiting for it to finish")
                announced = True
                time.sleep(poll_s)
        info = {"pid": os.getpid(), "what": what, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "argv": sys.argv[:6]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        with _guard:
            _held[key] = (fd, 1)
        try:
            yield
        finally:
            with _guard:
                del _held[key]
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # closing the descriptor releases the flock
