import pytest
import torch
from timm.optim import create_optimizer_v2

from mdcore.models.model import ModelConfig, MultiDomainModel, load_model, save_model

CLASSES = [str(i) for i in range(5)]


def tiny(**kw) -> MultiDomainModel:
    return MultiDomainModel(ModelConfig("test_resnet", ["a", "b", "c"], CLASSES, adapter_dim=8, **kw))


def test_forward_shapes_with_known_unknown_and_missing_domains():
    model = tiny().eval()
    x = torch.randn(6, 3, 32, 32)
    assert model(x, torch.tensor([0, 1, 2, -1, 0, -1])).shape == (6, 5)
    assert model(x).shape == (6, 5)
    assert torch.isfinite(model(x)).all()


def test_adapters_are_selected_per_image():
    model = tiny().eval()
    with torch.no_grad():
        for adapter in model.adapters:
            torch.nn.init.normal_(adapter.up.weight)
    x = torch.randn(1, 3, 32, 32).repeat(3, 1, 1, 1)
    out = model(x, torch.tensor([0, 1, 2]))
    assert not torch.allclose(out[0], out[1]) and not torch.allclose(out[1], out[2])
    # the same image with the same domain gives the same output, whatever else is in the batch
    assert torch.allclose(model(x[:1], torch.tensor([1])), out[1:2], atol=1e-5)


def test_unknown_domain_routes_to_nearest_prototype():
    model = tiny().eval()
    feats = torch.eye(model.num_features)[:3] * 5
    model.prototypes.copy_(torch.eye(model.num_features)[:3])
    weights = model.domain_weights(feats, torch.tensor([-1, -1, -1]))
    assert weights.argmax(1).tolist() == [0, 1, 2]
    assert torch.allclose(weights.sum(1), torch.ones(3))
    known = model.domain_weights(feats, torch.tensor([2, 0, 1]))
    assert known.argmax(1).tolist() == [2, 0, 1] and known.max(1).values.eq(1).all()


def test_fit_prototypes_gives_each_domain_its_mean_feature():
    model = tiny()
    images, domains = torch.randn(12, 3, 32, 32), torch.tensor([0, 1, 2] * 4)
    model.fit_prototypes(images, domains)
    assert model.training  # restored
    assert model.prototypes.abs().sum(1).gt(0).all()
    with torch.no_grad():
        model.eval()
        f = torch.nn.functional.normalize(model.features(images[domains == 1]), dim=1).mean(0)
    assert torch.allclose(model.prototypes[1], f, atol=1e-5)


def test_save_and_load_roundtrip(tmp_path):
    model = tiny().eval()
    model.prototypes.normal_()
    save_model(model, tmp_path / "m")
    assert {p.name for p in (tmp_path / "m").iterdir()} == {"model.safetensors", "config.json"}
    again = load_model(tmp_path / "m")
    x = torch.randn(4, 3, 32, 32)
    d = torch.tensor([0, -1, 2, 1])
    assert torch.allclose(model(x, d), again(x, d), atol=1e-6)
    assert again.config == model.config


def test_layer_decay_gives_early_layers_smaller_learning_rates():
    model = MultiDomainModel(ModelConfig("resnet10t", ["a", "b"], CLASSES))
    opt = create_optimizer_v2(model, "adamw", lr=1.0, weight_decay=0.05, layer_decay=0.5)
    scale_of = {}
    for group in opt.param_groups:
        for p in group["params"]:
            scale_of[id(p)] = group["lr_scale"]
    stem = scale_of[id(next(model.backbone.conv1.parameters()))]
    head = scale_of[id(model.head.weight)]
    adapter = scale_of[id(model.adapters[0].down.weight)]
    assert head == adapter == 1.0
    assert stem < 0.1 * head


def test_unknown_backbone_and_bad_config_are_clear_errors():
    with pytest.raises(ValueError, match="no_such_net"):
        MultiDomainModel(ModelConfig("no_such_net", ["a"], CLASSES))
    with pytest.raises(ValueError, match="input_norm"):
        tiny(input_norm="bogus")
