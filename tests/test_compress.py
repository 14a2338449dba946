import torch

from mdcore.compress import dequantize_state, load_compressed, prune_global, quantize_state, save_compressed
from mdcore.model import ModelConfig, MultiDomainModel, save_model


def model() -> MultiDomainModel:
    torch.manual_seed(0)
    return MultiDomainModel(ModelConfig("resnet10t", ["a", "b"], ["0", "1", "2"])).eval()


def test_global_pruning_reaches_the_requested_sparsity():
    m = model()
    assert prune_global(m, 0.0) < 0.05  # only the zero-initialised adapter up-projections
    sparsity = prune_global(m, 0.6)
    assert 0.59 < sparsity < 0.61
    assert not any(name.endswith("_orig") for name, _ in m.named_parameters())  # pruning made permanent


def test_int8_quantization_roundtrip_is_close():
    state = model().state_dict()
    restored = dequantize_state(quantize_state(state))
    assert restored.keys() == state.keys()
    w = state["backbone.conv1.0.weight"]
    err = (restored["backbone.conv1.0.weight"] - w).abs().max()
    assert err <= w.abs().max() / 127 + 1e-6


def test_compressed_variant_is_smaller_and_predicts_like_the_original(tmp_path):
    m = model()
    save_model(m, tmp_path / "orig")
    save_compressed(m, tmp_path / "small", {"prune": 0, "quantize": "int8"}, quantize=True)
    small = load_compressed(tmp_path / "small")
    size = lambda p: (p / "model.safetensors").stat().st_size  # noqa: E731
    assert size(tmp_path / "small") < 0.35 * size(tmp_path / "orig")
    assert (tmp_path / "small" / "recipe.json").is_file()
    x, d = torch.randn(16, 3, 32, 32), torch.tensor([0, 1] * 8)
    with torch.no_grad():
        agree = (m(x, d).argmax(1) == small(x, d).argmax(1)).float().mean()
    assert agree >= 0.8
