"""synthesize: labelled synthetic training images for scarce domains (Fourier style transfer of other
domains' content into the scarce domain's style). Synthetic rows only ever join the training split."""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from PIL import Image
from prefect import task

from mdcore.io import atomic_dir, atomic_write_text, sha256_file
from mdcore.manifest import COLUMNS, class_names, manifest_csv, read_manifest, resolve_in
from mdcore.synth import find_scarce_domains, fourier_style_transfer, plan_targets
from tasks.params import SynthesizeParams
from tasks.paths import Paths
from tasks.stage import StageResult, execute

log = logging.getLogger("mdpipe.synthesize")


def _rgb(path, size=None) -> np.ndarray:
    with Image.open(path) as img:
        img = img.convert("RGB")
        if size is not None and img.size != size:
            img = img.resize(size, Image.Resampling.BILINEAR)
        return np.asarray(img, dtype=np.uint8)


def generate(frame: pd.DataFrame, params: SynthesizeParams, paths: Paths, out_dir) -> tuple[pd.DataFrame, dict]:
    train = frame[(frame["split"] == "train") & (frame["source"] == "real")]
    sizes = train.groupby("domain").size().to_dict()
    scarce = find_scarce_domains(sizes, params.scarce_ratio)
    counts = train.groupby(["domain", "label"]).size().to_dict()
    plan = plan_targets(counts, scarce, params.target_per_class, class_names(frame))
    rng = np.random.default_rng(params.seed)
    rows, made = [], {}
    for (domain, label), need in sorted(plan.items()):
        content_pool = train[(train["domain"] != domain) & (~train["domain"].isin(scarce)) & (train["label"] == label)]
        style_pool = train[train["domain"] == domain]
        if content_pool.empty or style_pool.empty:
            log.warning("no content or style images for %s/%s: nothing generated", domain, label)
            continue
        for i in range(need):
            content = content_pool.iloc[int(rng.integers(len(content_pool)))]
            style = style_pool.iloc[int(rng.integers(len(style_pool)))]
            style_img = _rgb(resolve_in(paths.raw, style["path"]))
            content_img = _rgb(resolve_in(paths.raw, content["path"]), size=(style_img.shape[1], style_img.shape[0]))
            image = Image.fromarray(fourier_style_transfer(content_img, style_img, params.beta), mode="RGB")
            rel = f"{domain}/{label}/syn_{i:05d}.png"
            (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            image.save(out_dir / rel, format="PNG")
            rows.append({
                "path": rel, "domain": domain, "label": label, "split": "train",
                "sha256": sha256_file(out_dir / rel),
                "width": image.width, "height": image.height, "mode": "RGB", "source": "synthetic",
                "generator": f"{params.method}(beta={params.beta},content={content['path']},style={style['path']})",
            })
        made[f"{domain}/{label}"] = need
    return pd.DataFrame(rows, columns=COLUMNS), {"scarce_domains": scarce, "generated": made}


def run(params: SynthesizeParams, paths: Paths) -> StageResult:
    frame = read_manifest(paths.validated)
    with atomic_dir(paths.synthetic) as tmp:
        if params.enabled:
            synthetic, info = generate(frame, params, paths, tmp)
        else:
            synthetic, info = pd.DataFrame(columns=COLUMNS), {"scarce_domains": [], "generated": {}}
        (tmp / "README.txt").write_text("Synthetic training images written by the synthesize stage.\n")
    combined = pd.concat([frame, synthetic], ignore_index=True) if len(synthetic) else frame
    atomic_write_text(paths.train_manifest, manifest_csv(combined))
    log.info("synthetic images: %d for scarce domains %s", len(synthetic), info["scarce_domains"])
    metrics = {"enabled": params.enabled, "synthetic_images": len(synthetic), **info}
    return StageResult({"synthetic": str(paths.synthetic), "train_manifest": str(paths.train_manifest)}, metrics)


@task(name="synthesize")
def synthesize_task(root: str = ".") -> dict:
    """Prefect task: the synthesize stage."""
    return execute("synthesize", root)
