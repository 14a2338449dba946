"""Checks a run makes before its first stage (and before any params file is written), so a typo in a path,
a domain or a model name fails in seconds with every problem named, and the params files stay as they were.

What is checked: the workspace is in a Git repository (DVC's); the data folder exists and has images; the
held-out domains exist in it and leave a domain to train on; the timm backbone exists; the starting weights
exist (a file, or an installed package); the backbone can host the per-domain parts fine-tuning asks for
(built on the meta device: no memory, no time).
"""
from __future__ import annotations

import logging
from pathlib import Path

from tasks.params import ParamsError

log = logging.getLogger("mdpipe")

# The built-in datasets' domains, and the one each holds out when chosen with ``--data NAME``.
BUILTIN_HOLDOUT = {"digits": ["lowlight"], "glyphs": ["outline"]}
LARGE_IMAGE_FACTOR = 4  # images this many times larger than pretrain.image_size: say so


def builtin_domains(name: str) -> list[str]:
    if name == "glyphs":
        from mdcore.data.glyphs import DOMAINS
    else:
        from mdcore.data.builtin import DOMAINS
    return list(DOMAINS)


def data_root_path(data_root: str, root: Path) -> Path:
    source = Path(data_root).expanduser()
    return source if source.is_absolute() else root / source


def data_choice(value: str, root: Path) -> dict:
    """ingest fields for ``--data VALUE`` (and the run form's ``data_root``): '' = the built-in digits; a
    built-in name (digits, glyphs) with no folder of that name = that dataset with its usual held-out domain;
    anything else = a folder, whose held-out domains are none unless given."""
    if not value:
        return {"data_root": None, "builtin": "digits"}
    if value in BUILTIN_HOLDOUT and not data_root_path(value, root).exists():
        return {"data_root": None, "builtin": value, "holdout_domains": BUILTIN_HOLDOUT[value]}
    return {"data_root": str(data_root_path(value, root).resolve()), "holdout_domains": []}


def check_data(ingest, pretrain, root: Path, warn: bool = True) -> list[str]:
    """Problems with the data the run reads (``ingest``), and a warning when the images are far larger than
    the size the model trains at (``pretrain.image_size``)."""
    from mdcore.data.manifest import DataLayoutError, scan_tree

    if not ingest.data_root:
        domains = builtin_domains(ingest.builtin)
        where = f"the built-in {ingest.builtin} dataset"
        rows = None
    else:
        source = data_root_path(ingest.data_root, root)
        if not source.is_dir():
            return [f"ingest.data_root: {source} is not a folder"]
        try:
            rows = scan_tree(source)
        except DataLayoutError as e:
            return [f"ingest.data_root: {e}"]
        domains = sorted({d for _, d, _ in rows})
        where = str(source)
    problems = []
    unknown = [d for d in ingest.holdout_domains if d not in domains]
    if unknown:
        problems.append(f"ingest.holdout_domains: {unknown} not in {where}; its domains: {domains}")
    elif not set(domains) - set(ingest.holdout_domains):
        problems.append(f"ingest.holdout_domains: {ingest.holdout_domains} holds out every domain of {where}")
    if rows and warn:
        warn_large_images(source, [r[0] for r in rows], pretrain.image_size)
    return problems + check_unlabelled(ingest, pretrain, root)


def check_unlabelled(ingest, pretrain, root: Path) -> list[str]:
    """``ingest.unlabelled_root``: a folder laid out as ROOT/DOMAIN/IMAGE, used only when pretraining runs,
    and none of its domains held out unless pretraining may adapt to them."""
    from mdcore.data.manifest import DataLayoutError
    from mdcore.data.unlabelled import scan_unlabelled

    if not ingest.unlabelled_root:
        return []
    try:
        rows = scan_unlabelled(data_root_path(ingest.unlabelled_root, root))
    except DataLayoutError as e:
        return [str(e)]
    problems = []
    if not (pretrain.enabled and pretrain.epochs > 0):
        problems.append("ingest.unlabelled_root: only self-supervised pretraining uses these images, and "
                        "pretrain.enabled is false (or pretrain.epochs 0); set it true, or leave the folder out")
    held = sorted({d for _, d in rows} & set(ingest.holdout_domains))
    if held and not pretrain.include_holdout_unlabelled:
        problems.append(f"ingest.unlabelled_root: has images of the held-out domain(s) {held}; move them out, or "
                        "set pretrain.include_holdout_unlabelled: true for domain adaptation")
    return problems


def warn_large_images(source: Path, rels: list[str], image_size: int, sample: int = 32) -> int | None:
    """Log a warning when the tree's images (a seeded sample, headers only) are much larger than the size the
    model trains at; returns their median longer side."""
    import random

    from PIL import Image

    picked = random.Random(0).sample(rels, min(sample, len(rels)))
    sides = []
    for rel in picked:
        try:
            with Image.open(source / rel) as im:
                sides.append(max(im.size))
        except OSError:
            continue  # the validate stage names unreadable files
    if not sides:
        return None
    median = sorted(sides)[len(sides) // 2]
    if median >= LARGE_IMAGE_FACTOR * image_size:
        log.warning("your images are about %d px (median longer side of %d sampled) and the model trains at %d px "
                    "(pretrain.image_size): fine detail is lost. For photos try -S pretrain.image_size=96 or 128 "
                    "(slower on CPU; README: 'Run it on your own images')", median, len(sides), image_size)
    return median


def check_model(pretrain, finetune) -> list[str]:
    """Problems with the backbone, its starting weights, and the per-domain parts it must host."""
    import timm
    import torch

    from mdcore.models.model import MultiDomainModel, weights_kind
    from mdcore.train.setup import model_config

    if not timm.is_model(pretrain.backbone):
        close = timm.list_models(f"*{pretrain.backbone.split('.')[0][:6]}*")[:8]
        return [f"pretrain.backbone: {pretrain.backbone!r} is not a timm model"
                + (f" (similar names: {close})" if close else "")]
    problems = []
    weights = pretrain.backbone_weights
    kind = weights_kind(weights)
    if kind == "file" and not Path(weights).expanduser().is_file():
        problems.append(f"pretrain.backbone_weights: {weights} is not a file")
    elif kind == "package":
        from mdcore.models.packaged_weights import find, weights_file

        try:
            weights_file(find(weights, pretrain.backbone))
        except Exception as e:  # noqa: BLE001 - the registry's own message names the package
            problems.append(f"pretrain.backbone_weights: {e}")
    try:
        cfg = model_config(finetune, ["a", "b"], ["x", "y"], pretrain.backbone, pretrain.image_size)
        with torch.device("meta"):
            MultiDomainModel(cfg)
    except (ValueError, RuntimeError) as e:
        problems.append(f"finetune: {e}")
    return problems


def check_workspace(root: Path) -> list[str]:
    """DVC records every stage in the workspace's Git repository (``dvc.lock``, ``.gitignore``): without one
    the first stage would fail inside DVC with a traceback."""
    from dulwich.errors import NotGitRepository
    from dulwich.repo import Repo

    try:
        Repo.discover(str(root)).close()
    except NotGitRepository:
        return [f"workspace {root}: not in a Git repository, where DVC records each stage (clone the project, "
                f"or run `git init` in {root})"]
    return []


def check_run(params, root: Path, warn: bool = True, pipeline: bool = True) -> None:
    """Every check above on a whole run's params (a ``PipelineParams``); raises one ParamsError naming them all.
    ``warn``: also log warnings (the image size) that do not stop the run; ``pipeline``: the run goes through
    DVC (``mdpipe run``, the flow), not one stage alone."""
    problems = ((check_workspace(root) if pipeline else []) + check_data(params.ingest, params.pretrain, root, warn)
                + check_model(params.pretrain, params.finetune))
    domain_mix = params.finetune.domain_mix
    if not isinstance(domain_mix, str) and params.ingest.data_root is None:
        unknown = sorted(set(domain_mix) - set(builtin_domains(params.ingest.builtin)))
        if unknown:
            problems.append(f"finetune.domain_mix: {unknown} are not domains of the built-in {params.ingest.builtin}")
    if problems:
        raise ParamsError("the run was not started (params files unchanged):\n  - " + "\n  - ".join(problems))
