"""The continual experiment's report: R and GEM metrics averaged over seeds per arm, gate counts, the
last-arrival comparison, and the warning under 3 seeds (plain functions over cell results)."""
import numpy as np
import pytest

from flows.continual import aggregate, markdown, metrics


def arm(drop: float) -> dict:
    from mdcore.continual import gem_metrics

    R = [[0.9, 0.2], [0.9 - drop, 0.8]]
    steps = [{"train_s": 2.0, "gate_pass": drop < 0.02, "replay_images": 3, "past_images": 60}]
    return {"R": R, "steps": steps, "metrics": gem_metrics(R, [0.1, 0.1])}


def cell(seed: int, drop: float) -> dict:
    return {"seed": seed, "order": ["a", "b"], "arms": {"replay": arm(drop), "naive": arm(3 * drop)},
            "full_retrain": {"row": [0.9, 0.85], "train_s": 20.0},
            "add_domain": {"acc": 0.8, "full_acc": 0.85, "gap": -0.05, "train_s": 2.0, "time_share": 0.1,
                           "gate_pass": drop < 0.02},
            "add_to_champion": {"acc": 0.84 - drop, "full_acc": 0.85, "gap": -0.01 - drop, "train_s": 2.0,
                                "time_share": 0.1, "gate_pass": drop <= 0.01, "champion_row": [0.9, 0.2],
                                "full_retrain_gate_pass": drop < 0.03,
                                "row": [0.9 - drop, 0.84 - drop]},
            "few_shot": {"k": 10, "images": 100, "acc": 0.7, "before_acc": 0.2, "full_acc": 0.85,
                         "recovered": 0.5 / 0.65, "train_s": 1.0, "gate_pass": True},
            "test_time_norm": {"acc": 0.5, "recovered": 0.3 / 0.65, "s": 0.1}}


def test_aggregate_averages_seeds_per_arm_and_reports_the_gate():
    cells = [cell(0, 0.01), cell(1, 0.03), cell(2, 0.02)]
    agg = aggregate(cells)
    assert agg["arms"]["replay"]["BWT"]["mean"] == pytest.approx(-0.02)
    assert agg["arms"]["naive"]["BWT"]["mean"] == pytest.approx(-0.06)
    assert agg["arms"]["replay"]["BWT"]["std"] == pytest.approx(np.std([0.01, 0.03, 0.02], ddof=1))
    assert agg["arms"]["replay"]["gate_pass"] == [1] and agg["add_domain"]["gate_pass"] == 1
    summary = {"dataset": "digits", "order": ["a", "b"], "seeds": [0, 1, 2], "aggregate": agg, "cells_run": 3,
               "cells_cached": 0, "wall_s": 1.0,
               "config": {"method": "multidomain", "epochs": 2, "add_epochs": 1, "replay_strategy": "reservoir",
                          "replay_fraction": 0.05, "replay_per_batch": 4, "batch_size": 8, "few_shot_k": 10,
                          "tolerance": 0.02}}
    text = markdown(summary)
    assert "| replay | 84.0 ± 0.5 | **-2.0 ± 1.0** |" in text and "Fewer than 3 seeds" not in text
    assert metrics(summary)["few_shot"]["recovered"] == pytest.approx(0.5 / 0.65)
    assert agg["add_to_champion"]["gate_pass"] == 1
    assert "passes it in 2/3 seeds" in text
    assert agg["add_to_champion"]["old_mean_after"]["mean"] == pytest.approx(0.88)
    assert "| added to a champion trained on the other domains at once (+ replay) | 82.0 ± 1.0 | -3.0 ± 1.0 |" in text
    summary["aggregate"] = aggregate(cells[:2])
    assert "Fewer than 3 seeds" in markdown(summary)


def test_validation_after_the_last_arrival_is_aggregated_and_reported():
    cells = [cell(0, 0.01), cell(1, 0.03), cell(2, 0.02)]
    for c in cells:
        c["arms"]["replay"]["steps"][-1] |= {"val_before": {"a": 0.9}, "val_after": {"a": 0.8, "b": 0.7}}
        c["add_to_champion"] |= {"val_before": {"a": 0.95}, "val_after": {"a": 0.95, "b": 0.6 + c["seed"] / 10}}
    v = aggregate(cells)["validation"]
    assert v["sequence"]["old_mean"]["mean"] == pytest.approx(0.8)
    assert v["sequence"]["old_worst_drop"]["mean"] == pytest.approx(0.1)
    assert v["champion"]["new"]["mean"] == pytest.approx(0.7) and v["champion"]["old_worst_drop"]["mean"] == 0
    assert aggregate([cell(0, 0.01)])["validation"] == {}
    summary = {"dataset": "digits", "order": ["a", "b"], "seeds": [0, 1, 2], "aggregate": aggregate(cells),
               "cells_run": 3, "cells_cached": 0, "wall_s": 1.0,
               "config": {"method": "multidomain", "epochs": 2, "add_epochs": 1, "replay_strategy": "reservoir",
                          "replay_fraction": 0.05, "replay_per_batch": 4, "batch_size": 8, "few_shot_k": 10,
                          "tolerance": 0.02}}
    assert "| added to a champion trained at once | 95.0 ± 0.0 | 95.0 ± 0.0 |" in markdown(summary)
