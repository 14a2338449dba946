"""pretrain: domain-adaptive self-supervised (SimCLR) pretraining of the shared timm backbone on the
training images of all seen domains (labels unused)."""
from __future__ import annotations

import json
import logging

import torch
from prefect import task
from safetensors.torch import save_file

from mdcore.io import atomic_dir
from mdcore.model import create_backbone
from mdcore.train import ContrastiveNet, contrastive_epoch
from tasks.data import image_roots, load_split
from tasks.params import PretrainParams
from tasks.paths import Paths
from tasks.stage import StageResult, execute

log = logging.getLogger("mdpipe.pretrain")
BACKBONE_WEIGHTS = "backbone.safetensors"


def run(params: PretrainParams, paths: Paths) -> StageResult:
    torch.manual_seed(params.seed)
    torch.set_num_threads(params.threads)
    splits = ("train", "holdout") if params.include_holdout_unlabelled else ("train",)
    data, _ = load_split(paths.train_manifest, image_roots(paths.raw, paths.synthetic), params.image_size, splits)
    backbone = create_backbone(params.backbone)
    history = []
    if params.enabled and params.epochs > 0:
        net = ContrastiveNet(backbone)
        optimizer = torch.optim.AdamW(net.parameters(), lr=params.lr, weight_decay=params.weight_decay)
        for epoch in range(params.epochs):
            stats = contrastive_epoch(net, data.images, optimizer, batch_size=params.batch_size, epoch=epoch,
                                      seed=params.seed, temperature=params.temperature)
            history.append(stats)
            log.info("pretrain epoch %d/%d: ssl_loss %.4f", epoch + 1, params.epochs, stats["ssl_loss"])
    with atomic_dir(paths.pretrained) as tmp:
        state = {k: v.detach().contiguous() for k, v in backbone.state_dict().items()}
        save_file(state, str(tmp / BACKBONE_WEIGHTS))
        (tmp / "config.json").write_text(json.dumps({
            "backbone": params.backbone, "image_size": params.image_size, "pretrained": params.enabled,
            "images": len(data), "history": history}, indent=2) + "\n")
    metrics = {"images": len(data), "epochs": params.epochs if params.enabled else 0,
               "final_ssl_loss": history[-1]["ssl_loss"] if history else None, "backbone": params.backbone}
    return StageResult({"pretrained": str(paths.pretrained)}, metrics)


@task(name="pretrain")
def pretrain_task(root: str = ".") -> dict:
    """Prefect task: the pretrain stage."""
    return execute("pretrain", root)
