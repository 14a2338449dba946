"""Grad-CAM sheets per domain: where the model looks when it is right and when it is wrong, so a person
sees whether it reads the object or the background, the paper texture or the sensor noise.

Grad-CAM (Selvaraju et al., 2017) through ``captum``'s ``LayerGradCam``, on the deepest backbone stage
(timm ``feature_info``) whose map still has ``min_side`` cells a side: at 32 pixels a ResNet's last stage
is 1 x 1, a map with nothing to show. Each image is explained for the class the model predicted, with its
own domain id (seen domains) or none (-1, held-out domains: the routed path a new site gets).
"""
from __future__ import annotations

import zlib

import numpy as np
import torch
from torch import nn

from mdcore.data.images import to_float


def cam_layer(model: nn.Module, image_size: int, min_side: int = 4) -> str:
    """Name (inside ``model``) of the deepest feature stage whose map is at least ``min_side`` a side."""
    info = getattr(model.backbone, "feature_info", None)
    if not info:
        raise ValueError(f"Grad-CAM needs timm feature_info, which backbone {model.config.backbone!r} lacks")
    stages = [dict(s) for s in info]
    fits = [s for s in stages if image_size // max(int(s.get("reduction", 1)), 1) >= min_side]
    return "backbone." + (fits[-1] if fits else stages[0])["module"]


def grad_cam(model: nn.Module, images: torch.Tensor, domains: torch.Tensor, targets: torch.Tensor,
             layer: str, batch_size: int = 32) -> torch.Tensor:
    """(N, H, W) maps in [0, 1] (each scaled to its own maximum; all zero where nothing pushes the target
    up) of uint8 ``images`` for class ``targets``; ``domains``: index per image, -1 = unknown."""
    from captum.attr import LayerAttribution, LayerGradCam

    model.eval()
    device = next(model.parameters()).device
    cam = LayerGradCam(model, model.get_submodule(layer))
    out = []
    for s in range(0, len(images), batch_size):
        x = to_float(images[s : s + batch_size].to(device, copy=True))
        with torch.enable_grad():
            a = cam.attribute(x, target=targets[s : s + batch_size].to(device), relu_attributions=True,
                              additional_forward_args=(domains[s : s + batch_size].to(device),))
        a = LayerAttribution.interpolate(a.detach().float().cpu(), tuple(x.shape[-2:]), "bilinear")[:, 0]
        peak = a.flatten(1).amax(1).clamp(min=1e-12)[:, None, None]
        out.append((a / peak).clamp(0, 1))
    return torch.cat(out) if out else torch.empty(0, *images.shape[-2:])


def pick(correct: np.ndarray, n: int, seed: int, domain: str) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of up to ``n`` correct and ``n`` wrong predictions, a seeded draw fixed per domain name
    (the same images on every run of the same data, whatever other domains there are)."""
    rng = np.random.default_rng([seed, zlib.crc32(domain.encode())])
    right, wrong = np.flatnonzero(correct), np.flatnonzero(~correct)
    return (np.sort(rng.choice(right, min(n, len(right)), replace=False)),
            np.sort(rng.choice(wrong, min(n, len(wrong)), replace=False)))


def overlay(image: torch.Tensor, cam: torch.Tensor, alpha: float = 0.45) -> np.ndarray:
    """HWC uint8: the image blended with the map in matplotlib's ``jet`` colours."""
    from matplotlib import colormaps

    rgb = image.permute(1, 2, 0).numpy().astype(np.float32)
    heat = colormaps["jet"](cam.numpy())[..., :3] * 255
    return ((1 - alpha) * rgb + alpha * heat).clip(0, 255).astype(np.uint8)


def sheet(images: torch.Tensor, cams: torch.Tensor, labels, preds, right: np.ndarray, wrong: np.ndarray,
          class_names: list[str], title: str, out, scale: int = 3) -> None:
    """One PNG: a row per sample, correct predictions (image | Grad-CAM) on the left, wrong ones on the
    right, each titled true -> predicted. One mosaic in one axes: quick to draw at any sample size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h, w = images.shape[-2:]
    rows, gap = max(len(right), len(wrong), 1), 4
    cell_w, cell_h = w * scale, h * scale
    mosaic = np.full((rows * (cell_h + gap * 4), 4 * cell_w + 3 * gap + 4 * gap, 3), 255, np.uint8)
    fig_w = mosaic.shape[1] / 60
    fig, ax = plt.subplots(figsize=(max(fig_w, 4), mosaic.shape[0] / 60 + 0.6))
    texts = []
    for side, picks in enumerate((right, wrong)):
        for r, i in enumerate(picks):
            y0 = r * (cell_h + gap * 4) + gap * 3
            x0 = side * (2 * cell_w + gap + 4 * gap)
            img = images[i].repeat_interleave(scale, 1).repeat_interleave(scale, 2)
            cam = cams[i].repeat_interleave(scale, 0).repeat_interleave(scale, 1)
            mosaic[y0 : y0 + cell_h, x0 : x0 + cell_w] = img.permute(1, 2, 0).numpy()
            mosaic[y0 : y0 + cell_h, x0 + cell_w + gap : x0 + 2 * cell_w + gap] = overlay(img, cam)
            texts.append((x0, y0 - 2, f"true {class_names[int(labels[i])]} \u2192 predicted {class_names[int(preds[i])]}",
                          "#1a7f37" if side == 0 else "#b42318"))
    ax.imshow(mosaic, interpolation="nearest")
    for x, y, text, colour in texts:
        ax.text(x, y, text, fontsize=7, color=colour, va="bottom")
    ax.set_title(f"{title}\ncorrect (image | Grad-CAM)" + " " * 12 + "wrong (image | Grad-CAM)", fontsize=9)
    if not len(wrong):
        ax.text(2 * cell_w + 5 * gap, gap * 3 + cell_h / 2, "no wrong predictions", fontsize=8, color="#555")
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)


def cam_sheets(model: nn.Module, scored, class_names: list[str], per_kind: int, seed: int, folder,
               min_side: int = 4) -> list[dict]:
    """Per domain of ``scored`` (an ``mdcore.eval.explain.Scored`` with images and paths): a seeded
    sample of up to ``per_kind`` correct and ``per_kind`` wrong predictions, their Grad-CAM sheet
    ``cam_<domain>.png`` in ``folder``, and one row per sampled image (for ``cam_samples.csv``)."""
    from pathlib import Path

    from mdcore.eval.plots import file_stem

    layer = cam_layer(model, images_side := int(scored.images.shape[-1]), min_side)
    preds = scored.logits.argmax(1)
    rows = []
    for name in sorted(set(scored.names)):
        idx = np.flatnonzero(scored.rows_of(name).numpy())
        correct = (preds[idx] == scored.labels[idx]).numpy()
        right, wrong = pick(correct, per_kind, seed, name)
        chosen = idx[np.concatenate([right, wrong])].astype(np.int64)
        if not len(chosen):
            continue
        sel = torch.from_numpy(chosen)
        cams = grad_cam(model, scored.images[sel], scored.domains[sel], preds[sel], layer)
        file = f"cam_{file_stem(name)}.png"
        k = len(right)
        sheet(scored.images[sel], cams, scored.labels[sel], preds[sel], np.arange(k), np.arange(k, len(chosen)),
              class_names, f"{name}: Grad-CAM for the predicted class ({layer}, {images_side} px)", Path(folder) / file)
        for j, i in enumerate(chosen):
            rows.append({"domain": name, "path": scored.paths[i] if scored.paths else "", "correct": bool(j < k),
                         "label": class_names[int(scored.labels[i])], "predicted": class_names[int(preds[i])],
                         "sheet": file, "cam_peak_row": int(cams[j].argmax() // cams.shape[-1]),
                         "cam_peak_col": int(cams[j].argmax() % cams.shape[-1])})
    return rows
