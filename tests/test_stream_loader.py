"""finetune.loader=stream: one BatchLoader per run whose decoding processes live across epochs, giving
exactly the batches of the in-memory path every epoch (also after an epoch left early)."""
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from mdcore.data.images import load_images
from mdcore.data.lazy_images import BatchLoader, LazyImages
from mdcore.data.sampler import domain_balanced_batches


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("tree")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(30):
        folder = root / f"d{i % 3}" / "c"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        rows.append({"path": f"d{i % 3}/c/{i}.png", "domain": f"d{i % 3}", "label": "c", "source": "real"})
    frame = pd.DataFrame(rows)
    return load_images(frame, {"real": root}, 12), load_images(frame, {"real": root}, 12, lazy=True)


def _pids(loader: BatchLoader) -> list[int]:
    return [w.pid for w in loader._loader._iterator._workers]


def test_workers_persist_across_epochs_with_the_memory_paths_batches(sets):
    memory, lazy = sets
    assert isinstance(lazy.images, LazyImages)
    plain = BatchLoader(memory.images, workers=2)  # in memory: indexed directly, no processes
    assert plain._loader is None
    with BatchLoader(lazy.images, workers=2) as loader:
        pids = None
        for epoch in range(3):
            batches = list(domain_balanced_batches(lazy.domains, 6, epoch=epoch, seed=0))
            got, want = list(loader(batches)), list(plain(batches))
            assert len(got) == len(want) == len(batches) == 5
            for (idx, raw), (midx, mraw), b in zip(got, want, batches):
                assert torch.equal(idx, b) and torch.equal(midx, b) and torch.equal(raw, mraw)
            if pids is None:
                pids = _pids(loader)
            assert _pids(loader) == pids  # the same decoding processes every epoch
        # an epoch left early (an error in the step): the next epoch still gets exactly its own batches
        for _ in loader(batches):
            break
        nxt = list(domain_balanced_batches(lazy.domains, 6, epoch=3, seed=0))
        assert [torch.equal(raw, memory.images[b]) for (_, raw), b in zip(loader(nxt), nxt)] == [True] * 5
        workers = list(loader._loader._iterator._workers)
    assert not any(w.is_alive() for w in workers)  # close() stopped them


def test_train_epoch_trains_the_same_with_a_persistent_loader(sets):
    """Two epochs through a persistent stream loader give the same weights as the in-memory path."""
    from mdcore.models.model import create_backbone
    from mdcore.methods import create_method
    from mdcore.train.epoch import train_epoch

    memory, lazy = sets
    results, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: more threads only spin (slow on a shared machine)
    for data, workers in ((memory, 0), (lazy, 1)):
        torch.manual_seed(0)
        net = _Net(create_backbone("test_resnet"))
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        with BatchLoader(data.images, workers=workers) as loader:
            for epoch in range(2):
                batches = domain_balanced_batches(data.domains, 6, epoch=epoch, seed=0)
                train_epoch(net, data, opt, batches, create_method("multidomain"), epoch=epoch, seed=0, loader=loader)
        results.append(torch.cat([p.detach().flatten() for p in net.parameters()]))
    torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1])


class _Net(torch.nn.Module):
    def __init__(self, backbone):
        super().__init__()
        self.backbone, self.head = backbone, torch.nn.Linear(backbone.num_features, 2)

    def forward(self, x, domains=None, return_outputs=False):
        return self.head(self.backbone(x))
