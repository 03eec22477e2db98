"""`mam2 export --what encoder|classifier|flow --format ... --out PATH`: hand a trained model to other code.

- encoder (default artifacts/pretrain/encoder.pt) and classifier (artifacts/finetune/classifier.pt):
  - `videomae`: a torch file {"model": state dict, "mam2": our config} under VideoMAE's names
    (`models.videomae_convert`): the pre-trained layout (``encoder.*``) for an encoder, the fine-tuned one
    (no prefix, ``fc_norm.*``, ``head.*``) for a classifier. The attention bias becomes ``q_bias`` /
    ``v_bias``; the position table is stored as ``pos_embed`` (VideoMAE's learnt-table layout: build
    VideoMAE's model with ``use_learnable_pos_emb`` to use it, its fixed 1-D table is another one).
    finetune.init and `load_videomae_encoder` read it back (give the clip size it was exported at).
  - `safetensors`: our own keys and config (in the metadata) as safetensors; every loader of the
    project reads it (finetune.init, `mam2 predict --classifier`, `load_encoder`, `load_classifier`).
- flow (default artifacts/motion_pretrain/flow.pt; a refined one with --from artifacts/refine/<target>/
  flow.pt): `torchvision` (the bare state dict `torchvision.models.optical_flow.raft_small()` loads),
  `raft` (princeton-vl/RAFT's own names, ``module.``-prefixed as its checkpoints are) or `safetensors`
  (torchvision's keys, our format in the metadata).

Every export is read back before the command ends: identical tensors, or for the VideoMAE layout
identical outputs on a random clip (the dropped k bias cannot change them). Files are written atomically.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from models.checkpoint_io import CheckpointError, read_weights, write_safetensors
from models.classifier import FORMAT as CLASSIFIER_FORMAT
from models.classifier import load_classifier
from models.encoder_io import FORMAT as ENCODER_FORMAT
from models.encoder_io import encoder_input_norm, load_encoder
from models.flow import build_flow_model, load_flow_checkpoint, original_raft_state_dict
from models.flow_io import FLOW_FORMAT, load_flow_model
from models.video_vit import VideoViT
from models.videomae_convert import (
    load_videomae_classifier,
    load_videomae_encoder,
    videomae_classifier_state,
    videomae_encoder_state,
)
from pipeline.core import stage_cli
from pipeline.core.atomic import atomic_file
from pipeline.core.errors import StageError, require
from pipeline.core.params import ParamsError, Paths
from pipeline.core.progress import setup_logging
from pipeline.orchestrate.cli_support import add_params_arguments, load_sections

# what -> (the stage that makes it, its file there, the formats it exports to)
MODELS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "encoder": ("pretrain", "encoder.pt", ("videomae", "safetensors")),
    "classifier": ("finetune", "classifier.pt", ("videomae", "safetensors")),
    "flow": ("motion_pretrain", "flow.pt", ("torchvision", "raft", "safetensors")),
}
OUTPUT_TOLERANCE = 1e-4  # max |difference| of outputs allowed through the VideoMAE layout (float rounding)


@dataclass
class Exported:
    """What was written and what reading it back showed."""

    layout: str
    tensors: int
    check: str
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- checks
def same_tensors(expected: dict[str, Tensor], loaded: dict[str, Tensor], what: str) -> str:
    """'identical tensors' or a StageError naming the first key that differs."""
    if set(expected) != set(loaded):
        differ = sorted(set(expected) ^ set(loaded))[:8]
        raise StageError(f"{what}: keys differ after the round trip: {differ}")
    for key, value in expected.items():
        if not torch.equal(value.cpu(), loaded[key].cpu()):
            raise StageError(f"{what}: {key} differs after the round trip")
    return f"reads back with identical tensors ({len(expected)})"


@torch.no_grad()
def same_outputs(model: nn.Module, loaded: nn.Module, encoder: VideoViT, what: str) -> str:
    """Both models on one seeded random clip of the encoder's size: 'outputs agree' or a StageError."""
    t, h, w = encoder.grid
    clip = torch.rand(2, encoder.in_chans, t * encoder.tubelet_size, h * encoder.patch_size,
                      w * encoder.patch_size, generator=torch.Generator().manual_seed(0))
    diff = float((model.eval()(clip) - loaded.eval()(clip)).abs().max())
    if diff > OUTPUT_TOLERANCE:
        raise StageError(f"{what}: outputs differ after the round trip (max |diff| {diff:.3g})")
    return f"reads back with the same outputs on a random clip (max |diff| {diff:.2g})"


def clip_size(encoder: VideoViT) -> dict[str, int]:
    """The clip size an encoder was built for, as the VideoMAE loader's keywords."""
    t, h, _ = encoder.grid
    frames, side = t * encoder.tubelet_size, h * encoder.patch_size
    return {"img_size": side, "num_frames": frames, "source_num_frames": frames, "source_img_size": side,
            "num_heads": encoder.num_heads}


def save_torch(obj: object, out: Path) -> None:
    """torch.save, atomically."""
    with atomic_file(out) as tmp:
        torch.save(obj, tmp)


# ----------------------------------------------------------------------------- exports
def export_encoder(source: Path, fmt: str, out: Path) -> Exported:
    """Our encoder checkpoint to VideoMAE's pre-trained layout or to safetensors."""
    encoder, config = load_encoder(source)
    fields = {"format": ENCODER_FORMAT, "config": config, "input_norm": encoder_input_norm(source)}
    if fmt == "safetensors":
        write_safetensors(encoder.state_dict(), out, fields)
        return Exported("safetensors (our encoder keys)", len(encoder.state_dict()),
                        same_tensors(encoder.state_dict(), load_encoder(out)[0].state_dict(), str(out)))
    state, notes = videomae_encoder_state(encoder)
    save_torch({"model": state, "mam2": fields}, out)
    loaded = load_videomae_encoder(out, **clip_size(encoder))[0]
    return Exported("VideoMAE pre-trained layout", len(state),
                    same_outputs(encoder, loaded, encoder, str(out)), notes)


def export_classifier(source: Path, fmt: str, out: Path) -> Exported:
    """Our classifier to VideoMAE's fine-tuned layout or to safetensors."""
    model, config = load_classifier(source)
    fields = {"format": CLASSIFIER_FORMAT, "config": config}
    if fmt == "safetensors":
        write_safetensors(model.state_dict(), out, fields)
        return Exported("safetensors (our classifier keys)", len(model.state_dict()),
                        same_tensors(model.state_dict(), load_classifier(out)[0].state_dict(), str(out)))
    state, notes = videomae_classifier_state(model)
    save_torch({"model": state, "mam2": fields}, out)
    loaded = load_videomae_classifier(out, **clip_size(model.encoder), input_norm=model.input_norm)[0]
    return Exported("VideoMAE fine-tuned layout", len(state),
                    same_outputs(model, loaded, model.encoder, str(out)), notes)


def flow_variant(path: Path) -> str:
    """The RAFT variant of a flow file: our format names it; outside weights tell it by their keys."""
    obj = read_weights(path)
    if isinstance(obj, dict) and obj.get("format") == FLOW_FORMAT:
        return str(obj.get("name"))
    keys = obj.get("state_dict", obj) if isinstance(obj, dict) else {}
    large = ("mask_predictor.", "update_block.mask.")  # torchvision's and the original's upsampling mask
    is_large = any(str(k).removeprefix("module.").startswith(large) for k in keys)
    return "raft_large" if is_large else "raft_small"


def export_flow(source: Path, fmt: str, out: Path) -> Exported:
    """The flow model to a torchvision state dict, the original RAFT layout or safetensors."""
    name = flow_variant(source)
    model = load_flow_model(source, name)
    state = {key: value.detach().cpu() for key, value in model.state_dict().items()}
    if fmt == "safetensors":
        write_safetensors(state, out, {"format": FLOW_FORMAT, "name": name})
        loaded = load_flow_model(out).state_dict()
        return Exported(f"safetensors ({name}, torchvision keys)", len(state),
                        same_tensors(state, loaded, str(out)))
    if fmt == "raft":
        save_torch(original_raft_state_dict(state), out)
        layout = f"original RAFT state dict ({name})"
    else:
        save_torch(state, out)
        layout = f"torchvision state dict (torchvision.models.optical_flow.{name})"
    loaded = load_flow_checkpoint(build_flow_model(name), out).state_dict()
    return Exported(layout, len(state), same_tensors(state, loaded, str(out)))


EXPORTERS: dict[str, Callable[[Path, str, Path], Exported]] = {
    "encoder": export_encoder, "classifier": export_classifier, "flow": export_flow}


def default_source(what: str, paths: Paths) -> Path:
    stage, name, _ = MODELS[what]
    return paths.artifacts_of(stage) / name


# ----------------------------------------------------------------------------- command line
def parser() -> argparse.ArgumentParser:
    formats = "; ".join(f"{what}: {', '.join(fmts)}" for what, (_, _, fmts) in MODELS.items())
    out = argparse.ArgumentParser(
        prog="mam2 export", description=(__doc__ or "").strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  mam2 export --what classifier --format videomae --out /tmp/classifier_videomae.pth\n"
               "  mam2 export --what encoder --format safetensors --out /tmp/encoder.safetensors\n"
               "  mam2 export --what flow --format torchvision --out /tmp/raft_small.pth "
               "--from artifacts/refine/motion_gt/flow.pt")
    out.add_argument("--what", required=True, choices=list(MODELS), help="the model to export")
    out.add_argument("--format", required=True, dest="fmt", metavar="FORMAT",
                     choices=sorted({f for _, _, fmts in MODELS.values() for f in fmts}),
                     help=f"the file format ({formats})")
    out.add_argument("--out", required=True, type=Path, metavar="PATH", help="the file to write")
    out.add_argument("--from", dest="source", type=Path, metavar="PATH",
                     help="the model file to export (default: the stage's, under paths.artifacts)")
    add_params_arguments(out)
    return out


def main(argv: list[str] | None = None) -> int:
    """`mam2 export`; returns the exit code (2: bad command line or params, 1: the export failed)."""
    args = parser().parse_args(argv)
    setup_logging(args.log_level.upper())
    formats = MODELS[args.what][2]
    if args.fmt not in formats:
        print(f"mam2 export: a {args.what} exports to {', '.join(formats)}, not {args.fmt}", file=sys.stderr)
        return stage_cli.USAGE_EXIT_CODE
    try:
        _, paths = load_sections(args.params, args.overrides)
    except ParamsError as err:
        print(f"mam2 export: {err}", file=sys.stderr)
        return stage_cli.USAGE_EXIT_CODE
    source = args.source or default_source(args.what, paths)
    try:
        require(source, args.what, MODELS[args.what][0])
        if source.resolve() == args.out.resolve():
            raise StageError(f"--out {args.out} is the model being exported")
        result = EXPORTERS[args.what](source, args.fmt, args.out)
    except (StageError, CheckpointError, ValueError, OSError) as err:  # loaders raise ValueError subclasses
        print(f"mam2 export: error: {stage_cli.describe_error(err)}", file=sys.stderr)
        return stage_cli.ERROR_EXIT_CODE
    size = args.out.stat().st_size / 2**20
    print(f"mam2 export: {source} -> {args.out}: {result.layout}, {result.tensors} tensors, {size:.1f} MiB")
    print(f"  check: {result.check}")
    for note in result.notes:
        print(f"  note: {note}")
    return 0
