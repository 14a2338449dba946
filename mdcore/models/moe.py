"""Mixture-of-experts classifier head whose gate sees the features and a domain embedding
(Shazeer et al., 2017; the load-balancing term of Fedus et al., 2022, Switch Transformers)."""
from __future__ import annotations

import torch
from torch import nn


class MoEHead(nn.Module):
    """``experts`` linear classifiers mixed per image by a softmax gate over [features, domain embedding].

    The domain embedding of an image is ``weights @ embeddings`` (one-hot for a known domain, the routed
    mixture for an unknown one), so the gate works for every image. Dense gating: every expert sees every
    image (cheap on pooled features) and gets a gradient every step.
    """

    def __init__(self, dim: int, n_classes: int, n_domains: int, experts: int = 4, embed_dim: int = 16):
        super().__init__()
        self.experts = nn.Linear(dim, n_classes * experts)
        self.n_experts, self.n_classes = experts, n_classes
        self.domain_embedding = nn.Parameter(torch.randn(n_domains, embed_dim) * 0.1)
        self.gate = nn.Linear(dim + embed_dim, experts)

    def forward(self, feats: torch.Tensor, weights: torch.Tensor, return_gate: bool = False):
        """Logits (N, classes); with ``return_gate`` also the gate probabilities (N, experts)."""
        emb = weights.to(feats.dtype) @ self.domain_embedding.to(feats.dtype)
        probs = torch.softmax(self.gate(torch.cat([feats, emb], dim=1)), dim=1)
        logits = self.experts(feats).view(-1, self.n_experts, self.n_classes)
        out = (probs[..., None] * logits).sum(dim=1)
        return (out, probs) if return_gate else out
