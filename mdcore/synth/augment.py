"""Batched, per-image random augmentations on float tensors in [-1, 1] (no per-image Python loop)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def random_affine(x: torch.Tensor, g: torch.Generator | None, scale=(0.75, 1.05), degrees=20.0, shift=0.12):
    n = x.shape[0]
    s = torch.empty(n).uniform_(*scale, generator=g)
    a = torch.empty(n).uniform_(-degrees, degrees, generator=g) * math.pi / 180
    t = torch.empty(n, 2).uniform_(-shift, shift, generator=g)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = s * torch.cos(a), -s * torch.sin(a)
    theta[:, 1, 0], theta[:, 1, 1] = s * torch.sin(a), s * torch.cos(a)
    theta[:, :, 2] = t
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    # pad with each image's own border colour (paper), not black
    border = x[:, :, :1, :1]
    return F.grid_sample(x - border, grid, align_corners=False, padding_mode="zeros") + border


def color_jitter(x: torch.Tensor, g: torch.Generator | None, strength: float = 0.4, p_gray: float = 0.2):
    n = x.shape[0]
    brightness = torch.empty(n, 1, 1, 1).uniform_(-strength, strength, generator=g).to(x)
    contrast = torch.empty(n, 1, 1, 1).uniform_(1 - strength, 1 + strength, generator=g).to(x)
    channel_gain = torch.empty(n, 3, 1, 1).uniform_(1 - strength / 2, 1 + strength / 2, generator=g)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * contrast + mean + brightness
    x = x * channel_gain.to(x)
    gray = torch.rand(n, 1, 1, 1, generator=g) < p_gray
    x = torch.where(gray.to(x.device), x.mean(dim=1, keepdim=True).expand_as(x), x)
    invert = torch.rand(n, 1, 1, 1, generator=g) < 0.1  # light-on-dark captures exist (low light, negatives)
    return torch.where(invert.to(x.device), -x, x)


def gaussian_noise(x: torch.Tensor, g: torch.Generator | None, max_std: float = 0.15):
    std = torch.empty(x.shape[0], 1, 1, 1).uniform_(0, max_std, generator=g)
    return x + randn_like_on_device(x, g) * std.to(x)


def randn_like_on_device(x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
    """Per-pixel noise shaped like ``x``. On CPU it comes from ``g`` itself; on a GPU from a generator there,
    seeded by one draw of ``g``, so no image-sized tensor is drawn on the CPU and copied over, and a run
    stays reproducible on its device. (Every other random parameter here is one number per image, drawn
    from ``g`` on the CPU and moved.)"""
    if x.device.type == "cpu":
        return torch.randn(x.shape, generator=g)
    device_g = torch.Generator(x.device)
    if g is None:
        device_g.seed()
    else:
        device_g.manual_seed(int(torch.randint(0, 2**62, (1,), generator=g)))
    return torch.randn(x.shape, generator=device_g, device=x.device, dtype=x.dtype)


def blur(x: torch.Tensor, g: torch.Generator | None, p: float = 0.3):
    k = torch.tensor([1.0, 2.0, 1.0])
    kernel = (k[:, None] * k[None, :] / 16).to(x).expand(x.shape[1], 1, 3, 3)
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=x.shape[1])
    pick = torch.rand(x.shape[0], 1, 1, 1, generator=g) < p
    return torch.where(pick.to(x.device), blurred, x)


def replace_rows(x: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``x`` with ``x[rows] = values``, as a new tensor: a view randomization computed for the picked images
    only (``rows``) goes back in its place."""
    out = x.clone()
    out[rows.to(x.device)] = values
    return out


def ssl_view(x: torch.Tensor, g: torch.Generator | None = None) -> torch.Tensor:
    """One strong view for contrastive pretraining (SimCLR-style, shifts seen across our domains)."""
    x = random_affine(x, g)
    x = color_jitter(x, g)
    x = blur(x, g)
    return gaussian_noise(x, g).clamp(-1.5, 1.5)


def train_view(x: torch.Tensor, g: torch.Generator | None = None) -> torch.Tensor:
    """A mild, label-preserving view for supervised fine-tuning."""
    x = random_affine(x, g, scale=(0.9, 1.05), degrees=10.0, shift=0.06)
    return gaussian_noise(color_jitter(x, g, strength=0.2, p_gray=0.1), g, max_std=0.05)


def fourier_domain_mix(x: torch.Tensor, domains: torch.Tensor, g: torch.Generator | None, p: float = 0.5,
                       strength: float = 1.0) -> torch.Tensor:
    """Fourier amplitude mixing across domains (Xu et al., 2021, FACT): with probability ``p`` per image,
    blend its amplitude spectrum with that of a random image of *another* domain in the batch (weight
    lambda ~ U(0, strength)), keeping its own phase (the content). Images with no other-domain partner in
    the batch are left as they are."""
    n = x.shape[0]
    domains = domains.to(x.device)
    other = domains[:, None] != domains[None, :]
    if n < 2 or not bool(other.any()):
        return x
    scores = torch.rand(n, n, generator=g).to(x.device).masked_fill(~other, -1.0)
    partner = scores.argmax(1)
    has_partner = other.any(1)
    spec, spec_p = torch.fft.fft2(x.float()), torch.fft.fft2(x[partner].float())
    lam = torch.empty(n, 1, 1, 1).uniform_(0, strength, generator=g).to(x.device)
    amp = (1 - lam) * spec.abs() + lam * spec_p.abs()
    mixed = torch.fft.ifft2(torch.polar(amp, spec.angle())).real.to(x.dtype)
    pick = (torch.rand(n, generator=g).to(x.device) < p) & has_partner
    return torch.where(pick[:, None, None, None], mixed, x)
