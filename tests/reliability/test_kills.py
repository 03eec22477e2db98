"""kill -9 at seeded random moments: a resumed run ends with the arrays, metrics and histories of an
uninterrupted one. The training loop is killed in a real process; the tokenizer stage (a training
stage with a history and metrics) through its command line. decode's kill case is in
tests/stages/test_decode.py."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from models.vqgan import load_vqgan
from tests.reliability.helpers import REPO, run_stage, stage_command, stage_env
from tests.stages.test_tokenizer import make_clips_store

LOOP = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    import torch
    from pipeline.core.training import TrainParams, train, write_history
    from tests.pipeline.core.test_training import NoisyRegression, make_model, regression_loss

    def slow_loss(model, batch):
        time.sleep(0.02)  # slow enough for a kill to land mid-run
        return regression_loss(model, batch)

    run_dir = Path(sys.argv[1])
    params = TrainParams(steps=40, batch_size=4, base_lr=0.05, lr_scaling="none", warmup_steps=2,
                         checkpoint_every=5, log_every=1)
    result = train(make_model(), NoisyRegression(), slow_loss, params, run_dir)
    torch.save(result.model.state_dict(), run_dir / "weights.pt")
    write_history(result.history, run_dir / "history.csv")
""")


def kill_when(process: subprocess.Popen, ready: Path, delay: float) -> None:
    """SIGKILL `process` `delay` seconds after `ready` exists (or when it ends, whichever is first)."""
    deadline = time.time() + 120
    while not ready.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(delay)
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
    process.wait()


@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow),
                                  pytest.param(2, marks=pytest.mark.slow)])
def test_the_training_loop_resumes_to_an_uninterrupted_run(tmp_path, seed):
    def loop(run_dir: Path) -> subprocess.Popen:
        run_dir.mkdir(parents=True, exist_ok=True)
        return subprocess.Popen([sys.executable, "-c", LOOP, str(run_dir)], cwd=REPO, env=stage_env())

    assert loop(tmp_path / "whole").wait(timeout=300) == 0
    cut = tmp_path / "cut"
    kill_when(loop(cut), cut / "checkpoint.pt", random.Random(seed).uniform(0.0, 0.5))
    assert loop(cut).wait(timeout=300) == 0
    whole_weights = torch.load(tmp_path / "whole" / "weights.pt", weights_only=True)
    cut_weights = torch.load(cut / "weights.pt", weights_only=True)
    assert all(torch.equal(whole_weights[k], cut_weights[k]) for k in whole_weights)
    assert (cut / "history.csv").read_text() == (tmp_path / "whole" / "history.csv").read_text()


def tokenizer_sets(project: Path, name: str) -> tuple[str, ...]:
    return (f"paths.clips={project / 'clips.zarr'}", f"paths.artifacts={project / name / 'artifacts'}",
            f"paths.metrics={project / name / 'metrics'}", f"paths.reports={project / name / 'reports'}",
            f"paths.runs={project / name / 'runs'}", "tokenizer.codebook_size=16",
            "tokenizer.crop_size=16", "tokenizer.reinit_every=2", "tokenizer.val_frames=4",
            "tokenizer.autoencoder_steps=4", "tokenizer.train.steps=24", "tokenizer.train.batch_size=4",
            "tokenizer.train.warmup_steps=2", "tokenizer.train.checkpoint_every=4",
            "tokenizer.train.log_every=2")


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_a_killed_tokenizer_resumes_to_the_same_model_metrics_and_history(tmp_path, seed):
    make_clips_store(tmp_path / "clips.zarr", num_clips=4, num_frames=2, size=16)
    whole = run_stage(tmp_path, "tokenizer", *tokenizer_sets(tmp_path, "whole"))
    assert whole.returncode == 0, whole.stderr
    killed = subprocess.Popen(stage_command("tokenizer", *tokenizer_sets(tmp_path, "cut")), cwd=tmp_path,
                              env=stage_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_when(killed, tmp_path / "cut" / "runs" / "tokenizer" / "checkpoint.pt",
              random.Random(seed).uniform(0.0, 1.0))
    resumed = run_stage(tmp_path, "tokenizer", *tokenizer_sets(tmp_path, "cut"))
    assert resumed.returncode == 0, resumed.stderr
    runs = (tmp_path / "whole", tmp_path / "cut")
    metrics = [json.loads((run / "metrics" / "tokenizer.json").read_text()) for run in runs]
    assert metrics[0] == metrics[1]
    histories = [(run / "reports" / "tokenizer" / "history.csv").read_text() for run in runs]
    assert histories[0] == histories[1] and len(histories[0].splitlines()) == 1 + 24 // 2
    models = [load_vqgan(run / "artifacts" / "tokenizer" / "vqgan.pt").state_dict() for run in runs]
    assert all(torch.equal(models[0][k], models[1][k]) for k in models[0])
