"""Fingerprints: the source files behind a model, loss and dataset, and their digest."""

import functools

from models.motion_losses import flow_label_loss, track_label_loss
from models.tracker import PointTracker
from pipeline.core import fingerprint as fp
from pipeline.motion.augment import LabelTrackSamples
from tests.models.test_tracker import TINY  # the tracker tests' tiny config


def project_files(obj) -> list[str]:
    return sorted(path.relative_to(fp.PROJECT).as_posix() for path in fp.defining_files(obj))


def test_the_files_behind_a_loss_a_model_and_a_dataset():
    # a loss in a partial: its module and the helpers it calls (the flow loss's live in models/flow.py)
    assert project_files(functools.partial(flow_label_loss, updates=8, gamma=0.85)) == [
        "models/flow.py", "models/motion_losses.py"]
    assert project_files(functools.partial(track_label_loss, iters=6, gamma=0.8)) == [
        "models/motion_losses.py", "models/tracker.py"]
    assert project_files(PointTracker(TINY)) == ["models/tracker.py"]  # every submodule's class
    assert project_files(LabelTrackSamples) == ["pipeline/motion/augment.py"]  # torch's Dataset is not ours
    assert project_files(fp) == ["pipeline/core/fingerprint.py"]
    assert project_files(None) == []


def test_the_digest_follows_the_files_contents(monkeypatch):
    loss = functools.partial(track_label_loss, iters=6, gamma=0.8)
    digest = fp.source_digest(loss, PointTracker(TINY))
    assert digest == fp.source_digest(PointTracker(TINY), loss)  # order and instances do not matter
    real = fp.file_digest
    edited = lambda path: real(path) + ("x" if path.name == "tracker.py" else "")  # noqa: E731
    monkeypatch.setattr(fp, "file_digest", edited)
    assert fp.source_digest(loss, PointTracker(TINY)) != digest  # models/tracker.py "changed"
    assert fp.source_digest(LabelTrackSamples) == fp.source_digest(LabelTrackSamples)
