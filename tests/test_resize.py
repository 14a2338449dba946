"""The resize filter is part of the model: the starting weights' ``pretrained_cfg`` interpolation (bicubic for
the ImageNet EfficientNet-Lite0) chooses it with ``pretrain.resize: auto``; training, the decoded cache and a
shipped ONNX file's predictions all use the one the model records."""
import numpy as np
import pytest
import torch
from PIL import Image


def _noise_images(folder, n=4, side=48):
    """Photos with detail at every scale, so the two filters give different pixels."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_auto_takes_the_weights_interpolation_and_a_wrong_value_names_the_param():
    from mdcore.models.input_norm import resize_for, timm_default_norm

    lite0 = timm_default_norm("tf_efficientnet_lite0")
    assert lite0["interpolation"] == "bicubic"
    assert resize_for("auto", lite0) == "bicubic"
    assert resize_for("auto", None) == "bilinear"  # random weights: no preference, the former behaviour
    assert resize_for("auto", {"interpolation": "lanczos"}) == "bilinear"  # one PIL filter we do not offer
    assert resize_for("bilinear", lite0) == "bilinear"  # an explicit choice wins
    with pytest.raises(ValueError, match="pretrain.resize='nearest'"):
        resize_for("nearest", lite0, "pretrain.resize")


def test_params_reject_an_unknown_filter():
    from pydantic import ValidationError

    from tasks.params import PretrainParams

    assert PretrainParams().resize == "auto"
    with pytest.raises(ValidationError, match="resize"):
        PretrainParams(resize="nearest")


def test_decoding_and_the_decoded_cache_keep_the_filters_apart(tmp_path):
    from mdcore.data.decode import decode_resized
    from mdcore.data.lazy_images import LazyImages

    paths = _noise_images(tmp_path)
    bilinear = np.stack([decode_resized(p, 16) for p in paths])
    bicubic = np.stack([decode_resized(p, 16, "bicubic") for p in paths])
    assert np.abs(bilinear.astype(int) - bicubic.astype(int)).mean() > 2  # really another filter
    cache = tmp_path / "cache"
    first = LazyImages(paths, 16, cache_dir=cache, resize="bilinear")[[0, 1, 2, 3]]
    second = LazyImages(paths, 16, cache_dir=cache, resize="bicubic")[[0, 1, 2, 3]]  # same files, same size
    assert torch.equal(first, torch.from_numpy(bilinear)) and torch.equal(second, torch.from_numpy(bicubic))
    assert len(list(cache.glob("*.npy"))) == 8
    masked = LazyImages(paths, 16, resize="bicubic")[torch.tensor([True, False, True, False])]
    assert masked.resize == "bicubic"


def test_a_shipped_model_is_fed_with_the_filter_it_was_trained_with(tmp_path):
    """The exported file records the filter (metadata and model card); ``mdpipe predict`` decodes with it."""
    import pandas as pd

    from mdcore.data.decode import decode_resized
    from mdcore.data.images import to_float
    from mdcore.deploy.bundle import export_deployable, read_metadata
    from mdcore.deploy.predict import predict_frame
    from mdcore.models.model import ModelConfig, MultiDomainModel, save_model

    torch.manual_seed(0)
    model = MultiDomainModel(ModelConfig("test_resnet", ["a", "b"], [str(c) for c in range(5)], image_size=16,
                                         resize="bicubic")).eval()
    save_model(model, tmp_path / "model")
    onnx = tmp_path / "model.onnx"
    export_deployable(tmp_path / "model", onnx)
    meta = read_metadata(onnx)
    assert meta["resize"] == "bicubic" and "resize bicubic to 16x16" in meta["input"]
    paths = _noise_images(tmp_path)
    out, _ = predict_frame(onnx, pd.DataFrame({"path": [str(p) for p in paths], "domain": "a"}))

    def probabilities(resize):
        x = torch.from_numpy(np.stack([decode_resized(p, 16, resize) for p in paths]))
        with torch.no_grad():
            return model(to_float(x), torch.zeros(len(paths), dtype=torch.long)).softmax(1).max(1).values.numpy()

    got = out["probability"].to_numpy()
    # an untrained model is near uniform: the filter moves its top probability by ~5e-4, ONNX Runtime by ~1e-6
    assert np.abs(got - probabilities("bicubic")).max() < 2e-5
    assert np.abs(got - probabilities("bilinear")).max() > 2e-4
