"""Line-drawing views: shape-biased style randomization in the input.

Texture and fill are what changes most between photographs, prints and sketches of the same object
(PACS' and DomainNet's sketch domains), and a model trained on filled shapes alone leans on them.
A share of each batch is replaced by a line drawing of itself: the edges of the image's luminance
(Sobel gradient magnitude, thresholded softly at a level drawn per image, lines sometimes thickened),
drawn as ink of a random tone on paper of a random tone, either polarity. Labels are kept; shapes are
kept; fill and texture are gone. It composes with RandConv (``randconv+linedraw``), which scrambles
texture but keeps fill.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from mdcore.synth.augment import replace_rows
from mdcore.methods.base import ERM, register_method

_SOBEL = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def edge_strength(x: torch.Tensor) -> torch.Tensor:
    """Per-pixel edge strength in [0, 1]: gradient magnitude of the luminance over each image's maximum,
    found at twice the resolution so that both sides of a thin stroke stay separate lines."""
    lum = F.interpolate(x.mean(dim=1, keepdim=True), scale_factor=2, mode="bilinear", align_corners=False)
    kernel = torch.stack([_SOBEL, _SOBEL.t()]).unsqueeze(1).to(x)
    grad = F.conv2d(F.pad(lum, (1, 1, 1, 1), mode="replicate"), kernel)
    mag = grad.pow(2).sum(dim=1, keepdim=True).sqrt()
    return mag / mag.amax(dim=(2, 3), keepdim=True).clamp(min=1e-6)


def line_drawing(x: torch.Tensor, g: torch.Generator | None, rows: torch.Tensor | None = None) -> torch.Tensor:
    """A line drawing of every image of ``x`` (floats in [-1, 1], N x C x H x W), drawn per image at random;
    with ``rows``, of those images only (the random parameters are still drawn for all N, so the random
    stream, and each drawn image, do not depend on which images are drawn)."""
    n, c = x.shape[:2]

    def u(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return torch.empty(n, *shape).uniform_(lo, hi, generator=g).to(x)

    level, width = u(0.25, 0.5, 1, 1, 1), u(0.02, 0.05, 1, 1, 1)
    thick = (torch.rand(n, 1, 1, 1, generator=g) < 0.2).to(x.device)
    paper = u(0.5, 1.0, 1, 1, 1) + u(-0.1, 0.1, c, 1, 1)
    ink = u(-1.0, -0.2, 1, 1, 1) + u(-0.1, 0.1, c, 1, 1)
    light_on_dark = (torch.rand(n, 1, 1, 1, generator=g) < 0.2).to(x.device)
    if rows is not None:
        if not len(rows):
            return x[:0]
        rows = rows.to(x.device)
        x, level, width, thick, paper, ink, light_on_dark = (
            t[rows] for t in (x, level, width, thick, paper, ink, light_on_dark))
    mag = edge_strength(x)
    lines = torch.sigmoid((mag - level) / width)
    thick_rows = thick.flatten().nonzero().flatten()  # thickened for those images only (a fifth)
    if len(thick_rows):
        lines = replace_rows(lines, thick_rows, F.max_pool2d(lines[thick_rows], 3, stride=1, padding=1))
    lines = F.avg_pool2d(lines, 2)  # back to the input's size: drawn lines are about a pixel wide
    paper, ink = torch.where(light_on_dark, -paper, paper), torch.where(light_on_dark, -ink, ink)
    return paper * (1 - lines) + ink * lines


@register_method
class LineDraw(ERM):
    """Replace a share of the training images by line drawings of themselves (shape over texture)."""

    name = "linedraw"

    @dataclasses.dataclass
    class Hparams:
        linedraw_p: float = 0.3  # share of training images shown as line drawings

    def transform_input(self, x, domains, g):
        x = super().transform_input(x, domains, g)
        pick = torch.rand(x.shape[0], generator=g) < self.hparams["linedraw_p"]
        rows = pick.nonzero().flatten()  # only the picked images are drawn (a third of the work at p = 0.3)
        drawn = line_drawing(x, g, rows)
        return replace_rows(x, rows, drawn) if len(rows) else x
