"""A small process pool for per-file work (hashing, decoding): chunks of items go to worker processes,
results come back in order. Small inputs run in this process, where a pool would cost more than it saves.

Workers start from a fork server (not a plain ``fork`` of this process, which may hold threads of a
Prefect or Ray client), with the modules that do the work imported once, before the workers fork.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")

PRELOAD = ["numpy", "PIL.Image", "PIL.PngImagePlugin", "PIL.JpegImagePlugin", "mdcore.data.imagecheck", "mdcore.data.manifest"]


def available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def resolve_workers(workers: int) -> int:
    """``0`` = every core this process may use; otherwise ``workers`` (at least 1)."""
    return available_cores() if workers <= 0 else max(1, int(workers))


def _context(extra_preload: Sequence[str] = ()):
    """The start method for workers, or None where workers cannot start (then the work runs here).
    ``extra_preload``: more modules the fork server imports once, before any worker forks from it (only the
    first call of a process starts the server, so only its list counts)."""
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if main_file and not os.path.isfile(main_file):  # e.g. a script read from stdin: workers could not import it
        return None
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        # "__main__" first: the workers then inherit the main module instead of each importing it again
        ctx.set_forkserver_preload(["__main__", *PRELOAD, *extra_preload])
        return ctx
    return mp.get_context("spawn")


def map_chunks(
    fn: Callable[..., list[R]],
    items: Sequence[T],
    *args,
    workers: int = 0,
    chunk_size: int = 1024,
    min_parallel: int = 2000,
    progress: Callable[[int, int], None] | None = None,
) -> list[R]:
    """``fn(*args, chunk) -> list`` over consecutive chunks of ``items``; the lists joined, in order.

    Runs in this process when there is one worker or fewer than ``min_parallel`` items. ``fn`` must be a
    module-level function (it is pickled by name). ``progress(done, total)`` is called after each chunk.
    """
    n_workers = resolve_workers(workers)
    context = _context() if n_workers > 1 else None
    out: list[R] = []
    if context is None or len(items) < max(1, min_parallel):
        for i in range(0, len(items), chunk_size):
            out.extend(fn(*args, list(items[i : i + chunk_size])))
            if progress is not None:
                progress(min(i + chunk_size, len(items)), len(items))
        return out
    # at least 4 chunks per worker so a slow chunk does not leave a core idle at the end
    size = max(1, min(chunk_size, -(-len(items) // (4 * n_workers))))
    chunks = [list(items[i : i + size]) for i in range(0, len(items), size)]
    with ProcessPoolExecutor(max_workers=min(n_workers, len(chunks)), mp_context=context) as pool:
        for part in pool.map(fn, *[[a] * len(chunks) for a in args], chunks):
            out.extend(part)
            if progress is not None:
                progress(len(out), len(items))
    return out


def progress_logger(log: Callable[[str], None], what: str, every_s: float = 10.0) -> Callable[[int, int], None]:
    """A ``progress`` callback that logs ``what: done/total (pct)`` at most every ``every_s`` seconds, and
    at the end when the work took longer than that: long runs show progress, short ones stay quiet."""
    import time

    start = last = time.monotonic()

    def report(done: int, total: int) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= every_s or (done == total and now - start >= every_s):
            last = now
            log(f"{what}: {done:,}/{total:,} ({100 * done / max(total, 1):.0f} %)")

    return report
