"""One table and one plot per compress run (every variant side by side), and the shipped variant's
model card."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from mdcore.deploy.corrupt import CORRUPTIONS, SEVERITIES


def variants_table(rows: list[dict]) -> pd.DataFrame:
    """One row per variant: cost, latency, accuracy per domain (report split), corruptions, decision."""
    records = []
    for r in rows:
        rec = {"variant": r["name"], "runtime": r["runtime"], "params": r["params"], "file_mb": r["file_bytes"] / 1e6,
               "macs_m": r["macs"] / 1e6, "threads": r["threads"]}
        for b in ("b1", "b64"):
            rec[f"{b}_median_ms"] = r["latency"][b]["median_ms"]
            rec[f"{b}_p95_ms"] = r["latency"][b]["p95_ms"]
            rec[f"{b}_img_s"] = r["latency"][b]["images_per_s"]
        for d, acc in r["report_acc"].items():
            rec[f"acc/{d} ({r['kinds'][d]})"] = acc
        rec["corrupt_mean"] = sum(r["corruption_acc"].values()) / max(len(r["corruption_acc"]), 1)
        for name in CORRUPTIONS:
            rec[f"corrupt/{name}"] = sum(r["corruption_acc"][f"{name}/{s}"] for s in SEVERITIES) / len(SEVERITIES)
        rec["worst_select_drop_pts"] = 100 * r.get("worst_select_drop", 0.0)
        rec["accepted"] = r["accepted"]
        rec["shipped"] = r.get("shipped", False)
        rec["reason"] = r["reason"]
        records.append(rec)
    return pd.DataFrame.from_records(records)


def plot_variants(table: pd.DataFrame, out: Path) -> None:
    """Left: batch-1 and batch-64 latency per variant; right: accuracy (worst seen, held-out, corrupted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    x = range(len(table))
    labels = [("*" if s else "") + v for v, s in zip(table["variant"], table["shipped"])]
    ax1.bar([i - 0.2 for i in x], table["b1_median_ms"], width=0.4, label="batch 1 (median ms)")
    ax1.bar([i + 0.2 for i in x], table["b64_median_ms"] / 64, width=0.4, label="batch 64 (median ms / image)")
    ax1.set_xticks(list(x), labels, rotation=30, ha="right")
    ax1.set_ylabel("ms")
    ax1.set_title(f"Latency ({int(table['threads'].iloc[0])} threads)")
    ax1.legend()
    seen = [c for c in table.columns if c.startswith("acc/") and "(seen)" in c]
    held = [c for c in table.columns if c.startswith("acc/") and "(held-out)" in c]
    series = {"worst seen domain (test)": table[seen].min(axis=1) if seen else None,
              "mean held-out": table[held].mean(axis=1) if held else None,
              "mean under corruptions": table["corrupt_mean"]}
    series = {k: v for k, v in series.items() if v is not None}
    w = 0.8 / len(series)
    for j, (k, v) in enumerate(series.items()):
        ax2.bar([i - 0.4 + w * (j + 0.5) for i in x], v, width=w, label=k)
    ax2.set_xticks(list(x), labels, rotation=30, ha="right")
    ax2.set_ylim(0, 1)
    ax2.set_ylabel("accuracy")
    ax2.set_title("Accuracy (* = shipped)")
    ax2.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _graph_norm(config) -> str:
    """What the exported graph does to the uint8 pixels (the model config's input_norm)."""
    if config.input_norm == "image":
        return "scales to [-1, 1] and standardizes each image"
    if config.input_norm == "pretrained":
        return (f"scales to [0, 1] and normalizes with timm's pretrained_cfg mean {list(config.input_mean)} and "
                f"std {list(config.input_std)}")
    return "scales to [-1, 1]"


def _starting_weights_lines(record: dict | None) -> list[str]:
    """The card's answer to "what did this start from, under which licence"."""
    if not record:
        return []
    kind = record.get("kind")
    if kind == "package":
        what = (f"{record['dataset']} weights of `{record['architecture']}` from the Python package "
                f"`{record['distribution']}` {record['version']} (`{record['file_name']}`, sha256 "
                f"`{record['sha256'][:16]}...`); origin: {record['origin']}")
    elif kind == "timm-hub":
        what = f"timm pretrained tag `{record['tag']}` (Hugging Face `{record.get('hf_hub_id')}`)"
    elif kind == "file":
        what = f"the file `{record['path']}` (sha256 `{record['sha256'][:16]}...`)"
    else:
        what = "random initialization" if kind == "random" else f"{kind}"
    lines = ["## Starting weights", f"- {what}"]
    if record.get("license"):
        lines.append(f"- Licence of the starting weights: {record['license']}")
    if record.get("self_supervised_epochs"):
        lines.append(f"- Then {record['self_supervised_epochs']} epochs of self-supervised pretraining on the "
                     "training images (the pretrain stage)")
    return lines + [""]


def model_card(row: dict, config, provenance: dict, machine: dict) -> str:
    """Markdown model card of the shipped variant."""
    lines = [f"# Model card: `{row['name']}` (mdpipe compress)", "",
             "## Inputs and outputs",
             f"- `images`: uint8 tensor (N, 3, {config.image_size}, {config.image_size}), RGB pixels 0..255, NCHW. "
             f"Preprocessing before the model: decode, convert to RGB (EXIF rotation applied, alpha on white), "
             f"resize to {config.image_size}x{config.image_size} ({config.resize}, as in training). The graph itself "
             f"{_graph_norm(config)}.",
             "- `domain`: int64 tensor (N,): the index of the image's domain (below), or -1 when unknown "
             "(the model then routes the image on its features: the unknown-domain fallback).",
             f"- `logits`: float32 (N, {len(config.classes)}); argmax = class index (below).",
             f"- Runtime: ONNX Runtime (CPUExecutionProvider); file `model.onnx`.", "",
             "## Domains and classes",
             "| index | domain |", "|---:|---|", *[f"| {i} | {d} |" for i, d in enumerate(config.domains)],
             "| -1 | unknown (feature routing) |", "",
             "classes (index order): " + ", ".join(f"`{c}`" for c in config.classes), "",
             "## Metrics",
             f"Accuracy per domain (seen: test split with the domain id; held-out: every image, domain -1); "
             f"latency on {machine['cpu']} with {row['threads']} threads.", "",
             "| domain | kind | accuracy |", "|---|---|---:|",
             *[f"| {d} | {row['kinds'][d]} | {a:.3f} |" for d, a in row["report_acc"].items()], "",
             f"- Mean accuracy under corruptions (5 kinds x 3 severities, seen test images): "
             f"{sum(row['corruption_acc'].values()) / max(len(row['corruption_acc']), 1):.3f}",
             f"- Latency batch 1: median {row['latency']['b1']['median_ms']:.2f} ms, p95 {row['latency']['b1']['p95_ms']:.2f} ms; "
             f"batch 64: median {row['latency']['b64']['median_ms']:.1f} ms ({row['latency']['b64']['images_per_s']:.0f} images/s)",
             f"- Parameters {row['params']:,}; MACs per image {row['macs'] / 1e6:.1f} M; file {row['file_bytes'] / 1e6:.2f} MB",
             f"- Decision: {row['reason']}", "",
             *_starting_weights_lines(provenance.get("recipe", {}).get("source", {}).get("starting_weights")),
             "## Provenance", "```json", json.dumps(provenance, indent=2, sort_keys=True), "```", ""]
    return "\n".join(lines)
