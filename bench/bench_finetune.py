"""Fine-tuning throughput: the finetune stage's Ray Train job against the plain timm loop a user would write
(same backbone, batch, data and cores) and against its own step run in one process (same model, method,
batch, sampler and data), plus Ray's start-up/tear-down overhead and the 1 vs 2 worker layouts.

    python -m bench.bench_finetune [--epochs 3] [--rounds 3] [--root .]

Needs the pipeline's data (run `mdpipe run` or `dvc repro synthesize pretrain` first). Prints a
markdown table and writes bench/results/finetune.json. Epoch 1 is warm-up and not counted.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def plain_loop(paths, params, threads: int) -> float:
    """images/s of train_epoch in this process with ``threads`` torch threads (no Ray, no DDP): the
    stage's own step (its method's views, its model and optimizer) without the job around it."""
    import torch

    from mdcore.data.sampler import domain_balanced_batches
    from mdcore.train.epoch import train_epoch
    from tasks.data import image_roots, load_split
    from mdcore.train.setup import build_method, build_model, build_optimizer

    torch.set_num_threads(threads)
    torch.manual_seed(params.seed)
    pre = json.loads((paths.pretrained / "config.json").read_text())
    train, _ = load_split(paths.train_manifest, image_roots(paths.raw, paths.synthetic), pre["image_size"], ("train",))
    method = build_method(params)
    model = build_model(params, train, pre["backbone"], pre["image_size"], method=method)
    optimizer, _ = build_optimizer(params, model)
    rates = []
    for epoch in range(params.epochs):
        batches = domain_balanced_batches(train.domains, params.batch_size, epoch=epoch, seed=params.seed,
                                          mix=params.domain_mix)
        t0 = time.perf_counter()
        stats = train_epoch(model, train, optimizer, batches, method, epoch=epoch, seed=params.seed,
                            label_smoothing=params.label_smoothing)
        rates.append(stats["images"] / (time.perf_counter() - t0))
    return sum(rates[1:]) / max(len(rates) - 1, 1)


def ray_layout(paths, params) -> dict:
    """One real finetune stage run; images/s from the workers' own timing, and the wall time around it.

    Each run trains from scratch in a storage folder of its own: a run of the same params left in Ray's
    storage would otherwise be resumed from its last checkpoint, and its old history read back."""
    import tempfile

    from tasks import finetune_ray as finetune

    storage = tempfile.mkdtemp(prefix="bench-finetune-ray-")
    os.environ["MDPIPE_RAY_STORAGE"] = storage
    t0 = time.perf_counter()
    result = finetune.fit(params, paths)
    wall = time.perf_counter() - t0
    with result.checkpoint.as_directory() as folder:
        history = json.loads((Path(folder) / "history.json").read_text())
    shutil.rmtree(storage, ignore_errors=True)
    if len(history) != params.epochs or any(row.get("attempt", 0) for row in history):
        raise RuntimeError(f"expected {params.epochs} freshly trained epochs, got {len(history)} rows: {history}")
    rates = [row["images_per_s"] for row in history]
    steady = sum(rates[1:]) / max(len(rates) - 1, 1)
    return {"images_per_s": steady, "fit_wall_s": wall, "epochs": len(rates)}


def timm_loop(paths, params, threads: int) -> float:
    """images/s of the loop a user would write instead: the same timm backbone (``num_classes`` set), AdamW,
    cross-entropy, shuffled batches of the same size from the same in-memory images; no augmentation, no
    per-domain parts, no sampler, no Ray."""
    import timm
    import torch

    from mdcore.data.images import to_float
    from tasks.data import image_roots, load_split

    torch.set_num_threads(threads)
    torch.manual_seed(params.seed)
    pre = json.loads((paths.pretrained / "config.json").read_text())
    train, _ = load_split(paths.train_manifest, image_roots(paths.raw, paths.synthetic), pre["image_size"], ("train",))
    model = timm.create_model(pre["backbone"], num_classes=len(train.class_names))
    optimizer = torch.optim.AdamW(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    rates = []
    for _ in range(params.epochs):
        model.train()
        order, seen = torch.randperm(len(train)), 0
        t0 = time.perf_counter()
        for start in range(0, len(order) - params.batch_size + 1, params.batch_size):
            idx = order[start:start + params.batch_size]
            loss = torch.nn.functional.cross_entropy(model(to_float(train.images[idx])), train.labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += len(idx)
        rates.append(seen / (time.perf_counter() - t0))
    return sum(rates[1:]) / max(len(rates) - 1, 1)


def ray_startup() -> dict:
    import ray

    t0 = time.perf_counter()
    ray.init(include_dashboard=False, logging_level="WARNING")
    up = time.perf_counter() - t0
    t0 = time.perf_counter()
    ray.shutdown()
    return {"ray_init_s": up, "ray_shutdown_s": time.perf_counter() - t0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=".")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every loop; medians reported")
    parser.add_argument("--batch-size", type=int, default=None, help="global batch (default: params/finetune.yaml)")
    args = parser.parse_args()

    import statistics

    from tasks.params import load_params
    from tasks.paths import load_paths

    paths = load_paths(args.root)
    base = load_params("finetune", paths.root / "params")
    base = base.model_copy(update={"epochs": args.epochs, "batch_size": args.batch_size or base.batch_size,
                                   "max_failures": 0})
    results = {"startup": ray_startup(), "batch_size": base.batch_size, "method": base.method, "rounds": []}
    import ray

    from tasks.finetune_ray import init_ray

    # every loop once per round, in the same order, so a slow spell of this shared machine hits all of them
    for _ in range(args.rounds):
        row = {"timm_2_threads": timm_loop(paths, base, threads=2),
               "plain_2_threads": plain_loop(paths, base, threads=2),
               "plain_1_thread": plain_loop(paths, base, threads=1)}
        init_ray()
        for name, workers, cpus in (("ray_1x2", 1, 2), ("ray_2x1", 2, 1)):
            row[name] = ray_layout(paths, base.model_copy(update={"num_workers": workers, "cpus_per_worker": cpus}))
        ray.shutdown()
        results["rounds"].append(row)

    def median(name: str, key: str | None = None) -> float:
        return statistics.median(r[name][key] if key else r[name] for r in results["rounds"])

    for name in ("timm_2_threads", "plain_2_threads", "plain_1_thread"):
        results[name] = median(name)
    for name in ("ray_1x2", "ray_2x1"):
        results[name] = {"images_per_s": median(name, "images_per_s"), "fit_wall_s": median(name, "fit_wall_s")}
    plain = results["plain_2_threads"]
    timm_rate = results["timm_2_threads"]
    lines = ["| loop | images/s | vs plain (2 threads) | vs timm loop | fit wall s |", "|---|---|---|---|---|",
             f"| plain timm loop a user writes, 2 threads | {timm_rate:.0f} | {timm_rate / plain:.2f} | 1.00 | |",
             f"| our epoch in one process, 2 threads | {plain:.0f} | 1.00 | {plain / timm_rate:.2f} | |",
             f"| our epoch in one process, 1 thread | {results['plain_1_thread']:.0f} | "
             f"{results['plain_1_thread'] / plain:.2f} | {results['plain_1_thread'] / timm_rate:.2f} | |"]
    for name, label in (("ray_1x2", "Ray Train, 1 worker x 2 CPUs"), ("ray_2x1", "Ray Train, 2 workers x 1 CPU")):
        r = results[name]
        lines.append(f"| {label} | {r['images_per_s']:.0f} | {r['images_per_s'] / plain:.2f} | "
                     f"{r['images_per_s'] / timm_rate:.2f} | {r['fit_wall_s']:.1f} |")
    s = results["startup"]
    per_round = "; ".join(f"round {i + 1}: timm {r['timm_2_threads']:.0f}, ours {r['plain_2_threads']:.0f}, "
                          f"1x2 {r['ray_1x2']['images_per_s']:.0f}, 2x1 {r['ray_2x1']['images_per_s']:.0f}"
                          for i, r in enumerate(results["rounds"]))
    lines.append(f"\nMedians over {args.rounds} interleaved rounds ({per_round}). ray.init {s['ray_init_s']:.1f} s, "
                 f"ray.shutdown {s['ray_shutdown_s']:.1f} s; {args.epochs} epochs, global batch {base.batch_size}, "
                 "first epoch not counted.")
    print("\n".join(lines))
    out = Path(__file__).parent / "results" / "finetune.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
