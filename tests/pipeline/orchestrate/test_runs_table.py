"""`mam2 runs`: the table shows the store's runs newest first, with parents, objectives and key
metrics, filters by stage and count; and a torchrun rank other than 0 opens no MLflow run."""

from __future__ import annotations

import logging
import time

import pytest

from pipeline.core.mlflow_runs import mlflow_run
from pipeline.orchestrate.runs_table import fetch_runs, format_table, key_metrics, main
from stages.decode import Params as DecodeParams


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A real SQLite MLflow store: a flow run with decode and two pretrain children, and a run
    from the CLI without parent."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.setenv("MAM2_MLFLOW", "1")
        patch.delenv("MAM2_PARENT_RUN_ID", raising=False)
        params = DecodeParams()
        with mlflow_run("pipeline", params, tags={"objective": "mam2"}) as parent:
            patch.setenv("MAM2_PARENT_RUN_ID", parent.run_id)
            with mlflow_run("decode", params, tags={"objective": "mam2"}) as run:
                run.log_metrics({"data/clips": 40, "data/videos_skipped": 1})
            for objective, loss in (("mam2", 0.5), ("videomae", 0.75)):
                time.sleep(0.01)  # distinct start times order the table
                with mlflow_run("pretrain", params, tags={"objective": objective}) as run:
                    run.log_metrics({"train/loss": loss + 1}, step=1)
                    run.log_metrics({"train/loss": loss, "train/lr": 1e-4}, step=2)
            parent.log_metrics({"flow/seconds": 12.5})
        patch.delenv("MAM2_PARENT_RUN_ID")
        with mlflow_run("decode", params):
            pass
        yield {"uri": uri, "parent": parent.run_id}


def test_rows_are_newest_first_with_parents_tags_and_last_metric_values(store):
    rows = fetch_runs(uri=store["uri"])
    assert [r.stage for r in rows] == ["decode", "pretrain", "pretrain", "decode", "pipeline"]
    assert [r.parent_id for r in rows] == ["", store["parent"], store["parent"], store["parent"], ""]
    assert [r.objective for r in rows] == ["", "videomae", "mam2", "mam2", "mam2"]
    assert rows[1].metrics["train/loss"] == 0.75 and rows[2].metrics["train/loss"] == 0.5
    assert all(r.status == "FINISHED" and r.seconds is not None and r.seconds >= 0 for r in rows)


def test_filters_by_stage_and_count(store):
    assert [r.objective for r in fetch_runs(stage="pretrain", uri=store["uri"])] == ["videomae", "mam2"]
    assert len(fetch_runs(last=2, uri=store["uri"])) == 2
    assert fetch_runs(stage="refine", uri=store["uri"]) == []


def test_key_metrics_prefer_validation_then_loss_then_counts():
    metrics = {"train/lr": 1.0, "data/clips": 2.0, "train/loss": 3.0, "val/top1": 4.0, "x": 5.0}
    assert key_metrics(metrics) == ["val/top1", "train/loss", "data/clips"]


def test_table_text_and_metric_columns(store, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    assert main(["--stage", "pretrain", "--metric", "train/loss", "--metric", "val/top1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["started", "run", "parent", "stage", "status", "time", "objective",
                                "train/loss", "val/top1"]
    assert [line.split()[-3:] for line in lines[1:]] == [["videomae", "0.75", "-"], ["mam2", "0.5", "-"]]
    assert all(store["parent"][:8] in line for line in lines[1:])
    table = format_table(fetch_runs(stage="decode", uri=store["uri"]))
    assert "data/clips=40 data/videos_skipped=1" in table


def test_missing_store_prints_no_runs_and_creates_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'none.db'}")
    assert main(["--last", "3"]) == 0
    assert "no runs" in capsys.readouterr().err and not (tmp_path / "none.db").exists()


def test_only_rank_zero_opens_a_run(store, tmp_path, monkeypatch, make_video):
    from pipeline.orchestrate.cli import main as mam2_main

    make_video("raw/v.mp4", num_frames=12)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    monkeypatch.setenv("MAM2_MLFLOW", "1")
    monkeypatch.delenv("MAM2_PARENT_RUN_ID", raising=False)
    argv = ["--set", "paths.raw=raw", "--set", "decode.workers=0", "--set", "decode.num_frames=4",
            "--set", "decode.store_size=32", "--set", "pretrain.objective=videomae"]
    before = len(fetch_runs(uri=store["uri"]))
    root_level = logging.getLogger().level
    try:
        monkeypatch.setenv("RANK", "1")
        assert mam2_main(["decode", *argv, "--set", "paths.clips=rank1.zarr"]) == 0
        assert len(fetch_runs(uri=store["uri"])) == before, "rank 1 must not open a run"
        monkeypatch.setenv("RANK", "0")
        assert mam2_main(["decode", *argv, "--set", "paths.clips=rank0.zarr"]) == 0
    finally:
        logging.getLogger().setLevel(root_level)
    newest = fetch_runs(last=1, uri=store["uri"])[0]
    assert newest.stage == "decode" and newest.objective == "videomae"
    assert newest.metrics["data/clips"] == 2
    assert (tmp_path / "rank1.zarr").exists() and (tmp_path / "rank0.zarr").exists()


def test_each_stage_shows_its_headline_numbers_beside_their_baselines():
    from pipeline.orchestrate.runs_table import headline_text

    finetune = {"val/top1": 0.5, "val/top5": 0.875, "val/acc_zoom_in": 1.0, "val/acc_rotate_cw": 0.0,
                "train/loss": 1.25, "data/classes": 8}
    assert headline_text("finetune", finetune) == "top1=0.5  top5=0.875  train_loss=1.25"
    assert headline_text("finetune", {**finetune, "val/top1_baseline": 0.125}).startswith(
        "top1=0.5 (vs 0.125)  top5=0.875")
    refine = {"val/clips/before/flow/cycle_consistent_fraction": 0.55,
              "val/clips/after/flow/cycle_consistent_fraction": 0.66,
              "val/motion_gt/before/flow/epe": 1.362, "val/motion_gt/after/flow/epe": 1.304,
              "val/motion_gt/before/tracks_first/delta_avg": 0.2235,
              "val/motion_gt/after/tracks_first/delta_avg": 0.2293}
    assert headline_text("refine", refine) == "motion_gt_epe=1.362->1.304  motion_gt_delta_avg=0.2235->0.2293"
    pretrain = {"train/loss": 4.79, "train/loss_appearance": 4.04, "train/loss_motion": 0.75,
                "train/appearance_acc": 0.116, "train/appearance_acc_baseline": 0.08,
                "train/motion_mse_baseline": 1.0, "train/lr": 1e-4}
    assert headline_text("pretrain", pretrain) == ("loss=4.79  loss_appearance=4.04  appearance_acc=0.116 "
                                                   "(vs 0.08)  motion_mse=0.75 (vs 1)")
    tokenizer = {"val/psnr": 16.8, "val/baseline_psnr": 13.5, "val/codebook_usage": 0.95, "train/loss": 1}
    assert headline_text("tokenizer", tokenizer) == "psnr=16.8 (vs 13.5)  codebook_usage=0.95"
    motion = {"val/flow_epe": 0.9, "val/flow_epe_zero_motion": 2.5, "val/track_delta_avg": 0.4,
              "val/track_delta_avg_zero_motion": 0.2, "val/flow_acc_1px": 0.6}
    assert headline_text("motion_pretrain", motion) == ("flow_epe=0.9 (vs 2.5)  "
                                                        "track_delta_avg=0.4 (vs 0.2)")
    assert headline_text("refine", {"data/clips_flow_samples": 3}) is None, "failed early: no headline"
    assert headline_text("decode", {"data/clips": 4}) is None


def test_finetune_row_shows_top1_not_per_class_accuracies(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MAM2_MLFLOW", "1")
    monkeypatch.delenv("MAM2_PARENT_RUN_ID", raising=False)
    with mlflow_run("finetune", DecodeParams()) as run:
        run.log_metrics({"val/acc_rotate_ccw": 0.0, "val/acc_zoom_in": 1.0, "val/top1": 0.1875,
                         "val/top5": 0.8125})
    table = format_table(fetch_runs(uri=f"sqlite:///{tmp_path / 'mlflow.db'}"))
    assert "top1=0.1875  top5=0.8125" in table and "acc_" not in table


def test_an_unknown_stage_is_a_one_line_error_listing_the_stages(store, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    assert main(["--stage", "finetun"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'finetun' is not a stage" in err
    assert "finetune" in err and "pipeline" in err
