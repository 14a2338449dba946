"""Pretrained backbones: weights the pipeline exported load into another run through timm (file, safetensors
or a PyTorch state dict read with weights_only=True, classifier dropped); a timm tag offline is a clear error."""
import json

import pytest
import torch
from safetensors.torch import load_file

from mdcore.models.model import create_backbone
from tasks.stage import execute
from tests.conftest import make_workspace


def test_pretrain_on_digits_export_then_start_a_glyphs_run_from_the_file(tmp_path):
    source = make_workspace(tmp_path / "digits", ingest={"builtin_limit": 200},
                            validate={"min_images_per_class": 0},
                            pretrain={"epochs": 1, "batch_size": 64, "linear_probe": False})
    for stage in ("ingest", "validate", "synthesize", "pretrain"):
        execute(stage, source)
    exported = source / "models/pretrained/backbone.safetensors"

    target = make_workspace(tmp_path / "glyphs", ingest={"builtin": "glyphs", "builtin_limit": 200, "holdout_domains": []},
                            validate={"min_images_per_class": 0},
                            pretrain={"enabled": False, "backbone_weights": str(exported), "linear_probe": False})
    for stage in ("ingest", "validate", "synthesize", "pretrain"):
        execute(stage, target)
    config = json.loads((target / "models/pretrained/config.json").read_text())
    assert config["pretrained"] and config["backbone_weights"] == str(exported)
    mine, theirs = load_file(target / "models/pretrained/backbone.safetensors"), load_file(exported)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    # the finetune stage starts from these weights (the same path the Ray workers take)
    from mdcore.train.setup import build_model
    from tasks.params import FinetuneParams
    from mdcore.data.images import ImageSet

    train = ImageSet(torch.zeros(4, 3, 32, 32, dtype=torch.uint8), torch.zeros(4, dtype=torch.long),
                     torch.zeros(4, dtype=torch.long), ["sans"], ["a", "b"])
    model = build_model(FinetuneParams(), train, "resnet10t", 32, str(target / "models/pretrained/backbone.safetensors"))
    state = model.backbone.state_dict()
    # per-domain batch-norm: every domain starts from the shared pretrained statistics and affine
    assert all(torch.equal(state[k], theirs[k].expand_as(state[k])) for k in theirs if k in state)


def test_a_pytorch_state_dict_with_a_classifier_loads_without_it(tmp_path):
    import timm

    full = timm.create_model("resnet10t", num_classes=7)
    torch.save(full.state_dict(), tmp_path / "w.pth")
    backbone = create_backbone("resnet10t", weights=str(tmp_path / "w.pth"))
    assert backbone.num_classes == 0
    assert torch.equal(backbone.state_dict()["conv1.0.weight"], full.state_dict()["conv1.0.weight"])


def test_missing_file_and_offline_tag_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="backbone_weights.*nothere.safetensors"):
        create_backbone("resnet10t", weights=str(tmp_path / "nothere.safetensors"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match=r"(?s)resnet10t.a1_in1k.*Hugging Face.*pass a file"):
        create_backbone("resnet10t", weights="a1_in1k")


def test_image_size_auto_takes_the_weights_input_size(tmp_path):
    """pretrain.image_size: auto = the input size recorded in the starting weights' pretrained_cfg; the
    stage decodes at that size and records it for every later stage; auto without one is a clear error."""
    import timm
    from safetensors.torch import save_file

    from mdcore.models.input_norm import input_size

    weights = tmp_path / "weights" / "backbone.safetensors"
    weights.parent.mkdir()
    save_file({k: v.contiguous() for k, v in timm.create_model("resnet10t", num_classes=0).state_dict().items()},
              str(weights))
    (weights.parent / "config.json").write_text(json.dumps({"pretrained_cfg": {
        "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "input_size": [3, 40, 40]}}))
    ws = make_workspace(tmp_path / "ws", ingest={"builtin_limit": 200}, validate={"min_images_per_class": 0},
                        pretrain={"enabled": False, "backbone_weights": str(weights), "image_size": "auto",
                                  "linear_probe": False})
    for stage in ("ingest", "validate", "synthesize", "pretrain"):
        execute(stage, ws)
    config = json.loads((ws / "models/pretrained/config.json").read_text())
    assert config["image_size"] == 40 and config["input_norm"] == "pretrained"
    assert input_size(64, None) == 64
    with pytest.raises(ValueError, match="pretrain.image_size=auto"):
        input_size("auto", None, "pretrain.image_size")
