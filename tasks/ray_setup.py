"""Runs in every Ray worker process (``worker_process_setup_hook``), so it imports nothing heavy: Ray starts
a fresh process for each actor of a Train job (controller, worker group, workers), and a hook that imported
torch and timm cost each of them seconds of CPU before it could start."""
import logging


def quiet_ray_logs() -> None:
    """Without the dashboard (not needed locally) the placement-group cleaner cannot reach the State API and
    logs a warning every second; nothing is wrong."""
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)
