"""CUDA checks: the models give the CPU's answers on the GPU, bf16 autocast stays close to fp32, and the
shared training loop trains and resumes on the GPU. Marked `gpu`: skipped without CUDA (CI has none)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.flow import build_flow_model, estimate_flow
from models.mam2 import MAM2
from models.masking import tube_mask
from models.tracker import PointTracker, TrackerConfig
from models.video_vit import build_encoder
from models.vqgan import VQGAN, VQGANConfig
from pipeline.core.training import CHECKPOINT, TrainParams, train

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def exact_fp32():
    """fp32 means fp32 (no TF32) while these tests compare against the CPU."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def smooth_images(batch: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.rand(batch, 3, size // 8, size // 8, generator=g), size=(size, size),
                         mode="bilinear", align_corners=False)


def test_raft_on_cuda_matches_cpu():
    torch.manual_seed(0)
    model = build_flow_model("raft_small").eval()
    img0 = smooth_images(2, 128, 0)
    img1 = torch.roll(img0, shifts=(2, 3), dims=(2, 3))
    with torch.no_grad():
        cpu = estimate_flow(model, img0, img1, num_updates=6)
        gpu = estimate_flow(model.to(CUDA), img0.to(CUDA), img1.to(CUDA), num_updates=6).cpu()
    assert gpu.shape == cpu.shape == (2, 2, 128, 128)
    assert (gpu - cpu).abs().max() < 1e-2  # px, after six recurrent updates


def test_tracker_on_cuda_matches_cpu():
    torch.manual_seed(0)
    model = PointTracker(TrackerConfig()).eval()
    video = torch.stack([torch.roll(smooth_images(1, 64, 1)[0], shifts=(t, 2 * t), dims=(1, 2))
                         for t in range(8)])[None]  # (1, 8, 3, 64, 64)
    queries = torch.tensor([[[20.0, 24.0], [40.0, 30.0], [10.0, 50.0]]])
    with torch.no_grad():
        cpu, cpu_vis = model(video, queries, iters=4)
        gpu, gpu_vis = model.to(CUDA)(video.to(CUDA), queries.to(CUDA), iters=4)
    assert (gpu[-1].cpu() - cpu[-1]).abs().max() < 1e-2
    assert (gpu_vis.cpu() - cpu_vis).abs().max() < 1e-2


def tiny_mam2() -> MAM2:
    torch.manual_seed(0)
    encoder = build_encoder("tiny", img_size=64, num_frames=8, patch_size=16, embed_dim=192, depth=4,
                            num_heads=3)
    return MAM2(encoder, "mam2", codebook_size=64, code_downsample=16, decoder_dim=128, decoder_depth=2,
                decoder_heads=4, regressor_depth=2)


def test_mam2_loss_in_bf16_autocast_is_close_to_fp32():
    model = tiny_mam2().to(CUDA)
    g = torch.Generator().manual_seed(0)
    clip = F.interpolate(torch.rand(4, 3, 4, 8, 8, generator=g), size=(8, 64, 64), mode="trilinear").to(CUDA)
    targets = {"codes": torch.randint(0, 64, (4, 8, 4, 4), generator=g).to(CUDA),
               "rgb_diff": clip[:, :, 1:] - clip[:, :, :-1]}
    mask = tube_mask(4, model.encoder.grid, 0.9, generator=g).to(CUDA)
    fp32 = model(clip, mask, targets)["loss"]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        bf16 = model(clip, mask, targets)["loss"]
    bf16.backward()
    assert torch.isfinite(bf16) and abs(bf16.item() - fp32.item()) < 0.02 * fp32.item()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_vqgan_codes_in_bf16_are_near_optimal():
    """bf16 may pick another code where two nearly tie, but never a clearly worse one."""
    torch.manual_seed(0)
    model = VQGAN(VQGANConfig.tiny_f16()).to(CUDA).eval()
    frames = smooth_images(8, 64, 2).to(CUDA) * 2 - 1
    with torch.no_grad():
        latent = model.encode_to_latent(frames)
        model.reinit_dead_codes(torch.zeros(model.codebook_size, device=CUDA), latent)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = model.encode(frames)
        vectors = latent.permute(0, 2, 3, 1).reshape(-1, latent.shape[1])  # fp32 latents, one per cell
        distances = torch.cdist(vectors, model.quantize.embedding.weight) ** 2
    best = distances.min(1).values
    chosen = distances.gather(1, bf16.reshape(-1, 1))[:, 0]
    assert bf16.shape == (8, 4, 4)
    assert chosen.mean() <= 1.05 * best.mean() + 1e-6
    assert (chosen <= 1.2 * best + 1e-3).float().mean() > 0.95


class Regression(torch.utils.data.Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(64, 32, generator=g)
        self.y = self.x @ torch.randn(32, 1, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        return {"x": self.x[key[0]], "y": self.y[key[0]]}


def regression_loss(model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
    prediction = model(batch["x"])
    return {"loss": F.mse_loss(prediction.float(), batch["y"]),
            "bf16": torch.tensor(float(prediction.dtype == torch.bfloat16))}


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 1))


def test_training_loop_uses_bf16_on_cuda_and_resumes(tmp_path):
    params = TrainParams(steps=40, batch_size=16, base_lr=0.02, lr_scaling="none", warmup_steps=2,
                         weight_decay=0.0, checkpoint_every=10, log_every=10, system_metrics_every=None)
    straight = train(make_model(), Regression(), regression_loss, params, tmp_path / "a")
    assert straight.completed and next(straight.model.parameters()).device.type == "cuda"
    history = straight.history
    assert history[-1]["loss"] < 0.2 * history[0]["loss"] and history[-1]["gpu_mem_gb"] > 0
    assert all(row["bf16"] == 1.0 for row in history)  # precision "auto" autocasts to bf16 on a GPU
    first = train(make_model(), Regression(), regression_loss, params.model_copy(update={"stop_after": 20}),
                  tmp_path / "b")
    assert not first.completed and torch.load(tmp_path / "b" / CHECKPOINT, weights_only=True)["step"] == 20
    resumed = train(make_model(), Regression(), regression_loss, params, tmp_path / "b")
    assert resumed.completed
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-5)
