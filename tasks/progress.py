"""Live progress of a Ray Train job on the driver: one console line per epoch and, inside a Prefect run,
a progress artifact the UI updates while fine-tuning runs.

Rank 0 appends each epoch's metrics to a JSON-lines file in the run's storage folder (on a cluster that
folder is on shared storage); a thread here follows the file. Nothing in it can fail the training.
"""
from __future__ import annotations

import contextvars
import json
import logging
import threading
from pathlib import Path


def _prefect_run_active() -> bool:
    try:  # the Ray job also runs where Prefect is not installed (bench/gpu_check.py)
        from prefect.context import FlowRunContext, TaskRunContext
    except ImportError:
        return False

    return TaskRunContext.get() is not None or FlowRunContext.get() is not None


class EpochProgress:
    """``with EpochProgress(file, epochs, log): trainer.fit()`` reports every epoch as it finishes."""

    def __init__(self, file: Path, epochs: int, log: logging.Logger, poll_s: float = 1.0):
        self.file, self.epochs, self.log, self.poll_s = Path(file), epochs, log, poll_s
        self.offset = self.file.stat().st_size if self.file.is_file() else 0  # a resumed run: only new epochs
        self.rows: list[dict] = []
        self.artifact_id = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "EpochProgress":
        if _prefect_run_active():
            try:
                from prefect.artifacts import create_progress_artifact

                self.artifact_id = create_progress_artifact(
                    progress=0.0, key="finetune-progress", description="finetune: share of epochs done")
            except Exception as e:  # noqa: BLE001 - progress must never fail a run
                self.log.debug("no progress artifact: %s", e)
        ctx = contextvars.copy_context()  # the Prefect run context, for the artifact updates
        self._thread = threading.Thread(target=ctx.run, args=(self._follow,), daemon=True, name="epoch-progress")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.poll()  # the last epochs written just before fit() returned

    def _follow(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.poll()

    def poll(self) -> list[dict]:
        """Read the epochs written since the last call and report them."""
        try:
            with open(self.file) as f:
                f.seek(self.offset)
                text = f.read()
        except FileNotFoundError:
            return []
        complete = text[: text.rfind("\n") + 1]  # a line still being written waits for the next poll
        self.offset += len(complete.encode())
        new = [json.loads(line) for line in complete.splitlines() if line.strip()]
        for row in new:
            self.rows.append(row)
            self.log.info("finetune epoch %d/%d: loss %.4f, train_acc %.3f, val_acc %.3f (%.0f img/s)",
                          row["epoch"], row.get("epochs", self.epochs), row["train_loss"], row["train_acc"],
                          row["val_acc"], row["images_per_s"])
            if self.artifact_id is not None:
                try:
                    from prefect.artifacts import update_progress_artifact

                    update_progress_artifact(self.artifact_id, progress=100.0 * row["epoch"] / self.epochs)
                except Exception as e:  # noqa: BLE001
                    self.log.debug("progress artifact not updated: %s", e)
        return new
