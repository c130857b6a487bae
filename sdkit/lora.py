"""LoRA-DreamBooth: a subject behind a rare identifier (Ruiz et al., 2022; Hu et al., 2021).

DreamBooth proper fine-tunes every weight of the UNet (and, in diffusers' script, optionally
the text encoder) on a few pictures of a subject captioned with a rare identifier ("a sks
triangle on the left"), plus a prior-preservation loss on pictures the model itself drew
for the class word. This module is the community's cheap version, LoRA-DreamBooth
(diffusers' ``train_dreambooth_lora.py``): the same data and losses, but the UNet (a copy)
stays frozen and peft adds low-rank updates ``W + (alpha / r) B A`` next to its attention
projections and ResNet convolutions; only A and B train, on the model's own loss
(``finetune.diffusion_loss``). The pipeline you pass in is left exactly as it was; the
matrices are saved as safetensors. ``check_sd15_lora_bytes`` is notebook 10's exercise: the
file size of such a LoRA for SD 1.5, worked out from the shapes of its UNet.

Left out: full DreamBooth (all UNet weights), LoRA on the text encoder, merging adapters
into the weights, several adapters at once.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import save_file

from . import checks, finetune, pipeline
from .checks import fail
from .unet import SD15_UNET

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

    Introduced in notebooks/10_fine_tuning.ipynb.
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


def _adapted_layers(unet, r: int, target_modules) -> int:
    """Refuse ``target_modules`` that name no layer of ``unet`` (peft would add nothing to them)
    and a rank ``r`` above the narrowest adapted layer's full rank (min(in, out) of a linear
    layer, min(in * kh * kw, out) of a convolution): past it, B A is no longer low-rank."""
    if isinstance(target_modules, str) or not all(isinstance(t, str) for t in target_modules):
        fail("target_modules", target_modules, f"expected a list of layer names, e.g. "
                                               f"{list(LORA_TARGETS)}")
    widths = {}
    for name, m in unet.named_modules():
        if any(name.endswith(t) for t in target_modules) and "lora_" not in name:
            if isinstance(m, torch.nn.Linear):
                widths[name] = min(m.in_features, m.out_features)
            elif isinstance(m, torch.nn.Conv2d):
                widths[name] = min(m.in_channels * math.prod(m.kernel_size), m.out_channels)
    missing = [t for t in target_modules if not any(n.endswith(t) for n in widths)]
    if not target_modules or missing:
        fail("target_modules", list(target_modules), f"expected names of the UNet's Linear or "
                                                     f"Conv2d layers, e.g. {list(LORA_TARGETS)}; "
                                                     f"no layer matches {missing}")
    narrowest = min(widths, key=widths.get)
    if r > widths[narrowest]:
        fail("r", r, f"expected a rank <= {widths[narrowest]}, the full rank of the narrowest "
                     f"adapted layer ({narrowest}): a higher rank is no longer low-rank")
    return r


def train_lora(pipe, latents, captions, class_latents=None, class_captions=None, r: int = 4,
               alpha: float | None = None, prior_weight: float = 1.0, steps: int = 100,
               lr: float = 4e-3, batch_size: int = 8, seed: int = 0,
               target_modules=LORA_TARGETS,
               p_uncond: float = finetune.P_UNCOND) -> finetune.FineTuneResult:
    """LoRA-DreamBooth: adapt a copy of the UNet to pictures of a subject captioned with a
    rare identifier (``"a sks triangle on the left"``).

    peft adds ``B @ A`` (rank ``r``, B initialised to zero so training starts from the
    model itself) next to every layer named in ``target_modules`` (default: ``to_q``,
    ``to_k``, ``to_v``, ``to_out.0`` and the ResNets' ``conv1``, ``conv2``); only A and B
    train. With ``class_latents`` / ``class_captions`` (pictures the model itself drew for
    the class, e.g. "a red triangle on the left") each step adds ``prior_weight`` times the
    same loss on them, in the same UNet call (one batch of both, as diffusers' script
    does): prior preservation keeps the class word meaning what it meant.
    A share ``p_uncond`` of each batch trains on the empty prompt (see
    ``finetune.P_UNCOND``), so that classifier-free guidance still has a sound
    unconditional prediction.

    ``r`` is at most the narrowest adapted layer's full rank. The batch must fit in memory
    (the estimate and the limit are in the error; ``SDKIT_MEMORY_LIMIT=32GiB`` raises the
    limit). A progress bar shows the steps; Jupyter's stop button (KeyboardInterrupt) and a
    non-finite loss (``lr`` too large: an error naming it) stop training, and ``pipe`` is as
    it was. Returns a ``FineTuneResult``; ``extra["unet"]`` is the adapted UNet copy.

    Introduced in notebooks/10_fine_tuning.ipynb.
    """
    config = _lora_config(r, alpha, target_modules)
    _adapted_layers(pipe.unet, config.r, target_modules)
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

    Introduced in notebooks/10_fine_tuning.ipynb.
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

    Introduced in notebooks/10_fine_tuning.ipynb.
    """
    state, meta = finetune._read(path, "a LoRA file written by save_lora")
    try:
        r, alpha = int(meta["r"]), float(meta["lora_alpha"])
        targets = json.loads(meta["target_modules"])
    except (KeyError, ValueError, TypeError) as e:
        fail("path", str(path), f"expected a LoRA file written by save_lora (r, lora_alpha, "
                                f"target_modules in its metadata; {type(e).__name__}: {e})")
    config = _lora_config(r, alpha, targets)
    _adapted_layers(pipe.unet, config.r, targets)
    unet = copy.deepcopy(pipe.unet)
    unet.add_adapter(config)
    try:
        result = set_peft_model_state_dict(unet, state)
    except RuntimeError as e:  # tensors of other shapes: a LoRA of another model
        fail("path", str(path), f"a LoRA made for another UNet ({str(e).splitlines()[-1][:90]})")
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing:
        fail("path", str(path), f"expected a LoRA of every adapted layer; keys that fit no "
                                f"layer: {result.unexpected_keys[:2]}, layers without weights: "
                                f"{missing[:2]}")
    unet.requires_grad_(False)
    return finetune._rebuild(pipe, unet=unet.eval())


# ------------------------------------------------------------------------------ exercise


def _sd15_lora_sizes(r: int = 4) -> dict[str, int]:
    """Numbers of a rank-``r`` LoRA on SD 1.5's attention projections, counted from the shapes
    of its UNet built on the meta device: all of it, only the A or only the B matrices, the
    self- or the cross-attention layers alone, without ``to_out.0``, the full matrices W, and
    with the ResNet convolutions too."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
    sizes = dict.fromkeys(("all", "a", "b", "attn1", "attn2", "no_out", "full"), 0)
    for name, m in unet.named_modules():
        if not isinstance(m, torch.nn.Linear) or not name.endswith(ATTENTION_TARGETS):
            continue
        a, b = r * m.in_features, r * m.out_features  # A is (r, in), B is (out, r)
        sizes["all"] += a + b
        sizes["a"] += a
        sizes["b"] += b
        sizes["attn1" if ".attn1." in name else "attn2"] += a + b
        sizes["no_out"] += 0 if name.endswith("to_out.0") else a + b
        sizes["full"] += m.in_features * m.out_features
    sizes["with_convs"] = lora_parameter_count(unet, r, LORA_TARGETS)
    return sizes


def check_sd15_lora_bytes(answer) -> bool:
    """Notebook 10's exercise: how many bytes do the tensors of a rank-4 LoRA on every
    ``to_q``, ``to_k``, ``to_v`` and ``to_out.0`` of SD 1.5's UNet take in float16?

    ``answer``: an int number of bytes, or None (not solved yet). Prints whether it is right,
    with a hint on the typical mistakes (float32, counting only A or only B, one kind of
    attention layer, the convolutions too, ...); returns True or False and never raises.

    Introduced in notebooks/10_fine_tuning.ipynb.
    """
    if answer is None:
        print("Not solved yet: set lora_fp16_bytes to the bytes of the LoRA's tensors (an int).")
        return False
    if torch.is_tensor(answer) and answer.numel() == 1:
        answer = answer.item()
    n = _sd15_lora_sizes(4)
    right = 2 * n["all"]
    if isinstance(answer, (float, np.floating)) and 0 < answer < 1e4:
        print(f"lora_fp16_bytes={answer!r}: expected bytes as an int; that looks like MB or MiB. "
              "Hint: leave the answer in bytes.")
        return False
    if isinstance(answer, (float, np.floating)) and float(answer).is_integer():
        answer = int(answer)
    if isinstance(answer, bool) or not isinstance(answer, (int, np.integer)):
        print(f"lora_fp16_bytes={answer!r}: expected an int number of bytes.")
        return False
    answer = int(answer)
    if answer == right:
        print(f"Right: {n['all']:,} numbers (r x (in + out) for each of the 128 projections) "
              f"x 2 bytes = {right:,} bytes ({right / 2**20:.2f} MiB). The safetensors header "
              "adds a few KB of names and shapes; in float32 the same LoRA is twice as big.")
        return True
    mistakes = [
        (4 * n["all"], "that is float32 (4 bytes a number), or rank 8; float16 takes 2"),
        (n["all"], "that is the number of parameters; each takes 2 bytes in float16"),
        (2 * n["a"], "you counted only the A matrices (r x in); B (out x r) is stored too"),
        (2 * n["b"], "you counted only the B matrices (out x r); A (r x in) is stored too"),
        (4 * n["a"], "only the A matrices, and in float32"),
        (4 * n["b"], "only the B matrices, and in float32"),
        (2 * n["attn1"], "that is the self-attention layers (attn1) only; cross-attention "
                         "(attn2) has the four projections too"),
        (2 * n["attn2"], "that is the cross-attention layers (attn2) only; self-attention "
                         "(attn1) has the four projections too"),
        (2 * n["no_out"], "you left out to_out.0, the output projection of each attention"),
        (2 * n["with_convs"], "that includes the ResNet convolutions (the notebook's LoRA "
                              "adapts them too); the question asks for the attention projections"),
        (2 * n["full"], "that is the full matrices W; LoRA stores only A and B"),
        (right // 4, "that is rank 1; the question asks for rank 4"),
    ]
    hints: dict[int, str] = {}
    for value, why in mistakes:  # some counts coincide (A alone = attn2 alone for SD 1.5)
        hints[value] = f"{hints[value]}; or {why}" if value in hints else why
    hint = hints.get(answer, "count r x in (A) + out x r (B) for every nn.Linear whose name ends "
                             "with to_q, to_k, to_v or to_out.0, then 2 bytes a number")
    print(f"Not quite: {answer:,} bytes. Hint: {hint}.")
    return False
