"""Champion lineage and rollback: the gate's decision is kept with every challenger (a rejected one with its
reason), the champion record links run, data, code and params, and rollback puts an earlier champion back;
through the retrain flow's own ``promote`` task and the ``mdpipe champion`` command."""
import json
import shutil

import pytest

from tests.conftest import REPO


@pytest.fixture(scope="module")
def scored_workspace(tmp_path_factory):
    from mdcore.data.builtin import BuiltinSpec, materialize
    from mdcore.data.io import atomic_write_text
    from mdcore.data.manifest import build_manifest, class_names, manifest_csv
    from mdcore.models.model import ModelConfig, MultiDomainModel, save_model

    ws = tmp_path_factory.mktemp("champion")
    shutil.copy(REPO / "paths.yaml", ws / "paths.yaml")
    materialize(ws / "data/raw", seed=0, spec=BuiltinSpec(limit=60))
    frame = build_manifest(ws / "data/raw", gate_fraction=0.3, workers=1)
    atomic_write_text(ws / "data/train_manifest.csv", manifest_csv(frame))
    model = MultiDomainModel(ModelConfig("test_resnet", sorted(frame["domain"].unique()), class_names(frame)))
    save_model(model, ws / "models/finetuned")
    return ws


def test_rejected_challenger_is_kept_and_rollback_restores_a_champion(scored_workspace):
    from flows.champion import RegistryError, list_models, rollback, show
    from flows.retrain import champion_dir, promote

    ws = scored_workspace
    lineage = {"run_id": "run-1", "dataset_version": "dv1", "code_version": "abc", "params": {"finetune": {"lr": 1}}}
    first = promote.fn(root=str(ws), lineage=lineage)
    assert first["promote"] and first["status"] == "promoted"
    champ = show(ws / "registry")
    assert champ["id"] == first["id"] and champ["dataset_version"] == "dv1" and champ["run_id"] == "run-1"
    weights = (champion_dir(ws) / "model.safetensors").read_bytes()
    # a gate that demands a full point of improvement on every domain rejects the same model
    second = promote.fn(root=str(ws), tolerance=-1.0, lineage=lineage | {"run_id": "run-2"})
    assert not second["promote"] and second["status"] == "rejected" and "worse on" in second["reason"]
    assert second["parent"] == first["id"]
    assert show(ws / "registry")["id"] == first["id"]  # the champion did not move
    kept = ws / "registry/models" / second["id"]
    assert (kept / "model.safetensors").is_file()
    assert json.loads((kept / "lineage.json").read_text())["reason"] == second["reason"]
    third = promote.fn(root=str(ws), lineage=lineage | {"run_id": "run-3"})
    assert show(ws / "registry")["id"] == third["id"]
    records = list_models(ws / "registry")
    assert [r["status"] for r in records] == ["promoted", "rejected", "promoted"]
    assert [r["current"] for r in records] == [False, False, True]
    back = rollback(ws / "registry", first["id"])
    assert back["rolled_back_from"] == third["id"] and show(ws / "registry")["id"] == first["id"]
    assert (champion_dir(ws) / "model.safetensors").read_bytes() == weights
    with pytest.raises(RegistryError, match="rejected"):
        rollback(ws / "registry", second["id"])
    with pytest.raises(RegistryError, match="no model 'nope'"):
        show(ws / "registry", "nope")


def test_champion_command_lists_shows_and_rolls_back(scored_workspace, capsys):
    from flows.cli import main
    from flows.champion import list_models

    ws = scored_workspace
    records = list_models(ws / "registry")
    assert main(["--root", str(ws), "champion", "list"]) == 0
    out = capsys.readouterr().out
    assert all(r["id"] in out for r in records) and "rejected" in out
    promoted = [r["id"] for r in records if r["status"] == "promoted"]
    assert main(["--root", str(ws), "champion", "rollback", promoted[-1]]) == 0
    assert main(["--root", str(ws), "champion", "show"]) == 0
    assert json.loads(capsys.readouterr().out.split("\n", 1)[1])["id"] == promoted[-1]
    assert main(["--root", str(ws), "champion", "rollback", "missing-id"]) == 2
    assert "no model 'missing-id'" in capsys.readouterr().err


def test_parts_steps_in_a_row_follows_the_champion_lineage(tmp_path):
    """The retrain flow's full_retrain_after_parts counts champions in a row made by parts steps, back
    through each record's parent; a pipeline-trained or joint-step champion ends the run."""
    from flows.champion import CHAMPION_RECORD, LINEAGE, parts_steps_in_a_row

    registry = tmp_path / "registry"
    assert parts_steps_in_a_row(registry) == 0  # no champion yet

    def record(model_id, parent, trained_by, mode=None):
        rec = {"id": model_id, "parent": parent, "trained_by": trained_by, "status": "promoted"}
        if mode:
            rec["warm_start"] = {"mode": mode}
        (registry / "models" / model_id).mkdir(parents=True)
        (registry / "models" / model_id / LINEAGE).write_text(json.dumps(rec))
        return rec

    record("a", None, "pipeline")
    record("b", "a", "warm start", "joint")
    record("c", "b", "warm start", "parts")
    record("d", "c", "warm start", "parts")
    (registry / "champion").mkdir(parents=True)
    for champion, expected in (("d", 2), ("c", 1), ("b", 0), ("a", 0)):
        (registry / "champion" / CHAMPION_RECORD).write_text((registry / "models" / champion / LINEAGE).read_text())
        assert parts_steps_in_a_row(registry) == expected, champion
