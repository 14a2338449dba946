"""Knowledge distillation (Hinton et al., 2015) from the multi-domain teacher into a smaller model: a
student on a smaller timm backbone with the teacher's per-domain parts, or the teacher after channel
pruning (its recovery fine-tune). One loop for both: ``mdcore.train.fit`` with the ``distill`` method."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler

from mdcore.data.images import ImageSet
from mdcore.methods import create_method
from mdcore.models.model import ModelConfig, MultiDomainModel
from mdcore.train import FitConfig, Runtime, fit


@dataclass
class DistillConfig:
    epochs: int = 2
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    kd_weight: float = 1.0
    kd_temperature: float = 4.0
    label_smoothing: float = 0.1
    seed: int = 0


def student_model(teacher: MultiDomainModel, backbone: str, backbone_kwargs: dict | None = None) -> MultiDomainModel:
    """A fresh model with the teacher's domains, classes and per-domain parts on another timm backbone
    (random init: nothing is downloaded). A backbone that cannot host them is refused by the model."""
    data = asdict(teacher.config) | {"backbone": backbone, "backbone_kwargs": dict(backbone_kwargs or {}), "proj_dim": 0}
    return MultiDomainModel(ModelConfig.from_dict(data))


def distill(student: MultiDomainModel, teacher: MultiDomainModel, train: ImageSet, cfg: DistillConfig,
            device: torch.device | str = "cpu") -> list[dict]:
    """Train ``student`` on ``train`` (seen domains, domain-balanced batches) with cross-entropy plus
    ``kd_weight`` x KL towards the teacher's logits on the same augmented images; then refit its
    unknown-domain prototypes on ``train``. Returns the per-epoch training stats.

    Both models train on ``device`` and come back to the CPU (export, int8 and scoring run there)."""
    if (train.domains < 0).any():
        raise ValueError("distillation data must come from seen domains (domain index >= 0)")
    try:
        student.to(device)
        teacher.to(device)
        return _distill(student, teacher, train, cfg, device)
    finally:
        student.cpu()
        teacher.cpu()


def _distill(student, teacher, train: ImageSet, cfg: DistillConfig, device) -> list[dict]:
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    method = create_method("multidomain+distill", {"kd_weight": cfg.kd_weight, "kd_temperature": cfg.kd_temperature})
    method.teacher = teacher
    optimizer = create_optimizer_v2(student, "adamw", lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = CosineLRScheduler(optimizer, t_initial=max(cfg.epochs, 1), lr_min=cfg.lr * 0.01)
    # no validation split here: the last epoch ships (compress accepts or rejects the variant on its own split)
    config = FitConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, seed=cfg.seed,
                       label_smoothing=cfg.label_smoothing, select=False)
    result = fit(student, method, train, None, config, optimizer, scheduler, runtime=Runtime(device))
    student.eval()
    return result.history
