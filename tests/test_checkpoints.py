"""The shipped starting models (checkpoints/): each loads, and reproduces the check scores recorded in
its provenance JSON (the motion models on the first motion_gt clips, the tokenizer on freshly
rendered demo frames), beating its trivial baseline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from models.flow_io import load_flow_model
from models.tracker import load_tracker
from models.vqgan import load_vqgan
from recipes.ship import flow_check, tokenizer_check, tracker_check

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"


def provenance_of(name: str, scores: str) -> dict:
    """The provenance JSON of checkpoints/<name>.pt, after checking the file's size and the keys every
    provenance has (`scores`: where its stage's scores are)."""
    assert (CHECKPOINTS / f"{name}.pt").stat().st_size <= 8 * 2**20, "shipped models stay under 8 MB"
    provenance = json.loads((CHECKPOINTS / f"{name}.json").read_text())
    for key in ("command", "recipe", "commit", "steps", "device", "wall_seconds", scores):
        assert key in provenance, key
    return provenance


def test_shipped_flow_model_reproduces_its_recorded_scores(one_thread):
    provenance = provenance_of("flow", "motion_gt")
    model = load_flow_model(CHECKPOINTS / "flow.pt").eval()
    check = flow_check(model, provenance["check"]["flow_updates"])
    assert check["epe"] == pytest.approx(provenance["check"]["epe"], rel=0.02)
    assert check["epe_zero_motion"] == pytest.approx(provenance["check"]["epe_zero_motion"], rel=1e-6)
    assert check["epe"] < check["epe_zero_motion"]


def test_shipped_tokenizer_reproduces_its_recorded_scores(one_thread):
    provenance = provenance_of("vqgan", "held_out_demo_frames")
    held_out = provenance["held_out_demo_frames"]
    assert held_out["codebook_usage"] >= 0.8 and held_out["psnr"] > held_out["baseline_psnr"] + 5
    check = tokenizer_check(load_vqgan(CHECKPOINTS / "vqgan.pt").eval())
    assert check["psnr"] == pytest.approx(provenance["check"]["psnr"], abs=0.05)
    assert check["baseline_psnr"] == pytest.approx(provenance["check"]["baseline_psnr"], abs=1e-6)
    assert check["psnr"] > check["baseline_psnr"] + 5


def test_shipped_tracker_reproduces_its_recorded_scores(one_thread):
    provenance = provenance_of("tracker", "motion_gt")
    recorded = provenance["check"]
    check = tracker_check(load_tracker(CHECKPOINTS / "tracker.pt").eval(), recorded["tracker_iters"])
    assert check["delta_avg"] == pytest.approx(recorded["delta_avg"], abs=0.01)
    assert check["delta_avg_zero_motion"] == pytest.approx(recorded["delta_avg_zero_motion"], abs=1e-6)
