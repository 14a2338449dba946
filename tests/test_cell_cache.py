"""Cached experiment cells are keyed by the code that trains them, not only by params and data."""
import shutil
from pathlib import Path

from flows.cell_cache import CELL_SOURCES, SOURCE_ROOT, code_version, source_files


def _tree(tmp_path: Path) -> Path:
    """A copy of the sources code_version reads (mdcore/ and the cell modules)."""
    root = tmp_path / "src"
    for name in CELL_SOURCES:
        src, dst = SOURCE_ROOT / name, root / name
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    return root


def test_code_version_follows_the_cell_sources(tmp_path):
    root = _tree(tmp_path)
    files = source_files(root)
    assert "mdcore/models/model.py" in files and "flows/lodo_cell.py" in files and "mdcore/train/setup.py" in files
    assert "flows/lodo.py" not in files  # the flow itself does not decide a cell's result
    version = code_version(root)
    assert len(version) == 64 and code_version(root) == version  # nothing changed: the same version
    (root / "flows" / "lodo.py").write_text("# not a cell source\n")
    (root / "README.md").write_text("docs\n")
    assert code_version(root) == version
    model = root / "mdcore" / "models" / "model.py"
    model.write_text(model.read_text() + "\n# changed\n")  # a change in a cell's training code
    changed = code_version(root)
    assert changed != version
    (root / "mdcore" / "models" / "extra.py").write_text("X = 1\n")  # a new module
    assert code_version(root) not in (version, changed)
    (root / "mdcore" / "models" / "extra.py").rename(root / "mdcore" / "models" / "extra2.py")  # a rename
    assert code_version(root) not in (version, changed)
    (root / "tasks" / "params.py").unlink()  # a missing cell module counts too
    assert code_version(root) != changed


def test_cell_key_changes_with_the_code_version(tmp_path, monkeypatch):
    from flows import cell_cache
    from flows.lodo import cell_hash

    spec = {"method": "erm", "heldout": "ink", "seed": 0, "threads": 2, "manifest": "/a/m.csv", "image_root": "/a",
            "finetune": {"epochs": 8, "batch_size": 32}, "code_version": cell_cache.code_version()}
    key = cell_hash(spec)
    assert cell_hash(spec | {"code_version": cell_cache.code_version()}) == key  # nothing changed
    root = _tree(tmp_path)
    same = cell_hash(spec | {"code_version": cell_cache.code_version(root)})
    epoch = root / "mdcore" / "train" / "epoch.py"
    epoch.write_text(epoch.read_text() + "\n# changed\n")
    assert cell_hash(spec | {"code_version": cell_cache.code_version(root)}) != same
    assert cell_hash(spec | {"code_version": "0" * 64}) != key


def test_flows_put_the_code_version_in_every_cell_key(tmp_path, monkeypatch):
    """lodo_flow and continual_flow compute the version once per run and key (and record) every cell by it:
    a rerun with other code trains every cell again, a rerun with the same code none."""
    import json

    from flows import cell_cache, continual, lodo
    from mdcore.eval import lodo as lodo_core

    ws = tmp_path / "ws"  # the params and paths a flow reads; the data and the training are stubbed
    ws.mkdir()
    shutil.copy(SOURCE_ROOT / "paths.yaml", ws / "paths.yaml")
    shutil.copytree(SOURCE_ROOT / "params", ws / "params")
    calls, trained = [], []
    monkeypatch.setattr(cell_cache, "code_version", lambda *a, **k: calls.append(1) or version)

    def fake_cell(spec, out_file, use_ray=False):
        trained.append(spec)
        result = {"method": spec.get("method", "erm"), "heldout": spec.get("heldout"), "seed": spec["seed"],
                  "code_version": spec["code_version"], "cell_hash": lodo.cell_hash(spec)}
        Path(out_file).parent.mkdir(parents=True, exist_ok=True)
        Path(out_file).write_text(json.dumps(result))
        return result

    fake_prepare = lambda *a, **k: {"image_root": "/x", "manifest": "/x/m.csv", "dataset_version": "dv",  # noqa: E731
                                    "domains": ["clean", "ink"], "images": 10}
    stop = RuntimeError("stop after the cells")  # the report needs real results; only the keys matter here
    monkeypatch.setattr(lodo, "prepare_data", fake_prepare)
    monkeypatch.setattr(continual, "prepare_data", fake_prepare)
    monkeypatch.setattr(lodo, "run_cell", fake_cell)
    monkeypatch.setattr(continual, "run_sequence", lambda spec, out: fake_cell(spec, out))
    monkeypatch.setattr(lodo_core, "aggregate", lambda cells, **kw: (_ for _ in ()).throw(stop))
    monkeypatch.setattr(continual, "aggregate", lambda cells: (_ for _ in ()).throw(stop))

    def run(fn, **kw):
        try:
            fn(data="digits", seeds=[0, 1], epochs=1, root=str(ws), **kw)
        except RuntimeError as e:
            assert e is stop

    for fn, kw in ((lodo.lodo_flow.fn, {"methods": ["erm"], "heldout": ["ink"], "workers": 1}),
                   (continual.continual_flow.fn, {"order": ["clean", "ink"]})):
        calls.clear(), trained.clear()
        version = "a" * 64
        run(fn, **kw)
        assert len(trained) == 2 and len(calls) == 1  # once per run, not per cell
        assert all(s["code_version"] == version for s in trained)
        first_keys = {lodo.cell_hash(s) for s in trained}
        trained.clear()
        run(fn, **kw)
        assert trained == []  # same code: every cell reused
        version = "b" * 64
        run(fn, **kw)
        assert len(trained) == 2 and not first_keys & {lodo.cell_hash(s) for s in trained}  # new code: new cells
