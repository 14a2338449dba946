"""Image-level checks (mdcore.data.imagecheck): each planted fault is seen for what it is, from one read of
the file, the same in a process pool as in this process, and nothing in the tree is written."""
from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mdcore.data.imagecheck import check_file, check_images, domain_profile, drift_bound, sniff_format
from mdcore.data.manifest import DataLayoutError


def png_bytes(size=(16, 16), mode="RGB", level=0.5, seed=0, fmt="PNG") -> bytes:
    """A small noisy image of average brightness ``level`` (0..1), encoded as ``fmt``."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = np.clip(level + rng.normal(0, 0.03), 0, 1)
    px = np.clip(base * 255 + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(px, "RGB").convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def tree_snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``root``: content hash and modification time (to prove nothing was written)."""
    return {p.relative_to(root).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def faults(tmp_path) -> Path:
    root = tmp_path / "t"
    (root / "a" / "x").mkdir(parents=True)
    files = {
        "good.png": png_bytes(),
        "grey.png": png_bytes(mode="L", seed=1),
        "truncated.png": png_bytes(seed=2)[:-40],
        "cut_end.png": png_bytes(seed=3)[:-12],  # the pixels decode, the end chunk is gone
        "cut_end.jpg": png_bytes(seed=8, fmt="JPEG")[:-2],  # the same for a JPEG's end marker
        "empty.png": b"",
        "jpeg_named.png": png_bytes(seed=4, fmt="JPEG"),
        "rgba.png": png_bytes(mode="RGBA", seed=5),
        "cmyk.jpg": png_bytes(mode="CMYK", seed=6, fmt="JPEG"),
        "garbage.png": b"this is not an image at all",
        "wide.png": png_bytes(size=(64, 8), seed=7),
    }
    for name, data in files.items():
        (root / "a" / "x" / name).write_bytes(data)
    return root


def test_each_planted_fault_is_named(faults):
    rels = sorted(f"a/x/{p.name}" for p in (faults / "a" / "x").iterdir())
    before = tree_snapshot(faults)
    checks = check_images(faults, rels, workers=1).set_index(np.array([r.split("/")[-1] for r in rels]))
    assert tree_snapshot(faults) == before  # read only
    ok = checks.loc["good.png"]
    assert ok.decoded and ok.decode_error == "" and (ok.img_width, ok.img_height, ok.img_mode, ok.channels) == (16, 16, "RGB", 3)
    assert ok.content_format == ok.ext_format == "PNG"
    assert ok.file_sha256 == hashlib.sha256((faults / "a/x/good.png").read_bytes()).hexdigest()
    assert 0.3 < ok.pixel_mean < 0.7 and 0.03 < ok.pixel_std < 0.2
    assert checks.loc["grey.png", "img_mode"] == "L" and checks.loc["grey.png", "channels"] == 1
    assert not checks.loc["truncated.png", "decoded"] and "decode" in checks.loc["truncated.png", "decode_error"]
    assert not checks.loc["cut_end.png", "decoded"] and "truncated: PNG end marker" in checks.loc["cut_end.png", "decode_error"]
    assert not checks.loc["cut_end.jpg", "decoded"] and "truncated" in checks.loc["cut_end.jpg", "decode_error"]
    assert checks.loc["empty.png", "file_bytes"] == 0 and not checks.loc["empty.png", "decoded"]
    assert checks.loc["empty.png", "content_format"] == "empty"
    j = checks.loc["jpeg_named.png"]
    assert j.decoded and (j.ext_format, j.content_format) == ("PNG", "JPEG")
    assert (checks.loc["rgba.png", "img_mode"], checks.loc["rgba.png", "channels"]) == ("RGBA", 4)
    c = checks.loc["cmyk.jpg"]
    assert (c.img_mode, c.channels, c.content_format, c.ext_format) == ("CMYK", 4, "JPEG", "JPEG")
    assert np.isfinite(c.pixel_mean)  # statistics of what a viewer shows (converted to RGB)
    g = checks.loc["garbage.png"]
    assert not g.decoded and g.content_format == "unknown"
    assert (checks.loc["wide.png", "img_width"], checks.loc["wide.png", "img_height"]) == (64, 8)
    assert np.isnan(checks.loc["truncated.png", "pixel_mean"])


def test_pool_gives_the_same_answers_as_one_process(faults):
    rels = sorted(f"a/x/{p.name}" for p in (faults / "a" / "x").iterdir()) * 3
    serial = check_images(faults, rels, workers=1)
    pooled = check_images(faults, rels, workers=2, min_parallel=0)
    assert serial.compare(pooled).empty, serial.compare(pooled).to_string()
    assert serial.equals(pooled)


def test_missing_file_symlink_and_escaping_path(faults, tmp_path):
    assert check_file(faults / "a" / "x" / "nope.png")[:2] == (-1, "")
    outside = tmp_path / "outside.png"
    outside.write_bytes(png_bytes())
    os.symlink(outside, faults / "a" / "x" / "link.png")
    with pytest.raises(DataLayoutError, match="symlink"):
        check_images(faults, ["a/x/link.png"], workers=1)
    with pytest.raises(DataLayoutError, match="escapes"):
        check_images(faults, ["../outside.png"], workers=1)
    with pytest.raises(DataLayoutError, match="escapes"):
        check_images(faults, ["/etc/passwd"], workers=1)


def test_sniff_and_drift_bound():
    assert sniff_format(b"\x89PNG\r\n\x1a\n....") == "PNG"
    assert sniff_format(b"\xff\xd8\xff\xe0") == "JPEG"
    assert sniff_format(b"GIF89a") == "GIF" and sniff_format(b"") == "empty" and sniff_format(b"xx") == "unknown"
    import pandas as pd

    dom = pd.Series(["a"] * 50 + ["b"] * 50)
    rng = np.random.default_rng(0)
    mean = pd.Series(np.r_[rng.normal(0.6, 0.05, 50), rng.normal(0.3, 0.05, 50)])
    std = pd.Series(rng.normal(0.1, 0.01, 100))
    ref = domain_profile(dom, mean, std)
    assert ref["a"]["images"] == 50 and abs(ref["a"]["mean"]["avg"] - 0.6) < 0.03
    same = domain_profile(dom, mean + rng.normal(0, 0.01, 100), std)
    shift, allowed = drift_bound(same["a"], ref["a"], "mean", 1.0, 0.02)
    assert abs(shift) <= allowed
    dark = domain_profile(dom, mean * 0.6, std)
    shift, allowed = drift_bound(dark["a"], ref["a"], "mean", 1.0, 0.02)
    assert shift < -allowed  # darker by 40%: far outside the bound
