"""The Prefect doors against a real `prefect server start` (not part of `make test`: it runs a pipeline):

1. `mdpipe deploy --pool NAME` + `prefect worker start --pool NAME`: a run submitted as the UI's form does
   (the deployment's own `params` with one field changed) executes on the worker, and afterwards every value
   in params/*.yaml is as it was except that field, including a value changed in the files after the
   deployment was made (the form's stale copy must not reset it).
2. `mdpipe serve`, then the server goes away, then Ctrl-C: the process ends within 10 s.

Usage, from the project root: python -m bench.prefect_doors_check WORKSPACE [PORT]
WORKSPACE: a workspace (a git clone of the project; `make demo` there first makes the run faster)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

BIN = Path(sys.executable).parent


def wait_for(predicate, timeout: float, step: float = 1.0):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise TimeoutError(f"gave up after {timeout} s")


def params_values(ws: Path) -> dict:
    return {f.stem: yaml.safe_load(f.read_text()) for f in sorted((ws / "params").glob("*.yaml"))}


def main(ws: Path, port: int) -> dict:
    home = Path(tempfile.mkdtemp(prefix="mdpipe-prefect-"))
    api = f"http://127.0.0.1:{port}/api"
    env = os.environ | {"PREFECT_HOME": str(home), "PREFECT_API_URL": api, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    os.environ.update(env)
    logs = {name: open(home / f"{name}.log", "w") for name in ("server", "worker", "serve")}
    server = subprocess.Popen([BIN / "prefect", "server", "start", "--port", str(port)], env=env,
                              stdout=logs["server"], stderr=subprocess.STDOUT)
    procs = [server]
    result = {"logs": str(home)}
    try:
        import httpx

        wait_for(lambda: _up(api), 180)
        # 1. the work pool door
        subprocess.run([BIN / "mdpipe", "--root", str(ws), "deploy", "--pool", "bench-pool"], env=env, check=True)
        worker = subprocess.Popen([BIN / "prefect", "worker", "start", "--pool", "bench-pool"], cwd=ws, env=env,
                                  stdout=logs["worker"], stderr=subprocess.STDOUT)
        procs.append(worker)
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            dep = client.read_deployment_by_name("mdpipe-pipeline/mdpipe")
            form = json.loads(json.dumps(dep.parameters))
        # a value changed in the files after the deployment (its form) was made
        subprocess.run([BIN / "mdpipe", "--root", str(ws), "params", "finetune.weight_decay"], env=env, check=True)
        from tasks.params import apply_overrides

        apply_overrides(ws / "params", {"finetune": {"weight_decay": 0.0123}})
        before = params_values(ws)
        form["params"]["finetune"]["epochs"] = before["finetune"]["epochs"] + 1  # the one field the user changed
        t0 = time.time()
        with get_client(sync_client=True) as client:
            run = client.create_flow_run_from_deployment(dep.id, parameters=form)

            def final():
                state = client.read_flow_run(run.id).state
                return state if state and state.is_final() else None

            state = wait_for(final, 1500, 5)
        after = params_values(ws)
        changed = {(s, k) for s in before for k in before[s] if before[s][k] != after[s].get(k)}
        result["pool"] = {"state": state.type.value, "wall_s": round(time.time() - t0, 1),
                          "params_changed": sorted(f"{s}.{k}" for s, k in changed),
                          "weight_decay_kept": after["finetune"]["weight_decay"] == 0.0123}
        worker.terminate()
        worker.wait(30)
        # 2. serve, the server goes away, Ctrl-C
        serve = subprocess.Popen([BIN / "mdpipe", "--root", str(ws), "serve"], env=env, stdout=logs["serve"],
                                 stderr=subprocess.STDOUT)
        procs.append(serve)
        wait_for(lambda: "mdpipe-retrain" in (home / "serve.log").read_text(), 120)
        time.sleep(5)
        server.terminate()
        server.wait(60)
        time.sleep(2)
        t0 = time.time()
        serve.send_signal(signal.SIGINT)
        try:
            serve.wait(60)
            result["serve_stop_s"] = round(time.time() - t0, 1)
        except subprocess.TimeoutExpired:
            result["serve_stop_s"] = "over 60"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return result


def _up(api: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{api}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


if __name__ == "__main__":
    out = main(Path(sys.argv[1]).resolve(), int(sys.argv[2]) if len(sys.argv) > 2 else 4301)
    print(json.dumps(out, indent=2))
