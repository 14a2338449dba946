"""Self-supervised contrastive pretraining (SimCLR) of the backbone: the pretrain stage's loop."""
from __future__ import annotations

import torch
from torch import nn

from mdcore.synth.augment import fourier_domain_mix, ssl_view
from mdcore.data.images import to_float
from mdcore.models.losses import nt_xent
from mdcore.train.epoch import shard_batches


class ContrastiveNet(nn.Module):
    """Backbone + MLP projector for SimCLR; only the backbone is kept after pretraining."""

    def __init__(self, backbone: nn.Module, proj_dim: int = 128, input_norm="image"):
        """``input_norm``: a kind name or an ``mdcore.models.input_norm.InputNorm`` (what the fine-tuned model will use)."""
        super().__init__()
        from mdcore.models.input_norm import as_norm

        self.backbone = backbone
        self.input_norm = as_norm(input_norm)
        dim = backbone.num_features
        self.projector = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, proj_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the same input path as MultiDomainModel.features
        return self.projector(self.backbone(self.input_norm(x)))


def contrastive_epoch(
    net: ContrastiveNet,
    images: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    batch_size: int,
    epoch: int,
    seed: int,
    temperature: float,
    domains: torch.Tensor | None = None,
    fourier_mix_prob: float = 0.0,
    fourier_mix_strength: float = 1.0,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """One SimCLR epoch (views drawn on ``device``, their random parameters from the seeded generator; see
    ``mdcore.synth.augment.randn_like_on_device`` for the per-pixel noise). With ``domains`` and ``fourier_mix_prob`` > 0 each view first gets, with that
    probability per image, the Fourier amplitude spectrum of an image of *another* domain mixed in
    (a domain-aware view: the positives differ by domain style, not only by generic jitter)."""
    net.train()
    g = torch.Generator().manual_seed(seed * 104_729 + epoch)
    total, steps = 0.0, 0
    for idx in shard_batches(len(images), batch_size, epoch=epoch, seed=seed):
        x = to_float(images[idx].to(device))

        def view():
            v = x
            if domains is not None and fourier_mix_prob > 0:
                v = fourier_domain_mix(v, domains[idx], g, p=fourier_mix_prob, strength=fourier_mix_strength)
            return ssl_view(v, g)

        loss = nt_xent(net(view()), net(view()), temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += float(loss.detach())
        steps += 1
    return {"ssl_loss": total / max(steps, 1)}


def self_supervised(backbone: nn.Module, images: torch.Tensor, *, input_norm, epochs: int, batch_size: int,
                    lr: float, weight_decay: float, seed: int, temperature: float,
                    domains: torch.Tensor | None = None, fourier_mix_prob: float = 0.0,
                    fourier_mix_strength: float = 1.0, device: torch.device | str = "cpu",
                    on_epoch=None) -> list[dict[str, float]]:
    """``epochs`` of SimCLR on ``images`` (labels unused), training ``backbone`` in place through a fresh
    projector; the projector is dropped. The pretrain stage and the benches that continue pretraining call
    this one loop. ``on_epoch(epoch, stats)`` is called after each epoch (logging). Returns each epoch's stats."""
    net = ContrastiveNet(backbone, input_norm=input_norm).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    history = []
    for epoch in range(epochs):
        stats = contrastive_epoch(net, images, optimizer, batch_size=batch_size, epoch=epoch, seed=seed,
                                  temperature=temperature, domains=domains, fourier_mix_prob=fourier_mix_prob,
                                  fourier_mix_strength=fourier_mix_strength, device=device)
        history.append(stats)
        if on_epoch is not None:
            on_epoch(epoch, stats)
    return history
