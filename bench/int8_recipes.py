"""Int8 recipes side by side on one workspace's fine-tuned model: which convolutions stay fp32, the format,
the calibration size. For each recipe: the worst seen-domain accuracy drop against the fp32 ONNX file on the
acceptance split (val + gate: what the compress stage accepts on, so what may choose), the same on the test
split (reports only), and batch-64 throughput at 1 and 2 threads against the fp32 file in the same runtime.

    python -m bench.int8_recipes --workspace WS [--recipes shipped conv-gemm ...] [--rounds 3]

``shipped`` is the workspace's own compress defaults (format, op types, fp32 stem convolutions).

WS: a workspace after `mdpipe run` (models/finetuned, models/compressed/variants/fp32.onnx). Writes
bench/results/int8_recipes[_TAG].json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]

RECIPES = {  # name: (format, op types, fp32 first convs, fp32 depthwise convs, calibration images)
    "conv-gemm": ("qoperator", ["Conv", "Gemm"], 3, False, 512),  # the default before 2026-12-07
    "qdq": ("qdq", ["Conv", "Gemm"], 3, False, 512),
    "no-depthwise": ("qoperator", ["Conv", "Gemm"], 3, True, 512),
    "no-depthwise-qdq": ("qdq", ["Conv", "Gemm"], 3, True, 512),
    "first-8": ("qoperator", ["Conv", "Gemm"], 8, False, 512),
    "conv-only": ("qoperator", ["Conv"], 3, False, 512),
    "calib-2048": ("qoperator", ["Conv", "Gemm"], 3, False, 2048),
    # ReLU6 (Clip) in int8 too: it folds into the convolution's output range, so the tensors between two
    # convolutions stay uint8 (no DequantizeLinear / QuantizeLinear pair around every activation)
    "conv-gemm-clip": ("qoperator", ["Conv", "Gemm", "Clip"], 3, False, 512),
    "conv-gemm-clip-qdq": ("qdq", ["Conv", "Gemm", "Clip"], 3, False, 512),
    "conv-gemm-clip-add": ("qoperator", ["Conv", "Gemm", "Clip", "Add"], 3, False, 512),
    "conv-gemm-clip-stem-int8": ("qoperator", ["Conv", "Gemm", "Clip"], 0, False, 512),
    # the default recipe with 7-bit weights: the same results on CPUs with and without VNNI
    "reduce-range": ("qoperator", ["Conv", "Gemm", "Clip"], 3, False, 512),
}
REDUCE_RANGE = {"reduce-range"}  # every other recipe quantizes weights to the full 8 bits (compress.quant_reduce_range)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workspace", required=True, type=Path)
    ap.add_argument("--recipes", nargs="+", default=["shipped", *RECIPES], choices=["shipped", *RECIPES])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    ws = args.workspace.resolve()
    os.chdir(ws)
    sys.path.insert(0, str(ws))  # the workspace's own code version
    from bench.bench_compress import accuracy
    from mdcore.deploy.export import session
    from mdcore.deploy.measure import latency, ort_runner, with_threads
    from mdcore.deploy.quantize import calibration_feeds, depthwise_convs, first_convs, quantize_int8
    from mdcore.models.model import load_model
    from tasks.compress import load_sets
    from tasks.params import CompressParams
    from tasks.paths import load_paths

    paths = load_paths(ws)
    teacher = load_model(paths.finetuned)
    p = CompressParams()
    table = RECIPES | {"shipped": (p.quant_format, list(p.quant_ops), p.quant_fp32_convs, False, 512)}
    train, sets, _ = load_sets(paths, teacher.config, p)
    fp32 = paths.compressed / "variants" / "fp32.onnx"
    seen = sets.report.domains >= 0
    test = sets.report.subset(seen)
    test_names = [n for n, k in zip(sets.report_names, seen.tolist()) if k]
    files = {"fp32": fp32}
    tmp = tempfile.TemporaryDirectory(prefix="mdpipe-int8-")
    recipes = {}
    for name in args.recipes:
        fmt, ops, first, no_dw, calib = table[name]
        feeds = calibration_feeds(train.images, train.domains, 64, limit=calib, seed=p.seed)
        exclude = first_convs(fp32, first) + (depthwise_convs(fp32) if no_dw else [])
        reduce_range = p.quant_reduce_range if name == "shipped" else name in REDUCE_RANGE
        files[name] = quantize_int8(fp32, Path(tmp.name) / f"{name}.onnx", feeds, fmt=fmt, op_types=ops,
                                    exclude=sorted(set(exclude)), reduce_range=reduce_range)
        recipes[name] = {"format": fmt, "op_types": ops, "fp32_first_convs": first, "fp32_depthwise": no_dw,
                         "calibration_images": calib, "fp32_nodes": len(set(exclude)), "reduce_range": reduce_range}
    is_val = torch.tensor([sp == "val" for sp in sets.select_splits])
    val = sets.select.subset(is_val)
    val_names = [n for n, k in zip(sets.select_names, is_val.tolist()) if k]
    acc = {n: {"select": accuracy(f, sets.select.images, sets.select.domains, sets.select.labels, sets.select_names),
               "val": accuracy(f, val.images, val.domains, val.labels, val_names),
               "test": accuracy(f, test.images, test.domains, test.labels, test_names),
               "file_bytes": f.stat().st_size} for n, f in files.items()}
    runs: dict = {}
    x, d = sets.select.images[:64], sets.select.domains[:64]
    for _ in range(args.rounds):
        for t in args.threads:
            for n, f in files.items():
                run = ort_runner(session(f, t))
                with with_threads(t):
                    r = latency(run, x, d, warmup=3, repeats=10)
                runs.setdefault((n, t), []).append(r["images_per_s"])
    cpu_flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), []) if Path("/proc/cpuinfo").exists() else []
    out = {"workspace": str(ws), "backbone": teacher.config.backbone, "image_size": teacher.config.image_size,
           "cpu_vnni": sorted(f for f in cpu_flags if "vnni" in f), "cpu_avx512": any(f.startswith("avx512") for f in cpu_flags),
           "recipes": recipes, "results": {}}
    print(f"{teacher.config.backbone} at {teacher.config.image_size} px; drops in points against the fp32 ONNX file")
    print("| recipe | worst drop, val (chooses) | worst drop, val + gate (accepts) | worst drop, test (reports) | "
          + " | ".join(f"b64 img/s {t} thr (x fp32)" for t in args.threads) + " | MB |")
    print("|---|---:|---:|---:|" + "---:|" * len(args.threads) + "---:|")
    for n in files:
        drop = {s: max(100 * (acc["fp32"][s][dom] - acc[n][s][dom]) for dom in acc["fp32"][s])
                for s in ("val", "select", "test")}
        ips = {t: float(np.median(runs[(n, t)])) for t in args.threads}
        out["results"][n] = acc[n] | {"worst_drop_points": drop, "b64_images_per_s": ips}
        print(f"| {n} | {drop['val']:.1f} | {drop['select']:.1f} | {drop['test']:.1f} | "
              + " | ".join(f"{ips[t]:.0f} ({ips[t] / np.median(runs[('fp32', t)]):.2f}x)" for t in args.threads)
              + f" | {acc[n]['file_bytes'] / 1e6:.2f} |")
    dest = REPO / "bench" / "results" / f"int8_recipes{'_' + args.tag if args.tag else ''}.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
