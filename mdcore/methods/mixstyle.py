"""MixStyle (Zhou et al., 2021, "Domain Generalization with MixStyle"): in early backbone stages, mix
each image's channel statistics (mean, std) with those of another image of the batch: style
randomization in the features. Training only; inference is untouched."""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from mdcore.methods.base import ERM, register_method


class MixStyleHook:
    """Forward hook that re-styles a stage's output in training mode."""

    def __init__(self, p: float, alpha: float, generator: torch.Generator):
        self.p, self.beta, self.g = p, torch.distributions.Beta(alpha, alpha), generator

    def __call__(self, module: nn.Module, inputs, out: torch.Tensor):
        if not module.training or out.shape[0] < 2 or float(torch.rand(1, generator=self.g)) > self.p:
            return out
        n = out.shape[0]
        mu = out.mean(dim=(2, 3), keepdim=True)
        sig = (out.var(dim=(2, 3), keepdim=True) + 1e-6).sqrt()
        mu, sig = mu.detach(), sig.detach()
        normed = (out - mu) / sig
        lam = self.beta.sample((n, 1, 1, 1)).to(out)
        perm = torch.randperm(n, generator=self.g).to(out.device)
        return normed * (lam * sig + (1 - lam) * sig[perm]) + (lam * mu + (1 - lam) * mu[perm])


@register_method
class MixStyle(ERM):
    """Feature-statistics mixing between images after early backbone stages."""

    name = "mixstyle"

    @dataclasses.dataclass
    class Hparams:
        mixstyle_p: float = 0.5
        mixstyle_alpha: float = 0.1
        mixstyle_stages: tuple = (1, 2)  # timm feature_info indices (after the stem: the first stages)
        mixstyle_seed: int = 0

    def attach(self, model: nn.Module) -> None:
        super().attach(model)
        backbone = model.backbone
        info = getattr(backbone, "feature_info", None)
        if not info:
            raise ValueError(f"MixStyle needs timm feature_info, which backbone {model.config.backbone!r} lacks")
        g = torch.Generator().manual_seed(int(self.hparams["mixstyle_seed"]))
        hook = MixStyleHook(self.hparams["mixstyle_p"], self.hparams["mixstyle_alpha"], g)
        for index in self.hparams["mixstyle_stages"]:
            if not -len(info) <= index < len(info):
                raise ValueError(f"mixstyle_stages index {index} out of range: {len(info)} feature stages")
            backbone.get_submodule(info[index]["module"]).register_forward_hook(hook)
