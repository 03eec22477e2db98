"""MAM2 / VideoMAE pre-training model: targets by hand, head shapes, no leakage, overfitting one batch."""

import statistics

import pytest
import torch
import torch.nn.functional as F

from models.mam2 import MAM2, OBJECTIVES, build_mam2, most_frequent_accuracy
from models.mam2_heads import REGRESSOR_BLOCKS, RegressorBlock
from models.masking import tube_mask
from models.pretrain_targets import code_target, motion_target, normalize_patches, pixel_target
from models.video_vit import build_encoder, patchify, unpatchify

CODEBOOK = 16



def tiny_model(objective="mam2", patch=8, downsample=8, **kw):
    enc = build_encoder("tiny", img_size=32, num_frames=8, patch_size=patch, embed_dim=64, depth=2,
                        num_heads=4)
    return MAM2(enc, objective, codebook_size=CODEBOOK, code_downsample=downsample, decoder_dim=64,
                decoder_depth=2, decoder_heads=4, regressor_depth=2, **kw)


def batch(seed=0, downsample=8):
    """A smooth random clip (B=2, 8 x 32^2), its frame differences, random codes and a 0.9 tube mask."""
    g = torch.Generator().manual_seed(seed)
    clip = F.interpolate(torch.rand(2, 3, 4, 8, 8, generator=g), size=(8, 32, 32), mode="trilinear")
    s = 32 // downsample
    targets = dict(codes=torch.randint(0, CODEBOOK, (2, 8, s, s), generator=g),
                   rgb_diff=clip[:, :, 1:] - clip[:, :, :-1])
    mask = tube_mask(2, (4, 32 // 8, 32 // 8), 0.9, generator=g)
    return clip, targets, mask


def hand_normalise(values):
    mean, std = statistics.mean(values), statistics.stdev(values)  # stdev: unbiased (n - 1)
    return [(v - mean) / (std + 1e-6) for v in values]


def test_pixel_normalisation_matches_hand_computation():
    clip = torch.rand(1, 3, 2, 2, 2, dtype=torch.float64)  # exactly one 2x2x2 tubelet
    target = pixel_target(clip, 2, 2)[0, 0].reshape(8, 3)  # (pt ph pw, c)
    for c in range(3):
        expected = hand_normalise(clip[0, c].flatten().tolist())  # (t h w) order == (pt ph pw)
        torch.testing.assert_close(target[:, c].double(), torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(normalize_patches(patchify(clip, 2, 2)), pixel_target(clip, 2, 2))


def test_motion_target_pads_last_frame_and_excludes_it():
    diff = torch.randn(1, 3, 3, 2, 2, dtype=torch.float64)  # T = 4 frames -> 3 differences, 2 tubelets
    target, valid = motion_target(diff, 2, 2)
    assert target.shape == (1, 2, 24) and valid.shape == (2, 24)
    assert valid[0].all() and valid[1, :12].all() and not valid[1, 12:].any()
    t0, t1 = target[0, 0].reshape(8, 3), target[0, 1].reshape(8, 3)
    for c in range(3):
        want0 = hand_normalise(diff[0, c, 0:2].flatten().tolist())  # differences 0 and 1
        want1 = hand_normalise(diff[0, c, 2].flatten().tolist())  # difference 2 only; the pad is left out
        torch.testing.assert_close(t0[:, c].double(), torch.tensor(want0, dtype=torch.float64))
        torch.testing.assert_close(t1[:4, c].double(), torch.tensor(want1, dtype=torch.float64))
        assert (t1[4:, c] == 0).all()
    stored = (diff * 100).round().to(torch.int16)  # the int16 differences targets.zarr stores
    torch.testing.assert_close(motion_target(stored, 2, 2)[0], motion_target(stored.float(), 2, 2)[0])
    with pytest.raises(ValueError, match="tubelets"):
        motion_target(torch.zeros(1, 3, 4, 2, 2), 2, 2)


def test_motion_target_std_floor_keeps_codec_noise_small():
    """A still tubelet's differences are codec noise (std well under 2/255): the floor keeps them
    small instead of scaling them to unit variance; real motion is normalised as before."""
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 3, 1, 4, 4, generator=g, dtype=torch.float64) * (0.5 / 255)
    motion = torch.randn(1, 3, 1, 4, 4, generator=g, dtype=torch.float64) * 0.2
    diff = torch.cat([noise, motion], dim=3)  # (1, 3, T-1=1, H=8, W=4): tubelets at rows 0-3 and 4-7
    plain, valid = motion_target(diff, 2, 4)
    floored, _ = motion_target(diff, 2, 4, min_std=2 / 255)
    std = lambda x: x[0][:, valid[0]].std(dim=-1)  # noqa: E731 (per tubelet, over its valid voxels)
    assert valid[0].sum() == 3 * 16, "one difference of two frames per tubelet; the pad is left out"
    assert std(plain)[0] > 0.8 and std(floored)[0] < 0.35, "noise is no longer amplified to unit variance"
    torch.testing.assert_close(floored[0, 1], plain[0, 1])  # the moving tubelet is unchanged


def test_code_target_picks_the_codes_under_each_tubelet():
    t, y, x = torch.meshgrid(torch.arange(4), torch.arange(4), torch.arange(4), indexing="ij")
    codes = (t * 100 + y * 10 + x)[None]  # (1, T=4, 4, 4): a 16 px clip, f = 4, patch 8 -> 2x2 codes/frame
    tokens = code_target(codes, 2, 8, 4)
    assert tokens.shape == (1, 2 * 2 * 2, 8)
    # token 5 = (t'=1, h'=0, w'=1): frames 2-3, code rows 0-1, code columns 2-3
    want = [tt * 100 + yy * 10 + xx for tt in (2, 3) for yy in (0, 1) for xx in (2, 3)]
    assert tokens[0, 5].tolist() == want
    with pytest.raises(ValueError, match="multiple"):
        code_target(codes, 2, 8, 16)


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_head_shapes_every_objective(objective):
    model = tiny_model(objective)
    clip, targets, mask = batch()
    out = model(clip, mask, targets)
    m = int(mask[0].sum())  # 14 of 16 patches x 4 slots = 56
    assert m == 56 and out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    spec = OBJECTIVES[objective]
    if spec.appearance:
        assert out["pred_codes"].shape == (2, m, 2) and 0 <= out["appearance_acc"] <= 1
    if spec.motion:
        assert out["pred_motion"].shape == (2, m, 2 * 8 * 8 * 3) and "loss_motion" in out
    if spec.pixels:
        assert out["pred_pixels"].shape == (2, m, 2 * 8 * 8 * 3) and "loss_pixel" in out
    assert ("loss_appearance" in out) == spec.appearance and ("loss_motion" in out) == spec.motion
    out["loss"].backward()  # DDP needs a gradient on every parameter
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_patch_several_codes_wide():
    model = tiny_model(patch=8, downsample=4)  # (8/4)^2 = 4 codes per frame, 8 per tubelet
    clip, targets, mask = batch(downsample=4)
    out = model(clip, mask, targets)
    assert out["pred_codes"].shape == (2, 56, 8)
    assert model.appearance_decoder.head.out_features == 8 * CODEBOOK


def test_base_heads_on_a_small_clip():
    model = build_mam2("base", img_size=32, num_frames=4)  # ViT-B/16, decoders 384/4/6, 1024 codes, f16
    assert model.regressor.blocks[0].gamma1.detach().eq(0.1).all() and len(model.regressor.blocks) == 4
    clip = torch.randn(1, 3, 4, 32, 32)
    mask = tube_mask(1, model.encoder.grid, 0.5, generator=torch.Generator().manual_seed(0))  # 2 of 4 patches
    targets = dict(codes=torch.randint(0, 1024, (1, 4, 2, 2)), rgb_diff=torch.randn(1, 3, 3, 32, 32))
    with torch.no_grad():
        out = model(clip, mask, targets)
    assert out["pred_codes"].shape == (1, 4, 2) and out["pred_motion"].shape == (1, 4, 2 * 16 * 16 * 3)


def test_predictions_do_not_see_masked_content():
    model = tiny_model().eval()
    clip, targets, mask = batch()
    noise = unpatchify(patchify(torch.randn_like(clip), 2, 8) * mask[..., None], (4, 4, 4), 2, 8)
    with torch.no_grad():
        a, b = model(clip, mask, targets), model(clip + noise, mask, targets)
    torch.testing.assert_close(a["pred_motion"], b["pred_motion"])
    assert torch.equal(a["pred_codes"], b["pred_codes"])


@pytest.mark.parametrize("block", REGRESSOR_BLOCKS)
def test_alignment_loss_and_weighted_sum(block):
    """CAE's alignment loss: a finite extra term, weighted into the loss; it trains the regressor and,
    through the regressor's inputs, the encoder; its target (the encoder's latents of the masked tubelets)
    carries no gradient."""
    torch.manual_seed(0)
    model = tiny_model(align_weight=2.0, appearance_weight=0.5, regressor_block=block)
    clip, targets, mask = batch()
    out = model(clip, mask, targets)
    assert torch.isfinite(out["loss_align"]) and out["loss_align"] > 0
    want = 0.5 * out["loss_appearance"] + out["loss_motion"] + 2.0 * out["loss_align"]
    torch.testing.assert_close(out["loss"], want)
    out["loss_align"].backward()
    assert model.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0  # through the regressor's inputs
    assert all(p.grad is not None for p in model.regressor.parameters())
    assert all(p.grad is None for p in model.motion_decoder.parameters())
    # the same gradient as a hand-made loss whose target is detached: none flows through the target
    from models.video_vit import split_tokens

    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    split = split_tokens(mask, 64)
    inputs = (clip - model.mean) / model.std
    pos = model.encoder.pos_embed(model.encoder.grid)
    pred = model.regressor(model.encoder.encode(inputs, split.visible), pos[split.visible], pos[split.masked])
    F.mse_loss(pred, model.encoder.encode(inputs, split.masked).detach()).backward()
    for name, p in model.named_parameters():
        if p.grad is not None or name in grads:
            torch.testing.assert_close(p.grad, grads[name], msg=name)
    plain = tiny_model(regressor_block=block)
    assert "loss_align" not in plain(clip, mask, targets)  # 0: off


@pytest.mark.parametrize("block", REGRESSOR_BLOCKS)
def test_both_regressor_blocks_build_run_and_train(block):
    torch.manual_seed(0)
    model = tiny_model(regressor_block=block)
    assert all(b.layout == block for b in model.regressor.blocks)
    clip, targets, mask = batch()
    out = model(clip, mask, targets)
    assert torch.isfinite(out["loss"]) and out["pred_motion"].shape == (2, 56, 2 * 8 * 8 * 3)
    out["loss"].backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    with pytest.raises(ValueError, match="regressor block"):
        tiny_model(regressor_block="postnorm")


def test_regressor_block_layouts_by_hand():
    """cae: q = q + g1 a; q = norm2(q); q + g2 mlp(q) (CAE's RegressorBlock);
    prenorm: q = q + g1 a; q + g2 mlp(norm2(q))."""
    torch.manual_seed(0)
    cae = RegressorBlock(16, 2, init_values=0.5, layout="cae").eval()
    pre = RegressorBlock(16, 2, init_values=0.5, layout="prenorm").eval()
    pre.load_state_dict(cae.state_dict())  # same parameters, only the forward differs
    q, pos_q, lat, pos_v = (torch.randn(2, n, 16) for n in (3, 3, 5, 5))
    kv, pos_kv = torch.cat([lat, q], 1), torch.cat([pos_v, pos_q], 1)
    a = cae.attn(cae.norm_q(q + pos_q), cae.norm_k(kv + pos_kv), cae.norm_v(kv))
    mid = q + cae.gamma1 * a
    with torch.no_grad():
        normed = cae.norm2(mid)
        torch.testing.assert_close(cae(q, pos_q, lat, pos_v), normed + cae.gamma2 * cae.mlp(normed))
        torch.testing.assert_close(pre(q, pos_q, lat, pos_v), mid + cae.gamma2 * cae.mlp(cae.norm2(mid)))


def test_trivial_baselines_beside_the_metrics():
    """appearance_acc_baseline: accuracy of the most frequent masked code; motion/pixel_mse_baseline: MSE of
    predicting zero, the normalised target's mean square (about 1 per tubelet by construction)."""
    codes = torch.tensor([[3, 3, 1], [3, 0, 2]])
    assert float(most_frequent_accuracy(codes, 8)) == pytest.approx(0.5)
    model = tiny_model()
    clip, targets, mask = batch()
    targets["codes"][:] = 5  # one code everywhere: the constant prediction is always right
    out = model(clip, mask, targets)
    assert float(out["appearance_acc_baseline"]) == 1.0
    targets["codes"] = torch.arange(2 * 8 * 4 * 4).remainder(CODEBOOK).view(2, 8, 4, 4)
    out = model(clip, mask, targets)
    assert 0 < float(out["appearance_acc_baseline"]) < 0.2  # 16 codes, nearly uniform
    target, valid = motion_target(targets["rgb_diff"], 2, 8, min_std=model.motion_min_std)
    masked = mask[..., None] & valid[None]  # (B, N, P): masked tubelets' valid voxels
    torch.testing.assert_close(out["motion_mse_baseline"], target.square()[masked].mean())
    assert 0.3 < float(out["motion_mse_baseline"]) <= 1.0 + 1e-4
    pixels = tiny_model("videomae")(clip, mask, targets)
    want = pixel_target(clip, 2, 8)[mask].square().mean()
    torch.testing.assert_close(pixels["pixel_mse_baseline"], want)


def test_bad_targets_and_masks_fail_clearly():
    model = tiny_model()
    clip, targets, mask = batch()
    with pytest.raises(KeyError, match="codes"):
        model(clip, mask, {"rgb_diff": targets["rgb_diff"]})
    with pytest.raises(ValueError, match="rgb_diff"):
        model(clip, mask, {**targets, "rgb_diff": targets["rgb_diff"][:, :, 1:]})
    with pytest.raises(ValueError, match="codes must be integer"):
        model(clip, mask, {**targets, "codes": targets["codes"] + CODEBOOK})
    with pytest.raises(ValueError, match="same number"):
        model(clip, torch.stack([mask[0], ~mask[1]]), targets)
    with pytest.raises(ValueError, match="objective"):
        tiny_model("mae")


def overfit(objective, steps=300, lr=2e-3):
    """Train on one fixed batch; return the first and the mean of the last 10 losses of each kind."""
    torch.manual_seed(0)
    model = tiny_model(objective)
    clip, targets, mask = batch()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    history = []
    for _ in range(steps):
        out = model(clip, mask, targets)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        history.append({k: v.item() for k, v in out.items() if k.startswith("loss_") or k.endswith("_acc")})
    last = {k: statistics.mean(h[k] for h in history[-10:]) for k in history[0]}
    return history[0], last


def test_mam2_overfits_one_batch(one_thread):
    first, last = overfit("mam2")
    assert last["loss_appearance"] <= 0.1 * first["loss_appearance"], (first, last)
    assert last["loss_motion"] <= 0.1 * first["loss_motion"], (first, last)
    assert last["appearance_acc"] > 0.9


def test_videomae_overfits_one_batch(one_thread):
    first, last = overfit("videomae")
    assert last["loss_pixel"] <= 0.1 * first["loss_pixel"], (first, last)


def test_the_encoder_sees_normalised_inputs_and_the_targets_the_clip():
    """input_norm="imagenet" (the default, as VideoMAE): the encoder gets (clip - mean) / std; the
    targets are made from the clip as given, so a model fed [0, 1] clips with "none" and one fed
    pre-normalised clips agree."""
    from models.video_vit import IMAGENET_MEAN, IMAGENET_STD, build_encoder

    torch.manual_seed(0)
    encoder = build_encoder("tiny", img_size=16, num_frames=4, patch_size=8, depth=1, embed_dim=32,
                            num_heads=2)
    norm = MAM2(encoder, "videomae", decoder_dim=16, decoder_depth=1, decoder_heads=2)
    plain = MAM2(encoder, "videomae", decoder_dim=16, decoder_depth=1, decoder_heads=2, input_norm="none")
    plain.load_state_dict(norm.state_dict())
    clip = torch.rand(2, 3, 4, 16, 16)
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[:, :4] = True
    mean, std = torch.tensor(IMAGENET_MEAN).view(-1, 1, 1, 1), torch.tensor(IMAGENET_STD).view(-1, 1, 1, 1)
    expected = plain((clip - mean) / std, mask, {"pixels": clip})
    got = norm(clip, mask)
    torch.testing.assert_close(got["loss"], expected["loss"])
    with pytest.raises(ValueError, match="input_norm"):
        MAM2(encoder, "videomae", input_norm="zscore")
