"""mdcore.continual: GEM metrics, replay selection and batches, growing a model by a domain (old domains
unchanged, new one a copy of the nearest), few-shot training that cannot touch other domains, test-time
normalization that changes only the new domain's statistics."""
import numpy as np
import pytest
import torch

from mdcore.continual import (add_domain, few_shot_mask, gem_metrics, mixed_batches, nearest_domain,
                              replay_budget, restore_domains, select_replay, recompute_domain_norm,
                              train_only_domain_parts)
from mdcore.models.model import ModelConfig, MultiDomainModel

CLASSES = [str(i) for i in range(4)]
FULL = dict(domain_bn=True, stage_adapters=[-2], stage_adapter_dim=4, head="moe", moe_experts=2, proj_dim=8,
            input_norm="none")


def tiny(**kw) -> MultiDomainModel:
    torch.manual_seed(0)
    return MultiDomainModel(ModelConfig("test_resnet", ["a", "b"], CLASSES, adapter_dim=8, **(FULL | kw)))


def perturb(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 1 and p.shape[0] == 2 and not name.startswith("head.experts"):
                p.add_(torch.randn_like(p) * 0.3)
        for name, p in model.named_parameters():
            if name.startswith("adapters."):
                p.add_(torch.randn_like(p) * 0.1)


def styled(kind: str, n: int, seed: int) -> torch.Tensor:
    """Two visibly different 'domains': fine noise, or smooth bright gradients."""
    g = torch.Generator().manual_seed(seed)
    if kind == "noise":
        return torch.randn(n, 3, 32, 32, generator=g)
    ramp = torch.linspace(-1, 1, 32)
    return (ramp[None, None, :, None] * ramp[None, None, None, :] * 3 + 2
            + 0.05 * torch.randn(n, 3, 32, 32, generator=g))


def test_gem_metrics_follow_the_definitions():
    R = [[0.9, 0.2, 0.1], [0.8, 0.95, 0.3], [0.7, 0.9, 0.85]]
    m = gem_metrics(R, b=[0.1, 0.1, 0.1])
    assert m["ACC"] == pytest.approx((0.7 + 0.9 + 0.85) / 3)
    assert m["BWT"] == pytest.approx(((0.7 - 0.9) + (0.9 - 0.95)) / 2)
    assert m["FWT"] == pytest.approx(((0.2 - 0.1) + (0.3 - 0.1)) / 2)
    assert gem_metrics(R)["FWT"] is None
    with pytest.raises(ValueError, match="square"):
        gem_metrics([[0.1, 0.2]])


def test_replay_selection_respects_budget_and_strategy():
    domains = torch.tensor([0] * 100 + [1] * 10 + [2] * 50)
    assert replay_budget(160, 0.05) == 8 and replay_budget(1000, 0.05, max_images=20) == 20
    with pytest.raises(ValueError, match="fraction"):
        replay_budget(10, 1.5)
    for strategy in ("random", "reservoir"):
        idx = select_replay(domains, 30, strategy, seed=1)
        assert len(idx) == 30 and len(set(idx.tolist())) == 30
        assert torch.equal(idx, select_replay(domains, 30, strategy, seed=1))  # a seed decides
    per = torch.bincount(domains[select_replay(domains, 30, "reservoir", seed=3)], minlength=3).tolist()
    assert per == [10, 10, 10]  # an equal share per domain, the scarce one included
    per = torch.bincount(domains[select_replay(domains, 40, "reservoir", seed=3)], minlength=3).tolist()
    assert sum(per) == 40 and per[1] == 10  # the scarce domain gives what it has, the others share the rest
    losses = torch.rand(len(domains), generator=torch.Generator().manual_seed(0))
    idx = select_replay(domains, 6, "hardest", losses=losses)
    for d in range(3):
        mine = torch.nonzero(domains == d).flatten()
        assert set(idx[domains[idx] == d].tolist()) == set(mine[torch.argsort(losses[mine], descending=True)[:2]].tolist())
    with pytest.raises(ValueError, match="unknown replay strategy 'newest'"):
        select_replay(domains, 5, "newest")
    with pytest.raises(ValueError, match="needs one loss"):
        select_replay(domains, 5, "hardest")


def test_mixed_batches_cover_new_data_and_add_replay():
    new, replay = torch.arange(0, 50), torch.arange(100, 104)
    batches = list(mixed_batches(new, replay, 12, 4, epoch=0, seed=0))
    assert all(len(b) == 12 and int((b >= 100).sum()) == 4 for b in batches)
    assert len({int(i) for b in batches for i in b if i < 100}) == 48  # 6 batches x 8 new, no repeats
    assert all(int((b >= 100).sum()) == 0 for b in mixed_batches(new, replay[:0], 12, 4, epoch=0, seed=0))


def test_add_domain_keeps_old_domains_and_copies_the_nearest():
    model = tiny()
    perturb(model)
    model.fit_prototypes(torch.cat([styled("noise", 16, 0), styled("ramp", 16, 1)]), torch.tensor([0] * 16 + [1] * 16))
    nearest, sims = nearest_domain(model, styled("ramp", 8, 7))
    assert nearest == 1 and sims[1] > sims[0]
    assert nearest_domain(model, styled("noise", 8, 8))[0] == 0
    grown = add_domain(model, "c", init_from=nearest).eval()
    assert grown.config.domains == ["a", "b", "c"] and len(grown.adapters) == 3
    x = styled("ramp", 6, 3)
    for d in (0, 1):  # every old domain answers exactly as before
        torch.testing.assert_close(grown(x, torch.full((6,), d)), model.eval()(x, torch.full((6,), d)))
    torch.testing.assert_close(grown(x, torch.full((6,), 2)), model(x, torch.full((6,), 1)))  # a copy of "b"
    with pytest.raises(ValueError, match="already one of"):
        add_domain(model, "a", 0)
    with pytest.raises(ValueError, match="init_from=5"):
        add_domain(model, "z", 5)


def test_training_one_domains_parts_leaves_the_others_alone():
    model = tiny()
    perturb(model)
    grown = add_domain(model, "c", init_from=0)
    reference = {k: v.clone() for k, v in grown.state_dict().items()}
    trainable = train_only_domain_parts(grown)
    assert trainable > 0
    assert not any(p.requires_grad for n, p in grown.named_parameters() if n.startswith("backbone.conv1.weight"))
    opt = torch.optim.AdamW([p for p in grown.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    x, y = styled("noise", 8, 5), torch.randint(0, 4, (8,))
    grown.train()
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(grown(x, torch.full((8,), 2)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    restore_domains(grown, reference, keep=2)
    grown.eval()
    for d in (0, 1):
        torch.testing.assert_close(grown(x, torch.full((8,), d)), model.eval()(x, torch.full((8,), d)))
    assert not torch.allclose(grown(x, torch.full((8,), 2)), model(x, torch.full((8,), 0)))  # "c" learned


def test_interpolating_toward_the_grown_model_moves_shared_weights_and_keeps_the_new_domains_rows():
    from mdcore.continual import interpolate_toward

    model = tiny()
    perturb(model)
    grown = add_domain(model, "c", init_from=0)
    reference = {k: v.clone() for k, v in grown.state_dict().items()}
    opt = torch.optim.SGD(grown.parameters(), lr=0.5)
    x, y = styled("noise", 8, 5), torch.randint(0, 4, (8,))
    grown.train()
    for d in (2, 0):  # the new domain and an old one both move, with the shared weights
        loss = torch.nn.functional.cross_entropy(grown(x, torch.full((8,), d)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    trained = {k: v.clone() for k, v in grown.state_dict().items()}
    interpolate_toward(grown, reference, 0.25, keep=2)
    after = grown.state_dict()
    shared = next(k for k, v in after.items() if k.startswith("backbone.") and v.ndim == 4)  # a conv kernel
    assert not torch.equal(trained[shared], reference[shared])
    torch.testing.assert_close(after[shared], 0.25 * reference[shared] + 0.75 * trained[shared])
    bn = "backbone.bn1.weight"  # domain batch-norm: one row per domain
    assert after[bn].shape[0] == 3 and not torch.equal(trained[bn][2], reference[bn][2])
    torch.testing.assert_close(after[bn][2], trained[bn][2])  # the new domain's row: as trained
    torch.testing.assert_close(after[bn][0], 0.25 * reference[bn][0] + 0.75 * trained[bn][0])  # an old one
    interpolate_toward(grown, reference, 1.0, keep=2)  # all the way back, but for the new domain's rows
    torch.testing.assert_close(grown.state_dict()[shared], reference[shared])
    with pytest.raises(ValueError, match="alpha"):
        interpolate_toward(grown, reference, 1.5, keep=2)


def test_test_time_norm_sets_only_the_new_domains_statistics():
    from mdcore.models.domain_norm import DomainBatchNorm2d

    model = add_domain(tiny(), "c", init_from=0).eval()
    bn = next(m for m in model.modules() if isinstance(m, DomainBatchNorm2d))
    before = bn.running_mean.clone()
    assert recompute_domain_norm(model, styled("ramp", 20, 2), domain=2, batch_size=8) == 3
    assert torch.equal(bn.running_mean[:2], before[:2])
    assert not torch.allclose(bn.running_mean[2], before[2])
    assert bn.momentum == 0.1 and not model.training
    with pytest.raises(ValueError, match="domain batch-norm"):
        recompute_domain_norm(tiny(domain_bn=False), styled("ramp", 4, 2), domain=0)


def test_few_shot_mask_takes_k_per_class():
    labels = torch.tensor([0] * 20 + [1] * 3 + [2] * 15)
    mask = few_shot_mask(labels, 5, seed=0)
    assert torch.bincount(labels[mask]).tolist() == [5, 3, 5]
    assert not torch.equal(mask, few_shot_mask(labels, 5, seed=1))
    with pytest.raises(ValueError, match="k must be"):
        few_shot_mask(labels, 0)


def test_distillation_from_the_model_before_a_new_domain_covers_only_the_domains_it_knows():
    """The add step's replay distillation: the teacher (the model before the arrival) knows 2 domains; a
    batch of the new domain alone has no distillation term, a mixed batch has one from its old images."""
    from mdcore.data.images import ImageSet
    from mdcore.methods import create_method
    from mdcore.train.epoch import train_epoch

    teacher = tiny(proj_dim=0, head="linear")
    perturb(teacher)
    student = add_domain(teacher, "c", init_from=1)
    images = (torch.rand(12, 3, 32, 32) * 255).to(torch.uint8)
    data = ImageSet(images, torch.randint(0, 4, (12,)), torch.tensor([2] * 6 + [0, 1] * 3), ["a", "b", "c"], CLASSES)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.0)  # lr 0: the same weights for both epochs
    seen = []
    teacher.forward = lambda x, d, forward=teacher.forward: seen.append(d.clone()) or forward(x, d)
    method = create_method("multidomain+distill", {"kd_weight": 1.0, "kd_domains": 2})
    method.teacher = teacher
    new_only = train_epoch(student, data, optimizer, [torch.arange(6)], method, epoch=0, seed=0)
    mixed = train_epoch(student, data, optimizer, [torch.arange(12)], method, epoch=0, seed=0)
    assert "aux/kd" not in new_only and mixed["aux/kd"] > 0
    assert len(seen) == 1 and sorted(seen[0].tolist()) == [0, 0, 0, 1, 1, 1]  # only the old domains' images
