"""Under DDP (2 CPU processes, gloo), per-domain parts + freezing + gradual unfreezing + GroupDRO keep every
worker's weights identical through ``mdcore.train.fit`` (``find_unused_parameters`` when the config freezes)."""
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

        from mdcore.train import Runtime, fit
        from mdcore.train.setup import build_method, build_model, build_optimizer, fit_config
        from tasks.params import FinetuneParams
        from tests.test_methods_transfer import tiny_data

        class DDPRuntime(Runtime):
            def wrap(self, model):
                return DistributedDataParallel(model, find_unused_parameters=config.freezes)

        DDPRuntime.rank, DDPRuntime.world = rank, world
        torch.manual_seed(0)
        p = FinetuneParams(epochs=3, adapter_dim=8, batch_size=12, gradual_unfreeze_every=1, freeze_stages=1,
                           stage_adapters=[-2], domain_bn=True, head="moe", supcon_weight=0.1,
                           domain_weighting="groupdro", method="multidomain")
        data = tiny_data(24)
        method = build_method(p)
        model = build_model(p, data, "test_resnet", 32, method=method)
        optimizer, scheduler = build_optimizer(p, model)
        config = fit_config(p, data.domain_names)
        config.select = False
        fit(model, method, data, None, config, optimizer, scheduler, runtime=DDPRuntime("cpu"))
        extra = {"domain_weighting": method.weighting}
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
