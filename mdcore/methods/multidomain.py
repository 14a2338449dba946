"""The multi-domain model: per-image standardization, mild augmentation, plus the per-domain parts the
finetune params switch on (domain batch-norm, adapters, expert routing, contrastive and alignment losses)."""
from __future__ import annotations

from mdcore.synth.augment import train_view
from mdcore.methods.base import ERM, register_method


@register_method
class MultiDomain(ERM):
    """Shared timm backbone with per-domain normalization and adapters (Chang et al., 2019; Rebuffi et
    al., 2017), inputs standardized per image, unknown domains routed on their features."""

    name = "multidomain"
    per_domain_parts = True
    input_norm = "image"

    def augment(self, x, g):
        """Mild, label-preserving geometric and photometric jitter (``mdcore.synth.augment.train_view``)."""
        return train_view(super().augment(x, g), g)
