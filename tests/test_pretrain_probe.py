"""Pretrain: the domain-aware Fourier view, SimCLR with it, the linear probe, and the stage on a tiny
manifest (resnet10t at 32x32, a few dozen images, one epoch)."""
import json

import numpy as np
import pandas as pd
import torch
from PIL import Image

from mdcore.synth.augment import fourier_domain_mix
from mdcore.models.model import create_backbone
from mdcore.eval.probe import linear_probe
from mdcore.train.contrastive import ContrastiveNet, contrastive_epoch, self_supervised
from tasks import pretrain
from tasks.params import PretrainParams
from tasks.paths import Paths


def test_fourier_mix_keeps_phase_and_only_mixes_across_domains():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 16, 16, generator=g) * 2 - 1
    same = fourier_domain_mix(x, torch.zeros(6, dtype=torch.long), g, p=1.0)
    assert torch.equal(same, x)  # one domain: nobody to mix with
    mixed = fourier_domain_mix(x, torch.tensor([0, 0, 0, 1, 1, 1]), g, p=1.0, strength=1.0)
    assert mixed.shape == x.shape and not torch.allclose(mixed, x)
    phase_in, phase_out = torch.fft.fft2(x).angle(), torch.fft.fft2(mixed).angle()
    assert torch.allclose(torch.cos(phase_in - phase_out).mean(), torch.tensor(1.0), atol=1e-3)
    assert torch.equal(fourier_domain_mix(x, torch.tensor([0, 0, 0, 1, 1, 1]), g, p=0.0), x)


def test_contrastive_epoch_with_domain_mixing():
    """SimCLR with domain mixing minimizes NT-Xent: the loss on the first step's views, measured again (lr 0)
    after a few epochs, is clearly below its value at the start and below log(2N - 1), the loss of an
    encoder that cannot tell a view's partner from the other 2N - 2 images (N = 8 per batch)."""
    import math

    torch.manual_seed(0)
    net = ContrastiveNet(create_backbone("test_resnet"), proj_dim=8)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    frozen = torch.optim.SGD(net.parameters(), lr=0.0)  # measures the loss without changing the weights
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    kw = dict(batch_size=8, seed=0, temperature=0.2, domains=torch.tensor([0, 1] * 8), fourier_mix_prob=0.5)
    first = contrastive_epoch(net, images, frozen, epoch=0, **kw)["ssl_loss"]  # epoch 0's views, untrained
    losses = [contrastive_epoch(net, images, opt, epoch=e, **kw)["ssl_loss"] for e in range(4)]
    assert np.isfinite(losses).all(), losses
    after = contrastive_epoch(net, images, frozen, epoch=0, **kw)["ssl_loss"]  # the same views, trained
    chance = math.log(2 * 8 - 1)
    # seed 0: 2.65 -> 1.74 (chance 2.71); over seeds 0-11 the trained loss stayed <= 2.45 and fell by >= 0.48
    assert after < first - 0.25 and after < chance - 0.15, (first, after, chance, losses)


def test_self_supervised_trains_the_given_backbone_in_place():
    """The loop the stage and the LODO bench share: the caller's backbone object is the one trained (the
    projector is dropped), every epoch is reported, and the same seed gives the same weights."""
    def run(seed_weights):
        torch.manual_seed(seed_weights)
        backbone = create_backbone("test_resnet")
        before = {k: v.clone() for k, v in backbone.state_dict().items()}
        seen = []
        history = self_supervised(backbone, images, input_norm="image", epochs=2, batch_size=8, lr=1e-3,
                                  weight_decay=0.0, seed=0, temperature=0.2, domains=torch.tensor([0, 1] * 8),
                                  fourier_mix_prob=0.5, on_epoch=lambda e, stats: seen.append(e))
        return backbone, before, history, seen

    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    backbone, before, history, seen = run(0)
    assert seen == [0, 1] and len(history) == 2 and all(np.isfinite(h["ssl_loss"]) for h in history)
    changed = [k for k, v in backbone.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert changed, "no weight of the given backbone changed"
    again, _, _, _ = run(0)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in backbone.state_dict().items())


def test_linear_probe_per_domain():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 90)
    x = np.eye(3)[y] * 3 + rng.normal(0, 0.3, (90, 3))
    out = linear_probe(x[:60], y[:60], x[60:], y[60:], ["a", "b", "c"] * 10)
    assert set(out["per_domain"]) == {"a", "b", "c"} and out["mean"] > 0.9


def tiny_workspace(tmp_path) -> Paths:
    rng = np.random.default_rng(0)
    rows = []
    for domain, split_of in (("d1", None), ("d2", None), ("held", "holdout")):
        for i in range(18):
            label = str(i % 3)
            path = f"{domain}/{label}/{i}.png"
            (tmp_path / "raw" / domain / label).mkdir(parents=True, exist_ok=True)
            pixels = (rng.random((32, 32, 3)) * 60 + int(label) * 80).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / "raw" / path)
            split = split_of or ("train" if i < 12 else "test")
            rows.append(dict(path=path, domain=domain, label=label, split=split, sha256=f"{domain}{i}", width=32,
                             height=32, mode="RGB", source="real", generator=""))
    pd.DataFrame(rows).to_csv(tmp_path / "train_manifest.csv", index=False)
    return Paths(tmp_path, {"raw": "raw", "synthetic": "synthetic", "train_manifest": "train_manifest.csv",
                            "pretrained": "pretrained"})


def test_pretrain_stage_reports_the_linear_probe_before_and_after(tmp_path):
    paths = tiny_workspace(tmp_path)
    params = PretrainParams(backbone="test_resnet", epochs=1, batch_size=12, threads=1)
    result = pretrain.run(params, paths)
    probe = result.metrics["linear_probe"]
    assert set(probe["per_domain"]) == {"d1", "d2", "held"}
    assert probe["per_domain"]["held"]["kind"] == "held-out"
    assert result.metrics["images"] == 24  # held-out images stay out unless include_holdout_unlabelled
    saved = json.loads((paths.pretrained / "probe.json").read_text())
    assert saved["before"]["per_domain"].keys() == saved["after"]["per_domain"].keys()
    assert "| held | held-out |" in (paths.pretrained / "probe.md").read_text()
    more = pretrain.run(params.model_copy(update={"include_holdout_unlabelled": True, "linear_probe": False}), paths)
    assert more.metrics["images"] == 42 and "linear_probe" not in more.metrics
