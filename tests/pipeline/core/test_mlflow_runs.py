"""MLflow runs: the experiment opens on the model-training view, a copied project logs artifacts into
its own folder, a resumed stage continues one run (and other params start a new one), runs carry
their git and DVC provenance, and a saved model is logged as an MLflow logged model."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from pydantic import BaseModel, Field

from pipeline.core.mlflow_runs import EXPERIMENT_KIND, mlflow_run
from pipeline.core.training import TrainParams


class Params(BaseModel):
    """A training stage's params in miniature: its own knobs and the shared `train:` block."""

    size: int = 1
    train: TrainParams = Field(default_factory=lambda: TrainParams(steps=10))


def use_store(monkeypatch: pytest.MonkeyPatch, project: Path) -> str:
    """Work in `project` with its own SQLite store, as `mam2 <stage>` does in a checkout."""
    uri = f"sqlite:///{project / 'mlflow.db'}"
    monkeypatch.chdir(project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MAM2_MLFLOW", "1")
    monkeypatch.delenv("MAM2_PARENT_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    for name in ("DVC_STAGE", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
        monkeypatch.delenv(name, raising=False)
    return uri


@pytest.fixture
def store(tmp_path, monkeypatch) -> MlflowClient:
    return MlflowClient(tracking_uri=use_store(monkeypatch, tmp_path))


def losses(client: MlflowClient, run_id: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client.get_metric_history(run_id, "train/loss")]


def test_experiment_opens_on_the_model_training_view(store):
    with mlflow_run("decode", Params()):
        pass
    assert store.get_experiment_by_name("mam2").tags[EXPERIMENT_KIND[0]] == "custom_model_development"


def test_an_existing_experiment_without_the_view_tag_gets_it(store, tmp_path):
    store.create_experiment("mam2", artifact_location=(tmp_path / "mlartifacts").as_uri())
    assert EXPERIMENT_KIND[0] not in store.get_experiment_by_name("mam2").tags
    with mlflow_run("decode", Params()):
        pass
    assert store.get_experiment_by_name("mam2").tags[EXPERIMENT_KIND[0]] == EXPERIMENT_KIND[1]


def test_a_failed_stage_is_continued_in_the_same_run_and_other_params_start_a_new_one(store):
    with pytest.raises(RuntimeError), mlflow_run("pretrain", Params()) as first:
        first.log_metrics({"train/loss": 2.0}, step=5)
        raise RuntimeError("killed at step 5")
    assert store.get_run(first.run_id).info.status == "FAILED"

    # the rerun (train.stop_after is how a run executes, not what it computes: still the same run)
    with mlflow_run("pretrain", Params(train=TrainParams(steps=10, stop_after=3))) as second:
        assert second.resumed
        second.log_metrics({"train/loss": 1.0}, step=8)
        second.mark_incomplete()  # stop_after ended it before the last step
    assert second.run_id == first.run_id
    ended = store.get_run(first.run_id)
    assert ended.info.status == "FINISHED" and ended.data.tags["mam2.completed"] == "false"

    with mlflow_run("pretrain", Params()) as third:  # stopped early: continued again, to the end
        third.log_metrics({"train/loss": 0.5}, step=10)
    assert third.run_id == first.run_id
    run = store.get_run(first.run_id)
    assert run.data.tags["mam2.completed"] == "true" and run.data.tags["mam2.attempts"] == "3"
    assert losses(store, first.run_id) == [(5, 2.0), (8, 1.0), (10, 0.5)], "one loss curve"
    assert run.data.params["size"] == "1" and run.data.params["train.steps"] == "10"

    with mlflow_run("pretrain", Params()) as done_before:  # the last one completed: a new run
        pass
    with mlflow_run("pretrain", Params(size=2)) as other:
        pass
    assert len({first.run_id, done_before.run_id, other.run_id}) == 3


def test_a_failed_run_is_continued_only_with_the_same_params_stage_and_tags(store):
    with pytest.raises(RuntimeError), mlflow_run("pretrain", Params(), tags={"objective": "mam2"}) as failed:
        raise RuntimeError("boom")
    with mlflow_run("pretrain", Params(size=2), tags={"objective": "mam2"}) as other_params:
        pass
    with mlflow_run("pretrain", Params(), tags={"objective": "videomae"}) as other_tags:
        pass
    with mlflow_run("finetune", Params(), tags={"objective": "mam2"}) as other_stage:
        pass
    assert failed.run_id not in {other_params.run_id, other_tags.run_id, other_stage.run_id}
    with mlflow_run("pretrain", Params(), tags={"objective": "mam2"}) as again:
        pass
    assert again.run_id == failed.run_id


def test_a_killed_run_is_continued(store):
    with mlflow_run("tokenizer", Params()) as killed:
        pass
    store.set_terminated(killed.run_id, status="KILLED")  # as close_killed_runs leaves a kill -9
    with mlflow_run("tokenizer", Params()) as again:
        pass
    assert again.run_id == killed.run_id and store.get_run(again.run_id).info.status == "FINISHED"


def test_a_copied_project_logs_artifacts_into_its_own_folder(tmp_path, monkeypatch):
    old = tmp_path / "old"
    old.mkdir()
    use_store(monkeypatch, old)
    (old / "note.txt").write_text("from the original")
    with mlflow_run("decode", Params()) as before:
        before.log_artifact(old / "note.txt")
    assert (old / "mlartifacts" / before.run_id / "artifacts" / "note.txt").exists()

    new = tmp_path / "new"
    shutil.copytree(old, new)
    new_uri = use_store(monkeypatch, new)
    with mlflow_run("decode", Params(size=2)) as after:
        after.log_artifact(new / "note.txt")
    assert (new / "mlartifacts" / after.run_id / "artifacts" / "note.txt").exists()
    assert not (old / "mlartifacts" / after.run_id).exists(), "nothing written into the old project"
    copied = MlflowClient(tracking_uri=new_uri)
    assert copied.get_experiment_by_name("mam2").artifact_location == (new / "mlartifacts").as_uri()
    moved = copied.get_run(before.run_id).info.artifact_uri
    assert moved == f"{(new / 'mlartifacts').as_uri()}/{before.run_id}/artifacts"
    assert [a.path for a in copied.list_artifacts(before.run_id)] == ["note.txt"], "copied runs found"
    original = MlflowClient(tracking_uri=f"sqlite:///{old / 'mlflow.db'}")
    assert original.get_experiment_by_name("mam2").artifact_location == (old / "mlartifacts").as_uri()


def test_runs_carry_git_and_dvc_provenance(store, monkeypatch):
    monkeypatch.setenv("DVC_STAGE", "pseudo_labels@clips")
    monkeypatch.setenv("DVC_EXP_NAME", "gusty-moat")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "a" * 40)
    with mlflow_run("pseudo_labels", Params()) as run:
        pass
    tags = store.get_run(run.run_id).data.tags
    assert tags["git_dirty"] in ("true", "false", "unknown") and tags["git_commit"]
    assert tags["dvc.stage"] == "pseudo_labels@clips" and tags["dvc.exp_name"] == "gusty-moat"
    assert tags["dvc.exp_baseline_rev"] == "a" * 40 and len(tags["params_hash"]) == 16


def test_a_saved_model_is_logged_as_a_logged_model_of_the_run(store, tmp_path):
    weights = tmp_path / "encoder.pt"
    weights.write_bytes(b"weights")
    with mlflow_run("pretrain", Params()) as run:
        model_id = run.log_model(weights, "encoder", model_type="video-vit", params={"depth": 4})
    experiment = store.get_experiment_by_name("mam2")
    (model,) = mlflow.search_logged_models(experiment_ids=[experiment.experiment_id], output_format="list")
    assert model.model_id == model_id and model.source_run_id == run.run_id and model.name == "encoder"
    assert str(model.status) in ("READY", "LoggedModelStatus.READY") and model.params == {"depth": "4"}
    assert [a.path for a in store.list_logged_model_artifacts(model_id)] == ["encoder.pt"]
