"""One device choice (``device: auto|cpu|cuda``) for pretrain, evaluate and compress, read through
``mdcore.models.accel.resolve_device``. Run on CPU here: ``device: cpu`` goes through the same code path a GPU
takes, and a bad or unavailable value is an error naming the param."""
import json

import pytest
import torch

from mdcore.models.accel import resolve_device
from mdcore.deploy.distill import DistillConfig, distill, student_model
from mdcore.data.images import ImageSet
from mdcore.models.model import ModelConfig, MultiDomainModel, save_model
from tasks import evaluate, pretrain
from tasks.compress import build_config
from tasks.params import CompressParams, EvaluateParams, ParamsError, PretrainParams, load_params
from tasks.paths import Paths
from tests.test_pretrain_probe import tiny_workspace


def test_resolve_device_auto_cpu_and_clear_errors():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match=r"evaluate\.device='gpu'.*auto.*cpu.*cuda"):
        resolve_device("gpu", "evaluate.device")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"pretrain\.device=cuda.*no CUDA device"):
            resolve_device("cuda", "pretrain.device")


@pytest.mark.parametrize("stage", ["pretrain", "label_issues", "evaluate", "compress"])
def test_a_bad_device_in_a_params_file_names_the_file_and_field(tmp_path, stage):
    (tmp_path / f"{stage}.yaml").write_text("device: gpu\n")
    with pytest.raises(ParamsError, match=rf"(?s){stage}\.yaml.*device.*'gpu'"):
        load_params(stage, tmp_path)


def test_pretrain_and_evaluate_stages_run_with_device_cpu(tmp_path):
    base = tiny_workspace(tmp_path)
    paths = Paths(base.root, base.entries | {"finetuned": "finetuned", "evaluation": "evaluation", "label_issues": "label_issues"})
    result = pretrain.run(PretrainParams(backbone="test_resnet", epochs=1, batch_size=12, threads=1,
                                         device="cpu"), paths)
    assert result.metrics["device"] == "cpu" and result.metrics["linear_probe"]["mean_after"] is not None
    model = MultiDomainModel(ModelConfig("test_resnet", ["d1", "d2"], ["0", "1", "2"], adapter_dim=8))
    save_model(model, paths.finetuned)
    out = evaluate.run(EvaluateParams(batch_size=7, device="cpu"), paths)
    assert out.metrics["device"] == "cpu"
    assert set(out.metrics["per_domain"]) == {"d1", "d2", "held"}
    assert (paths.evaluation / "per_domain.csv").is_file()


def test_compress_device_reaches_distillation_and_models_come_back_to_cpu():
    assert build_config(CompressParams(device="cpu")).device == "cpu"
    teacher = MultiDomainModel(ModelConfig("test_resnet", ["a", "b"], ["0", "1"], adapter_dim=8)).eval()
    student = student_model(teacher, "test_resnet")
    train = ImageSet(torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8), torch.tensor([0, 1] * 8),
                     torch.tensor([0] * 8 + [1] * 8), ["a", "b"], ["0", "1"])
    history = distill(student, teacher, train, DistillConfig(epochs=1, batch_size=8), device="cpu")
    assert len(history) == 1 and history[0]["images"] == 16
    devices = {p.device.type for m in (student, teacher) for p in [*m.parameters(), *m.buffers()]}
    assert devices == {"cpu"}  # export, int8 and scoring run on the CPU
