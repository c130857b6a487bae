"""The shapes world: drawing is deterministic and the pixel checker reads it back."""

import numpy as np
import pytest

from sdkit import shapes
from sdkit.checks import SdkitInputError


def test_deterministic_by_seed():
    a, b, c = shapes.make_example(7), shapes.make_example(7), shapes.make_example(8)
    assert np.array_equal(a.image, b.image) and a.caption == b.caption
    assert not np.array_equal(a.image, c.image)


def test_image_caption_and_masks():
    e = shapes.make_example(3, n_objects=2)
    assert e.image.shape == (64, 64, 3) and e.image.dtype == np.uint8
    assert len(e.objects) == len(e.masks) == 2 and " and " in e.caption
    assert all(m.shape == (64, 64) and m.dtype == bool and m.sum() > 50 for m in e.masks)
    assert not (e.masks[0] & e.masks[1]).any()  # the two shapes never overlap
    # background is pale: pixels away from the shapes' anti-aliased edges are bright and grey-ish
    from scipy.ndimage import binary_dilation

    bg = e.image[~binary_dilation(e.masks[0] | e.masks[1], iterations=2)].astype(int)
    assert bg.min() > 200 and (bg.max(1) - bg.min(1)).max() < 40


def test_caption_grammar_round_trip():
    for cap in shapes.all_captions()[::7]:
        assert shapes.caption_of(shapes.parse_caption(cap)) == cap
    assert shapes.parse_caption("a blue square at the top and a green triangle at the bottom") == (
        shapes.Obj("blue", "square", "top"), shapes.Obj("green", "triangle", "bottom"))


def test_all_captions_counts():
    caps = shapes.all_captions()
    singles = [c for c in caps if " and " not in c]
    assert len(singles) == 4 * 3 * 5
    assert len(caps) - len(singles) == 12 * 11 * 2 * 2
    assert not any("purple" in c or "star" in c for c in caps)  # kept out of training


def test_checker_scores_ground_truth_at_least_99_percent():
    ok, n = 0, 0
    for seed in range(50_000, 50_600):  # the whole world, held-out colour and shape included
        e = shapes.make_example(seed, colours=tuple(shapes.COLOURS), shapes=shapes.SHAPES)
        scores = shapes.check_image(e.image, e.caption)
        ok += sum(s.all_attributes for s in scores)
        n += len(scores)
    assert ok / n >= 0.99, f"checker accuracy {ok / n:.3f} on ground truth"


def test_checker_notices_wrong_attributes():
    e = shapes.render([shapes.Obj("red", "circle", "left")], seed=1)
    assert shapes.prompt_correct(e.image, "a red circle on the left")
    assert not shapes.prompt_correct(e.image, "a red circle on the right")
    assert not shapes.prompt_correct(e.image, "a blue circle on the left")
    assert not shapes.prompt_correct(e.image, "a red square on the left")
    blank = np.full((64, 64, 3), 240, np.uint8)
    assert shapes.find_blobs(blank) == []


@pytest.mark.parametrize(
    "bad", ["a red circle", "a pink circle on the left", "", "two red circles"])
def test_parse_caption_refuses_other_text(bad):
    with pytest.raises(ValueError, match="caption"):
        shapes.parse_caption(bad)


def test_bad_inputs_name_the_parameter():
    with pytest.raises(ValueError, match="shape='hexagon'"):
        shapes.render([shapes.Obj("red", "hexagon", "left")], seed=0)
    with pytest.raises(ValueError, match="seed=-1"):
        shapes.make_example(-1)
    with pytest.raises(ValueError, match="image"):
        shapes.find_blobs(np.zeros((64, 64), np.uint8))
    assert issubclass(SdkitInputError, ValueError)
