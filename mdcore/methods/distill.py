"""Knowledge distillation (Hinton et al., 2015): cross-entropy plus ``kd_weight`` x the KL divergence
towards a teacher's softened logits on the same images. The teacher is set on the method before training
(``method.teacher = model``): the pruned model's recovery, a student, or the champion whose answers on
replayed images a continual step keeps (``kd_domains``: only images of the teacher's own domains)."""
from __future__ import annotations

import dataclasses

import torch

from mdcore.methods.base import ERM, register_method
from mdcore.models.losses import distillation_loss


@register_method
class Distill(ERM):
    """Distillation towards ``self.teacher`` (frozen, eval mode), composable with any other method."""

    name = "distill"

    @dataclasses.dataclass
    class Hparams:
        kd_weight: float = 1.0
        kd_temperature: float = 4.0
        kd_domains: int | None = None  # distil only images of domains 0 .. kd_domains - 1 (None: all)

    teacher: torch.nn.Module | None = None

    def loss(self, batch, logits, outputs):
        loss, terms = super().loss(batch, logits, outputs)
        if self.teacher is None:
            raise ValueError("method 'distill' needs a teacher: set method.teacher before training")
        if self.hparams["kd_weight"] <= 0:
            return loss, terms
        self.teacher.eval()
        n = self.hparams["kd_domains"]
        rows = slice(None) if n is None else (batch.domains < n).nonzero().flatten()
        if n is not None and not len(rows):
            return loss, terms
        with torch.no_grad():
            target = self.teacher(batch.images[rows], batch.domains[rows])
        kd = self.hparams["kd_weight"] * distillation_loss(logits[rows], target, self.hparams["kd_temperature"])
        return loss + kd, terms | {"kd": kd}
