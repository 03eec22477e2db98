"""pretrain: MAM2 masked appearance-motion pre-training of a video ViT (or the VideoMAE baseline).

Inputs: `paths.clips` (clips.zarr; train split and unlabelled clips), `data/targets.zarr` beside it
(VQGAN codes of the frames and of the flipped frames; the RGB differences are recomputed from the frames
unless `motion_source: store`; not needed by `objective: videomae`), and, when present,
`artifacts/tokenizer/vqgan.pt` to draw predicted codes as images.
Outputs: `artifacts/pretrain/encoder.pt` (the encoder in `models.encoder_io` format, read by finetune)
and `model.pt` (encoder + regressor + decoders + params), `metrics/pretrain.json` (each metric with
its trivial baseline beside it), `reports/pretrain/` (results.json: the whole summary; history.csv;
sample images); resumable state in `runs/pretrain/`.
Samples are f-grid-aligned crops at the input size, flips and temporal windows of the stored clips
(why: `pipeline.data.pretrain_data`), tube-masked at `mask_ratio`; training runs through the shared loop
(AdamW, lr = base_lr x batch / 256, warm-up + cosine, DDP under torchrun, exact resume).
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from einops import rearrange
from pydantic import Field, model_validator
from torch.utils.data import default_collate

from models.encoder_io import save_encoder
from models.mam2 import MAM2, OBJECTIVES
from models.pretrain_targets import code_target, motion_target
from models.video_vit import ENCODER_SIZES, HEAD_SIZES, build_encoder, split_tokens, unpatchify
from pipeline.core import stage_cli
from pipeline.core.atomic import atomic_dir, save_png
from pipeline.core.figures import labelled_montage
from pipeline.core.fingerprint import fingerprint, input_stamp
from pipeline.core.flops import training_step_flops
from pipeline.core.mlflow_runs import current_run
from pipeline.core.params import Paths, StageParams
from pipeline.core.results import write_results
from pipeline.core.tensors import clip_to_tensor, tensor_to_clip, tensor_to_image
from pipeline.core.training import (
    TrainParams,
    init_distributed,
    stage_train_params,
    to_device,
    train,
    write_history,
)
from pipeline.data.pretrain_data import PretrainDataset, Sampling
from pipeline.data.shared_batch import collate_shared

log = logging.getLogger(__name__)

ObjectiveName = Literal["mam2", "mam2_appearance", "mam2_motion", "mam2_no_regressor", "videomae"]
# CPU demo: lr = 0.03 x 8 / 256 = 9.4e-4, close to the paper's 1.5e-4 x 2048 / 256 = 1.2e-3.
# VideoMAE's pre-training optimiser: AdamW (0.9, 0.95), weight decay 0.05, lr 1.5e-4 x batch / 256, cosine.
# (The demo's params.yaml raises base_lr for its batch of 8; recipes/vit_b.yaml has the epochs.)
TRAIN_DEFAULTS = TrainParams(steps=200, batch_size=8, base_lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05,
                             warmup_steps=20, schedule="cosine", checkpoint_every=50, log_every=10)
SCALAR_KEYS = ("loss", "loss_appearance", "loss_motion", "loss_pixel", "loss_align", "appearance_acc",
               "appearance_acc_baseline", "motion_mse_baseline", "pixel_mse_baseline")
StageTrainParams = stage_train_params(TRAIN_DEFAULTS)
# metrics/pretrain.json (DVC's columns): final losses beside their trivial baselines, whichever the
# objective has (pixel_* for videomae); the whole summary is reports/pretrain/results.json
HEADLINE = {"loss": "loss", "appearance_acc": "appearance_acc",
            "appearance_acc_baseline": "appearance_acc_baseline", "motion_mse": "motion_mse",
            "motion_mse_baseline": "motion_mse_baseline", "pixel_mse": "loss_pixel",
            "pixel_mse_baseline": "pixel_mse_baseline"}


class Params(StageParams):
    model: Literal["tiny", "small", "base", "large"] = Field("tiny", description="encoder size (ViT-T/S/B/L)")
    depth: int | None = Field(None, ge=1, description="override the size's depth (null: the size's own)")
    embed_dim: int | None = Field(None, ge=8, description="override the size's width (null: the size's own)")
    num_heads: int | None = Field(None, ge=1, description="override the size's heads (null: the size's own)")
    num_frames: int = Field(8, ge=2, description="frames per input clip (a window of the stored clip)")
    input_size: int = Field(112, ge=16, description="input crop side in pixels (a multiple of f and patch)")
    patch_size: int = Field(16, ge=1, description="tubelet side in pixels")
    tubelet_size: int = Field(2, ge=1, description="tubelet length in frames")
    mask: Literal["tube", "random"] = Field("tube", description="masking kind")
    mask_ratio: float = Field(0.9, ge=0, lt=1, description="fraction of tubelets masked")
    flip: bool = Field(True, description="random horizontal flips (codes of flipped frames swap in)")
    motion_source: Literal["frames", "store"] = Field(
        "frames", description="RGB differences: frames = computed on the device from the loaded frames "
        "(identical to the stored ones, and half the data to read and move); store = read targets.zarr")
    objective: ObjectiveName = Field("mam2", description="mam2, its ablations, or the videomae baseline")
    appearance_weight: float = Field(1.0, ge=0, description="weight of the code cross-entropy")
    motion_weight: float = Field(1.0, ge=0, description="weight of the RGB-difference MSE")
    # CAE's alignment loss and regressor block: the MAM2 paper says its regressor follows CAE but confirms
    # neither, so both are switches; the defaults keep this project's first version pending an ablation.
    align_weight: float = Field(0.0, ge=0, description="weight of CAE's alignment loss: MSE between the "
                                "regressor's latents of the masked tubelets and the encoder's own (no-grad) "
                                "latents of them; costs an encoder pass over the masked tubelets. CAE: 2; "
                                "not confirmed by the MAM2 paper, and 2 lost to 0 on every seed of "
                                "recipes/mam2_ablations.py; 0: off; objectives with a regressor only")
    regressor_block: Literal["prenorm", "cae"] = Field(
        "cae", description="regressor block layout: cae = CAE's (the query stream is normalised after "
        "the attention residual, then the MLP residual added), prenorm = a pre-norm MLP branch; the MAM2 "
        "paper confirms neither; cae beat prenorm's code accuracy on every seed of "
        "recipes/mam2_ablations.py (reports/mam2_ablations.md)")
    input_norm: Literal["imagenet", "none"] = Field("imagenet", description="encoder input normalisation "
                                                    "(VideoMAE's: ImageNet mean/std); encoder.pt records it "
                                                    "and finetune uses it")
    motion_min_std: float = Field(2 / 255, ge=0, description="floor of the motion target's per-tubelet "
                                  "std (fraction of full scale): still tubelets' codec noise is not "
                                  "scaled up to unit variance")
    decoder_dim: int | None = Field(None, ge=8, description="width of each decoder (null: the size's "
                                    "own, ViT-B 384)")
    decoder_depth: int | None = Field(None, ge=1, description="blocks per decoder (null: the size's own, 4)")
    decoder_heads: int | None = Field(None, ge=1, description="heads per decoder block (null: the size's "
                                      "own, ViT-B 6)")
    regressor_depth: int | None = Field(None, ge=1, description="regressor blocks, MAM2 objectives (null: "
                                        "the size's own, 4)")
    layer_scale: float = Field(0.1, gt=0, description="regressor layer-scale init")
    epochs: float | None = Field(None, gt=0, description="if set, train.steps = ceil(epochs x train "
                                 "clips / train.batch_size)")
    sample_clips: int = Field(2, ge=0, le=16, description="clips drawn in the sample images")
    clip_cache_mb: float = Field(0.0, ge=0, description="MB of decoded clips each loader process "
                                 "keeps in memory (0: off): once they are all in, a sample reads no chunk; "
                                 "worth it when the clips fit (the demo's 134 take 105 MB); same results")
    train: StageTrainParams = Field(TRAIN_DEFAULTS, description="optimisation (the shared loop's params)")

    @model_validator(mode="after")
    def _heads_divide_widths(self) -> Params:
        size = ENCODER_SIZES[self.model]
        width, heads = self.embed_dim or size["embed_dim"], self.num_heads or size["num_heads"]
        if width % heads or width % 2:
            raise ValueError(f"embed_dim {width} must be even and divisible by num_heads {heads}")
        heads = self.heads()
        if heads["decoder_dim"] % heads["decoder_heads"]:
            raise ValueError(f"decoder_dim {heads['decoder_dim']} must divide by decoder_heads "
                             f"{heads['decoder_heads']}")
        return self

    def heads(self) -> dict[str, int]:
        """Decoder and regressor sizes: the model size's (HEAD_SIZES), with any set field instead."""
        return {key: value if getattr(self, key) is None else getattr(self, key)
                for key, value in HEAD_SIZES[self.model].items()}


def help_notes() -> str:
    """The size-derived defaults `--help` prints: what each `model` builds when nothing overrides it."""
    lines = ["model sizes (`model`; any set depth/embed_dim/num_heads/decoder_*/regressor_depth wins):",
             f"  {'model':<6} {'encoder width/depth/heads':<26} {'decoders width/depth/heads':<27} regressor"]
    for name, enc in ENCODER_SIZES.items():
        head = HEAD_SIZES[name]
        lines.append(f"  {name:<6} {'{embed_dim}/{depth}/{num_heads}'.format(**enc):<26} "
                     f"{'{decoder_dim}/{decoder_depth}/{decoder_heads}'.format(**head):<27} "
                     f"{head['regressor_depth']} blocks")
    return "\n".join(lines)


def run(params: Params, *, clips: Path, targets: Path, tokenizer: Path, artifacts: Path, run_dir: Path,
        metrics: Path, reports: Path) -> dict[str, Path]:
    """Pre-train on `clips` + `targets`; write the encoder and model to `artifacts`, metrics, reports."""
    dataset = PretrainDataset(clips, targets, sampling_for(params), cache_mb=params.clip_cache_mb)
    train_params = resolve_steps(params, len(dataset))
    place = init_distributed()
    if place.is_main:
        log.info("pre-training %s (%s) on %d clips for %d steps of %d", params.objective, params.model,
                 len(dataset), train_params.steps, train_params.batch_size)
        current_run().log_metrics({"data/train_clips": len(dataset), "data/steps": train_params.steps,
                               "data/epochs": train_params.steps * train_params.batch_size / len(dataset)})
    torch.manual_seed(train_params.seed)
    model = build_model(params, dataset)
    loss_fn = partial(mam2_loss, motion=needs_motion(params))
    result = train(model, dataset, loss_fn, train_params, run_dir, unit="clip", collate_fn=collate_shared,
                   fingerprint=work_fingerprint(params, dataset))
    outputs = {"artifacts": artifacts, "metrics": metrics, "reports": reports}
    if not place.is_main:
        return outputs
    history = result.history  # the whole run's, also after resumes (it travels in the checkpoint)
    if not result.completed:
        log.info("stopped after step %d of %d (train.stop_after); rerun to continue", result.step,
                 train_params.steps)
        return outputs
    summary = summarise(history, train_params, len(dataset))
    summary["train_gflops_per_clip"] = step_flops(result.model, dataset, loss_fn) / 1e9
    model = result.model.eval()
    with atomic_dir(artifacts) as tmp:
        save_encoder(model.encoder, encoder_config(params), tmp / "encoder.pt", input_norm=model.input_norm)
        torch.save(model_checkpoint(params, model), tmp / "model.pt")
    with atomic_dir(reports) as tmp:
        write_history(history, tmp / "history.csv")
        for name, image in sample_images(model, dataset, params.sample_clips, tokenizer,
                                         step=train_params.steps).items():
            save_png(image, tmp / name)
    outputs.update(write_results(summary, reports=reports, metrics=metrics, headline=HEADLINE))
    current_run().log_artifact(reports / "history.csv", "pretrain")  # the images are in samples/
    current_run().log_artifact(reports / "results.json", "pretrain")
    current_run().log_artifact(metrics)
    current_run().log_model(artifacts / "encoder.pt", "encoder", model_type="video-vit-encoder",
                            params=encoder_config(params))
    log.info("pretrain: %s", ", ".join(f"{k} {v:.4g}" for k, v in summary.items()))
    return outputs


def run_from_paths(params: Params, paths: Paths) -> dict[str, Path]:
    return run(params, clips=paths.clips, targets=paths.targets,
               tokenizer=paths.artifacts_of("tokenizer") / "vqgan.pt",
               artifacts=paths.artifacts_of("pretrain"),
               run_dir=paths.runs_of("pretrain"), metrics=paths.metrics_of("pretrain"),
               reports=paths.reports_of("pretrain"))


# ----------------------------------------------------------------------------- model and loss


def sampling_for(params: Params) -> Sampling:
    """What the loader must cut and read for these params (videomae reads no targets)."""
    appearance, motion = OBJECTIVES[params.objective].appearance, needs_motion(params)
    return Sampling(num_frames=params.num_frames, input_size=params.input_size, patch_size=params.patch_size,
                    tubelet_size=params.tubelet_size, flip=params.flip, mask_kind=params.mask,
                    mask_ratio=params.mask_ratio, codes=appearance,
                    rgb_diff=motion and params.motion_source == "store")


def needs_motion(params: Params) -> bool:
    """Whether the objective predicts RGB differences."""
    return OBJECTIVES[params.objective].motion


def resolve_steps(params: Params, num_clips: int) -> TrainParams:
    """The train params with `steps` derived from `epochs` when that is set."""
    if params.epochs is None:
        return params.train
    steps = max(1, math.ceil(params.epochs * num_clips / params.train.batch_size))
    return params.train.model_copy(update={"steps": steps})


def encoder_config(params: Params) -> dict:
    """`build_encoder` kwargs of the encoder: what `encoder.pt` records to rebuild it."""
    overrides = {k: getattr(params, k) for k in ("depth", "embed_dim", "num_heads") if getattr(params, k)}
    return {"name": params.model, "img_size": params.input_size, "num_frames": params.num_frames,
            "patch_size": params.patch_size, "tubelet_size": params.tubelet_size, **overrides}


def build_model(params: Params, dataset: PretrainDataset) -> MAM2:
    """Encoder of the named size with the objective's heads, sized to the targets store's codebook."""
    info = dataset.info
    return MAM2(build_encoder(**encoder_config(params)), params.objective,
                codebook_size=info.codebook_size if info else 1, code_downsample=dataset.align,
                **params.heads(), layer_scale=params.layer_scale, regressor_block=params.regressor_block,
                appearance_weight=params.appearance_weight,
                motion_weight=params.motion_weight, align_weight=params.align_weight,
                motion_min_std=params.motion_min_std, input_norm=params.input_norm)


def model_inputs(batch: dict, motion: bool) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """A loader batch (on-disk layouts) -> the model's clip (B, C, T, H, W), mask and targets.

    Without stored differences in the batch, `motion` computes them from the frames in integers, so they
    are bit-identical to targets.zarr's `frame[t+1] - frame[t]`.
    """
    frames, targets = batch["frames"], {}
    if "codes" in batch:
        targets["codes"] = batch["codes"].long()
    if "rgb_diff" in batch or motion:
        diff = batch.get("rgb_diff")
        if diff is None:
            diff = frames[:, 1:].to(torch.int16) - frames[:, :-1].to(torch.int16)
        targets["rgb_diff"] = clip_to_tensor(diff)  # (B, C, T-1, H, W); the /255 is normalised away
    return clip_to_tensor(frames), batch["mask"], targets


def mam2_loss(model: torch.nn.Module, batch: dict, *, motion: bool) -> dict[str, torch.Tensor]:
    """The loop's loss: the model's weighted loss plus its parts and the top-1 code accuracy."""
    out = model(*model_inputs(batch, motion))
    return {key: out[key] for key in SCALAR_KEYS if key in out}


def step_flops(model: MAM2, dataset: PretrainDataset, loss_fn: Callable) -> float:
    """Counted FLOPs of one training step per clip (forward + backward of a batch of one clip, in the
    model's training mode): what compares objectives at equal compute (MAM2's regressor and two decoders
    cost more per step than VideoMAE's one decoder)."""
    device = next(model.parameters()).device
    batch = to_device(collate_shared([dataset[(0, 0)]]), device)  # clip 0 with its augmentation seed 0
    mode = model.training
    model.train()
    try:
        return training_step_flops(lambda: loss_fn(model, batch), model, device_type=device.type)
    finally:
        model.train(mode)


def work_fingerprint(params: Params, dataset: PretrainDataset) -> str:
    """Identifies a run's state: a checkpoint of other model/data settings is not resumed from."""
    return fingerprint(params.model_dump(mode="json", exclude={"train", "sample_clips", "clip_cache_mb"}),
                       str(dataset.frames_shape), len(dataset),
                       input_stamp(dataset.clips_path, dataset.targets_path))


def model_checkpoint(params: Params, model: MAM2) -> dict:
    """Everything `model.pt` holds: weights of every head plus the params that build them."""
    return {"format": "mam2.pretrain", "params": params.model_dump(mode="json"),
            "encoder_config": encoder_config(params), "codebook_size": model.codebook_size,
            "code_downsample": model.code_downsample, "state_dict": model.state_dict()}


def summarise(history: list[dict], train_params: TrainParams, num_clips: int, window: int = 5) -> dict:
    """reports/pretrain/results.json: means over the last `window` logs (each log is one step's batch),
    the first logged loss, and how much training that was. Each model metric has its trivial baseline
    beside it, measured on the same batches' masked targets: ``appearance_acc_baseline`` (predict the
    most frequent code) and ``motion_mse_baseline`` / ``pixel_mse_baseline`` (predict zero)."""
    summary: dict = {"steps": train_params.steps, "batch_size": train_params.batch_size,
                     "train_clips": num_clips,
                     "epochs": train_params.steps * train_params.batch_size / num_clips}
    if not history:
        log.warning("no training history (the run finished earlier and its history is gone)")
        return summary
    last = history[-window:]
    for key in SCALAR_KEYS:
        if key in last[-1]:
            summary[key] = sum(row[key] for row in last) / len(last)
    if "loss_motion" in summary:
        summary["motion_mse"] = summary["loss_motion"]  # MSE of the per-tubelet normalised differences
    summary["first_loss"] = history[0]["loss"]
    return summary


# ----------------------------------------------------------------------------- sample images


@torch.no_grad()
def sample_images(model: MAM2, dataset: PretrainDataset, count: int, tokenizer: Path,
                  step: int | None = None) -> dict[str, np.ndarray]:
    """Images of predictions on the first `count` train clips (masked tubelets darkened in the top band):
    target vs predicted RGB differences; VQGAN-decoded target vs predicted codes; masked frames. Each is
    titled (objective, `step`, mask ratio, what is drawn) with its rows and columns labelled."""
    if count == 0:
        return {}
    device, enc = next(model.parameters()).device, model.encoder
    batch = default_collate([dataset.sample(int(row), seed) for seed, row in enumerate(dataset.rows[:count])])
    clip, mask, targets = model_inputs(to_device(batch, device), model.motion_decoder is not None)
    out = model(clip, mask, targets)
    grid, masked, frames = enc.grid_for(clip), split_tokens(mask).masked, clip.shape[2]
    voxels = mask.float()[..., None].expand(-1, -1, enc.tubelet_size * enc.patch_size ** 2)
    shade = tensor_to_clip(clip * (1 - 0.7 * unpatchify(voxels, grid, enc.tubelet_size, enc.patch_size, 1)))
    images = {}
    if "pred_motion" in out:
        target, _ = motion_target(targets["rgb_diff"], enc.tubelet_size, enc.patch_size,
                                  min_std=model.motion_min_std)
        videos = [tensor_to_clip((0.5 + unpatchify(t, grid, enc.tubelet_size,
                                                   enc.patch_size) / 6).clamp(0, 1))
                  for t in (target, _paste(target, masked, out["pred_motion"]))]  # +-3 std spans the greys
        images["motion_target_vs_pred.png"] = labelled_montage(
            _montage([shade, *videos], frames - 1), _row_labels(count, MOTION_ROWS),
            [f"t{t}→{t + 1}" for t in range(frames - 1)], _title(model, dataset, step, MOTION_SHOWN))
    if "pred_codes" in out and (decoded := _decode_codes(tokenizer, model, targets["codes"], out, masked,
                                                         grid)):
        images["codes_target_vs_pred.png"] = labelled_montage(
            _montage([shade, *decoded], frames), _row_labels(count, CODE_ROWS),
            [f"t{t}" for t in range(frames)], _title(model, dataset, step, CODES_SHOWN))
    if "pred_pixels" in out:
        images["frames_masked.png"] = labelled_montage(
            _montage([shade, tensor_to_clip(clip)], frames), _row_labels(count, FRAME_ROWS),
            [f"t{t}" for t in range(frames)], _title(model, dataset, step, FRAMES_SHOWN))
    for name, image in images.items():
        current_run().log_image(image, f"samples/{name}")
    return images


# Labels of the sample images: each clip's bands (rows), and what each image shows (in its title)
MOTION_ROWS = ("input frame t\n(masked: darker)", "target\ndifference", "predicted\n(masked tubelets)")
CODE_ROWS = ("input frame\n(masked: darker)", "target codes\ndecoded", "predicted codes\n(masked tubelets)")
FRAME_ROWS = ("input frame\n(masked: darker)", "input frame")
PASTED = ". Predictions fill the masked tubelets; visible ones show the target."
MOTION_SHOWN = ("motion: RGB difference of frames t→t+1 (per-tubelet normalised; grey 0, black/white "
                "±3 std), target vs prediction" + PASTED)
CODES_SHOWN = "appearance: VQGAN codes decoded to images, target vs prediction" + PASTED
FRAMES_SHOWN = "the masked tubelets of each clip"


def _row_labels(count: int, bands: tuple[str, ...]) -> list[str]:
    """Row labels of a montage of `count` clips with one band per entry of `bands`."""
    return [f"clip {b + 1}: {band}" if i == 0 else band for b in range(count) for i, band in enumerate(bands)]


def _title(model: MAM2, dataset: PretrainDataset, step: int | None, shown: str) -> str:
    """A sample image's title: objective, training step and masking, then what the image shows."""
    when = f" after {step} steps" if step is not None else ""
    masking = f"{dataset.sampling.mask_kind} mask, ratio {dataset.sampling.mask_ratio:g}"
    return f"{model.objective} pre-training{when} ({masking}); {shown}"


def _paste(tokens: torch.Tensor, masked: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A copy of `tokens` (B, N, ...) with the masked tokens (B, M) replaced by `values` (B, M, ...)."""
    out = tokens.clone()
    out[torch.arange(len(out), device=out.device)[:, None], masked] = values.to(out.dtype)
    return out


def _decode_codes(tokenizer: Path, model: MAM2, codes: torch.Tensor, out: dict, masked: torch.Tensor,
                  grid: tuple[int, int, int]) -> list[np.ndarray] | None:
    """Target codes, and target codes with the predicted ones pasted under the masked tubelets, decoded by
    the VQGAN as clips (B, T, H, W, 3); None without a usable tokenizer."""
    from models.vqgan import CheckpointError, load_vqgan

    if not tokenizer.exists():
        log.info("no tokenizer at %s: skipping the decoded-codes image", tokenizer)
        return None
    try:
        vqgan = load_vqgan(tokenizer).to(codes.device)
    except CheckpointError as err:
        log.warning("skipping the decoded-codes image: %s", err)
        return None
    if vqgan.codebook_size != model.codebook_size or vqgan.config.downsample_factor != model.code_downsample:
        log.warning("%s does not match the targets' codebook: skipping the decoded-codes image", tokenizer)
        return None
    enc, k = model.encoder, model.encoder.patch_size // model.code_downsample
    tokens = code_target(codes, enc.tubelet_size, enc.patch_size, model.code_downsample)  # (B, N, K)
    clips = []
    for t in (tokens, _paste(tokens, masked, out["pred_codes"])):
        grid_codes = rearrange(t, "b (t h w) (pt ph pw) -> (b t pt) (h ph) (w pw)", t=grid[0], h=grid[1],
                               w=grid[2], pt=enc.tubelet_size, ph=k, pw=k)
        images = ((vqgan.decode(grid_codes) + 1) / 2).clamp(0, 1)  # (B*T, C, H, W)
        clips.append(rearrange(tensor_to_image(images), "(b t) h w c -> b t h w c", b=codes.shape[0]))
    return clips


def _montage(rows: list[np.ndarray], frames: int, gap: int = 2) -> np.ndarray:
    """Rows of clips (B, T, H, W, 3) -> one image: per clip, one band per row, its first `frames` frames."""
    bands = [np.concatenate(list(np.pad(clip[:frames], ((0, 0), (gap, 0), (gap, 0), (0, 0)))), axis=1)
             for b in range(len(rows[0])) for clip in (row[b] for row in rows)]
    return np.ascontiguousarray(np.concatenate(bands, axis=0))


if __name__ == "__main__":
    raise SystemExit(stage_cli.main(sys.modules[__name__]))
