"""Per-domain loss weighting: uniform, inverse frequency, GroupDRO, and a domain curriculum."""
from __future__ import annotations

import torch


class DomainWeighting:
    """Per-sample loss weights from each image's domain.

    ``mode``: ``uniform`` (plain mean), ``inverse_frequency`` (weight ∝ 1 / the domain's share of the
    training set), ``groupdro`` (Sagawa et al., 2020: exponentiated-gradient weights q_d ∝ q_d·exp(eta·loss_d)
    that up-weight the worst domain). ``curriculum="easy_first"`` multiplies in weights that favour the
    domains with the lowest running loss and fade to 1 over ``curriculum_epochs`` epochs.
    The loss is sum_n w_n l_n / sum_n w_n. Per-domain losses are all-reduced over DDP workers (when
    ``torch.distributed`` is initialized) so every worker holds the same state.
    """

    MODES = ("uniform", "inverse_frequency", "groupdro")
    CURRICULA = ("none", "easy_first")

    def __init__(self, n_domains: int, mode: str = "uniform", counts: torch.Tensor | None = None,
                 eta: float = 0.1, curriculum: str = "none", curriculum_epochs: int = 5, ema: float = 0.9):
        if mode not in self.MODES:
            raise ValueError(f"domain weighting {mode!r}: expected one of {self.MODES}")
        if curriculum not in self.CURRICULA:
            raise ValueError(f"domain curriculum {curriculum!r}: expected one of {self.CURRICULA}")
        self.n_domains, self.mode, self.eta, self.curriculum = n_domains, mode, eta, curriculum
        self.curriculum_epochs, self.ema = max(curriculum_epochs, 1), ema
        counts = torch.ones(n_domains) if counts is None else counts.float().clamp(min=1)
        self.inverse_frequency = (counts.sum() / counts) / (counts.sum() / counts).mean()
        self.q = torch.full((n_domains,), 1.0 / n_domains)  # GroupDRO weights
        self.running_loss = torch.full((n_domains,), float("nan"))  # EMA per domain (difficulty)

    def domain_weights(self, epoch: int) -> torch.Tensor:
        """(D,) weight of each domain this epoch (before the per-batch GroupDRO normalization)."""
        if self.mode == "inverse_frequency":
            w = self.inverse_frequency.clone()
        elif self.mode == "groupdro":
            w = self.q * self.n_domains
        else:
            w = torch.ones(self.n_domains)
        if self.curriculum == "easy_first" and not torch.isnan(self.running_loss).all():
            loss = torch.nan_to_num(self.running_loss, nan=float(self.running_loss.nanmean()))
            easy = (1 / loss.clamp(min=1e-3)) / (1 / loss.clamp(min=1e-3)).mean()
            a = min(1.0, epoch / self.curriculum_epochs)
            w = w * ((1 - a) * easy + a)
        return w

    def sample_weights(self, domains: torch.Tensor, epoch: int) -> torch.Tensor:
        w = self.domain_weights(epoch).to(domains.device)
        if self.mode == "groupdro":  # q_d spread over the batch's images of d: sum_d q_d * mean loss_d
            counts = torch.bincount(domains, minlength=self.n_domains).clamp(min=1).float()
            w = w / counts
        return w[domains]

    @torch.no_grad()
    def update(self, per_sample_loss: torch.Tensor, domains: torch.Tensor) -> None:
        # reduced on the loss's device: NCCL (GPU workers) rejects CPU tensors, gloo takes CPU ones
        device = per_sample_loss.device
        sums = torch.zeros(self.n_domains, dtype=torch.float64, device=device).index_add_(
            0, domains.to(device), per_sample_loss.detach().double())
        counts = torch.bincount(domains.to(device), minlength=self.n_domains).double()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            both = torch.cat([sums, counts])
            torch.distributed.all_reduce(both)
            sums, counts = both[: self.n_domains], both[self.n_domains:]
        sums, counts = sums.cpu(), counts.cpu()
        present = counts > 0
        mean = (sums / counts.clamp(min=1)).float()
        if self.mode == "groupdro":
            self.q[present] *= torch.exp(self.eta * mean[present])
            self.q /= self.q.sum()
        first = torch.isnan(self.running_loss) & present
        self.running_loss[first] = mean[first]
        later = present & ~first
        self.running_loss[later] = self.ema * self.running_loss[later] + (1 - self.ema) * mean[later]
