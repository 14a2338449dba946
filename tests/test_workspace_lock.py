"""One run at a time per workspace: a second process is refused (or waits), a killed holder frees it."""
import subprocess
import sys
import time

import pytest

from mdcore.data.workspace_lock import WorkspaceBusy, holder, workspace_lock

HOLD = """
import sys, time
from mdcore.data.workspace_lock import workspace_lock
with workspace_lock(sys.argv[1], "test holder"):
    print("held", flush=True)
    time.sleep(60)
"""


def start_holder(root):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(root)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_process_is_refused_with_the_holder_named_and_a_killed_holder_frees_it(tmp_path):
    proc = start_holder(tmp_path)
    try:
        with pytest.raises(WorkspaceBusy, match=f"pid {proc.pid}.*test holder"):
            with workspace_lock(tmp_path, "second", wait=False):
                pass
    finally:
        proc.kill()
        proc.wait()
    with workspace_lock(tmp_path, "after the kill", wait=False):  # the OS released the dead holder's lock
        assert holder(tmp_path)["what"] == "after the kill"


def test_waiting_run_says_so_and_goes_on_when_the_holder_finishes(tmp_path):
    proc = start_holder(tmp_path)
    said = []
    t0 = time.monotonic()
    import threading

    threading.Timer(1.0, proc.kill).start()
    with workspace_lock(tmp_path, "waiter", poll_s=0.1, log=said.append):
        waited = time.monotonic() - t0
    proc.wait()
    assert waited >= 0.9 and len(said) == 1 and "busy" in said[0] and "waiting" in said[0]


def test_reentrant_within_a_process(tmp_path):
    with workspace_lock(tmp_path, "flow", wait=False):
        with workspace_lock(tmp_path, "stage inside the flow", wait=False):
            assert holder(tmp_path)["what"] == "flow"
    with workspace_lock(tmp_path, "next", wait=False):
        pass
