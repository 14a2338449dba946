"""The data stages on small workspaces: outputs, provenance rules, clear failures that lose nothing."""
import shutil

import pytest

from mdcore.data.builtin import BuiltinSpec, materialize
from mdcore.data.manifest import DataLayoutError, read_manifest
from tasks.params import apply_overrides
from tasks.paths import load_paths
from tasks.stage import execute
from tasks.validate import DataValidationError


def test_builtin_ingest_validate_synthesize(workspace):
    m = execute("ingest", workspace)
    paths = load_paths(workspace)
    frame = read_manifest(paths.manifest)
    assert m["images"] == len(frame) == 500
    assert set(frame["domain"]) == {"clean", "ink", "lowlight", "phone"}
    assert set(frame.loc[frame.domain == "lowlight", "split"]) == {"holdout"}
    v = execute("validate", workspace)
    assert v["rows"] == 500 and v["quarantined_rows"] == 0
    assert (paths.validation_report / "index.html").is_file()
    s = execute("synthesize", workspace)
    assert s["scarce_domains"] == ["phone"] and s["synthetic_images"] > 0
    train = read_manifest(paths.train_manifest)
    synthetic = train[train.source == "synthetic"]
    assert len(synthetic) == s["synthetic_images"]
    assert set(synthetic["split"]) == {"train"} and set(synthetic["domain"]) == {"phone"}
    assert synthetic["generator"].str.match(r"(fourier|stats|augment)\(").all()
    assert all((paths.synthetic / p).is_file() for p in synthetic["path"])
    assert (paths.metrics / "synthesize.json").is_file()


@pytest.fixture
def user_tree(tmp_path):
    root = tmp_path / "user_tree"
    materialize(root, seed=5, spec=BuiltinSpec(limit=240))
    for old, new in (("clean", "siteA"), ("ink", "siteB"), ("lowlight", "siteC"), ("phone", "siteD")):
        (root / old).rename(root / new)
    return root


def test_user_tree_with_holdout_then_a_planted_duplicate_stops_validation(workspace, user_tree):
    apply_overrides(workspace / "params", {"ingest": {"data_root": str(user_tree), "holdout_domains": ["siteB"]}})
    execute("ingest", workspace)
    execute("validate", workspace)
    paths = load_paths(workspace)
    good = paths.validated.read_text()
    frame = read_manifest(paths.manifest)
    assert set(frame.loc[frame.domain == "siteB", "split"]) == {"holdout"}
    # plant a duplicate across domains: leakage that must stop the pipeline and name both files
    first = sorted((user_tree / "siteA" / "3").glob("*.png"))[0]
    shutil.copy(first, user_tree / "siteC" / "3" / "copy_of_siteA.png")
    before = sorted(p.relative_to(user_tree) for p in user_tree.rglob("*"))
    execute("ingest", workspace)
    with pytest.raises(DataValidationError) as err:
        execute("validate", workspace)
    assert "unique_content" in str(err.value)
    assert "siteC/3/copy_of_siteA.png" in str(err.value) and f"siteA/3/{first.name}" in str(err.value)
    assert paths.validated.read_text() == good  # the last good output is intact
    assert sorted(p.relative_to(user_tree) for p in user_tree.rglob("*")) == before  # raw tree untouched


def test_failed_ingest_keeps_the_previous_dataset(workspace, user_tree, tmp_path):
    apply_overrides(workspace / "params", {"ingest": {"data_root": str(user_tree), "holdout_domains": []}})
    execute("ingest", workspace)
    paths = load_paths(workspace)
    manifest, files = paths.manifest.read_text(), sorted(paths.raw.rglob("*.png"))
    (user_tree / "siteA" / "0" / "escape.png").symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(DataLayoutError, match="escape.png"):
        execute("ingest", workspace)
    assert paths.manifest.read_text() == manifest
    assert sorted(paths.raw.rglob("*.png")) == files


def test_a_class_missing_from_a_domain_stops_validation_when_made_critical(workspace):
    apply_overrides(workspace / "params", {"ingest": {"builtin_limit": 120}, "validate": {
        "min_images_per_class": 2, "severity": {"min_images_per_class": "critical"}}})
    execute("ingest", workspace)
    with pytest.raises(DataValidationError, match=r"min_images_per_class.*phone/\d+/"):
        execute("validate", workspace)
