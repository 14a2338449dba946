"""Per-domain loss weighting as methods: GroupDRO (Sagawa et al., 2020, "Distributionally Robust Neural
Networks"): exponentiated-gradient domain weights that up-weight the worst training domain; also the
inverse-frequency weighting and the easy-first domain curriculum (``mdcore.methods.weighting``)."""
from __future__ import annotations

import dataclasses

import torch

from mdcore.methods.base import ERM, register_method
from mdcore.methods.weighting import DomainWeighting
from mdcore.models.losses import classification_loss


@register_method
class DomainWeighted(ERM):
    """Each image's cross-entropy weighted by its domain: ``weighting`` is ``groupdro``,
    ``inverse_frequency`` or ``uniform``, optionally with the ``easy_first`` curriculum. The weights need
    the training domains' sizes: :meth:`bind` before training (``fit`` does)."""

    name = "reweight"

    @dataclasses.dataclass
    class Hparams:
        weighting: str = "inverse_frequency"
        groupdro_eta: float = 0.1
        curriculum: str = "none"
        curriculum_epochs: int = 5

    weighting: DomainWeighting | None = None

    def bind(self, domains: torch.Tensor, n_domains: int) -> None:
        """Size the weights from the training images' domain indices (once per run, before training)."""
        super().bind(domains, n_domains)
        counts = torch.bincount(domains[domains >= 0], minlength=n_domains)
        h = self.hparams
        self.weighting = DomainWeighting(n_domains, h["weighting"], counts, eta=h["groupdro_eta"],
                                         curriculum=h["curriculum"], curriculum_epochs=h["curriculum_epochs"])

    def loss(self, batch, logits, outputs):
        if self.weighting is None:
            raise ValueError(f"method {self.name!r}: call bind(train.domains, n_domains) before training")
        per_sample = classification_loss(logits, batch.labels, batch.label_smoothing, reduction="none",
                                         weight=batch.class_weight, logit_offset=batch.logit_offset)
        w = self.weighting.sample_weights(batch.domains, batch.epoch).to(per_sample)
        loss = (w * per_sample).sum() / w.sum().clamp(min=1e-12)
        self.weighting.update(per_sample, batch.domains)
        return self.plus_terms(loss, outputs)

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.weighting is not None:
            state["weighting/q"] = self.weighting.q.clone()
            state["weighting/running_loss"] = self.weighting.running_loss.clone()
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self.weighting is not None and "weighting/q" in state:
            self.weighting.q = state["weighting/q"].float().clone()
            self.weighting.running_loss = state["weighting/running_loss"].float().clone()


@register_method
class GroupDRO(DomainWeighted):
    """GroupDRO (Sagawa et al., 2020): minimize the worst domain's loss through adaptive domain weights."""

    name = "groupdro"

    @dataclasses.dataclass
    class Hparams:
        weighting: str = "groupdro"
