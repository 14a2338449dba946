"""Synthetic images for scarce domains.

Fourier domain adaptation (Yang & Soatto, CVPR 2020): keep a content image's phase (its shapes) and
paste the low-frequency amplitude (its colour, illumination and texture) of a target-domain image,
giving the content in the target domain's style with its label unchanged.
"""
from __future__ import annotations

import numpy as np


def fourier_style_transfer(content: np.ndarray, style: np.ndarray, beta: float = 0.1) -> np.ndarray:
    """content, style: H x W x 3 uint8 of equal size -> H x W x 3 uint8.

    ``beta`` is the half-width of the swapped low-frequency window as a fraction of the image side.
    """
    if content.shape != style.shape:
        raise ValueError(f"content {content.shape} and style {style.shape} must have the same shape")
    c = np.fft.fft2(content.astype(np.float32), axes=(0, 1))
    s = np.fft.fft2(style.astype(np.float32), axes=(0, 1))
    amp_c, pha_c = np.abs(c), np.angle(c)
    amp_s = np.abs(s)
    amp_c, amp_s = np.fft.fftshift(amp_c, axes=(0, 1)), np.fft.fftshift(amp_s, axes=(0, 1))
    h, w = content.shape[:2]
    b = max(1, int(np.floor(min(h, w) * beta)))
    ch, cw = h // 2, w // 2
    amp_c[ch - b : ch + b + 1, cw - b : cw + b + 1] = amp_s[ch - b : ch + b + 1, cw - b : cw + b + 1]
    amp_c = np.fft.ifftshift(amp_c, axes=(0, 1))
    out = np.fft.ifft2(amp_c * np.exp(1j * pha_c), axes=(0, 1)).real
    return np.clip(out, 0, 255).round().astype(np.uint8)


def plan_targets(train_counts: dict[tuple[str, str], int], scarce_domains: list[str], target_per_class: int,
                 classes: list[str]) -> dict[tuple[str, str], int]:
    """How many synthetic images each (scarce domain, class) needs to reach ``target_per_class``."""
    return {
        (d, c): max(0, target_per_class - train_counts.get((d, c), 0))
        for d in scarce_domains
        for c in classes
        if target_per_class > train_counts.get((d, c), 0)
    }


def find_scarce_domains(train_sizes: dict[str, int], ratio: float) -> list[str]:
    """Domains whose training set is below ``ratio`` times the largest domain's."""
    if not train_sizes:
        return []
    largest = max(train_sizes.values())
    return sorted(d for d, n in train_sizes.items() if n < ratio * largest)
