"""Weight decay reaches only the weights of convolutions and linear layers: every bias (the stage adapters'
per-domain bias rows too, which are 2-D so timm's 1-D rule misses them), every norm parameter (per-domain
batch-norm included) and every embedding (the MoE head's domain embedding) gets none, with and without
layer-wise lr decay. The optimizer is built as mdcore/train/setup.build_optimizer builds it."""
import pytest
import torch
from timm.optim import create_optimizer_v2
from torch import nn

from mdcore.models.adapters import StageAdapterBank
from mdcore.models.domain_norm import DomainBatchNorm2d
from mdcore.models.model import ModelConfig, MultiDomainModel

NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, DomainBatchNorm2d)


def _model(**kw) -> MultiDomainModel:
    torch.manual_seed(0)
    return MultiDomainModel(ModelConfig(backbone="test_resnet", domains=["a", "b", "c"], classes=list("0123"),
                                        image_size=32, stage_adapters=[-2], head="moe", **kw))


def _decay_of(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    by_id = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    return {name: by_id[id(p)] for name, p in model.named_parameters()}


def _check(model: MultiDomainModel, decay: dict[str, float]) -> None:
    modules = dict(model.named_modules())
    exempt, decayed = [], []
    for name, _ in model.named_parameters():
        owner, _, leaf = name.rpartition(".")
        module = modules[owner]
        if name.endswith("bias") or "embed" in leaf or isinstance(module, NORMS + (nn.Embedding,)):
            exempt.append(name)
        elif (isinstance(module, (nn.Conv2d, nn.Linear)) and leaf == "weight") or (
                isinstance(module, StageAdapterBank) and leaf in ("down", "up")):
            decayed.append(name)
    (bank,) = model.stage_adapters.keys()
    assert {"head.domain_embedding", f"stage_adapters.{bank}.down_bias",
            f"stage_adapters.{bank}.up_bias"} <= set(exempt)
    assert any(isinstance(modules[n.rpartition(".")[0]], NORMS) for n in exempt)  # the backbone has batch-norm
    assert {"head.experts.weight", "head.gate.weight", f"stage_adapters.{bank}.down"} <= set(decayed)
    assert any(n.startswith("backbone.") and n.endswith(".weight") for n in decayed)  # its convolutions
    assert sorted(n for n in exempt if decay[n] != 0) == []
    assert sorted(n for n in decayed if not decay[n] > 0) == []
    assert len(exempt) + len(decayed) == len(decay), sorted(set(decay) - set(exempt) - set(decayed))


@pytest.mark.parametrize("layer_decay", [None, 0.8])
@pytest.mark.parametrize("extra", [{}, {"domain_bn": True, "proj_dim": 8}], ids=["moe+stage_adapters", "+domain_bn"])
def test_no_weight_decay_on_biases_norms_and_embeddings(layer_decay, extra):
    model = _model(**extra)
    # the arguments of mdcore/train/setup.build_optimizer (finetune params' default weight decay)
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=layer_decay, fused=True)
    _check(model, _decay_of(model, optimizer))
    if extra.get("domain_bn"):
        assert any(isinstance(m, DomainBatchNorm2d) for m in model.modules())


@pytest.mark.parametrize("layer_decay", [None, 0.8])
def test_build_optimizer_exempts_them_too(layer_decay):
    from mdcore.train.setup import build_optimizer
    from tasks.params import FinetuneParams

    p = FinetuneParams(layer_decay=layer_decay)
    assert p.weight_decay > 0
    model = _model()
    optimizer, _ = build_optimizer(p, model)
    _check(model, _decay_of(model, optimizer))


def test_no_weight_decay_keeps_the_backbone_own_list():
    """A backbone's own exemptions (a ViT's position embedding and class token) stay exempt under backbone."""
    model = MultiDomainModel(ModelConfig(backbone="test_vit", domains=["a", "b"], classes=["x", "y"], image_size=32,
                                         head="moe"))
    names = model.no_weight_decay()
    own = getattr(model.backbone, "no_weight_decay", set)()
    assert own and {f"backbone.{n}" for n in own} <= names
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.8)
    decay = _decay_of(model, optimizer)
    assert decay["backbone.pos_embed"] == 0 and decay["head.domain_embedding"] == 0
