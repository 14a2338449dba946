"""The built-in multi-domain dataset: scikit-learn's bundled UCI handwritten digits (real scans),
split into disjoint source images and rendered as four domains with realistic acquisition shifts.

- ``clean``:    flatbed scan, black ink on white paper.
- ``ink``:      coloured ink on textured, tinted paper.
- ``lowlight``: dark, noisy low-light sensor with a colour cast.
- ``phone``:    rotated, blurred, unevenly lit phone capture (the scarce domain).

Everything is deterministic for a seed. Class frequencies differ by domain.
"""
from __future__ import annotations

import colorsys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageFilter

DOMAINS = ("clean", "ink", "lowlight", "phone")


@dataclass(frozen=True)
class BuiltinSpec:
    """Relative size of each domain; ``phone`` is kept at most ``scarce_fraction`` of the others."""

    size: int = 32
    scarce_fraction: float = 0.18
    class_skew: float = 4.0  # Dirichlet concentration for per-domain class frequencies (lower = more skew)
    limit: int | None = None  # use only this many source digits (tiny datasets for tests)


def _upsample(digit8: np.ndarray, size: int) -> np.ndarray:
    """8x8 ink intensities in 0..16 -> size x size float ink map in 0..1 (bicubic, as a scanner would)."""
    img = Image.fromarray((digit8 / 16.0 * 255).astype(np.uint8), mode="L")
    # pad by one pixel so strokes do not touch the border after resampling
    canvas = Image.new("L", (10, 10), 0)
    canvas.paste(img, (1, 1))
    big = canvas.resize((size, size), Image.Resampling.BICUBIC)
    return np.clip(np.asarray(big, dtype=np.float32) / 255.0, 0.0, 1.0)


def _to_image(rgb: np.ndarray) -> Image.Image:
    return Image.fromarray((np.clip(rgb, 0.0, 1.0) * 255 + 0.5).astype(np.uint8), mode="RGB")


def _smooth_noise(rng: np.random.Generator, size: int, scale: int) -> np.ndarray:
    coarse = rng.random((max(2, size // scale), max(2, size // scale))).astype(np.float32)
    img = Image.fromarray((coarse * 255).astype(np.uint8), mode="L").resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.float32) / 255.0


def render_clean(ink: np.ndarray, rng: np.random.Generator) -> Image.Image:
    paper = 0.96 + rng.normal(0, 0.01, ink.shape)
    gray = paper * (1.0 - 0.92 * ink)
    return _to_image(np.repeat(gray[..., None], 3, axis=2))


def render_ink(ink: np.ndarray, rng: np.random.Generator) -> Image.Image:
    size = ink.shape[0]
    hue = rng.choice([0.62, 0.0, 0.33, 0.78]) + rng.normal(0, 0.02)  # blue, red, green, violet pens
    ink_rgb = np.array(colorsys.hsv_to_rgb(hue % 1.0, 0.85, 0.55), dtype=np.float32)
    tint = np.array(colorsys.hsv_to_rgb(rng.uniform(0.08, 0.14), rng.uniform(0.15, 0.35), 0.93), np.float32)
    texture = 0.75 * _smooth_noise(rng, size, 4) + 0.25 * rng.random((size, size)).astype(np.float32)
    paper = tint[None, None, :] * (0.88 + 0.12 * texture[..., None])
    a = np.clip(ink * rng.uniform(0.8, 1.0), 0, 1)[..., None]
    return _to_image(paper * (1 - a) + ink_rgb[None, None, :] * a)


def render_lowlight(ink: np.ndarray, rng: np.random.Generator) -> Image.Image:
    level = rng.uniform(0.12, 0.25)  # exposure
    cast = np.array([0.85, 1.0, 0.9], np.float32) * rng.uniform(0.9, 1.1, 3).astype(np.float32)
    signal = level * (1.0 - 0.85 * ink)[..., None] * cast[None, None, :]
    shot = rng.normal(0, 1, signal.shape).astype(np.float32) * np.sqrt(signal * 0.004)
    read = rng.normal(0, 0.025, signal.shape).astype(np.float32)
    return _to_image(signal + shot + read)


def render_phone(ink: np.ndarray, rng: np.random.Generator) -> Image.Image:
    size = ink.shape[0]
    gray = 0.9 * (1.0 - 0.9 * ink)
    img = Image.fromarray((gray * 255).astype(np.uint8), mode="L")
    img = img.rotate(rng.uniform(-30, 30), resample=Image.Resampling.BILINEAR, fillcolor=int(0.9 * 255))
    img = img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.7, 1.4)))
    g = np.asarray(img, dtype=np.float32) / 255.0
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle = rng.uniform(0, 2 * np.pi)
    gradient = 0.75 + 0.35 * (np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5) + 0.5)
    warm = np.array([1.0, 0.96, 0.88], np.float32)
    rgb = g[..., None] * gradient[..., None] * warm[None, None, :]
    return _to_image(rgb + rng.normal(0, 0.02, rgb.shape))


RENDERERS: dict[str, Callable[[np.ndarray, np.random.Generator], Image.Image]] = {
    "clean": render_clean,
    "ink": render_ink,
    "lowlight": render_lowlight,
    "phone": render_phone,
}


def assign_domains(labels: np.ndarray, rng: np.random.Generator, spec: BuiltinSpec) -> np.ndarray:
    """Give every source digit exactly one domain: disjoint sources, skewed class mixes, one scarce domain."""
    n_classes = int(labels.max()) + 1
    big = len(DOMAINS) - 1
    size_share = np.array([1.0] * big + [spec.scarce_fraction * 0.95], dtype=np.float64)
    mix = rng.dirichlet([spec.class_skew] * n_classes, size=len(DOMAINS)) * n_classes  # [domain, class]
    out = np.empty(len(labels), dtype=np.int64)
    for c in range(n_classes):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        share = size_share * mix[:, c]
        counts = np.floor(share / share.sum() * len(idx)).astype(int)
        counts[0] += len(idx) - counts.sum()
        out[idx] = np.repeat(np.arange(len(DOMAINS)), counts)
    # keep the scarce domain within its bound even after rounding
    big_sizes = [np.sum(out == d) for d in range(big)]
    scarce = np.flatnonzero(out == big)
    cap = int(spec.scarce_fraction * min(big_sizes))
    if len(scarce) > cap:
        out[rng.choice(scarce, len(scarce) - cap, replace=False)] = 0
    return out


def materialize(root: str | Path, seed: int = 0, spec: BuiltinSpec = BuiltinSpec()) -> dict[str, int]:
    """Write ``root/<domain>/<class>/<id>.png``; returns the number of images per domain."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, labels = digits.images, digits.target
    order = np.random.default_rng(seed).permutation(len(labels))
    if spec.limit is not None:
        order = order[: spec.limit]
    images, labels = images[order], labels[order]
    rng = np.random.default_rng(seed + 1)
    domain_of = assign_domains(labels, rng, spec)
    root = Path(root)
    counts = {d: 0 for d in DOMAINS}
    for i, (digit, label, d) in enumerate(zip(images, labels, domain_of)):
        domain = DOMAINS[d]
        img_rng = np.random.default_rng([seed, int(order[i])])
        out = root / domain / str(int(label)) / f"uci{int(order[i]):04d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        RENDERERS[domain](_upsample(digit, spec.size), img_rng).save(out, format="PNG", optimize=False)
        counts[domain] += 1
    return counts
