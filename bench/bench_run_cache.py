"""Switching a parameter back restores from DVC's run-cache instead of training: time it.

In a throwaway copy of the project (small params so the first runs are quick), `dvc repro`, change
`finetune.lr`, `dvc repro` (trains), change it back, then time `dvc repro` (restored: nothing trains) and
the same with `dvc exp run`. Usage: python -m bench.bench_run_cache [--workdir /tmp/mdpipe-run-cache]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMALL = {"ingest": {"builtin_limit": 500}, "pretrain": {"epochs": 1}, "synthesize": {"target_per_class": 8},
         "finetune": {"epochs": 2, "batch_size": 64}, "validate": {"min_images_per_class": 0}}


def sh(*cmd, cwd, env=None) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/mdpipe-run-cache")
    args = ap.parse_args()
    ws = Path(args.workdir)
    shutil.rmtree(ws, ignore_errors=True)
    ws.mkdir(parents=True)
    for name in ("dvc.yaml", "paths.yaml", ".dvcignore"):
        shutil.copy(REPO / name, ws / name)
    for folder in ("params", "mdcore", "tasks"):
        shutil.copytree(REPO / folder, ws / folder, ignore=shutil.ignore_patterns("__pycache__"))
    (ws / ".gitignore").write_text("/data/\n/models/\n/reports/\n/registry/\n__pycache__/\n.mdpipe/\n")
    sys.path.insert(0, str(REPO))
    from tasks.params import apply_overrides

    apply_overrides(ws / "params", SMALL)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    git = ("git", "-c", "user.email=b@b", "-c", "user.name=b")
    sh("git", "init", "-q", cwd=ws)
    sh(sys.executable, "-m", "dvc", "init", "-q", cwd=ws, env=env)
    sh(*git, "add", "-A", cwd=ws)
    sh(*git, "commit", "-qm", "init", cwd=ws)
    lr = float(__import__("yaml").safe_load((ws / "params/finetune.yaml").read_text())["lr"])
    results = {}

    def repro(label: str, *cmd: str) -> None:
        t0 = time.perf_counter()
        out = sh(sys.executable, "-m", "dvc", *cmd, cwd=ws, env=env)
        ran = sorted(set(re.findall(r"Running stage '(\w+)'", out.stdout)))
        cached = sorted(set(re.findall(r"Stage '(\w+)' is cached", out.stdout)))
        results[label] = {"wall_s": round(time.perf_counter() - t0, 1), "ran": ran, "restored": cached}
        print(label, json.dumps(results[label]), flush=True)

    repro("first dvc repro", "repro")
    apply_overrides(ws / "params", {"finetune": {"lr": lr / 2}})
    repro("lr halved: dvc repro", "repro")
    apply_overrides(ws / "params", {"finetune": {"lr": lr}})
    repro("lr back: dvc repro", "repro")
    apply_overrides(ws / "params", {"finetune": {"lr": lr / 2}})
    repro("lr halved again: dvc repro", "repro")
    sh(*git, "add", "-A", cwd=ws)
    sh(*git, "commit", "-qm", "lr/2", cwd=ws)
    repro("lr back: dvc exp run", "exp", "run", "-S", f"params/finetune.yaml:lr={lr}")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
