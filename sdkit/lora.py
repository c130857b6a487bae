"""DreamBooth with LoRA: a subject behind a rare identifier (Ruiz et al., 2022; Hu et al., 2021).

A copy of the UNet gets low-rank updates ``W + (alpha / r) B A`` (peft) next to its
attention projections and ResNet convolutions, and trains them on pictures of a subject
captioned with a rare identifier ("a sks triangle on the left"), on the model's own loss
(``finetune.diffusion_loss``). Pictures the model itself drew for the class word, trained
on alongside (prior preservation), keep that word meaning what it meant. The pipeline you
pass in is left exactly as it was; the matrices are saved as safetensors.

Left out: full DreamBooth (all UNet weights), LoRA on the text encoder, merging adapters
into the weights, several adapters at once.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from . import checks, finetune, pipeline
from .checks import fail

# What LoRA adapts: the attention projections (diffusers' DreamBooth-LoRA default) and the
# ResNet convolutions (LyCORIS calls this LoCon). A new *shape* lives in the convolutions:
# with the attention layers alone the toy model learns the star's colour but not its points.
ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
LORA_TARGETS = ATTENTION_TARGETS + ("conv1", "conv2")


def _lora_config(r: int = 4, alpha: float | None = None,
                 target_modules=LORA_TARGETS) -> LoraConfig:
    """peft's ``LoraConfig`` for ``target_modules``, ``lora_alpha = alpha`` (default ``r``,
    a scale of 1)."""
    r = checks.check_int("r", r, 1, 1024)
    alpha = float(r) if alpha is None else checks.check_float("alpha", alpha, 1e-6, 1e6)
    return LoraConfig(r=r, lora_alpha=alpha, init_lora_weights=True,
                      target_modules=list(target_modules))


def lora_parameter_count(unet, r: int, target_modules=LORA_TARGETS) -> int:
    """What LoRA of rank ``r`` adds: ``r * (in + out)`` for each adapted ``nn.Linear``
    (A is r x in, B is out x r) and ``r * (in * kh * kw + out)`` for each ``nn.Conv2d``
    (A is a kh x kw convolution to r channels, B a 1x1 one back to out).

    Introduced in notebooks/09_fine_tuning.ipynb.
    """
    r = checks.check_int("r", r, 1, 1024)
    total = 0
    for name, m in unet.named_modules():
        if not any(name.endswith(t) for t in target_modules) or "lora_" in name:
            continue
        if isinstance(m, torch.nn.Linear):
            total += r * (m.in_features + m.out_features)
        elif isinstance(m, torch.nn.Conv2d):
            kh, kw = m.kernel_size
            total += r * (m.in_channels * kh * kw + m.out_channels)
    return total


def train_lora(pipe, latents, captions, class_latents=None, class_captions=None, r: int = 4,
               alpha: float | None = None, prior_weight: float = 1.0, steps: int = 250,
               lr: float = 2e-3, batch_size: int = 8, seed: int = 0,
               target_modules=LORA_TARGETS,
               p_uncond: float = finetune.P_UNCOND) -> finetune.FineTuneResult:
    """DreamBooth with LoRA: adapt a copy of the UNet to pictures of a subject captioned
    with a rare identifier (``"a sks triangle on the left"``).

    peft adds ``B @ A`` (rank ``r``, B initialised to zero so training starts from the
    model itself) next to every layer named in ``target_modules`` (default: ``to_q``,
    ``to_k``, ``to_v``, ``to_out.0`` and the ResNets' ``conv1``, ``conv2``); only A and B
    train. With ``class_latents`` / ``class_captions`` (pictures the model itself drew for
    the class, e.g. "a red triangle on the left") each step adds ``prior_weight`` times the
    same loss on them: prior preservation keeps the class word meaning what it meant.
    A share ``p_uncond`` of each batch trains on the empty prompt (see
    ``finetune.P_UNCOND``), so that classifier-free guidance still has a sound
    unconditional prediction.

    Returns a ``FineTuneResult``; ``extra["unet"]`` is the adapted UNet copy.

    Introduced in notebooks/09_fine_tuning.ipynb.
    """
    config = _lora_config(r, alpha, target_modules)
    p_uncond = checks.check_float("p_uncond", p_uncond, 0.0, 1.0)
    steps, lr, batch_size, seed = finetune._check_train_args(steps, lr, batch_size, seed,
                                                             latents, captions, pipe.tokenizer)
    prior_weight = checks.check_float("prior_weight", prior_weight, 0.0, 100.0)
    if (class_latents is None) != (class_captions is None):
        fail("class_captions", class_captions, "expected class_latents and class_captions together")
    if class_latents is not None:
        finetune._check_train_args(1, 1.0, 1, 0, class_latents, class_captions, pipe.tokenizer)
    unet = copy.deepcopy(pipe.unet)
    unet.requires_grad_(False)
    torch.manual_seed(seed)  # A's random init
    unet.add_adapter(config)
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    ctx = finetune._encode_frozen(pipe, captions)  # (N, T, d): the text encoder is frozen
    class_ctx = None if class_captions is None else finetune._encode_frozen(pipe, class_captions)
    losses, seconds = finetune._train(
        "DreamBooth LoRA", unet, params,
        lambda idx, prior: (class_ctx if prior else ctx)[idx], latents, steps, lr, batch_size, seed,
        pipeline.training_scheduler(pipe), class_latents=class_latents, prior_weight=prior_weight,
        uncond=finetune._encode_frozen(pipe, [""]), p_uncond=p_uncond)
    unet.eval()
    unet.requires_grad_(False)
    modules = sorted({n.split(".lora_")[0] for n, _ in unet.named_parameters() if "lora_" in n})
    return finetune.FineTuneResult(
        "DreamBooth LoRA", finetune._rebuild(pipe, unet=unet), losses,
        trained_parameters=sum(p.numel() for p in params), seconds=seconds,
        trained_modules=[f"unet.{m}" for m in modules],
        extra={"unet": unet, "r": config.r, "alpha": config.lora_alpha,
               "target_modules": list(target_modules)})


def save_lora(result: finetune.FineTuneResult, path) -> Path:
    """Save the LoRA matrices (``get_peft_model_state_dict``) as safetensors, with r and
    alpha in the file's metadata.

    Introduced in notebooks/09_fine_tuning.ipynb.
    """
    finetune._check_result(result, "DreamBooth LoRA")
    state = get_peft_model_state_dict(result.extra["unet"])  # lora_A / lora_B of every layer
    state = {k: v.detach().contiguous() for k, v in state.items()}
    path = finetune._out_path(path)
    meta = {"r": str(result.extra["r"]), "lora_alpha": str(result.extra["alpha"]),
            "target_modules": json.dumps(result.extra["target_modules"])}
    save_file(state, str(path), metadata=meta)
    return path


def load_lora(pipe, path):
    """A new pipeline with a copy of ``pipe.unet`` carrying the LoRA saved in ``path``
    (``pipe`` itself is left unchanged).

    Introduced in notebooks/09_fine_tuning.ipynb.
    """
    path = finetune._in_path(path)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if "r" not in meta:
        fail("path", str(path), "expected a LoRA file written by save_lora (r in its metadata)")
    unet = copy.deepcopy(pipe.unet)
    unet.add_adapter(_lora_config(int(meta["r"]), float(meta["lora_alpha"]),
                                  json.loads(meta["target_modules"])))
    result = set_peft_model_state_dict(unet, load_file(str(path)))
    if getattr(result, "unexpected_keys", None):
        fail("path", str(path), f"keys that fit no LoRA layer: {result.unexpected_keys[:3]}")
    unet.requires_grad_(False)
    return finetune._rebuild(pipe, unet=unet.eval())
