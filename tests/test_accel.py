import pytest
import torch

from mdcore.models.accel import FastForward
from mdcore.models.model import ModelConfig, MultiDomainModel


def model():
    torch.manual_seed(0)
    return MultiDomainModel(ModelConfig("resnet10t", ["a", "b"], ["0", "1", "2"]))


@pytest.mark.parametrize("precision,channels_last", [("bf16", False), ("fp32", True), ("bf16", True)])
def test_fast_forward_trains_and_returns_float32(precision, channels_last):
    inner = model()
    fast = FastForward(inner, precision, channels_last)
    x, d = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 0, -1])
    logits, outputs = fast(x, d, return_outputs=True)
    assert logits.dtype == torch.float32 and logits.shape == (4, 3)
    logits.sum().backward()
    assert inner.head.weight.grad is not None and torch.isfinite(inner.head.weight.grad).all()
    if channels_last:
        conv = next(m for m in inner.modules() if isinstance(m, torch.nn.Conv2d))
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    # the saved weights are the inner model's: no wrapper prefixes, still float32
    assert all(v.dtype != torch.bfloat16 for v in inner.state_dict().values())


def test_bf16_stays_close_to_fp32():
    inner = model().eval()
    x, d = torch.randn(8, 3, 32, 32), torch.tensor([0, 1] * 4)
    with torch.no_grad():
        ref = inner(x, d)
        low = FastForward(inner, "bf16")(x, d)
    assert (ref - low).abs().max() < 0.1 * ref.abs().max() + 0.05


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision"):
        FastForward(model(), "fp8")
