"""Where a model runs and how fast: the ``device`` choice of the in-process stages (one helper, so pretrain,
evaluate and compress read ``device: auto|cpu|cuda`` the same way), and speed options that wrap a model
without changing it: autocast (bf16) and channels-last inputs."""
from __future__ import annotations

import torch
from torch import nn


DEVICES = ("auto", "cpu", "cuda")


def resolve_device(choice: str, where: str = "device") -> torch.device:
    """The torch device of a ``device`` param: auto = cuda when available, else cpu. ``cuda`` on a machine
    without one is an error naming the param (``where``), never a silent fall back to CPU."""
    if choice not in DEVICES:
        raise ValueError(f"{where}={choice!r}: expected one of {list(DEVICES)}")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{where}=cuda, but torch sees no CUDA device here (torch {torch.__version__}, "
                         f"built for CUDA {torch.version.cuda}); use auto or cpu")
    return torch.device(choice)


class FastForward(nn.Module):
    """Runs ``module`` under autocast and/or with channels-last inputs; outputs come back as float32.

    Kept as a thin wrapper so the saved weights stay those of ``module`` (no prefixes, no dtype change).
    """

    def __init__(self, module: nn.Module, precision: str = "fp32", channels_last: bool = False,
                 device_type: str = "cpu"):
        super().__init__()
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision {precision!r}: expected 'fp32' or 'bf16'")
        self.module = module
        self.dtype = torch.bfloat16 if precision == "bf16" else None
        self.channels_last = channels_last
        self.device_type = device_type
        if channels_last:
            module.to(memory_format=torch.channels_last)

    def forward(self, images: torch.Tensor, *args, **kwargs):
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.dtype is None:
            return self.module(images, *args, **kwargs)
        with torch.autocast(self.device_type, dtype=self.dtype):
            out = self.module(images, *args, **kwargs)
        return _to_float(out)


def _to_float(out):
    if isinstance(out, torch.Tensor):
        return out.float()
    if isinstance(out, tuple):
        return tuple(_to_float(o) for o in out)
    if isinstance(out, dict):
        return {k: _to_float(v) for k, v in out.items()}
    return out
