import pytest

from tasks.params import SCHEMAS, ParamsError, apply_overrides, load_params, parse_overrides
from tests.conftest import REPO


@pytest.mark.parametrize("stage", list(SCHEMAS))
def test_shipped_params_files_are_valid(stage):
    params = load_params(stage, REPO / "params")
    assert isinstance(params, SCHEMAS[stage])


def test_every_stage_has_a_params_file_and_dvc_stage():
    import yaml

    from tasks.stage import PARAMS_OF

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert list(stages) == [*PARAMS_OF, *SCHEMAS]  # source (the data's listing) runs first
    for name, stage in stages.items():
        assert stage["cmd"] == f"mdpipe stage {name}"
        if name in PARAMS_OF:
            assert any(f"params/{PARAMS_OF[name]}.yaml" in p for p in stage["params"])
        else:
            assert {"params/" + name + ".yaml": None} in stage["params"]
        assert f"tasks/{name}.py" in stage["deps"]
        assert "${paths.metrics}/" + name + ".json" in stage["outs"]  # every stage's own metrics: cached
    # the one DVC metrics file: the run's headline, which `dvc metrics show` and `dvc exp show` display
    assert [name for name, stage in stages.items() if "metrics" in stage] == ["compress"]
    assert stages["compress"]["metrics"] == ["${paths.metrics}/summary.json"]


def test_unknown_key_names_file_and_field(tmp_path):
    (tmp_path / "finetune.yaml").write_text("epochs: 3\nepochz: 4\n")
    with pytest.raises(ParamsError) as err:
        load_params("finetune", tmp_path)
    assert "finetune.yaml" in str(err.value) and "epochz" in str(err.value)


def test_wrong_value_names_field(tmp_path):
    (tmp_path / "finetune.yaml").write_text("num_workers: 0\n")
    with pytest.raises(ParamsError, match="num_workers"):
        load_params("finetune", tmp_path)
    (tmp_path / "compress.yaml").write_text("quantize: int4\n")
    with pytest.raises(ParamsError, match="quantize"):
        load_params("compress", tmp_path)


def test_overrides_are_parsed_validated_and_written_keeping_comments(tmp_path):
    (tmp_path / "finetune.yaml").write_text("# keep me\nepochs: 3  # how long\nlr: 0.001\n")
    overrides = parse_overrides(["finetune.epochs=7", "finetune.use_gpu=true"])
    assert overrides == {"finetune": {"epochs": 7, "use_gpu": True}}
    apply_overrides(tmp_path, overrides)
    text = (tmp_path / "finetune.yaml").read_text()
    assert "# keep me" in text and "# how long" in text
    params = load_params("finetune", tmp_path)
    assert params.epochs == 7 and params.use_gpu is True and params.lr == 0.001
    with pytest.raises(ParamsError, match="epochs"):
        apply_overrides(tmp_path, parse_overrides(["finetune.epochs=-1"]))
    assert load_params("finetune", tmp_path).epochs == 7  # a rejected override changes nothing


@pytest.mark.parametrize("bad", ["finetune", "finetune.epochs", "nosuchstage.x=1"])
def test_malformed_overrides(bad):
    with pytest.raises(ParamsError):
        parse_overrides([bad])



def test_nested_override_reaches_into_a_mapping_and_keeps_its_other_keys(tmp_path):
    (tmp_path / "validate.yaml").write_text("severity:\n  decodable: warning\n")
    overrides = parse_overrides(["validate.severity.min_images_per_class=warning"])
    assert overrides == {"validate": {"severity": {"min_images_per_class": "warning"}}}
    apply_overrides(tmp_path, overrides)
    severity = load_params("validate", tmp_path).severity
    assert severity == {"decodable": "warning", "min_images_per_class": "warning"}
    with pytest.raises(ParamsError, match="unknown expectation"):
        apply_overrides(tmp_path, parse_overrides(["validate.severity.no_such_check=warning"]))
    with pytest.raises(ParamsError):
        parse_overrides(["validate.severity..x=1"])


def test_run_form_leads_with_quick_settings_and_descriptions_survive_html():
    """The Prefect UI renders descriptions as markdown: text in angle brackets would vanish."""
    import json

    from prefect.utilities.callables import parameter_schema

    from flows.pipeline import PipelineParams, QuickSettings, pipeline

    schema = parameter_schema(pipeline.fn).model_dump()
    assert list(schema["properties"])[:2] == ["quick", "params"]
    import re

    assert not re.findall(r"<[^<>]*>", json.dumps(schema))  # <domain> would render as an (empty) HTML tag
    params = QuickSettings(data_root="/x", holdout_domains=["b"], epochs=3).apply(PipelineParams.from_files(REPO / "params"))
    assert params.ingest.data_root == "/x" and params.ingest.holdout_domains == ["b"] and params.finetune.epochs == 3
    assert params.finetune.num_workers == load_params("finetune", REPO / "params").num_workers  # left empty: kept


def test_unknown_stage_is_a_one_line_error(capsys):
    from flows.cli import main

    assert main(["stage", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert "unknown stage 'nosuch'" in err and "source, ingest" in err and "Traceback" not in err


def test_profiles_are_checked_and_every_shipped_profile_is_valid(tmp_path):
    from tasks.params import load_profile, merged_params

    for file in sorted((REPO / "params/profiles").glob("*.yaml")):
        merged = merged_params(REPO / "params", load_profile(REPO / "params", file.stem))
        assert merged and all(isinstance(p, SCHEMAS[s]) for s, p in merged.items())
    with pytest.raises(ParamsError, match=r"profile 'nope'.*profiles: \[.*'demo'"):
        load_profile(REPO / "params", "nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("finetun:\n  epochs: 2\n")
    with pytest.raises(ParamsError, match="bad.yaml: unknown stage 'finetun'"):
        load_profile(REPO / "params", str(bad))
    bad.write_text("finetune:\n  epoch: 2\n")  # a wrong field: refused with the run's other checks
    with pytest.raises(ParamsError, match="epoch"):
        merged_params(REPO / "params", load_profile(REPO / "params", str(bad)))


def test_run_applies_a_profile_under_the_command_line_values(tmp_path):
    """`mdpipe run --profile P -S ...`: the profile lays over the files and -S over the profile; a wrong
    profile stops the run before anything is written."""
    import shutil

    from flows.cli import main

    ws = tmp_path / "ws"
    shutil.copytree(REPO / "params", ws / "params")
    shutil.copy(REPO / "paths.yaml", ws / "paths.yaml")
    from tasks.params import with_profile

    (ws / "params/profiles/mine.yaml").write_text("finetune:\n  epochs: 4\n  lr: 0.01\npretrain:\n  epochs: 2\n")
    assert with_profile(ws / "params", "mine", parse_overrides(["finetune.epochs=7", "evaluate.seed=3"])) == {
        "finetune": {"epochs": 7, "lr": 0.01}, "pretrain": {"epochs": 2}, "evaluate": {"seed": 3}}
    (ws / "params/profiles/mine.yaml").write_text("finetune:\n  epochs: 0\n")  # invalid: epochs >= 1
    before = {f.name: f.read_bytes() for f in (ws / "params").glob("*.yaml")}
    assert main(["--root", str(ws), "run", "--profile", "mine"]) == 2
    assert main(["--root", str(ws), "run", "--profile", "nope"]) == 2
    assert {f.name: f.read_bytes() for f in (ws / "params").glob("*.yaml")} == before
