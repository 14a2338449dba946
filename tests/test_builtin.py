from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from mdcore.data.builtin import DOMAINS, BuiltinSpec, materialize
from mdcore.data.io import sha256_file


def files_by_domain(root: Path) -> dict[str, list[Path]]:
    return {d: sorted((root / d).rglob("*.png")) for d in DOMAINS}


def test_layout_sizes_and_modes(builtin_tree):
    files = files_by_domain(builtin_tree)
    assert set(p.name for p in builtin_tree.iterdir()) == set(DOMAINS)
    assert sum(len(v) for v in files.values()) == 1797
    for domain, paths in files.items():
        assert {p.parent.name for p in paths} == {str(c) for c in range(10)}, domain
        with Image.open(paths[0]) as img:
            assert img.size == (32, 32) and img.mode == "RGB"


def test_sources_are_disjoint_across_domains(builtin_tree):
    names = [p.name for paths in files_by_domain(builtin_tree).values() for p in paths]
    assert len(names) == len(set(names))


def test_one_domain_is_scarce(builtin_tree):
    sizes = {d: len(v) for d, v in files_by_domain(builtin_tree).items()}
    others = [n for d, n in sizes.items() if d != "phone"]
    assert sizes["phone"] <= 0.2 * min(others)
    assert sizes["phone"] >= 50


def test_class_frequencies_differ_by_domain(builtin_tree):
    files = files_by_domain(builtin_tree)
    freqs = {}
    for d, paths in files.items():
        c = Counter(p.parent.name for p in paths)
        freqs[d] = np.array([c[str(k)] for k in range(10)]) / len(paths)
    assert np.abs(freqs["clean"] - freqs["ink"]).max() > 0.05
    assert np.abs(freqs["clean"] - freqs["lowlight"]).max() > 0.05


def test_domains_look_different(builtin_tree):
    """Each domain's shift shows in its pixel statistics (clean is bright, lowlight dark, ink coloured)."""
    stats = {}
    for d, paths in files_by_domain(builtin_tree).items():
        arr = np.stack([np.asarray(Image.open(p), dtype=np.float32) for p in paths[:50]])
        stats[d] = (arr.mean(), np.abs(arr[..., 0] - arr[..., 2]).mean())
    assert stats["lowlight"][0] < 0.5 * stats["clean"][0]
    assert stats["ink"][1] > 3 * stats["clean"][1]


def test_deterministic_for_a_seed(tmp_path):
    spec = BuiltinSpec(limit=60)
    a, b, c = (materialize(tmp_path / n, seed=s, spec=spec) for n, s in (("a", 1), ("b", 1), ("c", 2)))
    hashes = {n: {p.relative_to(tmp_path / n).as_posix(): sha256_file(p) for p in (tmp_path / n).rglob("*.png")}
              for n in "abc"}
    assert hashes["a"] == hashes["b"]
    assert hashes["a"] != hashes["c"]
    assert a == b


def test_glyphs_outline_domain_is_line_drawings_of_the_same_letters(tmp_path):
    """The glyphs' ``outline`` domain keeps a letter's contour and drops its fill: inside a bold stroke
    the outline rendering shows paper, along the contour it shows ink; and every domain has every letter."""
    import numpy as np
    from PIL import ImageFilter

    from mdcore.data.glyphs import CLASSES, DOMAINS, font_dir, materialize, render_glyph

    counts = materialize(tmp_path, per_class=4)
    assert set(counts) == set(DOMAINS) and "outline" in DOMAINS
    for domain in DOMAINS:
        assert sorted(p.name for p in (tmp_path / domain).iterdir()) == sorted(CLASSES)

    face = font_dir() / "DejaVuSans-Bold.ttf"
    filled = render_glyph("o", face, np.random.default_rng(3), size=128).convert("L")
    outline = render_glyph("o", face, np.random.default_rng(3), size=128, outline=True).convert("L")
    ink = np.asarray(filled) < 128
    core = np.asarray(filled.filter(ImageFilter.MaxFilter(5))) < 128  # well inside the stroke
    contour = ~ink & (np.asarray(filled.filter(ImageFilter.MinFilter(3))) < 128)  # paper just outside the stroke
    out = np.asarray(outline, dtype=np.float32)
    paper = np.median(out)
    assert core.sum() > 20 and contour.sum() > 20
    assert abs(out[core].mean() - paper) < 40  # hollow inside
    assert paper - out[contour].mean() > 60  # drawn along the contour
