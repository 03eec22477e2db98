"""Ship the flow model a recipe run trained: copy it to checkpoints/flow.pt with its provenance.

    python recipes/ship_flow.py [--run runs/recipes/motion_pretrain] [--seconds WALL]

Writes `checkpoints/flow.json`: the command and recipe, the commit, the steps, the device, the wall
time, the scores motion_pretrain measured on the whole `motion_gt` (and zero motion's), and a quick
check on the first clips that `tests/test_checkpoints.py` recomputes from the shipped file.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from models.flow_io import load_flow_model  # noqa: E402
from pipeline.core.params import read_params_file, validate_section  # noqa: E402
from pipeline.motion.evaluate import evaluate_flow_clip, evenly_spaced, flow_metrics  # noqa: E402
from stages import demo_data  # noqa: E402

CHECK_CLIPS, CHECK_PAIRS = 2, 4


def quick_check(model: torch.nn.Module, updates: int) -> dict[str, float]:
    """EPE on the first motion_gt clips (rendered as demo_data renders them), next to zero motion's."""
    params = validate_section(read_params_file(REPO / "params.yaml"), "demo_data", demo_data.Params)
    rows, zero = [], []
    for index in range(CHECK_CLIPS):
        clip = demo_data.motion_gt_clip(params, index)
        pairs = evenly_spaced(len(clip.flow), CHECK_PAIRS)
        rows.append(evaluate_flow_clip(model, clip.frames, clip.flow, updates, pairs=pairs)[0]["epe"])
        target = torch.from_numpy(clip.flow[pairs]).permute(0, 3, 1, 2)
        zero.append(flow_metrics(torch.zeros_like(target), target)["epe"])
    return {"clips": CHECK_CLIPS, "pairs_per_clip": CHECK_PAIRS, "flow_updates": updates,
            "epe": float(np.mean(rows)), "epe_zero_motion": float(np.mean(zero))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--run", type=Path, default=REPO / "runs/recipes/motion_pretrain")
    parser.add_argument("--recipe", type=Path, default=Path("recipes/motion_pretrain.yaml"))
    parser.add_argument("--seconds", type=float, required=True, help="wall time of the recipe run")
    args = parser.parse_args()
    recipe = read_params_file(REPO / args.recipe)
    scores = json.loads((args.run / "metrics" / "motion_pretrain.json").read_text())
    out = REPO / "checkpoints"
    out.mkdir(exist_ok=True)
    shutil.copyfile(args.run / "artifacts" / "motion_pretrain" / "flow.pt", out / "flow.pt")
    model = load_flow_model(out / "flow.pt").eval()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    provenance = {
        "model": "torchvision raft_small, trained from scratch by motion_pretrain",
        "command": f"mam2 motion_pretrain --params {args.recipe}", "recipe": recipe["motion_pretrain"],
        "commit": commit.strip(), "steps": recipe["motion_pretrain"]["flow_train"]["steps"],
        "device": f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "wall_seconds": round(args.seconds), "wall_note": "the whole recipe run: flow, tracker, scoring",
        "motion_gt": {k: v for k, v in scores.items() if k.startswith("flow_")},
        "check": quick_check(model, int(recipe["motion_pretrain"].get("eval_flow_updates", 8))),
    }
    (out / "flow.json").write_text(json.dumps(provenance, indent=2) + "\n")
    print(json.dumps(provenance, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
