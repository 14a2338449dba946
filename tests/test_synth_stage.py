"""The synthesize stage on a small built-in workspace: judged batches, provenance, reports, and a bad
batch that never reaches the training manifest."""
import json

import numpy as np

from mdcore.data.manifest import read_manifest
from tasks.params import apply_overrides
from tasks.paths import load_paths
from tasks.stage import execute
from tasks.synthesize import report_dir


def _prepare(ws):
    execute("ingest", ws)
    execute("validate", ws)
    return load_paths(ws)


def test_batches_are_scored_reported_and_only_enter_training(workspace):
    paths = _prepare(workspace)
    m = execute("synthesize", workspace)
    assert m["scarce_domains"] == ["phone"]
    assert set(m["batches"]) == {"phone/fourier", "phone/augment"}
    assert sorted(m["accepted_batches"] + m["rejected_batches"]) == sorted(m["batches"])
    assert m["accepted_batches"], m["batches"]
    for key, b in m["batches"].items():
        assert 0 <= b["realism"] <= 1 and 0 <= b["agreement"] <= 1 and 0 < b["real_agreement"] <= 1
        assert b["accepted"] == (key in m["accepted_batches"])
        assert b["fd_to_real"] < b["fd_content_to_real"]  # the transfer moved the content toward the domain
    assert 0.5 <= m["accepted_realism"] <= 1 and 0 < m["accepted_agreement"] <= 1

    train = read_manifest(paths.train_manifest)
    real = read_manifest(paths.validated)
    synthetic = train[train.source == "synthetic"]
    assert len(synthetic) == m["synthetic_images"] == m["planned_images"] - m["shortfall"]
    assert set(synthetic["split"]) == {"train"} and set(synthetic["domain"]) == {"phone"}
    assert train[train.source == "real"].reset_index(drop=True).equals(real.reset_index(drop=True))
    methods = {key.split("/")[1] for key in m["accepted_batches"]}
    assert synthetic["generator"].str.extract(r"^(\w+)\(")[0].isin(methods).all()
    assert synthetic["generator"].str.contains("content=").all()
    assert all((paths.synthetic / p).is_file() for p in synthetic["path"])
    per_class = train[(train.domain == "phone") & (train.split == "train")].groupby("label").size()
    assert (per_class <= 40).all()

    reports = report_dir(paths)
    assert (reports / "contact_phone.png").is_file()
    data = json.loads((reports / "batches.json").read_text())
    assert {b["method"] for b in data["batches"]} == {"fourier", "augment"}
    assert data["policies"]["phone"]["rotation_std_deg"] > 0
    assert "phone/augment" in (reports / "batches.md").read_text()


def test_a_bad_batch_is_rejected_and_never_written(workspace, monkeypatch):
    import mdcore.synth.generate as generators

    paths = _prepare(workspace)
    rng = np.random.default_rng(0)

    def destroy_labels(image, policy, rng_):  # label-destroying noise
        return rng.integers(0, 256, image.shape).astype(np.uint8), {"noise": "uniform"}

    def keep_content(content, style, beta, profile=None):  # wrong-domain style: content left as it was
        return content

    monkeypatch.setattr(generators, "apply_policy", destroy_labels)
    monkeypatch.setattr(generators, "fourier_style_transfer", keep_content)
    m = execute("synthesize", workspace)
    assert sorted(m["rejected_batches"]) == ["phone/augment", "phone/fourier"] and not m["accepted_batches"]
    assert any("label agreement" in r for r in m["batches"]["phone/augment"]["reasons"])
    assert any("realism" in r for r in m["batches"]["phone/fourier"]["reasons"])
    assert m["synthetic_images"] == 0 and m["shortfall"] == m["planned_images"] > 0
    train = read_manifest(paths.train_manifest)
    assert (train.source == "real").all()
    assert not list(paths.synthetic.rglob("*.png"))
    assert "**rejected**" in (report_dir(paths) / "batches.md").read_text()


def test_method_list_and_disabled(workspace):
    paths = _prepare(workspace)
    apply_overrides(workspace / "params", {"synthesize": {"methods": ["stats", "augment"], "target_per_class": 6}})
    m = execute("synthesize", workspace)
    assert set(m["batches"]) == {"phone/stats", "phone/augment"}
    generators = read_manifest(paths.train_manifest).query("source == 'synthetic'")["generator"]
    assert generators.str.match(r"(stats|augment)\(").all()
    apply_overrides(workspace / "params", {"synthesize": {"enabled": False}})
    m = execute("synthesize", workspace)
    assert m["synthetic_images"] == 0
    assert (read_manifest(paths.train_manifest).source == "real").all()
