"""ONNX export of a ``MultiDomainModel``: one graph for every domain, the domain index a second input.

Inputs: ``images`` uint8 (N, 3, H, W) RGB pixels as stored (the graph does the model's preprocessing),
``domain`` int64 (N,): the index of a seen domain, or -1 for an unknown one. Output: ``logits`` (N, C).

Per-domain parts select their rows with tensor ops (one-hot routing matrix times stacked per-domain
parameters), so switching domain is a different input, not a reload. Unknown-domain images take the
model's fallback: when per-domain parts sit inside the backbone (domain batch-norm, stage adapters), the
unknown rows alone (gathered with NonZero, so an all-known batch costs an empty pass) first go through the
backbone with every domain mixed equally, and their routing weights are the softmax of the similarity of
those features to each domain's prototype, exactly as ``MultiDomainModel.forward`` does.
"""
from __future__ import annotations

import copy
import io
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mdcore.models.model import MultiDomainModel
from mdcore.models.moe import MoEHead

INPUTS = ("images", "domain")
OUTPUT = "logits"
OPSET = 17


class ExportNet(nn.Module):
    """``MultiDomainModel`` inference with routing in traceable tensor ops (uint8 images in, logits out)."""

    def __init__(self, model: MultiDomainModel):
        super().__init__()
        self.model = model.eval()
        self.n_domains = len(model.config.domains)

    def _soft(self, feats: torch.Tensor) -> torch.Tensor:
        m = self.model
        sims = F.normalize(feats, dim=1) @ F.normalize(m.prototypes, dim=1).T
        return torch.softmax(sims / m.config.routing_temperature, dim=1)

    def forward(self, images: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = images.float() / 127.5 - 1.0  # mdcore.data.images.to_float
        onehot = (domain[:, None] == torch.arange(self.n_domains, device=domain.device)[None]).to(x.dtype)
        if m.routes_inside_backbone:
            unknown = torch.nonzero(domain < 0)[:, 0]
            uniform = onehot.index_select(0, unknown) * 0.0 + 1.0 / self.n_domains
            soft = self._soft(m.features(x.index_select(0, unknown), uniform))
            weights = onehot.index_copy(0, unknown, soft)
            feats = m.features(x, weights)
        else:
            feats = m.features(x)
            weights = torch.where((domain >= 0)[:, None], onehot, self._soft(feats))
        z = m.adapt(feats, weights)
        return m.head(z, weights) if isinstance(m.head, MoEHead) else m.head(z)


def static_same_padding(net: nn.Module, images: torch.Tensor, domain: torch.Tensor) -> int:
    """Fix the padding of timm's TF-style "same" convolutions (``Conv2dSame``, as in ``tf_efficientnet_*``)
    for the input size of ``images``, in place; returns how many were fixed.

    ``Conv2dSame`` computes its padding from the input's height and width at run time, which the exporter
    writes as a shape-arithmetic subgraph and a data-dependent Pad per strided convolution. The file's
    spatial size is fixed, so the padding is a constant: written as one, ONNX Runtime folds it into the
    convolution's own padding (its PadFusion pass), so no tensor is copied to be padded, fp32 and int8 alike.
    """
    from timm.layers import Conv2dSame
    from timm.layers.padding import get_same_padding

    # exact type: subclasses (StdConv2dSame, ...) transform their weights in forward, which this would skip
    same = [m for m in net.modules() if type(m) is Conv2dSame]
    if not same:
        return 0
    sizes: dict[nn.Module, tuple[int, int]] = {}

    def record(mod, args):  # returns None: the input goes on unchanged
        sizes[mod] = tuple(args[0].shape[-2:])

    hooks = [m.register_forward_pre_hook(record) for m in same]
    try:
        with torch.no_grad():
            net(images, domain)
    finally:
        for h in hooks:
            h.remove()
    same = [m for m in same if m in sizes]  # a module the forward never reaches keeps its own code
    for m in same:
        ih, iw = sizes[m]
        (kh, kw), (sh, sw), (dh, dw) = m.weight.shape[-2:], m.stride, m.dilation
        ph, pw = get_same_padding(ih, kh, sh, dh), get_same_padding(iw, kw, sw, dw)
        pads = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)

        def forward(x, conv=m, pads=pads):
            return F.conv2d(F.pad(x, pads), conv.weight, conv.bias, conv.stride, 0, conv.dilation, conv.groups)

        m.forward = forward
    return len(same)


def export_onnx(model: MultiDomainModel, path: str | Path, opset: int = OPSET) -> Path:
    """Write ``model`` as one ONNX file (weights inside) with a dynamic batch axis and the model's fixed
    image size; returns the path. ``model`` itself is not changed."""
    path = Path(path)
    size = model.config.image_size
    images = torch.randint(0, 256, (3, 3, size, size), dtype=torch.uint8)
    domain = torch.tensor([0, -1, len(model.config.domains) - 1])
    net = ExportNet(copy.deepcopy(model)).eval()
    static_same_padding(net, images, domain)
    axes = {"images": {0: "batch"}, "domain": {0: "batch"}, OUTPUT: {0: "batch"}}
    import onnx

    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        torch.onnx.export(net, (images, domain), buffer, input_names=list(INPUTS), output_names=[OUTPUT],
                          dynamic_axes=axes, opset_version=opset, dynamo=False, do_constant_folding=True)
    graph = onnx.load_model_from_string(buffer.getvalue())
    drop_empty_optional_inputs(graph)
    onnx.save(graph, str(path))
    return path


def drop_empty_optional_inputs(model) -> None:
    """Remove, in place, the trailing empty ("") inputs the exporter writes for omitted optional inputs
    (Pad's ``constant_value``). Same graph; ONNX Runtime's PadFusion refuses a Pad that has one, so without
    this the constant padding stays a separate copy of the tensor before its convolution."""
    for node in model.graph.node:
        while node.input and node.input[-1] == "":
            node.input.pop()


def session(path: str | Path, threads: int = 1):
    """An ONNX Runtime CPU session with ``threads`` intra-op threads (and one inter-op thread)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def ort_logits(sess, images: torch.Tensor, domains: torch.Tensor | None, batch_size: int = 256) -> torch.Tensor:
    """Logits of uint8 ``images`` (N,3,H,W) through an ONNX Runtime session; ``domains`` None = unknown."""
    n = len(images)
    if domains is None:
        domains = torch.full((n,), -1, dtype=torch.long)
    out = []
    for s in range(0, n, batch_size):
        feed = {"images": images[s : s + batch_size].numpy(), "domain": domains[s : s + batch_size].numpy().astype(np.int64)}
        out.append(torch.from_numpy(sess.run([OUTPUT], feed)[0]))
    return torch.cat(out) if out else torch.empty(0)
