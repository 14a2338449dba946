"""validate: image-level checks of every file, then a Great Expectations suite on the manifest, on its
(domain, class) counts and on per-domain pixel statistics against the last accepted data profile (drift).

A failed *critical* expectation stops the pipeline before training, naming the expectation and the
files; a failed *warning* expectation quarantines its rows and the run goes on. Nothing in the raw tree
is written. The accepted data profile (what drift and, when params leave them empty, the known domains
and classes are measured against) lives in ``registry/data_profiles/NAME/`` outside the DVC graph; it is
replaced, atomically and as a new version, only when validation passes.
"""
from __future__ import annotations

import datetime as dt
import html
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
from prefect import task

from mdcore.data.imagecheck import aspect_ratio, check_images, domain_profile, drift_bound
from mdcore.data.io import atomic_dir, atomic_write_json, atomic_write_text
from mdcore.data.manifest import COLUMNS, SPLITS, dataset_version, manifest_csv, read_manifest
from tasks.params import StageParams, ValidateParams
from tasks.paths import Paths
from tasks.stage import StageResult, execute

log = logging.getLogger("mdpipe.validate")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
DOCS_SITE = "mdpipe_validation"
INDEX_COLUMNS = ["row", "path"]


class DataValidationError(RuntimeError):
    """A critical expectation failed: training must not start on this data."""


# ----------------------------------------------------------------------------------------------------
# the accepted data profile (registry, outside the DVC graph)


class ProfileRegistry:
    """``registry/data_profiles/NAME/``: ``vNNNN.json`` per accepted version and ``current.json``."""

    def __init__(self, paths: Paths, name: str):
        self.folder = paths.registry / "data_profiles" / name
        self.name = name

    def current(self) -> dict | None:
        file = self.folder / "current.json"
        if not file.is_file():
            return None
        try:
            return json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise DataValidationError(
                f"{file}: the accepted data profile is not valid JSON ({e}); restore it from a "
                f"{self.folder}/vNNNN.json or remove the folder to start a new profile") from None

    def accept(self, profile: dict, previous: dict | None) -> int:
        """Record ``profile`` as the new accepted version (unless the data is the same); its version."""
        if previous and previous.get("dataset_version") == profile["dataset_version"]:
            return int(previous["version"])
        profile["version"] = int(previous["version"]) + 1 if previous else 1
        atomic_write_json(self.folder / f"v{profile['version']:04d}.json", profile)
        atomic_write_json(self.folder / "current.json", profile)
        return profile["version"]


def build_profile(name: str, kept: pd.DataFrame, checks: pd.DataFrame, previous: dict | None) -> dict:
    """The profile of the accepted rows; domains that are not in this data keep their earlier entries."""
    domains = dict((previous or {}).get("domains", {}))
    stats = domain_profile(kept["domain"], checks.loc[kept.index, "pixel_mean"], checks.loc[kept.index, "pixel_std"])
    per_class = kept.groupby(["domain", "label"]).size()
    for domain, entry in stats.items():
        entry["classes"] = {str(k): int(v) for k, v in per_class.loc[domain].items()}
        domains[domain] = entry
    classes = sorted(set((previous or {}).get("classes", [])) | set(kept["label"].astype(str)))
    sub = checks.loc[kept.index]
    return {
        "name": name,
        "accepted_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "dataset_version": dataset_version(kept),
        "rows": int(len(kept)),
        "domains": domains,
        "classes": classes,
        "modes": sorted(sub["img_mode"].dropna().astype(str).unique()),
        "sizes": {"min_width": int(sub["img_width"].min()), "max_width": int(sub["img_width"].max()),
                  "min_height": int(sub["img_height"].min()), "max_height": int(sub["img_height"].max())},
    }


# ----------------------------------------------------------------------------------------------------
# the tables the suite checks


def checked_table(frame: pd.DataFrame, checks: pd.DataFrame) -> pd.DataFrame:
    """The manifest with what the image checks found in each file; a check that does not apply to a
    file (a missing or empty file has no decoder error, an undecodable one no size) is null, which
    Great Expectations skips, so each fault fails its own expectation only."""
    t = frame.reset_index(names="row")
    for c in ("path", "domain", "label", "split", "sha256"):
        t[c] = t[c].astype(object).where(t[c].astype(str) != "", None)  # an empty CSV cell is a null
    checks = checks.reset_index(drop=True)
    present = checks["file_bytes"] > 0
    decoded = checks["decoded"]
    t["file_bytes"] = checks["file_bytes"]
    t["file_sha256"] = checks["file_sha256"].where(checks["file_bytes"] >= 0, None)
    t["ext_format"] = checks["ext_format"]
    t["content_format"] = checks["content_format"].where(present, None)
    t["decode_error"] = checks["decode_error"].where(present, None)
    for c in ("img_width", "img_height", "channels"):
        t[c] = checks[c].astype(float).where(decoded, np.nan)
    t["img_mode"] = checks["img_mode"].where(decoded, None)
    t["long_side"] = np.maximum(t["img_width"], t["img_height"])
    t["aspect"] = aspect_ratio(t["img_width"], t["img_height"])
    # how many splits each content hash appears in: more than one is leakage between splits
    t["splits_per_content"] = t.groupby("sha256", dropna=True)["split"].transform("nunique")
    return t


def class_counts(kept: pd.DataFrame, frame: pd.DataFrame, known_domains, known_classes) -> pd.DataFrame:
    """Images per (domain, class) among the rows kept so far, with every pair listed (an empty class
    counts 0); classes are the known ones when known, else every class in the manifest."""
    domains = sorted(set(frame["domain"]) & set(known_domains)) if known_domains else sorted(set(frame["domain"]))
    classes = sorted(known_classes) if known_classes else sorted(set(frame["label"]))
    n = kept.groupby(["domain", "label"]).size()
    rows = [(d, c, int(n.get((d, c), 0))) for d in domains for c in classes]
    counts = pd.DataFrame(rows, columns=["domain", "label", "images"])
    counts["path"] = counts["domain"] + "/" + counts["label"] + "/"
    return counts.reset_index(names="row")


def domain_stats(kept: pd.DataFrame, checks: pd.DataFrame, accepted: dict | None, params: ValidateParams) -> pd.DataFrame:
    """Per domain of the kept rows that the accepted profile knows: the shift of the average per-image
    pixel mean and std, and the shift allowed (``*_drift`` = shift / allowed, within [-1, 1] is fine)."""
    cols = ["row", "domain", "path", "images", "mean_avg", "mean_accepted", "mean_allowed", "mean_drift",
            "std_avg", "std_accepted", "std_allowed", "std_drift"]
    if not accepted or not params.drift_check:
        return pd.DataFrame(columns=cols)
    now = domain_profile(kept["domain"], checks.loc[kept.index, "pixel_mean"], checks.loc[kept.index, "pixel_std"])
    rows = []
    for domain, cur in now.items():
        ref = accepted.get("domains", {}).get(domain)
        if not ref:
            continue
        row = {"domain": domain, "path": f"{domain}/", "images": cur["images"]}
        for stat in ("mean", "std"):
            shift, allowed = drift_bound(cur, ref, stat, params.drift_tolerance, params.drift_min_shift)
            row.update({f"{stat}_avg": round(cur[stat]["avg"], 5), f"{stat}_accepted": round(ref[stat]["avg"], 5),
                        f"{stat}_allowed": round(allowed, 5), f"{stat}_drift": round(shift / allowed, 3)})
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return pd.DataFrame(columns=cols)
    return table.reset_index(names="row")[cols]


# ----------------------------------------------------------------------------------------------------
# the expectations


def severity_of(params: ValidateParams, name: str) -> str:
    return params.severity.get(name, "critical")


def manifest_expectations(params: ValidateParams, known_domains, known_classes) -> list:
    import great_expectations as gx

    E = gx.expectations

    def meta(name: str, why: str) -> dict:
        return {"name": name, "severity": severity_of(params, name), "notes": why}

    exps = [E.ExpectColumnValuesToNotBeNull(column=c, meta=meta(f"not_null_{c}", f"every row has a {c}"))
            for c in ("path", "domain", "label", "split", "sha256")]
    exps += [
        E.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS), meta=meta("known_splits", "split is one of train/val/test/gate/holdout")),
        E.ExpectColumnValuesToBeUnique(column="path", meta=meta("unique_path", "each file is listed once")),
        E.ExpectColumnValuesToBeBetween(column="file_bytes", min_value=1, meta=meta(
            "non_empty_file", "the file exists and is not empty (-1 = missing, 0 = zero bytes)")),
        E.ExpectColumnValuesToBeInSet(column="decode_error", value_set=[""], meta=meta(
            "decodable", "the whole image decodes (not truncated, not corrupt)")),
        E.ExpectColumnPairValuesToBeEqual(
            column_A="ext_format", column_B="content_format", ignore_row_if="either_value_is_missing",
            meta=meta("extension_matches_content", "the bytes hold the format the extension names")),
        E.ExpectColumnPairValuesToBeEqual(
            column_A="sha256", column_B="file_sha256", ignore_row_if="either_value_is_missing",
            meta=meta("hash_matches_manifest", "the file is the one ingest hashed (rerun ingest if not)")),
        E.ExpectColumnValuesToBeInSet(column="img_mode", value_set=params.allowed_modes, meta=meta(
            "colour_mode", f"colour mode in {params.allowed_modes}")),
        E.ExpectColumnValuesToBeInSet(column="channels", value_set=[float(c) for c in params.allowed_channels], meta=meta(
            "expected_channels", f"number of channels in {params.allowed_channels}")),
        E.ExpectColumnValuesToBeBetween(column="img_width", min_value=params.min_side, meta=meta(
            "min_width", f"width >= {params.min_side}")),
        E.ExpectColumnValuesToBeBetween(column="img_height", min_value=params.min_side, meta=meta(
            "min_height", f"height >= {params.min_side}")),
        E.ExpectColumnValuesToBeBetween(column="aspect", max_value=params.max_aspect_ratio, meta=meta(
            "aspect_ratio", f"long side / short side <= {params.max_aspect_ratio}")),
        E.ExpectColumnValuesToBeUnique(column="sha256", meta=meta(
            "unique_content", "no two files hold the same bytes (a duplicate across splits or domains is leakage)")),
        E.ExpectColumnValuesToBeBetween(column="splits_per_content", max_value=1, meta=meta(
            "disjoint_splits", "no content is in two splits")),
    ]
    if params.max_side:
        exps.append(E.ExpectColumnValuesToBeBetween(column="long_side", max_value=params.max_side, meta=meta(
            "max_side", f"width and height <= {params.max_side}")))
    if known_domains:
        exps.append(E.ExpectColumnValuesToBeInSet(column="domain", value_set=list(known_domains), meta=meta(
            "known_domains", "domain folder is a known domain")))
    if known_classes:
        exps.append(E.ExpectColumnValuesToBeInSet(column="label", value_set=list(known_classes), meta=meta(
            "known_classes", "class folder is a known class")))
    return exps


def count_expectations(params: ValidateParams) -> list:
    import great_expectations as gx

    return [gx.expectations.ExpectColumnValuesToBeBetween(
        column="images", min_value=params.min_images_per_class,
        meta={"name": "min_images_per_class", "severity": severity_of(params, "min_images_per_class"),
              "notes": f"at least {params.min_images_per_class} images per (domain, class)"})]


def drift_expectations(params: ValidateParams) -> list:
    import great_expectations as gx

    return [gx.expectations.ExpectColumnValuesToBeBetween(
        column=f"{stat}_drift", min_value=-1.0, max_value=1.0,
        meta={"name": f"pixel_drift_{stat}", "severity": severity_of(params, f"pixel_drift_{stat}"),
              "notes": f"each domain's average per-image pixel {stat} within the bound taken from the accepted profile"})
        for stat in ("mean", "std")]


class Suite:
    """One ephemeral Great Expectations context: tables are validated through checkpoints that also
    render Data Docs into ``docs_dir``."""

    def __init__(self, docs_dir: Path):
        import great_expectations as gx

        self.gx = gx
        # an ephemeral context announces the throwaway docs site it makes and removes: not news
        logging.getLogger("great_expectations.data_context.types.base").setLevel(logging.WARNING)
        self.context = gx.get_context(mode="ephemeral")
        self.context.variables.progress_bars = gx.data_context.types.base.ProgressBarsConfig(globally=False)
        self.context.add_data_docs_site(site_name=DOCS_SITE, site_config={
            "class_name": "SiteBuilder",
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
        })
        self.source = self.context.data_sources.add_or_update_pandas("mdpipe")

    def run(self, table: str, data: pd.DataFrame, expectations: list) -> list[dict]:
        gx = self.gx
        if data.empty or not expectations:
            return []
        batch = self.source.add_dataframe_asset(table).add_batch_definition_whole_dataframe("all")
        suite = self.context.suites.add_or_update(gx.ExpectationSuite(name=f"mdpipe_{table}"))
        for exp in expectations:
            suite.add_expectation(exp)
        definition = self.context.validation_definitions.add_or_update(
            gx.ValidationDefinition(name=f"validate_{table}", data=batch, suite=suite))
        checkpoint = self.context.checkpoints.add_or_update(gx.Checkpoint(
            name=f"mdpipe_{table}", validation_definitions=[definition],
            actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs", site_names=[DOCS_SITE])],
            result_format={"result_format": "COMPLETE", "unexpected_index_column_names": INDEX_COLUMNS},
        ))
        result = checkpoint.run(batch_parameters={"dataframe": data})
        outcomes = []
        for run in result.run_results.values():
            for r in run.results:
                bad = r.result.get("unexpected_index_list") or []
                rows = sorted({int(b["row"]) for b in bad})
                outcomes.append({
                    "table": table,
                    "expectation": r.expectation_config.meta["name"],
                    "type": r.expectation_config.type,
                    "severity": r.expectation_config.meta["severity"],
                    "notes": r.expectation_config.meta.get("notes", ""),
                    "success": bool(r.success),
                    "rows": rows,
                    "unexpected": len(rows),
                    "files": sorted({str(b["path"]) for b in bad}),
                })
        return outcomes


def duplicate_groups(table: pd.DataFrame, rows: list[int]) -> list[str]:
    """``a = b (train, test)`` per content hash among ``rows``: which files hold the same bytes."""
    sub = table.set_index("row").loc[rows]
    out = []
    for _, g in sub.groupby("sha256", sort=False):
        out.append(" = ".join(sorted(map(str, g["path"]))) + f" ({', '.join(sorted(set(map(str, g['split']))))})")
    return sorted(out)


# ----------------------------------------------------------------------------------------------------
# report, Prefect artifact


def write_summary(folder: Path, outcomes: list[dict], info: dict) -> None:
    """``index.html`` (summary, links to the Great Expectations Data Docs) and ``results.json``."""
    atomic_write_json(folder / "results.json", {"outcomes": [{k: v for k, v in o.items() if k != "rows"} | {
        "files": o["files"][:200]} for o in outcomes], **info})
    esc = html.escape
    rows = "".join(
        f"<tr class={'ok' if o['success'] else o['severity']}><td>{esc(o['table'])}</td><td>{esc(o['expectation'])}</td>"
        f"<td>{esc(o['notes'])}</td><td>{o['severity']}</td><td>{'pass' if o['success'] else 'FAIL'}</td>"
        f"<td>{o['unexpected'] or ''}</td><td>{'<br>'.join(esc(f) for f in (o.get('details') or o['files'])[:10])}</td></tr>"
        for o in outcomes
    )
    drift = info.get("drift") or []
    drift_rows = "".join(
        f"<tr><td>{esc(d['domain'])}</td><td>{d['images']}</td><td>{d['mean_avg']}</td><td>{d['mean_accepted']}</td>"
        f"<td>{d['mean_drift']}</td><td>{d['std_avg']}</td><td>{d['std_accepted']}</td><td>{d['std_drift']}</td></tr>"
        for d in drift)
    prof = info["profile"]
    compared = prof["compared_against"]
    verdict = info["verdict"]
    body = (
        "<html><head><meta charset='utf-8'><title>mdpipe validation</title><style>body{font-family:sans-serif}"
        "td,th{padding:2px 8px;text-align:left}.critical{background:#fcc}.warning{background:#ffd}.ok{background:#dfd}"
        "</style></head><body><h1>mdpipe data validation</h1>"
        f"<p><b>{esc(verdict)}</b> &middot; {info['rows_in']} manifest rows, {info['rows_kept']} kept, "
        f"{info['quarantined_rows']} quarantined &middot; dataset version {esc(str(info['dataset_version']))}</p>"
        f"<p>Profile <code>{esc(prof['name'])}</code>: compared against "
        f"{'version ' + str(compared['version']) + ' (dataset ' + esc(compared['dataset_version']) + ')' if compared else 'nothing (first accepted run)'}"
        f"{'; accepted as version ' + str(prof['accepted_version']) if prof.get('accepted_version') else ''}.</p>"
        "<p><a href='data_docs/index.html'>Great Expectations Data Docs</a> (every expectation, its "
        "arguments and unexpected values)</p>"
        "<h2>Expectations</h2><table><tr><th>table</th><th>expectation</th><th>what</th><th>severity</th>"
        f"<th>result</th><th>rows</th><th>offending files</th></tr>{rows}</table>"
        + (("<h2>Pixel statistics per domain (drift)</h2><table><tr><th>domain</th><th>images</th><th>mean</th>"
            "<th>accepted</th><th>drift</th><th>std</th><th>accepted</th><th>drift</th></tr>"
            f"{drift_rows}</table><p>drift = shift / allowed shift; beyond &plusmn;1 fails.</p>") if drift else "")
        + "</body></html>")
    atomic_write_text(folder / "index.html", body)


def publish_artifact(outcomes: list[dict], info: dict) -> None:
    """A markdown summary in the Prefect UI, when this runs inside a flow or task run (not otherwise)."""
    try:
        from prefect.context import get_run_context

        get_run_context()
    except Exception:  # noqa: BLE001 -- no run context: `mdpipe stage validate`, dvc repro, tests
        return
    try:
        from prefect.artifacts import create_markdown_artifact

        failed = [o for o in outcomes if not o["success"]]
        prof = info["profile"]
        compared = prof["compared_against"]
        lines = [
            f"## Data validation: {info['verdict']}",
            f"{info['rows_in']} rows, {info['rows_kept']} kept, {info['quarantined_rows']} quarantined; "
            f"{len(outcomes)} expectations, {len(failed)} failed. Dataset version `{info['dataset_version']}`.",
            f"Profile `{prof['name']}` compared against: "
            + (f"version {compared['version']}" if compared else "none (first run)")
            + (f"; accepted as version {prof['accepted_version']}" if prof.get("accepted_version") else ""),
            "", "| expectation | severity | rows | files |", "|---|---|---:|---|",
        ]
        lines += [f"| {o['expectation']} | {o['severity']} | {o['unexpected']} | "
                  f"{', '.join((o.get('details') or o['files'])[:5]).replace('|', '/')} |" for o in failed]
        if not failed:
            lines.append("| (all passed) | | | |")
        lines.append(f"\nReport: `{info['report']}/index.html` (Data Docs in `data_docs/`).")
        create_markdown_artifact(markdown="\n".join(lines), key="mdpipe-validation",
                                 description="mdpipe data validation summary")
    except Exception as e:  # noqa: BLE001 -- the summary is a convenience, never a reason to fail
        log.warning("could not publish the validation artifact: %s", e)


# ----------------------------------------------------------------------------------------------------
# the stage


def source_profile_name(paths: Paths) -> str:
    """One accepted profile per data source: ``builtin``, or ``tree-<folder>-<hash of its path>``."""
    import hashlib
    import re

    from tasks.params import load_params

    root = load_params("ingest", paths.root / "params").data_root
    if not root:
        return "builtin"
    resolved = str(Path(root).expanduser().resolve())
    slug = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(resolved).name)[:40] or "root"
    return f"tree-{slug}-{hashlib.sha256(resolved.encode()).hexdigest()[:8]}"


def run(params: ValidateParams, paths: Paths) -> StageResult:
    t_start = time.perf_counter()
    frame = read_manifest(paths.manifest)
    profile_name = params.profile or source_profile_name(paths)
    registry = ProfileRegistry(paths, profile_name)
    accepted = registry.current()
    known_domains = params.known_domains or (sorted(accepted["domains"]) if accepted else None)
    known_classes = params.known_classes or (accepted.get("classes") if accepted else None)

    t0 = time.perf_counter()
    from mdcore.data.pool import progress_logger

    checks = check_images(paths.raw, frame["path"], workers=params.workers,
                          progress=progress_logger(log.info, "validate: images read and decoded"))
    checks.index = frame.index
    t_checks = time.perf_counter() - t0

    t0 = time.perf_counter()
    table = checked_table(frame, checks)
    with atomic_dir(paths.validation_report) as report:
        suite = Suite(report / "data_docs")
        outcomes = suite.run("manifest", table, manifest_expectations(params, known_domains, known_classes))
        # counts and drift are measured on the rows the image-level warnings leave
        set_aside = {r for o in outcomes if not o["success"] and o["severity"] == "warning" for r in o["rows"]}
        kept_so_far = frame.drop(index=sorted(set_aside))
        counts = class_counts(kept_so_far, frame, params.known_domains, known_classes)
        outcomes += suite.run("class_counts", counts, count_expectations(params))
        drift = domain_stats(kept_so_far, checks, accepted, params)
        outcomes += suite.run("domain_stats", drift, drift_expectations(params))
        for o in outcomes:
            if not o["success"] and o["expectation"] in ("unique_content", "disjoint_splits"):
                o["details"] = duplicate_groups(table, o["rows"])

        failed = [o for o in outcomes if not o["success"]]
        critical = [o for o in failed if o["severity"] == "critical"]
        # quarantine: rows of failed warnings, and every row of a (domain, class) or domain that failed one
        reasons: dict[int, list[str]] = {}
        for o in failed:
            if o["severity"] != "warning":
                continue
            if o["table"] == "manifest":
                rows = o["rows"]
            elif o["table"] == "class_counts":  # the images are sound: name the thin classes, keep them
                thin = counts.set_index("row").loc[o["rows"]]
                o["thin_classes"] = [f"{d}/{c} ({n})" for d, c, n in zip(thin["domain"], thin["label"], thin["images"])]
                rows = []
            else:
                domains = set(drift.set_index("row").loc[o["rows"], "domain"])
                rows = list(frame.index[frame["domain"].isin(domains)])
            for r in rows:
                reasons.setdefault(int(r), []).append(o["expectation"])
        quarantined = sorted(reasons)
        kept = frame.drop(index=quarantined)
        verdict = ("FAILED: " + ", ".join(sorted({o["expectation"] for o in critical}))) if critical else (
            "passed with warnings" if failed else "passed")
        compared = {"version": accepted["version"], "dataset_version": accepted["dataset_version"],
                    "accepted_at": accepted.get("accepted_at")} if accepted else None
        info = {
            "verdict": verdict,
            "rows_in": int(len(frame)),
            "rows_kept": int(len(kept)),
            "quarantined_rows": len(quarantined),
            "dataset_version": dataset_version(kept),
            "profile": {"name": profile_name, "folder": str(registry.folder), "compared_against": compared,
                        "accepted_version": None},
            "known_domains": known_domains,
            "known_classes": known_classes,
            "drift": drift.drop(columns=["row", "path"]).to_dict("records"),
            "report": str(paths.validation_report.relative_to(paths.root)),
        }
        accepted_version = None
        if not critical:  # only a run that passes writes outputs and moves the accepted profile on
            for o in failed:
                if "thin_classes" in o:
                    log.warning("warning expectation %s failed: fewer than %d images in %s; kept (training sees "
                                "these classes rarely or never in those domains)", o["expectation"],
                                params.min_images_per_class, ", ".join(o["thin_classes"]))
                else:
                    log.warning("warning expectation %s failed: quarantining %d rows", o["expectation"],
                                o["unexpected"])
            quarantine = frame.loc[quarantined, COLUMNS].copy()
            quarantine["reason"] = [";".join(reasons[r]) for r in quarantined]
            atomic_write_text(paths.quarantine, quarantine.to_csv(index=False, lineterminator="\n"))
            atomic_write_text(paths.validated, manifest_csv(kept))
            if params.update_profile:
                accepted_version = registry.accept(build_profile(profile_name, kept, checks, accepted), accepted)
        info["profile"]["accepted_version"] = accepted_version
        write_summary(report, outcomes, info)  # the report describes this run, passed or failed
    t_suite = time.perf_counter() - t0
    publish_artifact(outcomes, info)

    if critical:
        lines = [f"{paths.manifest}: {len(critical)} critical expectation(s) failed; no training will start "
                 f"(report: {paths.validation_report / 'index.html'}):"]
        for o in critical:
            shown = (o.get("details") or o["files"])
            more = f" ... and {len(shown) - 10} more" if len(shown) > 10 else ""
            lines.append(f"  - {o['expectation']} ({o['notes']}): {', '.join(shown[:10]) or 'see report'}{more}")
        if any(o["expectation"] in ("known_domains", "known_classes") for o in critical) and not (
                params.known_domains and params.known_classes):
            lines.append(f"    (known domains/classes come from the accepted profile {registry.folder}; if the new "
                         "ones are meant, set validate.known_domains / validate.known_classes or validate.profile)")
        if any(o["expectation"].startswith("pixel_drift") for o in critical):
            lines.append(f"    (drift is measured against accepted profile version {compared['version']} in "
                         f"{registry.folder}; if the change is meant, rerun with -S validate.drift_check=false "
                         "to accept it as the new profile)")
        raise DataValidationError("\n".join(lines))

    timings = {"image_checks": round(t_checks, 2), "suite": round(t_suite, 2),
               "total": round(time.perf_counter() - t_start, 2)}
    metrics = {
        "expectations": len(outcomes),
        "failed_warning": sorted({o["expectation"] for o in failed}),
        "thin_classes": sorted({t for o in failed for t in o.get("thin_classes", [])}),
        "quarantined_rows": len(quarantined),
        "rows": len(kept),
        "dataset_version": dataset_version(kept),
        "image_checks": {
            "images": int(len(checks)),
            "missing": int((checks["file_bytes"] < 0).sum()),
            "empty": int((checks["file_bytes"] == 0).sum()),
            "undecodable": int(((checks["file_bytes"] > 0) & ~checks["decoded"]).sum()),
            "wrong_extension": int(((checks["content_format"] != checks["ext_format"])
                                    & (checks["file_bytes"] > 0)).sum()),
            "images_per_s": round(len(checks) / max(t_checks, 1e-9)),
        },
        "profile": {"name": profile_name, "compared_against": compared, "accepted_version": accepted_version},
        "drift": {d["domain"]: {"mean_drift": d["mean_drift"], "std_drift": d["std_drift"]} for d in info["drift"]},
        "timings_s": timings,
    }
    return StageResult(
        {"validated": str(paths.validated), "quarantine": str(paths.quarantine), "report": str(paths.validation_report)},
        metrics,
    )


@task(name="validate")
def validate_task(root: str = ".", params: StageParams | None = None) -> dict:
    """Prefect task: the validate stage."""
    return execute("validate", root, params)
