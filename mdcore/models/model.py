"""The multi-domain model: one timm backbone shared by all domains, plus per-domain parts.

``forward(images, domains)`` takes a domain index per image. Index -1 means "unknown domain" (a
held-out site, or a caller that does not know): the model then routes on its features, mixing the
per-domain parts by the image's similarity to each domain's feature prototype.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from mdcore.models.adapters import BottleneckAdapter, StageAdapterBank
from mdcore.models.domain_norm import DomainBatchNorm2d, Permute, Routed, convert_to_domain_bn, require_batchnorm
from mdcore.models.input_norm import InputNorm, check as check_input_norm
from mdcore.models.losses import load_balancing_loss
from mdcore.models.moe import MoEHead
from mdcore.models.packaged_weights import create_packaged_backbone, is_packaged
from mdcore.models.packaged_weights import provenance as packaged_provenance
from mdcore.data.decode import DEFAULT_RESIZE, resize_filter
from mdcore.data.io import atomic_dir

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
STARTING_WEIGHTS = "starting_weights.json"  # where the backbone started: package, file, hub tag or random


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model without the training code (saved as config.json)."""

    backbone: str
    domains: list[str]
    classes: list[str]
    image_size: int = 32
    resize: str = DEFAULT_RESIZE  # PIL filter from the file to image_size: the starting weights' (timm interpolation)
    adapters: bool = True
    adapter_dim: int = 64
    routing_temperature: float = 0.1
    input_norm: str = "image"  # "image": standardize each image; "pretrained": timm mean/std below; "none"
    input_mean: list[float] | None = None  # input_norm "pretrained": timm pretrained_cfg mean (pixels in 0..1)
    input_std: list[float] | None = None
    backbone_kwargs: dict = field(default_factory=dict)
    # per-domain components inside the backbone (all off by default, so older configs load unchanged)
    stage_adapters: list[int] = field(default_factory=list)  # feature_info indices hosting conv adapters
    stage_adapter_dim: int = 16
    domain_bn: bool = False  # per-domain batch-norm statistics and affine
    # head: "linear", or "moe" (experts gated by features + domain embedding)
    head: str = "linear"
    moe_experts: int = 4
    domain_embed_dim: int = 16
    proj_dim: int = 0  # > 0: per-domain projection heads (the supcon method's loss reads their output)
    moe_balance_weight: float = 0.0  # the moe head's load-balancing term in training (0 = off)

    # loss weights that older configs carried; the methods own their losses now (ignored on load)
    RETIRED = ("supcon_weight", "supcon_temperature", "align", "align_weight")

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        known = {f for f in cls.__dataclass_fields__}
        data = {k: v for k, v in data.items() if k not in cls.RETIRED}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"model config has unknown fields {unknown}; known: {sorted(known)}")
        return cls(**data)


WEIGHT_FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def create_backbone(name: str, weights: str | None = None, **kwargs) -> nn.Module:
    """Any timm model as a pooled feature extractor: random init, or pretrained ``weights``.

    ``weights`` is a file (safetensors, or a PyTorch state dict read with ``weights_only=True``), a timm
    pretrained tag of ``name`` ("default", or e.g. "a1_in1k"; both through timm's own loading, which drops
    classifier heads and adapts the input channels), or weights installed with a package ("imagenet",
    "package:NAME": ``mdcore.models.packaged_weights``, offline)."""
    if name not in timm.list_models() and not timm.is_model(name):
        raise ValueError(f"unknown timm backbone {name!r}; see timm.list_models() for the known names")
    kind = weights_kind(weights)
    if kind == "random":
        return timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    if kind == "package":
        return create_packaged_backbone(name, weights, **kwargs)
    if kind == "file":
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"pretrain.backbone_weights: {path} is not a file")
        try:
            return timm.create_model(name, pretrained=True, num_classes=0,
                                     pretrained_cfg_overlay={"file": str(path)}, **kwargs)
        except RuntimeError as e:
            raise ValueError(f"pretrain.backbone_weights: {path} does not fit timm backbone {name!r}: {e}") from None
    tagged = name if weights == "default" else f"{name.split('.')[0]}.{weights}"
    try:
        return timm.create_model(tagged, pretrained=True, num_classes=0, **kwargs)
    except Exception as e:  # noqa: BLE001 - offline, unknown tag, hub error: one clear message
        from huggingface_hub.constants import HF_HUB_CACHE

        raise RuntimeError(
            f"pretrain.backbone_weights={weights!r}: timm could not load the pretrained weights of {tagged!r} "
            f"({type(e).__name__}: {str(e)[:200]}). timm downloads them from the Hugging Face hub into "
            f"{HF_HUB_CACHE}; on a machine without network, copy them there, or pass a file: "
            "backbone_weights: /path/to/weights.safetensors") from None



def weights_kind(weights: str | None) -> str:
    """random, file, package or timm-hub: how :func:`create_backbone` reads ``weights``."""
    if not weights:
        return "random"
    if is_packaged(weights):
        return "package"
    path = Path(weights).expanduser()
    return "file" if path.suffix in WEIGHT_FILE_SUFFIXES or path.exists() else "timm-hub"


def weights_provenance(weights: str | None, name: str, backbone: nn.Module) -> dict:
    """Where a backbone's starting weights came from, for the run record and the model card."""
    kind = weights_kind(weights)
    if kind == "random":
        return {"kind": "random"}
    if kind == "package":
        return packaged_provenance(weights, name)
    if kind == "file":
        path = Path(weights).expanduser()
        return {"kind": "file", "path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    return {"kind": "timm-hub", "tag": weights, "hf_hub_id": cfg.get("hf_hub_id"), "license": cfg.get("license")}

class MultiDomainModel(nn.Module):
    """Shared timm backbone + the per-domain parts ``config`` selects (see ``ModelConfig``).

    Per-domain parts inside the backbone (stage adapters, domain batch-norm) read a per-image routing
    matrix (N, D) that ``forward`` sets before the backbone runs: one-hot for known domains; for unknown
    ones, the softmax of the similarity between the image's *routing features* (the backbone with every
    domain mixed equally) and each domain's prototype.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        _check_config(config)
        self.config = config
        self.input_norm = InputNorm(config.input_norm, config.input_mean, config.input_std)
        self.backbone = create_backbone(config.backbone, **config.backbone_kwargs)
        dim = self.backbone.num_features
        n_domains, n_classes = len(config.domains), len(config.classes)
        if config.domain_bn:
            require_batchnorm(self.backbone, config.backbone)
            convert_to_domain_bn(self.backbone, n_domains, config.backbone)
        self.stage_adapters = None
        if config.stage_adapters:
            info = _feature_info(self.backbone, config.backbone)
            banks = {}
            for index in config.stage_adapters:
                if not -len(info) <= index < len(info):
                    raise ValueError(f"stage_adapters index {index} out of range: backbone {config.backbone!r} has "
                                     f"{len(info)} feature stages {[s['module'] for s in info]}")
                key = str(index % len(info))
                if key in banks:
                    raise ValueError(f"stage_adapters {config.stage_adapters} name stage {info[index]['module']!r} twice")
                banks[key] = StageAdapterBank(info[index]["num_chs"], config.stage_adapter_dim, n_domains)
                self.backbone.get_submodule(info[index]["module"]).register_forward_hook(banks[key].hook)
            self.stage_adapters = nn.ModuleDict(banks)
        self.adapters = (
            nn.ModuleList(BottleneckAdapter(dim, config.adapter_dim) for _ in range(n_domains))
            if config.adapters
            else None
        )
        if config.head == "moe":
            self.head = MoEHead(dim, n_classes, n_domains, config.moe_experts, config.domain_embed_dim)
        else:
            self.head = nn.Linear(dim, n_classes)
        self.projections = (
            nn.ModuleList(nn.Sequential(nn.Linear(dim, 128), nn.ReLU(), nn.Linear(128, config.proj_dim))
                          for _ in range(n_domains))
            if config.proj_dim > 0
            else None
        )
        # mean normalized routing feature of each domain, for routing images of unknown domain
        self.register_buffer("prototypes", torch.zeros(n_domains, dim))
        self._routed = [m for m in self.modules() if isinstance(m, Routed)]
        self.frozen_norms: list[nn.Module] = []  # batch-norm layers of frozen stages: statistics frozen too

    def train(self, mode: bool = True) -> "MultiDomainModel":
        """Like ``nn.Module.train``, but batch-norm layers of frozen stages stay in eval mode, so their
        running statistics stay those of the weights they belong to."""
        super().train(mode)
        for m in self.frozen_norms:
            m.eval()
        return self

    def no_weight_decay(self) -> set[str]:
        """Names of the parameters exempt from weight decay; timm's optimizer factory reads this set, with
        and without layer decay. timm already exempts 1-D parameters (and, without layer decay only, names
        ending in ``.bias``), but the per-domain parts hold one row per domain, so they are 2-D and its rule
        misses them: this lists every bias (``bias`` or ``*_bias``: the stage adapters' per-domain bias
        rows), every norm layer's parameters (per-domain batch-norm included), every embedding (the MoE
        head's domain embedding, ``nn.Embedding``, tokens) and what the backbone itself exempts (a ViT's
        position embedding and class token)."""
        names = {f"backbone.{n}" for n in getattr(self.backbone, "no_weight_decay", set)()}
        for module_name, module in self.named_modules():
            for leaf, _ in module.named_parameters(recurse=False):
                if no_weight_decay_param(module, leaf):
                    names.add(f"{module_name}.{leaf}" if module_name else leaf)
        return names

    @property
    def num_features(self) -> int:
        return self.backbone.num_features

    @property
    def routes_inside_backbone(self) -> bool:
        return bool(self._routed)

    def _backbone(self, images: torch.Tensor, weights: torch.Tensor | None,
                  domains: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled features. ``domains`` (every image's known domain; ``weights`` their one-hot rows) lets
        training on CPU run the batch in domain order: per-domain batch-norm then normalizes contiguous
        slices with torch's kernel, and the order is undone once on the pooled features (not at every
        layer). On CUDA the routed computation stays (the one measured on the H200)."""
        images = self.input_norm(images)
        if not self._routed:
            return self.backbone(images)
        if weights is None:  # routing features: every domain's parts mixed equally
            n_domains = len(self.config.domains)
            weights = images.new_full((images.shape[0], n_domains), 1.0 / n_domains)
        groups = inverse = None
        if domains is not None and self.training and images.device.type == "cpu" and len(domains):
            order = torch.argsort(domains, stable=True)
            inverse = torch.argsort(order)
            groups = torch.bincount(domains, minlength=len(self.config.domains)).tolist()
            images, weights = Permute.apply(images, order, inverse), weights[order]
        for m in self._routed:
            m.set_route(weights, groups)
        try:
            feats = self.backbone(images)
        finally:
            for m in self._routed:
                m.set_route(None)
        return feats if inverse is None else Permute.apply(feats, inverse, order)

    def features(self, images: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled backbone features; with no ``weights`` the routing features (domains mixed equally)."""
        return self._backbone(images, weights)

    def domain_weights(self, feats: torch.Tensor, domains: torch.Tensor) -> torch.Tensor:
        """(N, D) mixing weights: one-hot for known domains, prototype similarity for unknown ones."""
        n_domains = len(self.config.domains)
        known = domains >= 0
        weights = F.one_hot(domains.clamp(min=0), n_domains).to(feats.dtype)
        if not bool(known.all()):
            sims = F.normalize(feats.detach().float(), dim=1) @ F.normalize(self.prototypes, dim=1).T
            soft = torch.softmax(sims / self.config.routing_temperature, dim=1).to(feats.dtype)
            weights = torch.where(known[:, None], weights, soft)
        return weights

    def adapt(self, feats: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if self.adapters is None:
            return feats
        # every adapter sees every image (cheap on pooled features) so each gets a gradient each step,
        # which keeps DDP's reducer happy without find_unused_parameters
        outs = torch.stack([adapter(feats) for adapter in self.adapters], dim=1)  # N, D, F
        return (weights[..., None].to(outs.dtype) * outs).sum(dim=1)

    def route_and_embed(self, images: torch.Tensor, domains: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(adapted features, routing weights) of a batch."""
        if not self._routed:
            feats = self._backbone(images, None)
            weights = self.domain_weights(feats, domains)
        else:
            known = domains >= 0
            if bool(known.all()):
                weights = F.one_hot(domains, len(self.config.domains)).to(images.dtype)
            else:  # a first pass with every domain mixed equally gives the routing features
                weights = self.domain_weights(self._backbone(images, None), domains)
            feats = self._backbone(images, weights, domains if bool(known.all()) else None)
        return self.adapt(feats, weights), weights

    def forward(self, images: torch.Tensor, domains: torch.Tensor | None = None, return_outputs: bool = False):
        """Logits; with ``return_outputs`` also what training losses read (``mdcore.methods`` own them):
        ``features`` (adapted, pooled), ``routing`` (N, D domain weights), ``projection`` (the per-domain
        projection heads' output, when the config has them) and ``terms``, the parts' own weighted
        regularizers (the moe head's load balancing). Computed here, inside forward, where DDP sees them.
        """
        if domains is None:
            domains = torch.full((images.shape[0],), -1, dtype=torch.long, device=images.device)
        z, weights = self.route_and_embed(images, domains)
        gate = None
        if isinstance(self.head, MoEHead):
            logits, gate = self.head(z, weights, return_gate=True)
        else:
            logits = self.head(z)
        if not return_outputs:
            return logits
        outputs = {"features": z, "routing": weights, "terms": {}}
        if gate is not None and self.config.moe_balance_weight > 0:
            outputs["terms"]["moe_balance"] = self.config.moe_balance_weight * load_balancing_loss(gate)
        if self.projections is not None:
            proj = torch.stack([p(z) for p in self.projections], dim=1)  # N, D, P: all heads in the graph
            outputs["projection"] = (weights[..., None].to(proj.dtype) * proj).sum(dim=1)
        return logits, outputs

    @torch.no_grad()
    def fit_prototypes(self, images: torch.Tensor, domains: torch.Tensor, batch_size: int = 256) -> None:
        """Set each domain's prototype to the mean normalized feature of its images."""
        was_training = self.training
        self.eval()
        sums = torch.zeros_like(self.prototypes)
        counts = torch.zeros(len(self.config.domains), device=sums.device)
        for start in range(0, len(images), batch_size):
            x = images[start : start + batch_size]
            if x.dtype == torch.uint8:  # raw images (in memory or decoded on demand): the loader's scaling
                from mdcore.data.images import to_float

                x = to_float(x)
            feats = F.normalize(self.features(x.to(sums.device)).float(), dim=1)
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


NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, DomainBatchNorm2d)


def no_weight_decay_param(module: nn.Module, name: str) -> bool:
    """Whether ``module``'s own parameter ``name`` takes no weight decay, whatever its shape: a bias
    (``bias``, ``*_bias``), a norm layer's parameter (torch's and timm's norm layers, per-domain batch-norm),
    an embedding (``nn.Embedding``, ``*embed*``) or a token (``*_token``)."""
    return (name == "bias" or name.endswith("_bias") or "embed" in name or name.endswith("_token")
            or isinstance(module, NORM_LAYERS + (nn.Embedding, nn.EmbeddingBag)) or "Norm" in type(module).__name__)


def _check_config(config: ModelConfig) -> None:
    check_input_norm(config.input_norm, config.input_mean, config.input_std)
    resize_filter(config.resize, "model config resize")
    if config.head not in ("linear", "moe"):
        raise ValueError(f"model config head={config.head!r}: expected 'linear' or 'moe'")


def _feature_info(backbone: nn.Module, name: str) -> list[dict]:
    info = getattr(backbone, "feature_info", None)
    if not info:
        raise ValueError(f"stage adapters need timm feature_info, which backbone {name!r} does not provide")
    return [dict(s) for s in info]


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
