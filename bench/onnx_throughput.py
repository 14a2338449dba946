"""Throughput of several ONNX files of the project's form (inputs ``images`` uint8 N x 3 x S x S and
``domain`` int64), timed in turn over rounds (the compress stage's ``measure_latencies``) so that a
machine's drift favours none of them: for comparing the same model's files across code versions
(BENCHMARKS.md, "Int8 that stays int8").

    python -m bench.onnx_throughput NAME=FILE [NAME=FILE ...] [--rounds 5] [--threads 1 2] [--batch 1 64] --out OUT.json

Each file, thread count and batch size: the median over rounds of each round's median images/s (10 calls
per round at batch 64, 30 at batch 1, after 5 warm-up calls); images are random pixels, given the first
seen domain.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import onnxruntime as ort
import torch

from mdcore.data.images import ImageSet
from mdcore.deploy.export import session
from mdcore.deploy.measure import ort_runner
from mdcore.deploy.scoring import measure_latencies


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+", metavar="NAME=FILE")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    files = dict(f.split("=", 1) for f in args.files)
    size = ort.InferenceSession(next(iter(files.values())), providers=["CPUExecutionProvider"]).get_inputs()[0].shape[-1]
    n = max(args.batch)
    pixels = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    data = ImageSet(pixels, torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long), ["first"], ["0"])
    median = {}
    for t in args.threads:
        runs = {name: ort_runner(session(path, t)) for name, path in files.items()}
        result = measure_latencies(runs, data, t, batch_sizes=tuple(args.batch), repeats=30 * args.rounds,
                                   rounds=args.rounds)
        for name in files:
            for b in args.batch:
                median[f"{name}|{t}|{b}"] = result[name][f"b{b}"]["images_per_s"]
    print("| threads | batch | " + " | ".join(files) + " |")
    print("|---:|---:|" + "---:|" * len(files))
    for t in args.threads:
        for b in args.batch:
            print(f"| {t} | {b} | " + " | ".join(f"{median[f'{name}|{t}|{b}']:.0f}" for name in files) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"files": files, "image_size": size, "rounds": args.rounds,
                                    "median_images_per_s": median}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
