"""Common image corruptions at three severities (after Hendrycks & Dietterich, 2019, ImageNet-C), on
uint8 (N, 3, H, W) images, deterministic for a seed: how a variant holds up off the clean test set."""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import functional as TF

SEVERITIES = (1, 2, 3)


def _noise(x: torch.Tensor, s: int, g: torch.Generator) -> torch.Tensor:
    sigma = (0.04, 0.08, 0.16)[s - 1] * 255
    return (x.float() + torch.randn(x.shape, generator=g) * sigma).round().clamp(0, 255).to(torch.uint8)


def _blur(x: torch.Tensor, s: int, g: torch.Generator) -> torch.Tensor:
    sigma = (0.6, 1.0, 1.5)[s - 1]
    k = 2 * int(np.ceil(2 * sigma)) + 1
    return TF.gaussian_blur(x, [k, k], [sigma, sigma])


def _brightness(x: torch.Tensor, s: int, g: torch.Generator) -> torch.Tensor:
    return TF.adjust_brightness(x, (1.3, 1.6, 2.0)[s - 1])


def _contrast(x: torch.Tensor, s: int, g: torch.Generator) -> torch.Tensor:
    return TF.adjust_contrast(x, (0.6, 0.4, 0.25)[s - 1])


def _jpeg(x: torch.Tensor, s: int, g: torch.Generator) -> torch.Tensor:
    quality = (40, 20, 10)[s - 1]
    out = []
    for img in x.permute(0, 2, 3, 1).numpy():
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        out.append(np.asarray(Image.open(buf).convert("RGB")))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous() if out else x.clone()


CORRUPTIONS = {"noise": _noise, "blur": _blur, "brightness": _brightness, "contrast": _contrast, "jpeg": _jpeg}


def corrupt(images: torch.Tensor, name: str, severity: int, seed: int = 0) -> torch.Tensor:
    """``images`` (uint8, N x 3 x H x W) with corruption ``name`` at ``severity`` 1..3."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; known: {sorted(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"corruption severity {severity}: expected one of {SEVERITIES}")
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"corrupt expects uint8 (N, 3, H, W) images, got {images.dtype} {tuple(images.shape)}")
    g = torch.Generator().manual_seed(seed * 1009 + severity * 17 + sorted(CORRUPTIONS).index(name))
    return CORRUPTIONS[name](images, severity, g)
