"""sdkit.variations: the toy unCLIP parts (encoder, projector, noise augmentation, variations).

A tiny random pipeline (conftest's ``tiny_pipe``) stands in for the toy model where only
shapes and determinism are tested; the last test measures quality on the trained toy model and
is skipped without it. Bad inputs are in tests/test_bad_inputs.py's table.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdkit import pipeline, shapes, variations

SMALL = dict(n_images=64, encoder_steps=3, projector_steps=3, batch=16, progress=False)


@pytest.fixture(scope="module")
def pipe(tiny_pipe):
    return tiny_pipe


def test_encoder_and_projector_shapes():
    enc = variations.ImageEncoder()
    e = enc(torch.randn(5, 3, 64, 64))
    assert e.shape == (5, variations.EMBED_DIM)
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(5))
    proj = variations.Projector(seq_len=20, hidden=32)
    h = proj(e, torch.tensor([0, 10, 500, 998, 999]))
    assert h.shape == (5, 20, 32)


def test_fit_is_deterministic_cached_and_leaves_the_global_rng(pipe):
    variations._CACHE.clear()
    state = torch.get_rng_state()
    a = variations.fit(pipe, seed=1, **SMALL)
    assert torch.equal(torch.get_rng_state(), state)
    assert variations.fit(pipe, seed=1, **SMALL) is a  # cached in memory
    variations._CACHE.clear()
    b = variations.fit(pipe, seed=1, **SMALL)
    c = variations.fit(pipe, seed=2, **SMALL)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert len(a.history["info_nce"]) == 3 and len(a.history["projector_mse"]) == 3


def test_embeddings_shape_and_determinism(pipe):
    model = variations.fit(pipe, seed=1, **SMALL)
    images = [shapes.make_example(i).image for i in range(3)]
    e1, e2 = variations.embed_images(model, images), variations.embed_images(model, images)
    assert e1.shape == (3, variations.EMBED_DIM) and torch.equal(e1, e2)
    pooled, hidden = variations.text_features(pipe, ["a red circle on the left"])
    assert pooled.shape == (1, 32) and hidden.shape == (1, pipeline.MAX_LENGTH, 32)


def test_info_nce_values():
    b = 8
    x = torch.randn(b, 16, generator=torch.Generator().manual_seed(0))
    # perfectly matched pairs with a large scale: the loss tends to 0
    assert variations.info_nce(x, x, torch.tensor(math.log(100.0))) < 0.05
    # scale exp(-inf) -> all logits equal: the loss is exactly log B (chance)
    loss = variations.info_nce(x, torch.randn(b, 16), torch.tensor(-1e4))
    torch.testing.assert_close(loss, torch.tensor(math.log(b)))
    y = torch.randn(b, 16)
    # symmetric in its two arguments
    torch.testing.assert_close(variations.info_nce(x, y, 1.0), variations.info_nce(y, x, 1.0))


def test_noise_augment_is_the_ddpm_formula_between_the_normalisation(pipe):
    model = variations.fit(pipe, seed=1, **SMALL)
    e = variations.embed_images(model, [shapes.make_example(0).image])
    noise = torch.randn(1, variations.EMBED_DIM, generator=torch.Generator().manual_seed(3))
    ac = variations._image_noising_scheduler().alphas_cumprod
    mu, sd = model.embeds_mean, model.embeds_std
    for level in (0, 300, 999):
        got = variations.noise_augment(model, e, level, noise=noise)
        want = mu + sd * (ac[level].sqrt() * (e - mu) / sd + (1 - ac[level]).sqrt() * noise)
        torch.testing.assert_close(got, want)
    near = variations.noise_augment(model, e, 0, noise=noise)
    assert torch.nn.functional.cosine_similarity(near, e).item() > 0.99


def test_canonical_caption_reads_left_to_right_and_top_to_bottom():
    objs = shapes.parse_caption("a blue square on the right and a red circle on the left")
    want = "a red circle on the left and a blue square on the right"
    assert variations.canonical_caption(objs) == want
    objs = shapes.parse_caption("a green triangle at the bottom and a red circle at the top")
    assert variations.canonical_caption(objs).startswith("a red circle at the top")


def test_variations_count_size_and_determinism(pipe):
    model = variations.fit(pipe, seed=1, **SMALL)
    image = shapes.make_example(5).image
    a = variations.variations(pipe, model, image, [0, 1], noise_level=100, num_inference_steps=2)
    b = variations.variations(pipe, model, image, [0, 1], noise_level=100, num_inference_steps=2)
    assert len(a) == 2 and a[0].size == (64, 64)
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
    assert not np.array_equal(np.asarray(a[0]), np.asarray(a[1]))


def test_embedding_a_picture_equals_embedding_its_tensor(pipe):
    """PIL, uint8 and a one-picture list give the same embedding (through images.to_tensor)."""
    model = variations.fit(pipe, seed=1, **SMALL)
    im = shapes.make_example(7).image
    e = variations.embed_images(model, im)
    assert e.shape == (1, variations.EMBED_DIM)
    assert torch.equal(e, variations.embed_images(model, Image.fromarray(im)))
    assert torch.equal(e, variations.embed_images(model, [im]))


SOLUTIONS = Path(__file__).resolve().parent.parent / "notebooks" / "solutions"
F = torch.nn.functional


def _loss(logits):
    return F.cross_entropy(logits, torch.arange(len(logits)))


def _one_way(img, txt, s):  # rows only: image -> text, not symmetric
    return _loss(s.exp() * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T)


def _not_normalised(img, txt, s):  # dot products instead of cosines
    logits = s.exp() * img @ txt.T
    return (_loss(logits) + _loss(logits.T)) / 2


def _scale_without_exp(img, txt, s):  # logit_scale used as the scale itself
    logits = s * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    return (_loss(logits) + _loss(logits.T)) / 2


def test_exercise_checker_accepts_the_reference_solution(capsys):
    namespace = {"torch": torch, "F": F}  # what notebook 10 has imported at its exercise
    exec((SOLUTIONS / "10_image_variations.py").read_text(encoding="utf-8"), namespace)
    assert variations.check_info_nce_answer(namespace["my_info_nce"]) is True
    assert "Right" in capsys.readouterr().out
    assert variations.check_info_nce_answer(variations.info_nce) is True


@pytest.mark.parametrize("fn, said", [
    (_one_way, "only the rows"),
    (_not_normalised, "not normalised"),
    (_scale_without_exp, "exp(logit_scale), not logit_scale"),
    (lambda img, txt, s: img @ txt.T, "shape"),  # the logits, not the loss
    (lambda img, txt, s: img.nope, "raised AttributeError"),
])
def test_exercise_checker_says_what_is_wrong_and_never_raises(fn, said, capsys):
    assert variations.check_info_nce_answer(fn) is False
    out = capsys.readouterr().out
    assert said in out and "Hint" in out


def test_exercise_checker_unsolved(capsys):
    def my_info_nce(image_embeds, text_embeds, logit_scale):
        ...  # the learner's cell as shipped

    assert variations.check_info_nce_answer(my_info_nce) is False
    assert "not solved yet" in capsys.readouterr().out.lower()


needs_toy = pytest.mark.skipif(not (pipeline.TOY_DIR / "model_index.json").exists(),
                               reason="no toy model yet (python -m sdkit.training train)")
RETRIEVAL_MIN_KINDS = 0.85  # measured on the final toy model: 0.94 (notebooks/10)


@needs_toy
def test_toy_encoder_retrieves_the_right_objects(toy_pipe):
    model = variations.fit(toy_pipe, seed=0, progress=False)
    test = [shapes.make_example(90_000 + i) for i in range(64)]
    guessed = variations.retrieve(model, toy_pipe, [e.image for e in test])
    kinds = np.mean([{(o.colour, o.shape) for o in shapes.parse_caption(g)}
                     == {(o.colour, o.shape) for o in e.objects} for g, e in zip(guessed, test)])
    assert kinds >= RETRIEVAL_MIN_KINDS, kinds
