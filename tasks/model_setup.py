"""Building the multi-domain model and its optimizer from finetune params: one place, used by every
Ray worker (and by experiments), so the model side can grow without touching the Ray plumbing."""
from __future__ import annotations

import torch
from safetensors.torch import load_file
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler

from mdcore.images import ImageSet
from mdcore.model import ModelConfig, MultiDomainModel
from tasks.params import FinetuneParams


def build_model(p: FinetuneParams, train: ImageSet, backbone: str, image_size: int,
                backbone_weights: str | None = None) -> MultiDomainModel:
    config = ModelConfig(backbone=backbone, domains=train.domain_names, classes=train.class_names,
                         image_size=image_size, adapters=p.adapters, adapter_dim=p.adapter_dim)
    model = MultiDomainModel(config)
    if backbone_weights:
        model.load_backbone(load_file(backbone_weights))
    return model


def build_optimizer(p: FinetuneParams, model: MultiDomainModel):
    """timm's optimizer factory (layer-wise lr decay included) and a cosine schedule stepped per epoch."""
    optimizer = create_optimizer_v2(model, "adamw", lr=p.lr, weight_decay=p.weight_decay, layer_decay=p.layer_decay)
    scheduler = CosineLRScheduler(optimizer, t_initial=p.epochs, warmup_t=1 if p.epochs > 2 else 0,
                                  warmup_lr_init=p.lr * 0.1, lr_min=p.lr * 0.01)
    return optimizer, scheduler


def on_epoch_start(p: FinetuneParams, model: MultiDomainModel, optimizer: torch.optim.Optimizer, epoch: int) -> None:
    """Hook for schedules that change the model between epochs (freezing, gradual unfreezing)."""


def needs_find_unused_parameters(p: FinetuneParams) -> bool:
    """Whether DDP must tolerate parameters without a gradient in a step (frozen or unused parts)."""
    return False


def epoch_kwargs(p: FinetuneParams, train: ImageSet) -> dict:
    """Extra keyword arguments for ``mdcore.train.finetune_epoch`` derived from the params."""
    return {}
