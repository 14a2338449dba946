"""Shared fixtures: tiny built-in datasets and throwaway workspaces (git + DVC + params)."""
from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

for key, value in {
    "DVC_NO_ANALYTICS": "1", "GX_ANALYTICS_ENABLED": "false", "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "TQDM_DISABLE": "1",
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
    # as `mdpipe` sets it: on a loaded 2-core machine the ephemeral server can take longer than the default
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
}.items():
    os.environ.setdefault(key, value)
# Tests never touch the user's Prefect state: their own database (a temporary PREFECT_HOME), no server of theirs.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="mdpipe-tests-prefect-")
# registered before Prefect is imported, so it runs after Prefect's own exit hook stops the temporary server
atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], ignore_errors=True)
os.environ.pop("PREFECT_API_URL", None)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def scratch_caches(tmp_path_factory):
    """Ray Train's run storage and the decoded-image cache go to the session's temporary folder, not the
    user's ~/.cache/mdpipe (which is what a pipeline run uses)."""
    for key, name in {"MDPIPE_RAY_STORAGE": "ray_results", "MDPIPE_DECODED_CACHE": "decoded"}.items():
        os.environ[key] = str(tmp_path_factory.mktemp(name))
    yield


@pytest.fixture(scope="session")
def builtin_tree(tmp_path_factory) -> Path:
    """The full built-in dataset (1,797 digits, 4 domains), made once per session."""
    from mdcore.data.builtin import materialize

    root = tmp_path_factory.mktemp("builtin") / "tree"
    materialize(root, seed=0)
    return root


def make_workspace(dest: Path, **param_overrides: dict) -> Path:
    """A project workspace like a fresh clone (dvc.yaml, paths.yaml, params/, mdcore/, tasks/, git + DVC) on the
    demo profile, the fast one, with the test's own values laid over it."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", "paths.yaml", ".dvcignore"):
        shutil.copy(REPO / name, dest / name)
    for folder in ("params", "mdcore", "tasks"):
        shutil.copytree(REPO / folder, dest / folder, ignore=shutil.ignore_patterns("__pycache__"))
    (dest / ".gitignore").write_text("/data/\n/models/\n/reports/\n/registry/\n__pycache__/\n.mdpipe/\n")
    run = lambda *cmd: subprocess.run(cmd, cwd=dest, check=True, capture_output=True)  # noqa: E731
    run("git", "init", "-q")
    run("git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "init")
    from dvc.repo import Repo

    Repo.init(str(dest))
    from tasks.params import apply_overrides, with_profile

    apply_overrides(dest / "params", with_profile(dest / "params", "demo", param_overrides))
    return dest


@pytest.fixture
def workspace(tmp_path) -> Path:
    # tiny data, and no pruned variant in the stage runs (about 25 s each; test_compress builds and scores
    # one through the same code)
    return make_workspace(tmp_path / "ws", ingest={"builtin_limit": 500}, validate={"min_images_per_class": 0},
                          compress={"prune_ratio": 0.0})
