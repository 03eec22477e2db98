"""Tests for models/flow.py: RAFT wrapper, checkpoint formats, warping and the sequence loss (CPU, small)."""

import pytest
import torch

from models.flow import (
    CheckpointError,
    build_flow_model,
    estimate_flow,
    flow_sequence_loss,
    load_flow_checkpoint,
    original_raft_state_dict,
    pad_to_multiple,
    unpad,
    warp,
)


@pytest.fixture(scope="module")
def small_pair():
    """A seeded raft_small in eval mode and a 96x100 image pair (below RAFT's 128 px minimum)."""
    torch.manual_seed(0)
    model = build_flow_model("raft_small").eval()
    img0 = torch.rand(1, 3, 96, 100)
    img1 = torch.roll(img0, shifts=(2, 3), dims=(2, 3))
    return model, img0, img1


def test_raft_small_runs_below_min_size(small_pair):
    model, img0, img1 = small_pair
    with torch.no_grad():
        flow = estimate_flow(model, img0, img1, num_updates=3)
        preds = estimate_flow(model, (img0 * 255).byte(), (img1 * 255).byte(), num_updates=3, return_all=True)
    assert flow.shape == (1, 2, 96, 100)
    assert len(preds) == 3 and all(p.shape == (1, 2, 96, 100) for p in preds)
    assert torch.isfinite(flow).all()


def test_unknown_model_name():
    with pytest.raises(ValueError, match="raft_small"):
        build_flow_model("raft_huge")


def test_pad_unpad_round_trip():
    x = torch.rand(2, 3, 37, 50)
    padded, (left, right, top, bottom) = pad_to_multiple(x, 8, min_size=128)
    assert padded.shape[-2:] == (128, 128)
    assert torch.equal(unpad(padded, (left, right, top, bottom)), x)
    # pixel (x, y) of the input sits at (x + left, y + top) in the padded tensor
    assert torch.equal(padded[..., 5 + top, 7 + left], x[..., 5, 7])


def test_original_raft_checkpoint_loads_with_identical_outputs(small_pair, tmp_path):
    source, img0, img1 = small_pair
    state = original_raft_state_dict(source.state_dict())
    # the names princeton-vl/RAFT's raft-small.pth uses
    for key in (
        "module.fnet.conv1.weight",
        "module.cnet.layer2.0.conv3.bias",
        "module.cnet.layer3.0.downsample.0.weight",
        "module.update_block.encoder.convc1.weight",
        "module.update_block.gru.convz.weight",
        "module.update_block.flow_head.conv2.bias",
    ):
        assert key in state
    path = tmp_path / "raft-small.pth"
    torch.save(state, path)
    torch.manual_seed(1)  # a differently initialised target, so a silent partial load would show
    target = load_flow_checkpoint(build_flow_model("raft_small"), path).eval()
    with torch.no_grad():
        expected = estimate_flow(source, img0, img1, num_updates=2)
        got = estimate_flow(target, img0, img1, num_updates=2)
    assert torch.equal(expected, got)


def test_raft_large_mapping_round_trips(tmp_path):
    torch.manual_seed(0)
    source = build_flow_model("raft_large")
    state = original_raft_state_dict(source.state_dict())
    for key in (
        "module.cnet.norm1.running_mean",
        "module.cnet.layer2.0.norm3.weight",  # the projection's BatchNorm, registered twice upstream
        "module.cnet.layer2.0.downsample.1.weight",
        "module.update_block.gru.convq2.weight",
        "module.update_block.mask.0.weight",
        "module.update_block.mask.2.bias",
    ):
        assert key in state
    path = tmp_path / "raft-things.pth"
    torch.save(state, path)
    torch.manual_seed(1)
    target = load_flow_checkpoint(build_flow_model("raft_large"), path)
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_torchvision_checkpoint_loads_directly(small_pair, tmp_path):
    source = small_pair[0]
    path = tmp_path / "raft_small_C_T_V2.pth"
    torch.save(source.state_dict(), path)
    target = load_flow_checkpoint(build_flow_model("raft_small"), path)
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_bad_checkpoints_name_the_keys(small_pair, tmp_path):
    state = original_raft_state_dict(small_pair[0].state_dict())
    bad = dict(state)
    bad["module.update_block.flow_head.conv1.weight"] = torch.zeros(3, 3, 3, 3)
    del bad["module.fnet.conv2.bias"]
    bad["module.extra.weight"] = torch.zeros(1)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as info:
        load_flow_checkpoint(build_flow_model("raft_small"), tmp_path / "bad.pth")
    message = str(info.value)
    assert "mis-shaped" in message and "update_block.flow_head.conv1.weight" in message
    assert "missing" in message and "fnet.conv2.bias" in message
    assert "unexpected" in message and "extra.weight" in message
    # a small checkpoint into a large model fails too, instead of loading partially
    torch.save(state, tmp_path / "small.pth")
    with pytest.raises(CheckpointError, match="raft_large"):
        load_flow_checkpoint(build_flow_model("raft_large"), tmp_path / "small.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth"):
        load_flow_checkpoint(build_flow_model("raft_small"), tmp_path / "junk.pth")


def test_warp_integer_translation():
    image = torch.rand(2, 3, 20, 24)
    flow = torch.zeros(2, 2, 20, 24)
    flow[:, 0], flow[:, 1] = 3.0, -2.0  # sample 3 px right and 2 px up
    out = warp(image, flow)
    torch.testing.assert_close(out[..., 2:, :-3], image[..., :-2, 3:])
    assert torch.all(out[..., :, -3:] == 0)  # sampled outside the image: zeros


def test_flow_sequence_loss():
    target = torch.randn(2, 2, 8, 8)
    assert flow_sequence_loss([target.clone(), target.clone()], target).item() == 0.0
    bad = target + 1.0
    # the later update weighs more: an error there costs more than the same error earlier
    assert flow_sequence_loss([target, bad], target) > flow_sequence_loss([bad, target], target)
    torch.testing.assert_close(flow_sequence_loss([bad], target), torch.tensor(1.0))
    # errors where the labels are not valid are ignored
    valid = torch.ones(2, 8, 8)
    valid[:, :4] = 0
    partly_bad = target.clone()
    partly_bad[:, :, :4] += 5.0
    assert flow_sequence_loss([partly_bad], target, valid).item() == 0.0
