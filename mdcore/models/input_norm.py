"""What the backbone sees: the input normalization, one module for training, saved models and ONNX export.

Images reach the model as floats in [-1, 1] (``mdcore.data.images.to_float``). Pretrained timm weights were
trained on ``(x01 - mean) / std`` with ``x01`` in [0, 1] and timm's ``pretrained_cfg`` mean/std; fed
per-image-standardized inputs instead, their first layers see the wrong statistics and transfer worse.
So the normalization is part of the model config (``input_norm`` + ``input_mean``/``input_std``):

- ``image``: standardize each image by its own statistics (removes exposure shifts; random-init default);
- ``pretrained``: ``((x + 1) / 2 - mean) / std`` with the weights' ``pretrained_cfg`` mean/std;
- ``none``: as they are.

Choosing one from params: :func:`resolve` (``auto`` = ``pretrained`` when the starting weights come with a
``pretrained_cfg``, else the method's own choice).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from mdcore.data.images import standardize

KINDS = ("image", "pretrained", "none")
CHOICES = ("auto", *KINDS)


class InputNorm(nn.Module):
    """``kind`` applied to [-1, 1] images; mean/std are non-persistent buffers (they live in the config,
    not the weights, and follow the model to its device and into an exported graph as constants)."""

    def __init__(self, kind: str = "image", mean=None, std=None):
        super().__init__()
        check(kind, mean, std)
        self.kind = kind
        if kind == "pretrained":
            mean_t, std_t = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
            # ((x + 1) / 2 - mean) / std  ==  (x - (2 mean - 1)) / (2 std): one subtraction and one division
            self.register_buffer("shift", (2 * mean_t - 1).reshape(1, -1, 1, 1), persistent=False)
            self.register_buffer("scale", (2 * std_t).reshape(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "image":
            return standardize(x)
        if self.kind == "pretrained":
            return (x - self.shift.to(x.dtype)) / self.scale.to(x.dtype)
        return x

    def extra_repr(self) -> str:
        return self.kind


def check(kind: str, mean, std, where: str = "model config") -> None:
    if kind not in KINDS:
        raise ValueError(f"{where} input_norm={kind!r}: expected one of {list(KINDS)}")
    if kind == "pretrained":
        if mean is None or std is None or len(mean) != 3 or len(std) != 3:
            raise ValueError(f"{where} input_norm='pretrained' needs input_mean and input_std, 3 values each "
                             f"(timm's pretrained_cfg), got mean={mean!r} std={std!r}")
        if any(float(s) <= 0 for s in std):
            raise ValueError(f"{where} input_std={std!r}: every value must be > 0")


def as_norm(norm) -> InputNorm:
    """An ``InputNorm`` from a module or a kind name ("image"/"none"; "pretrained" needs the module)."""
    return norm if isinstance(norm, InputNorm) else InputNorm(norm)


def cfg_norm(cfg) -> dict | None:
    """{"mean", "std", "input_size", "interpolation"} of a timm ``pretrained_cfg`` (dict or PretrainedCfg);
    None without mean/std."""
    if cfg is None:
        return None
    get = cfg.get if isinstance(cfg, dict) else (lambda k: getattr(cfg, k, None))
    mean, std = get("mean"), get("std")
    if mean is None or std is None:
        return None
    size = get("input_size")
    return {"mean": [float(v) for v in mean], "std": [float(v) for v in std],
            "input_size": list(size) if size is not None else None, "interpolation": get("interpolation")}


def input_size(choice: int | str, weights_norm: dict | None, where: str = "image_size") -> int:
    """The image side a run uses: ``choice`` itself, or with "auto" the starting weights' pretrained_cfg
    input size (``weights_norm`` from :func:`cfg_norm` / :func:`recorded_norm`); "auto" without one is an
    error naming the param."""
    if choice != "auto":
        return int(choice)
    size = (weights_norm or {}).get("input_size")
    if not size:
        raise ValueError(f"{where}=auto takes the input size of the starting weights' pretrained_cfg, but "
                         "backbone_weights are empty or carry none: set a number")
    return int(size[-1])


def resize_for(choice: str, weights_norm: dict | None, where: str = "resize") -> str:
    """The resize filter a run uses: ``choice`` itself, or with "auto" the starting weights' pretrained_cfg
    interpolation (bicubic for timm's ImageNet EfficientNets) when PIL has it, else bilinear."""
    from mdcore.data.decode import DEFAULT_RESIZE, RESIZE_FILTERS, resize_filter

    if choice != "auto":
        resize_filter(choice, where)
        return choice
    wanted = (weights_norm or {}).get("interpolation")
    return wanted if wanted in RESIZE_FILTERS else DEFAULT_RESIZE


def recorded_norm(weights: str | Path | None) -> dict | None:
    """The ``pretrained_cfg`` recorded beside a weights file the pretrain stage exported (its config.json),
    i.e. the normalization those weights expect; None when nothing is recorded."""
    if not weights:
        return None
    config = Path(weights).expanduser().parent / "config.json"
    if not Path(weights).expanduser().is_file() or not config.is_file():
        return None
    try:
        return cfg_norm(json.loads(config.read_text()).get("pretrained_cfg"))
    except (json.JSONDecodeError, AttributeError):
        return None


def timm_default_norm(backbone: str) -> dict | None:
    """Mean/std of timm's default ``pretrained_cfg`` for ``backbone`` (no download)."""
    from timm.models import get_pretrained_cfg

    try:
        return cfg_norm(get_pretrained_cfg(backbone))
    except RuntimeError:  # an unknown tag
        return None


def resolve(choice: str, weights_norm: dict | None, default: str, backbone: str,
            where: str = "input_norm") -> tuple[str, list[float] | None, list[float] | None]:
    """(kind, mean, std) for a params ``choice`` (auto|image|pretrained|none).

    ``weights_norm``: the starting weights' pretrained_cfg (from :func:`recorded_norm` or the timm tag);
    ``default``: what the method (or stage) uses on its own. ``pretrained`` without weights_norm takes timm's
    default pretrained_cfg of ``backbone``."""
    if choice not in CHOICES:
        raise ValueError(f"{where}={choice!r}: expected one of {list(CHOICES)}")
    if choice == "auto":
        if weights_norm is None:
            return default, None, None
        choice = "pretrained"
    if choice != "pretrained":
        return choice, None, None
    norm = weights_norm or timm_default_norm(backbone)
    if norm is None:
        raise ValueError(f"{where}='pretrained': neither the starting weights nor timm's default pretrained_cfg of "
                         f"{backbone!r} give a mean/std; choose 'image' or 'none'")
    return "pretrained", norm["mean"], norm["std"]
