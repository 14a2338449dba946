"""One seed of the continual-learning experiment: domains arrive one at a time; each arrival grows the
model by that domain (parts copied from the nearest known domain) and fine-tunes it on the new domain's
data, with a replay buffer of past data or without (naive fine-tuning). Also, at the last arrival: a full
retrain on every domain (the reference), the same arrival added to a champion trained on every earlier
domain at once (the product's case: the pipeline trains its champion that way), few-shot adaptation (k per
class, the new domain's parts only) and test-time normalization (no labels).

Everything trains in this process with the finetune stage's builders (``mdcore.train.setup``); selection
uses the validation split of the domains the model knows, never test; the gate split scores the old
domains before and after each arrival, as the promotion gate would.
"""
from __future__ import annotations

import copy
import time
from typing import Callable, Iterable

import torch

from mdcore.data.images import ImageSet, to_float


def concat(a: ImageSet, b: ImageSet) -> ImageSet:
    return ImageSet(torch.cat([a.images, b.images]), torch.cat([a.labels, b.labels]),
                    torch.cat([a.domains, b.domains]), a.domain_names, a.class_names)


def learn(model, train: ImageSet, val: ImageSet, p, batches: Callable[[int], Iterable[torch.Tensor]], *,
          method=None, select: bool = True, warmup_epochs: int | None = None, teacher=None,
          kd_weight: float = 0.0) -> dict:
    """Fine-tune ``model`` in place with ``mdcore.train.fit`` for ``p.epochs`` over ``batches(epoch)`` (index
    tensors into ``train``); keep the epoch with the best accuracy on ``val`` (the known domains' validation
    split) when ``select``. Frozen parameters (``requires_grad`` False) stay as they are; ``warmup_epochs``:
    as in ``build_optimizer`` (None: its default). ``teacher`` (the model before a new domain was added):
    its answers on the images of the domains it knows are kept with ``kd_weight`` x a distillation loss (the
    ``distill`` method). Prototypes are not refitted here (the caller refits the domains it has data of).
    Returns timings and the history."""
    from mdcore.methods import create_method
    from mdcore.train import fit
    from mdcore.train.setup import build_optimizer, fit_config, method_spec

    if method is None:
        spec, hparams = method_spec(p)
        if teacher is not None and kd_weight > 0:
            spec, hparams = f"{spec}+distill", hparams | {"kd_weight": kd_weight,
                                                          "kd_domains": len(teacher.config.domains)}
        method = create_method(spec, hparams)
        method.teacher = teacher
    method.attach(model)
    optimizer, scheduler = build_optimizer(p, model, warmup_epochs=warmup_epochs)
    config = fit_config(p, train.domain_names)
    config.select, config.refit_prototypes = select, False
    result = fit(model, method, train, val if select else None, config, optimizer, scheduler, batches=batches)
    return {"train_s": result.train_s, "images_seen": result.images_seen,
            "history": [{"epoch": r["epoch"], "train_loss": r["train_loss"], "val_acc": r["val_acc"]}
                        for r in result.history]}


def learn_own_parts(model, train: ImageSet, val: ImageSet, p, batches: Callable[[int], Iterable[torch.Tensor]],
                    keep: int | list[int], **kwargs) -> dict:
    """``learn`` with only the per-domain parts trainable (no weight decay, no freezing schedule), then
    everything but domain(s) ``keep``'s own rows restored: the other domains, the shared weights and their
    statistics compute exactly as before. The shared weights stay frozen during training and trainable
    again after. ``kwargs``: as ``learn``'s."""
    from mdcore.continual import restore_domains, train_only_domain_parts

    reference = {n: v.clone() for n, v in model.state_dict().items()}
    train_only_domain_parts(model)
    try:
        info = learn(model, train, val, p.model_copy(update={
            "weight_decay": 0.0, "freeze_stages": 0, "adapters_only": False, "gradual_unfreeze_every": 0}),
            batches, **kwargs)
    finally:
        for q in model.parameters():
            q.requires_grad_(True)
    restore_domains(model, reference, keep=keep)
    return info


def merge_on_validation(model, grown: dict, alphas: list[float], new: int, val: ImageSet) -> float:
    """Move ``model``'s weights back toward ``grown`` (the model right after the domain was added) by the
    alpha of ``alphas`` with the best accuracy on ``val`` (the known domains' validation split; ties go to
    the larger alpha, which keeps more of the old model); the new domain's own rows stay as trained."""
    from mdcore.continual import interpolate_toward
    from mdcore.eval.scoring import evaluate_split

    trained = {n: v.clone() for n, v in model.state_dict().items()}
    names = [val.domain_names[d] for d in val.domains]
    best_acc, best_alpha = -1.0, 0.0
    for alpha in sorted(alphas):
        model.load_state_dict(trained)
        interpolate_toward(model, grown, alpha, keep=new)
        acc = evaluate_split(model, val, names)["acc"]
        if acc >= best_acc:
            best_acc, best_alpha = acc, alpha
    model.load_state_dict(trained)
    interpolate_toward(model, grown, best_alpha, keep=new)
    return best_alpha


def _acc(model, data: ImageSet, known: bool) -> float:
    from mdcore.eval.scoring import evaluate_split

    if len(data) == 0:
        return float("nan")
    return evaluate_split(model, data, [data.domain_names[0]] * len(data), use_domain=known)["acc"]


def _row(model, tests: list[ImageSet], n_known: int) -> list[float]:
    """Test accuracy on every domain of the sequence: known ones with their domain id, later ones routed."""
    return [_acc(model, t, j < n_known) for j, t in enumerate(tests)]


def train_sequence(spec: dict) -> dict:
    """``spec``: manifest, image_root, image_size, backbone, order (domains in arrival order), seed, threads,
    finetune (FinetuneParams fields: the budget of the first domain and of the full retrain), add_epochs,
    replay_fraction, replay_strategy, replay_per_batch, few_shot_k, few_shot_epochs, tolerance; optional:
    add_mode (joint, parts_first, parts), joint_lr_scale, parts_lr_scale, joint_epochs (parts_first), add_warmup_epochs (the joint add
    step's warm-up; absent = build_optimizer's), replay_kd_weight (the joint add step distils the model
    before the arrival on replayed images), add_lr (the add step's learning rate; absent = finetune's),
    merge_alphas (joint: after each arrival the weights move back toward the grown model by the alpha best
    on the known domains' validation split), known_stats (``frozen``: the joint add step normalizes the known
    domains by their running statistics and never updates them)."""
    from flows.lodo_cell import _all_images, _subset
    from mdcore.continual import (add_domain, few_shot_mask, gem_metrics, mixed_batches, nearest_domain,
                                  per_sample_losses, recompute_domain_norm, refit_prototypes, replay_budget,
                                  select_replay)
    from mdcore.models.domain_norm import freeze_domain_statistics
    from mdcore.eval.promotion import decide
    from mdcore.data.sampler import domain_balanced_batches
    from mdcore.eval.scoring import evaluate_split
    from mdcore.train.setup import build_model
    from tasks.params import FinetuneParams

    t_start = time.perf_counter()
    torch.set_num_threads(int(spec.get("threads", 2)))
    seed, order = int(spec["seed"]), list(spec["order"])
    p = FinetuneParams.model_validate(spec["finetune"] | {"seed": seed})
    p_add = p.model_copy(update={"epochs": int(spec["add_epochs"]), "lr": float(spec.get("add_lr", p.lr))})
    frame, data = _all_images(spec["manifest"], spec["image_root"], int(spec["image_size"]))

    def part(domain: str, split: str) -> ImageSet:
        return _subset(frame, data, frame[(frame["domain"] == domain) & (frame["split"] == split)], order)

    train = {d: part(d, "train") for d in order}
    val = {d: part(d, "val") for d in order}
    gate = {d: part(d, "gate") for d in order}
    tests = [part(d, "test") for d in order]

    def known(sets: dict, upto: int) -> ImageSet:
        out = sets[order[0]]
        for d in order[1 : upto + 1]:
            out = concat(out, sets[d])
        return out

    def gate_acc(model, upto: int) -> dict[str, float]:
        g = known(gate, upto)
        return evaluate_split(model, g, [order[d] for d in g.domains])["per_domain"]

    def val_acc(model, upto: int) -> dict[str, float]:  # the known domains' validation split: what may choose
        v = known(val, upto)
        return evaluate_split(model, v, [order[d] for d in v.domains])["per_domain"]

    def balanced(ds: ImageSet, params) -> Callable[[int], Iterable[torch.Tensor]]:
        return lambda epoch: list(domain_balanced_batches(ds.domains, params.batch_size, epoch=epoch, seed=seed,
                                                           mix=params.domain_mix))

    # the first domain: a model of one domain, from random weights
    torch.manual_seed(seed)
    t0 = train[order[0]]
    first = build_model(p, ImageSet(t0.images, t0.labels, t0.domains, [order[0]], t0.class_names),
                        spec["backbone"], int(spec["image_size"]))
    baseline = _row(first, tests, 0)  # GEM's b: the untrained model, every domain routed
    t0_info = learn(first, train[order[0]], val[order[0]], p, balanced(train[order[0]], p))
    refit_prototypes(first, to_float(train[order[0]].images), train[order[0]].domains)
    row0 = _row(first, tests, 1)

    def fit_new_domain(model, ds, new_idx, replay_idx, val_t, t, teacher) -> dict:
        """``joint``: every weight learns from new + replayed images for add_epochs. ``parts_first``: the new
        domain's own parts learn alone first (add_epochs - joint_epochs epochs at ``parts_lr_scale`` x the
        learning rate: they start as a copy of another domain's, and nothing else moves), the other domains
        restored after; then ``joint_epochs`` (default 1) with replay at ``joint_lr_scale`` x the rate."""
        def mixed(idx_replay, per_batch):
            return lambda epoch: list(mixed_batches(new_idx, idx_replay, p.batch_size, per_batch, epoch=epoch,
                                                    seed=seed))

        replayed = mixed(replay_idx, int(spec["replay_per_batch"]))
        mode = spec.get("add_mode", "joint")
        if mode == "parts":  # its own parts alone, every epoch; nothing the other domains use moves
            return learn_own_parts(model, ds, val_t, p_add.model_copy(update={
                "lr": p_add.lr * float(spec.get("parts_lr_scale", 1.0))}), mixed(replay_idx[:0], 0), keep=t,
                warmup_epochs=spec.get("add_warmup_epochs"))
        joint_epochs = int(spec.get("joint_epochs", 1))
        if mode != "parts_first" or p_add.epochs <= joint_epochs:
            kd = float(spec.get("replay_kd_weight", 0.0))
            grown = {n: v.clone() for n, v in model.state_dict().items()} if spec.get("merge_alphas") else None
            if spec.get("known_stats", "updated") == "frozen":
                freeze_domain_statistics(model, list(range(t)))
            info = learn(model, ds, val_t, p_add, replayed, warmup_epochs=spec.get("add_warmup_epochs"),
                         teacher=teacher if kd > 0 else None, kd_weight=kd)
            freeze_domain_statistics(model, [])
            if spec.get("merge_alphas"):
                info["merge_alpha"] = merge_on_validation(model, grown, [float(a) for a in spec["merge_alphas"]],
                                                          t, val_t)
            return info
        first = learn_own_parts(model, ds, val_t, p_add.model_copy(update={
            "epochs": p_add.epochs - joint_epochs, "lr": p_add.lr * float(spec.get("parts_lr_scale", 1.0))}),
            mixed(replay_idx[:0], 0), keep=t)
        # the joint epoch at joint_lr_scale x lr: as gentle as the joint mode's warm-up epoch by default
        second = learn(model, ds, val_t, p_add.model_copy(update={
            "epochs": joint_epochs, "lr": p_add.lr * float(spec.get("joint_lr_scale", 0.1))}), replayed,
            warmup_epochs=spec.get("add_warmup_epochs"))
        return {"train_s": first["train_s"] + second["train_s"],
                "images_seen": first["images_seen"] + second["images_seen"]}

    arms = {}
    for arm, fraction in (("replay", float(spec["replay_fraction"])), ("naive", 0.0)):
        model, R, steps = copy.deepcopy(first), [row0], []
        for t in range(1, len(order)):
            new = order[t]
            nearest, sims = nearest_domain(model.eval(), to_float(train[new].images))
            before_gate, before_val = gate_acc(model, t - 1), val_acc(model, t - 1)
            # the model before the arrival, kept only for replay distillation
            teacher = copy.deepcopy(model).eval() if float(spec.get("replay_kd_weight", 0.0)) > 0 else None
            model = add_domain(model, new, init_from=nearest)
            past = known(train, t - 1)
            budget = replay_budget(len(past), fraction)
            losses = (per_sample_losses(model, past.images, past.labels, past.domains)
                      if spec["replay_strategy"] == "hardest" and budget else None)
            keep = select_replay(past.domains, budget, spec["replay_strategy"], seed=seed * 31 + t, losses=losses)
            ds = concat(train[new], past.subset(torch.isin(torch.arange(len(past)), keep)))
            new_idx = torch.arange(len(train[new]))
            replay_idx = torch.arange(len(train[new]), len(ds))
            info = fit_new_domain(model, ds, new_idx, replay_idx, known(val, t), t, teacher)
            refit_prototypes(model, to_float(ds.images), ds.domains)
            R.append(_row(model, tests, t + 1))
            after_gate = gate_acc(model, t)
            decision = decide(before_gate, after_gate, float(spec["tolerance"]))
            steps.append({"domain": new, "init_from": order[nearest], "similarity": sims, "replay_images": len(keep),
                          "past_images": len(past), "train_s": round(info["train_s"], 2),
                          "images_seen": info["images_seen"], "gate_before": before_gate, "gate_after": after_gate,
                          "gate_pass": decision.promote, "gate_reason": decision.reason,
                          "val_before": before_val, "val_after": val_acc(model, t),
                          **({"merge_alpha": info["merge_alpha"]} if "merge_alpha" in info else {})})
            if arm == "replay" and t == len(order) - 2:
                before_last = copy.deepcopy(model)
        arms[arm] = {"R": R, "steps": steps, "metrics": gem_metrics(R, baseline)}
    if len(order) == 2:
        before_last = copy.deepcopy(first)

    # the reference: a full retrain on every domain, from random weights
    last = order[-1]
    torch.manual_seed(seed)
    full = build_model(p, known(train, len(order) - 1), spec["backbone"], int(spec["image_size"]))
    full_info = learn(full, known(train, len(order) - 1), known(val, len(order) - 1), p,
                      balanced(known(train, len(order) - 1), p))
    full_row = _row(full, tests, len(order))

    # the product's case: the champion was trained on every earlier domain at once (as the pipeline and a
    # full retrain train it), then the last domain is added to it with the same add step and replay budget
    n = len(order)
    champ_train = known(train, n - 2)
    torch.manual_seed(seed)
    champion = build_model(p, ImageSet(champ_train.images, champ_train.labels, champ_train.domains, order[:-1],
                                       champ_train.class_names), spec["backbone"], int(spec["image_size"]))
    champ_info = learn(champion, champ_train, known(val, n - 2), p, balanced(champ_train, p))
    refit_prototypes(champion, to_float(champ_train.images), champ_train.domains)
    champion_row = _row(champion, tests, n - 1)
    init_c, _ = nearest_domain(champion.eval(), to_float(train[last].images))
    gate_before_c, val_before_c = gate_acc(champion, n - 2), val_acc(champion, n - 2)
    teacher_c = copy.deepcopy(champion).eval() if float(spec.get("replay_kd_weight", 0.0)) > 0 else None
    grown_c = add_domain(champion, last, init_from=init_c)
    budget_c = replay_budget(len(champ_train), float(spec["replay_fraction"]))
    keep_c = select_replay(champ_train.domains, budget_c, spec["replay_strategy"], seed=seed * 31 + n - 1,
                           losses=per_sample_losses(grown_c, champ_train.images, champ_train.labels, champ_train.domains)
                           if spec["replay_strategy"] == "hardest" and budget_c else None)
    ds_c = concat(train[last], champ_train.subset(torch.isin(torch.arange(len(champ_train)), keep_c)))
    add_c = fit_new_domain(grown_c, ds_c, torch.arange(len(train[last])), torch.arange(len(train[last]), len(ds_c)),
                           known(val, n - 1), n - 1, teacher_c)
    refit_prototypes(grown_c, to_float(ds_c.images), ds_c.domains)
    row_c = _row(grown_c, tests, n)
    gate_after_c = gate_acc(grown_c, n - 1)
    decision_c = decide(gate_before_c, gate_after_c, float(spec["tolerance"]))
    full_gate = gate_acc(full, n - 1)  # the full retrain as the challenger: what the gate says of the reference
    decision_full = decide(gate_before_c, full_gate, float(spec["tolerance"]))

    # few-shot: k labelled images per class of the last domain, its own parts only
    k = int(spec["few_shot_k"])
    nearest, _ = nearest_domain(before_last.eval(), to_float(train[last].images))
    fs = add_domain(before_last, last, init_from=nearest)
    shots = train[last].subset(few_shot_mask(train[last].labels, k, seed=seed))
    p_fs = p.model_copy(update={"epochs": int(spec["few_shot_epochs"]), "layer_decay": None})
    fs_info = learn_own_parts(fs, shots, val[last], p_fs, lambda epoch: list(mixed_batches(
        torch.arange(len(shots)), torch.empty(0, dtype=torch.long), min(p.batch_size, len(shots)), 0,
        epoch=epoch, seed=seed)), keep=len(order) - 1, select=False)
    fs_acc = _acc(fs, tests[-1], True)
    fs_gate = decide(gate_acc(before_last, len(order) - 2), gate_acc(fs, len(order) - 1), float(spec["tolerance"]))

    # test-time normalization: the last domain's batch-norm statistics from its unlabelled images
    tt = add_domain(before_last, last, init_from=nearest).eval()
    t_tt = time.perf_counter()
    recompute_domain_norm(tt, to_float(train[last].images), len(order) - 1)
    tt_s = time.perf_counter() - t_tt
    tt_acc = _acc(tt, tests[-1], True)

    before_acc = arms["replay"]["R"][-2][-1]  # the last domain, routed, before it arrived
    gain = full_row[-1] - before_acc

    def recovered(acc: float) -> float | None:
        return (acc - before_acc) / gain if abs(gain) > 1e-9 else None

    add_step = arms["replay"]["steps"][-1]
    return {
        "seed": seed, "order": order, "baseline": baseline, "arms": arms,
        "first_domain": {"train_s": round(t0_info["train_s"], 2), "images_seen": t0_info["images_seen"]},
        "full_retrain": {"row": full_row, "train_s": round(full_info["train_s"], 2),
                         "images_seen": full_info["images_seen"], "metrics_last_row": sum(full_row) / len(full_row)},
        "add_domain": {"domain": last, "acc": arms["replay"]["R"][-1][-1], "full_acc": full_row[-1],
                       "gap": arms["replay"]["R"][-1][-1] - full_row[-1], "train_s": add_step["train_s"],
                       "time_share": add_step["train_s"] / max(full_info["train_s"], 1e-9),
                       "gate_pass": add_step["gate_pass"], "gate_reason": add_step["gate_reason"]},
        "add_to_champion": {"domain": last, "init_from": order[init_c], "acc": row_c[-1], "full_acc": full_row[-1],
                            "gap": row_c[-1] - full_row[-1], "train_s": round(add_c["train_s"], 2),
                            "val_acc": _acc(grown_c, val[last], True), "full_val_acc": _acc(full, val[last], True),
                            "time_share": add_c["train_s"] / max(full_info["train_s"], 1e-9),
                            "images_seen": add_c["images_seen"], "replay_images": len(keep_c),
                            "champion_train_s": round(champ_info["train_s"], 2), "champion_row": champion_row,
                            "row": row_c, "gate_before": gate_before_c, "gate_after": gate_after_c,
                            "gate_pass": decision_c.promote, "gate_reason": decision_c.reason,
                            "full_retrain_gate": full_gate, "full_retrain_gate_pass": decision_full.promote,
                            "val_before": val_before_c, "val_after": val_acc(grown_c, n - 1)},
        "few_shot": {"k": k, "images": len(shots), "acc": fs_acc, "before_acc": before_acc, "full_acc": full_row[-1],
                     "recovered": recovered(fs_acc), "train_s": round(fs_info["train_s"], 2),
                     "gate_pass": fs_gate.promote},
        "test_time_norm": {"acc": tt_acc, "recovered": recovered(tt_acc), "s": round(tt_s, 2),
                           "unlabelled_images": len(train[last])},
        "train_images": {d: len(train[d]) for d in order},
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
