"""The three doors that set parameters (the CLI's -S, the Prefect run form, DVC's file:key syntax) merge onto
params/*.yaml as they are, and a run that fails its pre-run checks leaves every params file byte-identical."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import yaml

from tasks.params import ParamsError, load_params, params_kept_on_failure, parse_overrides

REPO = Path(__file__).resolve().parents[1]


def _workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    ws.mkdir()
    shutil.copytree(REPO / "params", ws / "params")
    shutil.copy(REPO / "paths.yaml", ws / "paths.yaml")
    return ws


def _digest(params_dir: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(params_dir.glob("*.yaml"))}


def _tree(root: Path, domains=("a", "b"), size=8) -> Path:
    from PIL import Image

    for d in domains:
        for c in ("x", "y"):
            (root / d / c).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (size, size), (40 * i, 0, 0)).save(root / d / c / f"{i}.png")
    return root


@pytest.mark.parametrize("items, expected", [
    (["finetune.epochs=3"], {"finetune": {"epochs": 3}}),
    (["params/finetune.yaml:epochs=3"], {"finetune": {"epochs": 3}}),
    (["finetune.yaml:epochs=3"], {"finetune": {"epochs": 3}}),
    (["params/validate.yaml:severity.decodable=critical"], {"validate": {"severity": {"decodable": "critical"}}}),
])
def test_one_override_syntax_and_dvcs(items, expected):
    assert parse_overrides(items) == expected
    assert parse_overrides(items, default_stage=next(iter(expected))) == expected


def test_a_one_stage_command_takes_bare_keys_and_refuses_other_stages():
    assert parse_overrides(["epochs=3"], default_stage="finetune") == {"finetune": {"epochs": 3}}
    with pytest.raises(ParamsError, match="sets finetune params only"):
        parse_overrides(["pretrain.epochs=3"], default_stage="finetune")
    with pytest.raises(ParamsError, match="not a params file"):
        parse_overrides(["params/nosuch.yaml:x=1"])
    with pytest.raises(ParamsError, match="expected STAGE.FIELD=VALUE"):
        parse_overrides(["epochs=3"])


def test_run_form_applies_only_the_fields_changed_onto_the_files_as_they_are(tmp_path):
    """The form was opened (deployment made) before the files changed; the user changed only epochs."""
    from flows.pipeline import PipelineParams, QuickSettings, form_parameters, run_params
    from tasks.params import apply_overrides

    ws = _workspace(tmp_path)
    data = _tree(tmp_path / "tree")
    apply_overrides(ws / "params", {"ingest": {"data_root": str(data), "holdout_domains": ["b"]},
                                    "finetune": {"lr": 0.0007}})
    form = form_parameters(str(ws))
    apply_overrides(ws / "params", {"finetune": {"weight_decay": 0.01}})  # after the form opened
    files_before = {s: load_params(s, ws / "params").model_dump() for s in form["params"]}

    submitted = PipelineParams.model_validate(form["params"])
    submitted.finetune = submitted.finetune.model_copy(update={"epochs": 3})
    quick = QuickSettings.model_validate(form["quick"])
    params = run_params(quick, submitted, ws / "params", form_defaults=form["params"])

    assert params.finetune.epochs == 3
    after = params.model_dump(by_alias=True)
    for stage, values in files_before.items():
        for key, value in values.items():
            if (stage, key) != ("finetune", "epochs"):
                assert after[stage][key] == value, (stage, key)
    assert params.finetune.weight_decay == 0.01 and params.ingest.data_root == str(data)


def test_quick_data_root_acts_like_dash_dash_data(tmp_path):
    from flows.pipeline import PipelineParams, QuickSettings

    ws = _workspace(tmp_path)
    data = _tree(tmp_path / "tree")
    base = PipelineParams.from_files(ws / "params")
    assert base.ingest.holdout_domains == ["lowlight"]
    params = QuickSettings(data_root=str(data)).apply(base, ws)
    assert params.ingest.data_root == str(data.resolve()) and params.ingest.holdout_domains == []
    glyphs = QuickSettings(data_root="glyphs").apply(PipelineParams.from_files(ws / "params"), ws)
    assert glyphs.ingest.data_root is None and glyphs.ingest.builtin == "glyphs"
    assert glyphs.ingest.holdout_domains == ["outline"]


@pytest.mark.parametrize("argv, message", [
    (["run", "--data", "/nonexistent/tree"], "ingest.data_root: /nonexistent/tree is not a folder"),
    (["run", "-S", "pretrain.backbone=resnet_nonexistent"], "'resnet_nonexistent' is not a timm model"),
    (["run", "-S", "pretrain.backbone_weights=/missing.safetensors"], "/missing.safetensors is not a file"),
    (["run", "--holdout", "nosuch"], "['nosuch'] not in the built-in digits"),
    (["run", "-S", "pretrain.backbone=convnext_atto", "-S", "finetune.domain_bn=true"], "cannot be hosted by backbone 'convnext_atto'"),
    (["run", "--data", "TREE", "--holdout", "a", "b"], "holds out every domain"),
    (["stage", "pretrain", "-S", "backbone_weights=/missing.safetensors"], "/missing.safetensors is not a file"),
    (["stage", "finetune", "-S", "params/finetune.yaml:epochs=0"], "epochs"),
    (["run"], "not in a Git repository, where DVC records each stage"),
])
def test_a_run_that_fails_its_checks_leaves_every_params_file_byte_identical(tmp_path, capsys, argv, message):
    from flows.cli import main

    ws = _workspace(tmp_path)
    argv = [str(_tree(tmp_path / "tree")) if a == "TREE" else a for a in argv]
    before = _digest(ws / "params")
    assert main(["--root", str(ws), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert _digest(ws / "params") == before


def test_params_put_back_when_the_run_fails_after_writing_them(tmp_path):
    from tasks.params import apply_overrides

    ws = _workspace(tmp_path)
    before = _digest(ws / "params")
    with pytest.raises(RuntimeError, match="stage failed"):
        with params_kept_on_failure(ws / "params"):
            apply_overrides(ws / "params", {"finetune": {"epochs": 2}, "ingest": {"seed": 5}})
            assert _digest(ws / "params") != before
            raise RuntimeError("stage failed")
    assert _digest(ws / "params") == before
    with params_kept_on_failure(ws / "params"):  # success keeps what ran, for DVC
        apply_overrides(ws / "params", {"finetune": {"epochs": 2}})
    assert load_params("finetune", ws / "params").epochs == 2


def test_params_key_shows_value_description_and_file(tmp_path, capsys):
    from flows.cli import main

    ws = _workspace(tmp_path)
    assert main(["--root", str(ws), "params", "finetune.epochs"]) == 0
    out = capsys.readouterr().out
    value = yaml.safe_load((ws / "params" / "finetune.yaml").read_text())["epochs"]
    assert f"finetune.epochs = {value}" in out and "Fine-tuning epochs" in out
    assert str(ws / "params" / "finetune.yaml") in out
    assert main(["--root", str(ws), "params", "finetune.no_such_key"]) == 2


def test_a_tree_of_large_images_is_named_when_the_model_trains_small(tmp_path, caplog):
    from tasks.preflight import warn_large_images

    data = _tree(tmp_path / "tree", size=256)
    rels = [p.relative_to(data).as_posix() for p in data.rglob("*.png")]
    with caplog.at_level("WARNING", logger="mdpipe"):
        assert warn_large_images(data, rels, image_size=32) == 256
    assert "trains at 32 px" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="mdpipe"):
        warn_large_images(data, rels, image_size=128)
    assert "trains at" not in caplog.text


def test_the_flow_checks_what_the_run_form_sends_before_writing_any_params_file(tmp_path):
    """The UI's door: the flow itself (not only the CLI) refuses a bad quick setting with files untouched."""
    from flows.pipeline import QuickSettings, pipeline

    ws = _workspace(tmp_path)
    before = _digest(ws / "params")
    with pytest.raises(ParamsError, match="ingest.data_root: .*nonexistent is not a folder"):
        pipeline(quick=QuickSettings(data_root=str(tmp_path / "nonexistent"), epochs=2), root=str(ws))
    assert _digest(ws / "params") == before
