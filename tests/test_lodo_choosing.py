"""The LODO table that chooses a default leaves out the domains the demo reports as held out: its
*chooses* average is computed per seed over the other columns, and the all-column average only reports."""
from mdcore.eval import lodo


def cell(method, heldout, seed, acc):
    return {"method": method, "heldout": heldout, "seed": seed, "heldout_acc": acc, "oracle_heldout_acc": acc,
            "seen_acc": 0.9, "train_s": 1.0}


def test_choosing_average_excludes_the_demos_held_out_domain():
    # method b wins on every column but lowlight, where a wins by far: with lowlight a would be chosen
    accs = {"a": {"clean": 0.80, "ink": 0.70, "lowlight": 0.90}, "b": {"clean": 0.85, "ink": 0.75, "lowlight": 0.10}}
    cells = [cell(m, d, s, acc + 0.01 * s) for m, row in accs.items() for d, acc in row.items() for s in (0, 1, 2)]
    agg = lodo.aggregate(cells, choose_without=["lowlight", "not-in-this-dataset"])
    table = agg["table"]
    assert agg["choose_without"] == ["lowlight"]
    assert table["a"]["average"]["mean"] > table["b"]["average"]["mean"]  # the all-column average (reports)
    assert table["b"]["average_choosing"]["mean"] > table["a"]["average_choosing"]["mean"]
    assert abs(table["b"]["average_choosing"]["mean"] - 0.81) < 1e-9  # mean of (0.85, 0.75) + 0.01 x mean seed
    text = lodo.markdown({"aggregate": agg, "seeds": [0, 1, 2]}, "t")
    assert "avg without lowlight (chooses)" in text and "only reports" in text
    assert lodo.metrics({"aggregate": agg})["b"]["avg_heldout_acc_choosing"] == table["b"]["average_choosing"]["mean"]
    plain = lodo.aggregate(cells)
    assert "average_choosing" not in plain["table"]["a"] and "(chooses)" not in lodo.markdown({"aggregate": plain}, "t")
