"""One image file to the uint8 RGB array the model sees: shared by in-memory and on-demand decoding."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def to_rgb(img: Image.Image) -> Image.Image:
    """What a viewer shows, as 8-bit RGB: EXIF rotation applied, palette/alpha/CMYK converted, 16-bit and
    32-bit integer images scaled to 8 bits (a plain ``convert`` would clip them to white), alpha composited
    on white."""
    from PIL import ImageOps

    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


# how images are resized to the model's side: the filters of timm's ``pretrained_cfg["interpolation"]`` that
# PIL has (PIL's resize filters every source pixel when shrinking, so both are antialiased)
RESIZE_FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
DEFAULT_RESIZE = "bilinear"  # models without ImageNet-style weights, and every config saved before `resize`


def resize_filter(resize: str, where: str = "resize") -> Image.Resampling:
    try:
        return RESIZE_FILTERS[resize]
    except KeyError:
        raise ValueError(f"{where}={resize!r}: expected one of {sorted(RESIZE_FILTERS)}") from None


def decode_resized(path: Path, size: int, resize: str = DEFAULT_RESIZE) -> np.ndarray:
    """The image at ``path`` as (3, size, size) uint8: what the model sees (RGB, resized with the model's
    ``resize`` filter: the one its starting weights were trained with)."""
    resample = resize_filter(resize)
    with Image.open(path) as img:
        img = to_rgb(img)
        if img.size != (size, size):
            img = img.resize((size, size), resample)
        return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)
