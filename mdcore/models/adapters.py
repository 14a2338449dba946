"""Residual bottleneck adapters, one set per domain (Houlsby et al., 2019; Rebuffi et al., 2017).

``BottleneckAdapter`` works on pooled features. ``StageAdapterBank`` sits inside the backbone, as a
forward hook on a stage named by timm's ``feature_info``: a 1x1-conv bottleneck per domain whose
up-projection starts at zero (so a new adapter is the identity). The bank mixes its domains' weights per
image with the routing matrix (one-hot for a known domain): every domain's weights enter each forward, so
each gets a gradient every step and DDP needs no ``find_unused_parameters``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mdcore.models.domain_norm import Routed


class BottleneckAdapter(nn.Module):
    """Residual bottleneck adapter on pooled features; starts as the identity."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.down = nn.Linear(dim, hidden)
        self.up = nn.Linear(hidden, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(F.gelu(self.down(self.norm(x))))


class StageAdapterBank(Routed, nn.Module):
    """Per-domain residual 1x1-conv bottleneck adapters for one backbone stage of ``channels`` channels."""

    def __init__(self, channels: int, hidden: int, n_domains: int):
        super().__init__()
        self.n_domains = n_domains
        self.down = nn.Parameter(torch.empty(n_domains, hidden, channels))
        self.down_bias = nn.Parameter(torch.zeros(n_domains, hidden))
        self.up = nn.Parameter(torch.zeros(n_domains, channels, hidden))  # zero-init: identity at start
        self.up_bias = nn.Parameter(torch.zeros(n_domains, channels))
        for d in range(n_domains):
            nn.init.kaiming_uniform_(self.down.data[d], a=5 ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.route_for(x, self.n_domains)  # N, D
        down = torch.einsum("nd,drc->nrc", w, self.down.to(x.dtype))
        up = torch.einsum("nd,dcr->ncr", w, self.up.to(x.dtype))
        # einsum over (N, C, H, W) with no reshape, so an empty batch (the ONNX fallback pass) works
        hidden = F.gelu(torch.einsum("nrc,nchw->nrhw", down, x) + (w @ self.down_bias.to(x.dtype))[:, :, None, None])
        out = torch.einsum("ncr,nrhw->nchw", up, hidden) + (w @ self.up_bias.to(x.dtype))[:, :, None, None]
        return x + out

    def hook(self, module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        """Forward hook on the backbone stage (a bound method, so ``copy.deepcopy`` of the model keeps it
        pointing at the copy's bank)."""
        if not isinstance(output, torch.Tensor) or output.ndim != 4:
            raise ValueError(f"stage adapters need (N, C, H, W) stage outputs; {type(module).__name__} gives "
                             f"{getattr(output, 'shape', type(output).__name__)} (a token backbone?): turn stage_adapters off")
        return self(output)
