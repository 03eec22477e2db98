"""Weight files: safetensors written with our fields read back as our checkpoint dict, other safetensors
as a flat state dict (found by their header whatever the name), and bad files fail naming the file;
every loader then reads a safetensors export."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from models.checkpoint_io import CheckpointError, is_safetensors, read_weights, write_safetensors
from models.classifier import VideoClassifier, classifier_config, load_classifier
from models.encoder_io import load_encoder
from models.video_vit import build_encoder

CONFIG = {"name": "tiny", "img_size": 16, "num_frames": 4, "patch_size": 8, "tubelet_size": 2, "depth": 1,
          "embed_dim": 32, "num_heads": 2}


def test_our_fields_come_back_as_a_checkpoint_dict(tmp_path):
    state = {"a": torch.arange(6.0).view(2, 3), "b": torch.ones(2, dtype=torch.int64)}
    fields = {"format": "mam2.thing", "config": {"k": [1, 2]}}
    path = write_safetensors(state, tmp_path / "x.safetensors", fields)
    obj = read_weights(path)
    assert obj["format"] == "mam2.thing" and obj["config"] == {"k": [1, 2]}
    assert set(obj["state_dict"]) == {"a", "b"}
    assert all(torch.equal(obj["state_dict"][k], v) for k, v in state.items())
    assert not list(tmp_path.glob(".*partial"))  # written atomically, nothing left beside it


def test_other_safetensors_are_a_flat_state_dict_found_by_their_header(tmp_path):
    path = tmp_path / "weights.bin"  # not named .safetensors: recognised by its header
    save_file({"w": torch.zeros(3)}, str(path))
    assert is_safetensors(path)
    obj = read_weights(path)
    assert set(obj) == {"w"} and torch.equal(obj["w"], torch.zeros(3))
    torch.save({"w": torch.zeros(3)}, tmp_path / "torch.pt")
    assert not is_safetensors(tmp_path / "torch.pt")


def test_bad_safetensors_fail_naming_the_file(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match="bad.safetensors: not a readable safetensors file"):
        read_weights(bad)
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        read_weights(tmp_path / "missing.safetensors")


def test_encoder_and_classifier_loaders_read_safetensors(tmp_path):
    torch.manual_seed(0)
    encoder = build_encoder(**CONFIG)
    write_safetensors(encoder.state_dict(), tmp_path / "encoder.safetensors",
                      {"format": "mam2.encoder", "config": CONFIG, "input_norm": "imagenet"})
    loaded, config = load_encoder(tmp_path / "encoder.safetensors")
    assert config == CONFIG
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in encoder.state_dict().items())
    model = VideoClassifier(build_encoder(**CONFIG), 3, input_norm="imagenet")
    config = classifier_config(model, CONFIG, ["a", "b", "c"])
    write_safetensors(model.state_dict(), tmp_path / "classifier.safetensors",
                      {"format": "mam2.classifier", "config": config})
    back, config = load_classifier(tmp_path / "classifier.safetensors")
    assert config["class_names"] == ["a", "b", "c"] and back.input_norm == "imagenet"
    x = torch.rand(1, 3, 4, 16, 16)
    assert torch.equal(back(x), model.eval()(x))
