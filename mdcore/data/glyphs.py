"""A second built-in dataset, from a different real source than the digits: letters rendered from the
typeface families that ship with matplotlib (installed with the project, so it works offline).

Each domain is a family of typefaces, so the shift between domains is one of *style* (stroke contrast,
serifs, slant, letter construction such as a single- or double-storey ``a``/``g``), not of exposure:

- ``sans``:     DejaVu Sans (regular, bold, oblique, bold oblique);
- ``serif``:    DejaVu Serif and STIX (regular, bold, italic);
- ``mono``:     DejaVu Sans Mono and Computer Modern typewriter;
- ``roman``:    Computer Modern roman, bold, italic and sans (TeX's typefaces);
- ``outline``:  line drawings: the letter's contour only, hollow inside, in a typeface drawn from all
  four families (the "sketch" kind of shift of PACS or DomainNet: shape kept, fill and stroke gone).

Every image is one lowercase letter at a random size, position and slight rotation, dark ink on light
paper. Deterministic for a seed.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

CLASSES = tuple("abdeghknrt")
FAMILIES: dict[str, tuple[str, ...]] = {
    "sans": ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf"),
    "serif": ("DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "STIXGeneral.ttf", "STIXGeneralItalic.ttf",
              "STIXGeneralBol.ttf"),
    "mono": ("DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf", "cmtt10.ttf"),
    "roman": ("cmr10.ttf", "cmb10.ttf", "cmti10.ttf", "cmss10.ttf"),
}
OUTLINE = "outline"
DOMAINS = (*FAMILIES, OUTLINE)


def font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def render_glyph(char: str, font_file: Path, rng: np.random.Generator, size: int = 32,
                 outline: bool = False) -> Image.Image:
    """One letter, scaled to fill about 60-80 % of the canvas, jittered, on paper of random tone;
    ``outline``: its contour only, a line of random width, hollow inside."""
    big = size * 4
    font = ImageFont.truetype(str(font_file), int(big * rng.uniform(0.55, 0.75)))
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    left, top, right, bottom = draw.textbbox((0, 0), char, font=font)
    x = (big - (right - left)) / 2 - left + rng.uniform(-0.08, 0.08) * big
    y = (big - (bottom - top)) / 2 - top + rng.uniform(-0.08, 0.08) * big
    if outline:  # the stroked letter, then its inside erased: the contour is what is left
        draw.text((x, y), char, fill=0, font=font, stroke_width=int(rng.integers(2, 5)), stroke_fill=255)
    draw.text((x, y), char, fill=0 if outline else 255, font=font)
    canvas = canvas.rotate(rng.uniform(-8, 8), resample=Image.Resampling.BILINEAR)
    ink = np.asarray(canvas.resize((size, size), Image.Resampling.LANCZOS), dtype=np.float32) / 255.0
    paper, ink_tone = rng.uniform(0.85, 1.0), rng.uniform(0.0, 0.2)
    gray = paper * (1 - ink) + ink_tone * ink + rng.normal(0, 0.01, ink.shape)
    img = Image.fromarray((np.clip(gray, 0, 1) * 255 + 0.5).astype(np.uint8), mode="L")
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.3, 0.7)))
    return img.convert("RGB")


def per_class_for(limit: int | None) -> int:
    """Images per (domain, letter) for about ``limit`` images in all (None: the full 2,500)."""
    return max(4, (limit or 2500) // (len(DOMAINS) * len(CLASSES)))


def materialize(root: str | Path, seed: int = 0, per_class: int = 50, size: int = 32,
                domains: tuple[str, ...] = DOMAINS) -> dict[str, int]:
    """Write ``root/<domain>/<letter>/<id>.png`` (``per_class`` images per domain and letter)."""
    fonts = font_dir()
    all_faces = tuple(f for faces in FAMILIES.values() for f in faces)
    faces_of = {**FAMILIES, OUTLINE: all_faces}
    missing = [f for d in domains for f in faces_of[d] if not (fonts / f).is_file()]
    if missing:
        raise FileNotFoundError(f"typefaces {missing} not found in {fonts} (they ship with matplotlib)")
    root = Path(root)
    counts = {}
    for di, domain in enumerate(domains):
        for ci, char in enumerate(CLASSES):
            out_dir = root / domain / char
            os.makedirs(out_dir, exist_ok=True)
            for i in range(per_class):
                rng = np.random.default_rng([seed, di, ci, i])
                face = faces_of[domain][int(rng.integers(len(faces_of[domain])))]
                render_glyph(char, fonts / face, rng, size, outline=domain == OUTLINE).save(
                    out_dir / f"g{i:04d}.png", format="PNG")
        counts[domain] = per_class * len(CLASSES)
    return counts
