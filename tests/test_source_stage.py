"""An external data tree is a real dependency: `dvc repro` reruns ingest when a file of the tree was
added, and only then (the source stage writes the tree's listing; ingest depends on it)."""
import os
import re
import subprocess
import sys
from pathlib import Path

from mdcore.data.builtin import BuiltinSpec, materialize
from tasks.params import IngestParams
from tasks.source import fingerprint
from tests.conftest import make_workspace


def test_fingerprint_follows_the_tree_and_names_a_missing_folder(tmp_path):
    tree = tmp_path / "tree"
    (tree / "a" / "x").mkdir(parents=True)
    (tree / "a" / "x" / "1.png").write_bytes(b"1")
    params = IngestParams(data_root=str(tree), holdout_domains=[])
    first = fingerprint(params, tmp_path)
    assert fingerprint(params, tmp_path) == first
    (tree / "a" / "x" / "2.png").write_bytes(b"2")
    assert fingerprint(params, tmp_path)["listing_sha256"] != first["listing_sha256"]
    missing = IngestParams(data_root=str(tmp_path / "nowhere"), holdout_domains=[])
    try:
        fingerprint(missing, tmp_path)
    except FileNotFoundError as e:
        assert "nowhere" in str(e) and "ingest.data_root" in str(e)
    else:
        raise AssertionError("a missing data_root must be an error")


def test_dvc_repro_reruns_ingest_when_the_external_tree_changed(tmp_path):
    tree = tmp_path / "tree"
    materialize(tree, seed=3, spec=BuiltinSpec(limit=120))
    ws = make_workspace(tmp_path / "ws", ingest={"data_root": str(tree), "holdout_domains": []})
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")

    def repro() -> set[str]:
        out = subprocess.run([sys.executable, "-m", "dvc", "repro", "ingest"], cwd=ws, capture_output=True,
                             text=True, env=env, timeout=300)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        return set(re.findall(r"Running stage '(\w+)'", out.stdout))

    assert repro() == {"source", "ingest"}
    assert repro() == {"source"}  # same tree: ingest is up to date
    some = next(tree.glob("*/*/*.png"))
    (some.parent / "added.png").write_bytes(some.read_bytes())
    assert repro() == {"source", "ingest"}


def test_dvc_bookkeeping_targets_the_workspace_not_the_current_directory(tmp_path, monkeypatch):
    """A served deployment runs with ``--root WS`` from anywhere (here: the project, whose dvc.yaml has
    stages of the same names): the stage recorded and checked must be the workspace's."""
    from flows import dvc_sync
    from tasks.stage import execute
    from tests.conftest import REPO

    ws = make_workspace(tmp_path / "ws", ingest={"builtin_limit": 80, "holdout_domains": []})
    monkeypatch.chdir(REPO)
    for stage in ("source", "ingest"):
        execute(stage, ws)
        dvc_sync.record(ws, stage)
    assert not dvc_sync.is_stale(ws, "ingest")
    assert dvc_sync.is_stale(ws, "validate")
    assert "ingest" in (ws / "dvc.lock").read_text()


def test_retrain_fingerprint_follows_the_source_listing(tmp_path):
    from flows.retrain import data_fingerprint

    tree = tmp_path / "tree"
    (tree / "a" / "x").mkdir(parents=True)
    (tree / "a" / "x" / "1.png").write_bytes(b"1")
    ws = make_workspace(tmp_path / "ws", ingest={"data_root": str(tree), "holdout_domains": []})
    first = data_fingerprint(ws)
    assert data_fingerprint(ws) == first
    (tree / "a" / "x" / "2.png").write_bytes(b"2")
    assert data_fingerprint(ws) != first
