import os
import shutil
import zlib

import pandas as pd
import pytest
from PIL import Image

from mdcore.data.manifest import COLUMNS, DataLayoutError, build_manifest, dataset_version, resolve_in, scan_tree


def make_tree(root, domains=("a", "b", "c"), classes=("x", "y"), per_class=10):
    for d in domains:
        for c in classes:
            for i in range(per_class):
                (root / d / c).mkdir(parents=True, exist_ok=True)
                color = (zlib.crc32(f"{d}/{c}".encode()) % 255, i * 20 % 255, 7)  # deterministic: hash() is salted per process
                Image.new("RGB", (16, 16), color).save(root / d / c / f"{i}.png")
    return root


def test_manifest_columns_splits_and_holdout(tmp_path):
    root = make_tree(tmp_path / "t")
    frame = build_manifest(root, val_fraction=0.2, test_fraction=0.2, holdout_domains=["c"], seed=0)
    assert list(frame.columns) == COLUMNS
    assert len(frame) == 60
    assert set(frame.loc[frame.domain == "c", "split"]) == {"holdout"}
    assert "c" not in set(frame.loc[frame.split.isin(["train", "val", "test"]), "domain"])
    seen = frame[frame.domain != "c"]
    assert set(seen["split"]) == {"train", "val", "test"}
    assert 0.3 <= (seen["split"] == "train").mean() <= 0.9  # 60 % in expectation; the exact shares are tested below
    assert (frame["source"] == "real").all()
    assert frame["sha256"].str.len().eq(64).all()


def test_split_shares_follow_the_fractions():
    """Over many content hashes the split shares match the fractions within 4 standard errors."""
    import hashlib

    from mdcore.data.manifest import split_of

    n = 20000
    splits = [split_of(hashlib.sha256(str(i).encode()).hexdigest(), 0.2, 0.1, seed=3, gate_fraction=0.1)
              for i in range(n)]
    for name, share in (("train", 0.6), ("val", 0.2), ("test", 0.1), ("gate", 0.1)):
        observed = splits.count(name) / n
        assert abs(observed - share) <= 4 * (share * (1 - share) / n) ** 0.5, (name, observed)


def test_adding_images_never_moves_an_existing_image_to_another_split(tmp_path):
    root = make_tree(tmp_path / "t")
    before = build_manifest(root, val_fraction=0.2, test_fraction=0.2, seed=0).set_index("path")["split"]
    for i in range(10, 30):  # new images in every domain and class
        for d in ("a", "b", "c"):
            Image.new("RGB", (16, 16), (i * 7 % 255, 3, zlib.crc32(d.encode()) % 255)).save(root / d / "x" / f"new{i}.png")
    after = build_manifest(root, val_fraction=0.2, test_fraction=0.2, seed=0).set_index("path")["split"]
    assert len(after) == len(before) + 60
    pd.testing.assert_series_equal(after.loc[before.index], before)


def test_splits_and_version_are_deterministic(tmp_path):
    root = make_tree(tmp_path / "t")
    one = build_manifest(root, seed=3)
    two = build_manifest(root, seed=3)
    other = build_manifest(root, seed=4)
    pd.testing.assert_frame_equal(one, two)
    assert dataset_version(one) == dataset_version(two) != dataset_version(other)


def test_symlinked_file_is_refused(tmp_path):
    root = make_tree(tmp_path / "t")
    outside = tmp_path / "secret.png"
    Image.new("RGB", (8, 8)).save(outside)
    os.symlink(outside, root / "a" / "x" / "link.png")
    with pytest.raises(DataLayoutError, match="link.png"):
        scan_tree(root)


def test_symlinked_folder_escaping_root_is_refused(tmp_path):
    root = make_tree(tmp_path / "t")
    make_tree(tmp_path / "elsewhere", domains=("z",))
    os.symlink(tmp_path / "elsewhere" / "z", root / "z")
    with pytest.raises(DataLayoutError, match="symlink"):
        scan_tree(root)


def test_manifest_path_with_dotdot_is_refused(tmp_path):
    with pytest.raises(DataLayoutError, match="escapes"):
        resolve_in(tmp_path, "../outside/x.png")
    with pytest.raises(DataLayoutError, match="escapes"):
        resolve_in(tmp_path, "/etc/passwd")
    assert resolve_in(tmp_path, "a/x/1.png") == tmp_path / "a/x/1.png"


def test_misplaced_image_and_unknown_holdout_are_clear_errors(tmp_path):
    root = make_tree(tmp_path / "t")
    with pytest.raises(DataLayoutError, match="holdout_domains.*nope"):
        build_manifest(root, holdout_domains=["nope"])
    shutil.copy(root / "a" / "x" / "0.png", root / "a" / "stray.png")
    with pytest.raises(DataLayoutError, match="stray.png"):
        scan_tree(root)


def test_undecodable_image_is_recorded_not_crashing(tmp_path):
    root = make_tree(tmp_path / "t")
    (root / "a" / "x" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    frame = build_manifest(root)
    row = frame[frame.path == "a/x/0.png"].iloc[0]
    assert row["mode"] == "unreadable" and row["width"] == 0
