"""A user's tree with ordinary variety passes ingest and validate with default params and loses nothing:
folder names with spaces, PNG and JPEG, palette / RGBA / CMYK / 16-bit / EXIF-rotated images, one
domain lacking one class (a warning that names it), junk files beside the images."""
import numpy as np
from PIL import Image

from mdcore.data.decode import to_rgb
from tasks.paths import load_paths
from tasks.stage import execute
from tests.conftest import make_workspace

DOMAINS = ("site one", "site two", "Site-3")
CLASSES = ("cat", "dog", "red fox")


def image(rng, kind: int) -> tuple[Image.Image, str, dict]:
    rgb = Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8), "RGB")
    kinds = [
        (rgb, ".png", {}),
        (rgb, ".jpg", {"quality": 90}),
        (rgb.convert("P", palette=Image.Palette.ADAPTIVE), ".png", {}),
        (rgb.convert("RGBA"), ".png", {}),
        (rgb.convert("CMYK"), ".jpg", {}),
        (Image.fromarray(rng.integers(0, 65535, (24, 20), dtype=np.uint16)), ".png", {}),
    ]
    img, ext, kw = kinds[kind % len(kinds)]
    if kind % 7 == 6:  # EXIF orientation 6: stored sideways, shown upright
        exif = Image.Exif()
        exif[0x0112] = 6
        img, ext, kw = rgb, ".jpg", {"exif": exif.tobytes()}
    return img, ext, kw


def test_messy_tree_passes_with_default_params_and_loses_nothing(tmp_path):
    rng = np.random.default_rng(0)
    tree = tmp_path / "my photos"
    n = 0
    for d in DOMAINS:
        for c in CLASSES:
            if (d, c) == ("Site-3", "red fox"):
                continue  # this domain lacks one class
            folder = tree / d / c
            folder.mkdir(parents=True)
            for i in range(14):
                img, ext, kw = image(rng, n)
                img.save(folder / f"IMG {i:03d}{ext.upper() if i % 5 == 0 else ext}", **kw)
                n += 1
        (tree / d / ".DS_Store").write_bytes(b"\0\1junk")
    (tree / "README.txt").write_text("photos from three sites")
    (tree / "site one" / "cat" / "Thumbs.db").write_bytes(b"junk")
    ws = make_workspace(tmp_path / "ws", ingest={"data_root": str(tree), "holdout_domains": []},
                        validate={"workers": 1})
    ingest = execute("ingest", ws)
    validate = execute("validate", ws)
    assert validate["rows"] == n, ingest
    assert validate["quarantined_rows"] <= 0.01 * n, validate
    assert validate["thin_classes"] == ["Site-3/red fox (0)"]  # named (in the log too), nothing dropped
    # every kept image loads as RGB
    import pandas as pd

    paths = load_paths(ws)
    kept = pd.read_csv(paths.validated)
    for rel in kept["path"][:30]:
        with Image.open(paths.raw / rel) as img:
            assert to_rgb(img).mode == "RGB"
