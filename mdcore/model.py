"""The multi-domain model: one timm backbone shared by all domains, plus per-domain parts.

``forward(images, domains)`` takes a domain index per image. Index -1 means "unknown domain" (a
held-out site, or a caller that does not know): the model then routes on its features, mixing the
per-domain parts by the image's similarity to each domain's feature prototype.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from mdcore.images import standardize
from mdcore.io import atomic_dir

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model without the training code (saved as config.json)."""

    backbone: str
    domains: list[str]
    classes: list[str]
    image_size: int = 32
    adapters: bool = True
    adapter_dim: int = 64
    routing_temperature: float = 0.1
    input_norm: str = "image"  # "image": standardize each image by its own statistics; "none"
    backbone_kwargs: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"model config has unknown fields {unknown}; known: {sorted(known)}")
        return cls(**data)


class BottleneckAdapter(nn.Module):
    """Residual bottleneck adapter (Houlsby et al., 2019); starts as the identity."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.down = nn.Linear(dim, hidden)
        self.up = nn.Linear(hidden, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(F.gelu(self.down(self.norm(x))))


def create_backbone(name: str, **kwargs) -> nn.Module:
    """Any timm model, random init (nothing is downloaded), as a pooled feature extractor."""
    if name not in timm.list_models() and not timm.is_model(name):
        raise ValueError(f"unknown timm backbone {name!r}; see timm.list_models() for the known names")
    return timm.create_model(name, pretrained=False, num_classes=0, **kwargs)


class MultiDomainModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.input_norm not in ("image", "none"):
            raise ValueError(f"model config input_norm={config.input_norm!r}: expected 'image' or 'none'")
        self.config = config
        self.backbone = create_backbone(config.backbone, **config.backbone_kwargs)
        dim = self.backbone.num_features
        n_domains = len(config.domains)
        self.adapters = (
            nn.ModuleList(BottleneckAdapter(dim, config.adapter_dim) for _ in range(n_domains))
            if config.adapters
            else None
        )
        self.head = nn.Linear(dim, len(config.classes))
        # mean normalized backbone feature of each domain, for routing images of unknown domain
        self.register_buffer("prototypes", torch.zeros(n_domains, dim))

    @property
    def num_features(self) -> int:
        return self.backbone.num_features

    def features(self, images: torch.Tensor) -> torch.Tensor:
        if self.config.input_norm == "image":
            images = standardize(images)
        return self.backbone(images)

    def domain_weights(self, feats: torch.Tensor, domains: torch.Tensor) -> torch.Tensor:
        """(N, D) mixing weights: one-hot for known domains, prototype similarity for unknown ones."""
        n_domains = len(self.config.domains)
        known = domains >= 0
        weights = F.one_hot(domains.clamp(min=0), n_domains).to(feats.dtype)
        if not bool(known.all()):
            sims = F.normalize(feats.detach(), dim=1) @ F.normalize(self.prototypes, dim=1).T
            soft = torch.softmax(sims / self.config.routing_temperature, dim=1)
            weights = torch.where(known[:, None], weights, soft)
        return weights

    def adapt(self, feats: torch.Tensor, domains: torch.Tensor) -> torch.Tensor:
        if self.adapters is None:
            return feats
        weights = self.domain_weights(feats, domains)
        # every adapter sees every image (cheap on pooled features) so each gets a gradient each step,
        # which keeps DDP's reducer happy without find_unused_parameters
        outs = torch.stack([adapter(feats) for adapter in self.adapters], dim=1)  # N, D, F
        return (weights[..., None] * outs).sum(dim=1)

    def forward(self, images: torch.Tensor, domains: torch.Tensor | None = None, return_aux: bool = False):
        """Logits; with ``return_aux`` also a dict of extra (already weighted) training loss terms."""
        if domains is None:
            domains = torch.full((images.shape[0],), -1, dtype=torch.long, device=images.device)
        feats = self.features(images)
        logits = self.head(self.adapt(feats, domains))
        return (logits, {}) if return_aux else logits

    @torch.no_grad()
    def fit_prototypes(self, images: torch.Tensor, domains: torch.Tensor, batch_size: int = 256) -> None:
        """Set each domain's prototype to the mean normalized feature of its images."""
        was_training = self.training
        self.eval()
        sums = torch.zeros_like(self.prototypes)
        counts = torch.zeros(len(self.config.domains), device=sums.device)
        for start in range(0, len(images), batch_size):
            feats = F.normalize(self.features(images[start : start + batch_size].to(sums.device)), dim=1)
            d = domains[start : start + batch_size].to(sums.device)
            sums.index_add_(0, d, feats)
            counts.index_add_(0, d, torch.ones_like(d, dtype=counts.dtype))
        self.prototypes.copy_(sums / counts.clamp(min=1)[:, None])
        self.train(was_training)

    def group_matcher(self, coarse: bool = False) -> dict:
        """The backbone's timm layer groups under ``backbone.``, so timm's layer decay works on the whole model."""
        prefixed = {}
        for key, spec in self.backbone.group_matcher(coarse=coarse).items():
            if isinstance(spec, str):
                prefixed[key] = _prefix(spec)
            else:
                prefixed[key] = [(_prefix(p), rest) for p, rest in spec]
        return prefixed

    def load_backbone(self, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.backbone.load_state_dict(state, strict=False)
        if unexpected or [m for m in missing if not m.startswith(("fc.", "head", "classifier"))]:
            raise ValueError(f"backbone weights do not fit {self.config.backbone}: missing {missing}, unexpected {unexpected}")


def _prefix(pattern: str) -> str:
    return r"^backbone\.(?:" + re.sub(r"^\^", "", pattern) + ")"


def save_model(model: MultiDomainModel, folder: str | Path, extra: dict | None = None) -> None:
    """safetensors weights + JSON config, written atomically (the old folder stays until the new one is whole)."""
    with atomic_dir(folder) as tmp:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS))
        payload = asdict(model.config) | {"extra": extra or {}}
        (tmp / CONFIG).write_text(json.dumps(payload, indent=2) + "\n")


def load_config(folder: str | Path) -> tuple[ModelConfig, dict]:
    data = json.loads((Path(folder) / CONFIG).read_text())
    extra = data.pop("extra", {})
    return ModelConfig.from_dict(data), extra


def load_model(folder: str | Path) -> MultiDomainModel:
    """Rebuild from config.json and load safetensors weights (no pickles involved)."""
    folder = Path(folder)
    config, _ = load_config(folder)
    model = MultiDomainModel(config)
    model.load_state_dict(load_file(str(folder / WEIGHTS)), strict=True)
    return model.eval()
