"""Under DDP (2 CPU processes, gloo), per-domain parts + freezing + gradual unfreezing keep every
worker's weights identical, with ``find_unused_parameters`` from ``needs_find_unused_parameters``."""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from torch.nn.parallel import DistributedDataParallel

        from mdcore.sampler import domain_balanced_batches
        from mdcore.train import finetune_epoch
        from tasks.model_setup import (build_model, build_optimizer, epoch_kwargs, needs_find_unused_parameters,
                                       on_epoch_start)
        from tasks.params import FinetuneParams
        from tests.test_methods_transfer import tiny_data

        torch.manual_seed(0)
        p = FinetuneParams(epochs=3, adapter_dim=8, batch_size=12, gradual_unfreeze_every=1, freeze_stages=1,
                           stage_adapters=[-2], domain_bn=True, head="moe", supcon_weight=0.1,
                           domain_weighting="groupdro")
        data = tiny_data(24)
        model = build_model(p, data, "test_resnet", 32)
        optimizer, scheduler = build_optimizer(p, model)
        ddp = DistributedDataParallel(model, find_unused_parameters=needs_find_unused_parameters(p))
        extra = epoch_kwargs(p, data)
        for epoch in range(p.epochs):
            scheduler.step(epoch)
            on_epoch_start(p, model, optimizer, epoch)
            batches = domain_balanced_batches(data.domains, p.batch_size, rank=rank, world=world, epoch=epoch)
            finetune_epoch(ddp, data, optimizer, batches, epoch=epoch, seed=0, rank=rank, **extra)
        flat = torch.cat([t.detach().flatten() for t in model.parameters()])
        ref = flat.clone()
        dist.broadcast(ref, src=0)
        if rank == 1:
            torch.save({"diff": float((flat - ref).abs().max()), "q": extra["domain_weighting"].q}, out)
    finally:
        dist.destroy_process_group()


def test_workers_weights_stay_identical_with_freezing_and_per_domain_parts(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "result.pt")
    mp.spawn(_worker, args=(2, port, out), nprocs=2, join=True)
    result = torch.load(out, weights_only=True)
    assert result["diff"] == 0.0
    assert abs(float(result["q"].sum()) - 1.0) < 1e-5
