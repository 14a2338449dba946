"""compress: deployable variants of the fine-tuned model (fp32 ONNX, int8 ONNX, channel-pruned with a
distilled recovery, a distilled timm student, and int8 versions of those), each scored through ONNX
Runtime beside the fp32 PyTorch model; the accepted variant ships as ``model.onnx`` with its recipe and
model card. The work is ``mdcore.deploy.run.compress``; this module reads params and data.

``device`` moves only the distillation training (pruned recovery, student); ONNX export, int8
quantization, scoring and latency run on the CPU, where ONNX Runtime (CPUExecutionProvider) deploys them."""
from __future__ import annotations

import json
import logging

import pandas as pd
import torch
from prefect import task

from mdcore.models.accel import resolve_device
from mdcore.deploy.distill import DistillConfig
from mdcore.deploy.run import CARD, SHIPPED, ScoreConfig, compress
from mdcore.deploy.scoring import EvalSets
from mdcore.deploy.variants import BuildConfig
from mdcore.data.io import atomic_dir, atomic_write_json, sha256_file
from mdcore.models.model import STARTING_WEIGHTS, WEIGHTS, load_model
from tasks.data import guard_holdout, image_roots, load_split
from tasks.evaluate import summarize
from tasks.params import StageParams, CompressParams
from tasks.paths import Paths
from tasks.stage import StageResult, execute

log = logging.getLogger("mdpipe.compress")
SELECT_SPLITS = ("val", "gate")  # acceptance decisions: seen domains' selection splits, never test or held-out
REPORT_SPLITS = ("test", "holdout")


def build_config(p: CompressParams) -> BuildConfig:
    distill = dict(batch_size=p.distill_batch_size, lr=p.distill_lr, kd_weight=p.kd_weight,
                   kd_temperature=p.kd_temperature, seed=p.seed)
    return BuildConfig(quantize=p.quantize == "int8", quant_format=p.quant_format, quant_ops=list(p.quant_ops),
                       quant_fp32_convs=p.quant_fp32_convs, quant_reduce_range=p.quant_reduce_range,
                       calibration_images=p.calibration_images,
                       prune_ratio=p.prune_ratio,
                       recovery=DistillConfig(epochs=p.recovery_epochs, **distill),
                       student_backbone=p.student_backbone or None,
                       student=DistillConfig(epochs=p.student_epochs, **distill), seed=p.seed,
                       device=str(resolve_device(p.device, "compress.device")))


def load_sets(paths: Paths, cfg, p: CompressParams):
    """(train, EvalSets): real training images of the seen domains; val + gate (selection), test +
    held-out (report) and a seeded subsample of the seen test images (corruptions)."""
    roots = image_roots(paths.raw, paths.synthetic)
    kw = dict(synthetic=False, domains=cfg.domains, classes=cfg.classes, resize=cfg.resize)
    train, train_rows = load_split(paths.train_manifest, roots, cfg.image_size, ("train",), **kw)
    select, select_rows = load_split(paths.train_manifest, roots, cfg.image_size, SELECT_SPLITS, **kw)
    report, report_rows = load_split(paths.train_manifest, roots, cfg.image_size, REPORT_SPLITS, **kw)
    for name, data in (("train", train), ("val + gate", select), ("test + holdout", report)):
        if not len(data):
            raise ValueError(f"compress: {paths.train_manifest} has no real rows in the {name} split(s)")
    guard_holdout(paths.train_manifest, {"calibration/distillation": train_rows, "acceptance": select_rows})
    seen_test = torch.nonzero(report.domains >= 0)[:, 0]
    g = torch.Generator().manual_seed(p.seed)
    pick = seen_test[torch.randperm(len(seen_test), generator=g)[: p.corruption_images]]
    sets = EvalSets(select, list(select_rows["domain"]),
                    report, list(report_rows["domain"]), report.subset(torch.isin(torch.arange(len(report)), pick)),
                    select_splits=list(select_rows["split"]))
    return train, sets, report_rows


SUMMARY = "summary.json"  # the run's headline: what `dvc metrics show`, `dvc exp show` and `dvc metrics diff` show


def headline(metrics: dict, table: pd.DataFrame) -> dict:
    """A handful of figures of the shipped model, to compare runs by (the stages' own metrics files hold
    the rest): accuracy (seen domains on test, held-out domains on all their images), its worst seen
    domain, file size and latency."""
    seen = table[table["kind"] == "seen"].sort_values("accuracy")
    shipped = metrics["variants"][metrics["shipped"]]
    rnd = lambda v: None if v is None else round(float(v), 4)  # noqa: E731
    return {"shipped": metrics["shipped"], "mean_seen_acc": rnd(metrics["mean_seen_acc"]),
            "mean_heldout_acc": rnd(metrics["mean_heldout_acc"]), "worst_seen_acc": rnd(metrics["worst_seen_acc"]),
            "worst_seen_domain": seen["domain"].iloc[0] if len(seen) else None,
            "model_mb": round(metrics["compressed_bytes"] / 1e6, 3), "latency_b1_ms": rnd(shipped["b1_median_ms"]),
            "images_per_s_b64": round(shipped["b64_images_per_s"], 1)}


def _starting_weights(paths: Paths) -> dict | None:
    record = paths.finetuned / STARTING_WEIGHTS
    return json.loads(record.read_text()) if record.is_file() else None


def run(params: CompressParams, paths: Paths) -> StageResult:
    teacher = load_model(paths.finetuned)
    train, sets, report_rows = load_sets(paths, teacher.config, params)
    teacher_file = paths.finetuned / WEIGHTS
    source = {"model": str(paths.finetuned.relative_to(paths.root)), "weights_sha256": sha256_file(teacher_file),
              "train_manifest_sha256": sha256_file(paths.train_manifest),
              "params": params.model_dump(mode="json"), "starting_weights": _starting_weights(paths)}
    sc = ScoreConfig(threads=params.threads, max_drop=params.max_drop, latency_repeats=params.latency_repeats,
                     ship_by=params.ship_by, ship_from=tuple(params.ship_from), seed=params.seed)
    with atomic_dir(paths.compressed) as out, atomic_dir(paths.compress_report) as rep:
        result = compress(teacher, train, sets, build_config(params), sc, out, rep, source,
                          teacher_file.stat().st_size)
        calibrated = calibrate_shipped(out, result["shipped"], teacher, source["weights_sha256"], paths)
    rows = {r["name"]: r for r in result["rows"]}
    shipped = rows[result["shipped"]]
    counts = report_rows.groupby("domain").size()
    table = pd.DataFrame({"domain": list(shipped["report_acc"]),
                          "kind": [shipped["kinds"][d] for d in shipped["report_acc"]],
                          "images": [int(counts[d]) for d in shipped["report_acc"]],
                          "accuracy": list(shipped["report_acc"].values()),
                          "accuracy_unknown_domain": [shipped["report_acc_unknown_domain"][d] for d in shipped["report_acc"]]})
    metrics = {
        "shipped": result["shipped"],
        "calibrated": calibrated,
        "original_bytes": teacher_file.stat().st_size,
        "compressed_bytes": (paths.compressed / SHIPPED).stat().st_size,
        "threads": params.threads,
        "machine": result["machine"],
        "variants": {n: {"accepted": r["accepted"], "reason": r["reason"], "file_bytes": r["file_bytes"],
                         "macs": r["macs"], "params": r["params"], "b1_median_ms": r["latency"]["b1"]["median_ms"],
                         "b1_p95_ms": r["latency"]["b1"]["p95_ms"], "b64_median_ms": r["latency"]["b64"]["median_ms"],
                         "b64_images_per_s": r["latency"]["b64"]["images_per_s"],
                         "worst_select_drop": r.get("worst_select_drop"), "worst_val_drop": r.get("worst_val_drop"),
                         "worst_val_domain": r.get("worst_val_domain"), "val_acc": r.get("val_acc"),
                         "report_acc": r["report_acc"],
                         "corrupt_mean": sum(r["corruption_acc"].values()) / len(r["corruption_acc"])}
                     for n, r in rows.items()},
        **summarize(table),
    }
    metrics["size_ratio"] = metrics["compressed_bytes"] / metrics["original_bytes"]
    atomic_write_json(paths.metrics / SUMMARY, headline(metrics, table))
    log.info("compress: shipped %s (%.2f MB, fp32 weights %.2f MB)", result["shipped"],
             metrics["compressed_bytes"] / 1e6, metrics["original_bytes"] / 1e6)
    return StageResult({"compressed": str(paths.compressed), "compress_report": str(paths.compress_report)}, metrics)


CALIBRATED_VARIANTS = ("fp32", "int8")  # the fine-tuned weights themselves, which the temperatures were fitted for


def calibrate_shipped(out, shipped: str, teacher, teacher_sha: str, paths: Paths) -> str:
    """Give the shipped ``model.onnx`` the evaluate stage's temperatures (a ``probabilities`` output and the
    ``mdpipe.*`` metadata) when they were fitted for these weights and the shipped variant keeps them (fp32
    or int8 of the fine-tuned model; a pruned or distilled one has other logits). Says what it did."""
    from mdcore.deploy.bundle import describe
    from mdcore.eval.calibration import CALIBRATION_FILE, fitted_for

    file = paths.evaluation / CALIBRATION_FILE
    why, temps = None, None
    if shipped not in CALIBRATED_VARIANTS:
        why = f"shipped variant {shipped} has other weights than the ones the temperatures were fitted for"
    elif not file.is_file():
        why = f"no {file.relative_to(paths.root)} (run the evaluate stage first)"
    elif (temps := fitted_for(file, teacher_sha)) is None:
        why = f"{file.relative_to(paths.root)} was fitted for other weights"
    precision = "int8" if "int8" in shipped else "fp32"
    describe(out / SHIPPED, teacher, teacher_sha, precision, None if why else temps.by_name())
    if why:
        log.info("compress: model.onnx outputs logits only: %s", why)
        return f"no: {why}"
    card = out / CARD
    if card.is_file():
        with card.open("a") as f:
            f.write("\n## Calibrated probabilities\n\nThe graph's second output, `probabilities`, is softmax(logits / "
                    "T[domain]) with the temperatures fitted on validation by the evaluate stage (per domain; "
                    f"unknown domain {temps.unknown:.3f}): " + ", ".join(f"{d} {t:.3f}" for d, t in temps.per_domain.items())
                    + ". They are also in the file's metadata (`mdpipe.temperatures`).\n")
    return f"yes: probabilities output with the temperatures of {file.relative_to(paths.root)}"


@task(name="compress")
def compress_task(root: str = ".", params: StageParams | None = None) -> dict:
    """Prefect task: the compress stage."""
    return execute("compress", root, params)
