"""sdkit.attention: capture is bit-identical, the hand computation equals diffusers', maps are
normalised, and the token and pointing helpers say where a word is."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0

from sdkit import shapes
from sdkit.attention import (
    AttentionStore,
    capture_io,
    check_head_weights,
    check_token_index,
    cross_attention_by_hand,
    peak_inside,
    point_objects,
    prompt_tokens,
    show_word_maps,
    token_indices,
)
from sdkit.checks import SdkitInputError

matplotlib.use("Agg")

T, CTX = 7, 16  # tokens per prompt, text width of the tiny model


@pytest.fixture(scope="module")
def unet():
    """A tiny random UNet2DConditionModel with cross-attention at 8x8 and 4x4."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=CTX,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4),
    ).eval()


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    # a guided batch: [uncond, cond] as the pipeline builds it
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor(500),
            torch.randn(2, T, CTX, generator=g))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from sdkit.toy import write_tokenizer

    return write_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def attn2_layers(unet):
    return [m for n, m in unet.named_modules() if n.endswith("attn2")]


# ----------------------------------------------------------------------------- capture


@torch.no_grad()
def test_capture_does_not_change_the_output(unet, inputs):
    plain = unet(*inputs).sample
    with AttentionStore(unet) as store:
        captured = unet(*inputs).sample
    assert torch.equal(plain, captured)  # bit-identical, not just close
    assert len(store.records) == len(attn2_layers(unet)) == 7
    # processors are given back on leaving the block
    assert all(type(p) is AttnProcessor2_0 for p in unet.attn_processors.values())


@torch.no_grad()
def test_capture_with_an_attention_mask_is_bit_identical(unet, inputs):
    x, t, ctx = inputs
    mask = torch.ones(2, T)
    mask[:, -2:] = 0  # the last two tokens are padding
    plain = unet(x, t, ctx, encoder_attention_mask=mask).sample
    with AttentionStore(unet, dtype=torch.float32) as store:
        captured = unet(x, t, ctx, encoder_attention_mask=mask).sample
    assert torch.equal(plain, captured)
    assert store.word_maps()[-2:].abs().max() < 1e-6  # masked tokens get no attention


@torch.no_grad()
def test_hand_cross_attention_equals_the_diffusers_layer(unet, inputs):
    for attn in attn2_layers(unet):
        with capture_io(attn) as calls:
            unet(*inputs)
        assert len(calls) == 1
        c = calls[0]
        assert c["encoder_hidden_states"].shape == (2, T, CTX)
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
    assert kept.shape == (1, 64, T) and kept.device.type == "cpu"
    assert torch.allclose(kept[0], probs[1].mean(0), atol=1e-6)  # item 1 = cond half


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
    assert store.num_steps == 2 and store.resolutions_seen == [8, 4]
    maps = store.word_maps()
    assert maps.shape == (T, 8, 8)
    assert torch.allclose(maps.sum(0), torch.ones(8, 8), atol=1e-5)  # still after averaging
    assert store.word_maps(resolution=4).shape == (T, 8, 8)
    assert store.word_maps(resolution=4, size=4).shape == (T, 4, 4)
    first = store.word_maps(steps=[0])
    assert torch.allclose(first, store.word_maps(steps=[1]), atol=1e-6)  # same input twice
    one = store.layers[0]
    only = store.word_maps(layers=[one], steps=[0])
    assert torch.allclose(only, store.records[0][2][0].T.reshape(T, 8, 8), atol=1e-6)
    assert not torch.allclose(store.word_maps(resolution=8), store.word_maps(resolution=4))


@torch.no_grad()
def test_resolutions_limit_what_is_kept(unet, inputs):
    with AttentionStore(unet, resolutions=(4,)) as store:
        unet(*inputs)
    assert store.resolutions_seen == [4] and len(store.records) == 4  # down, mid, 2 up


def test_word_maps_errors(unet, inputs):
    store = AttentionStore(unet)
    with pytest.raises(SdkitInputError, match="no records"):
        store.word_maps()
    with torch.no_grad(), store:
        unet(*inputs)
    with pytest.raises(SdkitInputError, match="resolution"):
        store.word_maps(resolution=16)
    with pytest.raises(SdkitInputError, match="steps"):
        store.word_maps(steps=[3])
    with pytest.raises(SdkitInputError, match="layers"):
        store.word_maps(layers=["no.such.layer"])
    with pytest.raises(SdkitInputError, match="item"):
        store.word_maps(item=1)
    store.reset()
    with pytest.raises(SdkitInputError, match="no records"):
        store.word_maps()
    with pytest.raises(SdkitInputError, match="unet"):
        AttentionStore("not a unet")


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


def test_token_indices_errors(tokenizer):
    with pytest.raises(SdkitInputError, match="word='square'"):
        token_indices(tokenizer, "a red circle on the left", "square")
    with pytest.raises(ValueError, match="word"):
        token_indices(tokenizer, "a red circle on the left", "")
    with pytest.raises(SdkitInputError, match="prompt"):
        token_indices(tokenizer, 42, "circle")
    with pytest.raises(SdkitInputError, match="at most"):
        token_indices(tokenizer, " ".join(["a red circle"] * 8), "circle")


def test_check_token_index(tokenizer, capsys):
    p = "a red circle on the left"
    assert check_token_index(3, tokenizer, p, "circle")
    assert not check_token_index(2, tokenizer, p, "circle")
    assert "start token" in capsys.readouterr().out
    assert not check_token_index(None, tokenizer, p, "circle")


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
    with pytest.raises(SdkitInputError, match="word_map"):
        peak_inside(torch.zeros(2, 16, 16), mask)
    with pytest.raises(SdkitInputError, match="mask"):
        peak_inside(m, np.zeros((2, 64, 64), bool))


def test_point_objects_on_a_drawn_scene(tokenizer):
    ex = shapes.render([shapes.Obj("red", "circle", "left"), shapes.Obj("blue", "square", "right")],
                       seed=0)
    T = tokenizer.model_max_length
    maps = torch.zeros(T, 16, 16)
    i_red, i_circle = token_indices(tokenizer, ex.caption, "red circle")
    maps[[i_red, i_circle], 8, 4] = 1.0  # over the circle, on the left
    maps[token_indices(tokenizer, ex.caption, "blue square"), 8, 4] = 1.0  # wrong place
    res = point_objects(ex.image, maps, ex.caption, tokenizer)
    assert [r["obj"].shape for r in res] == ["circle", "square"]
    assert [r["hit"] for r in res] == [True, False]
    assert res[0]["indices"] == [i_red, i_circle] and res[0]["mask"].shape == (64, 64)


def test_check_head_weights(unet, inputs, capsys):
    attn = attn2_layers(unet)[1]
    with capture_io(attn) as calls, torch.no_grad():
        unet(*inputs)
    x, ctx = calls[0]["hidden_states"], calls[0]["encoder_hidden_states"]
    d = attn.to_q.out_features // attn.heads
    q = attn.to_q(x)[0, :, d:2 * d]  # head 1 of item 0: (HW, d)
    k = attn.to_k(ctx)[0, :, d:2 * d]  # (T, d)
    right = (q @ k.T / d**0.5).softmax(-1)
    assert check_head_weights(right.detach(), attn, x, ctx, head=1)
    assert not check_head_weights((q @ k.T / (attn.heads * d) ** 0.5).softmax(-1).detach(),
                                  attn, x, ctx, head=1)
    assert not check_head_weights(right.T.detach(), attn, x, ctx, head=1)
    assert "shape" in capsys.readouterr().out
    with pytest.raises(SdkitInputError, match="head"):
        check_head_weights(right, attn, x, ctx, head=attn.heads)


def test_show_word_maps(tokenizer):
    p = "a red circle on the left"
    tokens = prompt_tokens(tokenizer, p)
    maps = torch.rand(tokenizer.model_max_length, 16, 16)
    fig = show_word_maps(np.zeros((64, 64, 3), np.uint8), maps, tokens)
    titled = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titled == ["image"] + [f"{i}: {t}" for i, t in enumerate(tokens)][1:-1]
    with pytest.raises(SdkitInputError, match="maps"):
        show_word_maps(np.zeros((64, 64, 3), np.uint8), maps[0], tokens)
    with pytest.raises(SdkitInputError, match="tokens"):
        show_word_maps(np.zeros((64, 64, 3), np.uint8), maps[:3], tokens)
