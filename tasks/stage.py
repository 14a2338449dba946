"""Running a stage: load and validate its params, call its plain ``run(params, paths)``, write its
metrics to ``reports/metrics/NAME.json`` atomically. The CLI, dvc.yaml and the Prefect flow all go
through :func:`execute`, so there is one implementation of each stage."""
from __future__ import annotations

import importlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from mdcore.data.io import atomic_write_json
from mdcore.data.workspace_lock import workspace_lock
from tasks.params import validate_params, StageParams, load_params
from tasks.paths import Paths, load_paths

STAGES = ("ingest", "validate", "synthesize", "pretrain", "label_issues", "finetune", "evaluate", "compress")
# stages without a params file of their own: source fingerprints the data that ingest's params point at
PARAMS_OF = {"source": "ingest"}
log = logging.getLogger("mdpipe")


@dataclass
class StageResult:
    """What a stage's ``run`` returns: its outputs (name -> path) and a flat-ish metrics dict."""

    outputs: dict[str, str]
    metrics: dict = field(default_factory=dict)


def stage_module(name: str):
    if name not in STAGES and name not in PARAMS_OF:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join([*PARAMS_OF, *STAGES])}")
    return importlib.import_module(f"tasks.{name}")


def execute(name: str, root: str | Path = ".", params: StageParams | dict | None = None) -> dict:
    """Run stage ``name`` in workspace ``root``; returns its metrics (also written to reports/metrics).
    ``params``: the stage's params as a flow already read them (a typed object, or its dict as a Prefect
    task receives it); None reads ``params/NAME.yaml``."""
    paths: Paths = load_paths(root)
    module = stage_module(name)
    kind = PARAMS_OF.get(name, name)
    if params is None:
        params = load_params(kind, paths.root / "params")
    elif isinstance(params, dict):
        params = validate_params(kind, params, f"params of stage {name}")
    with workspace_lock(paths.root, f"stage {name}", log=log.warning):  # free inside a flow that holds it
        log.info("stage %s: starting", name)
        t0 = time.perf_counter()
        result: StageResult = module.run(params, paths)
        metrics = dict(result.metrics)
        metrics["wall_s"] = round(time.perf_counter() - t0, 2)
        metrics["outputs"] = {k: str(Path(v).relative_to(paths.root)) if Path(v).is_absolute() else str(v)
                              for k, v in result.outputs.items()}
        atomic_write_json(paths.metrics_file(name), metrics)
    log.info("stage %s: done in %.1f s", name, metrics["wall_s"])
    return metrics
