"""Wall time of the evaluate stage against the stage as it was before issue 26 (a git revision), on one
workspace after ``make demo``, alternating, each run in a fresh process (lazy imports included, as the
first run of a flow pays them); and the label_issues stage's own time. Each version runs with its own
default evaluate params (device cpu); outputs in reports/evaluate are rewritten, nothing else is touched.

    python -m bench.bench_evaluate --workspace PATH [--baseline 1246eae] [--repeats 3] [--threads 2]

Writes bench/results/evaluate_time.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TIMED = """
import sys, time, torch
torch.set_num_threads({threads})
from tasks.paths import load_paths
from tasks.params import {cls}
import timm  # noqa: F401  (a flow has it loaded before any stage; a fresh process pays it once)
from tasks import {stage}
paths = load_paths({workspace!r})
t0 = time.perf_counter()
{stage}.run({cls}(device="cpu"), paths)
print("SECONDS", time.perf_counter() - t0)
"""


def timed(code_root: Path, workspace: Path, stage: str, cls: str, threads: int) -> float:
    env = dict(os.environ, PYTHONPATH=str(code_root), OMP_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, "-c", TIMED.format(threads=threads, cls=cls, stage=stage,
                                                             workspace=str(workspace))],
                         cwd=code_root, env=env, capture_output=True, text=True, check=True).stdout
    return float(next(line.split()[1] for line in out.splitlines() if line.startswith("SECONDS")))


def checkout(rev: str, dest: Path) -> Path:
    archive = dest / "src.tar"
    subprocess.run(["git", "archive", "-o", str(archive), rev], cwd=REPO, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(dest / "src", filter="data")
    return dest / "src"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workspace", type=Path, required=True)
    ap.add_argument("--baseline", default="1246eae", help="revision before issue 26 (the stage the target is 2x of)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "evaluate_time.json")
    args = ap.parse_args()
    ws = args.workspace.resolve()
    times: dict[str, list[float]] = {"baseline evaluate": [], "evaluate": [], "label_issues": []}
    with tempfile.TemporaryDirectory() as tmp:
        base = checkout(args.baseline, Path(tmp))
        for _ in range(args.repeats):
            times["baseline evaluate"].append(timed(base, ws, "evaluate", "EvaluateParams", args.threads))
            times["evaluate"].append(timed(REPO, ws, "evaluate", "EvaluateParams", args.threads))
            times["label_issues"].append(timed(REPO, ws, "label_issues", "LabelIssuesParams", args.threads))
    median = {k: statistics.median(v) for k, v in times.items()}
    result = {"workspace": str(ws), "baseline": args.baseline, "threads": args.threads, "seconds": times,
              "median_s": median, "ratio": median["evaluate"] / median["baseline evaluate"],
              "ratio_with_label_issues": (median["evaluate"] + median["label_issues"]) / median["baseline evaluate"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(median, indent=2), f"evaluate {result['ratio']:.2f}x the baseline; "
          f"with the label_issues stage {result['ratio_with_label_issues']:.2f}x")


if __name__ == "__main__":
    main()
