"""Decoding the manifest's images into one uint8 tensor, plus the index maps models need."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mdcore.data.decode import DEFAULT_RESIZE, decode_resized
from mdcore.data.manifest import class_names, resolve_in


@dataclass
class ImageSet:
    """Images (N,3,H,W uint8; in memory, or :class:`mdcore.data.lazy_images.LazyImages` decoding on demand),
    labels and domain indices of a manifest slice."""

    images: torch.Tensor
    labels: torch.Tensor
    domains: torch.Tensor
    domain_names: list[str]
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, mask) -> "ImageSet":
        mask = torch.as_tensor(np.asarray(mask), dtype=torch.bool)
        return ImageSet(self.images[mask], self.labels[mask], self.domains[mask], self.domain_names, self.class_names)


def load_images(
    frame: pd.DataFrame,
    roots: dict[str, Path],
    size: int,
    domain_names: list[str] | None = None,
    classes: list[str] | None = None,
    threads: int = 4,
    lazy: bool = False,
    cache_dir: str | Path | None = None,
    resize: str = DEFAULT_RESIZE,
) -> ImageSet:
    """Decode every row of ``frame``; ``roots`` maps a row's ``source`` (real/synthetic) to its folder.

    ``domain_names``/``classes`` fix the index order (a model's order); rows of a domain the model does
    not know get domain index -1 (the unknown-domain path). ``lazy``: nothing is decoded now; the images
    decode when indexed (:class:`mdcore.data.lazy_images.LazyImages`, optionally cached in ``cache_dir``).
    ``resize``: the model's resize filter (``ModelConfig.resize``).
    """
    domain_names = list(domain_names) if domain_names is not None else sorted(frame["domain"].unique())
    classes = list(classes) if classes is not None else class_names(frame)
    paths = [resolve_in(roots[s], p) for s, p in zip(frame["source"], frame["path"])]
    if lazy:
        from mdcore.data.lazy_images import LazyImages

        images = LazyImages(paths, size, cache_dir=cache_dir, threads=min(threads, 2), resize=resize)
    else:
        with ThreadPoolExecutor(threads) as pool:
            arrays = list(pool.map(lambda p: decode_resized(p, size, resize), paths))
        images = torch.from_numpy(np.stack(arrays)) if arrays else torch.empty(0, 3, size, size, dtype=torch.uint8)
    class_index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(frame["label"]) - set(class_index))
    if unknown:
        raise ValueError(f"labels {unknown} are not among the model's classes {classes}")
    domain_index = {d: i for i, d in enumerate(domain_names)}
    labels = torch.tensor([class_index[c] for c in frame["label"]], dtype=torch.long)
    domains = torch.tensor([domain_index.get(d, -1) for d in frame["domain"]], dtype=torch.long)
    return ImageSet(images, labels, domains, domain_names, classes)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float in [-1, 1] (a fixed normalization: statistics per domain are the model's job)."""
    return images.float().div_(127.5).sub_(1.0)


def standardize(x: torch.Tensor) -> torch.Tensor:
    """Per-image standardization: removes global exposure and contrast shifts (a dark sensor, tinted
    paper) before the backbone sees the image; cheap, and it helps on unseen domains."""
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    std = x.std(dim=(1, 2, 3), keepdim=True).clamp(min=1e-3)
    return (x - mean) / std
