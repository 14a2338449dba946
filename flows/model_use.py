"""Using the model: which one a command means (the champion, never a rejected run), its self-describing ONNX
file, and predictions on new images. ``mdpipe export`` and ``mdpipe predict`` are thin wrappers of this.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

from mdcore.data.io import atomic_dir, sha256_file
from tasks.paths import Paths

log = logging.getLogger("mdpipe")
CALIBRATION = "calibration.json"  # mdcore.eval.calibration.Temperatures: the evaluate stage's, and a champion's
CHAMPION_ONNX = "model.onnx"


def model_folder(paths: Paths, model: str | None = None) -> Path:
    """The model a command uses: ``model`` (a folder with model.safetensors, or an .onnx file), else the
    champion, else (no champion yet: nothing was promoted) the last pipeline run's fine-tuned model."""
    if model:
        path = Path(model).expanduser()
        if path.suffix == ".onnx" and path.is_file() or (path / "model.safetensors").is_file():
            return path
        raise FileNotFoundError(f"--model {path}: neither an .onnx file nor a folder with model.safetensors")
    champion = paths.registry / "champion"
    if (champion / "model.safetensors").is_file():
        return champion
    if (paths.finetuned / "model.safetensors").is_file():
        log.warning("no champion yet (`mdpipe retrain` promotes one): using %s, the last pipeline run's model",
                    paths.finetuned.relative_to(paths.root))
        return paths.finetuned
    raise FileNotFoundError("no model yet: run `make demo` (or `mdpipe run`) first")


def temperatures_of(model_dir: Path, paths: Paths | None = None, sha: str | None = None) -> dict[str, float] | None:
    """{domain: T, "unknown": T} fitted for this model's weights: saved beside them (a champion: the
    evaluate stage's fit, carried over on promotion), or the evaluate stage's own output when it was fitted
    for these very weights; None = uncalibrated (T = 1)."""
    from mdcore.eval.calibration import fitted_for

    sha = sha or sha256_file(model_dir / "model.safetensors")
    candidates = [model_dir / CALIBRATION] + ([paths.evaluation / CALIBRATION] if paths is not None else [])
    for file in candidates:
        temps = fitted_for(file, sha, unhashed_ok=file.parent == model_dir)
        if temps is not None:
            return temps.by_name()
    return None


def calibration_feeds(paths: Paths, model_dir: Path, limit: int = 256) -> list[dict]:
    """int8 calibration inputs: seen-domain training images of the workspace, as the model decodes them."""
    from mdcore.deploy.quantize import calibration_feeds as feeds
    from mdcore.models.model import load_config
    from tasks.data import image_roots, load_split

    cfg, _ = load_config(model_dir)
    data, _ = load_split(paths.train_manifest, image_roots(paths.raw, paths.synthetic), cfg.image_size, ("train",),
                         synthetic=False, domains=cfg.domains, classes=cfg.classes, resize=cfg.resize)
    known = data.domains >= 0
    return feeds(data.images[known], data.domains[known], limit=limit)


def deployable_onnx(paths: Paths, model_dir: Path, precision: str = "fp32") -> Path:
    """The self-describing ONNX of ``model_dir``: the champion's own file when it matches its weights, else a
    cached export (``.mdpipe/onnx/``, keyed by the weights' hash and the temperatures)."""
    from mdcore.deploy.bundle import export_deployable, read_metadata

    if model_dir.suffix == ".onnx":
        return model_dir
    sha = sha256_file(model_dir / "model.safetensors")
    temps = temperatures_of(model_dir, paths, sha)
    own = model_dir / CHAMPION_ONNX
    if precision == "fp32" and own.is_file():
        meta = read_metadata(own)
        if meta.get("model_sha256") == sha and meta.get("temperatures") == temps:
            return own
    key = hashlib.sha256(json.dumps(temps, sort_keys=True).encode()).hexdigest()[:8] if temps else "nocal"
    cached = paths.root / ".mdpipe" / "onnx" / f"{sha[:16]}-{key}-{precision}.onnx"
    if not cached.is_file():
        log.info("exporting %s to ONNX (%s)", model_dir, precision)
        feeds, recipe = None, None
        if precision == "int8":  # the compress stage's int8 recipe
            from tasks.params import load_params

            cp = load_params("compress", paths.root / "params")
            feeds = calibration_feeds(paths, model_dir, cp.calibration_images)
            recipe = {"fmt": cp.quant_format, "op_types": cp.quant_ops, "fp32_convs": cp.quant_fp32_convs,
                      "reduce_range": cp.quant_reduce_range}
        export_deployable(model_dir, cached, precision, feeds, temps, recipe)
    return cached


def export(paths: Paths, model: str | None, precision: str, out: Path) -> dict:
    """``out/``: model.onnx (classes, domains, image size, preprocessing and temperatures in its metadata),
    config.json and model_card.md of the champion (or ``model``); the folder is replaced atomically."""
    from mdcore.deploy.bundle import export_card, read_metadata

    model_dir = model_folder(paths, model)
    if model_dir.suffix == ".onnx":
        raise FileNotFoundError("--model: export starts from a model folder (model.safetensors + config.json)")
    onnx_file = deployable_onnx(paths, model_dir, precision)
    record_file = model_dir / "champion.json"
    record = json.loads(record_file.read_text()) if record_file.is_file() else None
    with atomic_dir(out) as tmp:
        shutil.copyfile(onnx_file, tmp / "model.onnx")
        shutil.copyfile(model_dir / "config.json", tmp / "config.json")
        meta = read_metadata(tmp / "model.onnx")
        (tmp / "model_card.md").write_text(export_card(meta, model_dir, record))
    return {"out": str(out), "model": str(model_dir), "precision": precision,
            "bytes": (out / "model.onnx").stat().st_size, "champion": (record or {}).get("id")}


def predict(paths: Paths, source: str, model: str | None = None, domain: str | None = None,
            precision: str = "fp32", batch_size: int = 256, threads: int = 2):
    """(predictions frame, summary) for the images ``source`` names (``mdcore.deploy.predict.list_inputs``)."""
    from mdcore.deploy.predict import list_inputs, predict_frame

    frame = list_inputs(source, domain)
    onnx_file = deployable_onnx(paths, model_folder(paths, model), precision)
    return predict_frame(onnx_file, frame, batch_size=batch_size, threads=threads)


def install_champion_onnx(champion_dir: Path) -> Path:
    """Write the champion's fp32 ONNX beside its weights (called on every promotion and rollback), so what
    deployments read always follows the champion."""
    from mdcore.deploy.bundle import export_deployable

    return export_deployable(champion_dir, champion_dir / CHAMPION_ONNX, "fp32",
                             temperatures=temperatures_of(champion_dir))
