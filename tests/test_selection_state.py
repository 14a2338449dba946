"""What the finetune stage ships and resumes: the best training-domain-validation epoch's weights and
the per-run state (GroupDRO weights) survive a checkpoint round trip."""
import json

import torch

from mdcore.transfer import DomainWeighting
from tasks.finetune_ray import RUN_STATE, Selection, _load_run_state


def test_selection_keeps_the_best_epoch_and_survives_a_checkpoint(tmp_path):
    model = torch.nn.Linear(3, 2)
    best = Selection()
    for epoch, val in enumerate([0.5, 0.8, 0.7]):
        with torch.no_grad():
            model.weight.fill_(float(epoch))
        best.step(model, epoch, val)
    assert best.epoch == 1
    best.save(tmp_path)
    again = Selection()
    again.load(tmp_path)
    assert again.epoch == 1 and again.value == 0.8
    again.restore(model)  # the last epoch's weights (2.0) give way to the selected ones (1.0)
    assert torch.all(model.weight == 1.0)


def test_groupdro_weights_are_restored_on_resume(tmp_path):
    trained = DomainWeighting(3, "groupdro", eta=1.0)
    trained.update(torch.tensor([0.1, 2.0, 0.5]), torch.tensor([0, 1, 2]))
    (tmp_path / RUN_STATE).write_text(json.dumps({"domain_weighting": trained.state()}))
    fresh = DomainWeighting(3, "groupdro", eta=1.0)
    assert not torch.allclose(fresh.q, trained.q)
    _load_run_state(tmp_path, {"domain_weighting": fresh})
    assert torch.allclose(fresh.q, trained.q) and int(fresh.q.argmax()) == 1
