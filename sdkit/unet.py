"""The UNet from the inside: its path traced with hooks, drawn, and taken apart.

Notebook 03 writes the UNet's parts out by hand in its cells (the sinusoidal timestep
embedding, one ResNet block, one transformer block) and checks each against diffusers. This
module keeps what is too long for a cell or what later notebooks reuse:

* ``SD15_UNET``: Stable Diffusion 1.5's UNet config written out (nothing is downloaded;
  build it on the meta device for shapes, as notebooks 03, 07 and 10 do);
* ``record_calls``: the inputs and output of every call of one module (a forward hook);
* ``trace_shapes``: one UNet call with forward hooks on its stages (time embedding,
  ``conv_in``, every down block, the mid block, every up block, ``conv_out``), giving each
  stage's input and output shape and the skip tensors (``down_block_res_samples``) each down
  stage adds and each up block takes. It runs on the meta device too (shapes, no weights);
* ablations, as context managers around a generation: ``zero_time_embedding``,
  ``frozen_timestep`` (the embedding of one timestep at every step), ``drop_skip`` (one
  res sample zeroed where an up block takes it) and ``zero_cross_attention`` (the
  ``attn2`` layers of one resolution output zeros);
* ``check_timestep_embedding``: the checker of the notebook's exercise.

The pictures (``draw_trace``, ``plot_ablations``) are in ``sdkit.unet_views``.

Left out: other UNet families (SDXL's added conditioning, ``UNet2DModel`` without text),
attention processors and attention maps (notebook 04), the VAE (05), training (10, 12).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import Timesteps

from . import checks
from .device import check_memory
from .images import unet_memory_bytes

# Stable Diffusion 1.5 (stable-diffusion-v1-5/stable-diffusion-v1-5): its UNet config written
# out, so that its shapes can be computed anywhere (on the meta device, without weights).
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                      "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                    "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5,
    act_fn="silu", center_input_sample=False, downsample_padding=1, flip_sin_to_cos=True,
    freq_shift=0, mid_block_scale_factor=1,
)


def _check_unet(unet):
    if not isinstance(unet, torch.nn.Module) or not all(
            hasattr(unet, a) for a in ("config", "conv_in", "down_blocks", "up_blocks",
                                       "time_embedding")):
        checks.fail("unet", type(unet).__name__,
                    "expected a diffusers UNet2DConditionModel, e.g. pipe.unet")
    return unet


# ----------------------------------------------------------------------------- hooks


@contextlib.contextmanager
def record_calls(module):
    """Keep the inputs and output of every call of ``module`` (a forward hook).

    Yields a list that fills with one dict per call: ``args`` (tuple), ``kwargs`` (dict)
    and ``output``, tensors detached and cloned (tuples of tensors stay tuples). The hook is
    removed at the end of the block, also after an error.

    Introduced in notebooks/03_unet_from_the_inside.ipynb.
    """
    if not isinstance(module, torch.nn.Module):
        checks.fail("module", module, "expected a torch.nn.Module, e.g. unet.down_blocks[1]"
                                      ".resnets[0]")
    calls: list[dict] = []

    def keep(x):
        if torch.is_tensor(x):
            return x.detach().clone()
        return tuple(keep(v) for v in x) if isinstance(x, tuple) else x

    def hook(mod, args, kwargs, output):
        calls.append({"args": keep(tuple(args)), "kwargs": {k: keep(v) for k, v in
                                                            kwargs.items()},
                      "output": keep(output)})

    handle = module.register_forward_hook(hook, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


@dataclass(frozen=True)
class Record:
    """One stage of a UNet call, as ``trace_shapes`` saw it.

    ``name``: the module's name in the UNet (``conv_in``, ``down_blocks.0``, ``mid_block``,
    ``up_blocks.2``, ``conv_out``, ``time_proj``, ``time_embedding``); ``kind``: ``time``,
    ``in``, ``down``, ``mid``, ``up`` or ``out``; ``block_type``: its class name; shapes
    without the batch, (C, H, W) on the image path. ``skips_out``: (index, shape) of each
    tensor the stage appends to ``down_block_res_samples``; ``skips_in``: (index, shape) of
    each an up block takes (in tuple order; its ResNets use them last first).

    Introduced in notebooks/03_unet_from_the_inside.ipynb.
    """

    name: str
    kind: str
    block_type: str
    input_shape: tuple
    output_shape: tuple
    skips_out: tuple = ()
    skips_in: tuple = ()


_KINDS = (("time_proj", "time"), ("time_embedding", "time"), ("conv_in", "in"),
          ("down_blocks", "down"), ("mid_block", "mid"), ("up_blocks", "up"),
          ("conv_out", "out"))


def _stages(unet):
    """(name, kind, module) of each traced stage, in the order of the UNet's forward."""
    for attr, kind in _KINDS:
        part = getattr(unet, attr, None)
        if isinstance(part, torch.nn.ModuleList):
            yield from ((f"{attr}.{i}", kind, m) for i, m in enumerate(part))
        elif part is not None:
            yield attr, kind, part


@torch.no_grad()
def trace_shapes(unet, sample_size: int | None = None, seq_len: int = 77,
                 timestep: int = 500) -> list[Record]:
    """One UNet call on zeros, (1, C, side, side) latents and (1, seq_len, D) text states,
    with forward hooks on each stage; returns one ``Record`` per stage, in call order.

    ``sample_size``: the latent side (default ``unet.config.sample_size``). The skips are
    followed by identity: the tensors an up block receives in ``res_hidden_states_tuple``
    are the very ones the down stages appended to ``down_block_res_samples``, so each
    record's ``skips_in`` names them by their index there. A UNet built on the meta device
    (``with torch.device("meta"): UNet2DConditionModel(**SD15_UNET)``) gives its shapes
    without memory or weights; on a real device a call too big for the memory limit is
    refused first.

    Introduced in notebooks/03_unet_from_the_inside.ipynb.
    """
    cfg = _check_unet(unet).config
    side = cfg.sample_size if sample_size is None else sample_size
    side = checks.check_int("sample_size", side, 1, 1024)
    seq_len = checks.check_int("seq_len", seq_len, 1, 4096)
    timestep = checks.check_int("timestep", timestep, 0, 10_000)
    p = next(unet.parameters())
    if p.device.type != "meta":
        check_memory("sample_size", side, unet_memory_bytes(cfg, 1, side, side,
                                                            p.element_size()),
                     "one UNet call at this latent size (trace a UNet built on the meta "
                     "device for bigger ones)", device=p.device)
    sample = torch.zeros(1, cfg.in_channels, side, side, device=p.device, dtype=p.dtype)
    text = torch.zeros(1, seq_len, cfg.cross_attention_dim, device=p.device, dtype=p.dtype)
    records, index_of, kept = [], {}, []  # kept: the skips stay alive, so ids stay unique

    def shape(x):
        return tuple(x.shape[1:])

    def add_skip(t):
        index_of[id(t)] = len(kept)
        kept.append(t)
        return len(kept) - 1, shape(t)

    def hook(name, kind):
        def after(module, args, kwargs, output):
            x = args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))
            out = output[0] if isinstance(output, tuple) else output
            skips_out = ((add_skip(out),) if kind == "in" else
                         tuple(add_skip(t) for t in output[1]) if kind == "down" else ())
            skips_in = tuple((index_of.get(id(t), -1), shape(t))
                             for t in kwargs.get("res_hidden_states_tuple", ()))
            records.append(Record(name, kind, type(module).__name__, shape(x), shape(out),
                                  skips_out, skips_in))
        return after

    handles = [m.register_forward_hook(hook(n, k), with_kwargs=True)
               for n, k, m in _stages(unet)]
    try:
        unet(sample, timestep, encoder_hidden_states=text)
    finally:
        for h in handles:
            h.remove()
    return records


# ----------------------------------------------------------------------------- ablations


@contextlib.contextmanager
def _time_embedding_returns(unet, value):
    """``unet.time_embedding`` outputs ``value(output)`` inside the block (a forward hook)."""
    handle = unet.time_embedding.register_forward_hook(lambda module, args, out: value(out))
    try:
        yield
    finally:
        handle.remove()


def zero_time_embedding(unet):
    """Inside the ``with`` block the UNet's ``time_embedding`` outputs zeros (a forward
    hook): every ResNet block then gets the same bias whatever the timestep, so the UNet is
    no longer told how noisy its input is. The hook is removed at the end, also after an
    error.

    Introduced in notebooks/03_unet_from_the_inside.ipynb.
    """
    return _time_embedding_returns(_check_unet(unet), torch.zeros_like)


@torch.no_grad()
def frozen_timestep(unet, timestep: int):
    """Inside the ``with`` block the UNet's ``time_embedding`` outputs the embedding of this
    one ``timestep`` at every call, whatever the sampler's step: the UNet is told the wrong
    noise level (``timestep=0``: "your input is already clean"). Removed at the end.

    Introduced in notebooks/03_unet_from_the_inside.ipynb.
    """
    timestep = checks.check_int("timestep", timestep, 0, 10_000)
    p = next(_check_unet(unet).parameters())
    t = torch.tensor([timestep], device=p.device)
    emb = unet.time_embedding(unet.time_proj(t).to(p.dtype))  # (1, D), before the hook
    return _time_embedding_returns(unet, lambda out: emb.expand_as(out).to(out.dtype))


def _skip_consumers(unet) -> dict[int, tuple[int, int]]:
    """Index in ``down_block_res_samples`` -> (up block, position in the tuple it takes),
    from the blocks' structure (tests/test_unet.py checks it against ``trace_shapes``)."""
    n = 1 + sum(len(b.resnets) + len(getattr(b, "downsamplers", None) or ())
                for b in unet.down_blocks)  # conv_in's output, then each block's outputs
    where, end = {}, n
    for i, block in enumerate(unet.up_blocks):
        k = len(block.resnets)  # an up block takes the last k, one per ResNet
        for pos, index in enumerate(range(end - k, end)):
            where[index] = (i, pos)
        end -= k
    return where


@contextlib.contextmanager
def drop_skip(unet, index: int):
    """Inside the block, skip number ``index`` of ``down_block_res_samples`` reaches its up
    block as zeros (a forward pre-hook on that up block; the down path is untouched). Yields
    (up block, position in its ``res_hidden_states_tuple``). Removed at the end.

    Introduced in notebooks/03_unet_from_the_inside.ipynb.
    """
    where = _skip_consumers(_check_unet(unet))
    index = checks.check_int("index", index, 0, len(where) - 1)
    block, pos = where[index]

    def zero(module, args, kwargs):
        res = list(kwargs["res_hidden_states_tuple"])
        res[pos] = torch.zeros_like(res[pos])
        return args, {**kwargs, "res_hidden_states_tuple": tuple(res)}

    handle = unet.up_blocks[block].register_forward_pre_hook(zero, with_kwargs=True)
    try:
        yield block, pos
    finally:
        handle.remove()


@contextlib.contextmanager
def zero_cross_attention(unet, side: int):
    """Inside the block, every cross-attention layer (``attn2``) working on a side x side
    grid of latent pixels outputs zeros (forward hooks), so the text does not reach the
    picture at that resolution; the other resolutions still read it. Yields the list of the
    layers zeroed, filled as the UNet runs. If the UNet ran and no layer works at that side,
    the end of the block says so (an error naming the sides seen), rather than nothing.

    Introduced in notebooks/03_unet_from_the_inside.ipynb.
    """
    side = checks.check_int("side", side, 1, 1024)
    zeroed, seen = [], set()

    def hook(name):
        def after(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]  # (B, HW, C)
            seen.add(math.isqrt(x.shape[1]))
            if x.shape[1] == side * side:
                if name not in zeroed:
                    zeroed.append(name)
                return torch.zeros_like(output)
        return after

    handles = [m.register_forward_hook(hook(n), with_kwargs=True)
               for n, m in _check_unet(unet).named_modules()
               if n.rsplit(".", 1)[-1] == "attn2" and isinstance(m, Attention)]
    try:
        yield zeroed
    finally:
        for h in handles:
            h.remove()
    if seen and not zeroed:
        checks.fail("side", side, f"no cross-attention layer works on a {side}x{side} grid "
                                  f"here; the sides seen were {sorted(seen, reverse=True)}")


# ----------------------------------------------------------------------------- the exercise

_T = torch.tensor([0, 1, 10, 250, 500, 999])  # the timesteps the checker tries
_BASES = ((10000.0, None), (1000.0, "max_period is 10000 (the frequencies fall from 1 to "
                                    "about 1/10000), not the 1000 training timesteps"),
          (math.e, "the frequencies are exp(-ln(10000) * i / denominator): the ln(10000) "
                   "is missing"),
          (1 / 10000.0, "the exponent is negative: frequencies fall from 1 towards 1/10000 "
                        "(10000 ** (-i / denominator)), they do not grow"))


def _sinusoid(t, dim, cos_first, denominator, base, interleave):
    """The embedding family the checker searches: (N, dim) float32."""
    half = dim // 2
    freqs = base ** (-torch.arange(half, dtype=torch.float64) / denominator)  # (half,)
    angles = t.double()[:, None] * freqs[None]  # (N, half)
    first, second = (angles.cos(), angles.sin()) if cos_first else (angles.sin(), angles.cos())
    emb = (torch.stack([first, second], -1).reshape(len(t), -1) if interleave
           else torch.cat([first, second], -1))
    return F.pad(emb, (0, dim % 2)).float()


def _mistakes(got, dim, flip, shift) -> list[str] | None:
    """The fewest typical mistakes that make ``got`` (N, dim); None when no variant does."""
    half = dim // 2
    denominators = {half - shift: None}
    denominators.setdefault(half, f"with downscale_freq_shift={shift:g} the exponent "
                                  "divides by (half - downscale_freq_shift), not by half")
    denominators.setdefault(half - 1, f"with downscale_freq_shift={shift:g} the exponent "
                                      f"divides by half - {shift:g}, not by half - 1")
    denominators.setdefault(half + shift, "subtract the shift: the exponent divides by "
                                          "(half - downscale_freq_shift)")
    order = ("flip_sin_to_cos=True puts all the cosines first, then the sines" if flip else
             "flip_sin_to_cos=False keeps the sines first, then the cosines")
    found = []
    for cos_first in (flip, not flip):
        for denominator, d_hint in denominators.items():
            if denominator <= 0:
                continue
            for base, b_hint in _BASES:
                for interleave in (False, True):
                    want = _sinusoid(_T, dim, cos_first, denominator, base, interleave)
                    if (got - want).abs().max() > 1e-3:
                        continue
                    hints = [order if cos_first != flip else None, d_hint, b_hint,
                             "concatenate all the cosines and all the sines, [cos(a_0), ..., "
                             "cos(a_h-1), sin(a_0), ...], not interleaved pairs as in the "
                             "Transformer paper" if interleave else None]
                    found.append([x for x in hints if x])
    return min(found, key=len) if found else None


def check_timestep_embedding(answer, unet=None) -> bool:
    """Checker of notebook 03's exercise: ``answer(timesteps, dim, flip_sin_to_cos,
    downscale_freq_shift)`` must give diffusers' sinusoidal timestep embedding, (N, dim), for
    a 1-D tensor of N timesteps. Tried on ``unet.time_proj``'s settings (when ``unet`` is
    given) against the module itself, then SD 1.5's, the DDPM paper's (sin first, shift 1)
    and an odd width, each against diffusers' ``Timesteps``. Prints what is right or wrong,
    naming the typical mistake the result matches (sin/cos order, the frequencies' base,
    the shift in the exponent, interleaving); returns True or False, never raises.

    Introduced in notebooks/03_unet_from_the_inside.ipynb.
    """
    cases = []
    if unet is not None:
        tp = _check_unet(unet).time_proj
        order = "cos" if tp.flip_sin_to_cos else "sin"
        cases.append((f"your UNet's time_proj ({tp.num_channels}, {order} first, shift "
                      f"{tp.downscale_freq_shift:g})", tp, tp.num_channels, tp.flip_sin_to_cos,
                      tp.downscale_freq_shift))
    n15 = SD15_UNET["block_out_channels"][0]
    cases += [(f"SD 1.5's ({n15}, cos first, shift 0)", Timesteps(n15, True, 0), n15, True, 0),
              ("the DDPM paper's (128, sin first, shift 1)", Timesteps(128, False, 1), 128,
               False, 1),
              ("an odd width's (33, sin first, shift 1)", Timesteps(33, False, 1), 33, False, 1)]
    if answer is None:
        print("Exercise not solved yet: write my_timestep_embedding(timesteps, dim, "
              "flip_sin_to_cos, downscale_freq_shift) and run this cell again.")
        return False
    if not callable(answer):
        print(f"Not quite: expected a function my_timestep_embedding(timesteps, dim, "
              f"flip_sin_to_cos, downscale_freq_shift), got {type(answer).__name__}.")
        return False
    for where, module, dim, flip, shift in cases:
        want = module(_T).float().cpu()  # (N, dim); Timesteps has no weights: CPU
        try:
            with torch.no_grad():
                got = answer(_T.clone(), dim, flip, shift)
        except Exception as e:  # the learner's code: report it, do not stop the notebook
            print(f"Not quite: on {where} settings your function raised {type(e).__name__}: {e}")
            return False
        if got is None:
            print("Exercise not solved yet: your function returns None; return the (N, dim) "
                  "embedding.")
            return False
        try:
            got = torch.as_tensor(got, dtype=torch.float32).detach().cpu()
        except (TypeError, ValueError, RuntimeError):
            print(f"Not quite: expected a tensor (N, dim), got {type(got).__name__}.")
            return False
        if got.shape != want.shape:
            odd = dim % 2 and tuple(got.shape) == (len(_T), dim - 1)
            print(f"Not quite: on {where} settings expected shape {tuple(want.shape)} "
                  f"(N timesteps x dim), got {tuple(got.shape)}."
                  + (" For an odd dim, pad one zero column at the end." if odd else ""))
            return False
        if not torch.isfinite(got).all() or (got - want).abs().max() > 1e-3:
            mistakes = _mistakes(got, dim, flip, shift) if torch.isfinite(got).all() else None
            hint = ("; ".join(mistakes) if mistakes else
                    "channel i < half is cos or sin of t * 10000 ** (-i / (half - "
                    "downscale_freq_shift)), half = dim // 2")
            print(f"Not quite: wrong on {where} settings (max difference "
                  f"{(got - want).abs().max().item():.3g}). Hint: {hint}.")
            return False
    print(f"Correct: your embedding matches diffusers' on all {len(cases)} settings tried: "
          + "; ".join(c[0] for c in cases) + ".")
    return True
