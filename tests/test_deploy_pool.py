"""`mdpipe deploy --pool NAME` registers both deployments on a process work pool, with the workspace as the
code's source and working directory, the form opening on params/*.yaml, and one run at a time. (A real
worker executing a run is checked by bench/prefect_doors_check.py: it runs a whole pipeline.)"""
import json
import shutil
import uuid

import pytest

from tests.conftest import REPO


def test_deploy_registers_both_deployments_on_a_process_pool(tmp_path):
    from prefect.client.orchestration import get_client

    from flows.deploy import deploy_to_pool, ensure_process_pool
    from tasks.params import load_params

    ws = tmp_path / "ws"
    for folder in ("params", "flows", "tasks", "mdcore"):
        shutil.copytree(REPO / folder, ws / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "paths.yaml", ws / "paths.yaml")
    pool = f"mdpipe-test-{uuid.uuid4().hex[:8]}"
    try:
        ids = deploy_to_pool(ws, pool, cron="0 4 * * *", ray_address="ray://head:10001")
        with get_client(sync_client=True) as client:
            assert client.read_work_pool(pool).type == "process"
            pipe = client.read_deployment_by_name("mdpipe-pipeline/mdpipe")
            again = client.read_deployment_by_name("mdpipe-retrain/mdpipe-retrain")
        assert {str(pipe.id), str(again.id)} == set(ids.values())
        for dep in (pipe, again):
            assert dep.work_pool_name == pool and str(ws.resolve()) in json.dumps(dep.pull_steps)  # code source
            assert dep.job_variables == {"working_dir": str(ws.resolve()), "env": {"RAY_ADDRESS": "ray://head:10001"}}
            assert dep.global_concurrency_limit.limit == 1 and dep.concurrency_options.collision_strategy == "ENQUEUE"
        assert pipe.entrypoint == "flows/pipeline.py:pipeline" and again.entrypoint == "flows/retrain.py:retrain"
        assert pipe.parameters["params"]["finetune"]["epochs"] == load_params("finetune", ws / "params").epochs
        assert pipe.parameters["quick"] == {"data_root": None, "holdout_domains": None, "epochs": None,
                                            "num_workers": None}
        assert [s.schedule.cron for s in again.schedules] == ["0 4 * * *"]
        with pytest.raises(ValueError, match="process pool"):
            from prefect.client.schemas.actions import WorkPoolCreate

            other = f"{pool}-other"
            with get_client(sync_client=True) as client:
                client.create_work_pool(WorkPoolCreate(name=other, type="prefect-agent"))
            try:
                ensure_process_pool(other)
            finally:
                with get_client(sync_client=True) as client:
                    client.delete_work_pool(other)
    finally:
        with get_client(sync_client=True) as client:
            for name in ("mdpipe-pipeline/mdpipe", "mdpipe-retrain/mdpipe-retrain"):
                try:
                    client.delete_deployment(client.read_deployment_by_name(name).id)
                except Exception:  # noqa: BLE001 - cleanup of what the test made
                    pass
            client.delete_work_pool(pool)
