"""finetune.class_balance: re-weighting by inverse class frequency (per domain) and logit adjustment change
the loss exactly as their formulas say, leave a balanced domain's loss as it was, and reach the loop."""
import pytest
import torch
import torch.nn.functional as F

from mdcore.methods import Batch, create_method
from mdcore.models.losses import ClassBalance, classification_loss


def imbalanced():
    # domain 0: 6 of class 0, 2 of class 1; domain 1: 2 and 2 (balanced)
    labels = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 1, 1])
    domains = torch.tensor([0] * 8 + [1] * 4)
    return labels, domains


def test_reweight_is_inverse_class_frequency_per_domain_with_mean_one():
    labels, domains = imbalanced()
    cb = ClassBalance("reweight", labels, domains, n_domains=2, n_classes=2)
    assert torch.allclose(cb.weights, torch.tensor([[8 / (2 * 6), 8 / (2 * 2)], [1.0, 1.0]]))
    weight, offset = cb.terms(labels, domains)
    assert offset is None and float(weight.mean()) == pytest.approx(1.0)
    # each class of domain 0 now carries the same total weight
    assert float(weight[:6].sum()) == pytest.approx(float(weight[6:8].sum()))
    logits = torch.randn(12, 2, generator=torch.Generator().manual_seed(0))
    plain = F.cross_entropy(logits, labels, reduction="none")
    assert float(classification_loss(logits, labels, weight=weight)) == pytest.approx(float((plain * weight).mean()))
    assert float(classification_loss(logits, labels, weight=weight)) != pytest.approx(float(plain.mean()))
    # the balanced domain's images keep weight 1: their loss is unchanged
    assert torch.equal(weight[8:], torch.ones(4))


def test_logit_adjustment_adds_the_log_prior_and_leaves_a_balanced_domain_unchanged():
    labels, domains = imbalanced()
    cb = ClassBalance("logit_adjust", labels, domains, n_domains=2, n_classes=2)
    weight, offset = cb.terms(labels, domains)
    assert weight is None
    assert torch.allclose(offset[0], torch.log(torch.tensor([0.75, 0.25])))
    logits = torch.randn(12, 2, generator=torch.Generator().manual_seed(1))
    per = classification_loss(logits, labels, reduction="none", logit_offset=offset)
    assert torch.allclose(per, F.cross_entropy(logits + offset, labels, reduction="none"))
    plain = F.cross_entropy(logits, labels, reduction="none")
    assert torch.allclose(per[8:], plain[8:])  # a uniform prior shifts every logit alike
    # the rare class's loss grows (its logit is pushed down in training), the common one's shrinks
    assert bool((per[6:8] > plain[6:8]).all()) and bool((per[:6] < plain[:6]).all())


def test_methods_pass_the_terms_through_and_params_reach_the_fit_config():
    from mdcore.train.setup import fit_config
    from tasks.params import FinetuneParams

    labels, domains = imbalanced()
    logits = torch.randn(12, 2, generator=torch.Generator().manual_seed(2))
    cb = ClassBalance("reweight", labels, domains, 2, 2)
    weight, _ = cb.terms(labels, domains)
    x = torch.zeros(12, 3, 4, 4)
    for spec in ("erm", "multidomain+reweight"):
        method = create_method(spec, {"weighting": "uniform"} if "reweight" in spec else None)
        method.bind(domains, 2)
        loss, _ = method.loss(Batch(x, labels, domains, 0, 0.0, weight, None), logits, {})
        expected = (F.cross_entropy(logits, labels, reduction="none") * weight)
        expected = expected.mean() if spec == "erm" else expected.sum() / 12  # groupdro: uniform weights
        assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    assert fit_config(FinetuneParams(), ["d"]).class_balance == "none"
    assert fit_config(FinetuneParams(class_balance="logit_adjust"), ["d"]).class_balance == "logit_adjust"
    with pytest.raises(ValueError):
        ClassBalance("sqrt", labels, domains, 2, 2)
