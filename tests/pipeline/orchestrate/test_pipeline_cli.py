"""The flow's parameters as Prefect shows them (enumerations with descriptions), and `mam2 pipeline`,
which runs the flow and prints why a run failed: the failed stage and its own error, not "Failed"."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

# Prefect reads PREFECT_HOME when it is imported: keep its files out of the user's home.
os.environ.setdefault("PREFECT_HOME", str(Path(tempfile.gettempdir()) / "mam2-test-prefect"))

from prefect.utilities.callables import parameter_schema  # noqa: E402

from pipeline.core.registry import STAGES  # noqa: E402
from pipeline.orchestrate import flows  # noqa: E402
from pipeline.orchestrate.pipeline_cli import main, parse_params  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
ERROR = ("stage decode failed (exit code 1):\nmam2 decode: error: 4 of 4 videos could not be decoded:\n"
         "  a.mp4: too short")


def test_stage_choices_are_the_registry_and_the_stages_dvc_yaml_expands():
    dvc_names = flows.pipeline_stages(flows.read_dvc_stages(REPO))
    assert set(flows.STAGE_CHOICES) == set(STAGES) | set(dvc_names)
    assert "pseudo_labels@motion_gt" in flows.STAGE_CHOICES and "densify@clips" in flows.STAGE_CHOICES


def test_deployment_parameters_are_enumerations_with_descriptions():
    schema = flows.mam2_flow.parameters.model_dump_for_openapi()["properties"]
    assert schema == parameter_schema(flows.mam2_flow).model_dump_for_openapi()["properties"]
    for name in ("first_stage", "last_stage"):
        (choices,) = [option["enum"] for option in schema[name]["anyOf"] if "enum" in option]
        assert choices == list(flows.STAGE_CHOICES)
        assert {"type": "null"} in schema[name]["anyOf"], "empty: the whole DAG"
    assert schema["dvc_mode"]["enum"] == ["commit", "repro"] and schema["dvc_mode"]["default"] == "commit"
    for name, field in flows.FlowParams.model_fields.items():
        assert schema[name]["description"] == field.description, name
    assert "repro: dvc repro per stage" in schema["dvc_mode"]["description"]


def test_params_are_read_as_prefect_reads_them():
    assert parse_params(["last_stage=decode", "shards=2", "dask_address=null", "params_file=a=b.yaml"]) == {
        "last_stage": "decode", "shards": 2, "dask_address": None, "params_file": "a=b.yaml"}


def test_invalid_params_are_named_before_anything_runs(monkeypatch, capsys):
    monkeypatch.setattr(flows, "mam2_flow", lambda **_: pytest.fail("must not run"))
    assert main(["-p", "last_stage=finetun"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mam2 pipeline: invalid params:\n  flow.last_stage: ") and "'finetune'" in err
    assert main(["-p", "dvc_mode=fast"]) == 2 and "flow.dvc_mode" in capsys.readouterr().err
    assert main(["-p", "shards"]) == 2 and "expected KEY=VALUE" in capsys.readouterr().err


def test_a_failed_run_in_this_process_prints_the_stage_and_its_error(monkeypatch, capsys):
    def failing_flow(**params):
        assert params == {"last_stage": "decode", "retries": 0}
        raise flows.PipelineFailed(ERROR)

    monkeypatch.setattr(flows, "mam2_flow", failing_flow)
    assert main(["-p", "last_stage=decode", "-p", "retries=0"]) == 1
    assert capsys.readouterr().err == f"mam2 pipeline: error: {ERROR}\n"


def test_a_failed_deployment_run_prints_the_reason_from_its_state(monkeypatch, capsys):
    import prefect.deployments
    from prefect.states import Failed

    calls = []

    def run_deployment(name, parameters, timeout):
        calls.append((name, parameters, timeout))
        state = Failed(message=f"Flow run encountered an exception: PipelineFailed: {ERROR}")
        return SimpleNamespace(name="brave-fox", id="1234", state=state)

    monkeypatch.setattr(prefect.deployments, "run_deployment", run_deployment)
    monkeypatch.setattr(flows, "prefect_api_url", lambda: "http://127.0.0.1:4200/api")
    assert main(["--deployment", "-p", "retries=0"]) == 1
    assert calls == [("mam2/full", {"retries": 0}, None)], "waits for the run to end"
    err = capsys.readouterr().err
    assert f"flow run brave-fox (1234) ended Failed: {ERROR}\n" in err
    assert "encountered an exception" not in err

    monkeypatch.setattr(flows, "prefect_api_url", lambda: None)
    assert main(["--deployment"]) == 2 and "PREFECT_API_URL is not set" in capsys.readouterr().err
