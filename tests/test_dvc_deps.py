"""Every project module a stage's code imports (transitively) is a dependency of that stage in dvc.yaml,
so editing it makes `dvc status` report the stage stale instead of reusing an output built by old code."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = ("mdcore", "tasks", "flows")
SHARED = {"tasks/params.py", "tasks/paths.py", "tasks/stage.py", "tasks/__init__.py", "mdcore/__init__.py",
          "mdcore/data/io.py"}  # the runner every stage goes through: params schema, paths, atomic writes


def module_file(name: str) -> Path | None:
    base = REPO / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    """Project modules imported anywhere in ``path`` (function-level imports included)."""
    names: set[str] = set()
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base]) if base else ".".join(parent)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return {n for n in names if n.split(".")[0] in PROJECT_PACKAGES and module_file(n) is not None}


def closure(start: Path) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        path = todo.pop()
        rel = path.relative_to(REPO).as_posix()
        if rel in seen:
            continue
        seen.add(rel)
        if rel in SHARED:
            continue  # the runner's own imports (method names for params validation) are not stage code
        for name in imported_modules(path):
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ too
                f = module_file(".".join(parts[:i]))
                if f is not None:
                    todo.append(f)
    return seen


def stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", sorted(stages()))
def test_stage_lists_every_project_module_its_code_imports(stage):
    spec = stages()[stage]
    assert spec["cmd"] == f"mdpipe stage {stage}"
    deps = [d if isinstance(d, str) else next(iter(d)) for d in spec["deps"]]
    needed = closure(REPO / "tasks" / f"{stage}.py") - SHARED
    missing = sorted(f for f in needed if not any(f == d or f.startswith(d.rstrip("/") + "/") for d in deps))
    assert not missing, f"dvc.yaml stage {stage!r} lacks deps on {missing}"


def test_dvc_lock_is_not_git_ignored():
    """DVC refuses a git-ignored dvc.lock (FileIsGitIgnored): every run of a fresh clone would stop at its
    first stage. The test workspaces write their own .gitignore, so only this checks the repository's."""
    import subprocess

    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    ignored = subprocess.run(["git", "check-ignore", "-q", "dvc.lock"], cwd=REPO).returncode == 0
    assert not ignored, ".gitignore ignores dvc.lock: DVC then refuses to record any stage"
