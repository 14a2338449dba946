"""Int8 ONNX vs fp32, side by side in one process: latency at batch 1 and 64 (median and p95 after
warm-up) at 1 and 2 threads, file size, and accuracy per domain of each ONNX file run by a plain
ONNX Runtime session. Needs a pipeline run first (``mdpipe run``: models/finetuned and the compress
stage's models/compressed/variants/*.onnx).

    python -m bench.bench_compress [--threads 1 2] [--repeats 200] [--rounds 3]

The fp32 reference is the fine-tuned model in PyTorch eager (what the training code runs). Each round
measures every runtime once at each thread count, interleaved, so a background load spike hits all of
them; the medians over rounds are reported. Writes bench/results/compress.json.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from mdcore.deploy.measure import eager_runner, latency, ort_runner, with_threads
from mdcore.deploy.export import session
from mdcore.models.model import WEIGHTS, load_model
from tasks.compress import load_sets
from tasks.params import CompressParams
from tasks.paths import load_paths

REPO = Path(__file__).resolve().parents[1]


def accuracy(path: Path, images: torch.Tensor, domains: torch.Tensor, labels: torch.Tensor, names: list[str]) -> dict:
    """Per-domain accuracy of an ONNX file through a bare onnxruntime session (no project code)."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    preds = np.concatenate([sess.run(None, {"images": images[s : s + 256].numpy(),
                                            "domain": domains[s : s + 256].numpy().astype(np.int64)})[0].argmax(1)
                            for s in range(0, len(images), 256)])
    out = {}
    for n in sorted(set(names)):
        mask = np.array([x == n for x in names])
        out[n] = float((preds[mask] == labels.numpy()[mask]).mean())
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-qdq", action="store_true", help="skip the QDQ-format int8 file built here for the format comparison")
    args = ap.parse_args()
    paths = load_paths(REPO)
    teacher = load_model(paths.finetuned)
    _, sets, _ = load_sets(paths, teacher.config, CompressParams())
    folder = paths.compressed / "variants"
    files = {p.stem: p for p in sorted(folder.glob("*.onnx"))}
    if not files:
        raise SystemExit(f"no ONNX variants in {folder}: run `mdpipe run` (or `mdpipe stage compress`) first")
    x, d = sets.select.images, sets.select.domains
    tmp = tempfile.TemporaryDirectory(prefix="mdpipe-bench-")
    if not args.no_qdq and "fp32" in files:  # the same int8 recipe in the other ONNX Runtime format
        from mdcore.deploy.quantize import calibration_feeds, first_convs, quantize_int8

        p = CompressParams()
        train, _, _ = load_sets(paths, teacher.config, p)
        feeds = calibration_feeds(train.images, train.domains, 64, limit=p.calibration_images, seed=p.seed)
        files["int8-qdq"] = quantize_int8(files["fp32"], Path(tmp.name) / "int8-qdq.onnx", feeds, fmt="qdq",
                                          op_types=list(p.quant_ops), exclude=first_convs(files["fp32"], p.quant_fp32_convs))
    results = {"machine": {}, "latency": {}, "size_bytes": {"fp32-eager (safetensors)": (paths.finetuned / WEIGHTS).stat().st_size},
               "accuracy_test_and_heldout": {}}
    from mdcore.deploy.run import machine

    results["machine"] = machine()
    for name, path in files.items():
        results["size_bytes"][name] = path.stat().st_size
        results["accuracy_test_and_heldout"][name] = accuracy(path, sets.report.images, sets.report.domains,
                                                              sets.report.labels, sets.report_names)
    runs: dict = {}
    for _ in range(args.rounds):
        for t in args.threads:
            runners = {"fp32-eager": eager_runner(teacher)} | {n: ort_runner(session(p, t)) for n, p in files.items()}
            for name, run in runners.items():
                with with_threads(t):
                    for b in (1, 64):
                        idx = torch.arange(b) % len(x)
                        r = latency(run, x[idx], d[idx], warmup=10, repeats=args.repeats if b == 1 else args.repeats // 10)
                        runs.setdefault(f"{name}|{t}|{b}", []).append(r)
    for key, rs in runs.items():
        name, t, b = key.split("|")
        results["latency"].setdefault(name, {}).setdefault(f"threads{t}", {})[f"b{b}"] = {
            "median_ms": float(np.median([r["median_ms"] for r in rs])), "p95_ms": float(np.median([r["p95_ms"] for r in rs])),
            "images_per_s": float(np.median([r["images_per_s"] for r in rs])), "rounds": len(rs)}
    out = REPO / "bench" / "results" / "compress.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    ref = results["latency"]["fp32-eager"]
    print(f"machine: {results['machine']}")
    print("| variant | threads | b1 median ms | b1 p95 ms | b64 median ms | b64 images/s | speed-up b1 vs eager | size MB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, per in results["latency"].items():
        size = results["size_bytes"].get(name, results["size_bytes"]["fp32-eager (safetensors)"]) / 1e6
        for t, r in per.items():
            print(f"| {name} | {t[7:]} | {r['b1']['median_ms']:.2f} | {r['b1']['p95_ms']:.2f} | {r['b64']['median_ms']:.1f} | "
                  f"{r['b64']['images_per_s']:.0f} | {ref[t]['b1']['median_ms'] / r['b1']['median_ms']:.2f}x | {size:.2f} |")
    print("accuracy (test split of seen domains, every image of held-out ones):")
    for name, acc in results["accuracy_test_and_heldout"].items():
        print(f"  {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))


if __name__ == "__main__":
    main()
