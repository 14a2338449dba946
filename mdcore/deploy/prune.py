"""Structured (channel) pruning with Torch-Pruning (Fang et al., 2023, DepGraph): whole channels leave
every coupled layer (convolutions, per-domain batch-norm, adapters, head), so tensors shrink and MACs
fall, unlike zeroed weights. Per-domain batch-norm is a custom layer here: ``DomainBNPruner`` tells
Torch-Pruning how to cut its (domains x channels) parameters and statistics."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from mdcore.models.domain_norm import DomainBatchNorm2d
from mdcore.models.model import MultiDomainModel


def _domain_bn_pruner():
    import torch_pruning as tp

    class DomainBNPruner(tp.pruner.function.BasePruningFunc):
        TARGET_MODULES = DomainBatchNorm2d

        def prune_out_channels(self, layer: DomainBatchNorm2d, idxs: Sequence[int]) -> nn.Module:
            keep = [i for i in range(layer.num_features) if i not in set(int(j) for j in idxs)]
            keep_t = torch.tensor(keep, dtype=torch.long)
            layer.weight = nn.Parameter(layer.weight.data[:, keep_t].clone())
            layer.bias = nn.Parameter(layer.bias.data[:, keep_t].clone())
            layer.running_mean = layer.running_mean[:, keep_t].clone()
            layer.running_var = layer.running_var[:, keep_t].clone()
            layer.num_features = len(keep)
            return layer

        prune_in_channels = prune_out_channels

        def get_out_channels(self, layer: DomainBatchNorm2d) -> int:
            return layer.num_features

        get_in_channels = get_out_channels

    return DomainBNPruner()


def prune_channels(model: MultiDomainModel, ratio: float, images: torch.Tensor, domains: torch.Tensor,
                   round_to: int = 8) -> dict:
    """Remove ``ratio`` of the channels of every prunable group (L2 magnitude importance), in place.

    The classifier's outputs (the classes) are kept; the per-domain prototypes, which live in the
    feature space, are cut with the features (callers refit them on training images). Stage adapters
    (per-domain 1x1 convs kept as raw tensors) are not handled by Torch-Pruning: refused. ``images``
    (float, as the model takes them) and ``domains`` are an example batch for tracing. Returns a summary.
    """
    import torch_pruning as tp

    if not 0 <= ratio < 1:
        raise ValueError(f"channel pruning ratio {ratio}: expected 0 <= ratio < 1")
    if model.stage_adapters is not None:
        raise ValueError("structured pruning does not support stage_adapters (per-domain conv banks); "
                         "set compress.prune_ratio: 0 or train without stage_adapters")
    before = sum(p.numel() for p in model.parameters())
    if ratio == 0:
        return {"ratio": 0.0, "params_before": before, "params_after": before}
    model.eval()
    pruner = tp.pruner.MetaPruner(
        model, (images, domains), importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=ratio,
        ignored_layers=[model.head], round_to=round_to,
        customized_pruners={DomainBatchNorm2d: _domain_bn_pruner()},
    )
    pruner.step()
    dim = model.head.in_features if isinstance(model.head, nn.Linear) else model.head.experts.in_features
    if model.prototypes.shape[1] != dim:
        model.prototypes = torch.zeros(model.prototypes.shape[0], dim)  # refit by the caller
    model.backbone.num_features = dim
    after = sum(p.numel() for p in model.parameters())
    return {"ratio": ratio, "params_before": before, "params_after": after, "feature_dim": dim}
