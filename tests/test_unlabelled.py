"""Images without labels (ingest.unlabelled_root): copied and listed by ingest, fingerprinted by source, seen
only by the pretrain stage's SimCLR, never when they copy an image that validation, test, the gate or a
held-out domain scores; bad layouts and held-out domains are errors that name the field."""
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from mdcore.data.manifest import DataLayoutError, read_manifest
from mdcore.data.unlabelled import copy_unlabelled, read_listing, scan_unlabelled
from tasks.params import IngestParams, PretrainParams, apply_overrides, load_params
from tasks.paths import load_paths
from tasks.preflight import check_unlabelled
from tasks.source import fingerprint
from tasks.stage import execute


def _images(folder, n, seed):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"u{seed}_{i}.png")


def test_layout_listing_and_fingerprint(tmp_path):
    root = tmp_path / "unlabelled"
    _images(root / "siteA", 3, 0)
    _images(root / "siteB" / "2026-12", 2, 1)  # deeper folders are free; the first names the domain
    assert sorted(d for _, d in scan_unlabelled(root)) == ["siteA"] * 3 + ["siteB"] * 2
    listing = copy_unlabelled(root, tmp_path / "copy")
    assert len(listing) == 5 and (tmp_path / "copy/siteB/2026-12").is_dir()
    assert read_listing(tmp_path / "copy").equals(listing) and listing["sha256"].str.len().eq(64).all()
    assert read_listing(tmp_path / "nothing").empty  # a workspace from before the folder existed

    before = fingerprint(IngestParams(unlabelled_root=str(root)), tmp_path)["unlabelled"]
    _images(root / "siteA", 4, 2)
    after = fingerprint(IngestParams(unlabelled_root=str(root)), tmp_path)["unlabelled"]
    assert after["files"] == 9 and after["listing_sha256"] != before["listing_sha256"]

    _images(tmp_path / "flat", 1, 3)
    with pytest.raises(DataLayoutError, match="ingest.unlabelled_root.*no domain"):
        scan_unlabelled(tmp_path / "flat")
    (tmp_path / "empty" / "siteA").mkdir(parents=True)
    with pytest.raises(DataLayoutError, match="ingest.unlabelled_root .* holds no images"):
        scan_unlabelled(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="ingest.unlabelled_root"):
        fingerprint(IngestParams(unlabelled_root=str(tmp_path / "missing")), tmp_path)


def test_preflight_names_the_field(tmp_path):
    _images(tmp_path / "u" / "lowlight", 2, 0)
    ingest = IngestParams(unlabelled_root=str(tmp_path / "u"), holdout_domains=["lowlight"])
    problems = check_unlabelled(ingest, PretrainParams(enabled=False), tmp_path)
    assert any("pretrain.enabled is false" in p for p in problems)
    assert any("held-out domain(s) ['lowlight']" in p for p in problems)
    assert check_unlabelled(ingest, PretrainParams(enabled=True, include_holdout_unlabelled=True), tmp_path) == []


@pytest.mark.timeout(600)
def test_pretraining_sees_the_unlabelled_images_but_not_copies_of_scored_ones(workspace, tmp_path):
    paths = load_paths(workspace)
    apply_overrides(workspace / "params", {"pretrain": {"enabled": True, "epochs": 1, "linear_probe": False}})
    execute("ingest", workspace)
    frame = read_manifest(paths.manifest)
    assert read_listing(paths.unlabelled).empty  # no folder given: an empty listing, always the same output
    unlabelled = tmp_path / "unlabelled"
    _images(unlabelled / "scanner2", 20, 0)  # a site with no labels at all
    scored = frame[frame["split"].isin(["test", "val"])].head(3)
    copies = unlabelled / "clean" / "copies"
    copies.mkdir(parents=True)
    for rel in scored["path"]:  # copies of images the run scores: must not be learned from
        shutil.copy(paths.raw / rel, copies / rel.replace("/", "_"))
    apply_overrides(workspace / "params", {"ingest": {"unlabelled_root": str(unlabelled)}})
    for stage in ("ingest", "validate", "synthesize", "pretrain"):
        execute(stage, workspace)
    assert read_manifest(paths.manifest)["sha256"].tolist() == frame["sha256"].tolist()  # labelled data unchanged
    assert len(read_listing(paths.unlabelled)) == 23
    config = json.loads((paths.pretrained / "config.json").read_text())
    metrics = json.loads(paths.metrics_file("pretrain").read_text())
    assert config["unlabelled_images"] == metrics["unlabelled_images"] == 20
    assert metrics["unlabelled_dropped_as_evaluation_copies"] == 3
    assert config["images"] == int((read_manifest(paths.train_manifest)["split"] == "train").sum())
    assert load_params("ingest", workspace / "params").unlabelled_root == str(unlabelled)

    # a held-out domain's images in the folder: refused, and the last good backbone stays
    before = (paths.pretrained / "backbone.safetensors").read_bytes()
    _images(unlabelled / "lowlight", 2, 5)
    execute("ingest", workspace)
    with pytest.raises(DataLayoutError, match="held-out domain.*include_holdout_unlabelled"):
        execute("pretrain", workspace)
    assert (paths.pretrained / "backbone.safetensors").read_bytes() == before
