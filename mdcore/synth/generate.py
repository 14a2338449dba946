"""Synthetic training images for scarce domains, judged before they are written (the synthesize stage's
logic; the stage in ``tasks/synthesize.py`` adds the manifest, the report and the Prefect task).

For every scarce domain (training set below ``scarce_ratio`` x the largest) and class, the gap up to
``target_per_class`` is split between the generators (``fourier``, ``stats``, ``augment``). Each (domain,
generator) batch is scored by a domain judge (realism) and a label judge (agreement with the intended
label), fitted on the half of the real training images the generators never take content from; a batch
below the bars is rejected, never written.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from mdcore.data.io import sha256_file
from mdcore.data.manifest import COLUMNS, class_names, resolve_in
from mdcore.synth.fourier import (find_scarce_domains, fourier_style_transfer, plan_targets,
                                  radial_amplitude_profile, split_by_shares, stats_transfer)
from mdcore.synth.policy import apply_policy, fit_policy
from mdcore.synth.realism import DomainJudge, LabelJudge, StyleSpace, judge_batch

log = logging.getLogger("mdpipe.synthesize")
MIN_REFERENCE_IMAGES = 10  # fewer real validation images of a domain: compare with all seen domains' instead


class ImageCache:
    """Decoded RGB uint8 arrays of the real tree, per (path, size)."""

    def __init__(self, root: Path):
        self.root, self.cache = root, {}

    def get(self, rel: str, size: tuple[int, int]) -> np.ndarray:
        key = (rel, size)
        if key not in self.cache:
            with Image.open(resolve_in(self.root, rel)) as img:
                img = img.convert("RGB")
                if img.size != size:
                    img = img.resize(size, Image.Resampling.BILINEAR)
                self.cache[key] = np.asarray(img, dtype=np.uint8)
        return self.cache[key]

    def stack(self, rels, size: tuple[int, int]) -> np.ndarray:
        rels = list(rels)
        if not rels:
            return np.zeros((0, size[1], size[0], 3), np.uint8)
        return np.stack([self.get(r, size) for r in rels])


def _domain_size(rows: pd.DataFrame) -> tuple[int, int]:
    """The most common (width, height) of a domain's images: synthetic images are made at that size."""
    sizes = rows.groupby(["width", "height"]).size().sort_values(ascending=False)
    w, h = sizes.index[0]
    return int(w), int(h)


class Judges:
    """Domain judge, label judge and style space, fitted once on real training images of seen domains."""

    JUDGE_SIZE = (32, 32)

    def __init__(self, train: pd.DataFrame, val: pd.DataFrame, images: ImageCache):
        t0 = time.perf_counter()
        self.images = images
        x = images.stack(train["path"], self.JUDGE_SIZE)
        self.domains = sorted(train["domain"].unique())
        self.domain = DomainJudge.fit(x, train["domain"].to_numpy()) if len(self.domains) > 1 else None
        self.label = LabelJudge.fit(x, train["label"].to_numpy())
        self.style = StyleSpace.fit(x)
        self.val = val
        self.fit_s = round(time.perf_counter() - t0, 2)
        self.train_images = len(train)

    def reference(self, domain: str, train_rows: pd.DataFrame) -> dict:
        """The judges on real images of ``domain``: the domain judge's recall and the label judge's
        accuracy on its validation images (all seen domains' validation images when it has too few)."""
        own = self.val[self.val["domain"] == domain]
        rows, source = own, f"val:{domain}"
        if len(own) < MIN_REFERENCE_IMAGES:
            rows, source = self.val, "val:all-seen"
        if rows.empty:
            rows, source = train_rows, f"train:{domain} (optimistic)"
        x = self.images.stack(rows["path"], self.JUDGE_SIZE)
        x_own = self.images.stack(own["path"], self.JUDGE_SIZE) if len(own) else None
        realism = self.domain.share(x_own, domain) if (self.domain is not None and x_own is not None) else None
        return {"real_agreement": self.label.agreement(x, rows["label"].to_numpy()), "reference": source,
                "reference_images": int(len(rows)), "real_realism": realism, "real_val_images": int(len(own))}


def _generate_batch(method: str, domain: str, jobs: list[tuple[str, int]], pools: dict, params,
                    rng: np.random.Generator, images: ImageCache, size: tuple[int, int]) -> list[dict]:
    """Images for one (domain, method) batch: ``jobs`` = [(class, how many)] -> list of items
    {image, label, content, generator}."""
    style = pools["style"]
    items = []
    for label, n in jobs:
        content_rows = pools["augment_content" if method == "augment" else "content"]
        content_rows = content_rows[content_rows["label"] == label]
        if content_rows.empty or style.empty or n == 0:
            if n:
                log.warning("%s/%s: no content or style images for %s: nothing generated", domain, label, method)
            continue
        for _ in range(n):
            c_rel = content_rows["path"].iloc[int(rng.integers(len(content_rows)))]
            content = images.get(c_rel, size)
            if method == "augment":
                out, applied = apply_policy(content, pools["policy"], rng)
                gen = "augment(" + ",".join(f"{k}={v}" for k, v in applied.items()) + f",content={c_rel})"
            else:
                s_rel = style["path"].iloc[int(rng.integers(len(style)))]
                style_img = images.get(s_rel, size)
                if method == "fourier":
                    out = fourier_style_transfer(content, style_img, params.beta,
                                                 pools["profile"] if params.fourier_spectrum else None)
                    gen = (f"fourier(beta={params.beta},spectrum={params.fourier_spectrum},"
                           f"content={c_rel},style={s_rel})")
                else:
                    out = stats_transfer(content, style_img)
                    gen = f"stats(content={c_rel},style={s_rel})"
            items.append({"image": out, "label": label, "content": c_rel, "generator": gen})
    return items


def judge_half(sha256: str) -> bool:
    """Whether a training image is among those the judges are fitted on (half of them, by content)."""
    return int(sha256[:8], 16) % 2 == 0


def generate(frame: pd.DataFrame, params, raw_root: Path, out_dir: Path) -> tuple[pd.DataFrame, dict, dict]:
    """Generate, judge and write the accepted batches into ``out_dir`` -> (synthetic rows, metrics, report).
    ``params``: the synthesize params (``tasks.params.SynthesizeParams``); ``raw_root``: the real images."""
    real = frame[frame["source"] == "real"]
    train = real[real["split"] == "train"]
    sizes = train.groupby("domain").size().to_dict()
    scarce = find_scarce_domains(sizes, params.scarce_ratio)
    counts = train.groupby(["domain", "label"]).size().to_dict()
    plan = plan_targets(counts, scarce, params.target_per_class, class_names(frame))
    info = {"scarce_domains": scarce, "generated": {}, "batches": {}, "accepted_batches": [], "rejected_batches": []}
    report = {"params": params.model_dump(mode="json"), "batches": [], "policies": {}, "samples": {}}
    if not plan:
        return pd.DataFrame(columns=COLUMNS), info, report
    images = ImageCache(raw_root)
    seen = sorted(train["domain"].unique())
    val = real[(real["split"] == "val") & real["domain"].isin(seen)]
    # the judges learn from one half of the training images (by content hash) and the generators take
    # their content from the other, so a batch is never scored by a judge that saw its source images
    fitted = train["sha256"].map(judge_half).astype(bool)
    judges = Judges(train[fitted], val, images)
    content_rows = train[~fitted]
    info["judges"] = {"train_images": judges.train_images, "domains": judges.domains, "fit_s": judges.fit_s}
    shares = params.method_shares()
    rows = []
    for d_index, domain in enumerate(scarce):
        own = train[train["domain"] == domain]
        size = _domain_size(own)
        others = content_rows[(content_rows["domain"] != domain) & (~content_rows["domain"].isin(scarce))]
        own_content = content_rows[content_rows["domain"] == domain]
        augment_content = {"other": others, "same": own_content,
                           "both": pd.concat([others, own_content])}[params.augment_content]
        pools = {"style": own, "content": others, "augment_content": augment_content}
        if "fourier" in shares:
            pools["profile"] = radial_amplitude_profile(images.stack(own["path"], size))
        if "augment" in shares:
            ref = others if len(others) else own
            pools["policy"] = fit_policy(domain, images.stack(own["path"], size), own["label"].to_numpy(),
                                         images.stack(ref["path"], size), ref["label"].to_numpy(),
                                         jitter=params.policy_jitter, max_rotation=params.max_rotation)
            report["policies"][domain] = pools["policy"].summary()
        reference = judges.reference(domain, own)
        real_target = images.stack(own["path"], Judges.JUDGE_SIZE)
        needs = {label: n for (d, label), n in sorted(plan.items()) if d == domain}
        split = {label: split_by_shares(n, shares) for label, n in needs.items()}
        report["samples"][domain] = {"real": _samples_per_class(own, images, size)}
        for m_index, method in enumerate(shares):
            rng = np.random.default_rng([params.seed, d_index, m_index])
            jobs = [(label, split[label][method]) for label in needs]
            items = _generate_batch(method, domain, jobs, pools, params, rng, images, size)
            key = f"{domain}/{method}"
            if not items:
                continue
            batch = np.stack([it["image"] for it in items])
            labels = np.array([it["label"] for it in items])
            judged = batch if batch.shape[1:3] == (32, 32) else _resize(batch, Judges.JUDGE_SIZE)
            # one seen domain only: no domain judge, realism is not judged (reported as None)
            realism = judges.domain.share(judged, domain) if judges.domain is not None else None
            agreement = judges.label.agreement(judged, labels)
            predicted = judges.label.predict(judged)
            content = images.stack([it["content"] for it in items], Judges.JUDGE_SIZE)
            verdict = judge_batch(1.0 if realism is None else realism, agreement, reference["real_agreement"],
                                  params.min_realism, params.min_agreement_ratio)
            score = {
                "domain": domain, "method": method, "images": len(items), "accepted": verdict.accepted,
                "reasons": verdict.reasons, "realism": _r(realism), "agreement": _r(agreement),
                **{k: (_r(v) if isinstance(v, float) else v) for k, v in reference.items()},
                "agreement_bar": round(params.min_agreement_ratio * reference["real_agreement"], 4),
                "min_realism": params.min_realism,
                "fd_to_real": _r(judges.style.distance(judged, real_target), 3),
                "fd_content_to_real": _r(judges.style.distance(content, real_target), 3),
                "agreement_per_class": {str(c): round(float(np.mean(predicted[labels == c] == c)), 3)
                                        for c in sorted(set(labels))},
            }
            info["batches"][key] = {k: score[k] for k in ("images", "accepted", "realism", "agreement",
                                                           "real_agreement", "real_realism", "fd_to_real",
                                                           "fd_content_to_real", "reasons")}
            report["batches"].append(score)
            report["samples"][domain][method] = {
                "accepted": verdict.accepted,
                "images": {c: [it["image"] for it in items if it["label"] == c][:3] for c in needs}}
            log.info("batch %s: %d images, realism %s, agreement %.2f (real %.2f) -> %s", key, len(items),
                     score["realism"], agreement, reference["real_agreement"], "accepted" if verdict.accepted else
                     "REJECTED: " + "; ".join(verdict.reasons))
            if not verdict.accepted:
                info["rejected_batches"].append(key)
                continue
            info["accepted_batches"].append(key)
            index: dict[str, int] = {}
            for it in items:
                label = it["label"]
                i = index[label] = index.get(label, -1) + 1
                rel = f"{domain}/{label}/{method}_{i:05d}.png"
                (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
                image = Image.fromarray(it["image"], mode="RGB")
                image.save(out_dir / rel, format="PNG")
                rows.append({"path": rel, "domain": domain, "label": label, "split": "train",
                             "sha256": sha256_file(out_dir / rel), "width": image.width, "height": image.height,
                             "mode": "RGB", "source": "synthetic", "generator": it["generator"]})
                info["generated"][f"{domain}/{label}"] = info["generated"].get(f"{domain}/{label}", 0) + 1
    info["planned_images"] = int(sum(plan.values()))
    info["shortfall"] = info["planned_images"] - len(rows)
    accepted = [b for b in report["batches"] if b["accepted"]]
    info["accepted_realism"] = _weighted(accepted, "realism")
    info["accepted_agreement"] = _weighted(accepted, "agreement")
    return pd.DataFrame(rows, columns=COLUMNS), info, report


def _r(value, digits: int = 4):
    """Rounded for the reports; None for a missing or undefined (NaN) value."""
    return None if value is None or not np.isfinite(value) else round(float(value), digits)


def _weighted(batches: list[dict], key: str) -> float | None:
    batches = [b for b in batches if b[key] is not None]
    n = sum(b["images"] for b in batches)
    return round(sum(b[key] * b["images"] for b in batches) / n, 4) if n else None


def _resize(batch: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.stack([np.asarray(Image.fromarray(im).resize(size, Image.Resampling.BILINEAR)) for im in batch])


def _samples_per_class(rows: pd.DataFrame, images: ImageCache, size) -> dict:
    return {c: [images.get(p, size) for p in g["path"].head(3)] for c, g in rows.groupby("label")}


def contact_sheet(domain: str, samples: dict, classes: list[str], cell: int = 64) -> Image.Image:
    """One row per source (real, then each method), one column per class: real vs synthetic at a glance."""
    sources = ["real"] + [m for m in samples if m != "real"]
    label_w, head_h = 150, 18
    sheet = Image.new("RGB", (label_w + cell * len(classes), head_h + cell * len(sources)), "white")
    draw = ImageDraw.Draw(sheet)
    for j, c in enumerate(classes):
        draw.text((label_w + j * cell + cell // 2 - 4, 3), str(c), fill="black")
    for i, src in enumerate(sources):
        entry = samples[src]
        imgs = entry if src == "real" else entry["images"]
        tag = src if src == "real" else f"{src}\n{'accepted' if entry['accepted'] else 'REJECTED'}"
        draw.multiline_text((6, head_h + i * cell + cell // 2 - 12), f"{domain}\n{tag}",
                            fill="black" if src == "real" or entry["accepted"] else "red")
        for j, c in enumerate(classes):
            if imgs.get(c):
                tile = Image.fromarray(imgs[c][0]).resize((cell - 4, cell - 4), Image.Resampling.NEAREST)
                sheet.paste(tile, (label_w + j * cell + 2, head_h + i * cell + 2))
    return sheet
