"""Typed params: params.yaml validates; unknown keys, wrong types and bad overrides fail naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from pipeline.core.params import ParamsError, apply_overrides, read_params_file, validate_section
from pipeline.orchestrate.cli import main
from pipeline.orchestrate.stage_loader import validate_all
from stages.decode import Params as DecodeParams

REPO = Path(__file__).resolve().parents[3]


def test_repo_params_file_validates():
    models = validate_all(REPO / "params.yaml")
    assert {"paths", "demo_data", "decode"} <= set(models)
    assert models["decode"].num_frames == 16


def test_unknown_key_fails_naming_it():
    with pytest.raises(ParamsError, match=r"decode\.num_framez: unknown key"):
        validate_section({"decode": {"num_framez": 8}}, "decode", DecodeParams)


def test_wrong_type_fails_naming_it():
    with pytest.raises(ParamsError, match=r"decode\.num_frames: .*integer.*\(got 'many'\)"):
        validate_section({"decode": {"num_frames": "many"}}, "decode", DecodeParams)


def test_constraint_violation_names_key():
    with pytest.raises(ParamsError, match=r"decode\.val_fraction"):
        validate_section({"decode": {"val_fraction": 1.5}}, "decode", DecodeParams)


def test_overrides_parse_values_as_yaml():
    doc = apply_overrides({"decode": {"stride": 2}}, ["decode.stride=4", "decode.target_fps=null",
                                                      "decode.backend=ffmpeg"])
    params = validate_section(doc, "decode", DecodeParams)
    assert (params.stride, params.target_fps, params.backend) == (4, None, "ffmpeg")
    with pytest.raises(ParamsError, match="section.key=value"):
        apply_overrides({}, ["stride=4"])


def test_params_are_frozen():
    params = DecodeParams()
    with pytest.raises(ValidationError, match="frozen"):
        params.stride = 3  # type: ignore[misc]


def test_cli_rejects_bad_param_before_work(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["decode", "--set", "decode.stride=zero"])
    err = capsys.readouterr().err
    assert code == 2 and "decode.stride" in err
    assert not (tmp_path / "data").exists() and not (tmp_path / "mlflow.db").exists()


def test_unknown_section_fails(tmp_path, capsys):
    bad = tmp_path / "params.yaml"
    bad.write_text("decod:\n  stride: 2\n")
    with pytest.raises(ParamsError, match="unknown params section.*decod"):
        validate_all(bad)
    assert main(["check-params", "--params", str(bad)]) == 2


def test_missing_params_file_is_an_error(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        read_params_file(tmp_path / "nope.yaml")


def test_stage_help_lists_every_param_with_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["decode", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name, field in DecodeParams.model_fields.items():
        assert f"decode.{name} (" in out and f"default {field.default!r}" in out
    assert "paths.clips" in out


def test_top_level_help_lists_stages(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "decode" in out and "demo_data" in out
