"""The finetune stage's Ray Train job: what every worker runs (data, model, then ``mdcore.train.fit``), the
workers it runs on (Ray Train's, or one local process on an explicit device), and ``fit``, which launches it.

It imports no Prefect (Ray lazily), so a machine with torch, timm and Ray alone can run the job: the GPU
check does (``bench/gpu_check.py``). ``tasks/finetune.py`` is the stage around it.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import tempfile
from pathlib import Path

from mdcore.data.decode import DEFAULT_RESIZE
from mdcore.train import Callback, Runtime
from tasks.params import FinetuneParams
from tasks.paths import Paths

log = logging.getLogger("mdpipe.finetune")


class RayWorker:
    """What the worker needs from Ray Train: rank, world, one device per worker (GPU when ``use_gpu``), the
    checkpoint to resume from, DDP wrapping, and reporting."""

    def __init__(self):
        import ray.train
        import ray.train.torch

        self._train, self._torch = ray.train, ray.train.torch
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def checkpoint(self):
        return self._train.get_checkpoint()

    def prepare(self, model, find_unused_parameters: bool):
        return self._torch.prepare_model(model, move_to_device=True, parallel_strategy_kwargs={
            "find_unused_parameters": find_unused_parameters})

    def report(self, metrics: dict, folder: str | None) -> None:
        checkpoint = self._train.Checkpoint.from_directory(folder) if folder else None
        self._train.report(metrics, checkpoint=checkpoint)


class LocalWorker:
    """The same worker in this process on an explicit device (tests; one machine without Ray): rank 0 of 1;
    each reported checkpoint folder is copied to ``out/checkpoint_NNNNNN``."""

    def __init__(self, device: str, out: str | Path, resume_from: str | Path | None = None):
        import torch

        self.rank, self.world, self.device = 0, 1, torch.device(device)
        self.out, self.resume_from, self.reports = Path(out), resume_from, []

    def checkpoint(self):
        from contextlib import nullcontext
        from types import SimpleNamespace

        if self.resume_from is None:
            return None
        return SimpleNamespace(as_directory=lambda: nullcontext(str(self.resume_from)))

    def prepare(self, model, find_unused_parameters: bool):
        return model.to(self.device)

    def report(self, metrics: dict, folder: str | None) -> None:
        self.reports.append(metrics)
        if folder:
            shutil.copytree(folder, self.out / f"checkpoint_{len(self.reports):06d}")


def train_loop_per_worker(cfg: dict) -> None:
    """Runs on every Ray Train worker (see :func:`train_worker`)."""
    train_worker(cfg, RayWorker())


def train_worker(cfg: dict, worker) -> None:
    """Load data, build the model, and fit it (``mdcore.train.fit``) with DDP on a domain-balanced shard on
    ``worker.device``, resuming from the worker's checkpoint if there is one; every epoch's metrics and
    (rank 0) full-state checkpoint go to Ray. Only Ray lives here: the loop is mdcore's."""
    from contextlib import nullcontext

    import torch

    from mdcore.data.lazy_images import BatchLoader
    from mdcore.train import FitConfig, fit
    from tasks.data import guard_holdout, load_split
    from mdcore.train.setup import build_method, build_model, build_optimizer, fit_config

    p: FinetuneParams = cfg["params"]  # the typed params the driver validated (Ray pickles the object)
    torch.set_num_threads(max(1, int(p.cpus_per_worker)))
    torch.manual_seed(p.seed)
    roots = {k: Path(v) for k, v in cfg["roots"].items()}
    stream = {"lazy": p.loader == "stream", "cache_dir": decoded_cache_dir() if p.decoded_cache else None,
              "resize": cfg["resize"]}
    train, train_rows = load_split(cfg["train_manifest"], roots, cfg["image_size"], ("train",),
                                   synthetic=p.use_synthetic, **stream)
    val_set, val_rows = load_split(cfg["train_manifest"], roots, cfg["image_size"], ("val",), synthetic=False,
                                   domains=train.domain_names, classes=train.class_names, **stream)
    guard_holdout(cfg["train_manifest"], {"training": train_rows, "validation and selection": val_rows,
                                          "prototypes": train_rows})
    method = build_method(p)
    model = build_model(p, train, cfg["backbone"], cfg["image_size"], cfg.get("backbone_weights"), method=method,
                        resize=cfg["resize"])
    optimizer, scheduler = build_optimizer(p, model)
    config: FitConfig = fit_config(p, train.domain_names)
    runtime = RayRuntime(worker, p, config)
    checkpoint = worker.checkpoint()
    with checkpoint.as_directory() if checkpoint else nullcontext(None) as folder:
        attempt = _attempt(folder)
        if folder:
            print(f"[finetune] rank {worker.rank}: resuming from {folder} (attempt {attempt})", flush=True)
        # stream: one loader for the run, its decoding processes kept across epochs
        with BatchLoader(train.images, p.loader_workers if p.loader == "stream" else 0,
                         pin_memory=runtime.device.type == "cuda") as loader:
            fit(model, method, train, val_set, config, optimizer, scheduler, runtime=runtime, loader=loader,
                resume_from=folder, callbacks=[
                    InjectedFailure(cfg.get("kill_at_epoch"), worker.rank, worker.world, cfg.get("progress_file")),
                    ReportToRay(worker, model, attempt, p.epochs, cfg.get("progress_file"))])


def _attempt(folder: str | None) -> int:
    """0 for a fresh run; after a restart, one more than the attempt that wrote the checkpoint."""
    if not folder:
        return 0
    history = json.loads((Path(folder) / "history.json").read_text())
    return history[-1].get("attempt", 0) + 1 if history else 1


class RayRuntime(Runtime):
    """``mdcore.train.Runtime`` under Ray Train: the worker's device, DDP (with mixed precision and
    torch.compile inside it), sums and buffer averages over workers."""

    def __init__(self, worker, p: FinetuneParams, config):
        super().__init__(worker.device)
        self.worker, self.p, self.config = worker, p, config
        self.rank, self.world = worker.rank, worker.world

    def wrap(self, model):
        import torch

        from mdcore.models.accel import FastForward

        fast = FastForward(model, self.p.precision, self.p.channels_last, device_type=self.device.type)
        if self.p.compile:
            fast = torch.compile(fast)
        # frozen or later-unfrozen stages get no gradient in some steps: DDP must tolerate them
        return self.worker.prepare(fast, self.config.freezes)

    def sum(self, values: list[float]) -> list[float]:
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)  # NCCL rejects CPU tensors
        if self.world > 1:
            dist.all_reduce(t)
        return t.tolist()

    def average_buffers(self, model) -> None:
        """Mean of every floating buffer (batch-norm running statistics, per-domain ones included)."""
        import torch
        import torch.distributed as dist

        if self.world == 1:
            return
        with torch.no_grad():
            for buf in model.buffers():
                if buf.is_floating_point():
                    dist.all_reduce(buf)
                    buf.div_(self.world)

    def weights_max_diff(self, model) -> float:
        """Largest difference between any worker's parameters and rank 0's (0.0 when DDP kept them in sync)."""
        import torch
        import torch.distributed as dist

        if self.world == 1:
            return 0.0
        flat = torch.cat([q.detach().flatten().double() for q in model.parameters()])
        reference = flat.clone()
        dist.broadcast(reference, src=0)
        diff = (flat - reference).abs().max().reshape(1)
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
        return float(diff)


class InjectedFailure(Callback):
    """Tests: SIGKILL the last worker after ``kill_at_epoch`` epochs (once rank 0 finished that epoch's
    checkpoint), once per run and epoch: a marker in the run's folder keeps the restarted worker
    group, or a retry of the run, from being killed at the same epoch again."""

    def __init__(self, kill_at_epoch: int | None, rank: int, world: int, progress_file: str | None):
        self.kill_at_epoch, self.rank, self.world = kill_at_epoch, rank, world
        self.marker = (Path(progress_file).parent / f"injected-failure-epoch-{kill_at_epoch}"
                       if kill_at_epoch is not None and progress_file else None)

    def on_epoch_start(self, epoch: int) -> None:
        if self.marker is None or self.kill_at_epoch != epoch or self.marker.exists():
            return
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()  # let rank 0 finish its checkpoint first
        if self.rank == self.world - 1:
            self.marker.touch()
            print(f"[finetune] rank {self.rank}: injected failure (SIGKILL) before epoch {epoch + 1}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


class ReportToRay(Callback):
    """Every epoch: every rank reports its metrics; rank 0 also a checkpoint folder with the full training
    state, the model as it stands (``model/``, what the stage ships after the last epoch) and the history,
    and a line in the progress file the driver follows (console and Prefect progress artifact)."""

    def __init__(self, worker, model, attempt: int, epochs: int, progress_file: str | None):
        self.worker, self.model, self.attempt, self.epochs = worker, model, attempt, epochs
        self.progress_file = progress_file

    def on_epoch_end(self, epoch: int, metrics: dict, save) -> None:
        from mdcore.models.model import save_model

        metrics["attempt"] = self.attempt
        if self.worker.rank != 0:
            self.worker.report(metrics, None)
            return
        if self.progress_file:
            with open(self.progress_file, "a") as f:
                f.write(json.dumps({**metrics, "epochs": self.epochs}) + "\n")
        with tempfile.TemporaryDirectory() as tmp:
            save(tmp)
            save_model(self.model, Path(tmp) / "model", extra={
                "epoch": epoch + 1, "selected_epoch": metrics.get("shipped/selected_epoch")})
            history = json.loads((Path(tmp) / "training_meta.json").read_text())["history"]
            (Path(tmp) / "history.json").write_text(json.dumps(history))
            self.worker.report(metrics, tmp)


def decoded_cache_dir() -> str:
    """Decoded images of ``finetune.decoded_cache``: local to each machine, outside the workspace."""
    return os.environ.get("MDPIPE_DECODED_CACHE", str(Path.home() / ".cache" / "mdpipe" / "decoded"))


def ray_storage() -> str:
    """Ray Train's storage lives outside the git/DVC workspace (a cluster needs it on shared storage)."""
    return os.environ.get("MDPIPE_RAY_STORAGE", str(Path.home() / ".cache" / "mdpipe" / "ray_results"))


def init_ray() -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    address = os.environ.get("RAY_ADDRESS")
    runtime_env = {"worker_process_setup_hook": "tasks.ray_setup.quiet_ray_logs"}
    # log_to_driver=False: Ray's own worker chatter (and transient warnings such as a resource request that
    # timed out on a busy machine) stays in Ray's log folder; progress comes from the progress file, and a
    # failed run's error carries the worker's traceback.
    if address:
        log.info("joining the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=False, runtime_env=runtime_env)
    else:  # "local": always a Ray of its own, never a stray `ray start` cluster another run may stop
        ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=True,
                 logging_level=logging.WARNING, runtime_env=runtime_env)


def run_name(params: FinetuneParams, paths: Paths, use_pretrained: bool) -> str:
    """The Ray run's name is a digest of everything that decides the model (params, training manifest,
    starting weights), so a retried task or a restarted flow finds the same run in Ray's storage and
    resumes from its last checkpoint. A finished run is renamed, so the next one starts fresh."""
    import hashlib

    h = hashlib.sha256(params.model_dump_json(exclude={"max_failures"}).encode())
    files = [paths.train_manifest, paths.pretrained / "config.json"]
    if use_pretrained:
        files.append(paths.pretrained / "backbone.safetensors")
    for file in files:
        h.update(file.read_bytes())
    return f"finetune-{h.hexdigest()[:16]}"


def worker_config(params: FinetuneParams, paths: Paths, pre_config: dict, use_pretrained: bool,
                  kill_at_epoch: int | None = None, progress_file: Path | None = None) -> dict:
    """What every worker receives: the typed params, data locations and starting weights."""
    return {
        "params": params,
        "train_manifest": str(paths.train_manifest),
        "roots": {"real": str(paths.raw), "synthetic": str(paths.synthetic)},
        "backbone": pre_config["backbone"],
        "image_size": pre_config["image_size"],
        # the pretrain stage's filter; folders written before it chose one were resized bilinearly
        "resize": pre_config.get("resize", DEFAULT_RESIZE),
        "backbone_weights": str(paths.pretrained / "backbone.safetensors") if use_pretrained else None,
        "kill_at_epoch": kill_at_epoch,
        "progress_file": str(progress_file) if progress_file else None,
    }


def fit(params: FinetuneParams, paths: Paths, kill_at_epoch: int | None = None):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from tasks.progress import EpochProgress

    pre_config = json.loads((paths.pretrained / "config.json").read_text())
    use_pretrained = params.init_from_pretrain and pre_config.get("pretrained", False)
    init_ray()
    check_resources(params)
    name = run_name(params, paths, use_pretrained)
    run_dir = Path(ray_storage()) / name
    if (run_dir / "progress.jsonl").is_file():
        log.info("resuming Ray run %s from its last checkpoint (%s)", name, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=worker_config(params, paths, pre_config, use_pretrained, kill_at_epoch,
                                        run_dir / "progress.jsonl"),
        scaling_config=ScalingConfig(num_workers=params.num_workers, use_gpu=params.use_gpu,
                                     resources_per_worker={"CPU": params.cpus_per_worker}),
        run_config=RunConfig(
            name=name,
            storage_path=ray_storage(),
            failure_config=FailureConfig(max_failures=params.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    with EpochProgress(run_dir / "progress.jsonl", params.epochs, log):
        result = trainer.fit()
    return result


def check_resources(params: FinetuneParams) -> None:
    """Refuse a scaling config the local Ray instance can never satisfy (Ray would wait forever)."""
    import ray

    if os.environ.get("RAY_ADDRESS"):
        return  # a cluster may autoscale: let Ray wait for the resources
    total = ray.cluster_resources()
    need_cpu = params.num_workers * params.cpus_per_worker
    if need_cpu > total.get("CPU", 0):
        raise ValueError(f"finetune.num_workers x finetune.cpus_per_worker = {params.num_workers} x "
                         f"{params.cpus_per_worker} CPUs, but this machine's Ray has {total.get('CPU', 0):g}: "
                         "lower them in params/finetune.yaml, or set RAY_ADDRESS to use a cluster")
    if params.use_gpu and params.num_workers > total.get("GPU", 0):
        raise ValueError(f"finetune.use_gpu with {params.num_workers} workers needs as many GPUs; "
                         f"this machine's Ray has {total.get('GPU', 0):g}")
