"""Hypernetworks (the NovelAI / AUTOMATIC1111 kind): rewriting cross-attention's keys and values.

Every weight of the UNet stays frozen; small MLPs in front of each cross-attention layer's
key and value projections rewrite the text context on its way in,
``k = to_k(ctx + h_k(ctx))``, ``v = to_v(ctx + h_v(ctx))``, installed as a diffusers
attention processor on a copy of the UNet and trained on the model's own loss
(``finetune.diffusion_loss``). They act on every prompt, so they suit a *style*. The
pipeline you pass in is left exactly as it was; the MLPs are saved as safetensors.

Left out: hypernetworks on self-attention, layer norm and dropout inside the MLPs, other
activations, the web UI's file format.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0
from safetensors.torch import save_file

from . import checks, device, finetune, pipeline
from .checks import fail


class _HypernetworkModule(torch.nn.Module):
    """``x -> x + strength * mlp(x)``: a small MLP added to the context on its way into a
    key or value projection. The output layer starts at zero, so a new module is the
    identity and training starts from the model itself."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.ReLU(),
                                       torch.nn.Linear(hidden, dim))
        torch.nn.init.zeros_(self.mlp[2].weight)
        torch.nn.init.zeros_(self.mlp[2].bias)

    def forward(self, x, strength: float = 1.0):
        return x + strength * self.mlp(x)


class _Hypernetwork(torch.nn.Module):
    """One pair (h_k, h_v) of ``_HypernetworkModule`` per cross-attention layer name."""

    def __init__(self, layer_names, context_dim: int, hidden: int = 64):
        super().__init__()
        self.names = list(layer_names)
        self.k = torch.nn.ModuleList(_HypernetworkModule(context_dim, hidden) for _ in self.names)
        self.v = torch.nn.ModuleList(_HypernetworkModule(context_dim, hidden) for _ in self.names)

    def pair(self, name: str):
        i = self.names.index(name)
        return self.k[i], self.v[i]


class HypernetworkAttnProcessor(AttnProcessor2_0):
    """diffusers' ``AttnProcessor2_0`` with the context rewritten before the key and value
    projections: ``k = to_k(ctx + h_k(ctx))``, ``v = to_v(ctx + h_v(ctx))``; queries and
    everything else as in the stock processor. Only for cross-attention (``attn2``):
    ``train_hypernetwork`` and ``load_hypernetwork`` set one on every ``attn2`` layer.

    Introduced in notebooks/10_fine_tuning.ipynb.
    """

    def __init__(self, h_k: _HypernetworkModule, h_v: _HypernetworkModule, strength: float = 1.0):
        super().__init__()
        self.h_k, self.h_v, self.strength = h_k, h_v, strength

    # Copied from diffusers.models.attention_processor.AttnProcessor2_0 (0.42.1), with changes:
    # self-attention is handed to the stock processor; the deprecated `scale` argument is
    # ignored without a warning; the key and value see h_k(ctx), h_v(ctx) (marked "<-").
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        if encoder_hidden_states is None:  # self-attention: nothing to rewrite
            return super().__call__(attn, hidden_states, None, attention_mask, temb)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length,
                                                         batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1,
                                                 attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)  # (B, HW, inner)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(self.h_k(encoder_hidden_states, self.strength))  # <- hypernetwork
        value = attn.to_v(self.h_v(encoder_hidden_states, self.strength))  # <- hypernetwork
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                       dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height,
                                                                    width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def cross_attention_layers(unet) -> list[dict]:
    """Every cross-attention layer of a UNet with the resolution it works at, measured by
    one forward pass: dicts with ``name`` (the processor name), ``block``, ``resolution``
    (h, w of its latent grid), ``heads``, ``query_dim`` and ``context_dim``.

    Introduced in notebooks/10_fine_tuning.ipynb.
    """
    seen = {}
    hooks = []
    for name, module in unet.named_modules():
        if name.endswith("attn2"):
            def hook(mod, args, kwargs, name=name):
                seen[name] = kwargs.get("hidden_states", args[0] if args else None).shape[1]
            hooks.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    p = next(unet.parameters())
    side = unet.config.sample_size
    side = side if isinstance(side, int) else side[0]
    try:
        with torch.no_grad():
            x = torch.zeros(1, unet.config.in_channels, side, side, device=p.device, dtype=p.dtype)
            ctx = torch.zeros(1, 2, unet.config.cross_attention_dim, device=p.device, dtype=p.dtype)
            unet(x, torch.tensor([10], device=p.device), ctx)
    finally:
        for h in hooks:
            h.remove()
    layers = []
    for name, module in unet.named_modules():
        if name in seen:
            hw = seen[name]
            s = int(round(math.sqrt(hw)))
            layers.append({"name": f"{name}.processor", "block": name.split(".attentions")[0],
                           "resolution": (s, hw // s), "heads": module.heads,
                           "query_dim": module.to_q.in_features,
                           "context_dim": module.to_k.in_features})
    return layers


def _install_hypernetwork(unet, hypernetwork: _Hypernetwork, strength: float = 1.0):
    """Set ``HypernetworkAttnProcessor`` on every cross-attention layer of ``unet`` (the
    self-attention layers keep their processors); returns ``unet``."""
    strength = checks.check_float("strength", strength, -10.0, 10.0)
    procs = {}
    for name, proc in unet.attn_processors.items():
        if ".attn2." in name:
            if name not in hypernetwork.names:
                fail("hypernetwork", name, "expected a hypernetwork made for this UNet's layers")
            procs[name] = HypernetworkAttnProcessor(*hypernetwork.pair(name), strength=strength)
        else:
            procs[name] = proc
    unet.set_attn_processor(procs)
    return unet


def set_hypernetwork_strength(pipe, strength: float):
    """Scale every hypernetwork correction of a pipeline's UNet (0 = the original model).

    Introduced in notebooks/10_fine_tuning.ipynb.
    """
    strength = checks.check_float("strength", strength, -10.0, 10.0)
    procs = [p for p in pipe.unet.attn_processors.values()
             if isinstance(p, HypernetworkAttnProcessor)]
    if not procs:
        fail("pipe", type(pipe).__name__,
             "expected a pipeline from train_hypernetwork or load_hypernetwork")
    for p in procs:
        p.strength = strength


def _make_hypernetwork(unet, hidden: int = 64, seed: int = 0) -> _Hypernetwork:
    """A fresh (identity) hypernetwork for every ``attn2`` layer of ``unet``."""
    hidden = checks.check_int("hidden", hidden, 1, 65536)
    torch.manual_seed(checks.check_seed(seed))
    names = [n for n in unet.attn_processors if ".attn2." in n]
    p = next(unet.parameters())
    return _Hypernetwork(names, unet.config.cross_attention_dim, hidden).to(p.device, p.dtype)


def train_hypernetwork(pipe, latents, captions, hidden: int = 64, steps: int = 150,
                       lr: float = 5e-4, batch_size: int = 8, seed: int = 0,
                       p_uncond: float = 0.3) -> finetune.FineTuneResult:
    """Train a hypernetwork on a copy of the UNet whose weights all stay frozen.

    It is always on: every prompt's keys and values pass through it, so it is the tool
    for a *style* (here: "draw everything purple") rather than for a new word. A style
    changes the unconditional picture too (the empty prompt's keys and values pass through
    it as well), so a larger share ``p_uncond`` of each batch trains on the empty prompt
    than the model's own 10%: with 10%, guidance 4 still extrapolates from a half-adapted
    unconditional prediction and washes the colour out.

    The batch and ``hidden`` must fit in memory (the error gives the estimate and the limit;
    ``SDKIT_MEMORY_LIMIT=32GiB`` raises it). A progress bar shows the steps; Jupyter's stop
    button (KeyboardInterrupt) and a non-finite loss (``lr`` too large: an error naming it)
    stop training, and ``pipe`` is as it was. Returns a ``FineTuneResult``;
    ``extra["hypernetwork"]`` is the trained module.

    Introduced in notebooks/10_fine_tuning.ipynb.
    """
    steps, lr, batch_size, seed = finetune._check_train_args(steps, lr, batch_size, seed,
                                                             latents, captions, pipe.tokenizer)
    p_uncond = checks.check_float("p_uncond", p_uncond, 0.0, 1.0)
    hidden = checks.check_int("hidden", hidden, 1, 65536)
    layers = sum(".attn2." in n for n in pipe.unet.attn_processors)
    d = pipe.unet.config.cross_attention_dim  # each layer: two MLPs d -> hidden -> d
    need = 4 * 4 * layers * 2 * (2 * d * hidden + hidden + d)  # weights, grads, AdamW's moments
    need += 4 * batch_size * layers * 2 * hidden * pipeline.MAX_LENGTH  # the MLPs' activations
    device.check_memory("hidden", hidden, need, f"a hypernetwork of width {hidden} on {layers} "
                        f"layers, trained on batches of {batch_size}", pipe.unet.device)
    unet = copy.deepcopy(pipe.unet)
    unet.requires_grad_(False)
    hyper = _make_hypernetwork(unet, hidden, seed)
    _install_hypernetwork(unet, hyper)
    ctx = finetune._encode_frozen(pipe, captions)  # (N, T, d)
    hyper.train()
    losses, seconds = finetune._train(
        "hypernetwork", unet, list(hyper.parameters()), lambda idx, _: ctx[idx], latents, steps,
        lr, batch_size, seed, pipeline.training_scheduler(pipe),
        uncond=finetune._encode_frozen(pipe, [""]), p_uncond=p_uncond)
    hyper.eval().requires_grad_(False)
    return finetune.FineTuneResult(
        "hypernetwork", finetune._rebuild(pipe, unet=unet), losses,
        trained_parameters=sum(p.numel() for p in hyper.parameters()), seconds=seconds,
        trained_modules=[f"unet.{n} (h_k, h_v)" for n in hyper.names],
        extra={"hypernetwork": hyper, "unet": unet, "hidden": hidden})


def save_hypernetwork(result: finetune.FineTuneResult, path) -> Path:
    """Save the hypernetwork's weights as safetensors (layer names in the metadata).

    Introduced in notebooks/10_fine_tuning.ipynb.
    """
    finetune._check_result(result, "hypernetwork")
    hyper = result.extra["hypernetwork"]
    state = {k: v.detach().contiguous() for k, v in hyper.state_dict().items()}
    path = finetune._out_path(path)
    save_file(state, str(path), metadata={"names": json.dumps(hyper.names),
                                          "hidden": str(result.extra["hidden"])})
    return path


def load_hypernetwork(pipe, path, strength: float = 1.0):
    """A new pipeline with a copy of ``pipe.unet`` running the hypernetwork in ``path``
    (``pipe`` itself is left unchanged).

    Introduced in notebooks/10_fine_tuning.ipynb.
    """
    strength = checks.check_float("strength", strength, -10.0, 10.0)
    state, meta = finetune._read(path, "a hypernetwork file written by save_hypernetwork")
    try:
        names, hidden = json.loads(meta["names"]), checks.check_int("hidden", int(meta["hidden"]),
                                                                    1, 65536)
    except (KeyError, ValueError, TypeError) as e:
        fail("path", str(path), f"expected a hypernetwork file written by save_hypernetwork "
                                f"(names and hidden in its metadata; {type(e).__name__}: {e})")
    ours = [n for n in pipe.unet.attn_processors if ".attn2." in n]
    if sorted(names) != sorted(ours):
        fail("path", str(path), f"a hypernetwork made for another UNet: its layers {names[:2]}... "
                                f"are not this UNet's {ours[:2]}...")
    hyper = _Hypernetwork(names, pipe.unet.config.cross_attention_dim, hidden)
    try:
        hyper.load_state_dict(state)
    except RuntimeError as e:  # missing, extra or reshaped tensors
        fail("path", str(path), f"a hypernetwork of another shape ({str(e).splitlines()[0][:90]})")
    unet = copy.deepcopy(pipe.unet)
    _install_hypernetwork(unet, hyper.eval().requires_grad_(False), strength)
    return finetune._rebuild(pipe, unet=unet)
