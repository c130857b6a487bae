"""sdkit.evaluation: the model card's figures, the card itself, and notebook 12's checker.
(Bad inputs: tests/test_bad_inputs.py.)"""

import json
import shutil

import pytest

from sdkit import evaluation, pipeline, training
from sdkit.checks import SdkitInputError

TOY = pipeline.TOY_DIR
needs_model = pytest.mark.skipif(
    not (TOY / "evaluation.json").exists(),
    reason="data/toy-sd is not evaluated: run `python -m sdkit.evaluation`")
VAE_PSNR_BAR = 36.0  # dB: the model card's bar for the shipped VAE (measured 36.56)


@needs_model
def test_shipped_vae_meets_the_cards_psnr_bar(toy_pipe):
    p = training.heldout_psnr(toy_pipe.vae)
    assert p >= VAE_PSNR_BAR
    assert p == pytest.approx(pipeline.evaluation_figures()["vae_psnr_db"], abs=0.01)
    assert training.heldout_psnr(training.make_vae()) < 20  # an untrained VAE is far off


@needs_model
def test_small_evaluation_meets_the_bars():
    """A small version of `python -m sdkit.evaluation`; thresholds a little below the bars."""
    figs = evaluation.evaluate(TOY, n_prompts=32, write_card=False, attention_prompts=12,
                               sweep_prompts=16, log=lambda *a: None)
    assert figs["vae_psnr_db"] >= 31.5
    assert figs["objects_colour_shape"] >= 0.90
    assert figs["one_shape_all_attributes"] >= 0.75
    assert figs["two_shape_all_attributes"] >= 0.60
    # conditioning matters: the empty prompt scores far lower on the same prompts
    assert figs["uncond_one_shape_all_attributes"] <= 0.35
    assert figs["guidance_3"]["all_attributes"] > figs["guidance_0"]["all_attributes"] + 0.3
    assert figs["attention_pointing"] >= 0.6
    n_one, n_two = figs["attention_objects_one"], figs["attention_objects_two"]
    assert n_one + n_two == figs["attention_objects"]
    # the CLIP score ranks: drawn pictures >= generated ones > the unconditional model's
    assert figs["clip_score_drawn"] + 2 >= figs["clip_score_generated"]
    assert figs["clip_score_generated"] > figs["clip_score_unconditional"] + 5
    assert figs["stock_defaults_two_shape_all_attributes"] >= 0.5


@needs_model
def test_card_is_the_template_filled_with_the_shipped_figures(tmp_path):
    """The shipped README.md is exactly what the template makes of evaluation.json and
    training.json (so the card cannot drift from the figures)."""
    folder = tmp_path / "toy-sd"
    shutil.copytree(TOY, folder)
    (folder / "README.md").unlink()
    figs = pipeline.evaluation_figures(folder)
    card = evaluation._write_model_card(folder, figs)
    assert card.read_text() == (TOY / "README.md").read_text()
    assert json.loads((folder / "evaluation.json").read_text()) == figs
    assert "{" not in card.read_text().split("```")[-1]  # no placeholder left unfilled


def test_a_refused_card_writes_nothing(tmp_path):
    """Figures without evaluate's keys are refused (a row of tests/test_bad_inputs.py) before
    anything is written: no half-filled card, no evaluation.json."""
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(SdkitInputError):
        evaluation._write_model_card(tmp_path, {"n_prompts": 8})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_index.json"]


def test_figures_and_record_are_empty_for_a_folder_without_them(tmp_path):
    assert pipeline.evaluation_figures(tmp_path) == {}
    assert pipeline.training_info(tmp_path) == {}
    (tmp_path / "training.json").write_text(json.dumps({"recipe": {"unet_steps": 3}}))
    assert pipeline.training_info(tmp_path) == {"recipe": {"unet_steps": 3}}


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as e:
        evaluation._main(["--help"])
    assert e.value.code == 0
    assert "--no-card" in capsys.readouterr().out
