"""The finetune stage's Ray Train job: the training loop every worker runs, the workers it runs on (Ray
Train's, or one local process on an explicit device), and ``fit``, which launches it.

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
import time
from pathlib import Path

from tasks.params import FinetuneParams
from tasks.paths import Paths

log = logging.getLogger("mdpipe.finetune")


class RayWorker:
    """What the training loop needs from its runtime, under Ray Train: rank, world, one device per worker
    (GPU when ``use_gpu``), the checkpoint to resume from, DDP wrapping, and reporting."""

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
    """The same loop in this process on an explicit device (tests; one machine without Ray): rank 0 of 1;
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
    """Load data, build the model, resume if a checkpoint exists, train with DDP on a domain-balanced
    shard on ``worker.device``, report metrics and (rank 0) a checkpoint every epoch."""
    import torch

    from mdcore.accel import FastForward
    from mdcore.checkpoint import load_training_state
    from mdcore.lazy_images import BatchLoader
    from mdcore.sampler import domain_balanced_batches
    from mdcore.train import evaluate_split, finetune_epoch, training_view_batches
    from tasks.data import guard_holdout, load_split
    from tasks.model_setup import (build_method, build_model, build_optimizer, early_stopping, epoch_kwargs,
                                   needs_find_unused_parameters, on_epoch_start)

    p = FinetuneParams.model_validate(cfg["params"])
    rank, world = worker.rank, worker.world
    torch.set_num_threads(max(1, int(p.cpus_per_worker)))
    torch.manual_seed(p.seed)
    roots = {k: Path(v) for k, v in cfg["roots"].items()}
    stream = {"lazy": p.loader == "stream", "cache_dir": decoded_cache_dir() if p.decoded_cache else None}
    train, train_rows = load_split(cfg["train_manifest"], roots, cfg["image_size"], ("train",),
                                   synthetic=p.use_synthetic, **stream)
    val_set, val_rows = load_split(cfg["train_manifest"], roots, cfg["image_size"], ("val",), synthetic=False,
                                   domains=train.domain_names, classes=train.class_names, **stream)
    guard_holdout(cfg["train_manifest"], {"training": train_rows, "validation and selection": val_rows,
                                          "prototypes": train_rows})
    method = build_method(p)
    model = build_model(p, train, cfg["backbone"], cfg["image_size"], cfg.get("backbone_weights"), method=method)
    optimizer, scheduler = build_optimizer(p, model)
    extra = epoch_kwargs(p, train)  # once: it carries state across epochs (GroupDRO weights)
    start_epoch, history, attempt, best = 0, [], 0, Selection()
    checkpoint = worker.checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            start_epoch = load_training_state(folder, model, optimizer) + 1
            history = json.loads((Path(folder) / "history.json").read_text())
            best.load(Path(folder))
            _load_run_state(Path(folder), extra)
        attempt = history[-1].get("attempt", 0) + 1 if history else 1
        print(f"[finetune] rank {rank}: resumed from the checkpoint of epoch {start_epoch} (attempt {attempt})")
    device = worker.device
    fast = FastForward(model, p.precision, p.channels_last, device_type=device.type)
    if p.compile:
        fast = torch.compile(fast)
    ddp_model = worker.prepare(fast, needs_find_unused_parameters(p))
    optimizer_to(optimizer, device)  # a restored optimizer state was loaded before the model moved
    mix = p.domain_mix if isinstance(p.domain_mix, str) else _domain_weights(p.domain_mix, train.domain_names)
    stopper = early_stopping(p)
    for row in history:  # after a resume, replay the epochs already done
        stopper.step(row["val_acc"], row["epoch"] - 1)
    # stream: one loader for the run, its decoding processes kept across epochs (stopped at the end, or when
    # garbage-collected after an error)
    loader = BatchLoader(train.images, p.loader_workers if p.loader == "stream" else 0,
                         pin_memory=device.type == "cuda")
    for epoch in range(start_epoch, p.epochs):
        if cfg.get("kill_at_epoch") == epoch and attempt == 0 and rank == world - 1:
            _barrier(world)  # let rank 0 finish its checkpoint first
            print(f"[finetune] rank {rank}: injected failure (SIGKILL) before epoch {epoch + 1}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        elif cfg.get("kill_at_epoch") == epoch and attempt == 0:
            _barrier(world)
        t0 = time.perf_counter()
        scheduler.step(epoch)
        frozen = on_epoch_start(p, model, optimizer, epoch) or {}
        batches = domain_balanced_batches(train.domains, p.batch_size, rank=rank, world=world, epoch=epoch,
                                          seed=p.seed, mix=mix)
        stats = finetune_epoch(ddp_model, train, optimizer, batches, epoch=epoch, seed=p.seed, rank=rank,
                               label_smoothing=p.label_smoothing, device=device, method=method, loader=loader,
                               **extra)
        totals = _all_reduce_sum([stats["loss"] * stats["images"], stats["train_acc"] * stats["images"],
                                  stats["images"]], world, device)
        elapsed = time.perf_counter() - t0
        _average_buffers(model, world)  # per-domain normalization statistics: one value on every worker
        val = evaluate_split(model, val_set, [train.domain_names[d] for d in val_set.domains], 256, device=device)
        val_acc = val["per_domain"]
        method.end_epoch(model, epoch, val)
        best.step(model, epoch, val["acc"] if val_acc else epoch - 1e6)  # no val rows: the last epoch
        stop = stopper.step(sum(val_acc.values()) / max(len(val_acc), 1), epoch)  # same decision on every rank
        last = epoch == p.epochs - 1 or stop
        shipped = {}
        if last:  # what ships: the best training-domain-validation epoch, or the method's own (SWAD's average)
            if method.selects_checkpoint():
                best.restore(model)
                shipped = {"selected_epoch": best.epoch + 1}
            else:
                shipped = method.finalize(model, lambda: training_view_batches(
                    train, method, p.batch_size, seed=p.seed, epoch=p.epochs, generator_seed=p.seed + 1,
                    rank=rank, world=world, device=device))
                shipped["selected_epoch"] = "average"
            model.fit_prototypes(train.images, train.domains)
        metrics = {
            "epoch": epoch + 1,
            "attempt": attempt,
            "train_loss": totals[0] / totals[2],
            "train_acc": totals[1] / totals[2],
            "val_acc": sum(val_acc.values()) / max(len(val_acc), 1),
            "val_loss": val["loss"],
            "lr": optimizer.param_groups[-1]["lr"],
            "images_per_s": totals[2] / elapsed,
            **{f"val_domain_acc/{d}": a for d, a in val_acc.items()},
            **{k: v for k, v in stats.items() if k.startswith("aux/")},
            **{f"frozen/{k}": v for k, v in frozen.items() if isinstance(v, (int, float))},
            "early_stopped": stop,
            **{f"shipped/{k}": v for k, v in shipped.items()},
        }
        if last:
            metrics["weights_max_diff_across_workers"] = _weights_max_diff(model, world)
        _report(worker, metrics, history, model, optimizer, epoch, p.epochs, best, extra, cfg.get("progress_file"))
        if stop:
            break
    loader.close()


class Selection:
    """Keeps the weights of the epoch with the best training-domain validation accuracy (held-out and test
    numbers never enter), to restore at the end, after early stopping too; saved in every checkpoint."""

    FILE = "best_model.safetensors"

    def __init__(self):
        self.value, self.epoch, self.state = -float("inf"), -1, None

    def step(self, model, epoch: int, value: float) -> None:
        if value > self.value:
            self.value, self.epoch = value, epoch
            self.state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

    def restore(self, model) -> None:
        if self.state is not None:
            model.load_state_dict(self.state)

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        if self.state is not None:
            save_file({k: v.contiguous() for k, v in self.state.items()}, str(folder / self.FILE),
                      metadata={"epoch": str(self.epoch), "value": repr(self.value)})

    def load(self, folder: Path) -> None:
        from safetensors import safe_open
        from safetensors.torch import load_file

        file = folder / self.FILE
        if file.is_file():
            with safe_open(str(file), "pt") as f:
                meta = f.metadata()
            self.state, self.epoch, self.value = load_file(str(file)), int(meta["epoch"]), float(meta["value"])


RUN_STATE = "run_state.json"


def _load_run_state(folder: Path, extra: dict) -> None:
    """Per-run state beyond the weights (GroupDRO's domain weights, the curriculum's running losses)."""
    file = folder / RUN_STATE
    weighting = extra.get("domain_weighting")
    if weighting is not None and file.is_file():
        weighting.load_state(json.loads(file.read_text()).get("domain_weighting", {}))


def _domain_weights(mix: dict[str, float], domains: list[str]) -> dict[int, float]:
    unknown = sorted(set(mix) - set(domains))
    if unknown:
        raise ValueError(f"finetune.domain_mix names {unknown}, not training domains {domains}")
    return {domains.index(d): w for d, w in mix.items()}


def optimizer_to(optimizer, device) -> None:
    """Move every optimizer state tensor (AdamW moments) to ``device``, where the parameters now live."""
    import torch

    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and key != "step":
                state[key] = value.to(device)


def _barrier(world: int) -> None:
    import torch.distributed as dist

    if world > 1:
        dist.barrier()


def _all_reduce_sum(values: list[float], world: int, device=None) -> list[float]:
    """On the worker's device: NCCL (GPU workers) rejects CPU tensors."""
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(t)
    return t.tolist()


def _average_buffers(model, world: int) -> None:
    """Mean of every floating buffer (batch-norm running statistics, per-domain ones included) over workers."""
    import torch
    import torch.distributed as dist

    if world == 1:
        return
    with torch.no_grad():
        for buf in model.buffers():
            if buf.is_floating_point():
                dist.all_reduce(buf)
                buf.div_(world)


def _weights_max_diff(model, world: int) -> float:
    """Largest difference between any worker's parameters and rank 0's (0.0 when DDP kept them in sync)."""
    import torch
    import torch.distributed as dist

    if world == 1:
        return 0.0
    flat = torch.cat([p.detach().flatten().double() for p in model.parameters()])
    reference = flat.clone()
    dist.broadcast(reference, src=0)
    diff = (flat - reference).abs().max().reshape(1)
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return float(diff)


def _report(worker, metrics, history, model, optimizer, epoch, epochs, best: Selection, extra: dict,
            progress_file: str | None = None) -> None:
    from mdcore.checkpoint import save_training_state
    from mdcore.model import save_model

    if worker.rank != 0:
        worker.report(metrics, None)
        return
    history.append(metrics)
    if progress_file:  # the driver follows it: console lines and the Prefect progress artifact
        with open(progress_file, "a") as f:
            f.write(json.dumps({**metrics, "epochs": epochs}) + "\n")
    with tempfile.TemporaryDirectory() as tmp:
        save_training_state(tmp, model, optimizer, epoch, metrics)
        save_model(model, Path(tmp) / "model", extra={"epoch": epoch + 1,
                                                      "selected_epoch": metrics.get("shipped/selected_epoch")})
        (Path(tmp) / "history.json").write_text(json.dumps(history))
        best.save(Path(tmp))
        weighting = extra.get("domain_weighting")
        (Path(tmp) / RUN_STATE).write_text(json.dumps(
            {"domain_weighting": weighting.state() if weighting is not None else {}}))
        worker.report(metrics, tmp)


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
    runtime_env = {"worker_process_setup_hook": "tasks.finetune_ray.quiet_ray_logs"}
    # log_to_driver=False: Ray's own worker chatter (and transient warnings such as a resource request that
    # timed out on a busy machine) stays in Ray's log folder; progress comes from the progress file, and a
    # failed run's error carries the worker's traceback.
    if address:
        log.info("joining the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=False, runtime_env=runtime_env)
    else:  # "local": always a Ray of its own, never a stray `ray start` cluster another run may stop
        ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=True,
                 logging_level=logging.WARNING, runtime_env=runtime_env)


def quiet_ray_logs() -> None:
    """Runs in every Ray worker process: without the dashboard (not needed locally) the placement-group
    cleaner cannot reach the State API and logs a warning every second; nothing is wrong."""
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


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
    """What every worker receives: params, data locations and starting weights (all plain values)."""
    return {
        "params": params.model_dump(),
        "train_manifest": str(paths.train_manifest),
        "roots": {"real": str(paths.raw), "synthetic": str(paths.synthetic)},
        "backbone": pre_config["backbone"],
        "image_size": pre_config["image_size"],
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
