"""Building the multi-domain model and its optimizer from finetune params: one place, used by every
Ray worker (and by experiments such as flows/ablation.py), so the model side can grow without touching
the Ray plumbing.

Order on a worker: ``build_model`` -> ``build_optimizer`` -> wrap (DDP, with
``find_unused_parameters=needs_find_unused_parameters(p)``) -> every epoch ``scheduler.step(epoch)``,
``on_epoch_start(...)`` (freezing schedule), ``finetune_epoch(..., **epoch_kwargs(p, train))``.
Freezing happens in ``on_epoch_start``, *after* the model is wrapped, so DDP registers every parameter
and a stage unfrozen later is still synchronized.
"""
from __future__ import annotations

import math
from dataclasses import asdict

import torch
from safetensors.torch import load_file
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler

from mdcore.images import ImageSet
from mdcore.methods import Method, create_method
from mdcore.model import ModelConfig, MultiDomainModel
from mdcore.transfer import DomainWeighting, EarlyStopping, apply_freezing, backbone_groups, frozen_group_count
from tasks.params import FinetuneParams


def build_method(p: FinetuneParams) -> Method:
    """The domain-generalization method the params name (one object per training run: it carries state)."""
    return create_method(p.method, p.method_hparams)


def model_config(p: FinetuneParams, domains: list[str], classes: list[str], backbone: str,
                 image_size: int, weights_norm: dict | None = None) -> ModelConfig:
    """The ModelConfig the finetune params select: the per-domain parts and the weights of their losses,
    as the method keeps or removes them (``erm`` and its children have none, and no standardization).

    ``weights_norm``: the starting weights' pretrained_cfg mean/std (``mdcore.input_norm.recorded_norm``);
    with ``input_norm: auto`` the model then normalizes with it instead of the method's own choice."""
    from mdcore.input_norm import resolve

    method = create_method(p.method, p.method_hparams)
    cfg = method.configure(asdict(_component_config(p, domains, classes, backbone, image_size)))
    kind, mean, std = resolve(p.input_norm, weights_norm, cfg["input_norm"], backbone, "finetune.input_norm")
    return ModelConfig(**(cfg | {"input_norm": kind, "input_mean": mean, "input_std": std}))


def _component_config(p: FinetuneParams, domains: list[str], classes: list[str], backbone: str,
                      image_size: int) -> ModelConfig:
    return ModelConfig(
        backbone=backbone, domains=list(domains), classes=list(classes), image_size=image_size,
        adapters=p.adapters, adapter_dim=p.adapter_dim,
        stage_adapters=list(p.stage_adapters), stage_adapter_dim=p.stage_adapter_dim, domain_bn=p.domain_bn,
        head=p.head, moe_experts=p.moe_experts, moe_balance_weight=p.moe_balance_weight if p.head == "moe" else 0.0,
        proj_dim=p.proj_dim if p.supcon_weight > 0 else 0, supcon_weight=p.supcon_weight,
        supcon_temperature=p.supcon_temperature, align=p.align if p.align_weight > 0 else "none",
        align_weight=p.align_weight if p.align != "none" else 0.0,
    )


def build_model(p: FinetuneParams, train: ImageSet, backbone: str, image_size: int,
                backbone_weights: str | None = None, method: Method | None = None) -> MultiDomainModel:
    """The model of the params; ``method`` (from :func:`build_method`) attaches its training-only hooks.
    A ``backbone_weights`` file exported by the pretrain stage brings its recorded pretrained_cfg along."""
    from mdcore.input_norm import recorded_norm

    model = MultiDomainModel(model_config(p, train.domain_names, train.class_names, backbone, image_size,
                                          recorded_norm(backbone_weights)))
    if backbone_weights:
        model.load_backbone(load_file(backbone_weights))
    if method is not None:
        method.attach(model)
    return model


def build_optimizer(p: FinetuneParams, model: MultiDomainModel, warmup_epochs: int | None = None):
    """timm's optimizer factory (layer-wise lr decay included) over *every* parameter (frozen ones get no
    gradient, so AdamW leaves them alone until they are unfrozen), and timm's cosine schedule stepped per
    epoch, with warm restarts when ``lr_cycles`` > 1. AdamW runs fused (one kernel over all tensors, on CPU
    and CUDA): 5.8 instead of 29 ms per step for the default model on 2 cores (BENCHMARKS.md).
    ``warmup_epochs``: epochs at 0.1 x lr first; default one when there are more than 2 epochs (a model
    that is already trained, as in a continual-learning step, may need none)."""
    optimizer = create_optimizer_v2(model, "adamw", lr=p.lr, weight_decay=p.weight_decay, layer_decay=p.layer_decay,
                                    fused=True)
    cycles = p.lr_cycles
    if cycles == 1:
        t_initial = p.epochs
    elif p.lr_cycle_mul == 1.0:
        t_initial = math.ceil(p.epochs / cycles)
    else:  # t + t*m + ... + t*m^(c-1) = epochs
        t_initial = max(1, round(p.epochs * (p.lr_cycle_mul - 1) / (p.lr_cycle_mul ** cycles - 1)))
    if warmup_epochs is None:
        warmup_epochs = 1 if p.epochs > 2 else 0
    scheduler = CosineLRScheduler(optimizer, t_initial=t_initial, warmup_t=warmup_epochs,
                                  warmup_lr_init=p.lr * 0.1, lr_min=p.lr * 0.01, cycle_mul=p.lr_cycle_mul,
                                  cycle_decay=p.lr_cycle_decay, cycle_limit=cycles)
    return optimizer, scheduler


def unwrap(model: torch.nn.Module) -> MultiDomainModel:
    """The MultiDomainModel inside DDP / FastForward / torch.compile wrappers."""
    seen = 0
    while not isinstance(model, MultiDomainModel) and seen < 8:
        inner = getattr(model, "module", None)
        if inner is None:
            inner = getattr(model, "_orig_mod", None)
        model = model if inner is None else inner
        seen += 1
    if not isinstance(model, MultiDomainModel):
        raise TypeError(f"expected a MultiDomainModel (possibly wrapped), got {type(model).__name__}")
    return model


def on_epoch_start(p: FinetuneParams, model: torch.nn.Module, optimizer: torch.optim.Optimizer, epoch: int) -> dict:
    """Apply the freezing schedule for ``epoch`` (freeze_stages, adapters_only, gradual unfreezing).
    Call it after wrapping the model in DDP. Returns what is frozen (for logging)."""
    model = unwrap(model)
    if not _freezes(p):
        return {}
    n_groups = len(backbone_groups(model.backbone))
    n_frozen = frozen_group_count(epoch, n_groups, p.freeze_stages, p.adapters_only, p.gradual_unfreeze_every)
    return apply_freezing(model, n_frozen)


def _freezes(p: FinetuneParams) -> bool:
    return p.adapters_only or p.freeze_stages > 0 or p.gradual_unfreeze_every > 0


def needs_find_unused_parameters(p: FinetuneParams) -> bool:
    """Whether DDP must tolerate parameters without a gradient in a step: frozen or later-unfrozen stages.
    Per-domain parts need not: they mix every domain's weights through the routing matrix, so each gets a
    (possibly zero) gradient every step."""
    return _freezes(p)


def domain_weighting(p: FinetuneParams, train: ImageSet) -> DomainWeighting | None:
    if p.domain_weighting == "uniform" and p.curriculum == "none":
        return None
    n = len(train.domain_names)
    counts = torch.bincount(train.domains[train.domains >= 0], minlength=n)
    return DomainWeighting(n, p.domain_weighting, counts, eta=p.groupdro_eta, curriculum=p.curriculum,
                           curriculum_epochs=p.curriculum_epochs)


def epoch_kwargs(p: FinetuneParams, train: ImageSet) -> dict:
    """Extra keyword arguments for ``mdcore.train.finetune_epoch`` derived from the params. Call it once
    before the epoch loop: the returned objects carry state across epochs (GroupDRO weights, the
    curriculum's running per-domain losses)."""
    weighting = domain_weighting(p, train)
    return {} if weighting is None else {"domain_weighting": weighting}


def early_stopping(p: FinetuneParams) -> EarlyStopping:
    """Early stopping on training-domain validation accuracy (never stops when patience is 0)."""
    return EarlyStopping(p.early_stopping_patience, p.early_stopping_min_delta, mode="max")
