"""Predictions for new images through a self-describing ONNX file (``mdcore.deploy.bundle``): the images are
decoded exactly as in training (``mdcore.data.decode.decode_resized``), scored by ONNX Runtime, and each gets
a class and its probability (calibrated when the file carries temperatures).

Inputs: a folder (every image under it), one image, a text file (one path per line) or a CSV with a ``path``
column (optional ``domain``; an optional ``label`` column is scored). Relative paths in a list or CSV are
relative to that file's folder.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from mdcore.data.decode import DEFAULT_RESIZE
from mdcore.data.manifest import IMAGE_EXTENSIONS

UNKNOWN = "unknown"


class PredictInputError(ValueError):
    """The images to predict on cannot be listed (a missing path, a CSV without ``path``, an unknown domain)."""


def list_inputs(source: str | Path, domain: str | None = None) -> pd.DataFrame:
    """One row per image: ``path`` (absolute), ``domain`` (given, from the CSV, or ``unknown``), and
    ``label`` when a CSV gives one."""
    source = Path(source).expanduser()
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(source).parts))
        frame = pd.DataFrame({"path": [str(p) for p in files]})
    elif source.suffix.lower() in IMAGE_EXTENSIONS and source.is_file():
        frame = pd.DataFrame({"path": [str(source)]})
    elif source.suffix.lower() == ".csv" and source.is_file():
        frame = pd.read_csv(source, dtype=str, keep_default_na=False)
        if "path" not in frame.columns:
            raise PredictInputError(f"{source}: a CSV needs a 'path' column (found {list(frame.columns)})")
        frame["path"] = [str(_resolve(source.parent, p)) for p in frame["path"]]
    elif source.is_file():
        lines = [line.strip() for line in source.read_text().splitlines() if line.strip() and not line.startswith("#")]
        frame = pd.DataFrame({"path": [str(_resolve(source.parent, p)) for p in lines]})
    else:
        raise PredictInputError(f"{source}: no such folder or file")
    if frame.empty:
        raise PredictInputError(f"{source}: no images found (extensions {', '.join(IMAGE_EXTENSIONS)})")
    if domain is not None:
        frame["domain"] = domain
    elif "domain" not in frame.columns:
        frame["domain"] = UNKNOWN
    frame["domain"] = frame["domain"].replace("", UNKNOWN)
    return frame


def _resolve(base: Path, p: str) -> Path:
    path = Path(p).expanduser()
    return path if path.is_absolute() else base / path


def decode_one(path: str, size: int, resize: str = DEFAULT_RESIZE) -> tuple[np.ndarray, str | None]:
    """(3, size, size) uint8 as training decodes it, and None or why it could not be read (its pixels are
    then zeros and it gets no prediction)."""
    from mdcore.data.decode import decode_resized

    try:
        return decode_resized(Path(path), size, resize), None
    except (OSError, ValueError) as e:  # PIL: unreadable, truncated, not an image
        return np.zeros((3, size, size), np.uint8), f"{type(e).__name__}: {e}"[:200]


def decode_chunk(paths: list[str], size: int, resize: str = DEFAULT_RESIZE) -> tuple[np.ndarray, list[str | None]]:
    decoded = [decode_one(p, size, resize) for p in paths]
    images = np.stack([d[0] for d in decoded]) if decoded else np.zeros((0, 3, size, size), np.uint8)
    return images, [d[1] for d in decoded]


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def predict_frame(onnx_path: str | Path, frame: pd.DataFrame, batch_size: int = 256, threads: int = 2) -> tuple[pd.DataFrame, dict]:
    """``frame`` (from :func:`list_inputs`) with ``class``, ``probability``, ``error`` columns, and a summary."""
    from mdcore.deploy.bundle import read_metadata
    from mdcore.deploy.export import OUTPUT, session

    meta = read_metadata(onnx_path)
    missing = sorted({"classes", "domains", "image_size"} - set(meta))
    if missing:
        raise PredictInputError(f"{onnx_path}: no mdpipe metadata {missing}; export it with `mdpipe export`")
    domains, classes, temps = meta["domains"], meta["classes"], meta.get("temperatures") or {}
    unknown = sorted(set(frame["domain"]) - set(domains) - {UNKNOWN})
    if unknown:
        raise PredictInputError(f"domains {unknown} are not the model's {domains}; leave the domain empty (or "
                                f"'{UNKNOWN}') to route those images on their features")
    t0 = time.perf_counter()
    index = {d: i for i, d in enumerate(domains)}
    dom = np.array([index.get(d, -1) for d in frame["domain"]], dtype=np.int64)
    sess = session(onnx_path, threads)
    # files exported before the metadata named a filter were trained on bilinear resizes
    paths, size, resize = list(frame["path"]), meta["image_size"], meta.get("resize", DEFAULT_RESIZE)
    chunks = [slice(s, s + batch_size) for s in range(0, len(paths), batch_size)]
    logits, errors = [], []
    # one thread decodes the next batch while ONNX Runtime (which releases the GIL) scores this one: decoding
    # in several Python threads was slower than one (GIL contention), measured on 2 cores
    with ThreadPoolExecutor(1) as decoder:
        pending = decoder.submit(decode_chunk, paths[chunks[0]], size, resize) if chunks else None
        for k, part in enumerate(chunks):
            images, errs = pending.result()
            if k + 1 < len(chunks):
                pending = decoder.submit(decode_chunk, paths[chunks[k + 1]], size, resize)
            logits.append(sess.run([OUTPUT], {"images": images, "domain": dom[part]})[0])
            errors += errs
    logits = np.concatenate(logits) if logits else np.zeros((0, len(classes)), np.float32)
    t_total = time.perf_counter() - t0
    temperature = np.array([temps.get(d if d in index else UNKNOWN, temps.get(UNKNOWN, 1.0)) if temps else 1.0
                            for d in frame["domain"]], dtype=np.float64)
    probs = softmax(logits.astype(np.float64) / temperature[:, None])
    out = frame.copy()
    top = probs.argmax(1)
    failed = np.array([e is not None for e in errors])
    out["class"] = [None if f else classes[i] for i, f in zip(top, failed)]
    out["probability"] = np.where(failed, np.nan, probs.max(1)).round(6)
    out["error"] = [e or "" for e in errors]
    summary = {"images": len(out), "failed": int(failed.sum()), "model": str(onnx_path),
               "precision": meta.get("precision"), "calibrated": bool(temps),
               "per_class": out.loc[~failed, "class"].value_counts().to_dict(),
               "mean_probability": float(np.nanmean(out["probability"])) if (~failed).any() else None,
               "total_s": round(t_total, 3),
               "images_per_s": round(len(out) / t_total, 1) if t_total > 0 else None}
    if "label" in out.columns and (out["label"] != "").any():
        scored = out[(out["label"] != "") & ~failed]
        summary["accuracy"] = float((scored["label"] == scored["class"]).mean()) if len(scored) else None
        summary["labelled"] = int(len(scored))
    return out, summary
