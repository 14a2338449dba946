"""The ablation's variant registry and report, with a fake trainer (no training here)."""
import pytest

from flows.ablation import ERM, VARIANTS, aggregate, list_variants, variant_params
from tasks.params import FinetuneParams


def test_every_variant_is_valid_finetune_params_and_erm_has_no_per_domain_parts():
    for name in list_variants():
        FinetuneParams.model_validate(variant_params(name, FinetuneParams().model_dump()))
    erm = FinetuneParams.model_validate(variant_params("erm", FinetuneParams().model_dump()))
    assert not erm.adapters and not erm.domain_bn and not erm.stage_adapters and erm.head == "linear"
    full = variant_params("full", {})
    assert all(full[k] == v for name, c in VARIANTS.items() if name not in ("erm", "full") for k, v in c.items())
    with pytest.raises(ValueError, match="known: .*erm"):
        variant_params("nope", {})
    assert set(ERM) <= set(FinetuneParams.model_fields)


def test_aggregate_means_over_seeds():
    def fake(acc):
        return {"a": {"kind": "seen", "images": 10, "acc": acc, "acc_unknown_domain": acc - 0.1},
                "b": {"kind": "seen", "images": 10, "acc": acc - 0.2, "acc_unknown_domain": acc - 0.2},
                "h": {"kind": "held-out", "images": 5, "acc": 0.5, "acc_unknown_domain": 0.5},
                "_run": {"s_per_epoch": 1.0, "parameters": 100}}
    agg = aggregate({"erm": {0: fake(0.9), 1: fake(0.7)}})
    s = agg["erm"]["summary"]
    assert s["mean_seen_acc"]["mean"] == pytest.approx(0.7)
    assert s["worst_seen_acc"]["mean"] == pytest.approx(0.6)
    assert s["mean_heldout_acc"]["mean"] == pytest.approx(0.5)


def test_shipped_arms_keep_the_shipped_params_and_val_accuracy_is_aggregated():
    base = FinetuneParams().model_dump()
    assert variant_params("shipped", base) == base
    assert variant_params("no_domain_bn", base) == base | {"domain_bn": False}

    def fake(acc):
        return {"a": {"kind": "seen", "images": 10, "acc": acc, "acc_unknown_domain": acc, "val_acc": acc},
                "b": {"kind": "seen", "images": 10, "acc": acc, "acc_unknown_domain": acc, "val_acc": acc - 0.2},
                "h": {"kind": "held-out", "images": 5, "acc": 0.5, "acc_unknown_domain": 0.5},
                "_run": {"s_per_epoch": 1.0, "parameters": 100}}
    s = aggregate({"shipped": {0: fake(0.9), 1: fake(0.7)}})["shipped"]["summary"]
    assert s["mean_seen_val_acc"]["mean"] == pytest.approx(0.7)
    assert s["worst_seen_val_acc"]["values"] == pytest.approx([0.7, 0.5])
