"""The shared training loop: schedule, data order, exact resume, NaN stop, and DDP equivalence."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.core.errors import StageError
from pipeline.core.training import (
    CHECKPOINT,
    Dist,
    Evaluation,
    SeededBatchSampler,
    TrainParams,
    lr_factor,
    train,
)

REPO = Path(__file__).resolve().parents[3]


class NoisyRegression(torch.utils.data.Dataset):
    """y = x @ w plus per-sample seeded noise: augmentation that depends on the sample seed."""

    def __init__(self, n: int = 32) -> None:
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 8, generator=gen)
        self.y = self.x @ torch.randn(8, 1, generator=gen)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        index, seed = key
        noise = torch.randn(8, generator=torch.Generator().manual_seed(seed)) * 0.1
        return {"x": self.x[index] + noise, "y": self.y[index]}


def regression_loss(model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
    loss = nn.functional.mse_loss(model(batch["x"]), batch["y"])
    return {"loss": loss, "abs_err": (model(batch["x"]) - batch["y"]).abs().mean()}


def make_model(dropout: float = 0.2) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Dropout(dropout), nn.Linear(16, 1))


PARAMS = TrainParams(steps=4, batch_size=4, base_lr=0.05, lr_scaling="none", warmup_steps=1,
                     checkpoint_every=1, log_every=1)


def test_schedule_warms_up_then_decays_to_floor():
    p = TrainParams(steps=100, warmup_steps=10, base_lr=1e-3, lr_scaling="none", min_lr=1e-5)
    factors = [lr_factor(s, p) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:], strict=False))
    assert factors[-1] * 1e-3 == pytest.approx(1e-5, rel=0.1)
    onecycle = TrainParams(steps=100, warmup_steps=10, schedule="onecycle", min_lr=0, base_lr=1e-3)
    assert lr_factor(55, onecycle) == pytest.approx(0.5, abs=0.01)


def test_sampler_is_independent_of_ranks_and_resumable():
    p = TrainParams(steps=5, batch_size=4)
    single = list(SeededBatchSampler(10, p, Dist()))
    ranks = [list(SeededBatchSampler(10, p, Dist(rank=r, world=2))) for r in (0, 1)]
    assert [a + b for a, b in zip(ranks[0], ranks[1], strict=True)] == single
    assert list(SeededBatchSampler(10, p, Dist(), start_step=3)) == single[3:]
    accumulated = list(SeededBatchSampler(10, p.model_copy(update={"accumulation": 2}), Dist()))
    assert [a + b for a, b in zip(accumulated[::2], accumulated[1::2], strict=True)] == single
    with pytest.raises(StageError, match="batch_size"):
        SeededBatchSampler(10, p.model_copy(update={"batch_size": 3}), Dist(world=2))


def test_sampler_draws_each_epoch_once_from_its_seed():
    """Position g is item order_e[g mod N] of epoch e = g div N, seeded (seed, 7, g): batches straddling
    epochs included, and a second pass (which goes back to epoch 0) gives the same stream."""
    p = TrainParams(steps=5, batch_size=4, seed=3)
    sampler = SeededBatchSampler(10, p, Dist())
    orders = [np.random.default_rng([3, e]).permutation(10) for e in (0, 1)]
    expected = [[(int(orders[g // 10][g % 10]), int(np.random.default_rng([3, 7, g]).integers(2**31)))
                 for g in range(first, first + 4)] for first in range(0, 20, 4)]
    assert list(sampler) == expected
    assert list(sampler) == expected


def test_resume_gives_identical_weights(tmp_path):
    straight = train(make_model(), NoisyRegression(), regression_loss, PARAMS, tmp_path / "a").model
    first = train(make_model(), NoisyRegression(), regression_loss,
                  PARAMS.model_copy(update={"stop_after": 2}), tmp_path / "b")
    assert not first.completed and first.step == 2
    resumed = train(make_model(), NoisyRegression(), regression_loss, PARAMS, tmp_path / "b")
    assert resumed.completed
    for a, b in zip(straight.state_dict().values(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert torch.load(tmp_path / "b" / CHECKPOINT, weights_only=True)["step"] == 4


def test_changed_params_do_not_resume(tmp_path):
    train(make_model(), NoisyRegression(), regression_loss, PARAMS, tmp_path)
    other = PARAMS.model_copy(update={"base_lr": 0.01, "steps": 2})
    result = train(make_model(), NoisyRegression(), regression_loss, other, tmp_path)
    assert result.history[0]["step"] == 1  # started afresh


def test_training_reduces_loss(tmp_path):
    p = PARAMS.model_copy(update={"steps": 60, "checkpoint_every": 60, "log_every": 10})
    history = train(make_model(0.0), NoisyRegression(), regression_loss, p, tmp_path).history
    assert history[-1]["loss"] < 0.2 * history[0]["loss"]
    assert {"loss", "abs_err", "lr", "grad_norm", "samples_per_s"} <= set(history[-1])


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    calls = {"n": 0}

    def exploding(model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        calls["n"] += 1
        out = regression_loss(model, batch)
        if calls["n"] == 3:
            out["loss"] = out["loss"] * float("nan")
        return out

    with pytest.raises(StageError, match="loss became nan at step 2"):
        train(make_model(), NoisyRegression(), exploding, PARAMS, tmp_path)
    state = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values())


DDP_SCRIPT = textwrap.dedent("""
    import sys, torch
    from pathlib import Path
    from pipeline.core.training import TrainParams, train
    from tests.pipeline.core.test_training import NoisyRegression, make_model, regression_loss
    params = TrainParams(steps=3, batch_size=4, base_lr=0.05, lr_scaling="none", warmup_steps=1,
                         checkpoint_every=3, log_every=1)
    result = train(make_model(0.0), NoisyRegression(), regression_loss, params, Path(sys.argv[1]))
    if int(__import__("os").environ.get("RANK", "0")) == 0:
        torch.save(result.model.state_dict(), Path(sys.argv[1]) / "weights.pt")
""")


def test_two_process_gloo_matches_one_process(tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "MAM2_MLFLOW": "0", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(script), str(tmp_path / "one")], env=env, check=True,
                   cwd=REPO, capture_output=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    ddp = subprocess.run([*torchrun, str(script), str(tmp_path / "two")], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=240)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one = torch.load(tmp_path / "one" / "weights.pt", weights_only=True)
    two = torch.load(tmp_path / "two" / "weights.pt", weights_only=True)
    for key in one:
        assert torch.allclose(one[key], two[key], atol=1e-6), key


def test_evaluation_joins_the_history_leaves_training_alone_and_resumes(tmp_path, monkeypatch):
    """A periodic evaluation runs in eval mode, lands in the history row of its step (a row of its own
    off the log steps) and in MLflow; it draws random numbers without changing the weights trained, and
    a stopped-and-resumed run ends with the same history."""
    logged, modes = [], []

    class Recorder:  # MLflow's run: records the metrics logged, ignores the rest
        def log_metrics(self, metrics, step=None):
            logged.append((step, sorted(metrics)))

        def __getattr__(self, name):
            return lambda *args, **kwargs: None

    def score(model: nn.Module) -> dict[str, float]:
        modes.append(model.training)
        return {"out": float(model(torch.rand(2, 8)).sum())}  # its own draw: must not shift training's

    monkeypatch.setattr("pipeline.core.training.current_run", lambda: Recorder())
    evaluation = Evaluation(score, every=3)
    p = PARAMS.model_copy(update={"steps": 5, "log_every": 2, "checkpoint_every": 2})
    data = NoisyRegression()
    plain = train(make_model(), data, regression_loss, p, tmp_path / "plain").model
    straight = train(make_model(), data, regression_loss, p, tmp_path / "a", evaluation=evaluation)
    assert [(row["step"], "val_out" in row, "loss" in row) for row in straight.history] == [
        (2, False, True), (3, True, False), (4, False, True), (5, True, True)]
    assert modes == [False, False] and straight.model.training
    assert [entry for entry in logged if entry[1] == ["val/out"]] == [(3, ["val/out"]), (5, ["val/out"])]
    for a, b in zip(plain.state_dict().values(), straight.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    train(make_model(), data, regression_loss, p.model_copy(update={"stop_after": 2}), tmp_path / "b",
          evaluation=evaluation)
    resumed = train(make_model(), data, regression_loss, p, tmp_path / "b", evaluation=evaluation)

    def stable(history: list[dict]) -> list[dict]:
        return [{k: v for k, v in row.items() if not k.endswith("_per_s")} for row in history]

    assert stable(resumed.history) == stable(straight.history)


def test_a_finished_run_of_other_code_is_trained_again_and_an_unfinished_one_resumes(tmp_path, monkeypatch):
    calls = []

    def counting_loss(model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        calls.append(1)
        return regression_loss(model, batch)

    def steps_run(run_dir: Path, params: TrainParams = PARAMS) -> tuple[int, nn.Module]:
        calls.clear()
        result = train(make_model(), NoisyRegression(), counting_loss, params, run_dir)
        return len(calls), result.model

    straight = steps_run(tmp_path / "straight")[1]
    assert steps_run(tmp_path / "done")[0] == 4
    assert steps_run(tmp_path / "done")[0] == 0  # the same code: the finished run is reused
    assert steps_run(tmp_path / "half", PARAMS.model_copy(update={"stop_after": 2}))[0] == 2
    monkeypatch.setattr("pipeline.core.training.source_digest", lambda *objects: "other code")
    assert steps_run(tmp_path / "done")[0] == 4  # trained again
    ran, resumed = steps_run(tmp_path / "half")
    assert ran == 2  # resumed at step 2, with a warning
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)
