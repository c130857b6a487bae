"""Stable unCLIP itself: notebook 11's real-weights path, and the cells that run on both paths.

Notebook 11 runs the same cells on two kinds of pipeline:

- the kit's toy model (or any ``StableDiffusionPipeline``): the toy unCLIP parts of
  ``sdkit.variations`` stand in for Stable unCLIP's CLIP image tower (the kit's own CLIP's,
  ``data/toy-clip``) and for a UNet that reads image embeddings (a projector into the text
  hidden states it already reads);
- a Stable unCLIP model: ``SDKIT_MODEL`` naming a local diffusers folder (or a hub id in the
  local hub cache) whose ``model_index.json`` says ``"_class_name":
  "StableUnCLIPImg2ImgPipeline"``. ``load_pipeline`` then loads diffusers' stock
  ``StableUnCLIPImg2ImgPipeline`` (safetensors only, no remote code), and the same cells use
  its CLIP image encoder, its ``image_normalizer`` and ``image_noising_scheduler``
  (``noise_image_embeddings``) and its UNet, which reads the noised embedding (with the
  level's sinusoidal embedding concatenated) through ``class_labels``.

``image_embeddings``, ``noise_embeddings`` and ``generate_variations`` take both kinds and do
the right thing for each; ``check_noise_augmentation_answer`` is the notebook's exercise
checker (against diffusers' ``noise_image_embeddings``).

Diffusers' ``StableUnCLIPImg2ImgPipeline`` has no safety-checker slot and Stability's
folders ship none; a folder that has a ``safety_checker/`` gets it run on every variation here
(``safety_checker=False`` skips it).

Left out: the text-to-image unCLIP with its prior (``StableUnCLIPPipeline``); unCLIP
single-file checkpoints; downloading (fetch the folder first: ``hf download
stabilityai/stable-diffusion-2-1-unclip --local-dir <folder>``); CPU offload.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from diffusers import StableUnCLIPImg2ImgPipeline
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import (
    StableUnCLIPImageNormalizer,
)
from diffusers.utils import logging as diffusers_logging
from huggingface_hub import try_to_load_from_cache
from PIL import Image
from tqdm.auto import tqdm

from . import checks, images, pipeline, variations
from .device import get_device

UNCLIP_CLASS = "StableUnCLIPImg2ImgPipeline"


# ----------------------------------------------------------------------------- loading


def _unclip_folder(text: str) -> Path | None:
    """The local folder of a Stable unCLIP model that ``text`` names, or None for anything else
    (the toy, another pipeline family, a file, a hub id not in the local cache)."""
    if text == "toy":
        return None
    folder = Path(text).expanduser()
    if not (folder / "model_index.json").is_file():
        if not pipeline._HUB_ID.match(text) or folder.exists():
            return None
        try:
            cached = try_to_load_from_cache(text, "model_index.json")
        except Exception:  # noqa: BLE001 - a malformed id is simply "not cached"
            return None
        if not isinstance(cached, str):
            return None
        folder = Path(cached).parent  # the snapshot folder
    try:
        name = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))["_class_name"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # not readable here: sdkit.pipeline.load_pipeline says what is wrong
    return folder if name == UNCLIP_CLASS else None


def load_pipeline(model: str | os.PathLike | None = None, device=None, dtype=None, *,
                  safety_checker: bool = True):
    """The pipeline notebook 11 runs on: a ``StableUnCLIPImg2ImgPipeline`` when ``model`` (or
    else ``SDKIT_MODEL``) names a Stable unCLIP folder, else ``sdkit.pipeline.load_pipeline``'s
    ``StableDiffusionPipeline`` (the toy by default).

    A Stable unCLIP folder is a local diffusers folder (or a hub id whose files are in the
    local hub cache) whose ``model_index.json`` names ``StableUnCLIPImg2ImgPipeline``. Its
    components are checked whole first (``checks.check_components``: every subfolder, config
    and safetensors file; pickle weights are refused), then loaded with the stock
    ``StableUnCLIPImg2ImgPipeline.from_pretrained(folder, use_safetensors=True)``, local files
    only, ``trust_remote_code`` off, on ``sdkit.get_device(device, dtype)``. A
    ``safety_checker/`` in the folder is loaded too and runs on every variation
    (``generate_variations``) unless ``safety_checker=False``.

    Introduced in notebooks/11_image_variations.ipynb.
    """
    if model is not None and not isinstance(model, (str, os.PathLike)):
        checks.fail("model", model, "expected 'toy', a hub id, a folder or a .safetensors file")
    text = os.fspath(model) if model is not None else \
        os.environ.get(pipeline.MODEL_ENV, "").strip() or "toy"
    safety_checker = checks.check_bool("safety_checker", safety_checker)
    folder = _unclip_folder(text)
    if folder is None:
        return pipeline.load_pipeline(model, device, dtype, safety_checker=safety_checker)
    choice = get_device(device, dtype)
    info = checks.read_model_index(folder, "model")
    checks.check_components(folder, info, "model")
    verbosity = diffusers_logging.get_verbosity()
    if "safety_checker" in info:  # diffusers warns that the class has no slot for it: loaded below
        diffusers_logging.set_verbosity_error()
    try:
        pipe = StableUnCLIPImg2ImgPipeline.from_pretrained(
            folder, use_safetensors=True, local_files_only=True, trust_remote_code=False,
            dtype=choice.dtype).to(choice.device)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    pipe.safety_checker = None
    if safety_checker and (folder / "safety_checker" / "config.json").is_file():
        checks.check_components(folder, {"safety_checker": ["stable_diffusion", "checker"]})
        pipe.safety_checker = StableDiffusionSafetyChecker.from_pretrained(
            folder, subfolder="safety_checker", use_safetensors=True, local_files_only=True,
            dtype=choice.dtype).to(choice.device).eval()
    return pipe


def is_unclip(pipe) -> bool:
    """True for diffusers' ``StableUnCLIPImg2ImgPipeline`` (the real-weights path).

    Introduced in notebooks/11_image_variations.ipynb.
    """
    return isinstance(pipe, StableUnCLIPImg2ImgPipeline)


# ----------------------------------------------------------------------------- both paths


def _pil(pictures, name: str) -> list:
    return [Image.fromarray(a) for a in images.to_uint8(images.to_tensor(pictures, name=name))]


@torch.no_grad()
def image_embeddings(pipe, model, pictures) -> torch.Tensor:
    """Image embeddings (B, D), float32 on the CPU: CLIP's image tower (``feature_extractor``
    then ``image_encoder(...).image_embeds``) for a Stable unCLIP pipeline, the toy image
    CLIP of ``model`` (``variations.embed_images``, 64x64 pictures) otherwise.

    Introduced in notebooks/11_image_variations.ipynb.
    """
    if not is_unclip(pipe):
        return variations.embed_images(model, pictures)
    pixels = pipe.feature_extractor(images=_pil(pictures, "pictures"),
                                    return_tensors="pt").pixel_values  # (B, 3, 224, 224)
    enc = pipe.image_encoder
    return enc(pixels.to(enc.device, enc.dtype)).image_embeds.float().cpu()  # (B, D)


def _max_noise_level(pipe) -> int:
    """The largest ``noise_level``: the image-noising schedule's last timestep (999)."""
    if is_unclip(pipe):
        return int(pipe.image_noising_scheduler.config.num_train_timesteps) - 1
    return variations.MAX_NOISE_LEVEL


@torch.no_grad()
def noise_embeddings(pipe, model, image_embeds: torch.Tensor, noise_level: int,
                     noise: torch.Tensor | None = None, generator=None) -> torch.Tensor:
    """unCLIP's noise augmentation of image embeddings (B, D) at one ``noise_level``: the
    pipeline's own ``noise_image_embeddings`` for Stable unCLIP (its first D columns: the
    level's sinusoidal embedding that it concatenates is left off), ``variations.noise_augment``
    with ``model``'s statistics otherwise. Same noise (``noise``, or drawn from a CPU
    ``generator``), same result on both.

    Introduced in notebooks/11_image_variations.ipynb.
    """
    if not is_unclip(pipe):
        return variations.noise_augment(model, image_embeds, noise_level, noise, generator)
    level = checks.check_int("noise_level", noise_level, 0, _max_noise_level(pipe))
    if not torch.is_tensor(image_embeds) or image_embeds.ndim != 2:
        checks.fail("image_embeds", image_embeds, "expected a tensor (B, D)")
    if noise is None:
        noise = torch.randn(image_embeds.shape, generator=generator)  # on the CPU, as diffusers
    enc = pipe.image_encoder
    out = pipe.noise_image_embeddings(image_embeds.to(enc.device, enc.dtype), level,
                                      noise=noise.to(enc.device, enc.dtype))
    return out[:, :image_embeds.shape[1]].float().cpu()


@torch.no_grad()
def generate_variations(pipe, model, image, seeds, noise_level: int = 0,
                        num_inference_steps: int | None = None,
                        guidance_scale: float | None = None) -> list:
    """Variations of one picture, one PIL image per seed, on either path.

    Stable unCLIP: ``pipe(image, prompt="", noise_level=..., generator=<CPU generator of the
    seed>)``, the folder's safety checker (if any) run on each image. Otherwise
    ``variations.variations`` with the toy parts ``model``. Steps and guidance default to
    ``sdkit.pipeline.default_settings(pipe)``; four seeds or more show a progress bar.

    Introduced in notebooks/11_image_variations.ipynb.
    """
    if not is_unclip(pipe):
        return variations.variations(pipe, model, image, seeds, noise_level, num_inference_steps,
                                     guidance_scale)
    steps, scale = pipeline.resolve_settings(pipe, num_inference_steps, guidance_scale)
    level = checks.check_int("noise_level", noise_level, 0, _max_noise_level(pipe))
    seeds = [seeds] if isinstance(seeds, (int, np.integer)) else checks.check_list("seeds", seeds)
    generators = pipeline.make_generators(seeds)
    picture = _pil(image, "image")
    if len(picture) != 1:
        checks.fail("image", f"{len(picture)} pictures", "expected one picture")
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    images.check_generation_memory(pipe, "seeds", f"{len(seeds)} seeds", 1, side, side, scale > 1)
    out = []
    for g in tqdm(generators, desc="variations", disable=len(generators) < 4):
        x = pipe(picture[0], prompt="", noise_level=level, num_inference_steps=steps,
                 guidance_scale=scale, generator=g, output_type="np").images  # (1, H, W, 3)
        if pipe.safety_checker is not None:
            x = _run_safety_checker(pipe, x)
        out.append(Image.fromarray((np.clip(x[0], 0, 1) * 255).round().astype(np.uint8)))
    return out


# Adapted from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion
# .StableDiffusionPipeline.run_safety_checker (numpy images in and out; a flagged one: black)
def _run_safety_checker(pipe, image: np.ndarray) -> np.ndarray:
    checker = pipe.safety_checker
    clip_input = pipe.feature_extractor(pipe.numpy_to_pil(image), return_tensors="pt").pixel_values
    image, _ = checker(images=image, clip_input=clip_input.to(checker.device, checker.dtype))
    return image


# ----------------------------------------------------------------------------- the exercise


def _reference_noising(image_embeds, noise_level, noise, mean, std):
    """diffusers' own noise augmentation, on a normaliser holding ``mean`` and ``std``."""
    normalizer = StableUnCLIPImageNormalizer(embedding_dim=image_embeds.shape[1])
    with torch.no_grad():
        normalizer.mean.copy_(mean[None])
        normalizer.std.copy_(std[None])
    parts = SimpleNamespace(image_normalizer=normalizer,
                            image_noising_scheduler=variations._image_noising_scheduler())
    out = StableUnCLIPImg2ImgPipeline.noise_image_embeddings(parts, image_embeds, noise_level,
                                                             noise=noise)
    return out[:, :image_embeds.shape[1]]  # the level's embedding is concatenated after


def _noising_mistakes(e, level, eps, mean, std, ac) -> list[tuple[torch.Tensor, str]]:
    """The results of the typical wrong versions, each with what went wrong."""
    a = ac[level]
    z = (e - mean) / std
    mix = a.sqrt() * z + (1 - a).sqrt() * eps
    before = ac[level - 1]
    return [
        (a.sqrt() * e + (1 - a).sqrt() * eps,
         "the embedding was not normalised: scale it to standard units first, (e - mean) / std"),
        (mix, "the result is still in standard units: unscale it (x * std + mean)"),
        ((a * z + (1 - a) * eps) * std + mean,
         "the weights are the square roots, sqrt(alphas_cumprod) and sqrt(1 - alphas_cumprod)"),
        (((1 - a).sqrt() * z + a.sqrt() * eps) * std + mean,
         "the weights are swapped: the embedding gets sqrt(alphas_cumprod)"),
        ((a.sqrt() * (e - mean) * std + (1 - a).sqrt() * eps) / std + mean,
         "scaling divides by std (and unscaling multiplies by it), not the other way round"),
        (a.sqrt() * e + (1 - a).sqrt() * std * eps,
         "the embedding shrinks towards 0, not towards the mean: subtract the mean before the "
         "noise and add it back after"),
        ((before.sqrt() * z + (1 - before).sqrt() * eps) * std + mean,
         "alphas_cumprod is indexed by noise_level itself"),
    ]


def check_noise_augmentation_answer(fn) -> bool:
    """Exercise checker: ``fn(image_embeds, noise_level, noise, mean, std, alphas_cumprod)``
    must give unCLIP's noised embeddings (B, D) as diffusers'
    ``StableUnCLIPImg2ImgPipeline.noise_image_embeddings`` does (its first D columns), on
    random cases. Prints what is right or wrong, with a hint naming the typical mistake it
    recognises (no normalisation, no square roots, ...); returns a bool. A learner's
    exception is a wrong answer (reported, not raised); a function returning None is not
    solved yet.

    Introduced in notebooks/11_image_variations.ipynb.
    """
    if not callable(fn):
        print(f"Not solved yet: expected a function my_noise_image_embeddings(image_embeds, "
              f"noise_level, noise, mean, std, alphas_cumprod), got {type(fn).__name__}.")
        return False
    hint = ("Hint: scale to standard units, (e - mean) / std; mix sqrt(alphas_cumprod[level]) "
            "of it with sqrt(1 - alphas_cumprod[level]) of the noise; unscale, x * std + mean.")
    ac = variations._image_noising_scheduler().alphas_cumprod
    g = torch.Generator().manual_seed(0)
    for b, d, level in ((4, 8, 300), (2, 32, 650), (3, 16, 900)):
        mean = torch.randn(d, generator=g)
        std = 0.2 + torch.rand(d, generator=g)
        e = mean + std * torch.randn(b, d, generator=g)
        eps = torch.randn(b, d, generator=g)
        want = _reference_noising(e, level, eps, mean, std)
        ok, got = checks.call_answer(fn, (e.clone(), level, eps.clone(), mean.clone(), std.clone(),
                                          ac.clone()), "my_noise_image_embeddings", hint)
        if not ok:
            return False
        try:
            got = torch.as_tensor(got, dtype=torch.float32).detach()
        except Exception:
            print(f"Expected a tensor (B, D), got {type(got).__name__}. {hint}")
            return False
        if got.shape != want.shape:
            print(f"Expected the noised embeddings, shape {tuple(want.shape)}; yours has shape "
                  f"{tuple(got.shape)}. {hint}")
            return False
        if not torch.allclose(got, want, atol=1e-5):
            why = next((w for v, w in _noising_mistakes(e, level, eps, mean, std, ac)
                        if torch.allclose(got, v, atol=1e-5)), None)
            print(f"Not yet: at noise_level {level}, for B={b}, D={d}, your embeddings are off "
                  f"by up to {(got - want).abs().max().item():.4f}. "
                  + (f"Hint: {why}." if why else hint))
            return False
    print("Right: that is Stable unCLIP's noise augmentation, as diffusers' "
          "noise_image_embeddings computes it.")
    return True
