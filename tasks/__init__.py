"""mdpipe stages: one module per stage, each a plain ``run(params, paths)`` plus a Prefect task."""
