"""The validate stage on small planted-fault trees: each fault gets its documented outcome (params/
validate.yaml): warnings are quarantined with their reason and the run goes on; criticals stop the run
naming the expectation and the files, and leave the previous outputs and the accepted profile as they
were; the raw tree is never written; drift against the accepted profile is caught."""
from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tasks.params import ParamsError, apply_overrides, load_params
from tasks.paths import load_paths
from tasks.stage import execute
from tasks.validate import DataValidationError
from tests.conftest import make_workspace
from tests.test_validate_imagecheck import png_bytes, tree_snapshot

DOMAINS = {"north": 0.65, "south": 0.35}  # average brightness of each domain's images
CLASSES = ("bird", "cat", "dog")
PER_CLASS = 6


def make_tree(root, per_class=PER_CLASS):
    """``root/<domain>/<class>/NN.png``: 16x16 noisy RGB images, every one distinct."""
    seed = 0
    for domain, level in DOMAINS.items():
        for label in CLASSES:
            folder = root / domain / label
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                seed += 1
                (folder / f"{i:02d}.png").write_bytes(png_bytes(level=level, seed=seed))
    return root


@pytest.fixture
def ws(tmp_path):
    tree = make_tree(tmp_path / "tree")
    root = make_workspace(tmp_path / "ws", ingest={"data_root": str(tree), "holdout_domains": []},
                          validate={"min_images_per_class": 2, "workers": 1})
    return root, tree


def ingest_validate(root):
    execute("ingest", root)
    return execute("validate", root)


def profile_dir(root):
    """The data source's own profile folder (one per ingest.data_root, named after it)."""
    from tasks.validate import source_profile_name

    return root / "registry" / "data_profiles" / source_profile_name(load_paths(root))


def profile(root):
    file = profile_dir(root) / "current.json"
    return json.loads(file.read_text()) if file.is_file() else None


def outputs(paths):
    return {p: p.read_bytes() for p in (paths.validated, paths.quarantine)}


def test_clean_tree_passes_with_data_docs_and_a_first_profile(ws):
    root, tree = ws
    m = ingest_validate(root)
    paths = load_paths(root)
    assert m["rows"] == 2 * 3 * PER_CLASS and m["quarantined_rows"] == 0 and m["failed_warning"] == []
    assert m["profile"] == {"name": profile_dir(root).name, "compared_against": None, "accepted_version": 1}
    assert profile_dir(root).name.startswith("tree-")
    assert (paths.validation_report / "index.html").is_file()
    docs = paths.validation_report / "data_docs"
    assert (docs / "index.html").is_file() and list((docs / "validations").rglob("*.html"))
    assert "mdpipe_manifest" in (docs / "index.html").read_text()
    p = profile(root)
    assert p["version"] == 1 and sorted(p["domains"]) == sorted(DOMAINS) and p["classes"] == list(CLASSES)
    assert p["dataset_version"] == m["dataset_version"]
    assert abs(p["domains"]["north"]["mean"]["avg"] - 0.65) < 0.05
    # the same data again: compared against version 1, no drift, no new version
    m2 = execute("validate", root)
    assert m2["profile"]["compared_against"]["version"] == 1 and m2["profile"]["accepted_version"] == 1
    assert all(abs(d["mean_drift"]) < 0.01 for d in m2["drift"].values())
    assert sorted(p.name for p in profile_dir(root).iterdir()) == [
        "current.json", "v0001.json"]


def test_warning_faults_are_quarantined_with_their_reason(ws):
    """RGBA and CMYK images are ordinary variety (converted to RGB on load): they pass; broken ones do not."""
    root, tree = ws
    planted = {
        "north/bird/truncated.png": png_bytes(level=0.65, seed=101)[:-60],
        "north/cat/empty.png": b"",
        "north/dog/rgba.png": png_bytes(level=0.65, seed=102, mode="RGBA"),
        "south/bird/cmyk.jpg": png_bytes(level=0.35, seed=103, mode="CMYK", fmt="JPEG"),
        "south/cat/jpeg_named.png": png_bytes(level=0.35, seed=104, fmt="JPEG"),
        "south/dog/wide.png": png_bytes(size=(80, 10), level=0.35, seed=105),
        "north/bird/garbage.jpg": b"not an image, whatever the name says",
    }
    expected = {
        "north/bird/truncated.png": "decodable",
        "north/cat/empty.png": "non_empty_file",
        "south/cat/jpeg_named.png": "extension_matches_content",
        "south/dog/wide.png": "aspect_ratio",
        "north/bird/garbage.jpg": "decodable;extension_matches_content",
    }
    for rel, data in planted.items():
        (tree / rel).write_bytes(data)
    execute("ingest", root)
    paths = load_paths(root)
    raw_before, tree_before = tree_snapshot(paths.raw), tree_snapshot(tree)
    m = execute("validate", root)
    assert tree_snapshot(paths.raw) == raw_before and tree_snapshot(tree) == tree_before  # nothing written there
    quarantine = pd.read_csv(paths.quarantine, dtype=str, keep_default_na=False)
    assert dict(zip(quarantine["path"], quarantine["reason"])) == expected
    validated = pd.read_csv(paths.validated, dtype=str)
    assert len(validated) == 2 * 3 * PER_CLASS + 2 and not set(validated["path"]) & set(expected)
    assert {"north/dog/rgba.png", "south/bird/cmyk.jpg"} <= set(validated["path"])
    assert m["quarantined_rows"] == len(expected)
    assert set(m["failed_warning"]) == {"decodable", "non_empty_file", "extension_matches_content", "aspect_ratio"}
    assert m["image_checks"]["empty"] == 1 and m["image_checks"]["undecodable"] == 2
    assert m["image_checks"]["wrong_extension"] == 2
    # the accepted profile describes the kept rows only
    assert profile(root)["rows"] == 2 * 3 * PER_CLASS + 2
    summary = (paths.validation_report / "index.html").read_text()
    assert "passed with warnings" in summary and "south/cat/jpeg_named.png" in summary


def test_critical_faults_stop_the_run_and_keep_the_last_good_outputs(ws):
    root, tree = ws
    ingest_validate(root)
    paths = load_paths(root)
    good, accepted = outputs(paths), profile(root)
    # a duplicate across domains (leakage): both files named
    shutil.copy(tree / "north" / "cat" / "03.png", tree / "south" / "dog" / "copy.png")
    execute("ingest", root)
    raw_before = tree_snapshot(paths.raw)
    with pytest.raises(DataValidationError) as err:
        execute("validate", root)
    msg = str(err.value)
    assert "unique_content" in msg and "north/cat/03.png = south/dog/copy.png" in msg
    assert outputs(paths) == good and profile(root) == accepted  # last good outputs, profile unchanged
    assert tree_snapshot(paths.raw) == raw_before
    assert "FAILED: " in (paths.validation_report / "index.html").read_text()  # the report says why
    results = json.loads((paths.validation_report / "results.json").read_text())
    assert results["profile"]["compared_against"]["version"] == 1 and results["profile"]["accepted_version"] is None


def test_a_file_changed_after_ingest_is_critical(ws):
    root, tree = ws
    execute("ingest", root)
    paths = load_paths(root)
    (paths.raw / "south" / "bird" / "02.png").write_bytes(png_bytes(level=0.35, seed=555))  # not what ingest hashed
    with pytest.raises(DataValidationError, match=r"hash_matches_manifest.*south/bird/02.png"):
        execute("validate", root)


def test_an_empty_class_in_one_domain_is_a_warning_that_names_it_or_critical_if_asked(ws, caplog):
    root, tree = ws
    shutil.rmtree(tree / "south" / "cat")
    (tree / "south" / "cat").mkdir()  # the folder is there, its images are not
    execute("ingest", root)
    with caplog.at_level("WARNING"):
        metrics = execute("validate", root)
    assert metrics["quarantined_rows"] == 0
    assert any("min_images_per_class" in r.message and "south/cat (0)" in r.message for r in caplog.records)
    apply_overrides(root / "params", {"validate": {"severity": {"min_images_per_class": "critical"}}})
    with pytest.raises(DataValidationError, match=r"min_images_per_class.*south/cat/"):
        execute("validate", root)


@pytest.mark.parametrize("known_from", ["profile", "params"])
def test_a_misspelt_class_folder_is_an_unknown_class(ws, known_from):
    root, tree = ws
    if known_from == "profile":
        ingest_validate(root)  # accepted: the profile now knows the classes
    else:
        apply_overrides(root / "params", {"validate": {"known_classes": list(CLASSES)}})
    (tree / "north" / "dgo").mkdir()
    (tree / "north" / "dgo" / "00.png").write_bytes(png_bytes(level=0.65, seed=999))
    execute("ingest", root)
    with pytest.raises(DataValidationError) as err:
        execute("validate", root)
    assert "known_classes" in str(err.value) and "north/dgo/00.png" in str(err.value)


def darken(tree, domain, factor):
    for p in (tree / domain).rglob("*.png"):
        img = Image.open(p).convert("RGB")
        px = (np.asarray(img, dtype=np.float32) * factor).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(px).save(buf, format="PNG")
        p.write_bytes(buf.getvalue())


def test_drift_against_the_accepted_profile(ws):
    root, tree = ws
    ingest_validate(root)
    paths = load_paths(root)
    good = outputs(paths)
    darken(tree, "south", 0.6)
    execute("ingest", root)
    with pytest.raises(DataValidationError) as err:
        execute("validate", root)
    msg = str(err.value)
    assert "pixel_drift_mean" in msg and "south/" in msg and "north/" not in msg.split("pixel_drift_mean")[1].split("\n")[0]
    assert "version 1" in msg
    assert outputs(paths) == good and profile(root)["version"] == 1
    results = json.loads((paths.validation_report / "results.json").read_text())
    drift = {d["domain"]: d for d in results["drift"]}
    assert drift["south"]["mean_drift"] < -1 and abs(drift["north"]["mean_drift"]) <= 1
    # as a warning, the drifted domain is quarantined as a whole and the run goes on
    severity = load_params("validate", root / "params").severity | {"pixel_drift_mean": "warning", "pixel_drift_std": "warning"}
    apply_overrides(root / "params", {"validate": {"severity": severity, "update_profile": False}})
    m = execute("validate", root)
    assert "pixel_drift_mean" in m["failed_warning"] and m["rows"] == 3 * PER_CLASS
    assert set(pd.read_csv(paths.quarantine)["domain"]) == {"south"} and m["profile"]["accepted_version"] is None
    # accepting the change on purpose: no drift check, new profile version; then it is the reference
    apply_overrides(root / "params", {"validate": {"drift_check": False, "update_profile": True}})
    m = execute("validate", root)
    assert m["profile"]["accepted_version"] == 2 and m["rows"] == 2 * 3 * PER_CLASS
    apply_overrides(root / "params", {"validate": {"drift_check": True}})
    m = execute("validate", root)
    assert m["profile"]["compared_against"]["version"] == 2 and abs(m["drift"]["south"]["mean_drift"]) < 0.01


def test_bad_validate_params_are_clear_errors(ws):
    root, _ = ws
    with pytest.raises(ParamsError, match="severity.*unique_contnet"):
        apply_overrides(root / "params", {"validate": {"severity": {"unique_contnet": "warning"}}})
    with pytest.raises(ParamsError, match="severity"):
        apply_overrides(root / "params", {"validate": {"severity": {"unique_content": "fatal"}}})
    with pytest.raises(ParamsError, match="drift_tolerance"):
        apply_overrides(root / "params", {"validate": {"drift_tolerance": -1}})
    with pytest.raises(ParamsError, match="drift_tolerence"):
        apply_overrides(root / "params", {"validate": {"drift_tolerence": 1}})
    with pytest.raises(ParamsError, match="profile"):
        apply_overrides(root / "params", {"validate": {"profile": "../elsewhere"}})


def test_prefect_artifact_only_inside_a_run(ws, monkeypatch):
    import prefect.artifacts
    import prefect.context

    root, _ = ws
    made = []
    monkeypatch.setattr(prefect.artifacts, "create_markdown_artifact", lambda **kw: made.append(kw))
    ingest_validate(root)  # no run context: no artifact, no error
    assert made == []
    monkeypatch.setattr(prefect.context, "get_run_context", lambda: object())
    execute("validate", root)
    assert len(made) == 1 and made[0]["key"] == "mdpipe-validation"
    assert "Data validation: passed" in made[0]["markdown"] and "compared against: version 1" in made[0]["markdown"]


def test_a_new_data_source_starts_its_own_profile(ws, tmp_path):
    """After the built-in demo, `mdpipe run --data OTHER` must not be refused for having other domains."""
    import shutil

    root, tree = ws
    ingest_validate(root)
    other = tmp_path / "other_tree"
    shutil.copytree(tree, other)
    for d in DOMAINS:
        (other / d).rename(other / f"{d}_site")
    apply_overrides(root / "params", {"ingest": {"data_root": str(other)}})
    m = ingest_validate(root)
    assert m["profile"]["compared_against"] is None and m["profile"]["accepted_version"] == 1
    assert len(list((root / "registry" / "data_profiles").iterdir())) == 2
