"""Calibrated ONNX: an exported graph (``mdcore.deploy.export``: inputs ``images`` uint8 and ``domain`` int64,
output ``logits``) plus a second output ``probabilities`` = softmax(logits / T[domain]), T the per-domain
temperatures fitted by the evaluate stage (``reports/evaluate/calibration.json``), the last one for
``domain = -1`` (an unknown domain: ONNX ``Gather`` takes negative indices as PyTorch does).

Added by editing the graph rather than re-exporting, so the same four nodes go onto any variant the compress
stage ships (fp32, int8, pruned, student) without touching how it was built; ``logits`` stays as it was.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mdcore.data.io import atomic_write_bytes
from mdcore.eval.calibration import Temperatures

PROBABILITIES = "probabilities"
TEMPERATURES = "calibration_temperatures"


def add_probabilities(onnx_path: str | Path, temperatures: Temperatures | torch.Tensor,
                      out_path: str | Path | None = None) -> Path:
    """Write ``onnx_path``'s graph with the ``probabilities`` output to ``out_path`` (default: in place);
    ``temperatures``: (D + 1,) with the unknown domain's last. Returns the path written."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    vector = temperatures.vector() if isinstance(temperatures, Temperatures) else torch.as_tensor(temperatures)
    vector = vector.detach().float().cpu().numpy().astype(np.float32)
    if vector.ndim != 1 or len(vector) < 2 or not (vector > 0).all():
        raise ValueError(f"temperatures must be (domains + 1,) positive values, got {vector.tolist()}")
    model = onnx.load(str(onnx_path))
    graph = model.graph
    outputs = {o.name: o for o in graph.output}
    if "logits" not in outputs or "domain" not in {i.name for i in graph.input}:
        raise ValueError(f"{onnx_path}: expected input 'domain' and output 'logits' (mdcore.deploy.export), "
                         f"got inputs {[i.name for i in graph.input]}, outputs {list(outputs)}")
    if PROBABILITIES in outputs:
        raise ValueError(f"{onnx_path} already has a {PROBABILITIES!r} output")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
    graph.initializer.append(numpy_helper.from_array(vector, TEMPERATURES))
    t, t_col, scaled = "calibration_t", "calibration_t_col", "calibration_scaled"
    nodes = [helper.make_node("Gather", [TEMPERATURES, "domain"], [t], axis=0, name="calibration_gather")]
    if opset >= 13:  # Unsqueeze's axes became an input in opset 13
        graph.initializer.append(numpy_helper.from_array(np.array([1], dtype=np.int64), "calibration_axes"))
        nodes.append(helper.make_node("Unsqueeze", [t, "calibration_axes"], [t_col], name="calibration_unsqueeze"))
    else:
        nodes.append(helper.make_node("Unsqueeze", [t], [t_col], axes=[1], name="calibration_unsqueeze"))
    nodes += [helper.make_node("Div", ["logits", t_col], [scaled], name="calibration_div"),
              helper.make_node("Softmax", [scaled], [PROBABILITIES], axis=1, name="calibration_softmax")]
    graph.node.extend(nodes)
    dims = [d.dim_param or d.dim_value for d in outputs["logits"].type.tensor_type.shape.dim]
    graph.output.append(helper.make_tensor_value_info(PROBABILITIES, TensorProto.FLOAT, dims or None))
    onnx.checker.check_model(model)
    out = Path(out_path) if out_path is not None else Path(onnx_path)
    atomic_write_bytes(out, model.SerializeToString())
    return out


def export_calibrated_onnx(model, temperatures: Temperatures, path: str | Path) -> Path:
    """``mdcore.deploy.export.export_onnx`` of ``model``, then :func:`add_probabilities` on the file."""
    from mdcore.deploy.export import export_onnx

    if list(temperatures.domains) != list(model.config.domains):
        raise ValueError(f"temperatures are for domains {temperatures.domains}, the model has {model.config.domains}")
    return add_probabilities(export_onnx(model, path), temperatures)
