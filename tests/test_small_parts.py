"""Synthesis, checkpoints, atomic writes, augmentations and losses."""
import numpy as np
import pytest
import torch

from mdcore.synth.augment import ssl_view, train_view
from mdcore.train.checkpoint import load_training_state, save_training_state
from mdcore.data.io import atomic_dir
from mdcore.models.losses import nt_xent
from mdcore.synth.fourier import find_scarce_domains, fourier_style_transfer, plan_targets
from mdcore.train.epoch import shard_batches


def test_fourier_transfer_keeps_content_and_takes_style():
    rng = np.random.default_rng(0)
    content = np.zeros((32, 32, 3), np.uint8) + 230
    content[8:24, 14:18] = 20  # a dark stroke on white
    style = (rng.random((32, 32, 3)) * 40 + np.array([20, 60, 30])).astype(np.uint8)  # dark green, noisy
    out = fourier_style_transfer(content, style, beta=0.1)
    assert out.shape == content.shape and out.dtype == np.uint8
    assert abs(out.mean() - style.mean()) < abs(content.mean() - style.mean()) / 3  # overall tone of the style
    stroke, paper = out[8:24, 14:18].mean(), out[:6].mean()
    assert stroke < paper - 10  # the stroke is still there


def test_scarce_domains_and_targets():
    assert find_scarce_domains({"a": 100, "b": 90, "c": 10}, 0.5) == ["c"]
    plan = plan_targets({("c", "0"): 3, ("c", "1"): 50}, ["c"], 40, ["0", "1", "2"])
    assert plan == {("c", "0"): 37, ("c", "2"): 40}


def test_checkpoint_restores_model_optimizer_and_epoch(tmp_path):
    """The shipped optimizer (mdcore.train.setup.build_optimizer: timm's AdamW with fused=True) really runs
    fused, steps as the reference (non-fused) AdamW does, and resumes from a checkpoint exactly: the step
    after a restore equals the step the uninterrupted run takes."""
    import copy

    from mdcore.data.images import ImageSet, to_float
    from mdcore.train.setup import build_model, build_optimizer
    from tasks.params import FinetuneParams

    g = torch.Generator().manual_seed(0)
    data = ImageSet(torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=g),
                    torch.randint(0, 3, (8,), generator=g), torch.tensor([0, 1] * 4), ["a", "b"], ["0", "1", "2"])
    p = FinetuneParams(method="erm", lr=1e-2, weight_decay=0.05, adapters=False, domain_bn=False)

    def fresh(seed):
        torch.manual_seed(seed)
        model = build_model(p, data, "test_resnet", 32)
        return model, build_optimizer(p, model)[0]

    def step(model, opt):
        model.train()
        loss = torch.nn.functional.cross_entropy(model(to_float(data.images), data.domains), data.labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    net, opt = fresh(0)
    assert opt.param_groups and all(group.get("fused") is True for group in opt.param_groups), \
        [group.get("fused") for group in opt.param_groups]
    # the reference: torch's for-loop AdamW over the same groups (same lr, betas, eps, weight decay)
    ref_net = copy.deepcopy(net)
    name_of = {id(t): n for n, t in net.named_parameters()}
    ref_params = dict(ref_net.named_parameters())
    ref_opt = torch.optim.AdamW([{**{k: v for k, v in group.items() if k not in ("params", "fused", "foreach")},
                                  "params": [ref_params[name_of[id(t)]] for t in group["params"]]}
                                 for group in opt.param_groups], fused=False, foreach=False)
    before = {n: t.detach().clone() for n, t in net.named_parameters()}
    for _ in range(2):
        step(net, opt)
        step(ref_net, ref_opt)
    moved = [n for n, t in net.named_parameters() if not torch.equal(t, before[n])]
    assert len(moved) == len(before)  # every parameter took the steps (none frozen here)
    for n, t in net.named_parameters():
        assert torch.allclose(t, ref_params[n], rtol=1e-4, atol=1e-5), n  # steps move ~1e-3

    save_training_state(tmp_path, net, opt, epoch=4)
    net2, opt2 = fresh(1)  # other weights and no optimizer state: all of it must come from the checkpoint
    assert load_training_state(tmp_path, net2, opt2)["epoch"] == 4
    assert all(torch.equal(v, net2.state_dict()[k]) for k, v in net.state_dict().items())
    assert all(group["fused"] is True for group in opt2.param_groups)
    for i, s1 in opt.state_dict()["state"].items():
        s2 = opt2.state_dict()["state"][i]
        assert torch.equal(s1["exp_avg"], s2["exp_avg"]) and torch.equal(s1["exp_avg_sq"], s2["exp_avg_sq"])
        assert float(s1["step"]) == float(s2["step"]) == 2.0
    step(net, opt)
    step(net2, opt2)
    for (n, a), b in zip(net.named_parameters(), net2.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-7), n


def test_atomic_dir_keeps_the_old_folder_on_failure(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "good.txt").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "good.txt").write_text("half")
            raise RuntimeError("boom")
    assert (target / "good.txt").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_shards_are_disjoint_and_cover_each_step():
    shards = [list(shard_batches(100, 20, rank=r, world=2, epoch=1, seed=0)) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 5
    seen = torch.cat([b for s in shards for b in s])
    assert len(seen) == len(set(seen.tolist())) == 100


def test_augmentations_keep_shape_and_vary_per_image():
    x = torch.zeros(4, 3, 32, 32).uniform_(-1, 1)[:1].repeat(4, 1, 1, 1)
    for view in (ssl_view, train_view):
        out = view(x, torch.Generator().manual_seed(0))
        assert out.shape == x.shape
        assert not torch.allclose(out[0], out[1])


def test_nt_xent_prefers_matching_views():
    z = torch.randn(8, 16)
    assert nt_xent(z, z + 0.01 * torch.randn_like(z)) < nt_xent(z, torch.randn(8, 16))


def test_epoch_progress_reports_complete_lines_only_and_skips_epochs_of_a_resumed_run(tmp_path):
    import json
    import logging

    from tasks.progress import EpochProgress

    row = lambda e: json.dumps({"epoch": e, "epochs": 3, "train_loss": 1.0, "train_acc": 0.5,  # noqa: E731
                                "val_acc": 0.5, "images_per_s": 10.0})
    file = tmp_path / "progress.jsonl"
    file.write_text(row(1) + "\n")  # from an earlier attempt
    progress = EpochProgress(file, 3, logging.getLogger("test"))
    with open(file, "a") as f:
        f.write(row(2) + "\n" + row(3)[:10])  # epoch 3 half written
    assert [r["epoch"] for r in progress.poll()] == [2]
    with open(file, "a") as f:
        f.write(row(3)[10:] + "\n")
    assert [r["epoch"] for r in progress.poll()] == [3]
    assert progress.poll() == [] and [r["epoch"] for r in progress.rows] == [2, 3]


def test_map_chunks_reports_progress_in_order_and_results_are_unchanged():
    from mdcore.data.pool import map_chunks

    seen = []
    out = map_chunks(_double, list(range(10)), chunk_size=3, progress=lambda done, total: seen.append((done, total)))
    assert out == [2 * i for i in range(10)]
    assert seen == [(3, 10), (6, 10), (9, 10), (10, 10)]


def _double(chunk):
    return [2 * i for i in chunk]


def test_images_decoded_on_demand_equal_the_in_memory_ones_with_loader_workers_and_a_disk_cache(tmp_path):
    import numpy as np
    import pandas as pd
    import torch
    from PIL import Image

    from mdcore.data.images import load_images
    from mdcore.data.lazy_images import LazyImages, batch_images

    rng = np.random.default_rng(0)
    rows = []
    for i in range(24):
        (tmp_path / "d" / "c").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 28, 3), dtype=np.uint8)).save(tmp_path / "d" / "c" / f"{i}.png")
        rows.append({"path": f"d/c/{i}.png", "domain": "d", "label": "c", "source": "real"})
    frame = pd.DataFrame(rows)
    memory = load_images(frame, {"real": tmp_path}, 16)
    lazy = load_images(frame, {"real": tmp_path}, 16, lazy=True, cache_dir=tmp_path / "cache")
    assert isinstance(lazy.images, LazyImages) and lazy.images.shape == memory.images.shape
    batches = [torch.tensor([3, 1, 7]), torch.tensor([0, 23]), torch.tensor([5])]
    for (idx, raw), want in zip(batch_images(lazy.images, batches, workers=2), batches):
        assert torch.equal(idx, want) and torch.equal(raw, memory.images[want])
    assert torch.equal(lazy.images[2:9], memory.images[2:9])
    # only what was indexed was decoded (rows 0-8 and 23), each once, then read back from the cache
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 10
    assert torch.equal(lazy.images[torch.tensor([23, 0])], memory.images[torch.tensor([23, 0])])
    assert torch.equal(lazy.subset(memory.labels == 0).images[0:4], memory.images[0:4])


def test_finetune_is_retried_only_on_transient_failures():
    import ray.exceptions
    from prefect.states import Failed

    from tasks.finetune import transient

    assert transient(None, None, Failed(data=ray.exceptions.ActorDiedError()))  # a lost worker: retry
    assert transient(None, None, Failed(data=ConnectionError("lost the head node")))
    assert not transient(None, None, Failed(data=ValueError("finetune.lr must be > 0")))  # fails at once


def test_the_ray_job_imports_without_prefect():
    """bench/gpu_check.py runs the finetune job on GPU machines that hold torch, timm and Ray alone: the job
    module must not need Prefect (the driver's progress reporter then reports to the console only)."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys; sys.modules['prefect'] = None\n"
            "import tasks.finetune_ray, tasks.progress\n"
            "assert not tasks.progress._prefect_run_active()\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_finetune_curves_are_written_in_a_git_repository_without_commits(tmp_path, monkeypatch):
    """``git init`` and a first run: the curves (and so the stage) must not need a commit."""
    import csv
    import json

    from dulwich.repo import Repo
    from tasks.finetune import write_live

    Repo.init(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    history = [{"epoch": 1, "train_loss": 1.5, "val_acc": 0.5, "method": "erm"},
               {"epoch": 2, "train_loss": 0.5, "val_acc": 0.75, "method": "erm"}]
    write_live(history, tmp_path / "live")
    with open(tmp_path / "live" / "plots" / "metrics" / "val_acc.tsv") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert [(int(r["step"]), float(r["val_acc"])) for r in rows] == [(0, 0.5), (1, 0.75)]
    assert json.loads((tmp_path / "live" / "metrics.json").read_text())["train_loss"] == 0.5
    assert not (tmp_path / ".dvc").exists()  # the curves never initialise DVC in the user's repository
