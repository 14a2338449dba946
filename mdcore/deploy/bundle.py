"""A deployable ONNX file that describes itself: classes, domains, image size and preprocessing ride in the
ONNX metadata, so a user (or ``mdpipe predict``) needs nothing but the file to feed it and read its output.

Metadata keys (``mdpipe.*``, JSON values): ``classes`` and ``domains`` (index order; domain -1 = unknown,
routed on features), ``image_size``, ``resize`` (the filter to that size), ``input`` (how pixels reach the
graph), ``temperatures`` (per domain and ``unknown``, when calibration fitted them: probabilities =
softmax(logits / T)), ``model_sha256`` (of the safetensors weights it was exported from) and ``precision``
(fp32 or int8). With temperatures the
graph also has a ``probabilities`` output (softmax(logits / T[domain]), computed in the graph).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from mdcore.data.decode import DEFAULT_RESIZE
from mdcore.models.model import MultiDomainModel

PREFIX = "mdpipe."
INPUT_DOC = ("uint8 RGB pixels, NCHW, {size}x{size}: decode, convert to RGB (EXIF rotation applied, alpha on "
             "white), resize {resize} to {size}x{size}; the graph scales and normalizes itself")


def metadata_for(model: MultiDomainModel, model_sha256: str, precision: str,
                 temperatures: dict[str, float] | None = None) -> dict:
    cfg = model.config
    meta = {"classes": list(cfg.classes), "domains": list(cfg.domains), "image_size": cfg.image_size,
            "resize": cfg.resize, "input": INPUT_DOC.format(size=cfg.image_size, resize=cfg.resize),
            "backbone": cfg.backbone,
            "model_sha256": model_sha256, "precision": precision}
    if temperatures:
        meta["temperatures"] = dict(temperatures)
    return meta


def write_metadata(onnx_path: str | Path, meta: dict) -> None:
    """Put ``meta`` into the ONNX file's metadata (replacing earlier ``mdpipe.*`` keys); written atomically."""
    import onnx

    onnx_path = Path(onnx_path)
    proto = onnx.load(str(onnx_path))
    kept = [p for p in proto.metadata_props if not p.key.startswith(PREFIX)]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = PREFIX + key, json.dumps(value)
    fd, tmp = tempfile.mkstemp(dir=onnx_path.parent, suffix=".onnx.tmp")
    os.close(fd)
    try:
        onnx.save(proto, tmp)
        os.replace(tmp, onnx_path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_metadata(onnx_path: str | Path) -> dict:
    """The ``mdpipe.*`` metadata of an ONNX file (empty for a file without it)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    props = sess.get_modelmeta().custom_metadata_map
    return {k[len(PREFIX):]: json.loads(v) for k, v in props.items() if k.startswith(PREFIX)}


def export_deployable(model_dir: str | Path, out_path: str | Path, precision: str = "fp32",
                      calibration: list[dict] | None = None, temperatures: dict[str, float] | None = None,
                      quantization: dict | None = None) -> Path:
    """The model saved in ``model_dir`` (safetensors + config.json) as one self-describing ONNX file at
    ``out_path`` (written atomically): fp32, or int8 (static, calibrated on ``calibration`` feeds:
    ``mdcore.deploy.quantize.calibration_feeds`` of seen-domain training images) with the compress stage's
    recipe: ``quantization`` = {fmt, op_types, fp32_convs, reduce_range}. (Quantizing every op type instead crashed
    ONNX Runtime 1.32 on batches of known domains, whose routing pass is empty.)"""
    from mdcore.data.io import sha256_file
    from mdcore.deploy.export import export_onnx
    from mdcore.models.model import load_model

    if precision not in ("fp32", "int8"):
        raise ValueError(f"precision {precision!r}: expected fp32 or int8")
    model_dir, out_path = Path(model_dir), Path(out_path)
    model = load_model(model_dir)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mdpipe-export-", dir=out_path.parent) as tmp:
        fp32 = export_onnx(model, Path(tmp) / "fp32.onnx")
        made = fp32
        if precision == "int8":
            from mdcore.deploy.quantize import first_convs, quantize_int8

            if not calibration:
                raise ValueError("int8 export needs calibration images (seen-domain training images)")
            q = quantization or {}
            made = quantize_int8(fp32, Path(tmp) / "int8.onnx", calibration, fmt=q.get("fmt", "qoperator"),
                                 op_types=q.get("op_types", ["Conv", "Gemm"]),
                                 exclude=first_convs(fp32, q.get("fp32_convs", 0)),
                                 reduce_range=q.get("reduce_range", False))
        describe(made, model, sha256_file(model_dir / "model.safetensors"), precision, temperatures)
        os.replace(made, out_path)
    return out_path


def describe(onnx_path: str | Path, model: MultiDomainModel, model_sha256: str, precision: str,
             temperatures: dict[str, float] | None = None) -> None:
    """Make the exported ``onnx_path`` self-describing, in place: with ``temperatures`` ({domain: T,
    "unknown": T}, fitted for these weights) a ``probabilities`` output = softmax(logits / T[domain]) is added
    to the graph (``mdcore.deploy.calibrated``); then the ``mdpipe.*`` metadata."""
    if temperatures:
        import torch

        from mdcore.deploy.calibrated import add_probabilities

        order = [*model.config.domains, "unknown"]
        missing = [d for d in order if d not in temperatures]
        if missing:
            raise ValueError(f"temperatures lack {missing}: they were fitted for another model's domains")
        add_probabilities(onnx_path, torch.tensor([float(temperatures[d]) for d in order]))
    write_metadata(onnx_path, metadata_for(model, model_sha256, precision, temperatures))


def export_card(meta: dict, model_dir: Path, record: dict | None) -> str:
    """A short model card for an exported file: how to feed it, what comes out, where the model came from."""
    size = meta["image_size"]
    temps = meta.get("temperatures")
    lines = [f"# Model card: {'champion ' + record['id'] if record else Path(model_dir).name} ({meta['precision']})", "",
             "## Inputs and outputs",
             f"- `images`: {INPUT_DOC.format(size=size, resize=meta.get('resize', DEFAULT_RESIZE))}.",
             "- `domain`: int64 (N,): the image's domain index (below), or -1 when unknown (routed on its features).",
             f"- `logits`: float32 (N, {len(meta['classes'])}). Probabilities: softmax(logits / T[domain])"
             + (" with the temperatures below (fitted on validation); the graph's second output, `probabilities`, "
                "computes exactly that." if temps else " (no temperatures fitted: T = 1)."),
             "- Everything above is also in the file's ONNX metadata (`mdpipe.*` keys).", "",
             "## Domains", "| index | domain | temperature |", "|---:|---|---:|",
             *[f"| {i} | {d} | {(temps or {}).get(d, 1.0):.3f} |" for i, d in enumerate(meta["domains"])],
             f"| -1 | unknown | {(temps or {}).get('unknown', 1.0):.3f} |", "",
             "classes (index order): " + ", ".join(f"`{c}`" for c in meta["classes"]), "",
             "## Provenance", f"- weights sha256 `{meta['model_sha256']}`, backbone `{meta['backbone']}`"]
    if record:
        lines += [f"- champion `{record.get('id')}` promoted by the gate: {record.get('reason')}",
                  f"- dataset `{record.get('dataset_version')}`, code `{record.get('code_version')}`, "
                  f"run record `{record.get('run_record')}`"]
    return "\n".join(lines) + "\n"
