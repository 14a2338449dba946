"""The compress stage's work: build the variants, score each beside the fp32 PyTorch model, accept or
reject each with its reason, and write the shipped variant (ONNX + recipe + model card), the table and
the plot. ``tasks/compress.py`` only loads params and data and calls :func:`compress`."""
from __future__ import annotations

import json
import logging
import os
import platform
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from mdcore.deploy.export import session
from mdcore.deploy.measure import count_macs, count_params, eager_runner, ort_runner
from mdcore.deploy.report import model_card, plot_variants, variants_table
from mdcore.deploy.scoring import (EvalSets, accuracy_per_domain, corruption_accuracy, decide, eager_predict,
                                   measure_latencies, ort_predict)
from mdcore.deploy.variants import BuildConfig, build_variants
from mdcore.data.images import ImageSet
from mdcore.models.model import MultiDomainModel

log = logging.getLogger("mdpipe.compress")
SHIPPED = "model.onnx"
RECIPE = "recipe.json"
CARD = "model_card.md"


@dataclass
class ScoreConfig:
    threads: int = 2
    max_drop: float = 0.01
    latency_repeats: int = 30
    ship_by: str = "size"  # among accepted variants: "size" (smallest file) or "latency" (fastest at batch 1)
    ship_from: tuple[str, ...] | None = None  # variants allowed to ship; None = every accepted one
    seed: int = 0


def pick_shipped(rows: list[dict], ship_by: str, ship_from: tuple[str, ...] | None = None) -> dict:
    """The variant that ships: among the accepted rows whose name is in ``ship_from`` (every accepted row
    when None), the smallest file (``ship_by`` "size") or the fastest at batch 1 ("latency"). None
    eligible is an error that gives every variant's decision."""
    accepted = [r for r in rows if r["accepted"] and (ship_from is None or r["name"] in ship_from)]
    if not accepted:
        allowed = "" if ship_from is None else f" among compress.ship_from {list(ship_from)}"
        raise RuntimeError(f"compress: no variant accepted{allowed}; "
                           + "; ".join(f"{r['name']}: {r['reason']}" for r in rows))
    key = (lambda r: (r["file_bytes"], r["latency"]["b1"]["median_ms"])) if ship_by == "size" else \
        (lambda r: (r["latency"]["b1"]["median_ms"], r["file_bytes"]))
    return min(accepted, key=key)


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import onnxruntime
    import torch

    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__}


def _score(name, runtime, predict, sets: EvalSets, sc: ScoreConfig, kinds: dict, extra: dict) -> dict:
    row = {"name": name, "runtime": runtime, "threads": sc.threads, "kinds": kinds, **extra}
    row["select_acc"] = accuracy_per_domain(predict, sets.select, sets.select_names)
    if sets.select_splits is not None:  # the validation split alone: what may choose a recipe (the gate may not)
        mask = [s == "val" for s in sets.select_splits]
        row["val_acc"] = accuracy_per_domain(predict, sets.select.subset(mask),
                                             [n for n, m in zip(sets.select_names, mask) if m])
    row["report_acc"] = accuracy_per_domain(predict, sets.report, sets.report_names)
    row["report_acc_unknown_domain"] = accuracy_per_domain(predict, sets.report, sets.report_names, use_domain=False)
    row["corruption_acc"] = corruption_accuracy(predict, sets.corruption, sc.seed)
    return row


def compress(teacher: MultiDomainModel, train: ImageSet, sets: EvalSets, build: BuildConfig, sc: ScoreConfig,
             out_dir: Path, report_dir: Path, source: dict, teacher_bytes: int) -> dict:
    """Build, score, decide; write into ``out_dir`` (shipped model + variants) and ``report_dir`` (table,
    plot). Both folders are expected to be fresh temporary folders (the caller renames them into place).
    Returns the rows and the shipped variant's name. Raises if no variant is accepted."""
    kinds = {d: ("seen" if d in teacher.config.domains else "held-out") for d in sets.report_names}
    variants = build_variants(teacher, train, out_dir / "variants", build, source)
    reference = _score("fp32-eager", "torch eager", eager_predict(teacher), sets, sc, kinds,
                       {"params": count_params(teacher), "macs": count_macs(teacher, teacher.config.image_size),
                        "file_bytes": teacher_bytes})
    reference.update(accepted=False, reason="reference (PyTorch training model, not a deployable file)",
                     worst_select_drop=0.0)
    rows, runs = [reference], {reference["name"]: eager_runner(teacher)}
    for v in variants:
        sess = session(v.onnx, sc.threads)
        rows.append(_score(v.name, "onnxruntime", ort_predict(sess), sets, sc, kinds,
                           {"params": v.params, "macs": v.macs, "file_bytes": v.onnx.stat().st_size,
                            "onnx": str(v.onnx.relative_to(out_dir)), "recipe": v.recipe}))
        runs[v.name] = ort_runner(sess)
    latencies = measure_latencies(runs, sets.select, sc.threads, repeats=sc.latency_repeats)
    for row in rows:
        row["latency"] = latencies[row["name"]]
    for row in rows[1:]:
        row["accepted"], row["reason"] = decide(reference, row, sc.max_drop)
        log.info("%-14s %s", row["name"], ("accepted: " if row["accepted"] else "rejected: ") + row["reason"])
    shipped = pick_shipped(rows[1:], sc.ship_by, sc.ship_from)
    shipped["shipped"] = True
    info = machine()
    for v in variants:
        (out_dir / "variants" / f"{v.name}.json").write_text(json.dumps(v.recipe, indent=2, sort_keys=True) + "\n")
    shutil.copyfile(out_dir / shipped["onnx"], out_dir / SHIPPED)
    provenance = {"variant": shipped["name"], "recipe": shipped["recipe"], "build": asdict(build),
                  "score": asdict(sc), "machine": info}
    (out_dir / RECIPE).write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")
    (out_dir / CARD).write_text(model_card(shipped, teacher.config, provenance, info))
    table = variants_table(rows)
    table.to_csv(report_dir / "variants.csv", index=False, float_format="%.4f")
    (report_dir / "variants.md").write_text(f"Machine: {info['cpu']}, {info['cores']} cores; threads {sc.threads}.\n\n"
                                            + table.to_markdown(index=False, floatfmt=".3f") + "\n")
    plot_variants(table, report_dir / "variants.png")
    (report_dir / "variants.json").write_text(json.dumps(rows, indent=2, sort_keys=True, default=str) + "\n")
    return {"rows": rows, "shipped": shipped["name"], "machine": info}
