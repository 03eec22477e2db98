"""The `mam2` command: `mam2 <stage> [--params FILE] [--set section.key=value ...]` and the other commands.

`mam2 <stage>` runs the stage's command line (`pipeline.core.stage_cli`, the same as
`python -m stages.<stage>`); the other commands (`check-params`, `pipeline`, `serve`, `runs`,
`experiment`, `evaluate`, `predict`, `export`, ...) are listed by `mam2 --help`. Stage modules are
imported only when needed (their imports are slow).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.core import stage_cli
from pipeline.core.params import DEFAULT_PARAMS_FILE, ParamsError
from pipeline.core.registry import STAGES
from pipeline.orchestrate.stage_loader import load_stage, stage_summary, validate_all


def _serve(argv: list[str]) -> int:
    from pipeline.orchestrate.serve import main as serve_main

    return serve_main(argv)


def _pipeline(argv: list[str]) -> int:
    from pipeline.orchestrate.pipeline_cli import main as pipeline_main

    return pipeline_main(argv)


def _experiment(argv: list[str]) -> int:
    from pipeline.orchestrate.experiment import main as experiment_main

    return experiment_main(argv)


def _runs(argv: list[str]) -> int:
    from pipeline.orchestrate.runs_table import main as runs_main

    return runs_main(argv)


def _evaluate(argv: list[str]) -> int:
    from pipeline.orchestrate.evaluate_cli import main as evaluate_main

    return evaluate_main(argv)


def _predict(argv: list[str]) -> int:
    from pipeline.orchestrate.predict_cli import main as predict_main

    return predict_main(argv)


def _export(argv: list[str]) -> int:
    from pipeline.orchestrate.export_cli import main as export_main

    return export_main(argv)


def _flow(argv: list[str]) -> int:
    from pipeline.motion.flow_cli import main as flow_main

    return flow_main(argv)


def _track(argv: list[str]) -> int:
    from pipeline.motion.track_cli import main as track_main

    return track_main(argv)


COMMANDS = {
    "check-params": ("validate every section of a params file", None),
    "pipeline": ("run the Prefect flow here or as the served deployment; a failure names the stage "
                 "and its error (mam2 pipeline --help)", _pipeline),
    "serve": ("serve the Prefect deployment mam2/full (mam2 serve --help)", _serve),
    "runs": ("table of MLflow runs and their key metrics (mam2 runs --help)", _runs),
    "experiment": ("run a named experiment (mam2 experiment mam2-vs-videomae --help)", _experiment),
    "evaluate": ("score a stage's saved model again without training: finetune, tokenizer, "
                 "motion_pretrain, refine (mam2 evaluate --help)", _evaluate),
    "predict": ("top-5 classes of video files with the fine-tuned classifier (mam2 predict --help)",
                _predict),
    "export": ("export the encoder or classifier to VideoMAE's layout or safetensors, the flow model to "
               "a torchvision RAFT state dict (mam2 export --help)", _export),
    "flow": ("colour-coded optical-flow video of a video file, beside its frames (mam2 flow --help)",
             _flow),
    "track": ("points tracked through a video file, drawn with trails and occlusion; tracks to "
              "JSON/CSV (mam2 track --help)", _track),
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `mam2` command; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in STAGES:
        return stage_cli.main(load_stage(argv[0]), argv[1:])
    if argv and COMMANDS.get(argv[0], (None, None))[1] is not None:
        return COMMANDS[argv[0]][1](argv[1:])
    lines = [f"  {name:<16}{stage_summary(name)}" for name in STAGES]
    commands = [f"  {name:<16}{text}" for name, (text, _) in COMMANDS.items()]
    parser = argparse.ArgumentParser(
        prog="mam2", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="MAM2 video pre-training and motion-model refinement pipeline.",
        epilog="stages (mam2 <stage> --help for its params):\n" + "\n".join(lines)
        + "\n\nother commands:\n" + "\n".join(commands))
    parser.add_argument("command", nargs="?", help="a stage name or one of the other commands")
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS_FILE)
    args = parser.parse_args(argv)
    if args.command == "check-params":
        try:
            validate_all(args.params)
        except ParamsError as err:
            print(f"mam2: {err}", file=sys.stderr)
            return stage_cli.USAGE_EXIT_CODE
        print(f"{args.params}: valid ({', '.join(['paths', *STAGES])})")
        return 0
    parser.print_help()
    return 0 if args.command is None else stage_cli.USAGE_EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())
