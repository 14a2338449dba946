"""Using the model: `mdpipe export` writes a self-describing ONNX file (classes, domains, image size in its
metadata) that a bare ONNX Runtime session scores like PyTorch; `mdpipe predict` gives, image by image, what
the model in PyTorch gives on the same files; deployments follow the champion, never a rejected challenger."""
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from tests.conftest import REPO


@pytest.fixture(scope="module")
def model_workspace(tmp_path_factory):
    from mdcore.data.builtin import BuiltinSpec, materialize
    from mdcore.data.io import atomic_write_text
    from mdcore.data.manifest import build_manifest, class_names, manifest_csv
    from mdcore.models.model import ModelConfig, MultiDomainModel, save_model

    ws = tmp_path_factory.mktemp("predict")
    shutil.copy(REPO / "paths.yaml", ws / "paths.yaml")
    shutil.copytree(REPO / "params", ws / "params")
    materialize(ws / "data/raw", seed=0, spec=BuiltinSpec(limit=120))
    frame = build_manifest(ws / "data/raw", gate_fraction=0.2, workers=1, holdout_domains=["lowlight"])
    atomic_write_text(ws / "data/train_manifest.csv", manifest_csv(frame))
    torch.manual_seed(0)
    seen = sorted(frame.loc[frame["split"] == "train", "domain"].unique())
    model = MultiDomainModel(ModelConfig("test_resnet", seen, class_names(frame), domain_bn=True)).eval()
    with torch.no_grad():  # distinct per-domain statistics and prototypes, so a wrong domain or route shows
        for mod in model.modules():
            if getattr(mod, "running_mean", None) is not None and mod.running_mean.ndim == 2:
                mod.running_mean.normal_(0, 0.3)
        model.prototypes.normal_()
    save_model(model, ws / "models/finetuned")
    return ws, frame, model


def _torch_classes(model, ws, rows: pd.DataFrame) -> list[str]:
    from mdcore.data.decode import decode_resized
    from mdcore.data.images import to_float

    images = torch.from_numpy(np.stack([decode_resized(ws / "data/raw" / p, model.config.image_size)
                                        for p in rows["path"]]))
    index = {d: i for i, d in enumerate(model.config.domains)}
    domains = torch.tensor([index.get(d, -1) for d in rows["domain"]])
    with torch.no_grad():
        top = model(to_float(images), domains).argmax(1)
    return [model.config.classes[i] for i in top]


def test_export_writes_metadata_that_a_bare_session_can_use(model_workspace, capsys):
    import onnxruntime as ort

    from flows.cli import main
    from mdcore.data.io import sha256_file

    ws, _, model = model_workspace
    assert main(["--root", str(ws), "export"]) == 0
    out = ws / "models/export"
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    meta = {k: json.loads(v) for k, v in sess.get_modelmeta().custom_metadata_map.items()}
    assert meta["mdpipe.classes"] == model.config.classes and meta["mdpipe.domains"] == model.config.domains
    assert meta["mdpipe.image_size"] == model.config.image_size and meta["mdpipe.precision"] == "fp32"
    assert meta["mdpipe.model_sha256"] == sha256_file(ws / "models/finetuned/model.safetensors")
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    d = torch.tensor([0, len(model.config.domains) - 1, -1, 0])
    got = sess.run(["logits"], {"images": x.numpy(), "domain": d.numpy()})[0]
    with torch.no_grad():
        ref = model(x.float() / 127.5 - 1.0, d).numpy()
    assert np.abs(got - ref).max() < 1e-4
    card = (out / "model_card.md").read_text()
    assert all(c in card for c in model.config.domains) and "unknown" in card


def test_predict_gives_what_the_model_gives_image_by_image(model_workspace, tmp_path):
    """Seen test images with their domain, held-out images with none (routed), from a CSV with labels."""
    from flows.cli import main

    ws, frame, model = model_workspace
    rows = frame[frame["split"].isin(["test", "holdout"])].copy()
    rows["domain"] = rows["domain"].where(rows["split"] != "holdout", "")
    listing = tmp_path / "new.csv"
    rows.assign(path=[str(ws / "data/raw" / p) for p in rows["path"]])[["path", "domain", "label"]].to_csv(listing, index=False)
    out = tmp_path / "pred.csv"
    assert main(["--root", str(ws), "predict", str(listing), "--out", str(out), "--threads", "1"]) == 0
    pred = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert len(pred) == len(rows) and (pred["error"] == "").all()
    assert list(pred["class"]) == _torch_classes(model, ws, rows)
    probs = pred["probability"].astype(float)
    assert ((probs > 1 / len(model.config.classes) - 1e-6) & (probs <= 1)).all()


def test_predict_a_folder_with_a_broken_file_and_a_wrong_domain(model_workspace, tmp_path, capsys):
    from flows.cli import main

    ws, frame, _ = model_workspace
    folder = tmp_path / "incoming"
    folder.mkdir()
    for p in list(frame["path"])[:5]:
        shutil.copy(ws / "data/raw" / p, folder / p.replace("/", "_"))
    (folder / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "pred.json"
    assert main(["--root", str(ws), "predict", str(folder), "--domain", "clean", "--out", str(out)]) == 0
    pred = pd.DataFrame(json.loads(out.read_text()))
    assert len(pred) == 6 and (pred["domain"] == "clean").all()
    broken = pred[pred["path"].str.endswith("broken.png")].iloc[0]
    assert broken["error"].startswith("UnidentifiedImageError") and pd.isna(broken["class"])
    assert (pred.loc[pred["error"] == "", "class"].notna()).all()
    assert "1 could not be read" in capsys.readouterr().out
    assert main(["--root", str(ws), "predict", str(folder), "--domain", "nosuch", "--out", str(out)]) == 2
    assert "['nosuch'] are not the model's" in capsys.readouterr().err
    assert main(["--root", str(ws), "predict", str(tmp_path / "missing"), "--out", str(out)]) == 2


def test_deployments_follow_the_champion_not_a_rejected_challenger(model_workspace):
    from flows.model_use import deployable_onnx, model_folder
    from flows.retrain import promote
    from mdcore.data.io import sha256_file
    from mdcore.deploy.bundle import read_metadata
    from mdcore.models.model import load_model, save_model
    from tasks.paths import load_paths

    ws, _, _ = model_workspace
    paths = load_paths(ws)
    first = promote.fn(root=str(ws), lineage={"run_id": "r1"})
    assert first["promote"]
    champion = ws / "registry/champion"
    champ_sha = sha256_file(champion / "model.safetensors")
    assert read_metadata(champion / "model.onnx")["model_sha256"] == champ_sha  # exported on promotion

    challenger = load_model(ws / "models/finetuned")
    with torch.no_grad():
        challenger.head.weight.mul_(-1.0)  # a different model the gate rejects (tolerance -1: must gain a point)
    save_model(challenger, ws / "models/finetuned")
    second = promote.fn(root=str(ws), tolerance=-1.0, lineage={"run_id": "r2"})
    assert not second["promote"]
    assert model_folder(paths) == champion
    used = deployable_onnx(paths, model_folder(paths))
    assert used == champion / "model.onnx" and read_metadata(used)["model_sha256"] == champ_sha


def test_predict_applies_the_temperatures_fitted_for_these_weights(model_workspace, tmp_path):
    """The evaluate stage's temperatures reach predictions (and the exported metadata) only for the weights
    they were fitted for."""
    from flows.model_use import deployable_onnx, predict
    from mdcore.data.io import sha256_file
    from mdcore.deploy.bundle import read_metadata
    from mdcore.eval.calibration import Temperatures
    from tasks.paths import load_paths

    from mdcore.models.model import load_model

    ws, frame, _ = model_workspace
    paths = load_paths(ws)
    model_dir = ws / "models/finetuned"
    model = load_model(model_dir).eval()  # as the tests before may have left it
    rows = frame[frame["split"] == "test"].head(8)
    listing = tmp_path / "few.csv"
    rows.assign(path=[str(ws / "data/raw" / p) for p in rows["path"]])[["path", "domain"]].to_csv(listing, index=False)
    temps = Temperatures(model.config.domains, {d: 0.25 for d in model.config.domains}, 3.0,
                         model_sha256=sha256_file(model_dir / "model.safetensors"))
    paths.evaluation.mkdir(parents=True, exist_ok=True)
    temps.save(paths.evaluation / "calibration.json")
    try:
        pred, summary = predict(paths, str(listing), model=str(model_dir), threads=1)
        assert summary["calibrated"]
        assert read_metadata(deployable_onnx(paths, model_dir))["temperatures"]["unknown"] == 3.0
        from mdcore.data.decode import decode_resized
        from mdcore.data.images import to_float

        x = torch.from_numpy(np.stack([decode_resized(ws / "data/raw" / p, 32) for p in rows["path"]]))
        d = torch.tensor([model.config.domains.index(n) for n in rows["domain"]])
        with torch.no_grad():
            expected = torch.softmax(model(to_float(x), d) / 0.25, dim=1).max(1).values.numpy()
        assert np.allclose(pred["probability"].to_numpy(float), expected, atol=1e-4)
        # the exported graph computes the same probabilities itself (a bare session, no mdpipe code)
        import onnxruntime as ort

        with torch.no_grad():
            full = torch.softmax(model(to_float(x), d) / 0.25, dim=1).numpy()
        sess = ort.InferenceSession(str(deployable_onnx(paths, model_dir)), providers=["CPUExecutionProvider"])
        assert [o.name for o in sess.get_outputs()] == ["logits", "probabilities"]
        probs = sess.run(["probabilities"], {"images": x.numpy(), "domain": d.numpy().astype(np.int64)})[0]
        assert np.abs(probs - full).max() < 1e-4  # the stated tolerance (float32 graph vs eager PyTorch)
        # the compress stage's shipped model.onnx gets them too, only while they fit its weights
        from mdcore.deploy.export import export_onnx
        from tasks.compress import calibrate_shipped

        shipped = tmp_path / "shipped"
        shipped.mkdir()
        export_onnx(model, shipped / "model.onnx")
        assert calibrate_shipped(shipped, "int8", model, temps.model_sha256, paths).startswith("yes")
        sess = ort.InferenceSession(str(shipped / "model.onnx"), providers=["CPUExecutionProvider"])
        probs = sess.run(["probabilities"], {"images": x.numpy(), "domain": d.numpy().astype(np.int64)})[0]
        assert np.abs(probs - full).max() < 1e-4 and read_metadata(shipped / "model.onnx")["precision"] == "int8"
        export_onnx(model, shipped / "model.onnx")
        assert calibrate_shipped(shipped, "pruned", model, temps.model_sha256, paths).startswith("no: shipped variant")
        assert [o.name for o in ort.InferenceSession(str(shipped / "model.onnx")).get_outputs()] == ["logits"]
        temps.model_sha256 = "another model's weights"
        temps.save(paths.evaluation / "calibration.json")
        _, summary = predict(paths, str(listing), model=str(model_dir), threads=1)
        assert not summary["calibrated"]
    finally:
        (paths.evaluation / "calibration.json").unlink()
