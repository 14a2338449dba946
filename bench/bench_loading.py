"""Memory and speed of the finetune data path: images decoded up front ("memory") or on demand
("stream", DataLoader workers ahead of training; "stream_cache": the same with ``decoded_cache``, each
image decoded once into a fresh on-disk cache and read from it in later epochs), on a generated tree of
224-px JPEGs.

For each (loader, dataset size) a fresh process builds the training ImageSet the way a finetune worker
does, then runs ``--steps`` training steps of a timm model on domain-balanced batches; it reports peak
resident memory (the process and its loader workers), images/s and the share of step time spent waiting
for data. With ``--epochs`` > 1 the epochs go through one ``BatchLoader`` (the finetune worker's): its
decoding processes start once and stay alive across epochs.
Usage: python -m bench.bench_loading --sizes 5000 50000 --loaders stream [--steps 20] [--epochs 3]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def make_tree(root: Path, n: int, size: int = 224, domains: int = 4, classes: int = 10) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (classes, 8, 8, 3), dtype=np.uint8)  # smooth images: JPEG sizes like photos
    have = len(list(root.rglob("*.jpg"))) if root.exists() else 0
    for i in range(have, n):
        d, c = i % domains, (i // domains) % classes
        folder = root / f"d{d}" / f"c{c}"
        folder.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(np.clip(base[c].astype(int) + rng.integers(-30, 30, (8, 8, 3)), 0, 255).astype(np.uint8))
        img.resize((size, size), Image.Resampling.BICUBIC).save(folder / f"{i:06d}.jpg", quality=90)


def measure(root: str, n: int, loader: str, steps: int, batch: int, size: int, workers: int, epochs: int = 1,
            threads: int = 2, device: str = "cpu", precision: str = "fp32", backbone: str = "resnet10t",
            method: str | None = None) -> dict:
    """One run; on ``device`` "cuda" each step ends with a synchronize, so the wait share is time the GPU
    had nothing to do (bf16 autocast, channels-last and pinned batches there, as the finetune worker runs).
    ``method`` (an ``mdcore.methods`` spec): each batch gets that method's training view on the device, as
    the finetune loop does; none: the raw images."""
    import pandas as pd
    import timm
    import torch

    from mdcore.models.accel import FastForward
    from mdcore.data.images import load_images, to_float
    from mdcore.data.lazy_images import BatchLoader
    from mdcore.data.sampler import domain_balanced_batches

    torch.set_num_threads(threads)
    paths = sorted(Path(root).rglob("*.jpg"))[:n]
    frame = pd.DataFrame({"path": [str(p.relative_to(root)) for p in paths], "domain": [p.parts[-3] for p in paths],
                          "label": [p.parts[-2] for p in paths], "source": "real"})
    import tempfile

    cache = tempfile.mkdtemp(prefix="bench-decoded-") if loader == "stream_cache" else None
    t0 = time.perf_counter()
    data = load_images(frame, {"real": Path(root)}, size, lazy=loader != "memory", cache_dir=cache)
    setup_s = time.perf_counter() - t0
    dev = torch.device(device)
    net = timm.create_model(backbone, num_classes=10).to(dev)
    model = FastForward(net, precision, channels_last=dev.type == "cuda", device_type=dev.type)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    labels = data.labels.to(dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    view = None
    if method:
        from mdcore.methods import create_method

        view, g = create_method(method), torch.Generator().manual_seed(0)
    first_batch_s = None
    wait = train = 0.0
    images, per_epoch, wait_per_epoch = 0, [], []
    with BatchLoader(data.images, workers if loader != "memory" else 0, pin_memory=dev.type == "cuda") as batch_loader:
        for epoch in range(epochs):
            batches = list(domain_balanced_batches(data.domains, batch, epoch=epoch, seed=0))[:steps]
            images += len(batches) * batch
            t = start = time.perf_counter()
            epoch_wait = 0.0
            for idx, raw in batch_loader(batches):
                t1 = time.perf_counter()
                wait += t1 - t
                epoch_wait += t1 - t
                first_batch_s = first_batch_s if first_batch_s is not None else round(t1 - t0 - setup_s, 1)
                x = to_float(raw.to(dev, non_blocking=True))
                if view is not None:
                    x = view.training_view(x, data.domains[idx], g)
                loss = torch.nn.functional.cross_entropy(model(x), labels[torch.as_tensor(idx, device=dev)])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sync()
                t = time.perf_counter()
                train += t - t1
            per_epoch.append(round(len(batches) * batch / (time.perf_counter() - start), 1))
            wait_per_epoch.append(round(epoch_wait / (time.perf_counter() - start), 3))
    cache_mb = None
    if cache:  # measured, then removed: each run starts from an empty cache
        import shutil

        cache_mb = round(sum(f.stat().st_size for f in Path(cache).glob("*.npy")) / 2**20, 1)
        shutil.rmtree(cache, ignore_errors=True)
    peak_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"loader": loader, "images": n, "size": size, "epochs": epochs, "threads": threads, "device": device,
            "precision": precision, "backbone": backbone, "batch": batch, "loader_workers": workers,
            "method": method, "first_batch_s": first_batch_s,
            "setup_s": round(setup_s, 1),
            "peak_rss_mb": round(peak_self, 1), "peak_loader_worker_rss_mb": round(peak_children, 1),
            "images_per_s": round(images / (wait + train), 1), "epoch_images_per_s": per_epoch,
            # what the stage's run sees: memory's up-front decoding counted too, as stream's start-up is
            "run_images_per_s": round(images / (setup_s + wait + train), 1),
            "wait_share": round(wait / (wait + train), 3), "epoch_wait_share": wait_per_epoch,
            **({"decoded_cache_mb": cache_mb} if cache else {})}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="/tmp/mdpipe-bench-tree")
    ap.add_argument("--sizes", type=int, nargs="+", default=[5000, 50000])
    ap.add_argument("--loaders", nargs="+", default=["stream"], choices=["memory", "stream", "stream_cache"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=1, help="epochs of --steps steps each, through one loader")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the training process")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        loader, n = args.one.split(":")
        print(json.dumps(measure(args.root, int(n), loader, args.steps, args.batch, args.image_size, args.workers,
                                 args.epochs, args.threads)))
        return
    make_tree(Path(args.root), max(args.sizes), size=args.image_size)  # files at the size trained on
    for loader in args.loaders:
        for n in args.sizes:  # a fresh process each: peak memory is per run
            out = subprocess.run([sys.executable, "-m", "bench.bench_loading", "--root", args.root, "--one", f"{loader}:{n}",
                                  "--steps", str(args.steps), "--batch", str(args.batch),
                                  "--image-size", str(args.image_size), "--workers", str(args.workers),
                                  "--epochs", str(args.epochs), "--threads", str(args.threads)],
                                 capture_output=True, text=True, check=True)
            print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
