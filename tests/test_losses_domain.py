"""The training objectives: finite, differentiable, and right on cases where the answer is known."""
import torch

from mdcore.models.losses import (coral, distillation_loss, domain_alignment, load_balancing_loss, mmd, supcon_loss)


def test_supcon_pulls_same_class_across_domains():
    labels, domains = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1])
    good = torch.tensor([[1.0, 0], [1, 0.01], [0, 1], [0.01, 1]])  # classes apart, domains together
    bad = torch.tensor([[1.0, 0], [0, 1], [1, 0.01], [0.01, 1]])  # domains apart, classes mixed
    assert supcon_loss(good, labels, domains) < supcon_loss(bad, labels, domains)
    z = torch.randn(8, 4, requires_grad=True)
    loss = supcon_loss(z, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), torch.tensor([0, 1] * 4), cross_domain_only=True)
    loss.backward()
    assert torch.isfinite(loss) and z.grad.abs().sum() > 0
    alone = supcon_loss(torch.randn(3, 4, requires_grad=True), torch.tensor([0, 1, 2]))  # no positives
    assert alone.item() == 0.0 and alone.requires_grad


def test_alignment_is_zero_for_identical_domains_and_grows_with_a_shift():
    a = torch.randn(32, 6)
    assert coral(a, a).item() < 1e-5 and abs(mmd(a, a).item()) < 1e-5
    assert coral(a, a * 3 + 1) > coral(a, a + 0.01)
    assert mmd(a, a + 2) > mmd(a, a + 0.01)
    feats = torch.randn(12, 6, requires_grad=True)
    for kind in ("coral", "mmd"):
        loss = domain_alignment(feats, torch.tensor([0, 1, 2] * 4), kind)
        loss.backward()
        assert torch.isfinite(loss) and feats.grad is not None
    single = domain_alignment(feats, torch.zeros(12, dtype=torch.long))  # one domain: nothing to align
    assert single.item() == 0.0


def test_distillation_is_zero_at_the_teacher_and_positive_elsewhere():
    t = torch.randn(5, 10)
    assert distillation_loss(t, t, 4.0).abs().item() < 1e-4  # float32 log-softmax round-off, scaled by T^2
    s = torch.randn(5, 10, requires_grad=True)
    loss = distillation_loss(s, t, 2.0)
    loss.backward()
    assert loss > 0 and s.grad.abs().sum() > 0


def test_load_balancing_is_one_when_balanced_and_e_when_collapsed():
    balanced = torch.eye(4).repeat(3, 1)
    assert abs(load_balancing_loss(balanced).item() - 1.0) < 1e-6
    collapsed = torch.zeros(12, 4)
    collapsed[:, 0] = 1
    assert abs(load_balancing_loss(collapsed).item() - 4.0) < 1e-6
