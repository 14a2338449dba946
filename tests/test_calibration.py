"""Calibration: temperature scaling recovers a known temperature and lowers ECE without moving accuracy;
ECE agrees with the reliability bins; the abstain threshold reaches its target precision; and the calibrated
ONNX graph, scored by a bare ONNX Runtime session, gives the PyTorch model's probabilities."""
import numpy as np
import pytest
import torch

from mdcore.data.images import to_float
from mdcore.eval.calibration import (CalibratedModel, Temperatures, abstain_threshold, at_threshold,
                                     calibrated_probabilities, ece, fit_temperature, fit_temperatures, fitted_for,
                                     reliability)
from mdcore.models.model import ModelConfig, MultiDomainModel

PROB_TOL = 1e-4  # max |probability difference| between the calibrated ONNX graph (ORT) and PyTorch


def drawn(n: int, t_true: float, seed: int = 0, classes: int = 5):
    """Logits whose labels are drawn from softmax(logits / t_true): calibrated exactly at t_true."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, classes, generator=g) * 3
    labels = torch.multinomial(torch.softmax(logits / t_true, 1), 1, generator=g)[:, 0]
    return logits, labels


@pytest.mark.parametrize("t_true", [0.5, 2.5])
def test_fitted_temperature_recovers_the_true_one_and_lowers_ece_at_equal_accuracy(t_true):
    logits, labels = drawn(20000, t_true, seed=int(t_true * 10))
    t = fit_temperature(logits, labels)
    assert t == pytest.approx(t_true, rel=0.08)
    before, after = torch.softmax(logits, 1), torch.softmax(logits / t, 1)
    assert ece(after, labels) < 0.5 * ece(before, labels)
    assert torch.equal(before.argmax(1), after.argmax(1))


def test_per_domain_temperatures_and_the_unknown_one_pick_by_domain_index():
    (la, ya), (lb, yb) = drawn(4000, 0.5, seed=1), drawn(4000, 3.0, seed=2)
    logits, labels = torch.cat([la, lb]), torch.cat([ya, yb])
    domains = torch.tensor([0] * 4000 + [1] * 4000)
    temps = fit_temperatures(["a", "b"], logits, domains, labels, routed_logits=logits)
    assert temps.per_domain["a"] < 0.7 < 2.0 < temps.per_domain["b"]
    assert temps.per_domain["a"] < temps.unknown < temps.per_domain["b"]  # one temperature for the mixture
    mixed = torch.tensor([0, 1, -1])
    probs = calibrated_probabilities(logits[:3], mixed, temps)
    expected = [temps.per_domain["a"], temps.per_domain["b"], temps.unknown]
    for i, t in enumerate(expected):
        assert torch.allclose(probs[i], torch.softmax(logits[i] / t, 0), atol=1e-6)
    assert torch.allclose(calibrated_probabilities(logits[:3], None, temps),
                          torch.softmax(logits[:3] / temps.unknown, 1), atol=1e-6)


def test_a_small_or_error_free_domain_takes_the_pooled_temperature_not_the_bound():
    """11 validation images, all right: alone, NLL falls as T shrinks and the fit would hit T_RANGE's bound."""
    from mdcore.eval.calibration import T_RANGE, fit_temperature

    la, ya = drawn(4000, 2.0, seed=3)
    tiny = torch.zeros(11, la.shape[1])
    tiny[torch.arange(11), torch.arange(11) % la.shape[1]] = 3.0  # every one right
    logits = torch.cat([la, tiny])
    labels = torch.cat([ya, torch.arange(11) % la.shape[1]])
    domains = torch.tensor([0] * 4000 + [1] * 11)
    assert fit_temperature(tiny, labels[4000:]) == pytest.approx(T_RANGE[0], abs=1e-3)  # what it would give
    temps = fit_temperatures(["big", "tiny"], logits, domains, labels, routed_logits=logits)
    assert temps.pooled_for == ["tiny"] and temps.per_domain["tiny"] == fit_temperature(logits, labels)
    assert temps.per_domain["big"] == pytest.approx(2.0, rel=0.1)


def test_ece_equals_the_weighted_gap_of_the_reliability_bins():
    logits, labels = drawn(3000, 1.7, seed=3)
    probs = torch.softmax(logits, 1)
    bins = reliability(probs, labels, n_bins=10)
    n = sum(bins["count"])
    by_hand = sum(c / n * abs(a - f) for c, a, f in zip(bins["count"], bins["accuracy"], bins["confidence"]) if c)
    assert n == 3000 and ece(probs, labels, n_bins=10) == pytest.approx(by_hand, abs=1e-5)


def test_abstain_threshold_reaches_the_target_on_the_rows_it_was_chosen_on():
    conf = torch.tensor([0.99, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.45])
    correct = torch.tensor([1, 1, 1, 0, 1, 1, 0, 0], dtype=torch.bool)
    probs = torch.stack([conf, (1 - conf) / 2, (1 - conf) / 2], 1)  # class 0 is always the prediction
    labels = torch.where(correct, 0, 1)
    got = abstain_threshold(probs, labels, 0.8)  # top 6: 5/6 = 0.83 >= 0.8; top 7: 5/7 < 0.8
    assert got["threshold"] == pytest.approx(0.6) and got["coverage"] == pytest.approx(6 / 8)
    assert at_threshold(probs, labels, got["threshold"]) == pytest.approx({"coverage": 6 / 8, "precision": 5 / 6})
    assert abstain_threshold(probs, labels, 1.0)["coverage"] == pytest.approx(3 / 8)
    never = abstain_threshold(probs, torch.ones(8, dtype=torch.long), 0.5)  # the most confident row is wrong
    assert never["threshold"] is None and never["coverage"] == 0.0
    assert at_threshold(probs, labels, None) == {"coverage": 0.0, "precision": None}


def test_temperatures_survive_their_json_file(tmp_path):
    temps = Temperatures(["a", "b"], {"a": 0.8, "b": 1.9}, 1.3, {"a": 0.9, "b": None, "unknown": 0.7}, 0.95)
    temps.save(tmp_path / "calibration.json")
    back = Temperatures.load(tmp_path / "calibration.json")
    assert back == temps and back.vector().tolist() == pytest.approx([0.8, 1.9, 1.3])


def test_temperatures_are_used_only_for_the_weights_they_were_fitted_for(tmp_path):
    file = tmp_path / "calibration.json"
    assert fitted_for(file, "abc") is None  # no file
    Temperatures(["a"], {"a": 0.8}, 1.3, model_sha256="abc").save(file)
    assert fitted_for(file, "abc").per_domain == {"a": 0.8}
    assert fitted_for(file, "other") is None
    Temperatures(["a"], {"a": 0.8}, 1.3).save(file)  # an older champion's file: no hash
    assert fitted_for(file, "other") is None and fitted_for(file, "other", unhashed_ok=True).unknown == 1.3


def tiny_model() -> MultiDomainModel:
    torch.manual_seed(0)
    m = MultiDomainModel(ModelConfig("test_resnet", ["a", "b", "c"], [str(i) for i in range(4)], domain_bn=True,
                                     adapter_dim=8)).eval()
    with torch.no_grad():  # distinct per-domain statistics and prototypes, so a wrong domain shows
        for mod in m.modules():
            if getattr(mod, "running_mean", None) is not None and mod.running_mean.ndim == 2:
                mod.running_mean.normal_(0, 0.3)
                mod.running_var.uniform_(0.5, 2.0)
        m.prototypes.normal_()
        m.head.weight.mul_(20)  # confident logits, so the temperature matters for the probabilities
    return m


def test_calibrated_onnx_graph_gives_the_pytorch_probabilities(tmp_path):
    import onnxruntime as ort

    from mdcore.deploy.calibrated import PROBABILITIES, export_calibrated_onnx

    m = tiny_model()
    temps = Temperatures(["a", "b", "c"], {"a": 0.5, "b": 2.0, "c": 1.3}, 3.0)
    temps.save(tmp_path / "calibration.json")
    path = export_calibrated_onnx(m, Temperatures.load(tmp_path / "calibration.json"), tmp_path / "m.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])  # bare: no mdpipe helpers
    assert [o.name for o in sess.get_outputs()] == ["logits", PROBABILITIES]
    x = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    reference = CalibratedModel(m, temps).eval()
    for domains in (torch.tensor([0, 1, 2] * 4), torch.full((12,), -1), torch.tensor([0, -1, 2, -1, 1, 0] * 2)):
        logits, probs = sess.run(None, {"images": x.numpy(), "domain": domains.numpy().astype(np.int64)})
        with torch.no_grad():
            expected = reference(to_float(x), domains)
            plain = torch.softmax(m(to_float(x), domains), 1)
        assert np.abs(probs - expected.numpy()).max() < PROB_TOL, domains
        assert np.allclose(probs.sum(1), 1, atol=1e-5)
        assert (expected - plain).abs().max() > 100 * PROB_TOL  # the temperatures do move the probabilities
        assert np.abs(logits - m(to_float(x), domains).detach().numpy()).max() < PROB_TOL  # logits as before


def test_adding_probabilities_refuses_a_graph_without_the_export_contract(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from mdcore.deploy.calibrated import add_probabilities

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), tmp_path / "other.onnx")
    with pytest.raises(ValueError, match="'domain'.*'logits'"):
        add_probabilities(tmp_path / "other.onnx", torch.tensor([1.0, 1.0]))
    with pytest.raises(ValueError, match="positive"):
        add_probabilities(tmp_path / "other.onnx", torch.tensor([1.0, 0.0]))
