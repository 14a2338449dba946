"""Wall time of the evaluate stage with Grad-CAM sheets and label issues on (the defaults) and off
(``cam_images: 0``, ``label_issues_folds: 0``: the stage as before them), alternating, on a workspace after
``make demo`` (its outputs in reports/evaluate are rewritten; nothing else is touched).

    OMP_NUM_THREADS=1 python -m bench.bench_evaluate --workspace PATH [--repeats 3] [--threads 1]

Writes bench/results/evaluate_time.json. Imports are not timed (one process runs every repeat).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workspace", type=Path, default=Path("."))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "evaluate_time.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from tasks import evaluate
    from tasks.params import load_params
    from tasks.paths import load_paths

    paths = load_paths(args.workspace)
    base = load_params("evaluate", args.workspace / "params").model_copy(update={"device": "cpu"})
    settings = {"on": {}, "off": {"cam_images": 0, "label_issues_folds": 0},
                "cam only": {"label_issues_folds": 0}, "label issues only": {"cam_images": 0}}
    times: dict[str, list[float]] = {k: [] for k in settings}
    evaluate.run(base, paths)  # warm-up: first imports of matplotlib, captum, cleanlab, sklearn
    for _ in range(args.repeats):
        for name, update in settings.items():
            t0 = time.perf_counter()
            evaluate.run(base.model_copy(update=update), paths)
            times[name].append(time.perf_counter() - t0)
    result = {"workspace": str(args.workspace), "threads": args.threads, "cam_images": base.cam_images,
              "label_issues_folds": base.label_issues_folds, "seconds": times,
              "median_s": {k: statistics.median(v) for k, v in times.items()}}
    result["ratio_on_off"] = result["median_s"]["on"] / result["median_s"]["off"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["median_s"], indent=2), f"on/off {result['ratio_on_off']:.2f}x")


if __name__ == "__main__":
    main()
