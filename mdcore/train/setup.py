"""From finetune params to what ``mdcore.train.fit`` takes: the method, the model, the optimizer and
schedule, and the fit config. One place, used by the Ray workers and by every experiment, so a setting
means the same thing everywhere: ``build_method`` -> ``build_model`` -> ``build_optimizer`` ->
``fit(model, method, train, val, fit_config(p, domains), optimizer, scheduler)``.
"""
from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from safetensors.torch import load_file
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler

from mdcore.data.decode import DEFAULT_RESIZE
from mdcore.data.images import ImageSet
from mdcore.methods import Method, create_method, method_class
from mdcore.train import FitConfig
from mdcore.models.model import ModelConfig, MultiDomainModel

#: The finetune params: ``tasks.params.FinetuneParams`` (validated from ``params/finetune.yaml``) or any
#: pydantic model with its fields. mdcore reads them and never loads or validates a params file itself.
FinetuneSettings = Any


def method_spec(p: FinetuneSettings) -> tuple[str, dict]:
    """The method name and hyper-parameters the params select: ``method``, plus the loss methods that the
    finetune params switch on by name (the one place they are translated): ``reweight`` for
    ``domain_weighting``/``curriculum``, ``supcon`` for ``supcon_weight`` > 0, ``coral``/``mmd`` for
    ``align`` with ``align_weight`` > 0. ``method_hparams`` win over the values translated here."""
    spec, hparams = p.method, {}
    if p.domain_weighting != "uniform" or p.curriculum != "none":
        spec += "+reweight"
        hparams |= {"weighting": p.domain_weighting, "groupdro_eta": p.groupdro_eta, "curriculum": p.curriculum,
                    "curriculum_epochs": p.curriculum_epochs}
    if p.supcon_weight > 0:
        spec += "+supcon"
        hparams |= {"supcon_weight": p.supcon_weight, "supcon_temperature": p.supcon_temperature,
                    "proj_dim": p.proj_dim}
    if p.align != "none" and p.align_weight > 0:
        spec += f"+{p.align}"
        hparams |= {"align_weight": p.align_weight}
    return spec, hparams | dict(p.method_hparams)


def without_unhosted_parts(p: FinetuneSettings) -> FinetuneSettings:
    """``p`` with the per-domain parts off when its method hosts none (``erm``, ``randconv``, ...): for code
    that swaps the method of a params file (the LODO cells), where the file's parts are not a request."""
    if method_class(p.method).per_domain_parts:
        return p
    return p.model_copy(update={"adapters": False, "stage_adapters": [], "domain_bn": False, "head": "linear"})


def build_method(p: FinetuneSettings) -> Method:
    """The domain-generalization method the params name (one object per training run: it carries state)."""
    return create_method(*method_spec(p))


def fit_config(p: FinetuneSettings, domains: list[str]) -> FitConfig:
    """The loop settings of the params; ``domains``: the training domains (``domain_mix`` names them)."""
    mix = p.domain_mix
    if not isinstance(mix, str):
        unknown = sorted(set(mix) - set(domains))
        if unknown:
            raise ValueError(f"finetune.domain_mix names {unknown}, not training domains {domains}")
        mix = {domains.index(d): w for d, w in mix.items()}
    return FitConfig(epochs=p.epochs, batch_size=p.batch_size, seed=p.seed, label_smoothing=p.label_smoothing,
                     domain_mix=mix, patience=p.early_stopping_patience, min_delta=p.early_stopping_min_delta,
                     freeze_stages=p.freeze_stages, adapters_only=p.adapters_only,
                     gradual_unfreeze_every=p.gradual_unfreeze_every,
                     class_balance=getattr(p, "class_balance", "none"))


def model_config(p: FinetuneSettings, domains: list[str], classes: list[str], backbone: str,
                 image_size: int, weights_norm: dict | None = None, resize: str = DEFAULT_RESIZE) -> ModelConfig:
    """The ModelConfig the finetune params select: the per-domain parts and the weights of their losses,
    as the method keeps or removes them (``erm`` and its children have none, and no standardization).

    ``weights_norm``: the starting weights' pretrained_cfg mean/std (``mdcore.models.input_norm.recorded_norm``);
    with ``input_norm: auto`` the model then normalizes with it instead of the method's own choice.
    ``resize``: the filter its images were resized with (the pretrain stage's choice), kept for inference."""
    from mdcore.models.input_norm import resolve

    method = build_method(p)
    cfg = method.configure(asdict(_component_config(p, domains, classes, backbone, image_size)))
    kind, mean, std = resolve(p.input_norm, weights_norm, cfg["input_norm"], backbone, "finetune.input_norm")
    return ModelConfig(**(cfg | {"input_norm": kind, "input_mean": mean, "input_std": std, "resize": resize}))


def _component_config(p: FinetuneSettings, domains: list[str], classes: list[str], backbone: str,
                      image_size: int) -> ModelConfig:
    return ModelConfig(
        backbone=backbone, domains=list(domains), classes=list(classes), image_size=image_size,
        adapters=p.adapters, adapter_dim=p.adapter_dim,
        stage_adapters=list(p.stage_adapters), stage_adapter_dim=p.stage_adapter_dim, domain_bn=p.domain_bn,
        head=p.head, moe_experts=p.moe_experts, moe_balance_weight=p.moe_balance_weight if p.head == "moe" else 0.0,
    )


def build_model(p: FinetuneSettings, train: ImageSet, backbone: str, image_size: int,
                backbone_weights: str | None = None, method: Method | None = None,
                resize: str = DEFAULT_RESIZE) -> MultiDomainModel:
    """The model of the params; ``method`` (from :func:`build_method`) attaches its training-only hooks.
    ``backbone_weights``: a file exported by the pretrain stage (its recorded pretrained_cfg comes along), or
    weights timm or a package provides (``imagenet``, a hub tag: with their own pretrained_cfg)."""
    state, weights_norm = starting_backbone(backbone, backbone_weights)
    model = MultiDomainModel(model_config(p, train.domain_names, train.class_names, backbone, image_size,
                                          weights_norm, resize))
    if state is not None:
        model.load_backbone(state)
    if method is not None:
        method.attach(model)
    return model


def starting_backbone(backbone: str, weights: str | None) -> tuple[dict | None, dict | None]:
    """(backbone state dict, pretrained_cfg mean/std/size) of the starting ``weights``; (None, None) for none."""
    from mdcore.models.input_norm import cfg_norm, recorded_norm
    from mdcore.models.model import create_backbone, weights_kind

    kind = weights_kind(weights)
    if kind == "random":
        return None, None
    if kind == "file":
        return load_file(str(Path(weights).expanduser())), recorded_norm(weights)
    source = create_backbone(backbone, weights)
    return source.state_dict(), cfg_norm(source.pretrained_cfg)


def build_optimizer(p: FinetuneSettings, model: MultiDomainModel, warmup_epochs: int | None = None):
    """timm's optimizer factory (layer-wise lr decay included) over *every* parameter (frozen ones get no
    gradient, so AdamW leaves them alone until they are unfrozen), and timm's cosine schedule stepped per
    epoch, with warm restarts when ``lr_cycles`` > 1. AdamW runs fused (one kernel over all tensors, on CPU
    and CUDA): 5.8 instead of 29 ms per step for the default model on 2 cores (BENCHMARKS.md).
    ``warmup_epochs``: epochs at 0.1 x lr first; default one when there are more than 2 epochs (a model
    that is already trained, as in a continual-learning step, may need none)."""
    optimizer = create_optimizer_v2(model, "adamw", lr=p.lr, weight_decay=p.weight_decay, layer_decay=p.layer_decay,
                                    fused=True)
    cycles = p.lr_cycles
    if cycles == 1:
        t_initial = p.epochs
    elif p.lr_cycle_mul == 1.0:
        t_initial = math.ceil(p.epochs / cycles)
    else:  # t + t*m + ... + t*m^(c-1) = epochs
        t_initial = max(1, round(p.epochs * (p.lr_cycle_mul - 1) / (p.lr_cycle_mul ** cycles - 1)))
    if warmup_epochs is None:
        warmup_epochs = 1 if p.epochs > 2 else 0
    scheduler = CosineLRScheduler(optimizer, t_initial=t_initial, warmup_t=warmup_epochs,
                                  warmup_lr_init=p.lr * 0.1, lr_min=p.lr * 0.01, cycle_mul=p.lr_cycle_mul,
                                  cycle_decay=p.lr_cycle_decay, cycle_limit=cycles)
    return optimizer, scheduler
