"""sdkit.attention: capture goes through the installed processor and leaves the output
bit-identical, the hand computation equals diffusers', maps are normalised, and the token and
pointing helpers say where a word is. Uses conftest's tiny pipeline (``tiny_pipe``) and, for
the model card's pointing figure, the trained toy model (``toy_pipe``). Bad arguments are rows
of tests/test_bad_inputs.py's table."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from sdkit import shapes
from sdkit.attention import (
    AttentionStore,
    capture_io,
    check_head_weights,
    collect_pointing,
    cross_attention_by_hand,
    peak_inside,
    point_objects,
    pointing_rate,
    prompt_tokens,
    show_word_maps,
    token_indices,
)
from sdkit.checks import SdkitInputError
from sdkit.pipeline import generate

matplotlib.use("Agg")

T = 7  # tokens per prompt of the hand-made inputs


@pytest.fixture(scope="module")
def unet(tiny_pipe):
    """The tiny pipeline's UNet: cross-attention at 16x16 and 8x8, 7 attn2 layers."""
    return tiny_pipe.unet


@pytest.fixture(scope="module")
def tokenizer(tiny_pipe):
    return tiny_pipe.tokenizer  # the toy's real tokenizer


@pytest.fixture(scope="module")
def inputs(unet):
    g = torch.Generator().manual_seed(1)
    ctx = unet.config.cross_attention_dim
    # a guided batch: [uncond, cond] as the pipeline builds it
    return (torch.randn(2, 4, 16, 16, generator=g), torch.tensor(500),
            torch.randn(2, T, ctx, generator=g))


def attn2_layers(unet):
    return [m for n, m in unet.named_modules() if n.endswith("attn2")]


class DoubledContext(AttnProcessor2_0):
    """A processor that changes what the layer computes (like a hypernetwork): the context
    is doubled before the key and value."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        if encoder_hidden_states is not None:
            encoder_hidden_states = 2 * encoder_hidden_states
        return super().__call__(attn, hidden_states, encoder_hidden_states, *args, **kwargs)


# ----------------------------------------------------------------------------- capture


@torch.no_grad()
def test_capture_does_not_change_the_output_or_the_processors(unet, inputs):
    before = unet.attn_processors
    plain = unet(*inputs).sample
    with AttentionStore(unet) as store:
        captured = unet(*inputs).sample
        assert unet.attn_processors == before  # recorded through them, not replaced
    assert torch.equal(plain, captured)  # bit-identical, not just close
    assert len(store.records) == len(attn2_layers(unet)) == 7
    assert all(not m._forward_hooks for m in unet.modules())  # every hook came off
    unet(*inputs)
    assert len(store.records) == 7  # nothing recorded outside the block


@torch.no_grad()
def test_capture_records_what_the_installed_processor_computes(unet, inputs):
    x, t, ctx = inputs
    attn = attn2_layers(unet)[0]
    saved = unet.attn_processors
    unet.set_attn_processor(DoubledContext())
    try:
        with capture_io(attn) as calls, AttentionStore(unet, dtype=torch.float32) as store:
            unet(x, t, ctx)
    finally:
        unet.set_attn_processor(saved)
    _, doubled = cross_attention_by_hand(attn, calls[0]["hidden_states"], 2 * ctx)
    _, plain = cross_attention_by_hand(attn, calls[0]["hidden_states"], ctx)
    kept = store.records[0][2][0]
    assert torch.allclose(kept, doubled[1].mean(0), atol=1e-6)
    assert not torch.allclose(kept, plain[1].mean(0), atol=1e-4)


@torch.no_grad()
def test_capture_with_an_attention_mask_is_bit_identical(unet, inputs):
    x, t, ctx = inputs
    mask = torch.ones(2, T)
    mask[:, -2:] = 0  # the last two tokens are padding
    plain = unet(x, t, ctx, encoder_attention_mask=mask).sample
    with AttentionStore(unet, dtype=torch.float32) as store:
        captured = unet(x, t, ctx, encoder_attention_mask=mask).sample
    assert torch.equal(plain, captured)
    maps = store.word_maps()
    assert maps[-2:].abs().max() < 1e-6  # masked tokens get no attention
    assert torch.allclose(maps.sum(0), torch.ones(16, 16), atol=1e-5)


@torch.no_grad()
def test_hand_cross_attention_equals_the_diffusers_layer(unet, inputs):
    for attn in attn2_layers(unet):
        with capture_io(attn) as calls:
            unet(*inputs)
        assert len(calls) == 1
        c = calls[0]
        assert c["encoder_hidden_states"].shape == (2, T, unet.config.cross_attention_dim)
        out, probs = cross_attention_by_hand(attn, c["hidden_states"], c["encoder_hidden_states"])
        hw = c["hidden_states"].shape[1]
        assert probs.shape == (2, attn.heads, hw, T)
        assert torch.allclose(probs.sum(-1), torch.ones(2, attn.heads, hw), atol=1e-6)
        assert torch.allclose(out, c["output"], atol=1e-5), (out - c["output"]).abs().max()
    assert not attn._forward_hooks  # capture_io removed its hook


@torch.no_grad()
def test_store_keeps_the_head_average_of_the_conditional_half(unet, inputs):
    attn = attn2_layers(unet)[0]
    with capture_io(attn) as calls, AttentionStore(unet, dtype=torch.float32) as store:
        unet(*inputs)
    _, probs = cross_attention_by_hand(attn, calls[0]["hidden_states"],
                                       calls[0]["encoder_hidden_states"])
    name, step, kept = store.records[0]
    assert name.startswith("down_blocks.0") and step == 0
    assert kept.shape == (1, 256, T) and kept.device.type == "cpu"
    assert torch.allclose(kept[0], probs[1].mean(0), atol=1e-6)  # item 1 = cond half
    assert not torch.allclose(kept[0], probs[0].mean(0), atol=1e-4)  # not the uncond half


@torch.no_grad()
def test_guided_false_keeps_every_item_and_float16_is_the_default(unet, inputs):
    with AttentionStore(unet, guided=False) as store:
        unet(*inputs)
    assert store.records[0][2].shape[0] == 2
    assert store.records[0][2].dtype == torch.float16


@torch.no_grad()
def test_word_maps_shape_normalisation_and_selection(unet, inputs):
    with AttentionStore(unet, dtype=torch.float32) as store:
        unet(*inputs)
        unet(*inputs)  # a second "step"
    # before aggregation: every pixel's distribution over tokens sums to 1
    for _, _, p in store.records:
        assert torch.allclose(p.sum(-1), torch.ones(p.shape[:2]), atol=1e-5)
    assert store.num_steps == 2 and store.resolutions_seen == [16, 8]
    maps = store.word_maps()
    assert maps.shape == (T, 16, 16)
    assert torch.allclose(maps.sum(0), torch.ones(16, 16), atol=1e-5)  # still after averaging
    assert store.word_maps(resolution=8).shape == (T, 16, 16)
    assert store.word_maps(resolution=8, size=8).shape == (T, 8, 8)
    first = store.word_maps(steps=[0])
    assert torch.allclose(first, store.word_maps(steps=[1]), atol=1e-6)  # same input twice
    one = store.layers[0]
    only = store.word_maps(layers=[one], steps=[0])
    assert torch.allclose(only, store.records[0][2][0].T.reshape(T, 16, 16), atol=1e-6)
    assert not torch.allclose(store.word_maps(resolution=16), store.word_maps(resolution=8))


@torch.no_grad()
def test_resolutions_limit_what_is_kept(unet, inputs):
    with AttentionStore(unet, resolutions=(8,)) as store:
        unet(*inputs)
    assert store.resolutions_seen == [8] and len(store.records) == 4  # down, mid, 2 up


def test_word_maps_need_records_and_reset_forgets_them(unet, inputs):
    """State, not a bad argument (those are rows of tests/test_bad_inputs.py): a store has
    maps only between a recorded call and ``reset``."""
    store = AttentionStore(unet)
    with pytest.raises(SdkitInputError, match="no records"):
        store.word_maps()
    with torch.no_grad(), store:
        unet(*inputs)
    assert store.word_maps().shape == (T, 16, 16)
    store.reset()
    with pytest.raises(SdkitInputError, match="no records"):
        store.word_maps()


# ----------------------------------------------------------------------------- tokens


def test_token_indices(tokenizer):
    p = "a red circle on the left and a blue square on the right"
    assert token_indices(tokenizer, p, "circle") == [3]
    assert token_indices(tokenizer, p, "red circle") == [2, 3]
    assert token_indices(tokenizer, p, "a blue square") == [8, 9, 10]
    assert token_indices(tokenizer, p, "right") == [13]
    assert prompt_tokens(tokenizer, p)[3] == "circle"
    assert prompt_tokens(tokenizer, p)[0] == "<|startoftext|>"
    # a word the toy vocabulary lacks is split into pieces: several positions
    pieces = token_indices(tokenizer, "a purple star on the left", "purple")
    assert len(pieces) > 1 and pieces[0] == 2
    assert "".join(prompt_tokens(tokenizer, "a purple star")[i] for i in pieces) == "purple"


# ----------------------------------------------------------------------------- pointing


def test_peak_inside():
    mask = np.zeros((64, 64), bool)
    mask[8:24, 40:56] = True  # top right
    m = torch.zeros(16, 16)
    m[4, 12] = 1.0  # the 16x16 cell over (y=16..20, x=48..52)
    assert peak_inside(m, mask)
    m2 = torch.zeros(16, 16)
    m2[12, 2] = 1.0  # bottom left
    assert not peak_inside(m2, mask)
    assert peak_inside(m.numpy(), mask)  # numpy maps too


def test_point_objects_on_a_drawn_scene(tokenizer):
    ex = shapes.render([shapes.Obj("red", "circle", "left"), shapes.Obj("blue", "square", "right")],
                       seed=0)
    maps = torch.zeros(tokenizer.model_max_length, 16, 16)
    i_red, i_circle = token_indices(tokenizer, ex.caption, "red circle")
    maps[[i_red, i_circle], 8, 4] = 1.0  # over the circle, on the left
    maps[token_indices(tokenizer, ex.caption, "blue square"), 8, 4] = 1.0  # wrong place
    res = point_objects(ex.image, maps, ex.caption, tokenizer)
    assert [r["obj"].shape for r in res] == ["circle", "square"]
    assert [r["hit"] for r in res] == [True, False]
    assert res[0]["indices"] == [i_red, i_circle] and res[0]["mask"].shape == (64, 64)
    drawn = ex.masks[0] > 0.5  # the circle as it was drawn
    assert (res[0]["mask"] & drawn).sum() > 0.8 * drawn.sum()  # the checker's blob is it
    assert point_objects(np.full((64, 64, 3), 230, np.uint8), maps, ex.caption, tokenizer) == []


def test_collect_pointing_images_are_the_pipelines(tiny_pipe):
    prompts, seeds = ["a red circle on the left", "a blue square at the top"], [3, 4]
    res = collect_pointing(tiny_pipe, prompts, seeds, num_inference_steps=2)
    assert [r["prompt"] for r in res] == prompts and [r["seed"] for r in res] == seeds
    for r in res:  # capture leaves the image as generate makes it
        plain = np.asarray(generate(tiny_pipe, r["prompt"], r["seed"], 2))
        assert np.array_equal(r["image"], plain)
        assert r["maps"].shape == (tiny_pipe.tokenizer.model_max_length, 16, 16)


@pytest.mark.timeout(300, func_only=True)
def test_pointing_rate_of_the_toy_model(toy_pipe):
    """The model card's figure on the first eval prompts (one-object ones), with the card's
    seeds: every object found is hit (notebook 04 measures one- and two-object prompts)."""
    prompts, seeds = shapes.eval_prompts(240)[:3], [10_000, 10_001, 10_002]
    figs = pointing_rate(toy_pipe, prompts, seeds)
    assert figs == {"attention_pointing": 1.0, "attention_objects": 3,
                    "attention_pointing_one": 1.0, "attention_objects_one": 3,
                    "attention_pointing_two": 0.0, "attention_objects_two": 0}


SOLUTION = Path(__file__).resolve().parent.parent / "notebooks" / "solutions" / \
    "04_text_and_cross_attention.py"


@pytest.fixture(scope="module")
def head_inputs(unet, inputs):
    """The 8x8 level's first attn2 (2 heads of 16) and its inputs in one guided call."""
    attn = attn2_layers(unet)[1]
    with capture_io(attn) as calls, torch.no_grad():
        unet(*inputs)
    return attn, calls[0]["hidden_states"], calls[0]["encoder_hidden_states"]


def test_head_weights_checker_accepts_the_reference_solution(head_inputs, capsys):
    attn, x, ctx = head_inputs
    namespace = {"attn": attn, "x": x, "ctx": ctx, "torch": torch}  # what the notebook has
    exec(SOLUTION.read_text(encoding="utf-8"), namespace)
    assert check_head_weights(namespace["my_head_weights"], attn, x, ctx, head=1) is True
    assert "Correct" in capsys.readouterr().out
    right = namespace["my_head_weights"](attn, x, ctx, 1).detach()
    assert check_head_weights(right, attn, x, ctx, head=1) is True  # a tensor answer too
    assert check_head_weights(right.numpy(), attn, x, ctx, head=1) is True


def _wrong(kind):
    """Plausible wrong answers to notebook 04's exercise, as functions."""
    def fn(attn, x, ctx, head):
        d = attn.to_q.out_features // attn.heads
        cols = slice(head * d, (head + 1) * d)
        if kind == "head-0":  # the first head's slice whatever `head` says
            cols = slice(0, d)
        q, k = attn.to_q(x)[0, :, cols], attn.to_k(ctx)[0, :, cols]
        scores = q @ k.T
        if kind == "width":  # scaled by the layer's width instead of the head's size
            return (scores / attn.to_q.out_features ** 0.5).softmax(-1)
        if kind == "no-softmax":
            return scores / d ** 0.5
        if kind == "softmax-over-pixels":
            return (scores / d ** 0.5).softmax(0)
        if kind == "transposed":
            return (scores / d ** 0.5).softmax(-1).T
        return (scores / d ** 0.5).softmax(-1)
    return fn


@pytest.mark.parametrize("kind, hint", [("width", "1/sqrt(d)"), ("head-0", "slice"),
                                        ("no-softmax", "sum to 1"),
                                        ("softmax-over-pixels", "softmax over the last axis"),
                                        ("transposed", "shape")])
def test_head_weights_checker_rejects_plausible_mistakes_with_a_hint(head_inputs, capsys, kind,
                                                                     hint):
    attn, x, ctx = head_inputs
    assert check_head_weights(_wrong(kind), attn, x, ctx, head=1) is False
    out = capsys.readouterr().out
    assert "Not quite" in out and hint in out, out


def test_head_weights_checker_tries_random_inputs_too(head_inputs, capsys):
    """A copy of the result on the layer's inputs is not a function of the inputs."""
    attn, x, ctx = head_inputs
    copied = cross_attention_by_hand(attn, x, ctx)[1][0, 1]
    assert check_head_weights(copied, attn, x, ctx, head=1) is True  # as a tensor: right
    assert check_head_weights(lambda *args: copied, attn, x, ctx, head=1) is False
    assert "on random inputs" in capsys.readouterr().out


def test_head_weights_checker_unsolved_and_broken_answers(head_inputs, capsys):
    attn, x, ctx = head_inputs

    def unsolved(attn, x, ctx, head):
        ...

    for answer in (None, unsolved):
        assert check_head_weights(answer, attn, x, ctx, head=1) is False
        assert "not solved yet" in capsys.readouterr().out.lower()
    for wrong in ("weights", [[1, 2], [3]], lambda *a: 1 / 0, lambda *a: "text"):
        assert check_head_weights(wrong, attn, x, ctx, head=1) is False  # never raises
        assert "Not quite" in capsys.readouterr().out


def test_show_word_maps(tokenizer):
    p = "a red circle on the left"
    tokens = prompt_tokens(tokenizer, p)
    maps = torch.rand(tokenizer.model_max_length, 16, 16)
    fig = show_word_maps(np.zeros((64, 64, 3), np.uint8), maps, tokens)
    titled = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titled == ["image"] + [f"{i}: {t}" for i, t in enumerate(tokens)][1:-1]
