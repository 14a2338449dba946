"""Per-domain components of MultiDomainModel: shapes, per-image routing, unknown-domain path, refusal
of domain batch-norm on a backbone without batch-norm, save/load of a full config, DDP-friendliness."""
import copy

import pytest
import torch

from mdcore.models.domain_norm import DomainBatchNorm2d, freeze_domain_statistics
from mdcore.models.model import ModelConfig, MultiDomainModel, load_model, save_model

CLASSES = [str(i) for i in range(5)]
COMPONENTS = {
    "stage_adapters": dict(stage_adapters=[-3, -2], stage_adapter_dim=4),
    "domain_bn": dict(domain_bn=True),
    "moe": dict(head="moe", moe_experts=3, moe_balance_weight=0.01),
    "projections": dict(proj_dim=8),
}
FULL = {k: v for c in COMPONENTS.values() for k, v in c.items()}


def tiny(**kw) -> MultiDomainModel:
    torch.manual_seed(0)
    return MultiDomainModel(ModelConfig("test_resnet", ["a", "b", "c"], CLASSES, adapter_dim=8, **kw))


def batch(n=12):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 32, 32, generator=g), torch.tensor([0, 1, 2] * (n // 3)), torch.randint(0, 5, (n,), generator=g)


def perturb(model):
    """Non-trivial per-domain weights (zero-init adapters and identical BN copies are the identity)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 1 and p.shape[0] == 3 and not name.startswith("head"):
                p.add_(torch.randn_like(p) * 0.3)
        for m in model.modules():
            if isinstance(m, DomainBatchNorm2d):
                m.running_mean.normal_(0, 0.5)


@pytest.mark.parametrize("name", [*COMPONENTS, "full"])
def test_every_component_forward_shapes_aux_and_gradients(name):
    model = tiny(**(FULL if name == "full" else COMPONENTS[name])).train()
    x, d, y = batch()
    logits, outputs = model(x, d, return_outputs=True)
    assert logits.shape == (12, 5) and outputs["features"].shape[0] == 12 and outputs["routing"].shape == (12, 3)
    assert all(v.ndim == 0 and torch.isfinite(v) for v in outputs["terms"].values())
    assert ("moe_balance" in outputs["terms"]) == (model.config.head == "moe")
    assert ("projection" in outputs) == (model.config.proj_dim > 0)
    loss = logits.logsumexp(1).mean() + sum(outputs["terms"].values())
    if "projection" in outputs:
        loss = loss + outputs["projection"].pow(2).mean()
    loss.backward()
    # every parameter gets a gradient each step (DDP without find_unused_parameters)
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    model.eval()
    for domains in (torch.full((12,), -1), None, torch.tensor([0, -1, 2] * 4)):
        out = model(x, domains)
        assert out.shape == (12, 5) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["stage_adapters", "domain_bn", "moe"])
def test_component_is_selected_per_image(name):
    model = tiny(adapters=False, **COMPONENTS[name]).eval()
    perturb(model)
    x = batch()[0][:1].repeat(3, 1, 1, 1)
    out = model(x, torch.tensor([0, 1, 2]))
    assert not torch.allclose(out[0], out[1], atol=1e-4) and not torch.allclose(out[1], out[2], atol=1e-4)
    # an image's output does not depend on the rest of the batch (eval)
    assert torch.allclose(model(x[:1], torch.tensor([1])), out[1:2], atol=1e-4)


def test_domain_bn_trains_each_domain_on_its_own_statistics():
    model = tiny(adapters=False, domain_bn=True).train()
    bn = next(m for m in model.modules() if isinstance(m, DomainBatchNorm2d))
    x, d, _ = batch()
    x[d == 2] += 5.0  # domain c is shifted
    before = bn.running_mean.clone()
    model(x, d)
    moved = (bn.running_mean - before).abs().sum(1)
    assert moved.gt(0).all()
    model(x[d != 1], d[d != 1])  # domain b absent: its statistics stay as they were
    after = bn.running_mean.clone()
    model(x[d == 0], d[d == 0])
    assert torch.equal(bn.running_mean[1], after[1]) and torch.equal(bn.running_mean[2], after[2])


def test_unknown_domain_routes_inside_the_backbone_by_prototypes():
    model = tiny(adapters=False, **COMPONENTS["domain_bn"], **COMPONENTS["stage_adapters"]).eval()
    perturb(model)
    x, d, _ = batch()
    model.fit_prototypes(x, d)
    feats = model.features(x)  # routing features: every domain mixed equally
    weights = model.domain_weights(feats, torch.full((12,), -1))
    assert torch.allclose(weights.sum(1), torch.ones(12), atol=1e-5)
    # whatever the prototypes decide is what the backbone's per-domain parts use: force a decision
    chosen = torch.tensor([2, 0, 1] * 4)
    model.domain_weights = lambda f, dom: torch.nn.functional.one_hot(chosen, 3).float()
    assert torch.allclose(model(x, torch.full((12,), -1)), model(x, chosen), atol=1e-5)


def test_domain_bn_is_refused_on_a_backbone_without_batchnorm():
    with pytest.raises(ValueError, match=r"domain batch-norm.*'test_vit'"):
        MultiDomainModel(ModelConfig("test_vit", ["a", "b"], CLASSES, domain_bn=True))


def test_bad_component_settings_are_clear_errors():
    with pytest.raises(ValueError, match="head"):
        tiny(head="bogus")
    with pytest.raises(ValueError, match="stage_adapters index 9"):
        tiny(stage_adapters=[9])
    with pytest.raises(ValueError, match="twice"):
        tiny(stage_adapters=[-2, 3])
    # configs saved before the methods owned their losses still load (their loss weights are ignored)
    old = ModelConfig.from_dict({"backbone": "test_resnet", "domains": ["a"], "classes": ["0"], "supcon_weight": 0.1,
                                 "align": "coral", "align_weight": 0.1, "supcon_temperature": 0.1})
    assert old.backbone == "test_resnet" and not hasattr(old, "align_weight")


def test_save_load_roundtrip_of_full_config_and_deepcopy(tmp_path):
    model = tiny(**FULL).eval()
    perturb(model)
    x, d, _ = batch()
    model.fit_prototypes(x, d)
    save_model(model, tmp_path / "m")
    again = load_model(tmp_path / "m")
    assert again.config == model.config
    for domains in (d, None):
        assert torch.allclose(model(x, domains), again(x, domains), atol=1e-5)
    twin = copy.deepcopy(model)  # the stage-adapter hooks must follow the copy, not the original
    with torch.no_grad():
        for bank in model.stage_adapters.values():
            bank.up.add_(1.0)
    assert torch.allclose(twin(x, d), again(x, d), atol=1e-5)


def test_pretrained_plain_backbone_loads_into_domain_bn():
    plain = tiny()
    model = tiny(domain_bn=True)
    model.load_backbone(plain.backbone.state_dict())
    bn = next(m for m in model.backbone.modules() if isinstance(m, DomainBatchNorm2d))
    assert bn.weight.shape[0] == 3


@pytest.mark.parametrize("momentum", [0.1, None])
def test_domain_bn_kernel_path_matches_the_routed_path(momentum):
    """A batch grouped by domain (the model's order in training on CPU) takes torch's batch-norm kernel per
    domain; it must give the routed computation's outputs, gradients and running statistics (a domain
    absent from the batch included)."""
    torch.manual_seed(0)
    fast = DomainBatchNorm2d(8, 3, momentum=momentum)
    with torch.no_grad():
        fast.weight.uniform_(0.5, 1.5)
        fast.bias.uniform_(-0.5, 0.5)
    routed = copy.deepcopy(fast)
    weights = torch.linspace(0, 1, 12 * 8 * 25).reshape(12, 8, 5, 5)
    for _ in range(3):
        x = torch.randn(12, 8, 5, 5) * 2 + 1
        domain = torch.tensor([0, 2])[torch.randint(0, 2, (12,))].sort().values
        route = torch.nn.functional.one_hot(domain, 3).float()
        results = []
        for m, groups in ((fast, torch.bincount(domain, minlength=3).tolist()), (routed, None)):
            m.train()
            m.set_route(route, groups)
            assert m._kernel_path_fits(x) == (groups is not None)
            xx = x.clone().requires_grad_(True)
            y = m(xx)
            (y * weights).sum().backward()
            results.append([y.detach(), xx.grad, m.weight.grad.clone(), m.bias.grad.clone()])
            m.weight.grad = m.bias.grad = None
        for a, b in zip(*results):
            assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    assert torch.allclose(fast.running_mean, routed.running_mean, atol=1e-5)
    assert torch.allclose(fast.running_var, routed.running_var, atol=1e-5)
    assert torch.equal(fast.running_mean[1], torch.zeros(8))  # domain 1 never came: untouched


@pytest.mark.parametrize("grouped", [True, False])
def test_frozen_domains_keep_their_statistics_in_training(grouped):
    """A frozen domain's images are normalized by its running statistics in training too (as in eval), and
    no batch updates them; the other domains train on batch statistics as before. Both computations."""
    torch.manual_seed(0)
    bn = DomainBatchNorm2d(4, 3)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
    plain = copy.deepcopy(bn)
    assert freeze_domain_statistics(bn, [0, 1]) == 1
    x = torch.randn(10, 4, 5, 5) * 3 + 1
    domain = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2, 2])
    route = torch.nn.functional.one_hot(domain, 3).float()
    groups = torch.bincount(domain, minlength=3).tolist() if grouped else None
    before = bn.running_mean.clone(), bn.running_var.clone()
    for m in (bn, plain):
        m.train()
        m.set_route(route, groups)
    y, y_plain = bn(x), plain(x)
    assert torch.equal(bn.running_mean[:2], before[0][:2]) and torch.equal(bn.running_var[:2], before[1][:2])
    assert not torch.allclose(bn.running_mean[2], before[0][2])  # the unfrozen domain still learns its statistics
    assert torch.allclose(y[7:], y_plain[7:], atol=1e-5)
    assert not torch.allclose(y[:7], y_plain[:7], atol=1e-2)  # batch statistics would differ
    bn.eval()
    assert torch.allclose(bn(x)[:7], y[:7], atol=1e-5)  # frozen = normalized as at inference
    freeze_domain_statistics(bn, [])
    bn.train()
    assert torch.allclose(bn(x), plain(x), atol=1e-5)  # released: batch statistics again
    with pytest.raises(ValueError, match="not domain indices"):
        freeze_domain_statistics(bn, [3])


def test_domain_bn_one_value_per_channel_takes_the_routed_path():
    """A domain with a single image at 1x1 spatial size: torch's kernel refuses it, the routed path not."""
    bn = DomainBatchNorm2d(4, 2).train()
    bn.set_route(torch.nn.functional.one_hot(torch.tensor([0, 0, 1]), 2).float(), [2, 1])
    x = torch.randn(3, 4, 1, 1)
    assert not bn._kernel_path_fits(x)
    assert torch.isfinite(bn(x)).all()


def test_model_in_domain_order_matches_the_routed_model():
    """Training on CPU, the model runs a shuffled batch in domain order and undoes the order on the pooled
    features: logits, every gradient and the running statistics equal the routed computation's."""
    grouped = tiny(domain_bn=True, stage_adapters=[-2], stage_adapter_dim=4)
    perturb(grouped)
    routed = copy.deepcopy(grouped)
    for m in routed._routed:  # force the routed computation: the model's grouping is never read
        m._kernel_path_fits = lambda x: False
    calls = []
    for m in grouped.modules():
        if isinstance(m, DomainBatchNorm2d):
            m._normalize_groups = lambda xf, groups, run=m._normalize_groups: calls.append(groups) or run(xf, groups)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(12, 3, 32, 32, generator=g), torch.randint(0, 5, (12,), generator=g)
    d = torch.tensor([2, 0, 1, 0, 2, 2, 1, 0, 0, 2, 1, 2])
    grads = []
    for model in (grouped, routed):
        model.train()
        logits = model(x, d)
        torch.nn.functional.cross_entropy(logits, y).backward()
        grads.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    assert calls and all(groups == [4, 3, 5] for groups in calls)  # the kernel path ran, on domain order
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-4)
    assert grads[0][1].keys() == grads[1][1].keys()
    for name, grad in grads[0][1].items():
        assert torch.allclose(grad, grads[1][1][name], atol=1e-4), name
    bn_a = [m for m in grouped.modules() if isinstance(m, DomainBatchNorm2d)]
    bn_b = [m for m in routed.modules() if isinstance(m, DomainBatchNorm2d)]
    for a, b in zip(bn_a, bn_b):
        assert torch.allclose(a.running_mean, b.running_mean, atol=1e-5)
        assert torch.allclose(a.running_var, b.running_var, atol=1e-5)
    assert all(m.groups is None and m.route is None for m in grouped._routed)  # nothing left set after forward
