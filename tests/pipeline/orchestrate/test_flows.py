"""The Prefect flow `mam2`: the DAG it builds, the errors it surfaces, and real runs through DVC
and MLflow, in-process against Prefect's test harness (fast) and as the served deployment
`mam2/full` on a real Prefect server (slow)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
import zarr

# Prefect reads PREFECT_HOME when it is imported: keep its files out of the user's home.
os.environ.setdefault("PREFECT_HOME", str(Path(tempfile.gettempdir()) / "mam2-test-prefect"))

from pipeline.core.params import ParamsError  # noqa: E402
from pipeline.core.registry import STAGES  # noqa: E402
from pipeline.orchestrate.flows import (  # noqa: E402
    MissingDependency,
    PipelineFailed,
    StageFailed,
    _flow_params,
    _retry_unless_usage_error,
    base_stage,
    default_threads_per_stage,
    expand_foreach,
    install_params,
    params_source,
    pipeline_stages,
    read_dvc_stages,
    select_stages,
    shard_runner,
    stage_env,
    stage_error,
    upstream_graph,
)
from tests.test_dvc import copy_repo, tiny_params  # noqa: E402

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[3]


def _dvc_stage(outs=(), deps=()) -> dict:
    return {"cmd": "true", "outs": list(outs), "deps": list(deps)}


# ----------------------------------------------------------------------------- the DAG


def test_graph_is_the_edges_dvc_yaml_implies():
    stages = {"demo_data": _dvc_stage(outs=["data/raw", {"data/motion_gt": {"cache": True}}]),
              "decode": _dvc_stage(deps=["stages/decode.py", "data/raw"]),
              "motion_pretrain": _dvc_stage(deps=["data/motion_gt/gt.zarr"])}
    graph = upstream_graph(list(stages), stages)
    assert graph["motion_pretrain"] == {"demo_data"}, "reads demo_data's output: an edge"
    assert graph["decode"] == {"demo_data"} and graph["demo_data"] == set()


def test_foreach_stages_expand_as_dvc_names_them():
    body = {"foreach": {"clips": {"frames": "data/clips.zarr", "set": ""},
                        "motion_gt": {"frames": "data/motion_gt", "set": "--set x.source=motion_gt"}},
            "do": {"cmd": "python -m stages.x ${item.set}", "deps": ["${item.frames}"],
                   "outs": [{"reports/x/${key}": {"cache": False}}]}}
    expanded = dict(expand_foreach("x", body))
    assert list(expanded) == ["x@clips", "x@motion_gt"]
    assert expanded["x@motion_gt"] == {"cmd": "python -m stages.x --set x.source=motion_gt",
                                       "deps": ["data/motion_gt"],
                                       "outs": [{"reports/x/motion_gt": {"cache": False}}]}
    assert dict(expand_foreach("y", {"foreach": ["a", "b"], "do": {"cmd": "echo ${item}"}})) == {
        "y@a": {"cmd": "echo a"}, "y@b": {"cmd": "echo b"}}
    with pytest.raises(ParamsError, match="not in the stage registry: nope"):
        pipeline_stages({"nope": _dvc_stage()})


def test_the_projects_dag_from_dvc_yaml():
    dvc_stages = read_dvc_stages(REPO)
    stages = pipeline_stages(dvc_stages)
    assert {name.split("@")[0] for name in stages} == set(STAGES)
    graph = upstream_graph(stages, dvc_stages)
    assert graph["refine"] == {"demo_data", "decode", "motion_pretrain", "densify@clips", "densify@motion_gt"}
    assert graph["densify@motion_gt"] == {"demo_data", "motion_pretrain", "pseudo_labels@motion_gt"}
    assert graph["pseudo_labels@motion_gt"] == {"demo_data", "motion_pretrain"}
    assert graph["finetune"] == {"decode", "pretrain"} and graph["targets"] == {"decode", "tokenizer"}
    everything = select_stages(graph, None, None)
    position = {name: i for i, name in enumerate(everything)}
    assert all(position[up] < position[name] for name in graph for up in graph[name])
    assert select_stages(graph, "pseudo_labels", None) == [
        "pseudo_labels@clips", "pseudo_labels@motion_gt", "densify@clips", "densify@motion_gt", "refine"]
    assert select_stages(graph, None, "finetune") == ["demo_data", "decode", "tokenizer", "targets",
                                                      "pretrain", "finetune"]
    assert select_stages(graph, "decode", "pretrain") == ["decode", "tokenizer", "targets", "pretrain"]
    assert select_stages(graph, "densify@motion_gt", None) == ["densify@motion_gt", "refine"]
    with pytest.raises(ParamsError, match="no stage lies between"):
        select_stages(graph, "finetune", "decode")
    small = {"demo_data": set(), "decode": {"demo_data"}}
    with pytest.raises(ParamsError, match="'refine' is not in this pipeline"):
        select_stages(small, None, "refine")


def test_flow_params_are_validated_naming_the_parameter():
    with pytest.raises(ParamsError, match="flow.shards"):
        _flow_params(shards=0)
    with pytest.raises(ParamsError, match="flow.last_stage"):
        _flow_params(last_stage="decod")


# ----------------------------------------------------------------------------- errors


def test_each_stage_gets_its_share_of_the_cores():
    assert default_threads_per_stage("commit", cores=2) == 1, "two branches on two cores"
    assert default_threads_per_stage("commit", cores=16) == 8
    assert default_threads_per_stage("commit", cores=1) == 1
    assert default_threads_per_stage("repro", cores=16) is None, "one stage at a time: its own default"
    env = stage_env("run-id", threads=3)
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "3" and env["MAM2_PARENT_RUN_ID"] == "run-id"
    assert stage_env(None).get("OMP_NUM_THREADS") == os.environ.get("OMP_NUM_THREADS"), "untold: as is"


def test_stage_error_is_the_stages_own_message():
    lines = ["04:00:01 INFO stages.decode: probing", "mam2 decode: error: 2 of 2 videos could not "
             "be decoded:", "  a.mp4: too short", "  b.mp4: too short",
             "ERROR: failed to reproduce 'decode': failed to run: python -m stages.decode"]
    assert stage_error("decode", lines, 1) == ("stage decode failed (exit code 1):\nmam2 decode: "
                                               "error: 2 of 2 videos could not be decoded:\n"
                                               "  a.mp4: too short\n  b.mp4: too short")
    crash = ["Traceback (most recent call last):", '  File "x.py", line 1', "KeyError: 'frames'"]
    assert stage_error("pretrain", crash, 1).endswith("KeyError: 'frames'")


def test_invalid_params_are_not_retried_but_other_failures_are():
    from prefect.states import Failed

    usage = Failed(data=StageFailed("mam2 decode: invalid params", 2))
    flaky = Failed(data=StageFailed("mam2 decode: error: input/output error", 1))
    assert _retry_unless_usage_error(None, None, usage) is False
    assert _retry_unless_usage_error(None, None, flaky) is True


def test_dask_path_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "prefect_dask", None)  # as if not installed: importing it fails
    with pytest.raises(MissingDependency, match="pip install prefect-dask"):
        shard_runner("tcp://127.0.0.1:8786", 2)


def test_install_params_copies_another_file_over_params_yaml(tmp_path):
    (tmp_path / "params.yaml").write_text("decode: {num_frames: 8}\n")
    (tmp_path / "exp.yaml").write_text("decode: {num_frames: 4}\n")
    messages: list[str] = []
    install_params(tmp_path, params_source(tmp_path, "params.yaml"), messages.append)
    assert messages == [] and "8" in (tmp_path / "params.yaml").read_text()
    install_params(tmp_path, params_source(tmp_path, "exp.yaml"), messages.append)
    assert "4" in (tmp_path / "params.yaml").read_text() and "copying exp.yaml" in messages[0]
    assert "8" in (tmp_path / ".params.yaml.before-flow").read_text()  # the replaced file is kept
    with pytest.raises(ParamsError, match="not found"):
        params_source(tmp_path, "nope.yaml")


def test_params_file_must_be_a_yaml_file_inside_the_project(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (tmp_path / "outside.yaml").write_text("decode: {}\n")
    (project / "notes.txt").write_text("decode: {}\n")
    with pytest.raises(ParamsError, match="outside the project"):
        params_source(project, "../outside.yaml")
    with pytest.raises(ParamsError, match="outside the project"):
        params_source(project, "../../../etc/hostname")
    with pytest.raises(ParamsError, match="not a .yaml file"):
        params_source(project, "notes.txt")


def test_serve_refuses_to_start_outside_the_project_or_without_a_server(tmp_path, monkeypatch,
                                                                         capsys):
    from pipeline.orchestrate.serve import main as serve_main

    monkeypatch.chdir(tmp_path)
    assert serve_main([]) == 2 and "no dvc.yaml here" in capsys.readouterr().err
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert serve_main([]) == 2 and "PREFECT_API_URL is not set" in capsys.readouterr().err


# ----------------------------------------------------------------------------- real runs


def tiny_repo(root: Path) -> Path:
    """A copy of the project with tiny params, tagged with the videomae objective."""
    repo = copy_repo(root / "repo")
    params = tiny_params(yaml.safe_load((repo / "params.yaml").read_text()), motion=True)
    params.setdefault("pretrain", {})["objective"] = "videomae"
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    return repo


def dvc_status(repo: Path, *stages: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "dvc", "status", "--json", *stages], cwd=repo,
                         capture_output=True, text=True, env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def mlflow_runs(repo: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mam2")
    return list(client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"]))


@pytest.fixture(scope="module")
def flow_repo(tmp_path_factory):
    """A tiny repo as the working directory, with Prefect's test harness (a temporary server)."""
    from prefect.testing.utilities import prefect_test_harness

    repo = tiny_repo(tmp_path_factory.mktemp("flow"))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(repo)
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{repo / 'mlflow.db'}")
        patch.setenv("MLFLOW_EXPERIMENT_NAME", "mam2")
        patch.setenv("MAM2_MLFLOW", "1")
        patch.delenv("MAM2_PARENT_RUN_ID", raising=False)
        with prefect_test_harness(server_startup_timeout=300):
            yield repo


def test_flow_runs_stages_through_dvc_with_a_parent_mlflow_run(flow_repo):
    from pipeline.orchestrate.flows import mam2_flow

    start = time.perf_counter()
    results = mam2_flow(last_stage="decode", threads_per_stage=1)
    seconds = time.perf_counter() - start
    print(f"in-process flow run on tiny params (demo_data, decode): {seconds:.1f} s")
    assert [(r["stage"], r["ran"]) for r in results.values()] == [("demo_data", True), ("decode", True)]
    assert dvc_status(flow_repo, "demo_data", "decode") == {}
    runs = mlflow_runs(flow_repo)
    assert [r.data.tags["stage"] for r in runs] == ["pipeline", "demo_data", "decode"]
    parent, *children = runs
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children)
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.data.tags["objective"] == "videomae"
        assert len(run.data.tags["params_hash"]) == 16 and run.data.tags["git_commit"]
    demo_data, decode = children
    assert decode.data.params["num_frames"] == "9" and decode.data.metrics["data/clips"] == 4
    assert demo_data.data.params["videos_per_class"] == "2"
    assert demo_data.data.metrics["data/labelled_videos"] == 4
    assert parent.data.params["last_stage"] == "decode" and parent.data.metrics["flow/stages_run"] == 2
    assert parent.data.metrics["flow/decode_seconds"] > 0
    assert parent.data.metrics["flow/threads_per_stage"] == 1
    assert decode.data.tags["compute_threads"] == "1", "the stage process ran on the flow's thread count"

    again = mam2_flow(last_stage="decode")
    assert not any(r["ran"] for r in again.values()), "DVC says everything is up to date"
    assert len(mlflow_runs(flow_repo)) == len(runs) + 1, "only a new parent run, no stage ran"


def test_shards_run_on_a_dask_cluster(flow_repo):
    """`dask_address` maps the shards over a real (local, 127.0.0.1) Dask cluster's workers."""
    from distributed import LocalCluster

    from pipeline.orchestrate.flows import mam2_flow

    params = yaml.safe_load((flow_repo / "params.yaml").read_text())
    params["decode"]["clips_per_video"] = 2
    (flow_repo / "two_clips.yaml").write_text(yaml.safe_dump(params))
    before = len(mlflow_runs(flow_repo))
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, protocol="tcp", host="127.0.0.1",
                      dashboard_address=None) as cluster:
        results = mam2_flow(params_file="two_clips.yaml", last_stage="decode", shards=2,
                            dask_address=cluster.scheduler_address)
    assert results["decode"]["ran"]
    new_runs = mlflow_runs(flow_repo)[before:]
    shards = sorted((r.data.tags["stage"], r.data.tags["shard"]) for r in new_runs if "shard" in r.data.tags)
    assert shards == [("decode", "0/2"), ("decode", "1/2")]
    assert all(r.info.status == "FINISHED" for r in new_runs)
    assert zarr.open_group(str(flow_repo / "data/clips.zarr"), mode="r")["frames"].shape[0] == 8
    assert dvc_status(flow_repo, "decode") == {}


@pytest.mark.slow
def test_failing_stage_fails_the_flow_with_the_stages_message(flow_repo):
    from pipeline.orchestrate.flows import mam2_flow

    params = yaml.safe_load((flow_repo / "params.yaml").read_text())
    params["decode"]["num_frames"] = 30  # longer than every demo video
    (flow_repo / "long.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(PipelineFailed, match=r"(?s)stage decode failed \(exit code 1\):\n"
                       r"mam2 decode: error: 4 of 4 videos could not be decoded.*too short"):
        mam2_flow(params_file="long.yaml", last_stage="decode", retries=0)
    assert (flow_repo / "params.yaml").read_text() == (flow_repo / "long.yaml").read_text()
    assert "decode" in dvc_status(flow_repo, "decode")
    failed = mlflow_runs(flow_repo)[-1]
    assert failed.data.tags["stage"] == "decode" and failed.info.status == "FAILED"

    params["decode"]["num_frames"] = "many"
    (flow_repo / "typo.yaml").write_text(yaml.safe_dump(params))
    before = len(mlflow_runs(flow_repo))
    with pytest.raises(ParamsError, match="decode.num_frames"):
        mam2_flow(params_file="typo.yaml", last_stage="decode")
    assert len(mlflow_runs(flow_repo)) == before, "invalid params fail before any work"


@pytest.mark.slow
def test_mam2_pipeline_prints_the_failed_stage_and_its_error(flow_repo, capsys):
    from pipeline.orchestrate.pipeline_cli import main

    params = yaml.safe_load((flow_repo / "params.yaml").read_text())
    params["decode"]["num_frames"] = 30  # longer than every demo video
    (flow_repo / "too_long.yaml").write_text(yaml.safe_dump(params))
    assert main(["-p", "params_file=too_long.yaml", "-p", "last_stage=decode", "-p", "retries=0"]) == 1
    err = capsys.readouterr().err
    assert ("mam2 pipeline: error: stage decode failed (exit code 1):\n"
            "mam2 decode: error: 4 of 4 videos could not be decoded") in err


# ----------------------------------------------------------------------------- served


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_url(url: str, process: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"process exited ({process.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} not up after {timeout} s:\n{log.read_text()[-3000:]}")


def stop(process: subprocess.Popen) -> None:
    """Stop a process we started, and the children in its session, by its id."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def deployment_run(repo: Path, env: dict, *params: str) -> tuple[subprocess.CompletedProcess, float]:
    command = [str(BIN / "prefect"), "deployment", "run", "mam2/full", "--watch"]
    for param in params:
        command += ["--param", param]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    return result, time.perf_counter() - start


def flow_run_message(result: subprocess.CompletedProcess, api: str) -> str:
    run_id = next(line.split("UUID:")[1].strip() for line in result.stdout.splitlines()
                  if "UUID:" in line)
    with urllib.request.urlopen(f"{api}/flow_runs/{run_id}", timeout=10) as response:
        return json.loads(response.read())["state"]["message"]


@pytest.mark.slow
def test_served_deployment_runs_to_completion_and_dvc_is_clean(tmp_path):
    repo = tiny_repo(tmp_path)
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DVC_NO_ANALYTICS": "1",
           "MLFLOW_DISABLE_TELEMETRY": "true", "MAM2_MLFLOW": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("MAM2_PARENT_RUN_ID", None)
    server_log, serve_log = tmp_path / "server.log", tmp_path / "serve.log"
    with open(server_log, "w") as out:
        server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                                   "--port", str(port)], env=env, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    serve = None
    try:
        wait_for_url(f"{api}/health", server, server_log)
        with open(serve_log, "w") as out:
            serve = subprocess.Popen([sys.executable, "-m", "pipeline.orchestrate.serve"], cwd=repo, env=env,
                                     stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for_url(f"{api}/deployments/name/mam2/full", serve, serve_log)

        first, seconds = deployment_run(repo, env)
        print(f"served flow run, every stage of dvc.yaml on tiny params: {seconds:.1f} s")
        assert first.returncode == 0, first.stdout + first.stderr + serve_log.read_text()[-5000:]
        assert "Completed" in first.stdout
        assert dvc_status(repo) == {}, "after the flow, dvc status is clean"
        dvc_stages = read_dvc_stages(repo)  # pseudo_labels@clips and @motion_gt: two pseudo_labels runs
        parent, *children = mlflow_runs(repo)
        assert parent.data.tags["stage"] == "pipeline"
        assert sorted(r.data.tags["stage"] for r in children) == sorted(map(base_stage, dvc_stages))
        assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children)

        params = yaml.safe_load((repo / "params.yaml").read_text())
        params["decode"]["clips_per_video"] = 2
        (repo / "params.yaml").write_text(yaml.safe_dump(params))
        second, seconds = deployment_run(repo, env, "dvc_mode=repro", "shards=2")
        print(f"served flow run, decode onwards, repro mode, 2 shards: {seconds:.1f} s")
        assert second.returncode == 0, second.stdout + serve_log.read_text()[-5000:]
        assert dvc_status(repo) == {}
        shard_runs = [r for r in mlflow_runs(repo) if "shard" in r.data.tags]
        by_stage = {}
        for r in shard_runs:
            by_stage.setdefault(r.data.tags["stage"], []).append(r.data.tags["shard"])
        # every stage downstream of the clips that accepts --shard ran as two shards (pseudo_labels@clips;
        # pseudo_labels@motion_gt does not read the clips and stays up to date)
        assert {stage: sorted(shards) for stage, shards in by_stage.items()} == {
            stage: ["0/2", "1/2"] for stage in ("decode", "targets", "pseudo_labels")}
        assert all(r.info.status == "FINISHED" for r in shard_runs)
        assert zarr.open_group(str(repo / "data/clips.zarr"), mode="r")["frames"].shape[0] == 8

        params["decode"]["num_frames"] = 30
        (repo / "params.yaml").write_text(yaml.safe_dump(params))
        failed, _ = deployment_run(repo, env, "retries=0")
        assert failed.returncode != 0 and "Failed" in failed.stdout
        message = flow_run_message(failed, api)
        assert "stage decode failed (exit code 1)" in message
        assert "mam2 decode: error: 4 of 4 videos could not be decoded" in message
    finally:
        if serve is not None:
            stop(serve)
        stop(server)
