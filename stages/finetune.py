"""finetune: fine-tune (or linearly probe) a video encoder for action recognition, and evaluate it.

Inputs: `paths.clips` (labelled clips only: train split to train, `eval_split` to evaluate; unlabelled
clips are left out) and, with `init: pretrain`, `artifacts/pretrain/encoder.pt`. `init` may instead be
`scratch` or a path to our encoder checkpoint or a published VideoMAE checkpoint (converted key by key,
with a report of matched, missing and ignored keys). Clip length and resolution may differ from
pre-training: our 3-D sin-cos table is regenerated, a VideoMAE table is interpolated.
Model (VideoMAE's mean-pooling head): encoder on all tokens, its final LayerNorm an identity (a
pre-trained one is dropped; `final_norm: true` keeps it) -> mean pooling -> LayerNorm (fc_norm) ->
linear head (init scale 0.001).
Recipe (VideoMAE's): layer-wise lr decay, drop path, label smoothing, mixup/cutmix, RandAugment, random
erasing, warm-up + cosine on the shared loop (resume, DDP, bf16). `mode: linear` freezes the encoder.
Evaluation (VideoMAE's multi-view testing): every stored clip of a video x `eval_clips` temporal windows x
`eval_crops` spatial crops, softmax scores averaged per video; top-1, top-5, per-class accuracy, confusion
matrix (and the single-view top-1 for comparison). During training, every `val_every` steps, a cheap
validation (the centre view of each val clip: loss and per-video top-1) joins the history.
Outputs: `artifacts/finetune/` (classifier.pt, init_report.json), `metrics/finetune.json` (top-1,
top-5), `reports/finetune/` (results.json: the whole evaluation summary; history.csv, curves.png,
confusion.png, predictions.json); resumable state in `runs/finetune/`.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, field_validator
from timm.loss import SoftTargetCrossEntropy

from models.checkpoint_io import CheckpointError, read_weights
from models.classifier import VideoClassifier, classifier_config, layer_decay_param_groups, save_classifier
from models.encoder_io import FORMAT as ENCODER_FORMAT
from models.encoder_io import EncoderCheckpointError, encoder_input_norm, load_encoder
from models.video_vit import INPUT_NORMS, build_encoder
from models.videomae_convert import VideoMAEConversionError, load_head, load_videomae_encoder
from pipeline.classify.data import ClipSpec, EvalViews, TrainClips, ViewPlan, store_info
from pipeline.classify.evaluate import (
    ViewScores,
    average_per_video,
    classification_metrics,
    confusion_image,
    score_views,
)
from pipeline.classify.mixup import VideoMixup
from pipeline.classify.pictures import training_curves
from pipeline.core import stage_cli
from pipeline.core.atomic import atomic_dir, save_png, write_json
from pipeline.core.errors import StageError
from pipeline.core.fingerprint import fingerprint, input_stamp
from pipeline.core.mlflow_runs import current_run
from pipeline.core.params import Paths, StageParams
from pipeline.core.results import write_results
from pipeline.core.training import (
    Evaluation,
    TrainParams,
    autocast_dtype,
    init_distributed,
    stage_train_params,
    train,
    write_history,
)

log = logging.getLogger(__name__)

# CPU demo: lr = 0.032 x 8 / 256 = 1e-3 at the head (VideoMAE's ViT-B: 1e-3 x 512 / 256), decayed per
# layer below it.
TRAIN_DEFAULTS = TrainParams(steps=200, batch_size=8, base_lr=0.032, betas=(0.9, 0.999), weight_decay=0.05,
                             warmup_steps=20, checkpoint_every=50, log_every=10)
# Params that change only the evaluation: a finished training run is reused, not repeated, when they change.
EVAL_ONLY = frozenset({"eval_split", "eval_clips", "eval_crops", "eval_resize", "eval_batch_size"})
StageTrainParams = stage_train_params(TRAIN_DEFAULTS)


class Params(StageParams):
    mode: Literal["full", "linear"] = Field("full", description="full: fine-tune everything; linear: "
                                            "train only the pooled LayerNorm + head on a frozen encoder")
    init: str = Field("pretrain", min_length=1, description="pretrain (artifacts/pretrain/encoder.pt), "
                      "scratch, or a path to our encoder checkpoint or a VideoMAE checkpoint")
    model: Literal["tiny", "small", "base", "large"] = Field("tiny",
                                                             description="encoder size (init: scratch)")
    depth: int | None = Field(None, ge=1, description="override the size's depth (init: scratch; null: "
                              "the size's own)")
    embed_dim: int | None = Field(None, ge=8, description="override the size's width (init: scratch)")
    num_heads: int | None = Field(None, ge=1, description="override the size's heads (init: scratch)")
    patch_size: int = Field(16, ge=1, description="tubelet side in pixels (init: scratch)")
    tubelet_size: int = Field(2, ge=1, description="tubelet length in frames (init: scratch)")
    num_frames: int = Field(8, ge=1, description="frames per input clip")
    frame_step: int = Field(1, ge=1, description="take every n-th stored frame (pretrain takes every one)")
    input_size: int = Field(112, ge=8, description="input crop side in pixels")
    input_norm: Literal["auto", "none", "imagenet"] = Field("auto", description="input normalisation; auto: "
                                                            "what our pre-trained encoder records "
                                                            "(pretrain.input_norm, imagenet by default), "
                                                            "imagenet for scratch and VideoMAE")
    drop_path: float = Field(0.1, ge=0, lt=1, description="stochastic depth rate of the last block")
    head_dropout: float = Field(0.0, ge=0, lt=1, description="dropout before the head")
    head_init_scale: float = Field(0.001, gt=0, description="scale of the head's initial weights")
    layer_decay: float = Field(0.75, gt=0, le=1, description="lr x decay^(depth - i) for block i")
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="label smoothing of the soft targets")
    mixup: float = Field(0.8, ge=0, description="mixup beta alpha (0: off)")
    cutmix: float = Field(1.0, ge=0, description="cutmix beta alpha (0: off)")
    mixup_prob: float = Field(1.0, ge=0, le=1, description="probability of mixing a batch")
    mixup_switch_prob: float = Field(0.5, ge=0, le=1, description="probability of cutmix when both are on")
    crop_scale: tuple[float, float] = Field((0.08, 1.0), description="area fraction of random resized crops "
                                            "(VideoMAE's 0.08-1)")
    flip: bool = Field(False, description="random horizontal flips (wrong for direction-defined classes)")
    rand_augment: bool = Field(True, description="RandAugment, one op sequence per clip (VideoMAE: on)")
    rand_augment_ops: int = Field(4, ge=1, description="RandAugment ops per clip (VideoMAE's n4)")
    rand_augment_magnitude: int = Field(7, ge=0, le=30, description="RandAugment magnitude (VideoMAE's m7)")
    random_erasing: float = Field(0.25, ge=0, le=1, description="probability of erasing one random box of a "
                                  "training clip, the same box in every frame, with per-pixel noise that is "
                                  "standard normal after input normalisation (VideoMAE's --reprob 0.25, "
                                  "mode pixel, count 1; 0: off)")
    final_norm: bool = Field(False, description="keep the encoder's final LayerNorm before mean pooling "
                             "(this project's earlier head); false: VideoMAE's identity + fc_norm, a "
                             "pre-trained final norm is dropped")
    epochs: float | None = Field(None, gt=0, description="if set, train.steps = ceil(epochs x train clips "
                                 "/ train.batch_size)")
    eval_split: Literal["val", "test"] = Field("val", description="split evaluated")
    eval_clips: int = Field(2, ge=1, description="temporal windows per stored clip at evaluation "
                            "(VideoMAE's num_clips), spread evenly over it")
    eval_crops: int = Field(3, ge=1, description="spatial crops per temporal window at evaluation "
                            "(VideoMAE's num_crops), spread along the width")
    eval_resize: float | None = Field(1.0, ge=1, description="evaluation frames are resized to a short "
                                      "side of eval_resize x input_size before cropping (VideoMAE's test "
                                      "pipeline: the input size, 1.0); null: crop at the stored scale")
    eval_batch_size: int = Field(16, ge=1, description="views per evaluation batch")
    val_every: int | None = Field(50, ge=0, description="steps between validation scores during training "
                                  "(val loss and top-1 on the centre view of each labelled val clip, into "
                                  "history.csv, MLflow and curves.png; also after the last step); 0 or null: "
                                  "off. The full multi-view evaluation runs at the end either way")
    videomae_num_frames: int = Field(16, ge=1, description="frames a VideoMAE checkpoint was trained on")
    videomae_input_size: int = Field(224, ge=8, description="resolution a VideoMAE checkpoint was trained at")
    videomae_num_heads: int | None = Field(None, ge=1, description="heads of a VideoMAE checkpoint of "
                                           "unpublished width (null: from its width)")
    train: StageTrainParams = Field(TRAIN_DEFAULTS, description="optimisation (the shared loop's params)")

    @field_validator("crop_scale")
    @classmethod
    def _scale_is_a_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 < value[0] <= value[1] <= 1:
            raise ValueError(f"must be (low, high) with 0 < low <= high <= 1, got {value}")
        return value

    def clip_spec(self) -> ClipSpec:
        return ClipSpec(self.num_frames, self.frame_step, self.input_size)


def run(params: Params, *, clips: Path, encoder: Path, artifacts: Path, run_dir: Path, metrics: Path,
        reports: Path) -> dict[str, Path]:
    """Fine-tune on the train split of `clips` from `encoder` (or as `params.init` says), evaluate,
    and write the classifier, metrics and reports."""
    info = store_info(clips, params.clip_spec())
    place = init_distributed()
    torch.manual_seed(params.train.seed)
    source = init_source(params, encoder)
    model, encoder_config, init_report = build_model(params, source, len(info.class_names))
    train_set = training_clips(params, clips, model.input_norm)  # erasing needs the model's input norm
    train_params = resolve_steps(params, len(train_set))
    if place.is_main:
        log.info("fine-tuning (%s, init %s) on %d clips of %d classes for %d steps", params.mode,
                 init_report["init"], len(train_set), len(info.class_names), train_params.steps)
        current_run().log_metrics({"data/train_clips": len(train_set), "data/classes": len(info.class_names),
                               "data/steps": train_params.steps})
    mixup = VideoMixup(len(info.class_names), params.mixup, params.cutmix, params.mixup_prob,
                       params.mixup_switch_prob, params.label_smoothing)
    groups = layer_decay_param_groups(model, train_params.weight_decay, params.layer_decay)
    tick, key = time.perf_counter(), work_fingerprint(params, source, info, len(train_set), clips)
    result = train(model, train_set, classification_loss, train_params, run_dir, param_groups=groups,
                   collate_fn=mixup, fingerprint=key, unit="clip",
                   evaluation=validation(params, clips, train_params))
    train_seconds = time.perf_counter() - tick
    outputs = {"artifacts": artifacts, "metrics": metrics, "reports": reports}
    if not place.is_main:
        return outputs
    history = result.history  # the whole run's, also after resumes (it travels in the checkpoint)
    if not result.completed:
        log.info("stopped after step %d of %d (train.stop_after); rerun to continue", result.step,
                 train_params.steps)
        return outputs
    tick = time.perf_counter()
    views = evaluate(result.model, clips, params, train_params)
    summary = {**classification_metrics(views, info.class_names), "mode": params.mode,
               "init": init_report["init"], "train_steps": train_params.steps, "train_clips": len(train_set),
               "final_train_loss": history[-1]["loss"] if history else None}
    current_run().log_metrics({"time/train_seconds": train_seconds,
                               "time/eval_seconds": time.perf_counter() - tick})
    write_outputs(result.model, views, summary, history, info.class_names, outputs,
                  config=classifier_config(result.model, encoder_config, info.class_names),
                  init_report=init_report)
    log.info("finetune: top-1 %.3f (95%% interval %.3f-%.3f; most frequent class %.3f), top-%d %.3f over "
             "%d %s videos (%d views each); train %.0f s", summary["top1"], summary["top1_ci95_low"],
             summary["top1_ci95_high"], summary["top1_majority"], min(5, len(info.class_names)),
             summary[f"top{min(5, len(info.class_names))}"], summary["videos"], params.eval_split,
             summary["views_per_video"], train_seconds)
    return outputs


def run_from_paths(params: Params, paths: Paths) -> dict[str, Path]:
    return run(params, clips=paths.clips, encoder=paths.artifacts_of("pretrain") / "encoder.pt",
               artifacts=paths.artifacts_of("finetune"), run_dir=paths.runs_of("finetune"),
               metrics=paths.metrics_of("finetune"), reports=paths.reports_of("finetune"))


def training_clips(params: Params, clips: Path, input_norm: str) -> TrainClips:
    """The augmented training set; `input_norm` (the model's) sets the erased pixels' distribution."""
    return TrainClips(clips, "train", params.clip_spec(), scale=params.crop_scale, flip=params.flip,
                      rand_augment=(params.rand_augment_ops, params.rand_augment_magnitude)
                      if params.rand_augment else None, random_erasing=params.random_erasing,
                      norm=INPUT_NORMS[input_norm])


# ----------------------------------------------------------------------------- model


def init_source(params: Params, encoder: Path) -> Path | None:
    """The checkpoint to start from: None for scratch, the pre-trained encoder, or the given path."""
    if params.init == "scratch":
        return None
    path = encoder if params.init == "pretrain" else Path(params.init)
    if not path.exists():
        hint = (" (run `mam2 pretrain` first, or set finetune.init=scratch)" if params.init == "pretrain"
                else "")
        raise FileNotFoundError(f"finetune.init: checkpoint not found: {path}{hint}")
    return path


def scratch_config(params: Params) -> dict[str, Any]:
    """`build_encoder` kwargs of a randomly initialised encoder (the same keys pretrain records)."""
    overrides = {k: getattr(params, k) for k in ("depth", "embed_dim", "num_heads") if getattr(params, k)}
    return {"name": params.model, "img_size": params.input_size, "num_frames": params.num_frames,
            "patch_size": params.patch_size, "tubelet_size": params.tubelet_size, **overrides}


def build_model(params: Params, source: Path | None, num_classes: int
                ) -> tuple[VideoClassifier, dict[str, Any], dict[str, Any]]:
    """The classifier, its encoder's build config, and a report of how the encoder was initialised."""
    drop_path = 0.0 if params.mode == "linear" else params.drop_path
    size = {"img_size": params.input_size, "num_frames": params.num_frames}
    head_kw = {"head_init_scale": params.head_init_scale, "head_dropout": params.head_dropout,
               "final_norm": params.final_norm}
    try:
        if source is None:
            config = scratch_config(params)
            model = VideoClassifier(build_encoder(**config, drop_path_rate=drop_path), num_classes,
                                    input_norm=input_norm(params, "imagenet"), **head_kw)
            report: dict[str, Any] = {"init": "scratch"}
        elif is_our_encoder(source):
            encoder, config = load_encoder(source, **size, drop_path_rate=drop_path)
            report = {"init": str(source), "format": ENCODER_FORMAT, "keys": len(encoder.state_dict())}
            norm = input_norm(params, encoder_input_norm(source))  # auto: what pretrain fed it
            model = VideoClassifier(encoder, num_classes, input_norm=norm, **head_kw)
            if not params.final_norm:
                report["notes"] = ["the encoder's final norm is dropped: mean pooling + fc_norm (VideoMAE)"]
        else:
            encoder, config, head, conversion = load_videomae_encoder(
                source, **size, source_num_frames=params.videomae_num_frames,
                source_img_size=params.videomae_input_size, num_heads=params.videomae_num_heads,
                drop_path_rate=drop_path)
            had_norm = not isinstance(encoder.norm, torch.nn.Identity)
            model = VideoClassifier(encoder, num_classes, input_norm=input_norm(params, "imagenet"),
                                    **head_kw)
            if had_norm and not params.final_norm:
                conversion.notes.append("the encoder's final norm is dropped and fc_norm starts afresh "
                                        "(mean pooling, as VideoMAE fine-tunes a pre-trained checkpoint)")
            load_head(model, head, conversion)
            log.info("%s", conversion.summary())
            report = {"init": str(source), "format": "videomae", **conversion.as_dict()}
    except (EncoderCheckpointError, VideoMAEConversionError, ValueError) as err:
        raise StageError(f"finetune.init={params.init}: {err}") from err
    config = {**config, "drop_path_rate": 0.0}  # a saved classifier is for inference
    if params.mode == "linear":
        model.freeze_encoder()
    return model, config, report


def input_norm(params: Params, auto: str) -> str:
    """The input normalisation: as set, or for `auto` the one the encoder was (or, from scratch, is best)
    trained with. Centred inputs matter from scratch: [0, 1] clips learn motion far more slowly."""
    return auto if params.input_norm == "auto" else params.input_norm


def is_our_encoder(path: Path) -> bool:
    """Whether `path` is a `models.encoder_io` checkpoint (else it is taken for a VideoMAE one); our other
    checkpoint kinds (pretrain's model.pt, a classifier) are refused with a pointer to the right file."""
    try:
        state = read_weights(path)  # a torch checkpoint, or a safetensors export
    except CheckpointError as err:
        raise StageError(f"finetune.init: {path} is not a readable torch checkpoint ({err})") from err
    kind = state.get("format") if isinstance(state, dict) else None
    if isinstance(kind, str) and kind.startswith("mam2.") and kind != ENCODER_FORMAT:
        raise StageError(f"finetune.init: {path} is a {kind} checkpoint; give an encoder checkpoint "
                         f"({ENCODER_FORMAT}, e.g. artifacts/pretrain/encoder.pt) or a VideoMAE one")
    return kind == ENCODER_FORMAT


def classification_loss(model: torch.nn.Module, batch: dict) -> dict[str, torch.Tensor]:
    """Soft-target cross-entropy (mixup + label smoothing) and accuracy against the unmixed labels."""
    logits = model(batch["clip"])
    loss = SoftTargetCrossEntropy()(logits.float(), batch["target"])
    return {"loss": loss, "acc": (logits.argmax(dim=-1) == batch["label"]).float().mean()}


def resolve_steps(params: Params, num_clips: int) -> TrainParams:
    """The train params with `steps` derived from `epochs` when that is set."""
    if params.epochs is None:
        return params.train
    return params.train.model_copy(update={"steps": max(1, math.ceil(params.epochs * num_clips /
                                                                      params.train.batch_size))})


def work_fingerprint(params: Params, source: Path | None, info, num_clips: int, clips: Path) -> str:
    """Identifies a run's state: other model/data settings, another init file or rebuilt clips start
    afresh."""
    return fingerprint(params.model_dump(mode="json", exclude={"train", *EVAL_ONLY}),
                       input_stamp(source, clips), info.class_names, num_clips)


# ----------------------------------------------------------------------------- evaluation and outputs


def evaluate(model: VideoClassifier, clips: Path, params: Params, train_params: TrainParams) -> ViewScores:
    """Softmax scores of every (stored clip x crop) view of the evaluation split."""
    plan = view_plan(params)
    views = EvalViews(clips, params.eval_split, plan.spec, num_clips=plan.num_clips, num_crops=plan.num_crops,
                      short_side=plan.short_side)
    return score(model, views, params, train_params)


def view_plan(params: Params) -> ViewPlan:
    """The evaluation views of a stored clip: `eval_clips` windows x `eval_crops` crops after resizing the
    short side to `eval_resize` x `input_size` (`mam2 predict` cuts a video file's clips the same way)."""
    short_side = None if params.eval_resize is None else round(params.eval_resize * params.input_size)
    return ViewPlan(params.clip_spec(), params.eval_clips, params.eval_crops, short_side)


def score(model: VideoClassifier, views, params: Params, train_params: TrainParams) -> ViewScores:
    """Softmax scores of every item of a views dataset (`EvalViews`, `ClipViews`), in evaluation batches
    on the model's device."""
    device = next(model.parameters()).device
    return score_views(model, views, batch_size=params.eval_batch_size, device=device,
                       workers=train_params.workers, autocast_dtype=autocast_dtype(train_params, device))


def validation(params: Params, clips: Path, train_params: TrainParams) -> Evaluation | None:
    """The validation curve's evaluation every `val_every` steps, cheap beside the final one: the centre
    view (centre window, centre crop) of each labelled val clip; None when off or without val clips."""
    if not params.val_every:
        return None
    plan = view_plan(params)
    try:
        views = EvalViews(clips, "val", plan.spec, num_clips=1, num_crops=1, short_side=plan.short_side)
    except StageError as err:
        log.warning("no validation curve: %s", err)
        return None
    return Evaluation(lambda model: validation_scores(score(model, views, params, train_params)),
                      params.val_every, prefix="val")


def validation_scores(views: ViewScores) -> dict[str, float]:
    """"loss": the mean cross-entropy of the views; "top1_centre": the per-video top-1 of their scores."""
    _, scores, labels = average_per_video(views)
    picked = views.scores[np.arange(len(views.labels)), views.labels]
    return {"loss": float(-np.log(np.clip(picked, 1e-12, None)).mean()),
            "top1_centre": float((scores.argmax(axis=1) == labels).mean())}


def write_outputs(model: VideoClassifier, views: ViewScores, summary: dict, history: list[dict],
                  class_names: list[str], out: dict[str, Path], *, config: dict, init_report: dict) -> None:
    """Classifier + init report; the summary (reports/finetune/results.json) and its headline (the
    metrics file); history, confusion image and per-video predictions. Adds "results" to `out`."""
    with atomic_dir(out["artifacts"]) as tmp:
        save_classifier(model, config, tmp / "classifier.pt")
        write_json(tmp / "init_report.json", init_report)
    image = confusion_image(np.asarray(summary["confusion"]), class_names)
    with atomic_dir(out["reports"]) as tmp:
        write_history(history, tmp / "history.csv")
        save_png(image, tmp / "confusion.png")
        save_png(training_curves(history, len(class_names), curves_title(summary)), tmp / "curves.png")
        write_json(tmp / "predictions.json", predictions(views, class_names))
    k = min(5, len(class_names))
    out.update(write_results(summary, reports=out["reports"], metrics=out["metrics"],
                             headline=headline(k)))
    mlrun = current_run()
    mlrun.log_metrics({"val/top1": summary["top1"], f"val/top{k}": summary[f"top{k}"],
                         "val/majority_top1": summary["top1_majority"],  # `mam2 runs` shows it beside top1
                         "val/top1_ci95_low": summary["top1_ci95_low"],
                         "val/top1_ci95_high": summary["top1_ci95_high"],
                         "val/top1_single_view": summary["top1_single_view"],
                         **{f"val/acc_{name}": acc
                            for name, acc in summary["per_class"].items() if acc is not None}})
    mlrun.log_image(image, "finetune/confusion.png")
    mlrun.log_artifact(out["metrics"])
    mlrun.log_artifact(out["reports"], "finetune")
    mlrun.log_model(out["artifacts"], "classifier", model_type="video-classifier", params=config)


def curves_title(summary: dict) -> str:
    """The title of curves.png: what was fine-tuned from what, and how validation was scored."""
    return (f"fine-tuning ({summary['mode']}, init {Path(str(summary['init'])).name}): training and "
            f"validation curves; validation on the centre view of each val clip")


def headline(k: int) -> tuple[str, ...]:
    """metrics/finetune.json's keys (DVC's columns): top-1 with its 95% interval and its trivial
    baseline (the most frequent class), top-k, and how many videos they count. The rest of the summary
    (per class, confusion, init) is in reports/finetune/results.json."""
    return ("top1", "top1_ci95_low", "top1_ci95_high", "top1_majority", f"top{k}", "videos")


def predictions(views: ViewScores, class_names: list[str]) -> list[dict]:
    """Per video: its id and source file (the clips store's `videos` table), true and predicted class and
    the averaged score of the prediction."""
    ids, scores, labels = average_per_video(views)
    pred = scores.argmax(axis=1)
    names = views.video_names
    return [{"video": int(v), **({"path": names[int(v)]} if names is not None else {}),
             "label": class_names[int(y)], "pred": class_names[int(p)], "score": round(float(s[p]), 4)}
            for v, s, y, p in zip(ids, scores, labels, pred, strict=True)]


if __name__ == "__main__":
    raise SystemExit(stage_cli.main(sys.modules[__name__]))
