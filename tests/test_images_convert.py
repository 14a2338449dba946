"""Ordinary variety in users' trees is converted on load to what a viewer shows, as 8-bit RGB."""
import io

import numpy as np
from PIL import Image

from mdcore.data.decode import to_rgb


def reopen(img, fmt="PNG", **kwargs):
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return Image.open(io.BytesIO(buf.getvalue()))


def test_sixteen_bit_is_scaled_not_clipped_to_white():
    a = np.full((4, 4), 32768, dtype=np.uint16)
    out = np.asarray(to_rgb(reopen(Image.fromarray(a))))
    assert out.shape == (4, 4, 3) and 120 <= out.mean() <= 135


def test_alpha_is_composited_on_white_and_palette_transparency_too():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))  # fully transparent black
    assert np.asarray(to_rgb(reopen(rgba))).min() == 255
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 0, 0] * 256)
    pal.info["transparency"] = 0
    assert np.asarray(to_rgb(reopen(pal, transparency=0))).min() == 255


def test_exif_rotation_is_applied():
    img = Image.new("RGB", (8, 4), (10, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    out = to_rgb(reopen(img, fmt="JPEG", exif=exif.tobytes()))
    assert out.size == (4, 8)


def test_cmyk_and_grey_become_rgb():
    assert to_rgb(reopen(Image.new("CMYK", (4, 4)), fmt="JPEG")).mode == "RGB"
    assert to_rgb(reopen(Image.new("L", (4, 4), 7))).getpixel((0, 0)) == (7, 7, 7)
