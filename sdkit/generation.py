"""What one generation costs: weights, memory and FLOPs, for the loaded model and for SD 1.5.

Notebook 07 takes a text-to-image call apart (tokenizer, text encoder, the denoising loop,
the VAE decoder) and measures it. This module keeps what it measures with:

* ``parameter_counts``: weights per part;
* ``peak_memory_bytes``: peak memory so far (CUDA's allocator, else the process's peak RSS);
* ``unet_tflop_per_step``: the UNet's work per guided denoising step at a picture size,
  counted by the kit's one FLOP counter (``sdkit.latents.unet_flops``) on the meta device,
  at the latent size the VAE's factor gives (4 for the toy model, 8 for SD);
* ``SD15_*``: Stable Diffusion 1.5's configs written out (nothing is downloaded), with
  ``sd15_parameter_counts``;
* ``apply_fast_settings``: the kit's fastest settings (fused QKV, channels_last, SDPA,
  ``torch.compile``), which ``python -m sdkit.bench`` measures against stock diffusers;
* ``check_sd15_fp16_mib``: the checker of the notebook's exercise, SD 1.5's weights in
  float16 predicted from its configs.

Left out: timing (``sdkit.bench`` does it, on the whole pipeline), FLOPs of the text encoder
and the VAE decoder (they run once per image, the UNet once per step), other model families.
"""

from __future__ import annotations

import itertools
import math
import numbers
import sys

import torch

from . import checks
from .device import get_device
from .latents import unet_flops
from .unet import SD15_UNET

# Stable Diffusion 1.5 (stable-diffusion-v1-5/stable-diffusion-v1-5), its configs written out;
# the UNet's lives in sdkit.unet (notebook 03), re-exported here as generation.SD15_UNET.
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=512, layers_per_block=2,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, act_fn="silu",
    scaling_factor=0.18215,
)
SD15_TEXT_ENCODER = dict(  # CLIP ViT-L/14's text half
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
    layer_norm_eps=1e-5, projection_dim=768, bos_token_id=0, eos_token_id=2, pad_token_id=1,
)
SD15_SCHEDULER = dict(  # SD 1.5's training schedule, sampled with DDIM
    num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
    clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
)
# pixels per latent pixel along each side: diffusers' rule, 2 ** (number of VAE blocks - 1)
SD15_VAE_SCALE_FACTOR = 2 ** (len(SD15_VAE["block_out_channels"]) - 1)


# ------------------------------------------------------------------------------ weights


def parameter_counts(pipe) -> dict[str, int]:
    """Number of weights in each of the pipeline's torch modules (unet, vae, text_encoder, ...).

    Introduced in notebooks/07_full_generation.ipynb.
    """
    components = getattr(pipe, "components", None)
    if not isinstance(components, dict):
        checks.fail("pipe", type(pipe).__name__, "expected a diffusers pipeline (with .components)")
    counts = {}
    for name, part in components.items():
        if isinstance(part, torch.nn.Module):
            counts[name] = sum(p.numel() for p in part.parameters())
    return counts


def sd15_parameter_counts() -> dict[str, int]:
    """Weights in SD 1.5's unet, vae and text_encoder, counted on the meta device (no memory).

    Introduced in notebooks/07_full_generation.ipynb.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        parts = {"unet": UNet2DConditionModel(**SD15_UNET), "vae": AutoencoderKL(**SD15_VAE),
                 "text_encoder": CLIPTextModel(CLIPTextConfig(**SD15_TEXT_ENCODER))}
    return {name: sum(p.numel() for p in m.parameters()) for name, m in parts.items()}


# ------------------------------------------------------------------------------ memory


def peak_memory_bytes(device=None) -> int:
    """Peak memory so far: ``torch.cuda.max_memory_allocated`` on CUDA, else the process's
    peak resident set size (``ru_maxrss``; psutil's current RSS where ``resource`` is missing).

    Introduced in notebooks/07_full_generation.ipynb.
    """
    device = get_device(device, "float32").device
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        import resource
    except ImportError:  # Windows
        import psutil

        return int(psutil.Process().memory_info().rss)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS: bytes; Linux: KiB


# ------------------------------------------------------------------------------ FLOPs


def unet_tflop_per_step(unet_config, height: int, width: int, vae_scale_factor: int,
                        guidance: bool = True, seq_len: int = 77) -> float:
    """TFLOP of one denoising step at ``height`` x ``width`` pixels: the UNet on the guided
    batch of 2 (prompt and empty prompt), or on 1 latent with ``guidance=False``.

    The latent is (C, height / f, width / f) with f = ``vae_scale_factor`` (read it from the
    pipeline: ``sdkit.images.vae_scale_factor(pipe.vae)``, 4 for the toy model, 8 for SD;
    ``SD15_VAE_SCALE_FACTOR`` for SD 1.5's configs), the text ``seq_len`` tokens of the
    UNet's ``cross_attention_dim``. Counted by ``sdkit.latents.unet_flops`` on a UNet built
    from ``unet_config`` (a dict or ``unet.config``) on the meta device: no memory, no compute.

    Introduced in notebooks/07_full_generation.ipynb.
    """
    from diffusers import UNet2DConditionModel

    f = checks.check_int("vae_scale_factor", vae_scale_factor, 1, 64)
    height, width = checks.check_size(height, width, multiple=f)
    checks.check_bool("guidance", guidance)
    seq_len = checks.check_int("seq_len", seq_len, 1, 4096)
    if not hasattr(unet_config, "keys"):
        checks.fail("unet_config", type(unet_config).__name__,
                    "expected a UNet2DConditionModel config: a dict or unet.config")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(dict(unet_config))
    c, dim = unet.config.in_channels, unet.config.cross_attention_dim
    flops = unet_flops(unet, (c, height // f, width // f), (seq_len, dim))  # batch 1
    return (2 if guidance else 1) * flops / 1e12


# ------------------------------------------------------------------------------ fast settings


def apply_fast_settings(pipe, compile: bool = True, compile_mode: str = "max-autotune") -> dict:
    """The kit's fastest settings, in place: fused QKV, channels_last, SDPA (checked) and, when
    ``compile``, ``torch.compile`` of the UNet and the VAE decoder. Returns what was applied.

    Introduced in notebooks/07_full_generation.ipynb.
    """
    from diffusers.models.attention_processor import AttnProcessor2_0, FusedAttnProcessor2_0

    checks.check_bool("compile", compile)
    checks.check_choice("compile_mode", compile_mode,
                        ("default", "reduce-overhead", "max-autotune",
                         "max-autotune-no-cudagraphs"))
    applied = {}
    pipe.fuse_qkv_projections()  # one matmul for q, k and v in self-attention
    procs = set(type(p).__name__ for p in pipe.unet.attn_processors.values())
    applied["attention"] = "+".join(sorted(procs))
    if not procs <= {FusedAttnProcessor2_0.__name__, AttnProcessor2_0.__name__}:
        checks.fail("pipe", applied["attention"],
                    "expected diffusers' SDPA attention processors (AttnProcessor2_0); "
                    "reset custom ones with pipe.unet.set_default_attn_processor()")
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.vae.to(memory_format=torch.channels_last)
    applied["channels_last"] = True
    if compile:
        import torch._inductor.config as inductor

        # the settings of diffusers' "accelerate inference" guide for SD
        inductor.conv_1x1_as_mm = True
        inductor.coordinate_descent_tuning = True
        inductor.epilogue_fusion = False
        inductor.coordinate_descent_check_all_directions = True
        pipe.unet = torch.compile(pipe.unet, mode=compile_mode, fullgraph=True)
        pipe.vae.decode = torch.compile(pipe.vae.decode, mode=compile_mode, fullgraph=True)
        applied["compile"] = compile_mode
    else:
        applied["compile"] = False
    return applied


# ------------------------------------------------------------------------------ the exercise

MIB = 2**20
# (value, what it means) for the typical mistakes of notebook 07's exercise
_BYTES_PER_WEIGHT = ((2, None), (4, "4 bytes per weight is float32; float16 takes 2"),
                     (1, "1 byte per weight is 8 bits; float16 takes 16 bits = 2 bytes"),
                     (16, "16 is float16's bits; a weight takes 16 / 8 = 2 bytes"),
                     (32, "32 is float32's bits, and float16 takes 2 bytes"))
_UNITS = ((MIB, None), (1e6, "that is MB (10**6 bytes); a MiB is 2**20 = 1,048,576 bytes"),
          (1, "that is bytes: divide by 2**20 for MiB"),
          (2**10, "that is KiB: a MiB is 2**20 bytes"),
          (2**30, "that is GiB: a MiB is 2**20 bytes, a GiB 2**30"),
          (1e9, "that is GB (10**9 bytes): a MiB is 2**20 bytes"))


def _fp16_mistakes(value: float, counts: dict[str, int]) -> list[str] | None:
    """The fewest typical mistakes (bytes per weight, unit, parts left out) that give ``value``
    MiB from ``counts``; None when no combination does (to 0.2%)."""
    found = []
    for size in range(len(counts), 0, -1):
        for parts in itertools.combinations(counts, size):
            for nbytes, bytes_hint in _BYTES_PER_WEIGHT:
                for unit, unit_hint in _UNITS:
                    candidate = sum(counts[p] for p in parts) * nbytes / unit
                    if abs(value - candidate) > 2e-3 * candidate:
                        continue
                    left_out = [p for p in counts if p not in parts]
                    hints = [h for h in (bytes_hint, unit_hint) if h]
                    if left_out:
                        hints.append(f"the {' and '.join(left_out)} "
                                     f"{'is' if len(left_out) == 1 else 'are'} left out: "
                                     f"a generation loads all of {', '.join(counts)}")
                    if hints:
                        found.append(hints)
    return min(found, key=len) if found else None


def check_sd15_fp16_mib(answer) -> bool:
    """Notebook 07's exercise: how many MiB do SD 1.5's weights take in float16?

    The weights of its three parts together (unet, vae, text_encoder; counted from its
    configs by ``sd15_parameter_counts``). ``answer``: a number of MiB (right to 1 MiB), or
    None (not solved yet). Prints whether it is right and, if not, which typical mistake the
    number matches (float32's 4 bytes, MB instead of MiB, a part left out, ...); returns True
    or False, never raises.

    Introduced in notebooks/07_full_generation.ipynb.
    """
    if answer is None:
        print("not solved yet: set sd15_fp16_mib to the MiB that SD 1.5's unet, vae and "
              "text_encoder weights take in float16.")
        return False
    if isinstance(answer, torch.Tensor) and answer.numel() == 1:
        answer = answer.item()
    if isinstance(answer, bool) or not isinstance(answer, numbers.Real) \
            or not math.isfinite(answer):
        print(f"sd15_fp16_mib={answer!r}: expected a number of MiB (an int or a float).")
        return False
    counts = sd15_parameter_counts()
    n = sum(counts.values())
    right = n * 2 / MIB
    if abs(answer - right) <= 1:
        print(f"Right: {n:,} weights x 2 bytes = {n * 2:,} bytes = {right:,.1f} MiB "
              f"({n * 2 / 1e9:.2f} GB; float32 would take twice as much).")
        return True
    mistakes = _fp16_mistakes(float(answer), counts)
    if mistakes:
        print(f"Not quite: {answer:,.4g} MiB. Hint: " + "; ".join(mistakes) + ".")
    else:
        print(f"Not quite: {answer:,.4g} MiB. Hint: count the weights of all three parts "
              f"(sd15_parameter_counts()), times 2 bytes each, divided by 2**20 bytes per MiB.")
    return False
