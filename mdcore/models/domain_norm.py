"""Domain-specific batch normalization: per-domain running statistics and affine, selected per image.

Each ``DomainBatchNorm2d`` gets an (N, D) routing matrix from the model before the backbone runs
(``set_route``): one-hot rows for images of a known domain, soft rows (prototype similarity, or uniform)
for images of an unknown one. Training normalizes each domain's images by that domain's batch statistics
(Chang et al., 2019, "Domain-Specific Batch Normalization for Unsupervised Domain Adaptation"); inference
uses each domain's running statistics, mixed per image by the routing weights.

All per-domain affine parameters enter every forward through the routing matrix, so each of them gets a
gradient every step (zero for a domain absent from the batch): DDP needs no ``find_unused_parameters``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Routed:
    """Mixin for modules that read the per-image domain routing weights set by the model.

    ``groups``: images per domain when the model has put the batch in domain order with one-hot routes
    (domain 0's images first, then domain 1's, ...); None otherwise."""

    route: torch.Tensor | None = None
    groups: list[int] | None = None

    def set_route(self, weights: torch.Tensor | None, groups: list[int] | None = None) -> None:
        self.route, self.groups = weights, groups

    def route_for(self, x: torch.Tensor, n_domains: int) -> torch.Tensor:
        if self.route is None:  # called outside MultiDomainModel: treat every image as all domains equally
            return torch.full((x.shape[0], n_domains), 1.0 / n_domains, dtype=x.dtype, device=x.device)
        return self.route.to(x.dtype)


class DomainBatchNorm2d(Routed, nn.Module):
    def __init__(self, num_features: int, n_domains: int, eps: float = 1e-5, momentum: float = 0.1,
                 post: nn.Module | None = None):
        super().__init__()
        self.num_features, self.n_domains, self.eps, self.momentum = num_features, n_domains, eps, momentum
        self.weight = nn.Parameter(torch.ones(n_domains, num_features))
        self.bias = nn.Parameter(torch.zeros(n_domains, num_features))
        self.register_buffer("running_mean", torch.zeros(n_domains, num_features))
        self.register_buffer("running_var", torch.ones(n_domains, num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        self.post = post if post is not None else nn.Identity()  # timm's BatchNormAct2d: drop + act
        self._seen = torch.zeros(n_domains)  # batches per domain since the last reset (cumulative mode)
        # domains whose statistics stay fixed in training too: their images are normalized by the running
        # statistics, which no batch updates (continual learning: a few replayed images per batch must not
        # rewrite what a known domain's statistics were estimated from)
        self.frozen_domains: tuple[int, ...] = ()

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.num_batches_tracked.zero_()
        self._seen = torch.zeros(self.n_domains)

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d, n_domains: int) -> "DomainBatchNorm2d":
        post = None
        if hasattr(bn, "act") and hasattr(bn, "drop"):  # timm BatchNormAct2d
            post = nn.Sequential(bn.drop, bn.act)
        new = cls(bn.num_features, n_domains, bn.eps, bn.momentum if bn.momentum is not None else 0.1, post)
        with torch.no_grad():
            if bn.affine:
                new.weight.copy_(bn.weight.expand(n_domains, -1))
                new.bias.copy_(bn.bias.expand(n_domains, -1))
            if bn.track_running_stats and bn.running_mean is not None:
                new.running_mean.copy_(bn.running_mean.expand(n_domains, -1))
                new.running_var.copy_(bn.running_var.expand(n_domains, -1))
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.route_for(x, self.n_domains)  # N, D
        xf = x.float()
        # the batch in domain order (the model groups it in training on CPU: MultiDomainModel._backbone):
        # torch's batch-norm kernel per domain, on contiguous slices
        if self.training and self._kernel_path_fits(x):
            return self.post(self._normalize_groups(xf, self.groups).to(x.dtype))
        if self.training:
            cnt = w.sum(0).float()  # images per domain in this batch (soft counts for soft rows)
            denom = cnt.clamp(min=1e-6)[:, None]
            mean_d = w.float().T @ xf.mean(dim=(2, 3)) / denom  # D, C
            ex2_d = w.float().T @ (xf * xf).mean(dim=(2, 3)) / denom
            var_d = (ex2_d - mean_d * mean_d).clamp(min=0)
            if self.frozen_domains:
                fixed = torch.zeros(self.n_domains, dtype=torch.bool, device=x.device)
                fixed[list(self.frozen_domains)] = True
                mean_d = torch.where(fixed[:, None], self.running_mean.float(), mean_d)
                var_d = torch.where(fixed[:, None], self.running_var.float(), var_d)
            with torch.no_grad():
                present = cnt > 0
                if self.frozen_domains:
                    present = present & ~fixed
                n = cnt * x.shape[2] * x.shape[3]
                unbiased = var_d * (n / (n - 1).clamp(min=1))[:, None]
                if self.momentum is None:  # cumulative average (statistics recomputed from scratch)
                    self._seen = self._seen.to(cnt.device)
                    self._seen[present] += 1
                    m = (1.0 / self._seen[present].clamp(min=1))[:, None].to(self.running_mean.dtype)
                else:
                    m = self.momentum
                self.running_mean[present] = (1 - m) * self.running_mean[present] + m * mean_d[present].detach()
                self.running_var[present] = (1 - m) * self.running_var[present] + m * unbiased[present].detach()
                self.num_batches_tracked.add_(1)
            mean, var = w.float() @ mean_d, w.float() @ var_d
        else:
            mean = w.float() @ self.running_mean
            # variance of the mixture of the domains' distributions
            var = w.float() @ (self.running_var + self.running_mean ** 2) - mean ** 2
        gamma, beta = w.float() @ self.weight.float(), w.float() @ self.bias.float()
        scale = gamma * torch.rsqrt(var.clamp(min=0) + self.eps)
        y = xf * scale[:, :, None, None] + (beta - mean * scale)[:, :, None, None]
        return self.post(y.to(x.dtype))

    def _kernel_path_fits(self, x: torch.Tensor) -> bool:
        """The batch comes grouped by domain, and each domain present has more than one value per channel
        (torch's kernel refuses one; the routed path gives it variance 0)."""
        groups = self.groups
        return (groups is not None and sum(groups) == x.shape[0]
                and min((c for d, c in enumerate(groups) if c and d not in self.frozen_domains), default=2)
                * x.shape[2] * x.shape[3] > 1)

    def _normalize_groups(self, xf: torch.Tensor, groups: list[int]) -> torch.Tensor:
        """The same normalization as the routed path for one-hot routes, through torch's fused batch-norm
        kernel, one call per domain present on its contiguous slice of the batch (the routed path costs
        about twice a plain batch-norm's time). Running statistics update in place, per domain; every
        domain's affine parameters are rows of one tensor, so each still gets a gradient every step (zero
        when absent)."""
        self._seen = self._seen.to(xf.device)
        outs = []
        for d, chunk in enumerate(xf.split(groups)):
            if not groups[d]:
                continue
            if d in self.frozen_domains:
                outs.append(F.batch_norm(chunk, self.running_mean[d], self.running_var[d], self.weight[d].float(),
                                         self.bias[d].float(), training=False, eps=self.eps))
                continue
            if self.momentum is None:  # cumulative average (statistics recomputed from scratch)
                self._seen[d] += 1
                momentum = 1.0 / float(self._seen[d])
            else:
                momentum = self.momentum
            outs.append(F.batch_norm(chunk, self.running_mean[d], self.running_var[d], self.weight[d].float(),
                                     self.bias[d].float(), training=True, momentum=momentum, eps=self.eps))
        self.num_batches_tracked.add_(1)
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # plain BatchNorm2d weights (a pretrained backbone): every domain starts from them
        for name in ("weight", "bias", "running_mean", "running_var"):
            key = prefix + name
            if key in state_dict and state_dict[key].ndim == 1:
                state_dict[key] = state_dict[key][None].expand(self.n_domains, -1).clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"{self.num_features}, domains={self.n_domains}, eps={self.eps}, momentum={self.momentum}"


def freeze_domain_statistics(module: nn.Module, domains: list[int] | tuple[int, ...]) -> int:
    """Fix the normalization statistics of ``domains`` in every DomainBatchNorm2d of ``module`` (in
    training too; ``[]`` releases them). Returns how many layers were set."""
    layers = [m for m in module.modules() if isinstance(m, DomainBatchNorm2d)]
    for m in layers:
        bad = [d for d in domains if not 0 <= d < m.n_domains]
        if bad:
            raise ValueError(f"domains {bad} are not domain indices of a {m.n_domains}-domain batch-norm")
        m.frozen_domains = tuple(sorted(set(int(d) for d in domains)))
    return len(layers)


class Permute(torch.autograd.Function):
    """``x[order]`` whose gradient is ``grad[inverse]``: a permutation's backward is a permutation, not
    the accumulating scatter that indexing's generic backward runs."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x[order]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad[inverse], None, None


def convert_to_domain_bn(module: nn.Module, n_domains: int, backbone_name: str = "?") -> int:
    """Replace every BatchNorm2d in ``module`` (in place) by a DomainBatchNorm2d; returns how many.

    A backbone without batch-norm cannot host per-domain normalization: that is an error naming both,
    never a silent no-op.
    """
    replaced = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, DomainBatchNorm2d.from_batchnorm(child, n_domains))
            replaced += 1
        else:
            replaced += convert_to_domain_bn(child, n_domains, backbone_name)
    return replaced


def require_batchnorm(module: nn.Module, backbone_name: str) -> None:
    if not any(isinstance(m, nn.BatchNorm2d) for m in module.modules()):
        raise ValueError(
            f"domain batch-norm (domain_bn=true) cannot be hosted by backbone {backbone_name!r}: it has no "
            f"BatchNorm2d layers (it normalizes with {_norm_kinds(module)}); turn domain_bn off or pick a "
            f"batch-norm backbone such as resnet10t")


def _norm_kinds(module: nn.Module) -> str:
    kinds = sorted({type(m).__name__ for m in module.modules() if "norm" in type(m).__name__.lower()})
    return ", ".join(kinds) or "no normalization layers"
