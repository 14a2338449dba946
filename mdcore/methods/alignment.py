"""Feature alignment between training domains as methods: Deep CORAL (Sun & Saenko, 2016) matches the
domains' feature covariances and means; MMD (Li et al., 2018, MMD-AAE) matches their kernel embeddings.
The penalty is computed on the adapted, pooled features of each batch, pairwise between its domains."""
from __future__ import annotations

import dataclasses

from mdcore.methods.base import ERM, register_method
from mdcore.models.losses import domain_alignment


@register_method
class CORAL(ERM):
    """Cross-entropy + ``align_weight`` x the CORAL distance between every pair of domains in the batch."""

    name = "coral"
    kind = "coral"

    @dataclasses.dataclass
    class Hparams:
        align_weight: float = 0.1

    def loss(self, batch, logits, outputs):
        loss, terms = super().loss(batch, logits, outputs)
        term = self.hparams["align_weight"] * domain_alignment(outputs["features"], batch.domains, self.kind)
        return loss + term, terms | {"align": term}


@register_method
class MMD(CORAL):
    """Cross-entropy + ``align_weight`` x the multi-kernel MMD between every pair of domains in the batch."""

    name = "mmd"
    kind = "mmd"
