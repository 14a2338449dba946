"""What a deployment costs: parameters, file size, MACs (torch's FLOP counter) and latency (median and
p95 after warm-up, at a stated thread count), for PyTorch eager models and ONNX Runtime sessions alike."""
from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch
from torch import nn

from mdcore.data.images import to_float


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, image_size: int, domain: int = 0) -> int:
    """Multiply-accumulates of one image of a known domain (half of torch's FLOP count)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, image_size, image_size)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model.eval()(x, torch.tensor([domain]))
    return int(counter.get_total_flops() // 2)


def eager_runner(model: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """fp32 PyTorch eager inference on uint8 images, as the training code runs it (to_float + forward)."""
    model.eval()

    def run(images: torch.Tensor, domains: torch.Tensor) -> None:
        with torch.inference_mode():
            model(to_float(images), domains)

    return run


def ort_runner(sess) -> Callable[[torch.Tensor, torch.Tensor], None]:
    def run(images: torch.Tensor, domains: torch.Tensor) -> None:
        sess.run(None, {"images": images.numpy(), "domain": domains.numpy().astype(np.int64)})

    return run


def latency(run: Callable, images: torch.Tensor, domains: torch.Tensor, *, warmup: int = 5,
            repeats: int = 30, min_seconds: float = 0.0) -> dict:
    """Wall-clock latency of ``run(images, domains)``: median and p95 in ms over ``repeats`` calls after
    ``warmup`` calls (more calls until ``min_seconds`` have passed), and images per second at the median."""
    for _ in range(warmup):
        run(images, domains)
    times = []
    start = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        run(images, domains)
        times.append(time.perf_counter() - t0)
    ms = np.array(times) * 1e3
    median = float(np.median(ms))
    return {"median_ms": median, "p95_ms": float(np.percentile(ms, 95)), "calls": len(ms),
            "images_per_s": len(images) / (median / 1e3)}


def with_threads(threads: int):
    """Context manager: torch intra-op threads set to ``threads`` and restored after."""
    import contextlib

    @contextlib.contextmanager
    def ctx():
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            yield
        finally:
            torch.set_num_threads(old)

    return ctx()
