"""sdkit.unet and notebook 03: each hand computation of the notebook (the sinusoidal timestep
embedding and its MLP, a ResNet block, a transformer block) equals diffusers' on the tiny
pipeline's UNet; the tracer's shapes and skips are those of the UNet's own forward (rebuilt
here call by call), on the tiny UNet and on SD 1.5's config on the meta device; each ablation
changes exactly what it says and leaves nothing behind; the exercise's checker accepts the
reference and names each plausible mistake. Bad arguments are rows of
tests/mistakes_notebooks.py."""

from __future__ import annotations

import math

import matplotlib
import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.embeddings import get_timestep_embedding

from sdkit import generation
from sdkit.checks import SdkitInputError
from sdkit.unet import (
    SD15_UNET,
    _skip_consumers,
    check_timestep_embedding,
    drop_skip,
    frozen_timestep,
    record_calls,
    trace_shapes,
    zero_cross_attention,
    zero_time_embedding,
)
from sdkit.unet_views import draw_trace

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def unet(tiny_pipe):
    """The tiny UNet: levels 16x16 and 8x8, one ResNet per down block, 4 skips."""
    return tiny_pipe.unet


@pytest.fixture(scope="module")
def inputs(unet):
    g = torch.Generator().manual_seed(3)
    return (torch.randn(1, 4, 16, 16, generator=g),
            torch.randn(1, 7, unet.config.cross_attention_dim, generator=g))


def run(unet, inputs, t=500, text=None):
    latents, ctx = inputs
    with torch.no_grad():
        return unet(latents, t, encoder_hidden_states=ctx if text is None else text).sample


def hooks_left(unet) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in unet.modules())


# ------------------------------------------------------------------------------ by hand


def sinusoid(t, dim, flip=True, shift=0):
    """Notebook 03's embedding, with all of get_timestep_embedding's settings."""
    h = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(h) / (h - shift))
    angles = t[:, None].float() * freqs[None]
    emb = torch.cat([angles.cos(), angles.sin()] if flip else [angles.sin(), angles.cos()], -1)
    return F.pad(emb, (0, dim % 2))


def test_sd15_config_moved_here_and_generation_still_has_it():
    assert generation.SD15_UNET is SD15_UNET


def test_timestep_embedding_by_hand_equals_time_proj_and_diffusers(unet):
    t = torch.tensor([0, 3, 250, 999])
    tp = unet.time_proj
    assert torch.allclose(sinusoid(t, tp.num_channels, tp.flip_sin_to_cos,
                                   tp.downscale_freq_shift), tp(t), atol=1e-6)
    for dim, flip, shift in ((320, True, 0), (128, False, 1), (33, False, 1), (8, True, 1)):
        want = get_timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
        assert torch.allclose(sinusoid(t, dim, flip, shift), want, atol=1e-5), (dim, flip, shift)


def test_time_embedding_mlp_by_hand(unet):
    te, t_emb = unet.time_embedding, unet.time_proj(torch.tensor([1, 700]))
    with torch.no_grad():
        z = te.linear_1(t_emb)
        by_hand = te.linear_2(z * torch.sigmoid(z))
        assert torch.allclose(by_hand, te(t_emb), atol=1e-6)


def group_norm(z, norm):
    b, c, h, w = z.shape
    g = z.reshape(b, norm.num_groups, -1)
    g = (g - g.mean(-1, keepdim=True)) / torch.sqrt(g.var(-1, unbiased=False, keepdim=True)
                                                     + norm.eps)
    return g.reshape(b, c, h, w) * norm.weight[:, None, None] + norm.bias[:, None, None]


@pytest.mark.parametrize("where", ["down_blocks.0.resnets.0", "down_blocks.1.resnets.0",
                                   "up_blocks.0.resnets.0"])
def test_resnet_block_by_hand_equals_diffusers(unet, inputs, where):
    resnet = unet.get_submodule(where)
    with record_calls(resnet) as calls:
        run(unet, inputs)
    x, temb = calls[0]["args"]
    with torch.no_grad():
        h = resnet.conv1(F.silu(group_norm(x, resnet.norm1)))
        h = h + resnet.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = resnet.conv2(F.silu(group_norm(h, resnet.norm2)))
        short = x if resnet.conv_shortcut is None else resnet.conv_shortcut(x)
        by_hand = (short + h) / resnet.output_scale_factor
    assert torch.allclose(by_hand, calls[0]["output"], atol=1e-5)
    assert len(calls) == 1 and hooks_left(unet) == 0


def attention(attn, x, ctx):
    b, n, _ = x.shape
    q, k, v = attn.to_q(x), attn.to_k(ctx), attn.to_v(ctx)
    d = q.shape[-1] // attn.heads
    q, k, v = (z.view(b, -1, attn.heads, d).transpose(1, 2) for z in (q, k, v))
    w = (q @ k.transpose(-1, -2) / math.sqrt(d)).softmax(-1)
    return attn.to_out[0]((w @ v).transpose(1, 2).reshape(b, n, -1))


@pytest.mark.parametrize("where", ["down_blocks.0.attentions.0", "mid_block.attentions.0",
                                   "up_blocks.1.attentions.1"])
def test_transformer_block_by_hand_equals_diffusers(unet, inputs, where):
    t2d = unet.get_submodule(where)
    block = t2d.transformer_blocks[0]
    with record_calls(t2d) as outer, record_calls(block) as inner:
        run(unet, inputs)
    x, ctx = inner[0]["args"][0], inner[0]["kwargs"]["encoder_hidden_states"]
    with torch.no_grad():
        n = block.norm1(x)
        z = x + attention(block.attn1, n, n)
        z = z + attention(block.attn2, block.norm2(z), ctx)
        hidden, gate = block.ff.net[0].proj(block.norm3(z)).chunk(2, -1)
        z = z + block.ff.net[2](hidden * F.gelu(gate))
        assert torch.allclose(z, inner[0]["output"], atol=1e-5)
        feat = outer[0]["args"][0]
        b, c, h, w = feat.shape
        seq = t2d.proj_in(t2d.norm(feat)).permute(0, 2, 3, 1).reshape(b, h * w, -1)
        seq = block(seq, encoder_hidden_states=ctx)
        out = t2d.proj_out(seq.reshape(b, h, w, -1).permute(0, 3, 1, 2)) + feat
        assert torch.allclose(out, outer[0]["output"][0], atol=1e-5)
    assert not block.attn1.is_cross_attention and block.attn2.is_cross_attention


def test_record_calls_keeps_copies_and_unhooks_after_an_error(unet, inputs):
    resnet = unet.down_blocks[0].resnets[0]
    with pytest.raises(RuntimeError), record_calls(resnet) as calls:
        run(unet, inputs)
        run(unet, inputs)
        raise RuntimeError("a failed cell")
    assert len(calls) == 2 and hooks_left(unet) == 0
    assert calls[0]["output"] is not calls[1]["output"]
    assert torch.equal(calls[0]["output"], calls[1]["output"])


# ------------------------------------------------------------------------------ the tracer


def forward_by_hand(unet, inputs):
    """conv_in, the down blocks and the mid block as UNet2DConditionModel.forward runs them:
    down_block_res_samples and the mid block's output."""
    latents, ctx = inputs
    with torch.no_grad():
        emb = unet.time_embedding(unet.time_proj(torch.tensor([500])))
        sample = unet.conv_in(latents)
        res = (sample,)
        for block in unet.down_blocks:
            sample, more = block(hidden_states=sample, temb=emb, encoder_hidden_states=ctx)
            res += more
        return res, unet.mid_block(sample, emb, encoder_hidden_states=ctx)


def test_trace_gives_the_forwards_own_skips_and_shapes(unet, inputs):
    records = trace_shapes(unet, seq_len=inputs[1].shape[1])
    res, mid = forward_by_hand(unet, inputs)
    made = [s for r in records for s in r.skips_out]
    assert [i for i, _ in made] == list(range(len(res)))  # one per down_block_res_samples
    assert [s for _, s in made] == [tuple(x.shape[1:]) for x in res]
    by = {r.name: r for r in records}
    assert by["mid_block"].output_shape == tuple(mid.shape[1:])
    # the up blocks take them last in, first out, as many as they have ResNets
    rest = list(range(len(res)))
    for i, up in enumerate(unet.up_blocks):
        k = len(up.resnets)
        assert [j for j, _ in by[f"up_blocks.{i}"].skips_in] == rest[-k:]
        rest = rest[:-k]
    assert rest == []
    assert by["conv_out"].output_shape == tuple(inputs[0].shape[1:])
    assert [r.kind for r in records][:3] == ["time", "time", "in"]
    # drop_skip's map, read from the blocks' structure, is the traced one
    traced = {j: (i, pos) for i in range(len(unet.up_blocks))
              for pos, (j, _) in enumerate(by[f"up_blocks.{i}"].skips_in)}
    assert _skip_consumers(unet) == traced
    assert hooks_left(unet) == 0


def test_trace_of_sd15_on_the_meta_device():
    with torch.device("meta"):
        sd15 = UNet2DConditionModel(**SD15_UNET)
    records = trace_shapes(sd15)
    by = {r.name: r for r in records}
    n_down = sum(b.downsamplers is not None for b in sd15.down_blocks)
    side = SD15_UNET["sample_size"]
    assert by["conv_in"].input_shape == (4, side, side)
    assert by["mid_block"].output_shape == (SD15_UNET["block_out_channels"][-1],
                                            side >> n_down, side >> n_down)
    made = [s for r in records for s in r.skips_out]
    assert len(made) == 1 + sum(SD15_UNET["layers_per_block"] + (b.downsamplers is not None)
                                for b in sd15.down_blocks)
    assert sorted(s for r in records for s in r.skips_in) == sorted(made)
    for i, c in enumerate(SD15_UNET["block_out_channels"]):  # down block i ends at width c
        assert by[f"down_blocks.{i}"].output_shape[0] == c
    assert by["time_embedding"].output_shape == (4 * SD15_UNET["block_out_channels"][0],)


def test_draw_trace_draws_every_stage_and_every_skip(unet):
    records = trace_shapes(unet)
    fig = draw_trace(records)
    ax = fig.axes[0]
    texts = " ".join(t.get_text() for t in ax.texts)
    path = [r for r in records if r.kind != "time"]
    assert all(r.name in texts for r in path)
    made = [i for r in records for i, _ in r.skips_out]
    assert all(f"#{i}" in texts for i in made)
    producer = {i: r.name for r in records for i, _ in r.skips_out}
    pairs = {(producer[i], r.name) for r in records for i, _ in r.skips_in}
    arrows = [t.arrow_patch for t in ax.texts if getattr(t, "arrow_patch", None) is not None]
    orange = matplotlib.colors.to_rgba("tab:orange")
    skips = [a for a in arrows if tuple(a.get_edgecolor()) == orange]
    assert len(skips) == len(pairs)  # one arrow per (down stage, up block) pair
    assert len(arrows) - len(skips) == len(path) - 1  # the main path, stage to stage


# ------------------------------------------------------------------------------ ablations


def test_zero_time_embedding_makes_the_output_blind_to_t(unet, inputs):
    plain = run(unet, inputs, 100)
    assert not torch.allclose(plain, run(unet, inputs, 900))
    with zero_time_embedding(unet):
        assert torch.equal(run(unet, inputs, 100), run(unet, inputs, 900))
    assert torch.equal(run(unet, inputs, 100), plain) and hooks_left(unet) == 0


def test_frozen_timestep_is_that_timestep_at_every_call(unet, inputs):
    at_0 = run(unet, inputs, 0)
    with frozen_timestep(unet, 0):
        assert torch.allclose(run(unet, inputs, 700), at_0, atol=1e-6)
    assert not torch.allclose(run(unet, inputs, 700), at_0) and hooks_left(unet) == 0


@pytest.mark.parametrize("index", [0, 2, 3])
def test_drop_skip_zeros_that_skip_where_it_is_taken(unet, inputs, index):
    plain = run(unet, inputs)
    with drop_skip(unet, index) as (block, pos):
        up = unet.up_blocks[block]
        with record_calls(up) as calls:
            dropped = run(unet, inputs)
    got = calls[0]["kwargs"]["res_hidden_states_tuple"]
    assert not got[pos].any() and all(t.any() for k, t in enumerate(got) if k != pos)
    res, _ = forward_by_hand(unet, inputs)
    assert got[pos].shape == res[index].shape
    assert not torch.allclose(dropped, plain)
    assert torch.equal(run(unet, inputs), plain) and hooks_left(unet) == 0


def test_zero_cross_attention_everywhere_cuts_the_text_off(unet, inputs):
    other = torch.randn(inputs[1].shape, generator=torch.Generator().manual_seed(9))
    assert not torch.allclose(run(unet, inputs), run(unet, inputs, text=other))
    with zero_cross_attention(unet, 16) as fine, zero_cross_attention(unet, 8) as coarse:
        assert torch.equal(run(unet, inputs), run(unet, inputs, text=other))
    names = [n for n, _ in unet.named_modules() if n.endswith("attn2")]
    assert sorted(fine + coarse) == sorted(names)  # every attn2 works at one of the two
    assert {n.split(".")[0] for n in coarse} >= {"mid_block"}
    with zero_cross_attention(unet, 8):  # the finer level still reads the text
        assert not torch.allclose(run(unet, inputs), run(unet, inputs, text=other))
    assert hooks_left(unet) == 0


def test_zero_cross_attention_says_when_no_layer_matched(unet, inputs):
    with pytest.raises(SdkitInputError, match=r"side=5 .*the sides seen were \[16, 8\]"):
        with zero_cross_attention(unet, 5):
            run(unet, inputs)
    assert hooks_left(unet) == 0
    with zero_cross_attention(unet, 5):  # the UNet did not run: nothing to say
        pass


@pytest.mark.parametrize("switch", [
    lambda u: zero_time_embedding(u), lambda u: frozen_timestep(u, 3),
    lambda u: drop_skip(u, 1), lambda u: zero_cross_attention(u, 8)])
def test_ablations_unhook_after_the_stop_button(unet, inputs, switch):
    plain = run(unet, inputs)
    with pytest.raises(KeyboardInterrupt), switch(unet):
        run(unet, inputs)
        raise KeyboardInterrupt
    assert hooks_left(unet) == 0 and torch.equal(run(unet, inputs), plain)


# ------------------------------------------------------------------------------ the exercise


def reference(t, dim, flip, shift):
    return sinusoid(t, dim, flip, shift)


def _variant(cos_first=None, denominator=None, base=10000.0, interleave=False, pad=True):
    def fn(t, dim, flip, shift):
        h = dim // 2
        d = (h - shift) if denominator is None else denominator(h, shift)
        freqs = base ** (-torch.arange(h, dtype=torch.float64) / d)
        a = t.double()[:, None] * freqs[None]
        first_cos = flip if cos_first is None else cos_first(flip)
        x, y = (a.cos(), a.sin()) if first_cos else (a.sin(), a.cos())
        emb = torch.stack([x, y], -1).reshape(len(t), -1) if interleave else torch.cat([x, y], -1)
        return F.pad(emb, (0, dim % 2)) if pad else emb
    return fn


def test_checker_accepts_the_reference(unet, capsys):
    assert check_timestep_embedding(reference, unet) is True
    assert "Correct" in capsys.readouterr().out
    assert check_timestep_embedding(reference) is True  # without a UNet: diffusers' settings


@pytest.mark.parametrize("answer, hint", [
    (None, "not solved yet"),
    (lambda t, d, f, s: None, "not solved yet"),
    (torch.zeros(6, 32), "expected a function"),
    (lambda t, d, f, s: 1 / 0, "raised ZeroDivisionError"),
    (lambda t, d, f, s: "emb", "expected a tensor"),
    (lambda t, d, f, s: reference(t, d, f, s).T, "expected shape"),
    (lambda t, d, f, s: reference(t, 32, True, 0), "expected shape"),  # a copy of one result
    (_variant(cos_first=lambda flip: not flip), "puts all the cosines first"),  # swapped
    (_variant(cos_first=lambda flip: False), "puts all the cosines first"),  # no flip
    (_variant(cos_first=lambda flip: True), "keeps the sines first"),  # always cos first
    (_variant(denominator=lambda h, s: h), "not by half"),  # the shift ignored
    (_variant(denominator=lambda h, s: h - 1), "not by half - 1"),  # DDPM's always
    (_variant(denominator=lambda h, s: h + s), "subtract the shift"),
    (_variant(base=1000.0), "not the 1000 training timesteps"),
    (_variant(base=math.e), "ln(10000) is missing"),
    (_variant(base=1 / 10000), "the exponent is negative"),
    (_variant(interleave=True), "not interleaved"),
    (_variant(pad=False), "pad one zero column"),
    (_variant(cos_first=lambda flip: not flip, base=1000.0), "1000 training timesteps"),
    (lambda t, d, f, s: reference(t, d, f, s) * 2, "Hint: channel i"),  # no known mistake
])
def test_checker_rejects_plausible_mistakes_with_a_hint(unet, capsys, answer, hint):
    assert check_timestep_embedding(answer, unet) is False
    out = capsys.readouterr().out
    assert hint in out, out
