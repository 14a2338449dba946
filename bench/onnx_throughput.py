"""Throughput of several ONNX files of the project's form (inputs ``images`` uint8 N x 3 x S x S and
``domain`` int64), measured in turn over rounds so that a machine's drift favours none of them: for
comparing the same model's files across code versions (BENCHMARKS.md, "Int8 that stays int8").

    python -m bench.onnx_throughput NAME=FILE [NAME=FILE ...] [--rounds 5] [--threads 1 2] [--batch 1 64] --out OUT.json

Each file, thread count and batch size: the median over rounds of each round's median images/s (10 calls
per round at batch 64 and over, 30 below, after 5 warm-up calls); images are random pixels, given the
first seen domain.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

from mdcore.deploy.export import session
from mdcore.deploy.measure import latency


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
    rng = np.random.default_rng(0)
    rounds: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for t in args.threads:
            for b in args.batch:
                x = rng.integers(0, 256, (b, 3, size, size), dtype=np.uint8)
                d = np.zeros(b, dtype=np.int64)  # the first seen domain
                for name, path in files.items():
                    sess = session(path, t)
                    r = latency(lambda i, j: sess.run(None, {"images": i, "domain": j}), x, d, warmup=5,
                                repeats=10 if b >= 64 else 30)
                    rounds.setdefault(f"{name}|{t}|{b}", []).append(r["images_per_s"])
    median = {k: float(np.median(v)) for k, v in rounds.items()}
    print("| threads | batch | " + " | ".join(files) + " |")
    print("|---:|---:|" + "---:|" * len(files))
    for t in args.threads:
        for b in args.batch:
            print(f"| {t} | {b} | " + " | ".join(f"{median[f'{n}|{t}|{b}']:.0f}" for n in files) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"files": files, "image_size": size, "median_images_per_s": median,
                                    "rounds": rounds}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
