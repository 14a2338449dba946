"""Post-training static int8 quantization with ONNX Runtime's quantizer, calibrated on seen-domain images.

The calibration reader feeds training images of every seen domain twice: with their domain index (the
per-domain path) and with -1 (the unknown-domain fallback path, whose routing pass has its own
activations to calibrate). Held-out domains and test images never reach it; the caller passes the rows.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

FORMATS = ("qdq", "qoperator")


def calibration_feeds(images: torch.Tensor, domains: torch.Tensor, batch_size: int = 64,
                      limit: int | None = None, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Input dicts for the quantizer: up to ``limit`` images (a seeded draw balanced over domains, so a
    scarce domain is not drowned), each batch once with its domains and once as unknown (-1)."""
    if (domains < 0).any():
        raise ValueError("calibration images must come from seen domains (domain index >= 0)")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(images), generator=g)
    if limit is not None and limit < len(images):
        n_dom = int(domains.max()) + 1
        per = max(1, limit // n_dom)
        picked = [order[domains[order] == d][:per] for d in range(n_dom)]
        order = torch.cat(picked)[torch.randperm(sum(len(p) for p in picked), generator=g)]
    feeds = []
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        x = images[idx].numpy()
        d = domains[idx].numpy().astype(np.int64)
        feeds.append({"images": x, "domain": d})
        feeds.append({"images": x, "domain": np.full_like(d, -1)})
    return feeds


def first_convs(path: str | Path, k: int) -> list[str]:
    """Names of the Conv nodes that use the first ``k`` distinct conv weights in graph order (the stem; both
    the per-domain pass and the unknown-domain routing pass, which share weights)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    convs = [n for n in graph.node if n.op_type == "Conv"]
    weights = list(dict.fromkeys(n.input[1] for n in convs))[:k]
    return [n.name for n in convs if n.input[1] in weights]


def depthwise_convs(path: str | Path) -> list[str]:
    """Names of the grouped (depthwise) Conv nodes: one filter per channel, so per-channel int8 weights
    keep little precision and the int8 kernel saves little arithmetic (EfficientNet and MobileNet blocks)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return [n.name for n in graph.node if n.op_type == "Conv"
            and any(a.name == "group" and a.i > 1 for a in n.attribute)]


def quantize_int8(fp32_path: str | Path, out_path: str | Path, feeds: list[dict[str, np.ndarray]],
                  fmt: str = "qdq", per_channel: bool = True, op_types: list[str] | None = None,
                  calibrate_method: str = "minmax", exclude: list[str] | None = None, reduce_range: bool = False) -> Path:
    """Static int8 quantization of ``fp32_path`` into ``out_path`` (u8 activations, s8 weights, per-channel
    weights when asked), after ONNX Runtime's pre-processing (shape inference, graph optimization).

    ``fmt``: "qdq" (QuantizeLinear/DequantizeLinear pairs that ORT fuses into int8 kernels) or "qoperator"
    (QLinearConv etc. written out). ``op_types``: the op types to quantize (None = the quantizer's default).
    ``exclude``: names of nodes that stay fp32. ``reduce_range``: 7-bit weights, ONNX Runtime's documented remedy
    for x86 CPUs without VNNI (AVX2, AVX-512F), whose u8 x s8 kernels (VPMADDUBSW) saturate 16-bit sums of
    full-range weights (a fifth of a random model's predictions changed on an AVX2-only machine; trained
    models lost nothing measurable there, BENCHMARKS.md "Int8 on CPUs without VNNI").
    """
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if fmt not in FORMATS:
        raise ValueError(f"quantization format {fmt!r}: expected one of {FORMATS}")
    # MinMax only: the histogram calibrators (entropy, percentile) fail on the empty routing-pass tensors
    # of all-known batches ("inhomogeneous shape"), checked with onnxruntime 1.32
    methods = {"minmax": CalibrationMethod.MinMax}
    if calibrate_method not in methods:
        raise ValueError(f"calibration method {calibrate_method!r}: expected one of {sorted(methods)}")
    if not feeds:
        raise ValueError("no calibration images: int8 calibration needs seen-domain training images")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(feeds)

        def get_next(self):
            return next(self._it, None)

    out_path = Path(out_path)
    with tempfile.TemporaryDirectory(prefix="mdpipe-quant-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(out_path), Reader(),
                        quant_format=QuantFormat.QDQ if fmt == "qdq" else QuantFormat.QOperator,
                        op_types_to_quantize=op_types, per_channel=per_channel, nodes_to_exclude=exclude or [],
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=methods[calibrate_method], reduce_range=reduce_range,
                        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
    return out_path
