"""RandConv (Xu et al., 2021, "Robust and Generalizable Visual Representation Learning via Random
Convolutions"): each batch passes through a freshly drawn random convolution, which keeps shapes and
scrambles local texture and colour: style randomization in the input."""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from mdcore.synth.augment import replace_rows
from mdcore.methods.base import ERM, register_method


@register_method
class RandConv(ERM):
    """Random-convolution style randomization of the input, mixed with the original image."""

    name = "randconv"

    @dataclasses.dataclass
    class Hparams:
        randconv_p: float = 0.5  # share of images that get a random convolution
        randconv_kernels: tuple = (1, 3, 5, 7)  # kernel sizes drawn per batch
        randconv_mix: bool = True  # blend with the original by a weight drawn per image (the paper's RC_mix)

    def transform_input(self, x, domains, g):
        x = super().transform_input(x, domains, g)
        hp = self.hparams
        kernels = list(hp["randconv_kernels"])
        k = int(kernels[int(torch.randint(len(kernels), (1,), generator=g))])
        c = x.shape[1]
        weight = torch.randn(c, c, k, k, generator=g) / (c * k * k) ** 0.5
        alpha = torch.rand(x.shape[0], 1, 1, 1, generator=g) if hp["randconv_mix"] else None
        pick = torch.rand(x.shape[0], generator=g) < hp["randconv_p"]
        rows = pick.nonzero().flatten()  # only the picked images are convolved (half the work at p = 0.5)
        if not len(rows):
            return x
        src = x[rows.to(x.device)]
        out = F.conv2d(src, weight.to(x), padding=k // 2)
        # keep each image's brightness and contrast: the convolution changes texture and colour, not exposure
        dims = (1, 2, 3)
        out = (out - out.mean(dims, keepdim=True)) / out.std(dims, keepdim=True).clamp(min=1e-4)
        out = out * src.std(dims, keepdim=True) + src.mean(dims, keepdim=True)
        if alpha is not None:
            a = alpha[rows].to(x)
            out = a * src + (1 - a) * out
        return replace_rows(x, rows, out)
