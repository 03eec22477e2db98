"""Every recipe params file in recipes/ validates against the stages it configures, and the ViT-B
recipe builds the paper's model."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

from pipeline.core.params import Paths, read_params_file, validate_section

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_section_of_a_recipe_validates(recipe: Path) -> None:
    doc = read_params_file(recipe)
    assert doc, f"{recipe.name} is empty"
    for section in doc:
        model = Paths if section == "paths" else importlib.import_module(f"stages.{section}").Params
        validate_section(doc, section, model)  # raises ParamsError naming the bad key


def test_the_vit_b_recipe_is_the_papers_model_and_schedule() -> None:
    from models.video_vit import build_encoder
    from stages import finetune, pretrain

    doc = read_params_file(Path(__file__).resolve().parents[1] / "recipes" / "vit_b.yaml")
    params = validate_section(doc, "pretrain", pretrain.Params)
    assert (params.num_frames, params.input_size, params.mask_ratio) == (16, 224, 0.9)
    assert params.heads() == {"decoder_dim": 384, "decoder_depth": 4, "decoder_heads": 6,
                              "regressor_depth": 4}
    with torch.device("meta"):
        encoder = build_encoder(**pretrain.encoder_config(params))
    assert encoder.grid == (8, 14, 14) and 86e6 < sum(p.numel() for p in encoder.parameters()) < 88e6
    train = params.train
    assert (train.betas, train.weight_decay, train.schedule) == ((0.9, 0.95), 0.05, "cosine")
    assert train.learning_rate() == pytest.approx(1.5e-4 * 2048 / 256)  # VideoMAE's lr x batch / 256
    tune = validate_section(doc, "finetune", finetune.Params)
    assert (tune.crop_scale, tune.random_erasing, tune.rand_augment) == ((0.08, 1.0), 0.25, True)


def test_each_mam2_ablation_sets_one_valid_pretrain_choice_and_the_rule_needs_every_seed() -> None:
    from recipes.mam2_ablations import ABLATIONS, render
    from stages import pretrain

    base = pretrain.Params()
    for ablation in ABLATIONS[1:]:
        pretrain.Params(**{**base.model_dump(), **ablation.change})  # validates
        assert len(ablation.change) == 1, ablation.name
    choices = {key for a in ABLATIONS for key in a.change}
    assert choices == {"regressor_block", "align_weight", "motion_min_std"}

    def rows(name: str, accs: list[float]) -> list[dict]:
        return [{"variant": name, "seed": seed, "seconds": 1.0, "appearance_acc": acc,
                 "appearance_acc_baseline": 0.04, "motion_mse": 0.8, "motion_mse_baseline": 0.8}
                for seed, acc in enumerate(accs)]

    report = render({"default": rows("default", [0.06, 0.07, 0.08]),
                     "cae_block": rows("cae_block", [0.07, 0.08, 0.09]),
                     "align": rows("align", [0.09, 0.06, 0.10])}, base, [0, 1, 2])
    assert "**cae_block**: code accuracy minus the default's 0.0100 ± 0.0000 (higher on 3 of 3 seeds); " \
           "beats the default on every seed" in report
    assert "**align**" in report and "(higher on 2 of 3 seeds); does not beat" in report
    assert "no_std_floor" not in report  # not run, not reported


def test_the_proof_says_which_pretrained_rows_fine_tune_worse_than_scratch() -> None:
    from recipes.mam2_proof import against_scratch

    def rows(full: list[float]) -> list[dict]:
        return [{"top1_full": top1} for top1 in full]

    by = {"mam2_E": rows([0.20, 0.22, 0.24]), "mam2_E/2": rows([0.30, 0.25, 0.20]),
          "videomae_E": rows([0.25, 0.25, 0.25]), "videomae_E/2": rows([0.80, 0.82, 0.84]),
          "scratch": rows([0.80, 0.84, 0.88])}
    line = against_scratch(by, "full")[0]
    assert "scratch 0.840 ± 0.040" in line
    assert "below it by more than the spread: mam2_E 0.220, mam2_E/2 0.250, videomae_E 0.250" in line
    assert "within the spread: videomae_E/2 0.820" in line and "every pre-training" not in line
    by["videomae_E/2"] = rows([0.3, 0.3, 0.3])
    assert "every pre-training made fine-tuning worse" in against_scratch(by, "full")[0]
