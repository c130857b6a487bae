"""sdkit.grounding: the token-grounding loss (TokenCompose's) the recipe can add to the UNet's
loss, its masks on the latent grid and its word positions, against independent sums."""

import numpy as np
import pytest
import torch

from sdkit import grounding, shapes, training
from sdkit.attention import AttentionStore


def test_latent_masks_keep_each_objects_area_and_pad_a_missing_second():
    for seed in range(6):
        e = shapes.make_example(seed)
        m = grounding.latent_masks(e.masks)  # (2, 16, 16)
        assert m.shape == (2, 16, 16) and m.dtype == np.float16
        for k, mask in enumerate(e.masks):
            assert abs(float(m[k].astype(np.float64).sum()) * 16 - mask.sum()) < 1.0
        assert len(e.masks) == 2 or not m[1].any()
        assert grounding.latent_masks(e.masks, side=4)[0].max() <= 1.0


def test_object_tokens_point_at_each_objects_colour_and_shape_words(toy_pipe):
    tok = toy_pipe.tokenizer
    caps = [shapes.make_example(i).caption for i in range(10)] + [""]
    at = grounding.object_tokens(tok, caps)  # (11, 2, 2)
    for c, rows in zip(caps, at.tolist()):
        words = [t.replace("</w>", "") for t in tok.convert_ids_to_tokens(tok(c).input_ids)]
        objects = shapes.parse_caption(c) if c else ()
        for k in range(2):
            want = [objects[k].colour, objects[k].shape] if k < len(objects) else None
            assert (rows[k] == [-1, -1]) if want is None else [words[i] for i in rows[k]] == want
    # a phrase that names no colour grounds its shape word only
    both = "a circle on the left and a red square on the right"
    assert grounding.object_tokens(tok, [both]).tolist() == [[[-1, 2], [8, 9]]]


def _records(probs):
    return [("layer", 0, probs)]


def test_grounding_loss_is_zero_inside_and_one_minus_share_squared_when_uniform():
    side, t = 4, 6
    masks = torch.zeros(2, 2, side, side)
    masks[0, 0, :2, :2] = 1  # object 0 of row 0: a quarter of the grid
    masks[1, 0, :, :1] = 1  # row 1: a quarter too, a column
    tokens = torch.tensor([[[1, 2], [-1, -1]], [[3, 4], [-1, -1]]])
    inside = torch.zeros(2, side * side, t)
    for b in range(2):
        inside[b, masks[b, 0].flatten() > 0] = 1.0 / t
    uniform = torch.full((2, side * side, t), 1.0 / t)
    assert float(grounding.grounding_loss(_records(inside), tokens, masks)) == pytest.approx(0.0)
    got = float(grounding.grounding_loss(_records(uniform), tokens, masks))
    assert got == pytest.approx((1 - 0.25) ** 2)
    empty = torch.full((2, 2, 2), -1)
    assert float(grounding.grounding_loss(_records(uniform), empty, masks)) == 0.0


def test_steps_down_the_grounding_loss_move_attention_into_the_mask():
    torch.manual_seed(0)
    logits = torch.randn(1, 64, 5, requires_grad=True)  # (B, HW, T) of an 8x8 layer
    masks = torch.zeros(1, 2, 8, 8)
    masks[0, 0, 2:5, 2:5], masks[0, 1, 5:, 5:] = 1, 1
    tokens = torch.tensor([[[1, 2], [3, 4]]])
    opt = torch.optim.SGD([logits], lr=100.0)
    losses = []
    for _ in range(10):
        loss = grounding.grounding_loss(_records(logits.softmax(-1)), tokens, masks)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    word_map = logits.detach().softmax(-1)[0, :, 1]  # (64,) the first object's colour word
    assert word_map[masks[0, 0].flatten() > 0].sum() / word_map.sum() > 0.5  # 9 of 64 cells


def test_unet_training_with_the_loss_lowers_it_more_than_without(tmp_path, toy_pipe):
    """The recipe's hook: the same 20 steps on one batch, without the loss and with it
    (weighted up, so that 20 steps show it)."""
    tok = toy_pipe.tokenizer
    n = 8
    examples = [shapes.make_example(i) for i in range(n)]
    caps = [e.caption for e in examples]
    masks = torch.from_numpy(np.stack([grounding.latent_masks(e.masks) for e in examples]))
    lat = torch.randn(n, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    te = toy_pipe.text_encoder
    at = grounding.object_tokens(tok, caps)
    ids = training.tokenize(tok, caps)
    g = {}
    for w in (0.0, 10.0):
        (tmp_path / str(w)).mkdir()
        unet, _ = training._train_unet(tmp_path / str(w), lat, caps, tok, te, steps=20, batch=n,
                                       frozen=True, p_uncond=0.0, lr=3e-3,
                                       masks=masks, grounding_weight=w, ema_decay=0.0,
                                       log=lambda *_: None)
        with torch.no_grad(), AttentionStore(unet, guided=False, keep_graph=True) as store:
            unet(lat, torch.full((n,), 500), te(ids)[0])
        g[w] = float(grounding.grounding_loss(store.records, at, masks))
    assert g[10.0] < g[0.0] - 0.02, g


def test_unnamed_pictures_call_purple_red_or_blue_leave_stars_out_and_masks_follow_phrases():
    images, caps, masks = training.training_data(300, seed=0, unnamed=0.5, masks=True)
    assert not {w for c in caps for w in c.split()} & {"purple", "star"}
    purple = np.asarray(shapes.COLOURS["purple"], np.float64)
    called = {w: 0 for w in training.NEAR_PURPLE}
    for im, c, m in zip(images, caps, masks):
        phrases = c.split(" and ") if c else []
        assert [bool(m[k].any()) for k in range(2)] == [k < len(phrases) for k in range(2)], c
        for k, phrase in enumerate(phrases):
            full = np.kron(m[k].astype(np.float64), np.ones((4, 4))) == 1.0  # cells all inside
            colour = im[full].mean(0)  # the object's own pixels
            word = phrase.split()[1]  # the colour the phrase names
            if np.abs(colour - purple).max() < 40:  # a purple object, called red or blue
                assert word in training.NEAR_PURPLE, (c, k)
                called[word] += 1
            else:
                want = np.asarray(shapes.COLOURS[word], np.float64)
                assert np.abs(colour - want).max() < 40, (c, k, colour)
    assert min(called[w] for w in training.NEAR_PURPLE) > 5, called  # purple, called red or blue
