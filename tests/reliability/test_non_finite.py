"""A loss, gradient or weight that stops being finite stops training before the optimiser step, keeps
no non-finite checkpoint, and names the last good checkpoint only when there is one."""

from __future__ import annotations

import pytest
import torch

from pipeline.core.errors import StageError
from pipeline.core.training import CHECKPOINT, train
from tests.pipeline.core.test_training import PARAMS, NoisyRegression, make_model, regression_loss


def _finite_checkpoint(run_dir) -> bool:
    state = torch.load(run_dir / CHECKPOINT, weights_only=True)
    tensors = [*state["model"].values(),
               *(t for s in state["optimizer"]["state"].values() for t in s.values() if torch.is_tensor(t))]
    return all(torch.isfinite(t).all() for t in tensors)


@pytest.mark.parametrize("base_lr", [1e6, 1e30])
def test_a_huge_learning_rate_never_saves_a_non_finite_checkpoint(tmp_path, base_lr):
    params = PARAMS.model_copy(update={"steps": 20, "base_lr": base_lr, "clip_grad": None,
                                       "checkpoint_every": 2})
    with pytest.raises(StageError) as stopped:
        train(make_model(0.0), NoisyRegression(), regression_loss, params, tmp_path)
    message = str(stopped.value)
    if (tmp_path / CHECKPOINT).exists():
        assert _finite_checkpoint(tmp_path), "the kept checkpoint must be usable"
        step = torch.load(tmp_path / CHECKPOINT, weights_only=True)["step"]
        assert f"last good checkpoint (step {step})" in message
    else:
        assert "No checkpoint was saved" in message


def test_a_non_finite_gradient_stops_before_the_step(tmp_path):
    def poisoned(model, batch):
        out = regression_loss(model, batch)
        if poisoned.calls == 3:  # a finite loss whose gradient is not
            out["loss"] = out["loss"] + torch.sqrt(0.0 * model[0].weight.sum())  # d/dw: inf x 0
        poisoned.calls += 1
        return out

    poisoned.calls = 0
    with pytest.raises(StageError, match="a gradient became non-finite at step 3"):
        train(make_model(), NoisyRegression(), poisoned, PARAMS.model_copy(update={"steps": 6}), tmp_path)
    assert _finite_checkpoint(tmp_path)


def test_a_resume_after_a_stop_starts_from_the_good_checkpoint(tmp_path):
    def exploding(model, batch):
        out = regression_loss(model, batch)
        if exploding.nan:
            out["loss"] = out["loss"] * float("nan")
        return out

    exploding.nan = False
    params = PARAMS.model_copy(update={"steps": 6, "checkpoint_every": 2})
    train(make_model(), NoisyRegression(), exploding, params.model_copy(update={"stop_after": 4}), tmp_path)
    exploding.nan = True
    with pytest.raises(StageError, match=r"checkpoint \(step 4\) is .*checkpoint.pt"):
        train(make_model(), NoisyRegression(), exploding, params, tmp_path)
    exploding.nan = False
    result = train(make_model(), NoisyRegression(), exploding, params, tmp_path)
    assert result.completed and [row["step"] for row in result.history] == list(range(1, 7))
