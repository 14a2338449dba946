"""Semantics-preserving augmentation policies fitted per domain.

A :class:`DomainPolicy` is estimated from a domain's real training images: the per-image acquisition
statistics of ``mdcore.data.imstats`` (brightness, contrast, colour tint, sharpness, noise, uneven light) and
the spread of rotations (estimated by aligning each image to its class template from a reference
domain). Applying it to an image of another domain (or the same one) samples a target statistics vector
around a random real image of the domain and renders the content with it: rotate, blur (searched to
match the sharpness), uneven light, exposure and contrast, tint, sensor noise. Only photometric changes
and small rotations: the label is unchanged (rotations are capped, so a 6 never becomes a 9).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from mdcore.data.imstats import LUMA, STAT_NAMES, as_float, image_stats, luminance, noise_sigma, sharpness

ANGLES = np.arange(-45, 46, 5, dtype=np.float32)
LUMA_NOISE_GAIN = float(np.sqrt((LUMA ** 2).sum()))  # iid channel noise -> luminance noise


@dataclass
class DomainPolicy:
    """A domain's fitted statistics: one row per real image (``table``, columns ``STAT_NAMES``) plus
    the rotation spread in degrees. ``jitter`` scales the noise added around a sampled row (in units
    of the domain's per-statistic std)."""

    domain: str
    table: np.ndarray
    rotation_std: float = 0.0
    jitter: float = 0.3
    max_rotation: float = 30.0
    info: dict = field(default_factory=dict)

    @property
    def mean(self) -> np.ndarray:
        return self.table.mean(axis=0)

    @property
    def std(self) -> np.ndarray:
        return self.table.std(axis=0)

    def summary(self) -> dict:
        """JSON-friendly description (mean and std of each statistic, rotation spread)."""
        return {
            "domain": self.domain,
            "images": int(len(self.table)),
            "rotation_std_deg": round(float(self.rotation_std), 2),
            **{f"{n}_mean": round(float(m), 4) for n, m in zip(STAT_NAMES, self.mean)},
            **{f"{n}_std": round(float(s), 4) for n, s in zip(STAT_NAMES, self.std)},
            **self.info,
        }

    def sample(self, rng: np.random.Generator) -> dict:
        """Target statistics for one image: a random real image's statistics plus jitter, kept inside
        the domain's observed range; and a rotation angle."""
        row = self.table[int(rng.integers(len(self.table)))]
        lo, hi = self.table.min(axis=0), self.table.max(axis=0)
        values = np.clip(row + rng.normal(0, 1, row.shape) * self.jitter * self.std, lo, hi)
        out = {n: float(v) for n, v in zip(STAT_NAMES, values)}
        out["angle"] = float(np.clip(rng.normal(0, self.rotation_std), -self.max_rotation, self.max_rotation))
        out["light_direction"] = float(rng.uniform(0, 2 * np.pi))
        return out


def _standardize(lum: np.ndarray) -> np.ndarray:
    z = lum - lum.mean(axis=(-2, -1), keepdims=True)
    return z / np.maximum(z.std(axis=(-2, -1), keepdims=True), 1e-3)


def best_alignment_angles(lum: np.ndarray, labels: np.ndarray, templates: dict, angles=ANGLES) -> np.ndarray:
    """For each image the rotation (degrees) that best correlates it with its class template."""
    z = _standardize(ndimage.gaussian_filter(lum, sigma=(0, 1, 1)))
    scores = np.full((len(angles), len(lum)), -np.inf, dtype=np.float32)
    tpl = np.stack([templates.get(c, np.zeros(lum.shape[1:], np.float32)) for c in labels])
    for i, a in enumerate(angles):
        rot = ndimage.rotate(z, float(a), axes=(2, 1), reshape=False, order=1, mode="nearest")
        scores[i] = (_standardize(rot) * tpl).mean(axis=(1, 2))
    return np.asarray(angles)[scores.argmax(axis=0)]


def estimate_rotation_std(target: np.ndarray, target_labels, reference: np.ndarray,
                          reference_labels) -> tuple[float, dict]:
    """Rotation spread of ``target`` images beyond that of ``reference`` images (degrees).

    Each image is aligned to its class template (mean of the reference domain's standardized images of
    that class); the spread of the best angles, minus the same spread measured on reference images
    (template noise, natural slant), is the domain's own rotation spread.
    """
    target_labels, reference_labels = np.asarray(target_labels), np.asarray(reference_labels)
    if len(target) == 0 or len(reference) == 0:
        return 0.0, {"rotation_estimate": "no data"}
    ref_lum = _standardize(ndimage.gaussian_filter(luminance(as_float(reference)), sigma=(0, 1, 1)))
    templates = {c: _standardize(ref_lum[reference_labels == c].mean(axis=0)) for c in np.unique(reference_labels)}
    t = best_alignment_angles(luminance(as_float(target)), target_labels, templates)
    r = best_alignment_angles(luminance(as_float(reference)), reference_labels, templates)
    var = float(np.mean(t.astype(np.float64) ** 2) - np.mean(r.astype(np.float64) ** 2))
    return float(np.sqrt(max(var, 0.0))), {"rotation_rms_target_deg": round(float(np.sqrt(np.mean(t ** 2))), 2),
                                           "rotation_rms_reference_deg": round(float(np.sqrt(np.mean(r ** 2))), 2)}


def fit_policy(domain: str, images: np.ndarray, labels=None, reference: np.ndarray | None = None,
               reference_labels=None, jitter: float = 0.3, max_rotation: float = 30.0) -> DomainPolicy:
    """Fit a domain's policy on its real images (uint8 N,H,W,3). With labels and a reference domain's
    labelled images, the rotation spread is estimated too; otherwise it is 0."""
    table = image_stats(images)
    rot, info = 0.0, {}
    if labels is not None and reference is not None and reference_labels is not None:
        rot, info = estimate_rotation_std(images, labels, reference, reference_labels)
    return DomainPolicy(domain, table, min(rot, max_rotation), jitter, max_rotation, info)


def _render(lum: np.ndarray, target: dict, ramp: np.ndarray, noise_field: np.ndarray,
            sigmas: np.ndarray) -> np.ndarray:
    """Render luminance (H,W) once per blur sigma: blur, tone to the target exposure and contrast, uneven
    light (``ramp``, mean 1), tint, sensor noise -> (len(sigmas), H, W, 3) float in 0..1."""
    blurred = np.stack([ndimage.gaussian_filter(lum, s) if s > 0 else lum for s in sigmas])
    mean = blurred.mean(axis=(1, 2), keepdims=True)
    std = np.maximum(blurred.std(axis=(1, 2), keepdims=True), 1e-3)
    noise = max(target["noise"], 0.0)
    # the target contrast includes the noise and the light ramp: the content gets what is left
    ramp_var = float(np.var(target["brightness"] * ramp))
    signal_contrast = np.sqrt(max(target["contrast"] ** 2 - noise ** 2 - ramp_var, (0.3 * target["contrast"]) ** 2))
    toned = ((blurred - mean) / std * signal_contrast + target["brightness"]) * ramp[None]
    own = noise_sigma(toned)[:, None, None, None]  # noise the content already carries after toning
    extra = np.sqrt(np.maximum(noise ** 2 - own ** 2, 0.0)) / LUMA_NOISE_GAIN  # per channel
    tint = np.array([target["tint_r"], target["tint_g"], target["tint_b"]], np.float32)
    rgb = toned[..., None] * tint[None, None, None, :] + extra * noise_field[None]
    return np.clip(rgb, 0.0, 1.0)


def apply_policy(image: np.ndarray, policy: DomainPolicy, rng: np.random.Generator,
                 target: dict | None = None) -> tuple[np.ndarray, dict]:
    """Render one uint8 H,W,3 image with statistics sampled from ``policy`` -> (uint8 image, parameters)."""
    target = dict(target) if target is not None else policy.sample(rng)
    lum = luminance(as_float(image))[0]
    h, w = lum.shape
    # rotate around the centre, filling with the background (the median of the border)
    border = np.concatenate([lum[0], lum[-1], lum[:, 0], lum[:, -1]])
    lum = ndimage.rotate(lum, target["angle"], reshape=False, order=1, mode="constant", cval=float(np.median(border)))
    # uneven light: a multiplicative ramp of the target slope in a random direction
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    direction = target["light_direction"]
    proj = np.cos(direction) * ((xx + 0.5) / w - 0.5) + np.sin(direction) * ((yy + 0.5) / h - 0.5)
    ramp = np.clip(1.0 + target["gradient"] * proj, 0.05, None).astype(np.float32)
    scale = min(h, w) / 32.0
    sigmas = np.array([0.0, 0.3, 0.5, 0.7, 0.9, 1.1, 1.4, 1.7, 2.0], np.float32) * scale
    noise_field = rng.normal(0, 1, (h, w, 3)).astype(np.float32)
    candidates = _render(lum, target, ramp, noise_field, sigmas)
    sharp = sharpness(luminance(candidates))
    best = int(np.argmin(np.abs(sharp - target["sharpness"])))
    out = (candidates[best] * 255.0 + 0.5).astype(np.uint8)
    applied = {"angle": round(target["angle"], 1), "blur": round(float(sigmas[best]), 2),
               **{k: round(float(target[k]), 3) for k in ("brightness", "contrast", "noise", "gradient")},
               "tint": [round(float(target[k]), 3) for k in ("tint_r", "tint_g", "tint_b")]}
    return out, applied

