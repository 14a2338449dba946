"""Building the deployable variants of a teacher: fp32 ONNX, int8 ONNX, channel-pruned (+ distilled
recovery), a distilled student, and int8 versions of those. Each variant is an ONNX file plus a recipe
(what it was built from and how), never a pickled module."""
from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from mdcore.deploy.distill import DistillConfig, distill, student_model
from mdcore.deploy.export import export_onnx
from mdcore.deploy.measure import count_macs, count_params
from mdcore.deploy.prune import prune_channels
from mdcore.deploy.quantize import calibration_feeds, first_convs, quantize_int8
from mdcore.data.images import ImageSet, to_float
from mdcore.models.model import MultiDomainModel

log = logging.getLogger("mdpipe.compress")


@dataclass
class BuildConfig:
    """What to build (see ``CompressParams`` for the meaning of each field)."""

    quantize: bool = True
    quant_format: str = "qoperator"
    quant_ops: list[str] = field(default_factory=lambda: ["Conv", "Gemm", "Clip"])
    quant_fp32_convs: int = 3
    quant_reduce_range: bool = False
    calibration_images: int = 512
    prune_ratio: float = 0.0
    recovery: DistillConfig = field(default_factory=lambda: DistillConfig(epochs=10))
    student_backbone: str | None = None
    student: DistillConfig = field(default_factory=lambda: DistillConfig(epochs=20))
    seed: int = 0
    device: str = "cpu"  # where distillation trains; export, int8 and scoring stay on CPU


@dataclass
class Variant:
    """A built variant: its ONNX file, the PyTorch model it came from (for MACs; not shipped), a recipe."""

    name: str
    onnx: Path
    model: MultiDomainModel
    recipe: dict
    macs: int = 0
    params: int = 0


def _variant(name: str, model: MultiDomainModel, folder: Path, recipe: dict) -> Variant:
    path = export_onnx(model, folder / f"{name}.onnx")
    return Variant(name, path, model, recipe, count_macs(model, model.config.image_size), count_params(model))


def _int8(base: Variant, folder: Path, calib: list, cfg: BuildConfig) -> Variant:
    path = quantize_int8(base.onnx, folder / f"{base.name}+int8.onnx" if base.name != "fp32" else folder / "int8.onnx",
                         calib, fmt=cfg.quant_format, op_types=cfg.quant_ops,
                         exclude=first_convs(base.onnx, cfg.quant_fp32_convs), reduce_range=cfg.quant_reduce_range)
    recipe = base.recipe | {"int8": {"tool": "onnxruntime.quantization.quantize_static", "format": cfg.quant_format,
                                     "per_channel": True, "weights": "int8 symmetric", "activations": "uint8",
                                     "op_types": cfg.quant_ops, "fp32_first_convs": cfg.quant_fp32_convs,
                                     "reduce_range": cfg.quant_reduce_range,
                                     "calibration": {"method": "minmax", "images": cfg.calibration_images,
                                         "from": "train split of the seen domains, each batch with and without its domain id",
                                         "seed": cfg.seed}}}
    name = "int8" if base.name == "fp32" else f"{base.name}+int8"
    return Variant(name, path, base.model, recipe, base.macs, base.params)


def build_variants(teacher: MultiDomainModel, train: ImageSet, folder: Path, cfg: BuildConfig,
                   source: dict) -> list[Variant]:
    """Every variant ``cfg`` asks for, as ONNX files in ``folder``. ``train``: the seen domains' training
    images (calibration and distillation data; never test or held-out images). ``source``: provenance of
    the teacher, copied into each recipe."""
    folder.mkdir(parents=True, exist_ok=True)
    base = {"source": source, "inputs": "uint8 images (N,3,H,W) RGB + int64 domain (N,), -1 = unknown"}
    fp32 = _variant("fp32", teacher, folder, base | {"steps": ["export"]})
    bases = [fp32]
    if cfg.prune_ratio > 0:
        torch.manual_seed(cfg.seed)
        pruned = copy.deepcopy(teacher)
        example = to_float(train.images[:2]), train.domains[:2]
        summary = prune_channels(pruned, cfg.prune_ratio, *example)
        history = distill(pruned, teacher, train, cfg.recovery, cfg.device)
        log.info("pruned %.0f%% of channels: %d -> %d parameters; recovery %s", 100 * cfg.prune_ratio,
                 summary["params_before"], summary["params_after"], history[-1] if history else "none")
        bases.append(_variant("pruned", pruned, folder, base | {
            "steps": ["prune", "distill", "export"],
            "prune": {"tool": "torch_pruning.MetaPruner", "importance": "L2 magnitude", "ratio": cfg.prune_ratio,
                      "round_to": 8, "kept": "classifier outputs", **summary},
            "distill": asdict(cfg.recovery) | {"teacher": "source", "data": "train split of the seen domains"}}))
    if cfg.student_backbone:
        torch.manual_seed(cfg.seed)
        student = student_model(teacher, cfg.student_backbone)
        history = distill(student, teacher, train, cfg.student, cfg.device)
        log.info("student %s distilled: %s", cfg.student_backbone, history[-1] if history else "no epochs")
        bases.append(_variant("student", student, folder, base | {
            "steps": ["distill", "export"], "student": {"backbone": cfg.student_backbone, "init": "random"},
            "distill": asdict(cfg.student) | {"teacher": "source", "data": "train split of the seen domains"}}))
    variants = list(bases)
    if cfg.quantize:
        calib = calibration_feeds(train.images, train.domains, batch_size=64, limit=cfg.calibration_images,
                                  seed=cfg.seed)
        variants += [_int8(b, folder, calib, cfg) for b in bases]
    return variants
