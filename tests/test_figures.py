"""No figure about the kit's model typed into prose that the model card contradicts.

The notebooks print the card's figures from ``data/toy-sd/evaluation.json`` at run time
(``pipeline.evaluation_figures()``). This test reads every markdown cell of every notebook
and every percentage or dB figure in it: each must be one of the card's figures (at the
precision written), or be listed in ``NOT_ABOUT_THE_MODEL`` with the reason it is not a claim
about the model (a figure of real SD, a paper's, a property of arithmetic).
"""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CARD = json.loads((ROOT / "data" / "toy-sd" / "evaluation.json").read_text())
FIGURE = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)\s?(%|dB)")

# (notebook prefix, figure as written): why it is not about the kit's model
NOT_ABOUT_THE_MODEL: dict[tuple[str, str], str] = {
    ("01", "6.8%"): "sqrt(alphabar_999) of SD's scaled_linear schedule, arithmetic on its betas",
    ("02", "25%"): "the resolution of a share of four prompts (1/4), arithmetic",
    ("04", "50%"): "chance for a choice between two captions, arithmetic",
    ("05", "20dB"): "what a PSNR means to the eye, not a measurement",
    ("05", "30dB"): "what a PSNR means to the eye, not a measurement",
    ("10", "10%"): "a training setting (the empty-prompt share p_uncond), not a measured figure",
    ("10", "30%"): "a training setting (the hypernetwork's p_uncond), not a measured figure",
    ("12", "10%"): "a training setting (the recipe's p_uncond), not a measured figure",
}


def _leaves(d):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from ((f"{k}.{kk}", vv) for kk, vv in _leaves(v))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            yield k, float(v)


def card_matches(number: str, unit: str) -> bool:
    """True when ``number`` (as written, e.g. "80.0" or "36.6") is a card figure rounded to the
    digits written: shares as percentages, PSNR in dB."""
    digits = len(number.split(".")[1]) if "." in number else 0
    for key, v in _leaves(CARD):
        if unit == "%" and 0 <= v <= 1 and round(100 * v, digits) == float(number):
            return True
        if unit == "dB" and "db" in key and round(v, digits) == float(number):
            return True
    return False


def _markdown_figures():
    for p in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        for cell in json.loads(p.read_text())["cells"]:
            if cell["cell_type"] == "markdown":
                for m in FIGURE.finditer("".join(cell["source"])):
                    yield p.name[:2], m[1], m[2]


def test_card_matching_rounds_as_written():
    assert card_matches("80", "%") and card_matches("80.0", "%")
    assert card_matches("36.56", "dB") and card_matches("36.6", "dB")
    assert not card_matches("81", "%") and not card_matches("99", "%")
    assert not card_matches("97", "%")  # the stale "97% at s = 7.5" (the card: 77.1%)


@pytest.mark.parametrize("where,number,unit", list(_markdown_figures()),
                         ids=lambda x: str(x))
def test_markdown_figure_is_the_cards_or_not_about_the_model(where, number, unit):
    if (where, f"{number}{unit}") in NOT_ABOUT_THE_MODEL:
        return
    assert card_matches(number, unit), (
        f"notebook {where}'s markdown says {number}{unit}, which is no figure of "
        "data/toy-sd/evaluation.json: print the card's figure from a code cell "
        "(pipeline.evaluation_figures()) instead, or, if the figure is not about the kit's "
        "model, add it to NOT_ABOUT_THE_MODEL with the reason")
