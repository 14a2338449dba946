"""The one training loop, ``mdcore.train.fit``: every registered method trains through it, and a run
stopped after any epoch and resumed from its checkpoint ships what an uninterrupted run ships (SWAD's
weight sums, the optimizer, the selection and the method's state are all in the checkpoint)."""
import pytest
import torch

from mdcore.data.images import ImageSet
from mdcore.methods import create_method, list_methods
from mdcore.train import Callback, FitConfig, fit
from mdcore.train.checkpoint import load_training_state, save_training_state
from mdcore.train.setup import build_method, build_model, build_optimizer, fit_config, without_unhosted_parts
from tasks.params import FinetuneParams

CLASSES = ["0", "1", "2", "3"]


def tiny_sets(n_train=36, n_val=12, seed=0):
    g = torch.Generator().manual_seed(seed)

    def make(n):
        labels = torch.arange(n) % 4
        images = torch.randint(0, 60, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
        for i, label in enumerate(labels.tolist()):  # a learnable cue per class: a bright band
            images[i, label % 3, 8 * label : 8 * label + 8, :] += 150
        return ImageSet(images, labels, torch.tensor([0, 1, 2] * (n // 3)), ["a", "b", "c"], CLASSES)

    return make(n_train), make(n_val)


def setup(method="multidomain+randconv+linedraw+swad", epochs=3, **kw):
    torch.manual_seed(0)
    p = without_unhosted_parts(FinetuneParams(method=method, epochs=epochs, batch_size=12, adapter_dim=8, lr=0.004,
                                              **kw))
    train, val = tiny_sets()
    method_obj = build_method(p)
    model = build_model(p, train, "test_resnet", 32, method=method_obj)
    optimizer, scheduler = build_optimizer(p, model)
    return p, train, val, method_obj, model, optimizer, scheduler


class Interrupt(Exception):
    pass


class SaveEveryEpoch(Callback):
    """Writes a full checkpoint after every epoch; raises before epoch ``stop_before`` (a killed worker)."""

    def __init__(self, folder, stop_before=None):
        self.folder, self.stop_before = folder, stop_before

    def on_epoch_start(self, epoch):
        if epoch == self.stop_before:
            raise Interrupt

    def on_epoch_end(self, epoch, metrics, save):
        save(self.folder / f"epoch{epoch}")


def run(tmp, stop_before=None, resume_from=None, **kw):
    p, train, val, method, model, optimizer, scheduler = setup(**kw)
    try:
        result = fit(model, method, train, val, fit_config(p, train.domain_names), optimizer, scheduler,
                     callbacks=[SaveEveryEpoch(tmp, stop_before)], resume_from=resume_from)
    except Interrupt:
        return None, model, optimizer
    return result, model, optimizer


@pytest.mark.parametrize("killed_before", [1, 2])  # after the first epoch, and before the last (of 3)
def test_default_method_resumed_after_a_kill_ships_the_same_weights(tmp_path, killed_before):
    """SWAD, the default method's weight average, survives a restart: its sums are in the checkpoint."""
    full, reference, _ = run(tmp_path / "full")
    assert full.shipped["selected_epoch"] == "average" and full.shipped["swad_averaged_steps"] > 0
    interrupted, _, _ = run(tmp_path / "cut", stop_before=killed_before)
    assert interrupted is None
    resumed, model, _ = run(tmp_path / "again", resume_from=tmp_path / "cut" / f"epoch{killed_before - 1}")
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]  # the restored history, then the rest
    assert resumed.shipped == full.shipped
    got, want = model.state_dict(), reference.state_dict()
    assert got.keys() == want.keys()
    worst = max(float((got[k].double() - want[k].double()).abs().max()) for k in want if want[k].numel())
    assert worst <= 1e-6, f"resumed weights differ from the uninterrupted run by {worst}"


def test_restored_optimizer_state_follows_its_parameters_device(tmp_path):
    """A checkpoint written on the CPU and restored into an optimizer whose parameters live elsewhere (the
    ``meta`` device stands for a GPU) puts every state tensor there, ``step`` included: fused or capturable
    AdamW on CUDA rejects a CPU ``step``. ``fit`` restores only after moving the model to its device."""
    p, train, val, method, model, optimizer, scheduler = setup(method="erm", epochs=1)
    assert all(g.get("fused") for g in optimizer.param_groups)  # the shipped optimizer
    fit(model, method, train, val, fit_config(p, train.domain_names), optimizer, scheduler,
        callbacks=[SaveEveryEpoch(tmp_path)])
    with torch.device("meta"):
        fresh = build_model(p, train, "test_resnet", 32)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), capturable=True)  # fused AdamW has no meta kernels
    load_training_state(tmp_path / "epoch0", fresh, fresh_opt)
    placed = [(k, v.device.type) for state in fresh_opt.state.values() for k, v in state.items()]
    assert len(placed) == 3 * len(list(fresh.parameters()))
    assert all(device == "meta" for _, device in placed), placed


def test_swad_keeps_a_frozen_stages_batch_norm_statistics(tmp_path):
    """Recomputing batch-norm statistics for SWAD's average must not reset the frozen stages' layers (they
    stay in eval mode, so nothing would re-estimate them)."""
    p, train, val, method, model, optimizer, scheduler = setup(method="swad", epochs=2, freeze_stages=2,
                                                               domain_bn=False)
    norms = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():  # statistics as pretrained weights bring them, not the reset values 0 and 1
        for m in norms:
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    before = {id(m): (m.running_mean.clone(), m.running_var.clone()) for m in norms}
    result = fit(model, method, train, val, fit_config(p, train.domain_names), optimizer, scheduler)
    assert result.shipped["selected_epoch"] == "average"
    frozen = model.frozen_norms
    assert frozen, "freeze_stages=2 should freeze some batch-norm layers"
    for m in frozen:
        mean, var = before[id(m)]
        assert torch.equal(m.running_mean, mean) and torch.equal(m.running_var, var)
    trained = [m for m in norms if all(m is not f for f in frozen)]
    assert any(not torch.equal(m.running_mean, before[id(m)][0]) for m in trained)  # those were recomputed


@pytest.mark.parametrize("name", [n for n in list_methods()])
def test_every_registered_method_trains_through_fit(name):
    """One epoch of each method (``distill`` towards a teacher) through the loop: the loss is finite and
    the trainable weights move."""
    torch.manual_seed(0)
    p = without_unhosted_parts(FinetuneParams(method=name if name != "distill" else "erm", adapter_dim=8,
                                              batch_size=12, epochs=1))
    train, val = tiny_sets()
    method = create_method(name)
    model = build_model(p, train, "test_resnet", 32, method=method)
    if name == "distill":
        method.teacher = build_model(p, train, "test_resnet", 32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer, scheduler = build_optimizer(p, model)
    result = fit(model, method, train, val, FitConfig(epochs=1, batch_size=12), optimizer, scheduler)
    row = result.history[-1]
    assert row["train_loss"] == row["train_loss"] and row["train_loss"] < 1e3
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items() if v.is_floating_point())
    if name == "distill":
        assert row["aux/kd"] > 0
    if name == "groupdro":
        q = method.weighting.q
        assert abs(float(q.sum()) - 1) < 1e-5 and not torch.allclose(q, torch.full_like(q, 1 / 3))


def test_groupdro_weights_survive_a_checkpoint(tmp_path):
    trained = create_method("groupdro", {"groupdro_eta": 1.0})
    trained.bind(torch.tensor([0, 1, 2]), 3)
    trained.weighting.update(torch.tensor([0.1, 2.0, 0.5]), torch.tensor([0, 1, 2]))
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    save_training_state(tmp_path, model, opt, 0, method_state=trained.state_dict())
    fresh = create_method("groupdro", {"groupdro_eta": 1.0})
    fresh.bind(torch.tensor([0, 1, 2]), 3)
    fresh.load_state_dict(load_training_state(tmp_path, model, opt)["method"])
    assert torch.allclose(fresh.weighting.q, trained.weighting.q) and int(fresh.weighting.q.argmax()) == 1
