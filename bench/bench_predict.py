"""`mdpipe predict` on a workspace after `make demo`: throughput on 10,000 32-px images (int8 and fp32 ONNX, with
the domain given and routed), and its accuracy per domain on the evaluate stage's own images (seen domains'
test split with their domain, held-out domains routed) against reports/metrics/evaluate.json.

Usage, from the project root: python -m bench.bench_predict WORKSPACE [--images 10000] [--threads 2]
Writes bench/results/predict.json."""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd


def evaluate_images(ws: Path) -> pd.DataFrame:
    """The rows the evaluate stage scores: seen test images with their domain, held-out images routed."""
    from mdcore.data.manifest import read_manifest
    from tasks.paths import load_paths

    paths = load_paths(ws)
    frame = read_manifest(paths.train_manifest)
    rows = frame[frame["split"].isin(["test", "holdout"]) & (frame["source"] == "real")]
    return pd.DataFrame({"path": [str(paths.raw / p) for p in rows["path"]],
                         "domain": [d if s != "holdout" else "" for d, s in zip(rows["domain"], rows["split"])],
                         "label": list(rows["label"]), "true_domain": list(rows["domain"])})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("workspace", type=Path)
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from flows.model_use import predict
    from tasks.paths import load_paths

    ws = args.workspace.resolve()
    paths = load_paths(ws)
    out = {"workspace": str(ws), "threads": args.threads}
    rows = evaluate_images(ws)
    with tempfile.TemporaryDirectory() as tmp:
        listing = Path(tmp) / "eval.csv"
        rows[["path", "domain", "label"]].to_csv(listing, index=False)
        pred, _ = predict(paths, str(listing), precision="fp32", threads=args.threads)
        pred["true_domain"] = rows["true_domain"].values
        ok = pred["class"] == pred["label"]
        per_domain = ok.groupby(pred["true_domain"]).mean().to_dict()
        evaluation = json.loads(paths.metrics_file("evaluate").read_text())["per_domain"]
        out["accuracy"] = {d: {"predict": per_domain[d], "evaluate": evaluation[d]["acc"],
                               "images": int((pred["true_domain"] == d).sum())} for d in sorted(per_domain)}
        out["accuracy_equal"] = all(abs(v["predict"] - v["evaluate"]) < 1e-6 for v in out["accuracy"].values())
        # throughput: --images files copied from the workspace's images (PNG, as users keep them)
        sources = list(rows["path"])
        folder = Path(tmp) / "many"
        folder.mkdir()
        for i in range(args.images):
            shutil.copyfile(sources[i % len(sources)], folder / f"{i:06d}.png")
        domain = json.loads((paths.finetuned / "config.json").read_text())["domains"][0]
        runs = {}
        for precision in ("int8", "fp32"):
            for given in (domain, None):
                predict(paths, str(folder / "000000.png"), precision=precision, threads=args.threads)  # export once
                t0 = time.perf_counter()
                _, summary = predict(paths, str(folder), domain=given, precision=precision, threads=args.threads)
                wall = time.perf_counter() - t0
                runs[f"{precision}, domain {'given' if given else 'routed'}"] = {
                    "images_per_s_inner": summary["images_per_s"], "images_per_s_call": round(args.images / wall, 1)}
        out["throughput"] = runs
    result = Path("bench/results/predict.json")
    result.parent.mkdir(parents=True, exist_ok=True)
    result.write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
