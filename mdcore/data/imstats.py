"""Per-image acquisition statistics, vectorized over a batch of RGB images (N x H x W x 3 float in 0..1).

These describe an image's *style* (exposure, contrast, colour cast, blur, sensor noise, uneven light),
not its content. The augmentation policies (``mdcore.synth.policy``) are fitted on them and the realism judge
(``mdcore.synth.realism``) uses them as features.
"""
from __future__ import annotations

import numpy as np

LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
STAT_NAMES = ("brightness", "contrast", "tint_r", "tint_g", "tint_b", "sharpness", "noise", "gradient")


def as_float(images: np.ndarray) -> np.ndarray:
    """uint8 (N,H,W,3) or (H,W,3) -> float32 in 0..1 (a batch axis is added for one image)."""
    x = np.asarray(images)
    if x.ndim == 3:
        x = x[None]
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    return x.astype(np.float32, copy=False)


def luminance(rgb: np.ndarray) -> np.ndarray:
    """(N,H,W,3) -> (N,H,W)."""
    return rgb @ LUMA


def _plane_design(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    xx, yy = (xx + 0.5) / w - 0.5, (yy + 0.5) / h - 0.5
    return np.stack([np.ones(h * w, np.float32), xx.ravel(), yy.ravel()], axis=1)


def sobel(lum: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sobel x/y derivatives of (N,H,W) with edge padding, same shape."""
    p = np.pad(lum, ((0, 0), (1, 1), (1, 1)), mode="edge")
    gx = (p[:, :-2, 2:] + 2 * p[:, 1:-1, 2:] + p[:, 2:, 2:]) - (p[:, :-2, :-2] + 2 * p[:, 1:-1, :-2] + p[:, 2:, :-2])
    gy = (p[:, 2:, :-2] + 2 * p[:, 2:, 1:-1] + p[:, 2:, 2:]) - (p[:, :-2, :-2] + 2 * p[:, :-2, 1:-1] + p[:, :-2, 2:])
    return gx / 8.0, gy / 8.0


def noise_sigma(lum: np.ndarray) -> np.ndarray:
    """Sensor noise (std, 0..1 units) per image: robust (median) version of Immerkaer's estimator, whose
    3x3 kernel cancels smooth structure; the median ignores the few edge pixels."""
    r = (lum[:, :-2, :-2] - 2 * lum[:, :-2, 1:-1] + lum[:, :-2, 2:]
         - 2 * lum[:, 1:-1, :-2] + 4 * lum[:, 1:-1, 1:-1] - 2 * lum[:, 1:-1, 2:]
         + lum[:, 2:, :-2] - 2 * lum[:, 2:, 1:-1] + lum[:, 2:, 2:])
    return np.median(np.abs(r).reshape(len(lum), -1), axis=1) / (0.6745 * 6.0)


def sharpness(lum: np.ndarray) -> np.ndarray:
    """Edge steepness relative to the dynamic range: mean of the top 5% gradient magnitudes divided by
    the 2-98 percentile range (blur lowers it; exposure and contrast do not change it)."""
    gx, gy = sobel(lum)
    mag = np.sqrt(gx * gx + gy * gy).reshape(len(lum), -1)
    k = max(1, int(0.05 * mag.shape[1]))
    top = np.partition(mag, -k, axis=1)[:, -k:].mean(axis=1)
    flat = lum.reshape(len(lum), -1)
    rng = np.percentile(flat, 98, axis=1) - np.percentile(flat, 2, axis=1)
    return top / np.maximum(rng, 1e-3)


def gradient_slope(lum: np.ndarray) -> np.ndarray:
    """Uneven illumination: slope of a least-squares plane through the luminance, per image side,
    relative to the mean level (0 = even light)."""
    n, h, w = lum.shape
    design = _plane_design(h, w)
    coef = np.linalg.lstsq(design, lum.reshape(n, -1).T, rcond=None)[0]  # (3, N)
    return np.hypot(coef[1], coef[2]) / np.maximum(coef[0], 1e-3)


def radial_spectrum(lum: np.ndarray, bins: int = 6) -> np.ndarray:
    """Share of the (standardized) image's spectral energy in ``bins`` radial frequency bands."""
    n, h, w = lum.shape
    z = lum - lum.mean(axis=(1, 2), keepdims=True)
    power = np.abs(np.fft.fft2(z, axes=(1, 2))) ** 2
    fy, fx = np.meshgrid(np.fft.fftfreq(h), np.fft.fftfreq(w), indexing="ij")
    radius = np.sqrt(fx ** 2 + fy ** 2) / 0.5  # 0..~1.41
    idx = np.minimum((np.minimum(radius, 0.999) * bins).astype(int), bins - 1).ravel()
    flat = power.reshape(n, -1)
    out = np.stack([flat[:, idx == b].sum(axis=1) for b in range(bins)], axis=1)
    return out / np.maximum(out.sum(axis=1, keepdims=True), 1e-12)


def image_stats(images: np.ndarray) -> np.ndarray:
    """(N, len(STAT_NAMES)) statistics: brightness, contrast, tint (3), sharpness, noise, gradient."""
    rgb = as_float(images)
    lum = luminance(rgb)
    bright = lum.mean(axis=(1, 2))
    tint = rgb.mean(axis=(1, 2)) / np.maximum(bright[:, None], 1e-3)
    return np.column_stack([bright, lum.std(axis=(1, 2)), tint, sharpness(lum), noise_sigma(lum),
                            gradient_slope(lum)]).astype(np.float32)


def style_features(images: np.ndarray) -> np.ndarray:
    """Features of acquisition style for the domain classifier: the statistics above, luminance
    percentiles, saturation, per-channel spread, and the radial spectrum (log noise)."""
    rgb = as_float(images)
    lum = luminance(rgb)
    stats = image_stats(rgb)
    stats[:, 6] = np.log(stats[:, 6] + 1e-3)
    pct = np.percentile(lum.reshape(len(lum), -1), [2, 10, 25, 50, 75, 90, 98], axis=1).T
    sat = (rgb.max(axis=3) - rgb.min(axis=3)).mean(axis=(1, 2))
    chan_std = rgb.std(axis=(1, 2))
    spec = np.log(radial_spectrum(lum) + 1e-6)
    return np.column_stack([stats, pct, sat, chan_std, spec]).astype(np.float32)
