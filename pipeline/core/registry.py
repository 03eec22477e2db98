"""The stage registry: every stage of the pipeline by name, in DAG order.

One name per stage, the same in four places: the module `stages/<name>.py`, the `dvc.yaml` stage,
the `params.yaml` section and the Prefect task. The `mam2` command, the flow, params validation and
the contract tests read this list; the DAG's edges are the `dvc.yaml` deps and outs, written once.
"""

from __future__ import annotations

STAGES: tuple[str, ...] = ("demo_data", "decode", "tokenizer", "targets", "pretrain", "finetune",
                           "motion_pretrain", "pseudo_labels", "densify", "refine")
SECTIONS: tuple[str, ...] = ("paths", *STAGES)  # the top-level sections a params file may have


def module_name(stage: str) -> str:
    """The import path of a stage's module."""
    return f"stages.{stage}"
