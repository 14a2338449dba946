"""Synthetic images for scarce domains: style transfer of other domains' content.

- Fourier domain adaptation (Yang & Soatto, CVPR 2020): keep a content image's phase (its shapes) and
  paste the low-frequency amplitude (its colour, illumination and texture) of a target-domain image,
  giving the content in the target domain's style with its label unchanged. Optionally the rest of the
  amplitude spectrum is matched, per radial frequency band, to the target domain's mean profile, which
  carries its blur (high frequencies damped) and its noise floor (high frequencies raised).
- Feature-statistics matching (AdaIN in pixel space): the content's per-channel mean and std replaced
  by a target-domain image's.

The per-domain augmentation policies (the other method) live in ``mdcore.synth.policy``.
"""
from __future__ import annotations

import numpy as np

PROFILE_BINS = 16


def _radial_index(h: int, w: int, bins: int = PROFILE_BINS) -> np.ndarray:
    fy, fx = np.meshgrid(np.fft.fftfreq(h), np.fft.fftfreq(w), indexing="ij")
    radius = np.sqrt(fx ** 2 + fy ** 2) / np.sqrt(0.5)  # 0..1
    return np.minimum((radius * bins).astype(int), bins - 1)


def radial_amplitude_profile(images: np.ndarray, bins: int = PROFILE_BINS) -> np.ndarray:
    """Mean Fourier amplitude per radial frequency band and channel -> (bins, 3), averaged over images
    (uint8 N,H,W,3 or one H,W,3)."""
    x = np.asarray(images, dtype=np.float32)
    if x.ndim == 3:
        x = x[None]
    amp = np.abs(np.fft.fft2(x, axes=(1, 2))).mean(axis=0)  # H,W,3
    index = _radial_index(*amp.shape[:2], bins)
    counts = np.maximum(np.bincount(index.ravel(), minlength=bins), 1)
    return np.stack([np.bincount(index.ravel(), amp[..., ch].ravel(), minlength=bins) / counts
                     for ch in range(amp.shape[2])], axis=1)


def fourier_style_transfer(content: np.ndarray, style: np.ndarray, beta: float = 0.1,
                           target_profile: np.ndarray | None = None) -> np.ndarray:
    """content, style: H x W x 3 uint8 of equal size -> H x W x 3 uint8.

    ``beta`` is the half-width of the swapped low-frequency window as a fraction of the image side.
    ``target_profile`` (from :func:`radial_amplitude_profile` of the target domain's images): scale the
    content's amplitude per radial band to it before the swap (spectral matching: blur, noise floor).
    """
    if content.shape != style.shape:
        raise ValueError(f"content {content.shape} and style {style.shape} must have the same shape")
    c = np.fft.fft2(content.astype(np.float32), axes=(0, 1))
    s = np.fft.fft2(style.astype(np.float32), axes=(0, 1))
    amp_c, pha_c = np.abs(c), np.angle(c)
    amp_s = np.abs(s)
    if target_profile is not None:
        own = radial_amplitude_profile(content, len(target_profile))
        gain = np.asarray(target_profile, np.float32) / np.maximum(own, 1e-6)
        amp_c = amp_c * gain[_radial_index(*content.shape[:2], len(target_profile))]
    amp_c, amp_s = np.fft.fftshift(amp_c, axes=(0, 1)), np.fft.fftshift(amp_s, axes=(0, 1))
    h, w = content.shape[:2]
    b = max(1, int(np.floor(min(h, w) * beta)))
    ch, cw = h // 2, w // 2
    amp_c[ch - b : ch + b + 1, cw - b : cw + b + 1] = amp_s[ch - b : ch + b + 1, cw - b : cw + b + 1]
    amp_c = np.fft.ifftshift(amp_c, axes=(0, 1))
    out = np.fft.ifft2(amp_c * np.exp(1j * pha_c), axes=(0, 1)).real
    return np.clip(out, 0, 255).round().astype(np.uint8)


def stats_transfer(content: np.ndarray, style: np.ndarray) -> np.ndarray:
    """AdaIN in pixel space: the content's per-channel mean and std set to the style image's
    (H x W x 3 uint8, sizes may differ) -> H x W x 3 uint8."""
    c, s = content.astype(np.float32), style.astype(np.float32)
    z = (c - c.mean(axis=(0, 1))) / np.maximum(c.std(axis=(0, 1)), 1.0)
    return np.clip(z * s.std(axis=(0, 1)) + s.mean(axis=(0, 1)), 0, 255).round().astype(np.uint8)


def split_by_shares(n: int, shares: dict[str, float]) -> dict[str, int]:
    """Split ``n`` images between methods by their shares (largest remainder; deterministic)."""
    total = sum(shares.values())
    if n <= 0 or total <= 0:
        return {m: 0 for m in shares}
    exact = {m: n * w / total for m, w in shares.items()}
    out = {m: int(np.floor(v)) for m, v in exact.items()}
    order = sorted(shares, key=lambda m: (-(exact[m] - out[m]), list(shares).index(m)))
    for m in order[: n - sum(out.values())]:
        out[m] += 1
    return out


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
