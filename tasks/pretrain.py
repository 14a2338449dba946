"""pretrain: domain-adaptive self-supervised (SimCLR) pretraining of the shared timm backbone on the
training images of all seen domains (labels unused; held-out images only with include_holdout_unlabelled),
and the images without labels that ingest copied from ``ingest.unlabelled_root`` (``paths.unlabelled``).

One of the view transforms is domain-aware: Fourier amplitude mixing with an image of another domain
(``fourier_mix_prob``). With ``linear_probe`` on, the stage reports the per-domain accuracy of a logistic
regression on the frozen features, before and after pretraining (``probe.json``/``probe.md`` beside the
weights, and in the metrics); labels are used only by that report, never by the pretraining.

``input_norm`` (auto: timm's pretrained_cfg mean/std when the starting weights come with one) is what
SimCLR and the probe feed the backbone; ``config.json`` records it, and records as ``pretrained_cfg`` the
normalization the exported weights expect, so a run starting from the file normalizes the same way.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from prefect import task
from safetensors.torch import save_file

from mdcore.models.accel import resolve_device
from mdcore.models.input_norm import InputNorm, cfg_norm, input_size, recorded_norm, resize_for, resolve
from mdcore.data.images import load_images
from mdcore.data.io import atomic_dir
from mdcore.data.manifest import read_manifest
from mdcore.data.unlabelled import read_listing, usable_for_pretraining
from mdcore.models.model import create_backbone, weights_kind, weights_provenance
from mdcore.eval.probe import probe_backbone, probe_markdown
from mdcore.train.contrastive import self_supervised
from tasks.data import guard_holdout, image_roots, load_split
from tasks.params import StageParams, PretrainParams
from tasks.paths import Paths
from tasks.stage import StageResult, execute

log = logging.getLogger("mdpipe.pretrain")
BACKBONE_WEIGHTS = "backbone.safetensors"


def run(params: PretrainParams, paths: Paths) -> StageResult:
    torch.manual_seed(params.seed)
    torch.set_num_threads(params.threads)
    splits = ("train", "holdout") if params.include_holdout_unlabelled else ("train",)
    roots = image_roots(paths.raw, paths.synthetic)
    device = resolve_device(params.device, "pretrain.device")
    backbone = create_backbone(params.backbone, weights=params.backbone_weights).to(device)
    weights_norm = _weights_norm(params.backbone_weights, backbone)
    weights_source = weights_provenance(params.backbone_weights, params.backbone, backbone)
    image_size = input_size(params.image_size, weights_norm, "pretrain.image_size")
    resize = resize_for(params.resize, weights_norm, "pretrain.resize")
    data, rows = load_split(paths.train_manifest, roots, image_size, splits, resize=resize)
    if not params.include_holdout_unlabelled:  # generalization, not adaptation: nothing of them is seen
        guard_holdout(paths.train_manifest, {"pretraining": rows})
    kind, mean, std = resolve(params.input_norm, weights_norm, "image", params.backbone, "pretrain.input_norm")
    norm = InputNorm(kind, mean, std).to(device)
    probe_data = _probe_data(paths, data, rows, image_size, resize) if params.linear_probe else None
    probe_before = _probe(backbone, probe_data, params.seed, norm, device) if probe_data else None
    history = []
    ssl_images, ssl_domains, unlabelled = data.images, data.domains, {"images": 0, "dropped": 0}
    if params.enabled and params.epochs > 0:
        extra, unlabelled = _unlabelled_images(params, paths, data.domain_names, image_size, resize)
        if extra is not None:
            ssl_images, ssl_domains = torch.cat([data.images, extra.images]), torch.cat([data.domains, extra.domains])
        history = self_supervised(
            backbone, ssl_images, input_norm=norm, epochs=params.epochs, batch_size=params.batch_size,
            lr=params.lr, weight_decay=params.weight_decay, seed=params.seed, temperature=params.temperature,
            domains=ssl_domains, fourier_mix_prob=params.fourier_mix_prob,
            fourier_mix_strength=params.fourier_mix_strength, device=device,
            on_epoch=lambda e, stats: log.info("pretrain epoch %d/%d: ssl_loss %.4f", e + 1, params.epochs,
                                               stats["ssl_loss"]))
    probe_after = _probe(backbone, probe_data, params.seed, norm, device) if probe_data else None
    with atomic_dir(paths.pretrained) as tmp:
        save_backbone(tmp, backbone, params.backbone, {
            "backbone": params.backbone, "image_size": image_size, "resize": resize,
            "pretrained": bool(params.enabled and params.epochs > 0) or bool(params.backbone_weights),
            "backbone_weights": params.backbone_weights, "weights_source": weights_source,
            "self_supervised_epochs": len(history),
            "input_norm": kind,
            "pretrained_cfg": exported_norm(kind, mean, std, weights_norm, resize, trained=bool(history)),
            "images": len(data), "unlabelled_images": unlabelled["images"], "history": history})
        if probe_data:
            probe = {"before": probe_before, "after": probe_after, "kinds": probe_data["kinds"]}
            (tmp / "probe.json").write_text(json.dumps(probe, indent=2) + "\n")
            (tmp / "probe.md").write_text(probe_markdown(probe_before, probe_after, probe_data["kinds"]))
    metrics = {"images": len(data), "unlabelled_images": unlabelled["images"],
               "unlabelled_dropped_as_evaluation_copies": unlabelled["dropped"],
               "epochs": params.epochs if params.enabled else 0, "device": str(device),
               "backbone_weights": params.backbone_weights, "weights_source": weights_source,
               "final_ssl_loss": history[-1]["ssl_loss"] if history else None, "backbone": params.backbone}
    if probe_data:
        metrics["linear_probe"] = {
            "mean_before": probe_before["mean"], "mean_after": probe_after["mean"],
            "per_domain": {d: {"kind": probe_data["kinds"][d], "before": probe_before["per_domain"][d],
                               "after": probe_after["per_domain"][d]} for d in probe_after["per_domain"]},
        }
        for d, row in metrics["linear_probe"]["per_domain"].items():
            log.info("linear probe %-10s (%s): %.3f -> %.3f", d, row["kind"], row["before"], row["after"])
    return StageResult({"pretrained": str(paths.pretrained)}, metrics)


def save_backbone(folder: Path, backbone, architecture: str, config: dict) -> Path:
    """Write ``backbone`` as a timm-loadable safetensors file (other runs pass it as
    ``pretrain.backbone_weights``) and ``config`` beside it; its ``pretrained_cfg`` is what
    ``mdcore.models.input_norm.recorded_norm`` reads back. Returns the weights file."""
    state = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    save_file(state, str(folder / BACKBONE_WEIGHTS), metadata={"format": "pt", "architecture": architecture})
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder / BACKBONE_WEIGHTS


def _unlabelled_images(params: PretrainParams, paths: Paths, domain_names: list[str], image_size: int,
                       resize: str):
    """The images of ``paths.unlabelled`` pretraining may see, decoded like the training images; their
    domains keep the training domains' indices, new ones come after. Copies of an image that validation,
    test, the gate or a held-out domain scores are left out (logged and counted)."""
    folder = paths.root / paths.entries["unlabelled"] if "unlabelled" in paths.entries else None
    listing = read_listing(folder) if folder is not None else None
    if listing is None or listing.empty:
        return None, {"images": 0, "dropped": 0}
    usable, dropped = usable_for_pretraining(listing, read_manifest(paths.train_manifest),
                                             params.include_holdout_unlabelled)
    if dropped:
        log.warning("left %d unlabelled image(s) out of pretraining: the same content is a validation, test, "
                    "gate or held-out image", dropped)
    if usable.empty:
        return None, {"images": 0, "dropped": dropped}
    names = list(domain_names) + sorted(set(usable["domain"]) - set(domain_names))
    rows = usable.assign(source="unlabelled", label="")  # labels are not used: one placeholder class
    extra = load_images(rows, {"unlabelled": folder}, image_size, names, classes=[""], resize=resize)
    log.info("pretraining also sees %d unlabelled images (%s)", len(extra),
             ", ".join(f"{d} {n}" for d, n in usable["domain"].value_counts().sort_index().items()))
    return extra, {"images": len(extra), "dropped": dropped}


def _probe_data(paths: Paths, data, rows, image_size: int, resize: str) -> dict | None:
    """Labelled train rows (seen domains) and the test rows of seen domains + all held-out rows."""
    train_mask = torch.from_numpy((rows["split"] == "train").to_numpy(copy=True))
    test, test_rows = load_split(paths.train_manifest, image_roots(paths.raw, paths.synthetic), image_size,
                                 ("test", "holdout"), synthetic=False, domains=data.domain_names,
                                 classes=data.class_names, resize=resize)
    if not len(test) or not bool(train_mask.any()):
        return None
    names = list(test_rows["domain"])
    kinds = {d: "seen" if d in data.domain_names else "held-out" for d in names}
    return {"train_images": data.images[train_mask], "train_labels": data.labels[train_mask],
            "test_images": test.images, "test_labels": test.labels, "test_domains": names, "kinds": kinds}


def _weights_norm(weights: str | None, backbone) -> dict | None:
    """The starting weights' pretrained_cfg: recorded beside a file, or timm's for a tag."""
    kind = weights_kind(weights)
    if kind == "random":
        return None
    if kind == "file":
        return recorded_norm(Path(weights).expanduser())
    return cfg_norm(getattr(backbone, "pretrained_cfg", None))


def exported_norm(kind: str, mean, std, weights_norm: dict | None, resize: str, trained: bool) -> dict | None:
    """The normalization the exported weights expect: the one SimCLR used if it ran with pretrained mean/std;
    the starting weights' own if nothing trained them; None (per-image standardization or none) otherwise.
    Its interpolation is the resize filter this run used, which another run's ``resize: auto`` then takes."""
    if kind == "pretrained":
        return {"mean": mean, "std": std, "input_size": (weights_norm or {}).get("input_size"),
                "interpolation": resize}
    return None if trained or weights_norm is None else weights_norm | {"interpolation": resize}


def _probe(backbone, probe_data: dict, seed: int, norm, device) -> dict:
    return probe_backbone(backbone, probe_data["train_images"], probe_data["train_labels"],
                          probe_data["test_images"], probe_data["test_labels"], probe_data["test_domains"],
                          input_norm=norm, seed=seed, device=device)


@task(name="pretrain")
def pretrain_task(root: str = ".", params: StageParams | None = None) -> dict:
    """Prefect task: the pretrain stage."""
    return execute("pretrain", root, params)
