"""Supervised contrastive learning across domains (Khosla et al., 2020): images of the same class are
positives whatever their domain, so same-class images of other domains are pulled together in the space of
the model's per-domain projection heads (which this method asks the model to host, ``proj_dim``)."""
from __future__ import annotations

import dataclasses

from mdcore.methods.base import ERM, register_method
from mdcore.models.losses import supcon_loss


@register_method
class SupCon(ERM):
    """Cross-entropy + ``supcon_weight`` x the supervised contrastive loss on the projected features."""

    name = "supcon"

    @dataclasses.dataclass
    class Hparams:
        supcon_weight: float = 0.1
        supcon_temperature: float = 0.1
        proj_dim: int = 64  # output size of the per-domain projection heads

    def configure(self, cfg: dict) -> dict:
        return super().configure(cfg) | {"proj_dim": int(self.hparams["proj_dim"])}

    def loss(self, batch, logits, outputs):
        loss, terms = super().loss(batch, logits, outputs)
        if "projection" not in outputs:
            raise ValueError("method 'supcon' needs the model's projection heads (ModelConfig.proj_dim > 0)")
        h = self.hparams
        term = h["supcon_weight"] * supcon_loss(outputs["projection"], batch.labels, batch.domains,
                                                h["supcon_temperature"])
        return loss + term, terms | {"supcon": term}
