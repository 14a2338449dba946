"""The method interface, the registry, and ERM: the parent every method extends.

A method does not own the training loop (everything that trains calls ``mdcore.train.fit``); it plugs
into it through these hooks:

- ``configure(cfg)``: edit the model config (which per-domain parts exist, input standardization);
- ``attach(model)``: training-only hooks on the built model (MixStyle);
- ``augment(x, g)``: the label-preserving augmentation (none for ERM, as in a plain loop);
- ``transform_input(x, domains, g)``: style randomization of the augmented batch (RandConv);
- ``loss(batch, logits, aux)``: the training loss and its named terms (GroupDRO re-weights domains,
  distillation adds a term towards a teacher);
- ``after_step(model)`` / ``end_epoch(model, epoch, val)``: state across steps (SWAD's averages);
- ``finalize(model, batches)``: the model to ship (SWAD: the average, batch-norm statistics recomputed);
- ``state_dict()`` / ``load_state_dict(state)``: what the method carries across steps, saved in every
  checkpoint so a resumed run equals an uninterrupted one.

Hyper-parameters live beside each method as a dataclass ``Hparams``; a composite takes the union, and
an unknown key is an error that lists the known ones.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterable

import torch
from torch import nn

from mdcore.models.losses import classification_loss

_REGISTRY: dict[str, type["Method"]] = {}

# ModelConfig fields that make a model multi-domain, as they read when off.
PER_DOMAIN_OFF = dict(adapters=False, stage_adapters=[], domain_bn=False, head="linear")


@dataclasses.dataclass
class Batch:
    """One training step's inputs as the model saw them (``images`` after the method's training view)."""

    images: torch.Tensor
    labels: torch.Tensor
    domains: torch.Tensor
    epoch: int
    label_smoothing: float = 0.0
    class_weight: torch.Tensor | None = None  # per image (finetune.class_balance: reweight)
    logit_offset: torch.Tensor | None = None  # (N, C) added to the logits (finetune.class_balance: logit_adjust)


def register_method(cls: type["Method"]) -> type["Method"]:
    """Class decorator: list ``cls`` under ``cls.name`` (a duplicate name is an error)."""
    if cls.name in _REGISTRY:
        raise ValueError(f"method {cls.name!r} is registered twice ({_REGISTRY[cls.name].__module__} and {cls.__module__})")
    _REGISTRY[cls.name] = cls
    return cls


def list_methods() -> list[str]:
    return sorted(_REGISTRY)


def method_class(spec: str) -> type["Method"]:
    """The class of ``spec``: one registered name, or several joined by ``+`` (a composite)."""
    names = [n.strip() for n in spec.split("+") if n.strip()]
    if not names:
        raise ValueError(f"method {spec!r}: name at least one of {list_methods()}")
    unknown = [n for n in names if n not in _REGISTRY]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown} in {spec!r}; known: {list_methods()}")
    if len(set(names)) != len(names):
        raise ValueError(f"method {spec!r} names a component twice")
    parts = [_REGISTRY[n] for n in names if n != "erm"] or [_REGISTRY["erm"]]
    if len(parts) == 1:
        return parts[0]
    # later names wrap earlier ones: their hooks run last (so averaging sees the other methods' steps)
    return type("+".join(p.__name__ for p in parts), tuple(reversed(parts)), {"name": "+".join(names)})


def create_method(spec: str, hparams: dict | None = None) -> "Method":
    return method_class(spec)(hparams)


def _hparam_fields(cls: type) -> dict[str, dataclasses.Field]:
    fields = {}
    for klass in reversed(cls.__mro__):
        hp = klass.__dict__.get("Hparams")
        if hp is not None:
            fields.update({f.name: f for f in dataclasses.fields(hp)})
    return fields


class Method:
    """Hook interface (see the module docstring); ERM below is the concrete parent."""

    name = "method"
    per_domain_parts = False  # keep the per-domain components that the finetune params switch on
    input_norm = "none"  # "image": per-image standardization before the backbone

    @dataclasses.dataclass
    class Hparams:
        pass

    def __init__(self, hparams: dict | None = None):
        fields = _hparam_fields(type(self))
        given = dict(hparams or {})
        unknown = sorted(set(given) - set(fields))
        if unknown:
            raise ValueError(f"method {self.name!r}: unknown hyper-parameter(s) {unknown}; known: {sorted(fields)}")
        self.hparams = {}
        for key, f in fields.items():
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            self.hparams[key] = given.get(key, default)

    def __repr__(self) -> str:
        return f"{self.name}({self.hparams})"

    @classmethod
    def hparam_defaults(cls) -> dict:
        return {k: (f.default if f.default is not dataclasses.MISSING else f.default_factory())  # type: ignore[misc]
                for k, f in _hparam_fields(cls).items()}

    def configure(self, cfg: dict) -> dict:
        return dict(cfg)

    def attach(self, model: nn.Module) -> None:
        pass

    def bind(self, domains: torch.Tensor, n_domains: int) -> None:
        """Told the training images' domain indices once before training (GroupDRO sizes its weights)."""

    def augment(self, x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
        return x

    def transform_input(self, x: torch.Tensor, domains: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
        return x

    def training_view(self, x: torch.Tensor, domains: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
        """What the model trains on: ``transform_input(augment(x))``."""
        return self.transform_input(self.augment(x, g), domains, g)

    def loss(self, batch: Batch, logits: torch.Tensor, outputs: dict
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss to minimize and its named extra terms (logged): cross-entropy plus the model parts' own
        regularizers (``outputs["terms"]``). ``outputs``: what ``MultiDomainModel.forward(...,
        return_outputs=True)`` returns beside the logits (features, routing, projection). A method that
        adds a term overrides this and calls ``super().loss`` first."""
        return self.plus_terms(classification_loss(logits, batch.labels, batch.label_smoothing,
                                                   weight=batch.class_weight, logit_offset=batch.logit_offset), outputs)

    @staticmethod
    def plus_terms(loss: torch.Tensor, outputs: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        terms = dict(outputs.get("terms", {}))
        for term in terms.values():
            loss = loss + term
        return loss, terms

    def after_step(self, model: nn.Module) -> None:
        pass

    def end_epoch(self, model: nn.Module, epoch: int, val: dict[str, float]) -> None:
        pass

    def finalize(self, model: nn.Module, batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]) -> dict:
        """Change ``model`` in place into the model to ship; returns what was done (for the run record).
        ``batches()`` yields (images, domains) of the training data, for statistics that must be recomputed."""
        return {}

    def selects_checkpoint(self) -> bool:
        """Whether the loop should restore the best training-domain-validation epoch at the end
        (False for a method whose ``finalize`` decides what ships, such as weight averaging)."""
        return True

    def state_dict(self) -> dict:
        """Everything the method carries across steps, as tensors and JSON-able values (flat keys)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (a resumed run continues with the same sums, weights, ...)."""


@register_method
class ERM(Method):
    """Empirical risk minimization (Vapnik, 1998): shared backbone + linear head, inputs as they are (no
    augmentation, no standardization), no per-domain parts: a plain timm loop. The parent of every method."""

    name = "erm"

    def configure(self, cfg: dict) -> dict:
        """A method without per-domain parts refuses a config that asks for some (never a silent drop)."""
        cfg = dict(cfg)
        if not self.per_domain_parts:
            asked = {k: cfg[k] for k, off in PER_DOMAIN_OFF.items() if k in cfg and cfg[k] != off}
            if asked:
                hosts = [n for n, c in sorted(_REGISTRY.items()) if c.per_domain_parts]
                raise ValueError(f"method {self.name!r} trains no per-domain parts, but {asked} asks for them: "
                                 f"switch them off ({', '.join(f'{k}: {v!r}' for k, v in PER_DOMAIN_OFF.items())})"
                                 f" or add a method that hosts them ({' or '.join(hosts)})")
        cfg["input_norm"] = self.input_norm
        return cfg
