"""Deployments on a Prefect process work pool, for teams: the pipeline and the retraining loop are
registered from this workspace's code (``flow.from_source``), and ``prefect worker start --pool NAME`` on any
machine where the project is installed at the same path runs the runs started from the UI, the API or the
schedule. ``mdpipe serve`` stays the one-process door for one machine; both use the same flows, parameters
(the run form opens on ``params/*.yaml``) and one-run-at-a-time limit.
"""
from __future__ import annotations

from pathlib import Path

PIPELINE_ENTRYPOINT = "flows/pipeline.py:pipeline"
RETRAIN_ENTRYPOINT = "flows/retrain.py:retrain"


def ensure_process_pool(name: str) -> None:
    """Create the work pool ``name`` (type process) unless it exists; a pool of another type is an error."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=name, type="process"))
            return
    if pool.type != "process":
        raise ValueError(f"work pool {name!r} is of type {pool.type!r}; mdpipe deploys to a process pool "
                         "(the worker runs the project's code where it is installed)")


def deploy_to_pool(root: Path, pool: str, cron: str = "0 3 * * *", ray_address: str | None = None) -> dict:
    """Register ``mdpipe`` (the whole DAG, on demand) and ``mdpipe-retrain`` (on ``cron``) on ``pool``;
    returns {deployment name: id}."""
    from prefect import Flow
    from prefect.client.schemas.objects import ConcurrencyLimitConfig

    from flows.pipeline import form_parameters

    ensure_process_pool(pool)
    root = Path(root).resolve()
    one_at_a_time = ConcurrencyLimitConfig(limit=1, collision_strategy="ENQUEUE")
    job = {"working_dir": str(root)} | ({"env": {"RAY_ADDRESS": ray_address}} if ray_address else {})
    pipeline = Flow.from_source(source=str(root), entrypoint=PIPELINE_ENTRYPOINT)
    retrain = Flow.from_source(source=str(root), entrypoint=RETRAIN_ENTRYPOINT)
    ids = {
        "mdpipe-pipeline/mdpipe": pipeline.deploy(
            name="mdpipe", work_pool_name=pool, build=False, push=False, job_variables=job,
            parameters=form_parameters(str(root)), concurrency_limit=one_at_a_time, print_next_steps=False,
            description="The whole DAG; the form opens on params/*.yaml, a run applies only the fields changed"),
        "mdpipe-retrain/mdpipe-retrain": retrain.deploy(
            name="mdpipe-retrain", work_pool_name=pool, build=False, push=False, job_variables=job, cron=cron,
            parameters={"root": str(root)}, concurrency_limit=one_at_a_time, print_next_steps=False,
            description="Retrain when the data changed; promote only if no domain gets worse"),
    }
    return {k: str(v) for k, v in ids.items()}
