"""The shapes world: drawing is deterministic and the pixel checker reads it back."""

import numpy as np

from sdkit import shapes


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
        scores = shapes.score_image(e.image, e.caption)
        ok += sum(s.all_attributes for s in scores)
        n += len(scores)
    assert ok / n >= 0.99, f"checker accuracy {ok / n:.3f} on ground truth"


def test_checker_notices_wrong_attributes():
    e = shapes.render([shapes.Obj("red", "circle", "left")], seed=1)
    assert shapes.prompt_correct(e.image, "a red circle on the left")
    assert not shapes.prompt_correct(e.image, "a red circle on the right")
    assert not shapes.prompt_correct(e.image, "a blue circle on the left")
    assert not shapes.prompt_correct(e.image, "a red square on the left")


def test_checker_scores_a_drawn_scene_right_and_a_blank_image_wrong():
    """The checker must see what is drawn and must not see what is not: a checker that never
    finds anything (or always does) fails here."""
    caption = "a blue square at the top and a green triangle at the bottom"
    scene = shapes.render(shapes.parse_caption(caption), seed=5).image
    blank = np.full((64, 64, 3), 240, np.uint8)
    assert shapes.find_blobs(blank) == []
    drawn = shapes.score_image(scene, caption)
    assert [(s.colour_shape, s.all_attributes) for s in drawn] == [(True, True)] * 2
    assert [s.found.position for s in drawn] == ["top", "bottom"]
    assert [(s.colour_shape, s.all_attributes, s.found) for s in
            shapes.score_image(blank, caption)] == [(False, False, None)] * 2
    # the batch figures: one point per image, and they tell the two apart
    assert shapes.hits([scene, blank], caption) == [True, False]
    swapped = "a blue square at the bottom and a green triangle at the top"
    assert shapes.hits([scene], swapped) == [False]
    assert shapes.hits([scene], swapped, criterion="colour_shape") == [True]
    single = shapes.render(shapes.parse_caption("a red circle on the left"), seed=2).image
    figures = shapes.score_images([scene, blank, single],
                                  [caption, caption, "a red circle on the left"])
    assert figures == {"objects_colour_shape": 3 / 5, "one_shape_all_attributes": 1.0,
                       "two_shape_all_attributes": 0.5}
