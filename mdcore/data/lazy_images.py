"""Images decoded on demand: memory per training worker stays flat as the dataset grows.

``LazyImages`` stands where :class:`mdcore.data.images.ImageSet` holds its uint8 tensor: indexing it with a
batch of row indices (or a slice) decodes those files, so every loop that indexes ``data.images`` works
unchanged. :class:`BatchLoader` puts a torch ``DataLoader`` in front of each epoch's list of batches (the
domain-balanced sampler's), so the next batches decode in worker processes, kept alive across epochs,
while the model trains. An
optional cache folder keeps decoded arrays on disk (``.npy``, read without pickle) for later epochs.
"""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from mdcore.data.decode import DEFAULT_RESIZE, decode_resized


class LazyImages:
    """A read-only (N, 3, size, size) uint8 "tensor" of image files, decoded when indexed."""

    dtype = torch.uint8

    def __init__(self, paths: list[Path], size: int, cache_dir: str | Path | None = None, threads: int = 2,
                 resize: str = DEFAULT_RESIZE):
        self.paths, self.size, self.threads, self.resize = [Path(p) for p in paths], size, threads, resize
        self.cache_dir = Path(cache_dir) if cache_dir else None
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.paths), 3, self.size, self.size)

    def __getitem__(self, index) -> torch.Tensor | "LazyImages":
        if isinstance(index, slice):
            rows = range(len(self.paths))[index]
        elif isinstance(index, torch.Tensor) and index.dtype == torch.bool:
            return LazyImages([p for p, keep in zip(self.paths, index.tolist()) if keep], self.size,
                              self.cache_dir, self.threads, self.resize)
        elif isinstance(index, int):
            return self[[index]][0]
        else:
            rows = torch.as_tensor(index).reshape(-1).tolist()
        paths = [self.paths[i] for i in rows]
        if len(paths) > 8 and self.threads > 1:
            with ThreadPoolExecutor(self.threads) as pool:  # PIL releases the GIL while decoding
                arrays = list(pool.map(self._load, paths))
        else:
            arrays = [self._load(p) for p in paths]
        if not arrays:
            return torch.empty(0, 3, self.size, self.size, dtype=torch.uint8)
        return torch.from_numpy(np.stack(arrays))

    def _load(self, path: Path) -> np.ndarray:

        if self.cache_dir is None:
            return decode_resized(path, self.size, self.resize)
        st = path.stat()
        key = hashlib.sha1(f"{path}|{st.st_size}|{st.st_mtime_ns}|{self.size}|{self.resize}".encode()).hexdigest()
        cached = self.cache_dir / f"{key}.npy"
        if cached.is_file():
            return np.load(cached, allow_pickle=False)
        array = decode_resized(path, self.size, self.resize)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(tmp, array, allow_pickle=False)
        tmp.replace(cached)  # atomic: a reader never sees half a file
        return array


class EpochBatches(torch.utils.data.Sampler):
    """The current epoch's batches (index tensors), set in the training process before each epoch. With
    ``batch_size=None`` the DataLoader hands each one to a worker as the key of one item, so persistent
    workers, which keep the dataset they started with, still decode this epoch's batches."""

    def __init__(self):
        self.batches: list[torch.Tensor] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class _Decode(torch.utils.data.Dataset):
    def __init__(self, images):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return idx, self.images[idx]


class BatchLoader:
    """``loader(batches)`` yields ``(idx, uint8 images)`` per batch, in the order given. In-memory images
    are indexed directly; ``LazyImages`` with ``workers`` > 0 decode in DataLoader worker processes,
    ``prefetch`` batches ahead of training. Make one per training run: its workers stay alive across epochs
    (``persistent_workers``); starting them (a forkserver, importing torch) every epoch cost a third of a
    32-px epoch. ``close()`` (or the end of a ``with`` block) stops them."""

    def __init__(self, images, workers: int = 0, prefetch: int = 2, pin_memory: bool = False):
        """``pin_memory`` (training on a GPU): batches arrive in page-locked memory, copied by a thread of
        this process while the GPU works, so their transfer to the device can run asynchronously."""
        from mdcore.data.pool import _context

        self.images, self._loader = images, None
        # forkserver (or spawn), never a bare fork: the training process runs threads (Ray, Prefect, torch)
        # that a forked child would inherit half-held
        # torch preloaded: each DataLoader worker forks with it instead of importing it (about 2 s of CPU
        # each, which the first epoch paid while training shared the cores)
        context = (_context(["torch", "mdcore.data.lazy_images"]) if isinstance(images, LazyImages) and workers > 0
                   else None)
        if context is not None:
            self._sampler = EpochBatches()
            self._loader = torch.utils.data.DataLoader(
                _Decode(images), sampler=self._sampler, batch_size=None, shuffle=False, num_workers=workers,
                prefetch_factor=prefetch, persistent_workers=True, multiprocessing_context=context,
                pin_memory=pin_memory)

    def __call__(self, batches: Iterable[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._loader is None:
            for idx in batches:
                yield idx, self.images[idx]
            return
        self._sampler.batches = list(batches)
        yield from self._loader

    def close(self) -> None:
        """Stop the worker processes (they also stop when this object is garbage-collected)."""
        loader, self._loader = self._loader, None
        iterator = getattr(loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()

    def __enter__(self) -> "BatchLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def batch_images(images, batches: Iterable[torch.Tensor], workers: int = 0,
                 prefetch: int = 2) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One pass of a :class:`BatchLoader` (its workers stop at the end): for a single epoch."""
    batches = list(batches)
    with BatchLoader(images, min(workers, max(1, len(batches))), prefetch) as loader:
        yield from loader(batches)
