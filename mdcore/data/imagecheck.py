"""Image-level checks of an image tree, one read per file: size on disk, content hash, the format its
bytes say (against its extension), whether it decodes completely, its size, colour mode and channels,
and its pixel mean and standard deviation (the per-domain drift profile is built from those).

Files are read once each, in parallel (:mod:`mdcore.data.pool`); nothing in the tree is ever written.
The results are plain columns (:data:`FIELDS`) that the validate stage's expectation suite checks.
"""
from __future__ import annotations

import io
import os
import re
from pathlib import Path, PurePosixPath
from typing import Sequence

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from mdcore.data.io import sha256_bytes
from mdcore.data.manifest import DataLayoutError, resolve_in
from mdcore.data.pool import map_chunks

# What each accepted extension promises about the file's content.
FORMAT_OF_EXTENSION = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}
# Leading bytes of common image formats, to tell what a file really holds whatever its name says.
MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"BM", "BMP"),
)
_OBJECT_AT = re.compile(r" ?<[^<>]* at 0x[0-9a-f]+>")  # keeps error texts the same from run to run
PIL_FORMATS = ("PNG", "JPEG", "GIF", "TIFF", "BMP", "WEBP")
# a PNG without its IEND chunk, or a JPEG without its EOI marker, was cut short
END_MARKERS = {"PNG": b"IEND\xaeB`\x82", "JPEG": b"\xff\xd9"}
FIELDS = (
    "file_bytes",      # size on disk; -1 = missing
    "file_sha256",     # hash of the bytes read ("" if missing)
    "ext_format",      # format the extension promises (PNG, JPEG) or "other"
    "content_format",  # format the bytes hold (PNG, JPEG, GIF, TIFF, BMP, WEBP) or "unknown"/"empty"/"missing"
    "decoded",         # the whole image decoded
    "decode_error",    # why not ("" when it decoded)
    "img_width",
    "img_height",
    "img_mode",        # PIL mode ("" when it did not decode)
    "channels",        # number of bands (0 when it did not decode)
    "pixel_mean",      # mean pixel value in 0..1 over all channels (RGB for modes other than L/RGB); NaN if undecoded
    "pixel_std",       # standard deviation of the same values
)


def sniff_format(head: bytes) -> str:
    """The image format the leading bytes say (``unknown`` if none matches, ``empty`` for no bytes)."""
    if not head:
        return "empty"
    for magic, name in MAGIC:
        if head.startswith(magic):
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return "unknown"


def _pixel_stats(img: Image.Image) -> tuple[float, float]:
    if img.mode not in ("L", "RGB"):
        from mdcore.data.decode import to_rgb

        img = to_rgb(img)  # CMYK, palette, alpha, 16-bit...: statistics on what the model will see
    x = np.frombuffer(img.tobytes(), np.uint8)  # every channel of every pixel
    n = x.size
    if n == 0:
        return float("nan"), float("nan")
    total = squares = 0
    for i in range(0, n, 1 << 22):  # exact integer sums, in slices so a large photo needs little memory
        y = x[i : i + (1 << 22)].astype(np.uint64)
        total += int(y.sum())
        squares += int(np.dot(y, y))
    mean = total / n
    var = max(0.0, squares / n - mean * mean)
    return mean / 255.0, float(np.sqrt(var)) / 255.0


def check_bytes(data: bytes, ext: str) -> tuple:
    """The :data:`FIELDS` of one file's content ``data`` named with extension ``ext``."""
    ext_format = FORMAT_OF_EXTENSION.get(ext.lower(), "other")
    content_format = sniff_format(data[:16])
    sha = sha256_bytes(data)
    if not data:
        return (0, sha, ext_format, "empty", False, "empty file (0 bytes)", 0, 0, "", 0, np.nan, np.nan)
    error = ""
    try:
        formats = [content_format] if content_format in PIL_FORMATS else None  # skip guessing the decoder
        with Image.open(io.BytesIO(data), formats=formats) as img:
            img.load()  # decode completely: a truncated file fails here, not in training
            width, height = img.size
            mode = img.mode
            channels = len(img.getbands())
            mean, std = _pixel_stats(img)
    except UnidentifiedImageError:
        error = "does not decode: no image format PIL can identify"
    except Exception as e:  # noqa: BLE001 -- any decoder failure makes the file unusable
        error = _OBJECT_AT.sub("", f"does not decode: {type(e).__name__}: {e}")[:200]
    if not error and content_format in END_MARKERS and data.rfind(END_MARKERS[content_format]) < 0:
        # the pixels decoded but the file was cut short after them (or its end was overwritten)
        error = f"truncated: {content_format} end marker missing"
    if error:
        return (len(data), sha, ext_format, content_format, False, error, 0, 0, "", 0, np.nan, np.nan)
    return (len(data), sha, ext_format, content_format, True, "", width, height, mode, channels, mean, std)


def check_file(path: str | os.PathLike) -> tuple:
    """The :data:`FIELDS` of one file, read once. A symlink is refused (it could lead out of the tree)."""
    ext = os.path.splitext(path)[1]
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return (-1, "", FORMAT_OF_EXTENSION.get(ext.lower(), "other"), "missing", False, "missing file",
                0, 0, "", 0, np.nan, np.nan)
    except OSError as e:
        if os.path.islink(path):
            raise DataLayoutError(f"{path}: symlinks are refused (the path could escape the data root)") from None
        raise
    with os.fdopen(fd, "rb") as fh:
        data = fh.read()
    return check_bytes(data, ext)


def check_chunk(root: str, rels: list[str]) -> list[tuple]:
    """:func:`check_file` for ``root/rel`` of each ``rel`` (a pool worker's unit of work)."""
    return [check_file(os.path.join(root, rel)) for rel in rels]


def checked_paths(root: str | Path, rels: Sequence[str]) -> None:
    """Refuse manifest paths that are absolute or climb out of ``root``, checking each folder once with
    :func:`mdcore.data.manifest.resolve_in`; the files themselves are opened without following symlinks."""
    seen = set()
    for rel in rels:
        p = PurePosixPath(rel)
        if p.is_absolute() or not p.name or p.name in (".", ".."):
            resolve_in(root, rel)  # raises with the usual message
            raise DataLayoutError(f"manifest path {rel!r} does not name a file under {root}")
        parent = p.parent.as_posix()
        if parent not in seen:
            resolve_in(root, parent)
            seen.add(parent)


def check_images(root: str | Path, rels: Sequence[str], workers: int = 0, min_parallel: int = 2000,
                 progress=None) -> pd.DataFrame:
    """Check every ``root/rel`` (read once each, ``workers`` processes, 0 = all cores); one row per
    ``rel`` in order, columns :data:`FIELDS`."""
    rels = list(rels)
    checked_paths(root, rels)
    rows = map_chunks(check_chunk, rels, str(root), workers=workers, min_parallel=min_parallel, progress=progress)
    frame = pd.DataFrame.from_records(rows, columns=list(FIELDS))
    return frame.astype({"file_bytes": "int64", "decoded": bool, "img_width": "int64", "img_height": "int64",
                         "channels": "int64", "pixel_mean": "float64", "pixel_std": "float64"})


def aspect_ratio(width: pd.Series, height: pd.Series) -> pd.Series:
    """Long side over short side (NaN where the image did not decode)."""
    lo = np.minimum(width, height).astype(float)
    hi = np.maximum(width, height).astype(float)
    return pd.Series(np.where(lo > 0, hi / np.where(lo > 0, lo, 1.0), np.nan), index=width.index)


def domain_profile(domains: pd.Series, pixel_mean: pd.Series, pixel_std: pd.Series) -> dict[str, dict]:
    """Per domain: image count and the average and spread (across images) of the per-image pixel mean and
    standard deviation. Images that did not decode (NaN) are left out."""
    frame = pd.DataFrame({"domain": domains.values, "mean": pixel_mean.values, "std": pixel_std.values}).dropna()
    out = {}
    for domain, g in frame.groupby("domain", sort=True):
        out[str(domain)] = {
            "images": int(len(g)),
            "mean": {"avg": float(g["mean"].mean()), "spread": float(g["mean"].std(ddof=0))},
            "std": {"avg": float(g["std"].mean()), "spread": float(g["std"].std(ddof=0))},
        }
    return out


def drift_bound(current: dict, accepted: dict, stat: str, tolerance: float, min_shift: float) -> tuple[float, float]:
    """``(shift, allowed)`` of a domain's average per-image ``stat`` ("mean" or "std") against the accepted
    profile. ``allowed`` is ``tolerance`` x the accepted spread across images, plus two standard errors of
    the current average (a small domain's average moves by chance), and at least ``min_shift`` (0..1
    pixel units). ``|shift| <= allowed`` means no drift."""
    shift = current[stat]["avg"] - accepted[stat]["avg"]
    spread = accepted[stat]["spread"]
    allowed = max(tolerance * spread + 2.0 * spread / np.sqrt(max(current["images"], 1)), min_shift)
    return float(shift), float(allowed)
