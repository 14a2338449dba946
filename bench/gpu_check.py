"""The GPU path, run for real, in one process per part, on a workspace whose data stages have run.

It needs torch, timm and pydantic (and Ray for the last part), not Prefect, DVC or Great Expectations, so it
also runs on a GPU machine that holds only a deep-learning stack; ``bench/gpu_check.sh`` is the same check
through the full CLI after ``make install``. Parts (``--parts``, each one's figures or error in the JSON):

- ``worker``: the finetune worker function (``tasks.finetune_ray.train_worker``, the loop every Ray worker
  runs) on ``cuda``: fp32, then bf16 + channels-last, then the bf16 run resumed on the GPU from its
  epoch-2 checkpoint (restored optimizer state moved to the device); images/s and validation accuracy.
- ``evaluate``: the evaluate stage's scoring (``accuracy_by_domain``) of the bf16 model on GPU and CPU; the
  two must agree per domain.
- ``pretrain``: the pretrain stage's contrastive epochs (``contrastive_epoch``) on the GPU.
- ``loading``: 224-px JPEGs decoded on demand by the finetune worker's loader (``BatchLoader``) feeding a
  bf16 model on the GPU (``bench.bench_loading.measure``): images/s and the share of step time waiting.
- ``ray``: the finetune stage's Ray Train job (``tasks.finetune_ray.fit``) with ``use_gpu``, one worker per
  GPU, bf16, channels-last.

Usage: python -m bench.gpu_check --workspace WS --out gpu_check.json [--parts worker evaluate ...]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import traceback
from pathlib import Path


def _workspace(ws: str):
    from tasks.paths import load_paths

    paths = load_paths(ws)
    return paths, json.loads((paths.pretrained / "config.json").read_text())


def _params(ws: str, epochs: int, **update):
    from tasks.params import load_params

    p = load_params("finetune", Path(ws) / "params")  # the workspace's params/finetune.yaml: the defaults users run
    return p.model_copy(update={"epochs": epochs, "num_workers": 1, "cpus_per_worker": 4, **update})


def part_worker(ws: str, out: Path, epochs: int, device: str) -> dict:
    from tasks.finetune_ray import LocalWorker, train_worker, worker_config

    paths, pre = _workspace(ws)
    res = {}
    for name, update in (("fp32", {"precision": "fp32", "channels_last": False}),
                         ("bf16_channels_last", {"precision": "bf16", "channels_last": True})):
        p = _params(ws, epochs, **update)
        worker = LocalWorker(device, out / name)
        t0 = time.perf_counter()
        train_worker(worker_config(p, paths, pre, use_pretrained=False), worker)
        reports = worker.reports
        res[name] = {"wall_s": round(time.perf_counter() - t0, 1), "epochs": len(reports),
                     "images_per_s_after_first_epoch": round(sum(r["images_per_s"] for r in reports[1:])
                                                             / max(len(reports) - 1, 1), 1),
                     "val_acc_last": round(reports[-1]["val_acc"], 4),
                     "val_acc_best": round(max(r["val_acc"] for r in reports), 4),
                     "train_loss_first_last": [round(reports[0]["train_loss"], 4), round(reports[-1]["train_loss"], 4)]}
        print(f"[gpu_check] worker {name}: {res[name]}", flush=True)
    p = _params(ws, epochs + 1, precision="bf16", channels_last=True)
    again = LocalWorker(device, out / "resumed", resume_from=out / "bf16_channels_last" / "checkpoint_000002")
    train_worker(worker_config(p, paths, pre, use_pretrained=False), again)
    res["resumed"] = {"epochs_run": [r["epoch"] for r in again.reports], "attempt": again.reports[0]["attempt"],
                      "val_acc_last": round(again.reports[-1]["val_acc"], 4)}
    print(f"[gpu_check] worker resumed: {res['resumed']}", flush=True)
    return res


def part_evaluate(ws: str, out: Path, device: str) -> dict:
    import torch

    from mdcore.models.model import load_model
    from mdcore.eval.scoring import accuracy_by_domain
    from tasks.data import image_roots, load_split

    paths, _ = _workspace(ws)
    folder = sorted((out / "bf16_channels_last").glob("checkpoint_*"))[-1] / "model"
    model = load_model(folder)
    cfg = model.config
    data, rows = load_split(paths.train_manifest, image_roots(paths.raw, paths.synthetic), cfg.image_size,
                            ("test", "holdout"), synthetic=False, domains=cfg.domains, classes=cfg.classes)
    names = list(rows["domain"])
    res = {}
    for where in (device, "cpu"):
        model.to(where)
        t0 = time.perf_counter()
        res[where] = accuracy_by_domain(model, data, names, 256, device=torch.device(where))
        res[f"{where}_s"] = round(time.perf_counter() - t0, 2)
    res["max_abs_diff"] = max(abs(res[device][d] - res["cpu"][d]) for d in res["cpu"])
    print(f"[gpu_check] evaluate: {res}", flush=True)
    return res


def part_pretrain(ws: str, device: str, epochs: int = 3) -> dict:
    import torch

    from mdcore.models.input_norm import InputNorm
    from mdcore.models.model import create_backbone
    from mdcore.train.contrastive import self_supervised
    from tasks.data import image_roots, load_split
    from tasks.params import load_params

    paths, pre = _workspace(ws)
    p = load_params("pretrain", Path(ws) / "params")
    torch.manual_seed(p.seed)
    data, _ = load_split(paths.train_manifest, image_roots(paths.raw, paths.synthetic), pre["image_size"], ("train",))
    device = torch.device(device)
    t0 = time.perf_counter()
    history = self_supervised(create_backbone(p.backbone).to(device), data.images, input_norm=InputNorm("image"),
                              epochs=epochs, batch_size=p.batch_size, lr=p.lr, weight_decay=p.weight_decay,
                              seed=p.seed, temperature=p.temperature, domains=data.domains,
                              fourier_mix_prob=p.fourier_mix_prob, fourier_mix_strength=p.fourier_mix_strength,
                              device=device)
    res = {"epochs": epochs, "ssl_loss": [round(h["ssl_loss"], 4) for h in history],
           "wall_s": round(time.perf_counter() - t0, 1)}
    print(f"[gpu_check] pretrain: {res}", flush=True)
    return res


def part_loading(images: int, workers: int, steps: int, batch: int, device: str, backbones: list[str],
                 method: str | None) -> dict:
    from bench.bench_loading import make_tree, measure

    root = Path(tempfile.gettempdir()) / "mdpipe-gpu-tree"
    t0 = time.perf_counter()
    make_tree(root, images)
    made = round(time.perf_counter() - t0, 1)
    res = {"tree_s": made}
    for backbone in backbones:
        for view in (None, method) if method else (None,):
            key = f"{backbone}+{view}" if view else backbone
            res[key] = measure(str(root), images, "stream", steps, batch, 224, workers, epochs=3, threads=4,
                               device=device, precision="bf16", backbone=backbone, method=view)
            print(f"[gpu_check] loading {key}: {res[key]}", flush=True)
    return res


def part_ray(ws: str, epochs: int) -> dict:
    import torch

    from tasks.finetune_ray import fit

    paths, _ = _workspace(ws)
    gpus = torch.cuda.device_count()
    p = _params(ws, epochs, num_workers=gpus, use_gpu=True, precision="bf16", channels_last=True, max_failures=0)
    t0 = time.perf_counter()
    result = fit(p, paths)
    with result.checkpoint.as_directory() as folder:
        history = json.loads((Path(folder) / "history.json").read_text())
    res = {"gpus": gpus, "wall_s": round(time.perf_counter() - t0, 1), "epochs": len(history),
           "images_per_s_after_first_epoch": round(sum(r["images_per_s"] for r in history[1:])
                                                   / max(len(history) - 1, 1), 1),
           "val_acc_last": round(history[-1]["val_acc"], 4),
           "weights_max_diff_across_workers": history[-1].get("weights_max_diff_across_workers")}
    print(f"[gpu_check] ray: {res}", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workspace", required=True)
    ap.add_argument("--out", required=True, help="JSON file of the figures")
    ap.add_argument("--parts", nargs="+", default=["worker", "evaluate", "pretrain", "loading", "ray"])
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of the same parts (no ray part)")
    ap.add_argument("--loading-backbones", nargs="+", default=["resnet10t", "resnet50"])
    ap.add_argument("--loading-method", default="multidomain+randconv+linedraw+swad",
                    help="also measure with this method's training view on the device (the default method)")
    ap.add_argument("--loading-images", type=int, default=5000)
    ap.add_argument("--loading-workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    ap.add_argument("--loading-steps", type=int, default=30)
    ap.add_argument("--loading-batch", type=int, default=128)
    args = ap.parse_args()
    import timm
    import torch

    out = Path(args.out)
    runs = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    report = json.loads(out.read_text()) if out.is_file() else {}
    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else None
    report["machine"] = {"gpu": gpu, "gpus": torch.cuda.device_count(),
                         "cpus": os.cpu_count(), "torch": torch.__version__, "cuda": torch.version.cuda,
                         "timm": timm.__version__}
    dev = args.device
    calls = {"worker": lambda: part_worker(args.workspace, runs, args.epochs, dev),
             "evaluate": lambda: part_evaluate(args.workspace, runs, dev),
             "pretrain": lambda: part_pretrain(args.workspace, dev),
             "loading": lambda: part_loading(args.loading_images, args.loading_workers, args.loading_steps,
                                             args.loading_batch, dev, args.loading_backbones,
                                             args.loading_method),
             "ray": lambda: part_ray(args.workspace, args.epochs)}
    for part in args.parts:
        try:
            report[part] = calls[part]()
        except Exception as e:  # noqa: BLE001 - record it, go on to the next part
            traceback.print_exc()
            report[part] = {"error": f"{type(e).__name__}: {e}"}
        out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
