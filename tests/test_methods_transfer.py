"""Transfer-learning controls: freezing really freezes, gradual unfreezing follows its schedule,
parameter groups get their learning rates, warm restarts, per-domain loss weighting, early stopping,
and the epoch hooks the finetune stage calls."""
import pytest
import torch

from mdcore.images import ImageSet
from mdcore.train import finetune_epoch
from mdcore.transfer import DomainWeighting, EarlyStopping, frozen_group_count, per_domain_parameter_names
from tasks.model_setup import (build_model, build_optimizer, early_stopping, epoch_kwargs,
                               needs_find_unused_parameters, on_epoch_start)
from tasks.params import FinetuneParams


def tiny_data(n=24) -> ImageSet:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    return ImageSet(images, torch.randint(0, 4, (n,), generator=g), torch.tensor([0, 1, 2] * (n // 3)),
                    ["a", "b", "c"], ["0", "1", "2", "3"])


def setup(**kw):
    torch.manual_seed(0)
    p = FinetuneParams(epochs=4, adapter_dim=8, **kw)
    data = tiny_data()
    model = build_model(p, data, "test_resnet", 32)
    optimizer, scheduler = build_optimizer(p, model)
    return p, data, model, optimizer, scheduler


def one_epoch(p, data, model, optimizer, epoch=0, **extra):
    batches = [torch.arange(0, 12), torch.arange(12, 24)]
    return finetune_epoch(model, data, optimizer, batches, epoch=epoch, seed=0, label_smoothing=0.1,
                          **(epoch_kwargs(p, data) | extra))


def snapshot(module):
    return {n: t.detach().clone() for n, t in module.named_parameters()}


def test_freeze_stages_keeps_early_groups_unchanged_and_trains_the_rest():
    p, data, model, optimizer, _ = setup(freeze_stages=2)
    assert needs_find_unused_parameters(p)
    on_epoch_start(p, model, optimizer, 0)
    before = snapshot(model)
    one_epoch(p, data, model, optimizer)
    per_domain = {f"backbone.{n}" for n in per_domain_parameter_names(model.backbone)}  # stay trainable
    stem_and_first = [n for n in before if n.startswith(("backbone.conv1", "backbone.bn1", "backbone.layer1."))
                      and n not in per_domain]
    assert stem_and_first and all(torch.equal(before[n], dict(model.named_parameters())[n]) for n in stem_and_first)
    assert all(not dict(model.named_parameters())[n].requires_grad for n in stem_and_first)
    later = [n for n in before if n.startswith("backbone.layer3.") and n.endswith("weight")]
    assert any(not torch.equal(before[n], dict(model.named_parameters())[n]) for n in later)


def test_adapters_only_freezes_the_backbone_but_keeps_domain_bn_trainable():
    p, data, model, optimizer, _ = setup(adapters_only=True, domain_bn=True, stage_adapters=[-2])
    on_epoch_start(p, model, optimizer, 0)
    before = snapshot(model)
    one_epoch(p, data, model, optimizer)
    after = dict(model.named_parameters())
    per_domain = {f"backbone.{n}" for n in per_domain_parameter_names(model.backbone)}
    assert per_domain and any(not torch.equal(before[n], after[n]) for n in per_domain)
    for name, value in before.items():
        if name.startswith("backbone.") and name not in per_domain:
            assert torch.equal(value, after[name]), name
    assert not torch.equal(before["head.weight"], after["head.weight"])
    assert not torch.equal(before["stage_adapters.3.up"], after["stage_adapters.3.up"])


def test_gradual_unfreezing_schedule():
    assert [frozen_group_count(e, 5, unfreeze_every=1) for e in range(7)] == [5, 4, 3, 2, 1, 0, 0]
    assert [frozen_group_count(e, 5, freeze_stages=2, unfreeze_every=2) for e in range(8)] == [5, 5, 4, 4, 3, 3, 2, 2]
    p, data, model, optimizer, _ = setup(gradual_unfreeze_every=1)
    shared = [n for n, _ in model.backbone.named_parameters() if n not in per_domain_parameter_names(model.backbone)]
    trainable = []
    for epoch in range(6):
        on_epoch_start(p, model, optimizer, epoch)
        params = dict(model.backbone.named_parameters())
        trainable.append(sum(params[n].requires_grad for n in shared))
    assert trainable == sorted(trainable) and trainable[0] == 0 and trainable[-1] == len(shared)


def test_parameter_groups_get_their_learning_rates():
    p, data, model, optimizer, scheduler = setup(layer_decay=0.5, lr=1e-2, stage_adapters=[-2], head="moe")
    scheduler.step(1)  # after the warm-up epoch: every group at lr x its layer scale
    lr_of = {id(t): g["lr"] for g in optimizer.param_groups for t in g["params"]}
    head, stem = lr_of[id(model.head.gate.weight)], lr_of[id(model.backbone.conv1[0].weight)]
    assert head == pytest.approx(lr_of[id(model.stage_adapters["3"].up)])
    assert stem == pytest.approx(head * 0.5 ** 5, rel=1e-3)  # 5 layer groups below the top one
    assert head <= 1e-2


def test_cosine_warm_restarts():
    p, _, _, optimizer, scheduler = setup(lr_cycles=2, lr_cycle_decay=0.5)
    p = p.model_copy(update={"epochs": 10})
    optimizer, scheduler = build_optimizer(p, build_model(p, tiny_data(), "test_resnet", 32))
    lrs = []
    for epoch in range(10):
        scheduler.step(epoch)
        lrs.append(optimizer.param_groups[-1]["lr"])
    assert lrs[5] > lrs[4]  # restart at epoch 5
    assert max(lrs[5:]) < max(lrs[:5])  # decayed peak


@pytest.mark.parametrize("mode", ["inverse_frequency", "groupdro"])
def test_domain_weighting_modes(mode):
    w = DomainWeighting(3, mode, counts=torch.tensor([100, 100, 10]))
    if mode == "inverse_frequency":
        weights = w.sample_weights(torch.tensor([0, 1, 2]), 0)
        assert weights[2] == pytest.approx(10 * weights[0])
    else:
        for _ in range(5):  # domain 2 is the worst: GroupDRO up-weights it
            w.update(torch.tensor([0.1, 0.1, 2.0]), torch.tensor([0, 1, 2]))
        assert w.q.argmax() == 2 and w.q.sum() == pytest.approx(1.0)
    p, data, model, optimizer, _ = setup(domain_weighting=mode)
    stats = one_epoch(p, data, model, optimizer)
    assert stats["images"] == 24 and torch.isfinite(torch.tensor(stats["loss"]))


def test_easy_first_curriculum_fades_to_even():
    w = DomainWeighting(3, "uniform", curriculum="easy_first", curriculum_epochs=4)
    w.update(torch.tensor([0.1, 1.0, 2.0]), torch.tensor([0, 1, 2]))
    start, end = w.domain_weights(0), w.domain_weights(4)
    assert start[0] > start[1] > start[2]
    assert torch.allclose(end, torch.ones(3))


def test_early_stopping():
    stop = EarlyStopping(patience=2, min_delta=0.01)
    assert [stop.step(v, e) for e, v in enumerate([0.5, 0.6, 0.605, 0.59, 0.7])] == [False, False, False, True, False]
    assert stop.best_value == 0.7 and stop.best_epoch == 4
    assert not any(early_stopping(FinetuneParams()).step(0.1, e) for e in range(10))  # patience 0: never


def test_every_aux_loss_reaches_the_training_step():
    p, data, model, optimizer, _ = setup(head="moe", supcon_weight=0.1, align="mmd", align_weight=0.1)
    stats = one_epoch(p, data, model, optimizer)
    assert {"aux/moe_balance", "aux/supcon", "aux/align"} <= set(stats)


def test_distillation_from_a_teacher():
    p, data, model, optimizer, _ = setup()
    teacher = build_model(p, data, "test_resnet", 32)
    stats = one_epoch(p, data, model, optimizer, teacher=teacher, kd_weight=1.0, kd_temperature=2.0)
    assert stats["aux/kd"] > 0
