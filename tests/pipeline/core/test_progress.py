"""Progress bars: the loss beside the bar, the bar left on screen at the end, the final numbers in the
closing log line, and MLflow's system-metrics chatter kept out of the log."""

from __future__ import annotations

import logging

import pytest

from pipeline.core.progress import QUIET_LOGGERS, format_postfix, progress, progress_bar, setup_logging


def test_the_bar_shows_the_loss_and_stays_on_screen(monkeypatch, capsys, caplog):
    monkeypatch.setenv("MAM2_PROGRESS", "1")
    caplog.set_level(logging.INFO, logger="pipeline.core.progress")
    with progress_bar("train", unit="step", total=3) as update:
        for step, loss in enumerate((0.5, 0.25, 0.125)):
            update(1, loss=loss, lr=1e-3 * (step + 1))
    err = capsys.readouterr().err
    final = err.rsplit("\r", 1)[-1]
    assert "3/3" in final and "loss 0.125  lr 0.003" in final, repr(err)
    assert final.endswith("\n"), "left on screen, not erased"
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("train:")]
    assert line.startswith("train: 3 step in ") and line.endswith("; loss 0.125  lr 0.003")


def test_update_without_numbers_and_erasing_inner_bars(monkeypatch, capsys, caplog):
    monkeypatch.setenv("MAM2_PROGRESS", "1")
    caplog.set_level(logging.INFO, logger="pipeline.core.progress")
    assert list(progress(range(4), desc="evaluate", unit="clip", leave=False)) == [0, 1, 2, 3]
    assert not capsys.readouterr().err.rsplit("\r", 1)[-1].strip(), "leave=False erases the bar"
    assert any(r.getMessage().startswith("evaluate: 4 clip in ") and ";" not in r.getMessage()
               for r in caplog.records)


def test_numbers_are_logged_even_without_a_bar(monkeypatch, capsys, caplog):
    monkeypatch.setenv("MAM2_PROGRESS", "0")
    caplog.set_level(logging.INFO, logger="pipeline.core.progress")
    with progress_bar("train", unit="step", total=2) as update:
        update(1, loss=2.0)
        update(1, loss=1.5)
    assert capsys.readouterr().err == ""
    assert caplog.records[-1].getMessage().endswith("; loss 1.5")


def test_postfix_formatting():
    text = format_postfix({"loss": 0.123456, "step": 7, "phase": "warmup"})
    assert text == "loss 0.1235  step 7  phase warmup"


@pytest.mark.parametrize("handlers_before", [False, True])
def test_mlflow_system_metrics_log_warnings_only(handlers_before):
    root = logging.getLogger()
    saved = root.handlers[:], root.level, {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    try:
        if not handlers_before:
            root.handlers.clear()
        setup_logging("INFO")
        chatty = logging.getLogger("mlflow.system_metrics.system_metrics_monitor")
        assert not chatty.isEnabledFor(logging.INFO) and chatty.isEnabledFor(logging.WARNING)
        assert logging.getLogger("pipeline.core.training").isEnabledFor(logging.INFO)
    finally:
        root.handlers[:], level, levels = saved
        root.setLevel(level)
        for name, value in levels.items():
            logging.getLogger(name).setLevel(value)
