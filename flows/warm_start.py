"""Warm start: the retrain flow fine-tunes the champion on the training images it has not seen, each batch
topped up from a replay buffer of the ones it has (``params/continual.yaml``), instead of rerunning the
whole pipeline. A domain the champion does not know gets its per-domain parts added, copied from the
nearest known domain (feature prototypes), and the shared backbone keeps what it learned. When only new
domains arrive, ``new_domain: parts`` trains their own parts alone, so the known domains compute exactly
as before (residual adapters, Rebuffi et al., 2017).

What the champion was trained on is kept beside it as ``trained_on.json`` (content hashes of its training
rows), so "new" means new content whatever the file names, and the buffer only holds past images.
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch

TRAINED_ON = "trained_on.json"


def trained_rows(manifest: str | Path) -> list[str]:
    """Content hashes of the training rows of a manifest (what a model trained on it has seen)."""
    from mdcore.data.manifest import read_manifest

    frame = read_manifest(manifest)
    return sorted(set(frame.loc[frame["split"] == "train", "sha256"]))


def write_trained_on(folder: str | Path, hashes: list[str]) -> None:
    from mdcore.data.io import atomic_write_json

    atomic_write_json(Path(folder) / TRAINED_ON, sorted(set(hashes)))


def step_mode(new_rows, added: list[str], new_domain: str) -> tuple[str, str]:
    """(``parts`` or ``joint``, why): the parts step when ``new_domain`` asks for it and every new *real*
    training row belongs to a domain the champion did not know. Synthetic rows of known domains do not
    count: the synthesize stage regenerates them whenever the data change, which is not new evidence."""
    if new_domain != "parts":
        return "joint", "new_domain: joint"
    if not added:
        return "joint", "no new domain: new images of known domains teach the shared weights"
    real = new_rows[new_rows["source"] == "real"] if "source" in new_rows else new_rows
    known = sorted(set(real["domain"]) - set(added))
    if known:
        return "joint", f"new real images of known domains {known} as well"
    return "parts", f"only new domains {sorted(added)}: their own parts learn, the known domains stay as they are"


def warm_start(paths, params, out: str | Path) -> dict:
    """Fine-tune the champion (``registry/champion``) on the new training rows of ``paths.train_manifest``
    plus replay, and save the result (a candidate for the gate) in ``out``. ``params``: ContinualParams.
    Returns what was done; ``{"skipped": reason}`` when there is nothing new to learn."""
    from flows.continual_cell import concat, learn, learn_own_parts
    from mdcore.continual import (add_domain, mixed_batches, nearest_domain, per_sample_losses, refit_prototypes,
                                  replay_budget, select_replay)
    from mdcore.data.images import load_images, to_float
    from mdcore.data.manifest import read_manifest
    from mdcore.models.model import load_model, save_model
    from tasks.data import image_roots
    from tasks.params import load_params

    t0 = time.perf_counter()
    torch.set_num_threads(params.threads)
    champ_dir = paths.registry / "champion"
    seen_file = champ_dir / TRAINED_ON
    if not seen_file.is_file():
        return {"skipped": f"{seen_file} is missing: the champion's training data is unknown"}
    seen = set(json.loads(seen_file.read_text()))
    model = load_model(champ_dir)
    teacher = copy.deepcopy(model).eval() if params.replay_kd_weight > 0 else None  # the champion as it was
    frame = read_manifest(paths.train_manifest)
    finetune = load_params("finetune", paths.root / "params")
    if not finetune.use_synthetic:
        frame = frame[frame["source"] == "real"]
    train = frame[frame["split"] == "train"]
    new_rows, past_rows = train[~train["sha256"].isin(seen)], train[train["sha256"].isin(seen)]
    if not len(new_rows):
        return {"skipped": "no training image the champion has not seen"}
    new_classes = sorted(set(new_rows["label"]) - set(model.config.classes))
    if new_classes:
        return {"skipped": f"new classes {new_classes}: the head must be rebuilt, a full retrain is needed"}
    roots = image_roots(paths.raw, paths.synthetic)
    size, classes, resize = model.config.image_size, model.config.classes, model.config.resize
    added = {}
    for domain in sorted(set(new_rows["domain"]) - set(model.config.domains)):
        rows = new_rows[new_rows["domain"] == domain]
        imgs = load_images(rows, roots, size, model.config.domains, classes, resize=resize).images
        nearest, sims = nearest_domain(model.eval(), to_float(imgs))
        added[domain] = {"init_from": model.config.domains[nearest], "similarity": dict(zip(model.config.domains, sims))}
        model = add_domain(model, domain, init_from=nearest)
    domains = model.config.domains
    mode, why = step_mode(new_rows, list(added), params.new_domain)
    if mode == "parts":  # the rows it learns from: the new domains' own (known domains' parts cannot move)
        new_rows = new_rows[new_rows["domain"].isin(list(added))]
    new = load_images(new_rows, roots, size, domains, classes, resize=resize)
    past = load_images(past_rows, roots, size, domains, classes, resize=resize)
    losses = per_sample_losses(model, past.images, past.labels, past.domains) if params.replay_strategy == "hardest" else None
    budget = replay_budget(len(past), params.replay_fraction, params.replay_max_images)
    keep = select_replay(past.domains, budget, params.replay_strategy, seed=params.seed, losses=losses)
    ds = concat(new, past.subset(torch.isin(torch.arange(len(past)), keep)))
    val_rows = frame[(frame["split"] == "val") & frame["domain"].isin(domains) & (frame["source"] == "real")]
    val = load_images(val_rows, roots, size, domains, classes, resize=resize)
    p = finetune.model_copy(update={"epochs": params.epochs, "lr": params.lr, "batch_size": params.batch_size,
                                    "layer_decay": None, "seed": params.seed, "method": "multidomain",
                                    "method_hparams": {}})
    new_idx, replay_idx = torch.arange(len(new)), torch.arange(len(new), len(ds))
    if mode == "parts":  # only the new domains' own parts learn, from their images alone: nothing else moves
        info = learn_own_parts(model, ds, val, p.model_copy(update={"lr": params.parts_lr, "epochs": params.parts_epochs}),
                               lambda epoch: list(mixed_batches(new_idx, replay_idx[:0], p.batch_size, 0, epoch=epoch,
                                                                seed=p.seed)),
                               keep=[domains.index(d) for d in added], warmup_epochs=params.warmup_epochs)
    else:
        info = learn(model, ds, val, p, lambda epoch: list(mixed_batches(
            new_idx, replay_idx, p.batch_size, params.replay_per_batch, epoch=epoch, seed=p.seed)),
            warmup_epochs=params.warmup_epochs, teacher=teacher, kd_weight=params.replay_kd_weight)
    # prototypes of the domains that learned: in a parts step only the new domains' (the known domains'
    # routing stays as it was); in a joint step every domain with images in the step
    refit_prototypes(model, *((to_float(new.images), new.domains) if mode == "parts" else (to_float(ds.images), ds.domains)))
    result = {"mode": mode, "mode_reason": why, "new_images": len(new), "past_images": len(past),
              "replay_images": len(keep) if mode == "joint" else 0,
              "new_domains": added, "domains": domains, "epochs": params.parts_epochs if mode == "parts" else p.epochs, "train_s": round(info["train_s"], 2),
              "images_seen": info["images_seen"], "history": info["history"]}
    save_model(model, out, extra={"warm_start": {k: v for k, v in result.items() if k != "history"}})
    write_trained_on(out, [*seen, *new_rows["sha256"]])
    result["wall_s"] = round(time.perf_counter() - t0, 2)
    return result
