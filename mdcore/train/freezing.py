"""Layer-wise freezing and gradual unfreezing of backbone stages (timm coarse groups).

Freezing only flips ``requires_grad`` (the optimizer is built over every parameter first; AdamW skips
parameters without a gradient). Under DDP, wrap the model *before* freezing and pass
``find_unused_parameters=True``: DDP only synchronizes parameters that required grad when it was wrapped,
so a stage unfrozen later is still kept in sync.
"""
from __future__ import annotations

from timm.models import group_parameters
from torch import nn

from mdcore.models.domain_norm import DomainBatchNorm2d


def backbone_groups(backbone: nn.Module) -> list[list[str]]:
    """Parameter names of the backbone's timm coarse groups, from the input: [stem, stage 1, ...]."""
    groups = group_parameters(backbone, backbone.group_matcher(coarse=True))
    return [groups[k] for k in sorted(groups)]


def per_domain_parameter_names(backbone: nn.Module) -> set[str]:
    """Backbone parameters that belong to per-domain parts (domain batch-norm): never frozen."""
    names = set()
    for mod_name, module in backbone.named_modules():
        if isinstance(module, DomainBatchNorm2d):
            names |= {f"{mod_name}.{n}" for n, _ in module.named_parameters()}
    return names


def frozen_group_count(epoch: int, n_groups: int, freeze_stages: int = 0, adapters_only: bool = False,
                       unfreeze_every: int = 0) -> int:
    """How many backbone groups (from the input) are frozen at ``epoch``.

    ``adapters_only`` freezes the whole backbone. ``unfreeze_every`` > 0 (gradual unfreezing, Howard &
    Ruder, 2018) starts with the whole backbone frozen and unfreezes one group every that many epochs,
    from the top, never below ``freeze_stages`` (which stay frozen for good).
    """
    if adapters_only:
        return n_groups
    base = min(max(freeze_stages, 0), n_groups)
    if unfreeze_every > 0:
        return max(base, n_groups - epoch // unfreeze_every)
    return base


def apply_freezing(model: nn.Module, n_frozen: int) -> dict[str, int]:
    """Freeze the first ``n_frozen`` backbone groups of ``model`` (a MultiDomainModel), unfreeze the rest.
    Per-domain parts inside the backbone stay trainable. Returns counts of frozen/trainable tensors."""
    backbone = model.backbone
    keep = per_domain_parameter_names(backbone)
    groups = backbone_groups(backbone)
    frozen_names = {n for g in groups[:n_frozen] for n in g} - keep
    for name, param in backbone.named_parameters():
        param.requires_grad_(name not in frozen_names)
    # a frozen stage's batch-norm keeps its running statistics too (eval mode survives model.train())
    norms = []
    for mod_name, module in backbone.named_modules():
        own = [f"{mod_name}.{n}" for n, _ in module.named_parameters(recurse=False)]
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and own and all(n in frozen_names for n in own):
            norms.append(module)
    if hasattr(model, "frozen_norms"):
        model.frozen_norms = norms
        model.train(model.training)
    return {"frozen_tensors": len(frozen_names), "groups_frozen": min(n_frozen, len(groups)),
            "groups": len(groups)}
