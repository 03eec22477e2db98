"""MLflow's SQLite store: two stage runs starting together on a fresh store both succeed (the schema
is made once, under a lock), and a run whose process was killed is closed as KILLED, not left
RUNNING forever."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.reliability.helpers import stage_env

OPEN_RUN = ("import os, signal, sys\n"
            "from pydantic import BaseModel\n"
            "from pipeline.core.mlflow_runs import mlflow_run\n"
            "class P(BaseModel):\n"
            "    a: int = 1\n"
            "with mlflow_run(sys.argv[1], P()) as run:\n"
            "    run.log_metrics({'x': 1.0})\n"
            "    print(run.run_id, flush=True)\n"
            "    if sys.argv[2] == 'kill':\n"
            "        os.kill(os.getpid(), signal.SIGKILL)\n")


def open_run(store: Path, stage: str, then: str = "end") -> subprocess.Popen:
    env = stage_env(mlflow=True, MLFLOW_TRACKING_URI=f"sqlite:///{store}")
    return subprocess.Popen([sys.executable, "-c", OPEN_RUN, stage, then], cwd=store.parent, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_status(store: Path, run_id: str) -> str:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{store}").get_run(run_id).info.status


def test_two_runs_on_a_fresh_store_both_succeed(tmp_path):
    store = tmp_path / "mlflow.db"
    shards = [open_run(store, "decode"), open_run(store, "decode")]
    results = [(shard.wait(timeout=240), shard.stdout.read(), shard.stderr.read()) for shard in shards]
    for code, out, err in results:
        assert code == 0 and "Traceback" not in err, err[-2000:]
        assert run_status(store, out.split()[0]) == "FINISHED"


def test_a_killed_run_is_closed_as_killed_by_the_next_run(tmp_path):
    store = tmp_path / "mlflow.db"
    killed = open_run(store, "pretrain", then="kill")
    killed_id = killed.stdout.readline().split()[0]
    assert killed.wait(timeout=240) != 0
    assert run_status(store, killed_id) == "RUNNING", "nothing closes a run killed with SIGKILL"
    follower = open_run(store, "decode")
    assert follower.wait(timeout=240) == 0, follower.stderr.read()
    assert run_status(store, killed_id) == "KILLED"
