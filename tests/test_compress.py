"""Deployable variants: ONNX export per domain, real int8 with ONNX Runtime, channel pruning, distillation,
corruptions, the acceptance rule, and the compress work end to end on a tiny model."""
import json

import numpy as np
import onnx
import pytest
import torch

from mdcore.deploy.corrupt import CORRUPTIONS, corrupt
from mdcore.deploy.distill import DistillConfig, distill, student_model
from mdcore.deploy.export import export_onnx, ort_logits, session
from mdcore.deploy.measure import count_macs
from mdcore.deploy.prune import prune_channels
from mdcore.deploy.quantize import calibration_feeds, first_convs, quantize_int8
from mdcore.deploy.scoring import decide
from mdcore.data.images import ImageSet, to_float
from mdcore.models.model import ModelConfig, MultiDomainModel

TOL = 1e-4  # max |logit difference| between ONNX Runtime fp32 and PyTorch eager


def model(head="linear", backbone="resnet10t") -> MultiDomainModel:
    torch.manual_seed(0)
    m = MultiDomainModel(ModelConfig(backbone, ["a", "b", "c"], [str(i) for i in range(4)], domain_bn=True,
                                     head=head)).eval()
    with torch.no_grad():  # distinct per-domain statistics and prototypes, so a wrong domain shows
        for mod in m.modules():
            if getattr(mod, "running_mean", None) is not None and mod.running_mean.ndim == 2:
                mod.running_mean.normal_(0, 0.3)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.normal_(1.0, 0.3)
        m.prototypes.normal_()
    return m


def images(n=12, seed=0):
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_onnx_matches_pytorch_on_every_domain_and_the_unknown_fallback(tmp_path):
    m = model("moe", backbone="test_resnet")  # domain batch-norm, adapters and the MoE head's domain embedding
    sess = session(export_onnx(m, tmp_path / "m.onnx"), threads=1)
    x = images()
    for domains in (torch.tensor([0, 1, 2] * 4), torch.full((12,), -1), torch.tensor([0, -1, 2, -1, 1, 0] * 2)):
        with torch.no_grad():
            ref = m(to_float(x), domains)
        got = ort_logits(sess, x, domains)
        assert (got - ref).abs().max() < TOL, domains
    # one session serves every domain: the same image under another domain index gives that domain's logits
    same = x[:1].repeat(3, 1, 1, 1)
    got = ort_logits(sess, same, torch.tensor([0, 1, 2]))
    assert (got[0] - got[1]).abs().max() > 10 * TOL
    with torch.no_grad():
        assert (got - m(to_float(same), torch.tensor([0, 1, 2]))).abs().max() < TOL


def test_int8_is_a_real_integer_graph_smaller_and_close(tmp_path):
    m = model()
    fp32 = export_onnx(m, tmp_path / "fp32.onnx")
    x, d = images(96, seed=1), torch.arange(96) % 3
    feeds = calibration_feeds(x, d, batch_size=32)
    assert {int(v) for f in feeds for v in f["domain"]} == {-1, 0, 1, 2}  # the fallback pass is calibrated too
    stem = first_convs(fp32, 3)
    assert len(stem) == 6  # the 3 stem convs of the per-domain pass and of the routing pass
    q = quantize_int8(fp32, tmp_path / "int8.onnx", feeds, fmt="qoperator", op_types=["Conv", "Gemm"], exclude=stem)
    graph = onnx.load(str(q)).graph
    assert sum(n.op_type == "QLinearConv" for n in graph.node) >= 10
    assert sum(n.op_type == "Conv" for n in graph.node) == len(stem)  # the excluded ones stay fp32
    assert any(i.data_type == onnx.TensorProto.INT8 for i in graph.initializer)
    assert largest_int8_weight(graph) == 127  # full-range weights by default
    assert q.stat().st_size < 0.35 * fp32.stat().st_size
    ref = ort_logits(session(fp32), x, d).argmax(1)
    agree = (ort_logits(session(q), x, d).argmax(1) == ref).float().mean()
    assert agree >= 0.85
    with pytest.raises(ValueError, match="seen domains"):
        calibration_feeds(x, torch.full((96,), -1))


def largest_int8_weight(graph) -> int:
    return max(int(np.abs(onnx.numpy_helper.to_array(i).astype(int)).max()) for i in graph.initializer
               if i.data_type == onnx.TensorProto.INT8)


def test_tf_same_padding_is_static_in_the_file_and_relu6_stays_int8(tmp_path):
    """tf_efficientnet_lite0's "same" padding becomes constants that ONNX Runtime folds into the convolutions
    (no Pad left after its graph optimization), logits unchanged; with Clip quantized, int8 tensors flow from
    one convolution to the next with no ReLU6 left in fp32."""
    import onnxruntime as ort

    torch.manual_seed(0)  # without domain batch-norm (the ImageNet default): batch-norm folds into the convs
    m = MultiDomainModel(ModelConfig("tf_efficientnet_lite0", ["a", "b", "c"], [str(i) for i in range(4)],
                                     domain_bn=False)).eval()
    m.prototypes.data.normal_()
    fp32 = export_onnx(m, tmp_path / "fp32.onnx")
    assert "forward" not in vars(m.backbone.conv_stem)  # the caller's model keeps its own padding code
    x, d = images(), torch.tensor([0, -1, 2] * 4)
    with torch.no_grad():
        ref = m(to_float(x), d)
    assert (ort_logits(session(fp32), x, d) - ref).abs().max() < TOL
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(fp32), opts, providers=["CPUExecutionProvider"])
    optimized = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert "Pad" not in optimized and "Conv" in optimized

    xs, ds = images(96, seed=1), torch.arange(96) % 3
    feeds = calibration_feeds(xs, ds, batch_size=32)
    # 7-bit weights, so the check below does not depend on the CPU's VNNI. This random model's logits are nearly tied, and
    # with full-range weights the saturation of CPUs without VNNI flipped a fifth of them (AVX2-only machine)
    q = quantize_int8(fp32, tmp_path / "int8.onnx", feeds, fmt="qoperator", op_types=["Conv", "Gemm", "Clip"],
                      exclude=first_convs(fp32, 3), reduce_range=True)
    graph = onnx.load(str(q)).graph
    assert largest_int8_weight(graph) == 64
    ops = [n.op_type for n in graph.node]
    fp32_ops = [n.op_type for n in onnx.load(str(fp32)).graph.node]
    assert ops.count("QLinearConv") == fp32_ops.count("Conv") - 3  # all but the stem's 3
    # the ReLU6 after every int8 convolution is folded into it: only the few around the fp32 stem remain
    assert fp32_ops.count("Clip") >= 30 and ops.count("Clip") <= 4
    unfolded = quantize_int8(fp32, tmp_path / "conv_gemm.onnx", feeds, fmt="qoperator", op_types=["Conv", "Gemm"],
                             exclude=first_convs(fp32, 3), reduce_range=True)
    unfolded_ops = [n.op_type for n in onnx.load(str(unfolded)).graph.node]
    assert ops.count("DequantizeLinear") < 0.6 * unfolded_ops.count("DequantizeLinear")
    agree = (ort_logits(session(q), xs, ds).argmax(1) == ort_logits(session(fp32), xs, ds).argmax(1)).float().mean()
    assert agree >= 0.85


@pytest.mark.parametrize("backbone", ["test_resnet", "tf_efficientnet_lite0"])  # depthwise/pointwise blocks too
def test_channel_pruning_removes_channels_and_still_exports(tmp_path, backbone):
    m = model(backbone=backbone)
    macs, params = count_macs(m, 32), sum(p.numel() for p in m.parameters())
    summary = prune_channels(m, 0.5, to_float(images(2)), torch.tensor([0, 1]))
    assert count_macs(m, 32) < 0.5 * macs and summary["params_after"] < 0.5 * params
    m.fit_prototypes(to_float(images(12)), torch.arange(12) % 3)
    x, d = images(), torch.tensor([0, -1, 2] * 4)
    with torch.no_grad():
        ref = m(to_float(x), d)
    assert (ort_logits(session(export_onnx(m, tmp_path / "p.onnx")), x, d) - ref).abs().max() < TOL
    with pytest.raises(ValueError, match="ratio"):
        prune_channels(m, 1.0, to_float(x[:2]), d[:2])


def test_distillation_moves_the_student_towards_the_teacher():
    teacher = model(backbone="test_resnet")
    student = student_model(teacher, "test_resnet")
    assert student.config.domains == teacher.config.domains and student.config.domain_bn
    x, d = images(64, seed=2), torch.arange(64) % 3
    with torch.no_grad():
        labels = teacher(to_float(x), d).argmax(1)
    data = ImageSet(x, labels, d, ["a", "b", "c"], [str(i) for i in range(4)])

    def agreement():
        with torch.no_grad():
            return float((student.eval()(to_float(x), d).argmax(1) == labels).float().mean())

    before = agreement()
    history = distill(student, teacher, data, DistillConfig(epochs=4, batch_size=32, lr=5e-3))
    assert len(history) == 4 and "aux/kd" in history[-1]
    assert agreement() > before + 0.2
    assert student.prototypes.abs().sum() > 0  # refit for unknown-domain routing


def test_corruptions_are_deterministic_and_grow_with_severity():
    x = images(8, seed=3)
    for name in CORRUPTIONS:
        a, b = corrupt(x, name, 2, seed=5), corrupt(x, name, 2, seed=5)
        assert a.dtype == torch.uint8 and a.shape == x.shape and torch.equal(a, b)
        change = [float((corrupt(x, name, s).float() - x.float()).abs().mean()) for s in (1, 2, 3)]
        assert change[0] > 0 and change[0] <= change[1] <= change[2], (name, change)
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(x, "fog", 1)


def test_latencies_of_the_variants_are_taken_in_turn_over_rounds():
    """A slow-down during the stage must not land on one variant only: each round times every runner."""
    import time

    from mdcore.deploy.scoring import measure_latencies

    calls = []

    def runner(name, seconds):
        def run(images, domains):
            calls.append(name)
            time.sleep(seconds)
        return run

    data = ImageSet(images(4), torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long), ["a"], ["0"])
    out = measure_latencies({"fast": runner("fast", 0.0), "slow": runner("slow", 0.004)}, data, threads=1,
                            batch_sizes=(1,), repeats=9, rounds=3)
    starts = [i for i, (a, b) in enumerate(zip(["-"] + calls, calls)) if a != b]
    assert [calls[i] for i in starts] == ["fast", "slow"] * 3  # three rounds, each taking both in turn
    assert out["fast"]["b1"]["rounds"] == 3 and out["slow"]["b1"]["calls"] == 9
    assert out["slow"]["b1"]["median_ms"] > out["fast"]["b1"]["median_ms"] + 2
    assert out["slow"]["b1"]["images_per_s"] < out["fast"]["b1"]["images_per_s"]


def test_acceptance_rejects_a_worse_domain_or_a_slower_variant():
    ref = {"select_acc": {"a": 0.9, "b": 0.8}, "latency": {"b1": {"median_ms": 2.0}}}
    ok = {"select_acc": {"a": 0.9, "b": 0.795}, "latency": {"b1": {"median_ms": 1.0}}}
    worse = {"select_acc": {"a": 0.9, "b": 0.7}, "latency": {"b1": {"median_ms": 1.0}}}
    slow = {"select_acc": {"a": 0.9, "b": 0.8}, "latency": {"b1": {"median_ms": 3.0}}}
    assert decide(ref, ok, 0.01)[0]
    accepted, reason = decide(ref, worse, 0.01)
    assert not accepted and "b" in reason and "max_drop" in reason
    accepted, reason = decide(ref, slow, 0.01)
    assert not accepted and "slower" in reason


def test_compress_builds_scores_and_ships_an_onnx_file_with_card(tmp_path):
    from mdcore.deploy.run import compress, ScoreConfig
    from mdcore.deploy.scoring import EvalSets
    from mdcore.deploy.variants import BuildConfig

    teacher = model(backbone="test_resnet")
    x, d = images(48, seed=4), torch.arange(48) % 3
    with torch.no_grad():
        y = teacher(to_float(x), d).argmax(1)
    names, classes = ["a", "b", "c"], [str(i) for i in range(4)]
    data = ImageSet(x, y, d, names, classes)
    held = ImageSet(x[:12], y[:12], torch.full((12,), -1), names, classes)
    report = ImageSet(torch.cat([x, held.images]), torch.cat([y, held.labels]), torch.cat([d, held.domains]), names, classes)
    sets = EvalSets(data, [names[i] for i in d], report, [names[i] for i in d] + ["z"] * 12, data.subset(torch.arange(48) < 8),
                    select_splits=["val", "gate"] * 24)
    out, rep = tmp_path / "out", tmp_path / "rep"
    out.mkdir(), rep.mkdir()
    build = BuildConfig(calibration_images=48, prune_ratio=0.5, recovery=DistillConfig(epochs=1, batch_size=24),
                        student_backbone=None)
    result = compress(teacher, data, sets, build, ScoreConfig(threads=1, max_drop=0.5, latency_repeats=3), out, rep,
                      {"model": "test"}, 1000)
    rows = {r["name"]: r for r in result["rows"]}
    assert set(rows) == {"fp32-eager", "fp32", "int8", "pruned", "pruned+int8"}
    assert rows["fp32"]["worst_select_drop"] == 0.0  # the ONNX copy predicts like PyTorch
    # the validation rows alone are scored too (recorded beside the rule: what may choose a recipe)
    assert rows["fp32"]["worst_val_drop"] == 0.0 and set(rows["pruned"]["val_acc"]) == set(names)
    assert rows["pruned"]["macs"] < 0.5 * rows["fp32"]["macs"]
    assert rows["int8"]["file_bytes"] < 0.6 * rows["fp32"]["file_bytes"]  # a tiny model: fp32 stem, BN tables
    assert rows["fp32"]["kinds"]["z"] == "held-out"
    for r in rows.values():
        assert r["reason"] and set(r["latency"]) == {"b1", "b64"} and len(r["corruption_acc"]) == 15
    shipped = rows[result["shipped"]]
    assert shipped["accepted"] and shipped["name"] != "fp32-eager"
    assert {p.name for p in out.iterdir()} >= {"model.onnx", "recipe.json", "model_card.md", "variants"}
    assert {p.name for p in rep.iterdir()} >= {"variants.csv", "variants.md", "variants.png"}
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["variant"] == shipped["name"] and recipe["recipe"]["source"] == {"model": "test"}
    card = (out / "model_card.md").read_text()
    assert "`domain`" in card and "| -1 |" in card and shipped["name"] in card
    # the shipped file is what was scored: a fresh session reproduces its accuracy
    import onnxruntime as ort

    fresh = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = fresh.run(None, {"images": x.numpy(), "domain": d.numpy().astype(np.int64)})[0]
    acc = {n: float((logits.argmax(1)[d.numpy() == i] == y.numpy()[d.numpy() == i]).mean()) for i, n in enumerate(names)}
    assert acc == pytest.approx(shipped["select_acc"])


def test_the_shipped_variant_is_the_smallest_accepted_one_among_those_allowed():
    from mdcore.deploy.run import pick_shipped

    def row(name, accepted, mb, ms):
        return {"name": name, "accepted": accepted, "file_bytes": mb * 2**20, "reason": "r",
                "latency": {"b1": {"median_ms": ms}}}

    rows = [row("fp32", True, 20, 1.2), row("int8", True, 5.6, 1.1), row("pruned", True, 9.9, 0.9),
            row("pruned+int8", True, 2.8, 1.0), row("student", False, 1.9, 0.5)]
    assert pick_shipped(rows, "size")["name"] == "pruned+int8"
    assert pick_shipped(rows, "latency")["name"] == "pruned"
    assert pick_shipped(rows, "size", ("fp32", "int8"))["name"] == "int8"
    assert pick_shipped(rows, "latency", ("fp32", "int8"))["name"] == "int8"
    with pytest.raises(RuntimeError, match=r"ship_from \['student'\].*student: r"):
        pick_shipped(rows, "size", ("student",))
