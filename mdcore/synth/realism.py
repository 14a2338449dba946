"""Judging synthetic images against real ones: is a batch realistic for its target domain, and does it
keep its labels?

- :class:`DomainJudge`: a logistic regression on acquisition-style features (``imstats.style_features``)
  trained to tell the seen domains apart on real training images. A synthetic batch's *realism* is the
  share of its images it assigns to the batch's target domain (compare: its recall on real validation
  images of that domain).
- :class:`LabelJudge`: a logistic regression on content features (standardized low-resolution pixels
  plus a histogram of gradient orientations) trained on real training images of all seen domains. A
  batch's *agreement* is the share of images it gives the intended label (compare: its accuracy on real
  validation images of the target domain).
- :func:`frechet_distance` between feature sets (reported, not thresholded).

scikit-learn only; a few seconds on two cores for the built-in dataset.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

from mdcore.data.imstats import as_float, luminance, sobel, style_features

JUDGE_SIZE = 32


def to_judge_size(images: np.ndarray, size: int = JUDGE_SIZE) -> np.ndarray:
    """uint8 (N,H,W,3) resized (bilinear) to size x size when needed."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    if images.shape[1:3] == (size, size):
        return images
    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.BILINEAR)) for im in images])


def rotate_batch(images: np.ndarray, angle: float) -> np.ndarray:
    """Rotate uint8 (N,H,W,3) images about their centre, filling with each image's border median."""
    out = []
    for im in images:
        fill = np.median(np.concatenate([im[0], im[-1], im[:, 0], im[:, -1]]), axis=0)
        out.append(np.asarray(Image.fromarray(im).rotate(angle, resample=Image.Resampling.BILINEAR,
                                                         fillcolor=tuple(int(v) for v in fill))))
    return np.stack(out) if out else images


def content_features(images: np.ndarray) -> np.ndarray:
    """Content (label) features, insensitive to exposure, contrast and tint: the per-image standardized
    luminance at 16x16, and 8-bin gradient-orientation histograms over a 4x4 grid of cells."""
    lum = luminance(as_float(to_judge_size(images)))
    n, h, w = lum.shape
    z = lum - lum.mean(axis=(1, 2), keepdims=True)
    z /= np.maximum(z.std(axis=(1, 2), keepdims=True), 1e-3)
    small = z.reshape(n, h // 2, 2, w // 2, 2).mean(axis=(2, 4)).reshape(n, -1)
    gx, gy = sobel(z)
    mag = np.sqrt(gx * gx + gy * gy)
    ori = ((np.arctan2(gy, gx) + np.pi) / (2 * np.pi) * 8).astype(int) % 8
    cells = 4
    ch, cw = h // cells, w // cells
    onehot = np.zeros((n, h, w, 8), np.float32)
    np.put_along_axis(onehot, ori[..., None], mag[..., None], axis=3)
    hog = onehot[:, : ch * cells, : cw * cells].reshape(n, cells, ch, cells, cw, 8).sum(axis=(2, 4))
    hog = hog.reshape(n, cells * cells, 8)
    hog /= np.maximum(np.linalg.norm(hog, axis=2, keepdims=True), 1e-3)
    return np.concatenate([small, hog.reshape(n, -1)], axis=1).astype(np.float32)


def _logreg(c: float, balanced: bool):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=300, tol=1e-3,
                                                              class_weight="balanced" if balanced else None))


def _fit(model, x, y):
    from threadpoolctl import threadpool_limits

    # one BLAS thread: these fits are small, and oversubscribed threads make them ~10x slower on a busy box
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore")  # convergence chatter on tiny data sets
        model.fit(x, y)
    return model


@dataclass
class DomainJudge:
    """Tells domains apart from acquisition-style features."""

    model: object
    domains: list[str]

    @classmethod
    def fit(cls, images: np.ndarray, domains, c: float = 0.5) -> "DomainJudge":
        domains = np.asarray(domains)
        names = sorted(set(domains.tolist()))
        if len(names) < 2:
            raise ValueError("the domain judge needs real images of at least two domains")
        return cls(_fit(_logreg(c, balanced=True), style_features(to_judge_size(images)), domains), names)

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.model.predict(style_features(to_judge_size(images)))

    def share(self, images: np.ndarray, domain: str) -> float:
        """Share of ``images`` assigned to ``domain`` (the realism score)."""
        if len(images) == 0:
            return float("nan")
        return float(np.mean(self.predict(images) == domain))


@dataclass
class LabelJudge:
    """Labels images from content features; trained on real images of all seen domains."""

    model: object

    @classmethod
    def fit(cls, images: np.ndarray, labels, c: float = 0.05, rotations=(-25, -12, 12, 25)) -> "LabelJudge":
        """``rotations``: also train on rotated copies (degrees), so that a rotation within the range
        real domains show (a tilted phone capture) is not mistaken for a lost label."""
        images = to_judge_size(images)
        x = np.concatenate([images] + [rotate_batch(images, a) for a in rotations])
        y = np.concatenate([np.asarray(labels)] * (1 + len(rotations)))
        return cls(_fit(_logreg(c, balanced=False), content_features(x), y))

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.model.predict(content_features(images))

    def agreement(self, images: np.ndarray, labels) -> float:
        """Share of ``images`` given their intended label."""
        if len(images) == 0:
            return float("nan")
        return float(np.mean(self.predict(images) == np.asarray(labels)))


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (rows = samples)."""
    from scipy import linalg

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    ca = np.atleast_2d(np.cov(a, rowvar=False)) + 1e-6 * np.eye(a.shape[1])
    cb = np.atleast_2d(np.cov(b, rowvar=False)) + 1e-6 * np.eye(a.shape[1])
    covmean = linalg.sqrtm(ca @ cb)
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(ca + cb - 2 * covmean))


@dataclass
class StyleSpace:
    """Style features standardized on real training images (so the Fréchet distance weighs them alike)."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, images: np.ndarray) -> "StyleSpace":
        f = style_features(to_judge_size(images))
        return cls(f.mean(axis=0), np.maximum(f.std(axis=0), 1e-6))

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return (style_features(to_judge_size(images)) - self.mean) / self.std

    def distance(self, a: np.ndarray, b: np.ndarray) -> float:
        """Fréchet distance between two image sets in this space (needs 2+ images each)."""
        if len(a) < 2 or len(b) < 2:
            return float("nan")
        return frechet_distance(self(a), self(b))


@dataclass
class Verdict:
    realism: float
    agreement: float
    accepted: bool
    reasons: list[str]


def judge_batch(realism: float, agreement: float, real_agreement: float, min_realism: float,
                min_agreement_ratio: float) -> Verdict:
    """Accept a batch when enough of it looks like the target domain and its labels survive: agreement
    at least ``min_agreement_ratio`` x the label judge's accuracy on real images of the domain."""
    reasons = []
    if not realism >= min_realism:
        reasons.append(f"realism {realism:.2f} < {min_realism:.2f}")
    bar = min_agreement_ratio * real_agreement
    if not agreement >= bar:
        reasons.append(f"label agreement {agreement:.2f} < {min_agreement_ratio:.2f} x real {real_agreement:.2f}"
                       f" = {bar:.2f}")
    return Verdict(realism, agreement, not reasons, reasons)
