"""tokenizer: the VQGAN whose codes are MAM2's appearance targets, loaded or trained on the clips.

With `tokenizer.checkpoint` set, a trained VQGAN is validated and loaded: an official taming `.ckpt`
(with `tokenizer.config`, its `.yaml`) or a file in our own format. Otherwise a small VQGAN (preset
`tiny_f16` by default) trains on random crops of random frames of the train-split clips: reconstruction
(L1 or L2) + codebook + commitment losses. The first `autoencoder_steps` bypass the quantiser, then the
codebook starts at k-means centroids of the encoder's recent outputs (a random codebook collapses onto a
few codes); dead codes are re-seeded on encoder outputs so the codebook stays in use; optionally
taming's PatchGAN discriminator with a hinge loss after a warm-up. Training runs in the shared loop,
so a killed run resumes from `runs/tokenizer/`.
Input: `paths.clips`. Outputs: `artifacts/tokenizer/vqgan.pt` (models.vqgan.save_vqgan format, whatever
the source), `metrics/tokenizer.json` (held-out reconstruction PSNR against predicting the mean frame,
codebook usage), `reports/tokenizer/` (results.json: those and the perplexity, source and sizes;
originals-vs-reconstructions grid; training curve).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
import zarr
from einops import rearrange
from pydantic import Field, model_validator
from taming.modules.discriminator.model import NLayerDiscriminator, weights_init
from torch import Tensor, nn

from models.vqgan import (
    VQGAN,
    CheckpointError,
    VQGANConfig,
    VQGANOutput,
    load_taming_checkpoint,
    load_vqgan,
    save_vqgan,
)
from pipeline.core import stage_cli
from pipeline.core.atomic import atomic_dir, save_png
from pipeline.core.errors import StageError
from pipeline.core.figures import labelled_montage
from pipeline.core.fingerprint import file_digest, fingerprint, input_stamp
from pipeline.core.mlflow_runs import current_run
from pipeline.core.params import Paths, StageParams
from pipeline.core.results import write_results
from pipeline.core.stores import open_clips
from pipeline.core.training import TrainParams, stage_train_params, train, write_history
from pipeline.data.frames_dataset import (
    FramesDataset,
    centre_crop_size,
    from_vqgan,
    held_out_frames,
    split_rows,
    to_vqgan,
)

log = logging.getLogger(__name__)

PRESETS = {"tiny_f16": VQGANConfig.tiny_f16, "imagenet_f16_1024": VQGANConfig.imagenet_f16_1024,
           "imagenet_f16_16384": VQGANConfig.imagenet_f16_16384}
MAX_CODES = 2**15 - 1  # codes are stored as int16 in targets.zarr
# metrics/tokenizer.json (DVC's columns); everything else is in reports/tokenizer/results.json
HEADLINE = ("psnr", "baseline_psnr", "codebook_usage")
# Adam with taming's betas, no weight decay (it would pull the codebook towards 0). 2e-4: at 1e-3 the
# tiny preset collapsed onto the mean frame and stayed there (also with norm_groups=1 and no clipping);
# at 5e-5 it learned 3x slower. No gradient clipping: the early gradient norms (~6) were clipped to 1,
# which slowed the autoencoder (demo clips, 150 steps: 15.5 dB with clipping, 16.1 dB without).
TRAIN_DEFAULTS = TrainParams(steps=300, batch_size=8, base_lr=2e-4, lr_scaling="none", min_lr=1e-5,
                             weight_decay=0.0, betas=(0.5, 0.9), warmup_steps=20, clip_grad=None,
                             checkpoint_every=50, log_every=10)
StageTrainParams = stage_train_params(TRAIN_DEFAULTS)


class Params(StageParams):
    checkpoint: Path | None = Field(None, description="use this trained VQGAN instead of training one: "
                                    "an official taming .ckpt (set `config` too) or a vqgan.pt of ours")
    config: Path | None = Field(None, description="the official taming .yaml of `checkpoint`")
    init_checkpoint: Path | None = Field(None, description="train, starting from this vqgan.pt of ours "
                                         "(same preset and codebook_size) instead of random weights: "
                                         "continue a shipped tokenizer on new clips (needs "
                                         "autoencoder_steps: 0, which keeps its codebook)")
    preset: Literal[tuple(PRESETS)] = Field("tiny_f16", description="architecture to train")
    codebook_size: int | None = Field(None, ge=2, le=MAX_CODES, description="codes (null: the preset's)")
    # 64, not 32: the targets stage encodes whole frames, and a model trained only on 2x2-code crops
    # did not carry over to 8x8-code frames (demo: 18 dB on its 32 px training crops, flat grey and
    # 14.2 dB on held-out 128 px frames; with 64 px crops 16.9 dB).
    crop_size: int = Field(64, ge=16, description="training crops are crop_size^2 (a multiple of f; "
                           "code grids much smaller than the frames' do not generalise to them)")
    flip: bool = Field(True, description="mirror half of the training crops")
    recon_loss: Literal["l1", "l2"] = Field("l2", description="pixel reconstruction loss")
    codebook_weight: float = Field(1.0, ge=0, description="weight of codebook + 0.25 x commitment loss")
    autoencoder_steps: int = Field(100, ge=0, description="steps trained as a plain autoencoder "
                                   "(quantiser bypassed) before the codebook starts at k-means "
                                   "centroids of the encoder's recent outputs (0: random codebook)")
    reinit_every: int = Field(20, ge=0, description="steps between re-seeding codes unused since the "
                              "last re-seeding on encoder outputs (0: never)")
    discriminator: bool = Field(False, description="add taming's PatchGAN hinge loss after disc_start")
    disc_start: int = Field(250, ge=0, description="step at which the discriminator joins")
    disc_weight: float = Field(0.8, ge=0, description="scale of taming's adaptive generator-loss weight")
    disc_layers: int = Field(3, ge=1, le=5, description="NLayerDiscriminator depth")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="videos held out for evaluation when "
                                "the clips store has no val split")
    val_frames: int = Field(256, ge=1, description="held-out frames evaluated")
    eval_batch: int = Field(32, ge=1, description="frames per evaluation batch")
    grid_frames: int = Field(8, ge=1, description="frames in the originals-vs-reconstructions image")
    train: StageTrainParams = Field(TRAIN_DEFAULTS, description="optimisation (the shared loop's params)")

    @model_validator(mode="after")
    def _consistent(self) -> Params:
        if self.config is not None and self.checkpoint is None:
            raise ValueError("config is only used with checkpoint (the official .ckpt it describes)")
        if self.init_checkpoint is not None and self.checkpoint is not None:
            raise ValueError("init_checkpoint (continue training) and checkpoint (load, no training) "
                             "exclude each other")
        if self.init_checkpoint is not None and self.autoencoder_steps:
            raise ValueError("init_checkpoint needs autoencoder_steps: 0 (the warm-up's k-means would "
                             "replace the checkpoint's codebook)")
        f = self.vqgan_config().downsample_factor
        if self.checkpoint is None and self.crop_size % f:
            raise ValueError(f"crop_size={self.crop_size} must be a multiple of the preset's "
                             f"down-sampling {f}")
        return self

    def vqgan_config(self) -> VQGANConfig:
        """The architecture trained when no checkpoint is given."""
        config = PRESETS[self.preset]()
        if self.codebook_size is not None:
            config = dataclasses.replace(config, n_embed=self.codebook_size)
        return config


def run(params: Params, *, clips: Path, artifacts: Path, metrics: Path, reports: Path,
        run_dir: Path) -> dict[str, Path]:
    """Load or train the VQGAN on `clips`; write it to `artifacts`/vqgan.pt, `metrics`, `reports`."""
    store = open_clips(clips)
    train_rows, val_rows = split_rows(store, params.val_fraction)
    history: list[dict[str, float]] = []
    if params.checkpoint is not None:
        model, source = load_pretrained(params), str(params.checkpoint)
    else:
        if not len(train_rows):
            raise StageError(f"{clips}: no train-split clips to train the tokenizer on")
        result = train_tokenizer(params, clips, train_rows, run_dir)
        if not result.completed:
            log.info("stopped at step %d of %d; rerun to continue from %s", result.step,
                     params.train.steps, run_dir)
            return {"run_dir": run_dir}
        if dist.is_initialized() and dist.get_rank() != 0:
            return {}  # rank 0 evaluates and writes
        model, source, history = result.model.vqgan, "trained", result.history
    check_model(model, store["frames"].shape[2], where=source)
    frames = evaluation_frames(store, params, model, where=clips)
    summary, recon = evaluate(model, frames, params.eval_batch)
    summary.update(source=source, codebook_size=model.codebook_size,
                   downsample=model.config.downsample_factor,
                   train_steps=params.train.steps if params.checkpoint is None else 0)
    with atomic_dir(artifacts) as tmp:
        save_vqgan(model.cpu().eval(), tmp / "vqgan.pt")
    figure = reconstruction_figure(frames, recon, params.grid_frames, summary)
    outputs = {"tokenizer": artifacts / "vqgan.pt",
               **write_results(summary, reports=reports, metrics=metrics, headline=HEADLINE),
               "grid": save_png(figure, reports / "reconstructions.png")}
    if history:
        outputs["history"] = write_history(history, reports / "history.csv")
    mlrun = current_run()
    mlrun.log_metrics({f"val/{k}": summary[k] for k in ("psnr", "baseline_psnr", "codebook_usage",
                                                          "perplexity")})
    mlrun.log_image(figure, "tokenizer/reconstructions.png")
    mlrun.log_artifact(metrics)
    mlrun.log_artifact(reports, "tokenizer")
    mlrun.log_model(artifacts / "vqgan.pt", "vqgan", model_type="vqgan-tokenizer")
    log.info("tokenizer (%s): held-out PSNR %.2f dB (mean frame %.2f dB), %.0f%% of %d codes used, "
             "perplexity %.1f", source, summary["psnr"], summary["baseline_psnr"],
             100 * summary["codebook_usage"], model.codebook_size, summary["perplexity"])
    return outputs


def run_from_paths(params: Params, paths: Paths) -> dict[str, Path]:
    return run(params, clips=paths.clips, artifacts=paths.artifacts_of("tokenizer"),
               metrics=paths.metrics_of("tokenizer"), reports=paths.reports_of("tokenizer"),
               run_dir=paths.runs_of("tokenizer"))


# ----------------------------------------------------------------------------- loading


def load_pretrained(params: Params) -> VQGAN:
    """Validate and load `params.checkpoint`; every problem is a StageError naming the param."""
    path = params.checkpoint
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer.checkpoint not found: {path}")
    if params.config is None:
        try:
            return load_vqgan(path)
        except CheckpointError as err:
            raise StageError(f"tokenizer.checkpoint: {err}; an official taming .ckpt also needs "
                             "tokenizer.config (its .yaml)") from err
    if not params.config.is_file():
        raise FileNotFoundError(f"tokenizer.config not found: {params.config}")
    try:
        config = VQGANConfig.from_yaml(params.config)
    except (ValueError, TypeError, yaml.YAMLError) as err:
        raise StageError(f"tokenizer.config: {params.config}: not a taming VQGAN config: {err}") from err
    try:
        return load_taming_checkpoint(path, config)
    except CheckpointError as err:
        raise StageError(f"tokenizer.checkpoint: {err}") from err


def check_model(model: VQGAN, frame_size: int, *, where: str) -> None:
    """The codes must fit int16 and the stored frames must hold whole code cells."""
    f = model.config.downsample_factor
    if model.codebook_size > MAX_CODES:
        raise StageError(f"{where}: {model.codebook_size} codes do not fit the int16 targets")
    if frame_size < f:
        raise StageError(f"{where}: stored frames of {frame_size} px are smaller than one code cell ({f} px)")
    if frame_size % f:
        log.warning("%s: frame size %d is not a multiple of the down-sampling %d; the targets stage "
                    "will refuse these clips", where, frame_size, f)


# ----------------------------------------------------------------------------- training


class TokenizerObjective(nn.Module):
    """The VQGAN plus its training losses, as one module for the shared loop's one optimiser.

    forward(frames) returns the loss dict. The discriminator (when enabled) learns from its own hinge
    loss on detached reconstructions; the generator's adversarial term runs it with detached weights, so
    each loss moves only its own network although one optimiser steps both. Code usage is counted in a
    buffer (saved with the checkpoint, so a resumed run re-seeds at the same steps); every `reinit_every`
    steps the codes nobody picked since the last re-seeding move onto current encoder outputs. Before
    all that, `autoencoder_steps` bypass the quantiser and end with the k-means codebook.
    """

    def __init__(self, vqgan: VQGAN, params: Params, accumulation: int = 1) -> None:
        super().__init__()
        self.vqgan, self.params = vqgan, params
        self.discriminator = None
        if params.discriminator:
            self.discriminator = NLayerDiscriminator(3, n_layers=params.disc_layers).apply(weights_init)
        self.reinit_period = params.reinit_every * accumulation
        self.disc_start = params.disc_start * accumulation
        self.register_buffer("usage", torch.zeros(vqgan.codebook_size, dtype=torch.long))
        self.autoencoder_steps = params.autoencoder_steps * accumulation
        # The warm-up's latest encoder outputs (a ring), for the k-means codebook; in the checkpoint,
        # so a resumed run initialises the same codebook.
        self.register_buffer("recent_latents", torch.zeros(
            (4 * vqgan.codebook_size if params.autoencoder_steps else 0, vqgan.config.embed_dim)))
        self.register_buffer("recent_count", torch.zeros((), dtype=torch.long))
        self.register_buffer("micro_steps", torch.zeros((), dtype=torch.long))

    def forward(self, frames: Tensor) -> dict[str, Tensor]:
        step = int(self.micro_steps)
        logs: dict[str, Tensor] = {}
        warming_up = step < self.autoencoder_steps
        if self.autoencoder_steps and step == self.autoencoder_steps:
            self._init_codebook()
        elif not warming_up and self.reinit_period and (step - self.autoencoder_steps) \
                and (step - self.autoencoder_steps) % self.reinit_period == 0:
            logs["codes_reseeded"] = torch.tensor(float(self._reseed_dead_codes(frames)))
        if warming_up:  # plain autoencoder: the quantiser is bypassed
            latent = self.vqgan.encode_to_latent(frames)
            out = VQGANOutput(self.vqgan.decode_latent(latent), latent.new_zeros(()), None, latent)
            self._remember(latent.detach())
        else:
            out = self.vqgan(frames)
        error = out.recon - frames
        mse = error.square().mean()
        recon = mse if self.params.recon_loss == "l2" else error.abs().mean()
        loss = recon + self.params.codebook_weight * out.codebook_loss
        logs.update(recon=recon.detach(), codebook=out.codebook_loss.detach(),
                    psnr=-10 * torch.log10(mse.detach() / 4 + 1e-10))  # [-1, 1] -> [0, 1] scale
        if self.discriminator is not None and step >= self.disc_start:
            adversarial, disc_logs = self._adversarial(frames, out.recon, recon)
            loss = loss + adversarial
            logs.update(disc_logs)
        if out.codes is not None:
            self.usage += self.vqgan.code_usage(out.codes)
        self.micro_steps += 1
        return {"loss": loss, **logs}

    def _remember(self, latent: Tensor) -> None:
        """Push this batch's latent vectors into the ring of recent ones."""
        vectors = rearrange(latent, "b d h w -> (b h w) d")[-len(self.recent_latents):]
        start = int(self.recent_count) % len(self.recent_latents)
        slots = (start + torch.arange(len(vectors), device=vectors.device)) % len(self.recent_latents)
        self.recent_latents[slots] = vectors.to(self.recent_latents.dtype)
        self.recent_count += len(vectors)

    @torch.no_grad()
    def _init_codebook(self) -> None:
        """k-means codebook from the warm-up's recent latents; under DDP rank 0 decides for all."""
        if not dist.is_initialized() or dist.get_rank() == 0:
            vectors = self.recent_latents[:int(self.recent_count)]
            if len(vectors) < self.vqgan.codebook_size:
                raise StageError(f"tokenizer.autoencoder_steps={self.params.autoencoder_steps} saw "
                                 f"{len(vectors)} latent vectors, fewer than the {self.vqgan.codebook_size} "
                                 "codes: raise it or the batch size")
            generator = torch.Generator().manual_seed(int(self.micro_steps))
            self.vqgan.init_codebook_kmeans(vectors.cpu(), generator=generator)
        if dist.is_initialized():
            dist.broadcast(self.vqgan.quantize.embedding.weight.data, 0)

    @torch.no_grad()
    def _reseed_dead_codes(self, frames: Tensor) -> int:
        """Re-seed unused codes on this batch's encoder outputs; under DDP rank 0 decides for all."""
        count = 0
        if not dist.is_initialized() or dist.get_rank() == 0:
            latent = self.vqgan.encode_to_latent(frames)
            count = self.vqgan.reinit_dead_codes(self.usage, latent)
        if dist.is_initialized():
            dist.broadcast(self.vqgan.quantize.embedding.weight.data, 0)
        self.usage.zero_()
        return count

    def _adversarial(self, real: Tensor, fake: Tensor, nll: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """taming's recipe: adaptive-weighted generator loss + hinge discriminator loss."""
        disc = self.discriminator
        frozen = {name: p.detach() for name, p in disc.named_parameters()}
        g_loss = -torch.func.functional_call(disc, frozen, (fake,)).mean()
        last = self.vqgan.decoder.conv_out.weight  # balance the two losses' gradients here, as taming does
        nll_grad = torch.autograd.grad(nll, last, retain_graph=True)[0]
        g_grad = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
        weight = (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0, 1e4).detach() * self.params.disc_weight
        d_loss = 0.5 * (F.relu(1 - disc(real)).mean() + F.relu(1 + disc(fake.detach())).mean())
        return weight * g_loss + d_loss, {"g_loss": g_loss.detach(), "d_loss": d_loss.detach(),
                                          "d_weight": weight}


def train_tokenizer(params: Params, clips: Path, rows: np.ndarray, run_dir: Path):
    """Train a fresh VQGAN in the shared loop; returns its TrainResult (model: TokenizerObjective)."""
    torch.manual_seed(params.train.seed)
    vqgan = VQGAN(params.vqgan_config())
    if params.init_checkpoint is not None:
        vqgan.load_state_dict(initial_weights(params, vqgan.config))
    objective = TokenizerObjective(vqgan, params, params.train.accumulation)
    dataset = FramesDataset(clips, rows, crop_size=params.crop_size, flip=params.flip)
    log.info("training a %s VQGAN (%d codes) on %d frames of %d clips, %d steps", params.preset,
             objective.vqgan.codebook_size, len(dataset), len(rows), params.train.steps)
    return train(objective, dataset, lambda model, batch: model(batch), params.train, run_dir,
                 fingerprint=work_fingerprint(params, clips, rows), unit="frame",
                 find_unused_parameters=params.discriminator)


def work_fingerprint(params: Params, clips: Path, rows: np.ndarray) -> str:
    """What a resumable checkpoint must share with this run besides the train params."""
    model_keys = {"preset", "codebook_size", "crop_size", "flip", "recon_loss", "codebook_weight",
                  "autoencoder_steps", "reinit_every", "discriminator", "disc_start", "disc_weight",
                  "disc_layers"}
    start = file_digest(params.init_checkpoint) if params.init_checkpoint is not None else None
    return fingerprint(params.model_dump(mode="json", include=model_keys), str(Path(clips).resolve()),
                       rows.tolist(), input_stamp(clips), start)


def initial_weights(params: Params, config: VQGANConfig) -> dict[str, Tensor]:
    """The state dict of `init_checkpoint`, checked against the architecture this run trains."""
    path = params.init_checkpoint
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer.init_checkpoint not found: {path}")
    try:
        start = load_vqgan(path)
    except CheckpointError as err:
        raise StageError(f"tokenizer.init_checkpoint: {err}") from err
    if start.config != config:
        raise StageError(f"tokenizer.init_checkpoint: {path} is not the architecture of preset "
                         f"{params.preset!r} with codebook_size {config.n_embed} (its config: "
                         f"{dataclasses.asdict(start.config)})")
    log.info("training starts from %s", path)
    return start.state_dict()


# ----------------------------------------------------------------------------- evaluation


def evaluation_frames(store: zarr.Group, params: Params, model: VQGAN, *, where: Path) -> np.ndarray:
    """The held-out frames the model is scored on (`val_frames` of the val split, or of the videos held
    out by `val_fraction`; of the training clips when none is held out), centre-cropped to whole code
    cells: (n, S, S, 3) uint8."""
    train_rows, val_rows = split_rows(store, params.val_fraction)
    if not len(val_rows):
        log.warning("%s: no held-out clips; evaluating on training clips", where)
        val_rows = train_rows
    size = centre_crop_size(min(store["frames"].shape[2:4]), model.config.downsample_factor)
    return held_out_frames(store["frames"], val_rows, params.val_frames, size)


@torch.no_grad()
def evaluate(model: VQGAN, frames: np.ndarray, batch: int) -> tuple[dict[str, float], np.ndarray]:
    """Reconstruct (n, H, W, 3) uint8 frames through the codes; PSNR, baseline and code statistics."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device).eval()
    start, recons, codes = time.perf_counter(), [], []
    for i in range(0, len(frames), batch):
        c = model.encode(to_vqgan(frames[i:i + batch]).to(device))
        recons.append(from_vqgan(model.decode(c)))
        codes.append(c.flatten().cpu())
    recon = np.concatenate(recons)
    counts = torch.bincount(torch.cat(codes), minlength=model.codebook_size).numpy()
    mean_frame = frames.astype(np.float64).mean(axis=0, keepdims=True)
    summary = {"psnr": psnr(frames, recon), "baseline_psnr": psnr(frames, mean_frame),
               **code_statistics(counts), "val_frames": len(frames)}
    current_run().log_metrics({"time/eval_seconds": time.perf_counter() - start})
    return summary, recon


def psnr(reference: np.ndarray, estimate: np.ndarray) -> float:
    """Mean over frames of the PSNR (dB, peak 255) of `estimate` (broadcastable) against `reference`."""
    error = reference.astype(np.float64) - estimate
    mse = np.square(error).reshape(len(reference), -1).mean(axis=1)
    return float(np.mean(10 * np.log10(255.0**2 / np.maximum(mse, 1e-10))))


def code_statistics(counts: np.ndarray) -> dict[str, float]:
    """Fraction of the codebook used and the perplexity exp(H) of the code histogram."""
    p = counts[counts > 0] / max(counts.sum(), 1)
    return {"codebook_usage": float((counts > 0).mean()),
            "perplexity": float(np.exp(-(p * np.log(p)).sum()))}


def comparison_grid(frames: np.ndarray, recon: np.ndarray, count: int) -> np.ndarray:
    """Originals (top row) over their reconstructions (bottom row): (2H, nW, 3) uint8."""
    pair = np.stack([frames[:count], recon[:count]])
    return rearrange(pair, "r n h w c -> (r h) (n w) c")


def reconstruction_figure(frames: np.ndarray, recon: np.ndarray, count: int, summary: dict) -> np.ndarray:
    """The comparison grid with its rows named, each column's PSNR on top and the scores in the title."""
    count = min(count, len(frames))
    columns = [f"{psnr(frames[i:i + 1], recon[i:i + 1]):.1f} dB" for i in range(count)]
    title = (f"Held-out frames (top) and their VQGAN reconstructions through the codes (bottom). "
             f"Mean PSNR over {summary['val_frames']} frames {summary['psnr']:.2f} dB, predicting the mean "
             f"frame {summary['baseline_psnr']:.2f} dB; {100 * summary['codebook_usage']:.0f}% of "
             f"{summary.get('codebook_size', '')} codes in use")
    return labelled_montage(comparison_grid(frames, recon, count), ["original", "reconstruction"], columns,
                            title)


if __name__ == "__main__":
    raise SystemExit(stage_cli.main(sys.modules[__name__]))
