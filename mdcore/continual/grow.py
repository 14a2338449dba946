"""Adding a domain to a trained multi-domain model, and keeping the other domains' parts as they were.

A new domain gets its own per-domain parts (domain batch-norm rows, stage-adapter rows, a pooled-feature
adapter, a MoE domain embedding, a projection head, a prototype), each a copy of the *nearest* known
domain's: the one whose feature prototype is closest to the new images' mean routing feature. The shared
backbone and head are kept, so training starts from what the model already knows instead of from scratch.
"""
from __future__ import annotations

import re
from dataclasses import asdict, replace

import torch
import torch.nn.functional as F

from mdcore.models.adapters import StageAdapterBank
from mdcore.models.domain_norm import DomainBatchNorm2d
from mdcore.models.model import ModelConfig, MultiDomainModel

_LISTS = ("adapters", "projections")  # nn.ModuleList with one entry per domain


@torch.no_grad()
def nearest_domain(model: MultiDomainModel, images: torch.Tensor, batch_size: int = 256) -> tuple[int, list[float]]:
    """(index of the known domain whose prototype is most similar to the mean normalized routing feature
    of ``images`` (float, as the model takes them), cosine similarity to every domain)."""
    if not bool(model.prototypes.abs().sum() > 0):
        raise ValueError("the model has no domain prototypes (fit_prototypes was never run): cannot find "
                         "the nearest domain")
    was = model.training
    model.eval()
    feats = torch.cat([F.normalize(model.features(images[s : s + batch_size]).float(), dim=1)
                       for s in range(0, len(images), batch_size)])
    model.train(was)
    sims = F.normalize(feats.mean(0, keepdim=True), dim=1) @ F.normalize(model.prototypes.float(), dim=1).T
    sims = sims.flatten().tolist()
    return max(range(len(sims)), key=sims.__getitem__), sims


def add_domain(model: MultiDomainModel, name: str, init_from: int) -> MultiDomainModel:
    """A new model that knows every domain of ``model`` plus ``name`` (appended last), with the same
    weights; the new domain's parts are copies of domain ``init_from``'s."""
    cfg = model.config
    if name in cfg.domains:
        raise ValueError(f"domain {name!r} is already one of the model's domains {cfg.domains}")
    if not 0 <= init_from < len(cfg.domains):
        raise ValueError(f"init_from={init_from} is not a domain index of the model (0..{len(cfg.domains) - 1})")
    grown = MultiDomainModel(ModelConfig.from_dict(asdict(replace(cfg, domains=[*cfg.domains, name]))))
    n_old, new_state = len(cfg.domains), grown.state_dict()
    old = model.state_dict()
    state = {}
    for key, target in new_state.items():
        if key in old and old[key].shape == target.shape:
            state[key] = old[key]
            continue
        m = re.match(rf"^({'|'.join(_LISTS)})\.(\d+)\.(.+)$", key)
        if m and int(m.group(2)) == n_old:  # the new domain's entry of a per-domain list
            state[key] = old[f"{m.group(1)}.{init_from}.{m.group(3)}"].clone()
        elif key in old and old[key].shape[0] == n_old and target.shape[0] == n_old + 1:  # one row per domain
            state[key] = torch.cat([old[key], old[key][init_from : init_from + 1]])
        else:
            raise ValueError(f"cannot grow {key}: shape {tuple(old[key].shape) if key in old else None} -> "
                             f"{tuple(target.shape)}")
    grown.load_state_dict(state, strict=True)
    grown.frozen_norms = []
    return grown


def domain_part_names(model: MultiDomainModel) -> set[str]:
    """Names of the parameters that belong to per-domain parts (every domain's rows together)."""
    names = set()
    for mod_name, module in model.named_modules():
        if isinstance(module, (DomainBatchNorm2d, StageAdapterBank)):
            names |= {f"{mod_name}.{n}" for n, _ in module.named_parameters()}
    for name, _ in model.named_parameters():
        if name.startswith(tuple(f"{lst}." for lst in _LISTS)) or name.endswith("domain_embedding"):
            names.add(name)
    return names


def train_only_domain_parts(model: MultiDomainModel) -> int:
    """Freeze everything but the per-domain parts (few-shot: adapters and normalization only); returns
    how many tensors stay trainable. Call :func:`restore_domains` afterwards to undo any drift of the
    other domains' rows (weight decay, or statistics)."""
    keep = domain_part_names(model)
    if not keep:
        raise ValueError("the model has no per-domain parts (adapters, domain batch-norm, MoE routing): "
                         "few-shot adaptation of a domain needs at least one")
    for name, p in model.named_parameters():
        p.requires_grad_(name in keep)
    return len(keep)


@torch.no_grad()
def restore_domains(model: MultiDomainModel, reference: dict[str, torch.Tensor], keep: int | list[int]) -> None:
    """Bring every tensor back from ``reference`` (a state dict of the same model taken before training)
    except the per-domain rows of domain(s) ``keep``: training some domains' parts then cannot touch the
    others, nor the shared weights and statistics (a shared batch-norm's running statistics move in any
    forward pass in training mode), nor the other domains' routing prototypes."""
    kept = [keep] if isinstance(keep, int) else list(keep)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    for key, value in model.state_dict().items():
        if key in reference:
            value.copy_(reference[key])
    _copy_domain_rows(model, trained, kept)


@torch.no_grad()
def _copy_domain_rows(model: MultiDomainModel, reference: dict[str, torch.Tensor], chosen: list[int]) -> None:
    """Copy the per-domain rows (and per-domain modules) of the ``chosen`` domains from ``reference``."""
    n = len(model.config.domains)
    for key, value in model.state_dict().items():
        if key not in reference:
            continue
        m = re.match(rf"^({'|'.join(_LISTS)})\.(\d+)\.", key)
        if m:
            if int(m.group(2)) in chosen:
                value.copy_(reference[key])
        elif value.ndim >= 1 and value.shape[0] == n and _per_domain_rows(model, key):
            value[chosen] = reference[key][chosen]


@torch.no_grad()
def interpolate_toward(model: MultiDomainModel, reference: dict[str, torch.Tensor], alpha: float, keep: int) -> None:
    """Weight-space ensembling after an arrival (as WiSE-FT): every floating tensor becomes ``alpha`` x
    ``reference`` (the grown model before it trained) + (1 - ``alpha``) x its trained value, except domain
    ``keep``'s own rows, which stay as trained. The shared weights move back part of the way, which is
    what the old domains lost; the new domain keeps its own parts as learned."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha {alpha}: expected a value in [0, 1]")
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    for key, value in model.state_dict().items():
        if key in reference and value.is_floating_point():
            value.copy_(alpha * reference[key] + (1.0 - alpha) * value)
    _copy_domain_rows(model, trained, [keep])


def _per_domain_rows(model: MultiDomainModel, key: str) -> bool:
    owner, _, leaf = key.rpartition(".")
    if key == "prototypes" or leaf == "domain_embedding":
        return True
    module = model.get_submodule(owner) if owner else model
    return isinstance(module, (DomainBatchNorm2d, StageAdapterBank))


@torch.no_grad()
def refit_prototypes(model: MultiDomainModel, images: torch.Tensor, domains: torch.Tensor) -> list[int]:
    """Recompute the prototypes of the domains present in ``domains`` only (a continual learner has no
    data of the others: their prototypes stay as they were). Returns the domains refitted."""
    keep = model.prototypes.clone()
    present = sorted(int(d) for d in torch.unique(domains) if d >= 0)
    model.fit_prototypes(images, domains)
    others = [d for d in range(len(model.config.domains)) if d not in present]
    model.prototypes[others] = keep[others]
    return present
