"""Warm start of the retrain flow: the champion learns the training rows it has not seen plus a replay
buffer of those it has; a domain it does not know joins with parts copied from the nearest known one; the
gate scores the candidate and the record carries the forgetting report."""
import json
import shutil

import pandas as pd
import pytest
import torch

from tests.conftest import REPO

OLD = ["clean", "ink", "phone"]


def _workspace(tmp_path, domain_bn=True):
    from mdcore.data.builtin import BuiltinSpec, materialize
    from mdcore.data.images import load_images, to_float
    from mdcore.data.io import atomic_write_text
    from mdcore.data.manifest import build_manifest, class_names, manifest_csv
    from mdcore.models.model import ModelConfig, MultiDomainModel, save_model

    ws = tmp_path / "ws"
    ws.mkdir()
    shutil.copy(REPO / "paths.yaml", ws / "paths.yaml")
    shutil.copytree(REPO / "params", ws / "params")
    materialize(ws / "data/raw", seed=0, spec=BuiltinSpec(limit=160))
    frame = build_manifest(ws / "data/raw", gate_fraction=0.2, workers=1)
    atomic_write_text(ws / "data/train_manifest.csv", manifest_csv(frame))
    torch.manual_seed(0)
    model = MultiDomainModel(ModelConfig("test_resnet", OLD, class_names(frame), domain_bn=domain_bn, adapter_dim=8))
    old_train = frame[(frame["split"] == "train") & frame["domain"].isin(OLD)]
    data = load_images(old_train, {"real": ws / "data/raw"}, 32, OLD)
    model.fit_prototypes(to_float(data.images), data.domains)
    save_model(model, ws / "registry/champion")
    (ws / "registry/champion/trained_on.json").write_text(json.dumps(sorted(old_train["sha256"])))
    (ws / "registry/champion/champion.json").write_text(json.dumps({"id": "first", "status": "promoted"}))
    return ws, frame


def test_warm_start_adds_the_new_domain_with_replay_and_the_gate_reports_forgetting(tmp_path):
    from flows.retrain import promote
    from flows.warm_start import warm_start
    from mdcore.continual import replay_budget
    from mdcore.models.model import load_model
    from tasks.params import ContinualParams
    from tasks.paths import load_paths

    ws, frame = _workspace(tmp_path)
    paths = load_paths(ws)
    params = ContinualParams(epochs=2, batch_size=16, replay_fraction=0.25, replay_per_batch=4, replay_strategy="hardest",
                             warmup_epochs=0, replay_kd_weight=1.0, new_domain="joint")
    result = warm_start(paths, params, ws / "cand")
    new = frame[(frame["split"] == "train") & (frame["domain"] == "lowlight")]
    past = frame[(frame["split"] == "train") & frame["domain"].isin(OLD)]
    assert result["new_images"] == len(new) and result["past_images"] == len(past)
    assert result["replay_images"] == replay_budget(len(past), 0.25)
    assert list(result["new_domains"]) == ["lowlight"] and result["new_domains"]["lowlight"]["init_from"] in OLD
    # every step saw new images topped up with replay, over the new data only (not a full retrain)
    assert result["images_seen"] == 2 * (len(new) // 12) * 16
    cand = load_model(ws / "cand")
    assert cand.config.domains == [*OLD, "lowlight"]
    assert set(json.loads((ws / "cand/trained_on.json").read_text())) == set(past["sha256"]) | set(new["sha256"])
    assert not torch.equal(cand.state_dict()["head.weight"], load_model(ws / "registry/champion").state_dict()["head.weight"])

    record = promote.fn(root=str(ws), candidate=str(ws / "cand"), lineage={"trained_by": "warm start"})
    assert set(record["forgetting"]["per_domain"]) == set(OLD) and record["forgetting"]["new_domains"] == ["lowlight"]
    kept = ws / "registry/models" / record["id"]
    assert (kept / "trained_on.json").is_file() and json.loads((kept / "lineage.json").read_text())["trained_by"] == "warm start"
    # nothing new since: the warm start has nothing to do (the retrain flow then runs the pipeline)
    if record["promote"]:
        assert "skipped" in warm_start(paths, params, ws / "cand2")


@pytest.mark.parametrize("domain_bn", [True, False])
def test_warm_start_parts_mode_leaves_the_known_domains_exactly_as_they_were(tmp_path, domain_bn):
    """new_domain: parts: only the new domain's own parts learn; every known domain's answers are unchanged
    bit for bit, so the gate cannot fail on them; so are the known domains' routing prototypes (unknown-domain
    routing) and, without domain batch-norm, the shared batch-norm statistics; the new domain's parts did
    learn."""
    from flows.warm_start import warm_start
    from mdcore.data.images import load_images, to_float
    from mdcore.models.model import load_model
    from tasks.params import ContinualParams
    from tasks.paths import load_paths

    ws, frame = _workspace(tmp_path, domain_bn)
    params = ContinualParams(epochs=3, batch_size=16, new_domain="parts", parts_lr=0.01, parts_epochs=2,
                             warmup_epochs=0)
    result = warm_start(load_paths(ws), params, ws / "cand")
    assert result["mode"] == "parts" and result["replay_images"] == 0
    new = frame[(frame["split"] == "train") & (frame["domain"] == "lowlight")]
    assert result["images_seen"] == 2 * len(new)  # its own images only
    champion, cand = load_model(ws / "registry/champion").eval(), load_model(ws / "cand").eval()
    test = load_images(frame[frame["split"] == "test"], {"real": ws / "data/raw"}, 32, cand.config.domains)
    known = test.domains < len(OLD)
    with torch.no_grad():
        before = champion(to_float(test.images[known]), test.domains[known])
        after = cand(to_float(test.images[known]), test.domains[known])
    assert torch.equal(before, after)
    assert torch.equal(cand.prototypes[: len(OLD)], champion.prototypes)  # routing of unknown domains: known rows kept
    old_state, new_state = champion.state_dict(), cand.state_dict()
    shared = [k for k in old_state if k.startswith("backbone.") and "running_" in k and new_state[k].shape == old_state[k].shape]
    assert bool(shared) != domain_bn  # plain batch-norm layers: shared by every domain
    assert all(torch.equal(old_state[k], new_state[k]) for k in shared)  # no statistics drift
    new_row = cand.config.domains.index("lowlight")
    init_row = OLD.index(result["new_domains"]["lowlight"]["init_from"])
    if domain_bn:
        bn = next(m for m in cand.modules() if type(m).__name__ == "DomainBatchNorm2d")
        assert not torch.equal(bn.weight[new_row], bn.weight[init_row])  # copied from there, then trained
    learned, copied = cand.adapters[new_row].state_dict(), cand.adapters[init_row].state_dict()
    assert any(not torch.equal(learned[k], copied[k]) for k in learned)


def test_step_mode_is_parts_only_when_every_new_real_row_is_of_a_new_domain():
    from flows.warm_start import step_mode

    rows = pd.DataFrame({"domain": ["site_b", "site_b", "phone"], "source": ["real", "real", "synthetic"]})
    assert step_mode(rows, ["site_b"], "parts")[0] == "parts"  # regenerated synthetic rows do not count
    mode, why = step_mode(pd.DataFrame({"domain": ["site_b", "ink"], "source": ["real", "real"]}), ["site_b"], "parts")
    assert mode == "joint" and "['ink']" in why
    assert step_mode(rows, [], "parts")[0] == "joint"  # no new domain
    assert step_mode(rows, ["site_b"], "joint") == ("joint", "new_domain: joint")


def test_continual_params_file_is_valid_and_names_bad_fields(tmp_path):
    from tasks.params import ContinualParams, ParamsError, load_params

    assert isinstance(load_params("continual", REPO / "params"), ContinualParams)
    (tmp_path / "continual.yaml").write_text("replay_strategy: newest\n")
    try:
        load_params("continual", tmp_path)
    except ParamsError as e:
        assert "continual.yaml" in str(e) and "replay_strategy" in str(e)
    else:
        raise AssertionError("an unknown replay strategy was accepted")


def test_accept_domain_adds_a_named_folder_to_the_validated_domains(tmp_path):
    from flows.retrain import accept_domains
    from tasks.params import load_params

    shutil.copy(REPO / "paths.yaml", tmp_path / "paths.yaml")
    shutil.copytree(REPO / "params", tmp_path / "params")
    profile = tmp_path / "registry/data_profiles/builtin"
    profile.mkdir(parents=True)
    (profile / "current.json").write_text(json.dumps({"domains": {"clean": {}, "ink": {}}}))
    assert accept_domains(str(tmp_path), ["site_b"]) == ["clean", "ink", "site_b"]
    assert load_params("validate", tmp_path / "params").known_domains == ["clean", "ink", "site_b"]
