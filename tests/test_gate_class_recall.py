"""The promotion gate's worst-class recall rule: a challenger that keeps or raises a domain's accuracy while
one of its classes collapses is refused, with the domain and the fall in the reason; off or without figures
the gate compares accuracy only, as before; and the retrain flow's ``promote`` threads the figures from the
gate-split scoring and ``continual.max_class_recall_drop`` into the decision record."""
import shutil

import pandas as pd
import pytest

from mdcore.eval.promotion import decide
from tests.conftest import REPO

CHAMPION = {"a": 0.90, "b": 0.80}
CHAMPION_RECALL = {"a": 0.80, "b": 0.60}


def test_a_collapsed_class_blocks_a_challenger_whose_accuracy_rose():
    decision = decide(CHAMPION, {"a": 0.93, "b": 0.82}, champion_worst_recall=CHAMPION_RECALL,
                      candidate_worst_recall={"a": 0.0, "b": 0.60}, max_class_recall_drop=0.3)
    assert not decision.promote and decision.worse == [] and decision.worse_class_recall == ["a"]
    assert "worst-class recall fell on a 0.80 -> 0.00" in decision.reason and "0.3" in decision.reason
    assert decision.recall_deltas == pytest.approx({"a": -0.8, "b": 0.0})
    # the same challenger without the rule (or without figures) is promoted on accuracy, as before
    assert decide(CHAMPION, {"a": 0.93, "b": 0.82}, champion_worst_recall=CHAMPION_RECALL,
                  candidate_worst_recall={"a": 0.0, "b": 0.60}, max_class_recall_drop=None).promote
    assert decide(CHAMPION, {"a": 0.93, "b": 0.82}, max_class_recall_drop=0.3).promote


def test_a_fall_up_to_the_tolerance_passes_and_more_than_it_does_not():
    kw = {"champion_worst_recall": {"a": 1.0, "b": 0.6}, "max_class_recall_drop": 0.3}
    at_limit = decide(CHAMPION, CHAMPION, candidate_worst_recall={"a": 0.7, "b": 0.6}, **kw)
    assert at_limit.promote and "worst-class recall within 0.3" in at_limit.reason
    beyond = decide(CHAMPION, CHAMPION, candidate_worst_recall={"a": 1.0, "b": 0.29}, **kw)
    assert not beyond.promote and beyond.worse_class_recall == ["b"]


def test_accuracy_and_recall_reasons_are_both_given_and_missing_figures_are_skipped():
    both = decide(CHAMPION, {"a": 0.85, "b": 0.80}, champion_worst_recall=CHAMPION_RECALL,
                  candidate_worst_recall={"a": 0.80, "b": 0.10}, max_class_recall_drop=0.3)
    assert not both.promote and both.worse == ["a"] and both.worse_class_recall == ["b"]
    assert "worse on a -0.050" in both.reason and "b 0.60 -> 0.10" in both.reason
    # a domain with no class figure (None from JSON, NaN from a table) or new to the candidate is not compared
    skipped = decide(CHAMPION, {"a": 0.9, "b": 0.8, "new": 0.5}, champion_worst_recall={"a": None, "b": 0.6},
                     candidate_worst_recall={"a": 0.0, "b": float("nan"), "new": 0.0}, max_class_recall_drop=0.1)
    assert skipped.promote and skipped.recall_deltas == {}


def table(acc: dict, recall: dict) -> pd.DataFrame:
    """A ``per_domain_accuracy`` table as the gate scoring returns it."""
    return pd.DataFrame({"domain": list(acc), "kind": "seen", "images": 10, "accuracy": list(acc.values()),
                         "accuracy_unknown_domain": list(acc.values()), "worst_class": "3",
                         "worst_class_recall": [recall[d] for d in acc]})


@pytest.fixture
def gate_workspace(tmp_path):
    from mdcore.models.model import ModelConfig, MultiDomainModel, save_model

    shutil.copy(REPO / "paths.yaml", tmp_path / "paths.yaml")
    save_model(MultiDomainModel(ModelConfig("test_resnet", ["a", "b"], ["0", "1", "2", "3"], adapter_dim=8)),
               tmp_path / "models/finetuned")
    (tmp_path / "data").mkdir()
    (tmp_path / "data/train_manifest.csv").write_text("path,domain,label,split,sha256,width,height,mode,source,generator\n")
    return tmp_path


def test_promote_threads_the_gate_scoring_and_the_param_into_the_record(gate_workspace, monkeypatch):
    import flows.retrain as retrain

    scores = iter([table(CHAMPION, CHAMPION_RECALL),  # first model: no champion yet
                   table({"a": 0.95, "b": 0.80}, {"a": 0.0, "b": 0.6}), table(CHAMPION, CHAMPION_RECALL),
                   table({"a": 0.95, "b": 0.80}, {"a": 0.0, "b": 0.6}), table(CHAMPION, CHAMPION_RECALL)])
    monkeypatch.setattr(retrain, "per_domain_accuracy", lambda *a, **k: next(scores))
    first = retrain.promote.fn(root=str(gate_workspace))
    assert first["promote"] and first["max_class_recall_drop"] == 0.3  # the default: no params/continual.yaml
    refused = retrain.promote.fn(root=str(gate_workspace))
    assert not refused["promote"] and refused["status"] == "rejected" and refused["worse_class_recall"] == ["a"]
    assert "worst-class recall fell on a" in refused["reason"]
    assert refused["candidate_worst_class"]["a"] == {"class": "3", "recall": 0.0}
    assert refused["champion_worst_class"]["a"]["recall"] == 0.8
    (gate_workspace / "params").mkdir()
    shutil.copy(REPO / "params/continual.yaml", gate_workspace / "params/continual.yaml")
    from tasks.params import apply_overrides

    apply_overrides(gate_workspace / "params", {"continual": {"max_class_recall_drop": None}})
    off = retrain.promote.fn(root=str(gate_workspace))
    assert off["promote"] and off["max_class_recall_drop"] is None and off["recall_deltas"] == {}
