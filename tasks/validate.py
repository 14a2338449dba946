"""validate: a Great Expectations suite on the manifest. A failed *critical* expectation stops the
pipeline (naming the expectation and the files); a failed *warning* expectation quarantines rows."""
from __future__ import annotations

import logging
import os

import pandas as pd
from prefect import task

from mdcore.io import atomic_dir, atomic_write_json, atomic_write_text
from mdcore.manifest import SPLITS, dataset_version, manifest_csv, read_manifest
from tasks.params import ValidateParams
from tasks.paths import Paths
from tasks.stage import StageResult, execute

log = logging.getLogger("mdpipe.validate")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")


class DataValidationError(RuntimeError):
    """A critical expectation failed: training must not start on this data."""


def expectations(params: ValidateParams, frame: pd.DataFrame) -> list[tuple[str, object]]:
    """(frame name, expectation) pairs; ``meta`` carries each one's name and severity."""
    import great_expectations as gx

    E = gx.expectations

    def meta(name: str) -> dict:
        return {"name": name, "severity": params.severity.get(name, "critical")}

    rows = [
        (f"not_null_{c}", E.ExpectColumnValuesToNotBeNull(column=c, meta=meta(f"not_null_{c}")))
        for c in ("path", "domain", "label", "split", "sha256")
    ]
    rows += [
        ("known_splits", E.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS), meta=meta("known_splits"))),
        ("decodable", E.ExpectColumnValuesToNotBeInSet(column="mode", value_set=["unreadable"], meta=meta("decodable"))),
        ("unique_content", E.ExpectColumnValuesToBeUnique(column="sha256", meta=meta("unique_content"))),
        ("colour_mode", E.ExpectColumnValuesToBeInSet(
            column="mode", value_set=params.allowed_modes + ["unreadable"], meta=meta("colour_mode"))),
        ("min_width", E.ExpectColumnValuesToBeBetween(
            column="width", min_value=params.min_side, meta=meta("min_width"))),
        ("min_height", E.ExpectColumnValuesToBeBetween(
            column="height", min_value=params.min_side, meta=meta("min_height"))),
    ]
    if params.known_domains:
        rows.append(("known_domains", E.ExpectColumnValuesToBeInSet(
            column="domain", value_set=params.known_domains, meta=meta("known_domains"))))
    if params.known_classes:
        rows.append(("known_classes", E.ExpectColumnValuesToBeInSet(
            column="label", value_set=params.known_classes, meta=meta("known_classes"))))
    return rows


def run_suite(frame: pd.DataFrame, params: ValidateParams, docs_dir) -> list[dict]:
    """Run the suite on the manifest and on its (domain, class) counts; one dict per expectation."""
    import great_expectations as gx

    # every (domain, class) pair, so a class that is empty in one domain shows up with 0 images
    counts = pd.crosstab(frame["domain"], frame["label"]).stack().rename("images").reset_index()
    counts["path"] = counts["domain"] + "/" + counts["label"] + "/"
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = gx.data_context.types.base.ProgressBarsConfig(globally=False)
    source = context.data_sources.add_or_update_pandas("mdpipe")
    outcomes = []
    suites = {
        "manifest": (frame.reset_index(names="row"), expectations(params, frame)),
        "class_counts": (counts.reset_index(names="row"), [(
            "min_images_per_class",
            gx.expectations.ExpectColumnValuesToBeBetween(
                column="images", min_value=params.min_images_per_class,
                meta={"name": "min_images_per_class",
                      "severity": params.severity.get("min_images_per_class", "critical")}),
        )]),
    }
    for table, (data, exps) in suites.items():
        batch = source.add_dataframe_asset(table).add_batch_definition_whole_dataframe("all")
        suite = context.suites.add_or_update(gx.ExpectationSuite(name=f"mdpipe_{table}"))
        for _, exp in exps:
            suite.add_expectation(exp)
        definition = context.validation_definitions.add_or_update(
            gx.ValidationDefinition(name=f"validate_{table}", data=batch, suite=suite))
        result = definition.run(
            batch_parameters={"dataframe": data},
            result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["row", "path"]},
        )
        for r in result.results:
            bad = r.result.get("unexpected_index_list") or []
            outcomes.append({
                "table": table,
                "expectation": r.expectation_config.meta["name"],
                "type": r.expectation_config.type,
                "severity": r.expectation_config.meta["severity"],
                "success": bool(r.success),
                "rows": [int(b["row"]) for b in bad] if table == "manifest" else [],
                "files": sorted({str(b["path"]) for b in bad})[:50],
            })
    write_docs(outcomes, docs_dir)
    return outcomes


def write_docs(outcomes: list[dict], docs_dir) -> None:
    """A readable HTML summary of the suite beside its JSON (written atomically as a folder)."""
    with atomic_dir(docs_dir) as tmp:
        atomic_write_json(tmp / "results.json", outcomes)
        rows = "".join(
            f"<tr class={'ok' if o['success'] else o['severity']}><td>{o['table']}</td><td>{o['expectation']}</td>"
            f"<td>{o['type']}</td><td>{o['severity']}</td><td>{'pass' if o['success'] else 'FAIL'}</td>"
            f"<td>{'<br>'.join(o['files'][:10])}</td></tr>"
            for o in outcomes
        )
        atomic_write_text(tmp / "index.html", (
            "<html><head><title>mdpipe validation</title><style>td{padding:2px 8px}"
            ".critical{background:#fcc}.warning{background:#ffd}.ok{background:#dfd}</style></head><body>"
            "<h1>Manifest validation (Great Expectations)</h1><table><tr><th>table</th><th>expectation</th>"
            f"<th>type</th><th>severity</th><th>result</th><th>offending files</th></tr>{rows}</table></body></html>"))


def run(params: ValidateParams, paths: Paths) -> StageResult:
    frame = read_manifest(paths.manifest)
    outcomes = run_suite(frame, params, paths.validation_report)
    failed = [o for o in outcomes if not o["success"]]
    critical = [o for o in failed if o["severity"] == "critical"]
    if critical:
        lines = [f"{paths.manifest}: {len(critical)} critical expectation(s) failed; no training will start:"]
        lines += [f"  - {o['expectation']} ({o['type']}): {', '.join(o['files'][:10]) or 'see report'}" for o in critical]
        raise DataValidationError("\n".join(lines))
    quarantined = sorted({r for o in failed for r in o["rows"]})
    for o in failed:
        log.warning("warning expectation %s failed: quarantining %d rows", o["expectation"], len(o["rows"]))
    kept = frame.drop(index=quarantined)
    atomic_write_text(paths.quarantine, manifest_csv(frame.loc[quarantined]))
    atomic_write_text(paths.validated, manifest_csv(kept))
    metrics = {
        "expectations": len(outcomes),
        "failed_warning": [o["expectation"] for o in failed],
        "quarantined_rows": len(quarantined),
        "rows": len(kept),
        "dataset_version": dataset_version(kept),
    }
    return StageResult(
        {"validated": str(paths.validated), "quarantine": str(paths.quarantine), "report": str(paths.validation_report)},
        metrics,
    )


@task(name="validate")
def validate_task(root: str = ".") -> dict:
    """Prefect task: the validate stage."""
    return execute("validate", root)
