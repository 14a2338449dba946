"""The leave-one-domain-out protocol: the guard against held-out leakage, the DomainBed table, and a real
protocol run (Prefect flow, real training) on tiny data with ``erm`` and the default method."""
import json
import shutil

import pandas as pd
import pytest
from PIL import Image

from mdcore.eval.lodo import LeakageError, aggregate, assert_no_leak, cell_rows, markdown, protocol_manifest


def tree(root, domains=("a", "b", "c"), classes=("x", "y"), per_class=6):
    for di, d in enumerate(domains):
        for ci, c in enumerate(classes):
            (root / d / c).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.new("RGB", (8, 8), (di * 80, ci * 100, i * 30)).save(root / d / c / f"{i}.png")
    return root


def test_a_cell_never_sees_its_held_out_domain(tmp_path):
    frame = protocol_manifest(tree(tmp_path / "t"))
    rows = cell_rows(frame, "c")
    assert rows.training_domains == ["a", "b"]
    assert set(rows.heldout["domain"]) == {"c"} and len(rows.heldout) == 12  # every image, all splits
    for used in (rows.train, rows.val, rows.test):
        assert "c" not in set(used["domain"])
    with pytest.raises(ValueError, match="not in the data"):
        cell_rows(frame, "zzz")


def test_guard_catches_held_out_content_under_another_name(tmp_path):
    root = tree(tmp_path / "t")
    # the same picture filed under a training domain: a leak by content, not by domain
    for i in range(6):
        shutil.copy(root / "c" / "x" / f"{i}.png", root / "a" / "x" / f"copy{i}.png")
    frame = protocol_manifest(root)
    with pytest.raises(LeakageError, match="held-out image"):
        cell_rows(frame, "c")


def test_pipeline_guard_refuses_holdout_rows_in_training(tmp_path):
    from mdcore.data.manifest import build_manifest, manifest_csv
    from tasks.data import guard_holdout

    frame = build_manifest(tree(tmp_path / "t"), holdout_domains=["c"])
    manifest = tmp_path / "m.csv"
    manifest.write_text(manifest_csv(frame))
    guard_holdout(manifest, {"training": frame[frame["split"] == "train"]})  # the honest case passes
    with pytest.raises(LeakageError, match="reached prototypes"):
        guard_holdout(manifest, {"prototypes": frame[frame["split"].isin(["train", "holdout"])]})
    assert_no_leak(frame[frame["split"] == "holdout"], {"validation": frame[frame["split"] == "val"]})


def fake_cell(method, heldout, seed, acc, seen=0.9):
    return {"method": method, "heldout": heldout, "seed": seed, "heldout_acc": acc, "oracle_heldout_acc": acc + 0.05,
            "seen_acc": seen, "train_s": 10.0}


def test_table_averages_domains_per_seed_then_over_seeds():
    cells = [fake_cell("erm", d, s, acc) for s, accs in ((0, (0.5, 0.7)), (1, (0.6, 0.8)), (2, (0.4, 0.6)))
             for d, acc in zip(("p", "q"), accs)]
    summary = {"aggregate": aggregate(cells), "seeds": [0, 1, 2], "config": {}}
    row = summary["aggregate"]["table"]["erm"]
    assert row["heldout"]["p"]["mean"] == pytest.approx(0.5) and row["heldout"]["p"]["std"] == pytest.approx(0.1)
    assert row["average"]["mean"] == pytest.approx(0.6) and row["average"]["n"] == 3
    assert row["oracle_average"]["mean"] == pytest.approx(0.65)
    md = markdown(summary, "t")
    assert "| erm | 50.0 ± 10.0 | 70.0 ± 10.0 | **60.0 ± 10.0** |" in md and "Oracle" in md


@pytest.mark.timeout(900)
def test_protocol_runs_erm_and_the_default_method_and_reruns_only_missing_cells(tmp_path):
    from prefect.testing.utilities import prefect_test_harness

    from flows.lodo import lodo_flow
    from tasks.params import ParamsError, load_params
    from tests.conftest import make_workspace

    ws = make_workspace(tmp_path / "ws")
    default = load_params("finetune", ws / "params").method
    methods = ["erm", default]
    kwargs = dict(data="digits", methods=methods, seeds=[0], epochs=8, batch_size=32, heldout=["ink"],
                  limit=900, root=str(ws))
    with prefect_test_harness(server_startup_timeout=120):
        first = lodo_flow(**kwargs)
        again = lodo_flow(**kwargs)
        # one more seed, two cells at a time: only the new cells train, as Ray tasks
        more = lodo_flow(**(kwargs | {"seeds": [0, 1], "workers": 2, "threads": 1}))
        out = ws / "reports/experiments/lodo/digits"
        written = {name: (out / name).read_text() for name in ("lodo.md", "metrics.json", "lodo.json")}
        # overridden finetune params make their own cells, never reusing the plain ones
        changed = lodo_flow(**(kwargs | {"methods": ["erm"], "finetune_overrides": {"label_smoothing": 0.0}}))
        with pytest.raises(ParamsError, match="method 'erm'.*linedraw_p"):
            lodo_flow(**(kwargs | {"methods": ["erm"], "finetune_overrides": {"method_hparams": {"linedraw_p": 0.2}}}))
    assert changed["cells_run"] == 1 and changed["config"]["finetune_overrides"] == {"label_smoothing": 0.0}
    assert first["cells_run"] == 2 and again["cells_run"] == 0 and again["cells_cached"] == 2
    assert more["cells_run"] == 2 and more["cells_cached"] == 2
    assert all(row["seeds"] == [0, 1] for row in more["aggregate"]["table"].values())
    table = first["aggregate"]["table"]
    for m in methods:  # chance is 0.10: both methods learn the training domains
        assert table[m]["seen"]["mean"] >= 0.4, (m, table[m]["seen"])
    # and the default transfers to the held-out domain (erm need not: ink is a hard shift for it)
    assert table[default]["heldout"]["ink"]["mean"] >= 0.3, table[default]["heldout"]
    assert again["aggregate"] == first["aggregate"]
    assert "| erm |" in written["lodo.md"] and (out / "lodo.png").stat().st_size > 0
    # metrics.json (what `dvc metrics show` reads) is the table of the last run (seeds 0 and 1), whose
    # numbers hold the same floors
    metrics = json.loads(written["metrics.json"])
    assert set(metrics) == set(methods)
    for m in methods:
        row = more["aggregate"]["table"][m]
        assert metrics[m]["heldout_acc/ink"] == row["heldout"]["ink"]["mean"], (m, metrics[m], row)
        assert metrics[m]["avg_heldout_acc"] == pytest.approx(metrics[m]["heldout_acc/ink"]), metrics[m]
        assert metrics[m]["seen_acc"] == row["seen"]["mean"] and metrics[m]["seen_acc"] >= 0.4, (m, metrics[m])
    assert metrics[default]["heldout_acc/ink"] >= 0.3, metrics[default]
    cells = json.loads(written["lodo.json"])["cells"]
    assert all(c["heldout"] == "ink" and "ink" not in c["seen_per_domain"] for c in cells)


def test_cell_key_ignores_the_stage_layout_but_not_the_budget():
    """A cell trains in one process: the stage's Ray layout and loader must not invalidate cached cells,
    while anything that changes its training must."""
    from flows.lodo import cell_hash

    spec = {"method": "erm", "heldout": "ink", "seed": 0, "threads": 2, "manifest": "/a/m.csv", "image_root": "/a",
            "finetune": {"epochs": 8, "batch_size": 32, "num_workers": 2, "cpus_per_worker": 1.0, "loader": "memory"}}
    key = cell_hash(spec)
    moved = spec | {"threads": 1, "manifest": "/b/m.csv", "image_root": "/b",
                    "finetune": spec["finetune"] | {"num_workers": 1, "cpus_per_worker": 2.0, "loader": "stream"}}
    assert cell_hash(moved) == key
    assert cell_hash(spec | {"finetune": spec["finetune"] | {"epochs": 9}}) != key
    assert cell_hash(spec | {"seed": 1}) != key
