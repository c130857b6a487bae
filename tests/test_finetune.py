"""Tests of notebook 10's modules (sdkit.finetune, textual_inversion, lora, hypernetwork) on
the tiny random pipeline of tests/conftest.py (64 px pictures, 16 x 16 latents, width 32).

Bad inputs are rows of tests/test_bad_inputs.py's table."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from peft import LoraConfig
from PIL import Image
from safetensors import safe_open

from sdkit import finetune, hypernetwork, lora, pipeline, shapes, textual_inversion
from sdkit.unet import SD15_UNET


@pytest.fixture(scope="module")
def pipe(tiny_pipe):
    return tiny_pipe


@pytest.fixture(scope="module")
def data(pipe):
    d = finetune.make_concept_data(["red", "blue"], ["star"], n=4,
                                   template="a {colour} <star> {where}")
    return d, finetune.encode_images(pipe.vae, d.images)


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _unet_inputs():
    g = torch.Generator().manual_seed(7)
    return (torch.randn(2, 4, 16, 16, generator=g), torch.tensor([5, 500]),
            torch.randn(2, 20, 32, generator=g))  # latents, timesteps, context


# ------------------------------------------------------------------------------ data and loss


def test_concept_data_is_deterministic_and_checkable(pipe, data):
    d, latents = data
    again = finetune.make_concept_data(["red", "blue"], ["star"], n=4,
                                       template="a {colour} <star> {where}")
    assert np.array_equal(d.images, again.images) and d.captions == again.captions
    assert d.images.shape == (4, 64, 64, 3) and d.images.dtype == np.uint8
    assert latents.shape == (4, 4, 16, 16)  # the tiny VAE shrinks 64 px by 4, like the toy's
    for im, (obj,), cap in zip(d.images, d.objects, d.captions, strict=True):
        assert cap.startswith(f"a {obj.colour} <star> ")
        assert obj.shape == "star"
        assert any(b.colour == obj.colour and b.shape == "star" for b in shapes.find_blobs(im))


def test_style_captions_name_other_colours():
    d = finetune.make_concept_data(["purple"], ["circle"], n=6, caption_colours=["red", "green"])
    assert all(o[0].colour == "purple" for o in d.objects)
    assert all(c.split()[1] in ("red", "green") for c in d.captions)


def test_encode_images_matches_diffusers_preprocessing(pipe, data):
    """The posterior mean of diffusers' own VaeImageProcessor.preprocess (in a contiguous
    layout), times the scaling factor, bit for bit; the same in batches of one; PIL pictures
    give the same latents as arrays."""
    d, latents = data
    pil = [Image.fromarray(im) for im in d.images]
    x = VaeImageProcessor(vae_scale_factor=4).preprocess(pil)  # (4, 3, 64, 64) in [-1, 1]
    with torch.no_grad():
        expected = pipe.vae.encode(x.contiguous()).latent_dist.mean
    assert torch.equal(latents, expected * pipe.vae.config.scaling_factor)
    torch.testing.assert_close(finetune.encode_images(pipe.vae, d.images, batch_size=1), latents,
                               rtol=0, atol=1e-5)
    assert torch.equal(finetune.encode_images(pipe.vae, pil), latents)


def test_encode_images_resizes(pipe, data):
    d, _ = data
    assert finetune.encode_images(pipe.vae, d.images[:1], size=128).shape == (1, 4, 32, 32)


def test_v_prediction_loss_by_hand_equals_diffusion_loss(pipe, data):
    _, latents = data
    scheduler = pipeline.training_scheduler(pipe)
    assert scheduler.config.prediction_type == "v_prediction"
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(latents.shape, generator=g)
    t = torch.tensor([10, 300, 700, 999])
    ctx = torch.randn(4, 20, 32, generator=g)
    with torch.no_grad():
        loss = finetune.diffusion_loss(pipe.unet, scheduler, latents, ctx, noise, t)
        ac = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = ac.sqrt() * latents + (1 - ac).sqrt() * noise
        v = ac.sqrt() * noise - (1 - ac).sqrt() * latents
        by_hand = ((pipe.unet(x_t, t, ctx).sample - v) ** 2).mean()
    torch.testing.assert_close(loss, by_hand, rtol=1e-5, atol=1e-6)


def test_per_picture_losses_serve_subject_and_class_in_one_call(pipe, data):
    """reduction="none" gives one mean per picture: over subject and class latents in one
    batch, each half's mean is that half's loss alone (what the prior-preservation step uses),
    and the mean of all is the usual loss. In train_lora the subject half comes first: with
    prior_weight=0 the first step's loss is the one without class pictures."""
    d, latents = data
    scheduler = pipeline.training_scheduler(pipe)
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(latents.shape, generator=g)
    t, ctx = torch.tensor([3, 250, 600, 990]), torch.randn(4, 20, 32, generator=g)
    with torch.no_grad():
        per = finetune.diffusion_loss(pipe.unet, scheduler, latents, ctx, noise, t,
                                      reduction="none")
        assert per.shape == (4,)
        torch.testing.assert_close(per.mean(), finetune.diffusion_loss(pipe.unet, scheduler,
                                                                       latents, ctx, noise, t))
        for half in (slice(0, 2), slice(2, 4)):
            alone = finetune.diffusion_loss(pipe.unet, scheduler, latents[half], ctx[half],
                                            noise[half], t[half])
            torch.testing.assert_close(per[half].mean(), alone)
    caps = [c.replace("<star>", "sks triangle") for c in d.captions]
    kw = dict(r=2, steps=1, lr=0.05, batch_size=2, seed=4)
    alone = lora.train_lora(pipe, latents, caps, **kw)
    with_class = lora.train_lora(pipe, latents, caps, latents.flip(0), caps[::-1],
                                 prior_weight=0.0, **kw)
    assert with_class.losses[0] == pytest.approx(alone.losses[0], rel=1e-5)


def test_fill_template_cycles_in_a_fixed_order():
    p = finetune.fill_template("a {colour} {shape} {where}", 6, colours=["red", "blue"],
                               shapes_=["star", "circle"], positions=["left", "top", "center"])
    assert p == ["a red star on the left", "a blue star at the top",
                 "a red circle in the center", "a blue circle on the left",
                 "a red star at the top", "a blue star in the center"]


# ------------------------------------------------------------------------------ textual inversion


def test_textual_inversion_changes_only_the_new_row(pipe, data):
    d, latents = data
    before_te, before_unet = _state(pipe.text_encoder), _state(pipe.unet)
    vocab = len(pipe.tokenizer)
    res = textual_inversion.train_textual_inversion(pipe, latents, d.captions, "<star>",
                                                    "triangle", steps=3, lr=0.1, batch_size=2)
    # the pipeline passed in is untouched
    assert len(pipe.tokenizer) == vocab
    assert _same(before_te, _state(pipe.text_encoder)) and _same(before_unet, _state(pipe.unet))
    te, tid = res.extra["text_encoder"], res.extra["token_id"]
    assert tid == vocab and len(res.extra["tokenizer"]) == vocab + 1
    w_old = pipe.text_encoder.get_input_embeddings().weight
    w_new = te.get_input_embeddings().weight
    assert torch.equal(w_new[:vocab], w_old)  # every other row bit-identical
    init = w_old[pipe.tokenizer.convert_tokens_to_ids("triangle</w>")]
    assert not torch.equal(w_new[tid], init)  # the new row moved away from "triangle"
    for k, v in before_te.items():  # and nothing else in the text encoder changed
        if "token_embedding" not in k:
            assert torch.equal(te.state_dict()[k], v), k
    assert res.trained_parameters == w_new.shape[1] == 32
    assert len(res.losses) == 3 and all(np.isfinite(res.losses))
    assert res.pipe.unet is pipe.unet and res.pipe.text_encoder is te


def _masked_step(pipe, d, latents, unet, masked: bool):
    """Notebook 10's textual-inversion step by hand, on copies: a new token "<star>" whose
    row starts as "triangle", a hook that multiplies the table's gradient by a one-row mask
    (or none), one AdamW step on the model's loss. Returns the loss, the rows that moved, the
    new token's id and its row after the step."""
    scheduler = pipeline.training_scheduler(pipe)
    tokenizer, text_encoder = copy.deepcopy(pipe.tokenizer), copy.deepcopy(pipe.text_encoder)
    tokenizer.add_tokens("<star>")
    token_id = tokenizer.convert_tokens_to_ids("<star>")
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    emb = text_encoder.get_input_embeddings().weight  # (V + 1, 32)
    with torch.no_grad():
        emb[token_id] = emb[tokenizer.convert_tokens_to_ids("triangle</w>")]
    text_encoder.requires_grad_(False)
    emb.requires_grad_(True)
    if masked:
        mask = torch.zeros(len(emb), 1)
        mask[token_id] = 1.0
        emb.register_hook(lambda grad: grad * mask)
    before = emb.detach().clone()
    opt = torch.optim.AdamW([emb], lr=0.1, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, len(latents), (2,), generator=g)
    x0 = latents[idx]
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (2,), generator=g)
    ids = tokenizer([d.captions[i] for i in idx], padding="max_length",
                    return_tensors="pt").input_ids
    pred = unet(scheduler.add_noise(x0, noise, t), t, text_encoder(ids)[0]).sample
    loss = F.mse_loss(pred, scheduler.get_velocity(x0, noise, t))
    loss.backward()
    opt.step()
    moved = (emb.detach() != before).any(dim=1).nonzero().flatten().tolist()
    return loss.item(), moved, token_id, emb.detach()[token_id].clone()


def test_gradient_mask_by_hand_leaves_other_rows_bit_identical(pipe, data):
    """The mask keeps every other row bit-identical (without it the rows of the captions'
    other tokens move too), and train_textual_inversion takes the same step: its first loss
    and its new row after one step are the hand-written step's."""
    d, latents = data
    unet = copy.deepcopy(pipe.unet).requires_grad_(False)  # no gradients on the shared pipe
    loss, moved, token_id, row = _masked_step(pipe, d, latents, unet, masked=True)
    assert moved == [token_id]
    _, moved_unmasked, _, _ = _masked_step(pipe, d, latents, unet, masked=False)
    assert token_id in moved_unmasked and len(moved_unmasked) > 3
    res = textual_inversion.train_textual_inversion(pipe, latents, d.captions, "<star>",
                                                    "triangle", steps=1, lr=0.1, batch_size=2)
    assert res.extra["token_id"] == token_id
    assert res.losses[0] == pytest.approx(loss, rel=1e-6)
    torch.testing.assert_close(res.extra["text_encoder"].get_input_embeddings().weight[token_id],
                               row)


def test_textual_inversion_is_deterministic(pipe, data):
    d, latents = data
    kw = dict(steps=2, lr=0.05, batch_size=2, seed=3)
    a = textual_inversion.train_textual_inversion(pipe, latents, d.captions, **kw)
    b = textual_inversion.train_textual_inversion(pipe, latents, d.captions, **kw)
    assert a.losses == b.losses
    assert torch.equal(a.extra["text_encoder"].get_input_embeddings().weight,
                       b.extra["text_encoder"].get_input_embeddings().weight)


def test_embedding_file_is_safetensors_and_loads_back(pipe, data, tmp_path):
    d, latents = data
    res = textual_inversion.train_textual_inversion(pipe, latents, d.captions, steps=1,
                                                    batch_size=2)
    path = textual_inversion.save_embedding(res, tmp_path / "star.safetensors")
    with safe_open(str(path), "pt") as f:
        assert list(f.keys()) == ["<star>"]
        row = f.get_tensor("<star>")
    expected = res.extra["text_encoder"].get_input_embeddings().weight[res.extra["token_id"]]
    assert torch.equal(row, expected)
    loaded = textual_inversion.load_embedding(pipe, path)
    tid = loaded.tokenizer.convert_tokens_to_ids("<star>")
    assert torch.equal(loaded.text_encoder.get_input_embeddings().weight[tid], expected)
    assert "<star>" not in pipe.tokenizer.get_vocab()  # pipe itself left as it was
    # stock diffusers reads the same file
    other = copy.deepcopy(pipe)
    other.load_textual_inversion(str(path))
    tid = other.tokenizer.convert_tokens_to_ids("<star>")
    assert torch.equal(other.text_encoder.get_input_embeddings().weight[tid], expected)
    assert finetune.file_size(path) < 1024  # 32 floats and a header


# ------------------------------------------------------------------------------ LoRA


def test_lora_leaves_base_weights_and_counts_parameters(pipe, data):
    d, latents = data
    caps = [c.replace("<star>", "sks triangle") for c in d.captions]
    base = _state(pipe.unet)
    res = lora.train_lora(pipe, latents, caps, latents[:2], ["a red triangle on the left"] * 2,
                          r=2, steps=3, lr=0.05, batch_size=2)
    assert _same(base, _state(pipe.unet))  # the shipped UNet is untouched
    unet = res.extra["unet"]
    params = {n: p for n, p in unet.named_parameters() if "lora_" in n}
    base_in_copy = {n.replace(".base_layer", ""): p for n, p in unet.named_parameters()
                    if "lora_" not in n}
    assert base_in_copy.keys() == base.keys()
    assert all(torch.equal(base_in_copy[k], base[k]) for k in base)
    # r * (in + out) for every adapted linear layer, r * (in * 3 * 3 + out) for every adapted
    # 3x3 convolution: counted from the module shapes
    modules = dict(pipe.unet.named_modules())
    linear = [m for n, m in modules.items() if n.endswith(lora.ATTENTION_TARGETS)]
    convs = [m for n, m in modules.items() if n.endswith((".conv1", ".conv2"))]
    assert all(isinstance(m, torch.nn.Linear) for m in linear) and linear
    assert all(isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3) for m in convs) and convs
    expected = (sum(2 * (m.in_features + m.out_features) for m in linear)
                + sum(2 * (m.in_channels * 9 + m.out_channels) for m in convs))
    assert res.trained_parameters == sum(p.numel() for p in params.values()) == expected
    assert lora.lora_parameter_count(pipe.unet, 2) == expected
    assert lora.lora_parameter_count(pipe.unet, 2, lora.ATTENTION_TARGETS) == sum(
        2 * (m.in_features + m.out_features) for m in linear)
    assert any(not torch.all(p == 0) for n, p in params.items() if "lora_B" in n)
    n_attn = sum(1 for n, _ in pipe.unet.named_modules() if n.endswith((".attn1", ".attn2")))
    n_resnets = sum(1 for n, _ in pipe.unet.named_modules() if n.endswith(".conv1"))
    assert len(res.trained_modules) == 4 * n_attn + 2 * n_resnets


def test_peft_lora_layers_compute_w_x_plus_scaled_b_a_x(pipe):
    """Notebook 10's wrapping by hand: LoraConfig + unet.add_adapter leave only lora_A /
    lora_B trainable (lora_parameter_count of them); B = 0 leaves the UNet's output unchanged,
    exactly; a linear layer computes W x + (alpha / r) B A x, a convolution
    W * x + (alpha / r) B * (A * x)."""
    config = LoraConfig(r=2, lora_alpha=6, init_lora_weights=True,
                        target_modules=list(lora.LORA_TARGETS))
    unet = copy.deepcopy(pipe.unet).requires_grad_(False)
    unet.add_adapter(config)
    trainable = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert sum(p.numel() for p in trainable.values()) == lora.lora_parameter_count(pipe.unet, 2)
    x, t, ctx = _unet_inputs()
    lin = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_v
    conv = unet.down_blocks[0].resnets[0].conv1
    with torch.no_grad():
        assert torch.equal(unet(x, t, ctx).sample, pipe.unet(x, t, ctx).sample)
        for layer in (lin, conv):
            torch.nn.init.normal_(layer.lora_B["default"].weight)
        a, b = lin.lora_A["default"].weight, lin.lora_B["default"].weight  # (2, in), (out, 2)
        h = torch.randn(3, 20, a.shape[1])
        torch.testing.assert_close(lin(h), lin.base_layer(h) + 6 / 2 * h @ a.T @ b.T)
        a, b = conv.lora_A["default"].weight, conv.lora_B["default"].weight  # 3x3 to 2, 1x1 back
        z = torch.randn(2, conv.base_layer.in_channels, 16, 16)
        by_hand = conv.base_layer(z) + 6 / 2 * F.conv2d(F.conv2d(z, a, padding=1), b)
        torch.testing.assert_close(conv(z), by_hand)
        assert not torch.equal(unet(x, t, ctx).sample, pipe.unet(x, t, ctx).sample)


def test_lora_on_attention_only_is_an_option(pipe, data):
    d, latents = data
    caps = [c.replace("<star>", "sks triangle") for c in d.captions]
    res = lora.train_lora(pipe, latents, caps, r=2, steps=1, batch_size=2,
                          target_modules=lora.ATTENTION_TARGETS)
    assert all(m.endswith(lora.ATTENTION_TARGETS) for m in res.trained_modules)
    assert res.trained_parameters == lora.lora_parameter_count(pipe.unet, 2,
                                                               lora.ATTENTION_TARGETS)


def test_fine_tuning_trains_the_empty_prompt_too(pipe, data):
    """A share p_uncond of each batch uses the empty prompt's context: with p_uncond=1 the
    captions no longer matter, so two different caption sets give the same LoRA."""
    d, latents = data
    caps_a = [c.replace("<star>", "sks triangle") for c in d.captions]
    caps_b = ["a red circle on the left"] * len(caps_a)
    kw = dict(r=2, steps=2, lr=0.05, batch_size=2, seed=1)
    a = lora.train_lora(pipe, latents, caps_a, p_uncond=1.0, **kw)
    b = lora.train_lora(pipe, latents, caps_b, p_uncond=1.0, **kw)
    c = lora.train_lora(pipe, latents, caps_b, p_uncond=0.0, **kw)
    assert a.losses == b.losses and a.losses != c.losses


def test_lora_file_is_safetensors_and_loads_back(pipe, data, tmp_path):
    d, latents = data
    caps = [c.replace("<star>", "sks triangle") for c in d.captions]
    res = lora.train_lora(pipe, latents, caps, r=2, steps=2, lr=0.05, batch_size=2)
    path = lora.save_lora(res, tmp_path / "lora.safetensors")
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["r"] == "2"
        assert all("lora_A" in k or "lora_B" in k for k in f.keys())
        assert sum(f.get_tensor(k).numel() for k in f.keys()) == res.trained_parameters
    loaded = lora.load_lora(pipe, path)
    x, t, ctx = _unet_inputs()
    with torch.no_grad():
        assert torch.equal(loaded.unet(x, t, ctx).sample, res.pipe.unet(x, t, ctx).sample)
        assert not torch.equal(loaded.unet(x, t, ctx).sample, pipe.unet(x, t, ctx).sample)


# ------------------------------------------------------------------------------ hypernetwork


def test_zero_initialised_hypernetwork_equals_stock_processor(pipe):
    unet = copy.deepcopy(pipe.unet)
    unet.set_attn_processor(AttnProcessor2_0())
    hyper = hypernetwork._make_hypernetwork(unet, hidden=8)
    x, t, ctx = _unet_inputs()
    with torch.no_grad():
        stock = unet(x, t, ctx).sample
        hypernetwork._install_hypernetwork(unet, hyper)
        assert sum(isinstance(p, hypernetwork.HypernetworkAttnProcessor)
                   for p in unet.attn_processors.values()) == len(hyper.names)
        assert torch.equal(unet(x, t, ctx).sample, stock)  # exactly, not just close
        # one processor call, too, against the stock one on the same attention layer
        name = hyper.names[0]
        attn = unet.get_submodule(name.rsplit(".processor", 1)[0])
        h = torch.randn(2, 64, attn.to_q.in_features)
        proc = hypernetwork.HypernetworkAttnProcessor(*hyper.pair(name))
        assert torch.equal(proc(attn, h, ctx), AttnProcessor2_0()(attn, h, ctx))
        # and diffusers' classic processor (baddbmm, softmax): the same up to rounding
        torch.testing.assert_close(proc(attn, h, ctx), AttnProcessor()(attn, h, ctx))
        # a non-zero output layer changes the keys and so the result
        torch.nn.init.normal_(hyper.k[0].mlp[2].weight)
        assert not torch.equal(proc(attn, h, ctx), AttnProcessor2_0()(attn, h, ctx))


def test_hypernetwork_formula(pipe):
    """k = to_k(ctx + h_k(ctx)), v = to_v(ctx + h_v(ctx)) with the stock attention after."""
    hyper = hypernetwork._make_hypernetwork(pipe.unet, hidden=8, seed=1)
    for m in list(hyper.k) + list(hyper.v):
        torch.nn.init.normal_(m.mlp[2].weight, std=0.1)
    name = hyper.names[-1]
    attn = pipe.unet.get_submodule(name.rsplit(".processor", 1)[0])
    h_k, h_v = hyper.pair(name)
    h, ctx = torch.randn(1, 16, attn.to_q.in_features), torch.randn(1, 20, 32)
    with torch.no_grad():
        out = hypernetwork.HypernetworkAttnProcessor(h_k, h_v)(attn, h, ctx)
        q, k = attn.to_q(h), attn.to_k(ctx + h_k.mlp(ctx))
        v = attn.to_v(ctx + h_v.mlp(ctx))
        split = lambda z: z.view(1, -1, attn.heads, z.shape[-1] // attn.heads).transpose(1, 2)  # noqa: E731
        probs = (split(q) @ split(k).transpose(-1, -2) * attn.scale).softmax(-1)
        by_hand = attn.to_out[0]((probs @ split(v)).transpose(1, 2).reshape(1, 16, -1))
    torch.testing.assert_close(out, by_hand, rtol=1e-4, atol=1e-5)


def test_hypernetwork_training_freezes_unet_and_round_trips(pipe, data, tmp_path):
    d, latents = data
    base = _state(pipe.unet)
    caps = [c.replace("<star>", "circle") for c in d.captions]
    res = hypernetwork.train_hypernetwork(pipe, latents, caps, hidden=8, steps=3, lr=0.01,
                                          batch_size=2)
    assert _same(base, _state(pipe.unet))
    assert _same(base, _state(res.extra["unet"]))  # the copy's own weights are frozen too
    n_layers = sum(1 for n, _ in pipe.unet.named_modules() if n.endswith(".attn2"))
    assert len(res.extra["hypernetwork"].names) == n_layers
    assert res.trained_parameters == n_layers * 2 * (32 * 8 + 8 + 8 * 32 + 32)
    path = hypernetwork.save_hypernetwork(res, tmp_path / "hyper.safetensors")
    loaded = hypernetwork.load_hypernetwork(pipe, path)
    x, t, ctx = _unet_inputs()
    with torch.no_grad():
        assert torch.equal(loaded.unet(x, t, ctx).sample, res.pipe.unet(x, t, ctx).sample)
        assert not torch.equal(loaded.unet(x, t, ctx).sample, pipe.unet(x, t, ctx).sample)
        hypernetwork.set_hypernetwork_strength(loaded, 0.0)
        torch.testing.assert_close(loaded.unet(x, t, ctx).sample, pipe.unet(x, t, ctx).sample)


def test_cross_attention_layers_reports_resolutions(pipe):
    layers = hypernetwork.cross_attention_layers(pipe.unet)
    assert [x["name"] for x in layers] == [n for n in pipe.unet.attn_processors if ".attn2." in n]
    res = {x["block"]: x["resolution"] for x in layers}
    assert res == {"down_blocks.0": (16, 16), "down_blocks.1": (8, 8), "mid_block": (8, 8),
                   "up_blocks.0": (8, 8), "up_blocks.1": (16, 16)}
    assert all(x["context_dim"] == 32 for x in layers)


# ------------------------------------------------------------------------------ measuring


def _drawn(captions, seed=0):
    """Ground truth: the scene of each caption, drawn by the shapes world (PIL)."""
    return [Image.fromarray(shapes.render(shapes.parse_caption(c), seed=seed + i).image)
            for i, c in enumerate(captions)]


def test_success_rate_scores_drawn_truth_right_and_blank_pictures_wrong(pipe, monkeypatch):
    """The pictures success_rate scores are what it generated; here they are replaced by the
    drawn scenes (all hits), blank pictures (no hit) and scenes at the wrong place."""
    targets = ["a purple star on the left", "a purple star on the right",
               "a purple star at the top", "a purple star at the bottom"]
    wrong_place = [targets[i] for i in (1, 0, 3, 2)]
    shown, calls = {}, []

    def fake_generate(pipe_, prompts, seeds, **kwargs):
        calls.append((prompts, list(seeds), kwargs))
        return shown["pictures"]

    monkeypatch.setattr(pipeline, "generate_images", fake_generate)
    cases = [(_drawn(targets), "all_attributes", [True] * 4),
             ([Image.new("RGB", (64, 64), (235, 235, 235))] * 4, "colour_shape", [False] * 4),
             (_drawn(wrong_place), "colour_shape", [True] * 4),
             (_drawn(wrong_place), "all_attributes", [False] * 4),
             (_drawn(targets[:2]) + [Image.new("RGB", (64, 64), "white")] * 2, "colour_shape",
              [True, True, False, False])]
    for pictures, criterion, expected in cases:
        shown["pictures"] = pictures
        r = finetune.success_rate(pipe, "a sks triangle", range(4), targets, criterion)
        assert r.hits == expected, (criterion, r.hits)
        assert r.rate == sum(expected) / 4 and r.images is pictures
    assert calls[0] == ("a sks triangle", [0, 1, 2, 3],
                        {"batch_size": 8, "known_words_only": False})


def test_success_rate_generates_one_picture_per_seed(pipe):
    """On the real path: the pictures are pipeline.generate_images' for those seeds and
    prompts (words like ``sks`` allowed), and the verdicts are shapes.hits' on them."""
    targets = ["a purple star on the left", "a red circle on the right"]
    r = finetune.success_rate(pipe, ["a sks triangle on the left", "a red circle"], [3, 4],
                              targets)
    same = pipeline.generate_images(pipe, ["a sks triangle on the left", "a red circle"], [3, 4],
                                    known_words_only=False)
    assert len(r.images) == 2 and all(np.array_equal(np.asarray(a), np.asarray(b))
                                      for a, b in zip(r.images, same, strict=True))
    assert r.hits == shapes.hits(same, targets, "colour_shape")


# ------------------------------------------------------------------------------ exercise


SOLUTIONS = Path(__file__).resolve().parent.parent / "notebooks" / "solutions"


def test_sd15_lora_checker_accepts_the_reference_solution(capsys):
    namespace = {"torch": torch}  # what notebook 10 has at its exercise, the rest it imports
    exec((SOLUTIONS / "10_fine_tuning.py").read_text(encoding="utf-8"), namespace)
    assert namespace["lora_fp16_bytes"] == 1_594_368  # 797,184 numbers: diffusers' known count
    assert lora.check_sd15_lora_bytes(namespace["lora_fp16_bytes"]) is True
    assert "Right" in capsys.readouterr().out


@pytest.mark.parametrize("wrong, said", [
    (3_188_736, "float32"),  # 4 bytes a number
    (797_184, "number of parameters"),  # numbers, not bytes
    (795_648, "only the A matrices"),  # r x in for each layer, B forgotten (= attn2 alone)
    (798_720, "only the B matrices"),  # (= attn1 alone)
    (597_504 * 2, "left out to_out.0"),
    (2 * 2_755_584, "ResNet convolutions"),  # the notebook's own targets, convolutions too
    (1.52, "MB or MiB"),  # the size in MiB
    (1_000_000, "count r x in (A) + out x r (B)"),  # anything else: the general hint
])
def test_sd15_lora_checker_rejects_typical_mistakes_with_a_hint(wrong, said, capsys):
    assert lora.check_sd15_lora_bytes(wrong) is False
    out = capsys.readouterr().out
    assert said in out and "Hint" in out


def test_sd15_lora_checker_unsolved_and_odd_answers(capsys):
    assert lora.check_sd15_lora_bytes(None) is False
    assert "not solved yet" in capsys.readouterr().out.lower()
    assert lora.check_sd15_lora_bytes("1594368") is False  # a str is no int; never raises
    assert lora.check_sd15_lora_bytes(torch.tensor(1_594_368)) is True
    assert lora.check_sd15_lora_bytes(1_594_368.0) is True  # a whole float is accepted


def test_sd15_lora_sizes_agree_with_lora_parameter_count():
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
    n = lora._sd15_lora_sizes(4)
    assert n["all"] == lora.lora_parameter_count(unet, 4, lora.ATTENTION_TARGETS) == 797_184
    assert n["a"] + n["b"] == n["all"] == n["attn1"] + n["attn2"]
