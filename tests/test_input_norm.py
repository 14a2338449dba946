"""Input normalization from timm's pretrained_cfg: applied inside the model (so a saved model, evaluate and
the ONNX export normalize identically), chosen by ``input_norm: auto|image|pretrained|none``."""
import json

import pytest
import torch
from safetensors.torch import save_file

from mdcore.data.images import ImageSet, to_float
from mdcore.models.input_norm import recorded_norm, resolve
from mdcore.models.model import ModelConfig, MultiDomainModel, create_backbone, load_model, save_model
from mdcore.train.setup import build_model
from tasks.params import FinetuneParams, ParamsError, load_params

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def tiny(**kw) -> MultiDomainModel:
    return MultiDomainModel(ModelConfig("test_resnet", ["a", "b"], ["0", "1", "2"], adapter_dim=8, **kw)).eval()


def test_pretrained_norm_equals_feeding_normalized_pixels_by_hand():
    torch.manual_seed(0)
    normed = tiny(input_norm="pretrained", input_mean=MEAN, input_std=STD)
    plain = tiny(input_norm="none")
    plain.load_state_dict(normed.state_dict(), strict=True)  # mean/std live in the config, not the weights
    x = torch.rand(4, 3, 32, 32) * 2 - 1  # what the loaders feed: to_float, [-1, 1]
    pixels01 = (x + 1) / 2
    by_hand = (pixels01 - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    d = torch.tensor([0, 1, -1, 0])
    with torch.no_grad():
        assert torch.allclose(normed(x, d), plain(by_hand, d), atol=1e-5)
        # and it is not per-image standardization
        image = tiny(input_norm="image")
        image.load_state_dict(normed.state_dict())
        assert not torch.allclose(normed(x, d), image(x, d), atol=1e-3)


def test_config_roundtrip_and_onnx_export_apply_the_same_norm(tmp_path):
    from mdcore.deploy.export import export_onnx, ort_logits, session

    model = tiny(input_norm="pretrained", input_mean=MEAN, input_std=STD)
    save_model(model, tmp_path / "m")
    saved = json.loads((tmp_path / "m/config.json").read_text())
    assert saved["input_norm"] == "pretrained" and saved["input_mean"] == MEAN and saved["input_std"] == STD
    loaded = load_model(tmp_path / "m")
    assert loaded.config == model.config
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    d = torch.tensor([0, 1, -1, 1, 0])
    with torch.no_grad():
        ref = model(to_float(images), d)
        assert torch.allclose(loaded(to_float(images), d), ref, atol=1e-5)
    onnx_out = ort_logits(session(export_onnx(loaded, tmp_path / "m.onnx")), images, d)
    assert torch.allclose(onnx_out, ref, atol=1e-4)


def test_pretrained_needs_mean_and_std():
    with pytest.raises(ValueError, match="input_mean and input_std"):
        tiny(input_norm="pretrained")
    with pytest.raises(ValueError, match="input_std"):
        tiny(input_norm="pretrained", input_mean=MEAN, input_std=[0.2, 0.0, 0.2])


def test_auto_follows_the_weights_recorded_pretrained_cfg(tmp_path):
    """A weights file with a recorded pretrained_cfg (the pretrain stage's config.json beside it) makes
    ``auto`` normalize with it; without one, the method's own choice; an explicit choice wins."""
    backbone = create_backbone("test_resnet")
    folder = tmp_path / "pretrained"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, str(folder / "backbone.safetensors"))
    weights = str(folder / "backbone.safetensors")
    train = ImageSet(torch.zeros(4, 3, 32, 32, dtype=torch.uint8), torch.zeros(4, dtype=torch.long),
                     torch.zeros(4, dtype=torch.long), ["a"], ["0", "1"])
    p = FinetuneParams(method="multidomain")  # its own choice: per-image standardization
    (folder / "config.json").write_text(json.dumps({"pretrained_cfg": None}))
    assert recorded_norm(weights) is None
    assert build_model(p, train, "test_resnet", 32, weights).config.input_norm == "image"
    (folder / "config.json").write_text(json.dumps({"pretrained_cfg": {"mean": MEAN, "std": STD, "input_size": None}}))
    cfg = build_model(p, train, "test_resnet", 32, weights).config
    assert (cfg.input_norm, cfg.input_mean, cfg.input_std) == ("pretrained", MEAN, STD)
    explicit = build_model(p.model_copy(update={"input_norm": "image"}), train, "test_resnet", 32, weights)
    assert explicit.config.input_norm == "image" and explicit.config.input_mean is None
    # erm's own choice is no normalization; pretrained without weights takes timm's default cfg of the arch
    assert build_model(FinetuneParams(method="erm", adapters=False, domain_bn=False), train, "test_resnet", 32).config.input_norm == "none"
    assert resolve("pretrained", None, "image", "resnet10t")[1:] == ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def test_pretrain_records_what_the_exported_weights_expect():
    from tasks.pretrain import exported_norm

    tag = {"mean": MEAN, "std": STD, "input_size": [3, 224, 224], "interpolation": "bicubic"}
    # the interpolation recorded is the resize filter this run used (another run's `resize: auto` takes it)
    assert exported_norm("pretrained", MEAN, STD, tag, "bicubic", trained=True) == tag  # SimCLR ran with that norm
    assert exported_norm("pretrained", MEAN, STD, tag, "bilinear", trained=True) == tag | {"interpolation": "bilinear"}
    assert exported_norm("image", None, None, tag, "bicubic", trained=False) == tag  # untouched weights keep theirs
    assert exported_norm("image", None, None, tag, "bicubic", trained=True) is None  # retrained on standardized images
    assert exported_norm("image", None, None, None, "bilinear", trained=False) is None  # random weights: nothing


def test_a_bad_input_norm_names_the_file_and_field(tmp_path):
    (tmp_path / "finetune.yaml").write_text("input_norm: imagenet\n")
    with pytest.raises(ParamsError, match=r"(?s)finetune.yaml.*input_norm"):
        load_params("finetune", tmp_path)
    (tmp_path / "pretrain.yaml").write_text("input_norm: per_image\n")
    with pytest.raises(ParamsError, match=r"(?s)pretrain.yaml.*input_norm"):
        load_params("pretrain", tmp_path)
