"""Loading a Stable Diffusion pipeline: the kit's toy model or real weights, one setting apart.

``load_pipeline()`` returns a stock diffusers ``StableDiffusionPipeline``. Which weights it
loads comes from its ``model`` argument or else the ``SDKIT_MODEL`` environment variable:

- ``"toy"`` (the default): data/toy-sd, trained by ``python -m sdkit.training train``;
- a Hugging Face Hub id such as ``"stable-diffusion-v1-5/stable-diffusion-v1-5"`` (read from
  the local hub cache; downloaded only when the machine is online and ``HF_HUB_OFFLINE`` is
  not set);
- a local diffusers folder (one with ``model_index.json``);
- a single-file ``.safetensors`` checkpoint in the original SD key layout (the files shared on
  model sites). A single file holds weights only: diffusers also needs the pipeline's config
  files (``model_index.json``, ``*/config.json``, the tokenizer, the scheduler config). Offline,
  give them with ``config=`` (or ``SDKIT_MODEL_CONFIG``): a local diffusers folder of the same
  architecture; its config files suffice, its weights are not read.

Device and dtype come from ``sdkit.device.get_device``. Weights are read from safetensors only
(pickle files are refused) and no code is ever downloaded (``trust_remote_code`` stays off).

It also holds what every notebook after it shares when it runs a pipeline: the kit's default
settings (``default_settings``, ``resolve_settings``), the prompt encoder (``encode_prompt``),
seeded CPU generators and starting noise (``make_generators``, ``initial_latents``, from
``sdkit.images``), one image or a seeded batch (``generate``, ``generate_images``), the
training noise schedule (``training_scheduler``) and the default sampler (``dpm_solver``).

A function here whose docstring names no notebook serves other sdkit modules only.

Left out: SDXL, SD3 and other pipeline families; ``.ckpt`` conversion (do it with diffusers'
scripts on a machine you trust); schedulers are swapped in notebook 02.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline
from diffusers.utils import logging as diffusers_logging
from PIL import Image
from tqdm.auto import tqdm
from transformers.utils import logging as transformers_logging

from . import checks
from .device import get_device
from .images import (
    MAX_BATCH,
    check_generation_memory,
    initial_latents,  # noqa: F401  (re-exported: pipeline.initial_latents)
    make_generators,
)

ROOT = Path(__file__).resolve().parent.parent
TOY_DIR = ROOT / "data" / "toy-sd"  # the kit's own model (notebook 12 trains it)
MAX_LENGTH = 20  # the toy's tokens per prompt, start and end tokens included (SD uses 77)
DEFAULT_STEPS = 10  # the kit's default number of denoising steps for the toy model
DEFAULT_GUIDANCE = 4.0  # the kit's default guidance scale for the toy model

_LOADING_BARS = (diffusers_logging, transformers_logging)
MODEL_ENV = "SDKIT_MODEL"
CONFIG_ENV = "SDKIT_MODEL_CONFIG"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_OFFLOAD = (None, "model", "sequential")
_FILE_SUFFIXES = (".safetensors", ".ckpt", ".bin", ".pt", ".pth", ".pkl", ".json", ".yaml")


class ModelNotFoundError(FileNotFoundError):
    """The weights (or configs) asked for are not on this machine and cannot be fetched now.

    The message names the model, says where sdkit looked and how to get it. It is an
    ``OSError``, like the hub client's own errors.
    """


def is_toy(pipe) -> bool:
    """True for the kit's own small model (its tokenizer knows only the shapes world).

    Introduced in notebooks/01_forward_noising.ipynb.
    """
    return len(pipe.tokenizer) < 2000


def default_settings(pipe) -> dict:
    """The kit's default ``num_inference_steps`` and ``guidance_scale`` for this pipeline.

    Introduced in notebooks/07_full_generation.ipynb.
    """
    if is_toy(pipe):
        return {"num_inference_steps": DEFAULT_STEPS, "guidance_scale": DEFAULT_GUIDANCE}
    return {"num_inference_steps": 30, "guidance_scale": 7.5}


def resolve_settings(pipe, num_inference_steps=None, guidance_scale=None) -> tuple[int, float]:
    """``(steps, scale)``: the arguments where given, else ``default_settings(pipe)``, checked.

    Introduced in notebooks/02_reverse_denoising.ipynb.
    """
    d = default_settings(pipe)
    steps = checks.check_steps(d["num_inference_steps"] if num_inference_steps is None
                               else num_inference_steps)
    scale = checks.check_guidance(d["guidance_scale"] if guidance_scale is None
                                  else guidance_scale)
    return steps, scale


def hub_offline() -> bool:
    """True when the hub client must not go online (``HF_HUB_OFFLINE`` set)."""
    value = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    if value in {"1", "ON", "YES", "TRUE"}:
        return True
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover
        return False
    return bool(constants.HF_HUB_OFFLINE)


def _in_hub_cache(repo_id: str, filename: str = "model_index.json") -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, filename), str)
    except Exception:  # noqa: BLE001 - a malformed id is simply "not cached"
        return False


def _not_on_disk(model: str, why: str) -> ModelNotFoundError:
    where = "offline (HF_HUB_OFFLINE is set)" if hub_offline() else "unable to reach the hub"
    return ModelNotFoundError(checks.message(
        "model", model, f"read as a hub id (owner/name), but there is no folder {model!r} "
        f"relative to the current directory ({Path.cwd()}); the weights are not on disk (not "
        f"in the local hub cache) and this "
        f"machine is {where}. Get them on a connected machine with `hf download {model}` "
        "(huggingface_hub's CLI; older versions call it `huggingface-cli download`) and copy the "
        "cache folder (~/.cache/huggingface/hub) here, or download a diffusers folder with "
        f"`hf download {model} --local-dir <folder>` and set SDKIT_MODEL=<folder>. "
        f"Cause: {why}"))


def _check_offload(cpu_offload, device):
    checks.check_choice("cpu_offload", cpu_offload, _OFFLOAD)
    if cpu_offload is not None and not torch.cuda.is_available():
        checks.fail("cpu_offload", cpu_offload,
                    "CPU offload moves each part to a CUDA GPU only while it runs, and "
                    "torch.cuda.is_available() is False on this machine; use None")
    if cpu_offload is not None and device.type != "cuda":
        checks.fail("cpu_offload", cpu_offload, f"offloading needs device='cuda', got {device}")


def _check_class(folder: Path, model, name: str = "model", weights: bool = True):
    """The folder's model_index.json parses and names a StableDiffusionPipeline, and every
    component it names is there and whole (``checks.check_components``)."""
    info = checks.read_model_index(folder, name)
    if info["_class_name"] != "StableDiffusionPipeline":
        checks.fail(name, str(model), f"expected a StableDiffusionPipeline folder (SD 1.x/2.x); "
                                      f"this one is a {info['_class_name']} (other families "
                                      "are left out)")
    checks.check_components(folder, info, name, weights)


def load_pipeline(model: str | os.PathLike | None = None, device=None, dtype=None, *,
                  config: str | os.PathLike | None = None, safety_checker: bool = True,
                  attention_slicing: bool = False, vae_tiling: bool = False,
                  cpu_offload: str | None = None):
    """Load a StableDiffusionPipeline: ``"toy"`` (default), a hub id, a folder or a file.

    model: ``None`` reads ``SDKIT_MODEL`` (default ``"toy"``); else ``"toy"``, a hub id, a
        local diffusers folder, or a ``.safetensors`` single-file checkpoint (``~`` is
        expanded; relative paths start from the current directory). Pickle files
        (``.ckpt``, ``.bin``, ``.pt``) are refused. Missing weights on an offline machine raise
        ``ModelNotFoundError`` saying how to get them. A broken model on disk (a truncated or
        garbage ``.safetensors`` file, a component folder that ``model_index.json`` names but
        that is missing, an empty or invalid ``model_index.json``) raises
        ``checks.BrokenModelError`` naming the file, what was expected and what was found,
        before diffusers reads a weight.
    device, dtype: passed to ``sdkit.get_device`` (CPU float32 on a laptop, CUDA float16 on a
        GPU); impossible requests (``"cuda"`` without CUDA) raise ``DeviceError``.
    config: for a single file only: a local diffusers folder (or hub id) whose config files
        describe the architecture; ``None`` reads ``SDKIT_MODEL_CONFIG``, else diffusers picks
        the matching hub repo from the checkpoint's keys (needs it cached or a network).
    safety_checker: ``True`` keeps the NSFW safety checker a hub/folder pipeline ships (for a
        single file: the one in ``config``'s folder, if any; single files carry none). Only an
        explicit ``False`` removes it. The toy model has none: there is nothing to filter in
        the shapes world.
    attention_slicing: compute attention in slices (less memory, a little slower).
    vae_tiling: decode the latents in overlapping tiles (large images on small GPUs).
    cpu_offload: ``None``; ``"model"`` (``enable_model_cpu_offload``: each part moves to the
        GPU while it runs) or ``"sequential"`` (layer by layer; least memory, slowest). CUDA
        only; elsewhere an error.

    Introduced in notebooks/07_full_generation.ipynb.
    """
    model = model if model is not None else os.environ.get(MODEL_ENV, "").strip() or "toy"
    if not isinstance(model, (str, os.PathLike)):
        checks.fail("model", model, "expected 'toy', a hub id, a folder or a .safetensors file")
    choice = get_device(device, dtype)
    _check_offload(cpu_offload, choice.device)
    for name, flag in (("safety_checker", safety_checker), ("attention_slicing", attention_slicing),
                       ("vae_tiling", vae_tiling)):
        if not isinstance(flag, bool):
            checks.fail(name, flag, "expected True or False")
    common = dict(dtype=choice.dtype, use_safetensors=True)
    no_checker = {} if safety_checker else dict(safety_checker=None, requires_safety_checker=False)

    text = os.fspath(model)
    if text == "toy":
        if not (TOY_DIR / "model_index.json").exists():
            raise ModelNotFoundError(
                f"model='toy': the kit's own model is not on disk at {TOY_DIR}; train it with "
                "`python -m sdkit.training train` (about an hour on a laptop CPU), or set "
                "SDKIT_MODEL to a hub id, a diffusers folder or a .safetensors file")
        _check_class(TOY_DIR, "toy")
        # the toy loads in well under a second: no loading bars (diffusers', transformers')
        was_enabled = [(lib, lib.is_progress_bar_enabled()) for lib in _LOADING_BARS]
        for lib in _LOADING_BARS:
            lib.disable_progress_bar()
        try:
            pipe = StableDiffusionPipeline.from_pretrained(TOY_DIR, local_files_only=True,
                                                           trust_remote_code=False, **common)
        finally:
            for lib, enabled in was_enabled:
                if enabled:
                    lib.enable_progress_bar()
    elif Path(text).suffix.lower() in _FILE_SUFFIXES or Path(text).exists() or \
            not _HUB_ID.match(text):
        path = checks.check_model_path(text)
        if path.is_dir():
            _check_class(path, model)
            pipe = StableDiffusionPipeline.from_pretrained(path, local_files_only=True,
                                                           trust_remote_code=False,
                                                           **no_checker, **common)
        else:
            pipe = _load_single_file(path, config, safety_checker, common)
    else:
        pipe = _load_from_hub(text, no_checker, common)

    if attention_slicing:
        pipe.enable_attention_slicing()
    if vae_tiling:
        pipe.vae.enable_tiling()
    if cpu_offload == "model":
        pipe.enable_model_cpu_offload(device=choice.device)
    elif cpu_offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=choice.device)
    else:
        pipe = pipe.to(choice.device)
    return pipe


def _load_from_hub(repo_id: str, no_checker: dict, common: dict):
    offline = hub_offline()
    if offline and not _in_hub_cache(repo_id):
        raise _not_on_disk(repo_id, "model_index.json is not in the local hub cache") from None
    try:
        return StableDiffusionPipeline.from_pretrained(repo_id, local_files_only=offline,
                                                       trust_remote_code=False,
                                                       **no_checker, **common)
    except OSError as e:  # the hub client's errors (LocalEntryNotFoundError, connection, ...)
        if isinstance(e, ModelNotFoundError):
            raise
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise _not_on_disk(repo_id, f"{type(e).__name__}: {first}") from None


def _load_single_file(path: Path, config, safety_checker: bool, common: dict):
    checks.check_checkpoint(path)
    config = config if config is not None else (os.environ.get(CONFIG_ENV, "").strip() or None)
    kwargs = dict(common)
    kwargs.pop("use_safetensors")  # the suffix was checked: .safetensors only
    if config is not None:
        cfg = Path(os.fspath(config)).expanduser()
        if cfg.exists():
            checks.check_model_path(cfg, name="config")
            if not cfg.is_dir():
                checks.fail("config", str(config), "expected a diffusers folder, not a file")
            _check_class(cfg, config, "config", weights=False)
            kwargs.update(config=str(cfg), local_files_only=True)
            if safety_checker and (cfg / "safety_checker" / "config.json").exists():
                from diffusers.pipelines.stable_diffusion.safety_checker import (
                    StableDiffusionSafetyChecker,
                )
                kwargs["safety_checker"] = StableDiffusionSafetyChecker.from_pretrained(
                    cfg, subfolder="safety_checker", use_safetensors=True,
                    dtype=common["dtype"])
        elif _HUB_ID.match(str(config)):
            kwargs.update(config=str(config), local_files_only=hub_offline())
        else:
            checks.fail("config", str(config), "no such folder on this machine; expected a local "
                                               "diffusers folder or a hub id")
    else:
        kwargs.update(local_files_only=hub_offline())
    if not safety_checker:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        return StableDiffusionPipeline.from_single_file(str(path), **kwargs)
    except OSError as e:
        if config is not None and Path(config).exists():
            raise
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise ModelNotFoundError(
            f"model={str(path)!r}: the weights are on disk, but a single-file checkpoint holds "
            "no config files and the ones diffusers looked for are not on disk (not in the "
            "local hub cache) and cannot be fetched offline. Pass config=<a local diffusers "
            "folder of the same architecture> (or set SDKIT_MODEL_CONFIG); its *.json and "
            "tokenizer files suffice, e.g. on a connected machine: `hf download "
            "stable-diffusion-v1-5/stable-diffusion-v1-5 --include '*.json' '*.txt' "
            f"--local-dir sd15-config`. Cause: {type(e).__name__}: {first}"
        ) from None


# ------------------------------------------------------------------------------ running it


@torch.no_grad()
def encode_prompt(pipe, prompts: list[str], negative_prompts: list[str] | None = None):
    """Text embeddings ``(cond, uncond)``, each (B, T, D), as the pipeline makes them.

    The unconditional embedding is the text encoder's output for the empty prompt ""
    (or for the negative prompt, which simply takes its place). Two text-encoder calls,
    like ``StableDiffusionPipeline.encode_prompt``, so results are bit-identical. Prompts
    are not checked here: the caller checks them once.

    Introduced in notebooks/02_reverse_denoising.ipynb.
    """
    tok, enc = pipe.tokenizer, pipe.text_encoder
    prompts = checks.check_list("prompts", prompts)
    if negative_prompts is not None:
        negative_prompts = checks.check_per_seed("negative_prompts", negative_prompts,
                                                 len(prompts))

    def embed(texts, max_length):
        ids = tok(texts, padding="max_length", max_length=max_length, truncation=True,
                  return_tensors="pt").input_ids  # (B, T)
        return enc(ids.to(enc.device))[0]  # (B, T, D)

    cond = embed(prompts, tok.model_max_length)
    uncond = embed(negative_prompts if negative_prompts is not None else [""] * len(prompts),
                   cond.shape[1])
    return cond, uncond


@torch.no_grad()
def generate(pipe, prompt: str, seed: int = 0, num_inference_steps: int | None = None,
             guidance_scale: float | None = None, **kwargs):
    """One image from the pipeline call with a seeded CPU generator; returns a PIL image.

    Same seed, same image: the generator lives on the CPU, so the starting noise is the
    same on every device. The other keyword arguments are ``checks.GENERATE_OPTIONS``, checked
    before the pipeline runs (``checks.check_generate_options``), anything else refused:
    ``height``/``width`` (multiples of the VAE's factor, default the model's size; a size
    whose estimated memory is over ``sdkit.device.memory_limit`` is refused: raise the
    limit with ``SDKIT_MEMORY_LIMIT``); ``negative_prompt`` (checked as ``sampling.sample``
    checks it; only with ``guidance_scale > 1``, where the pipeline runs an unconditional
    branch for it to replace); ``output_type`` ("pil", "np": float (H, W, 3), "latent":
    (C, h, w)); ``eta`` (in [0, 1], only with a scheduler whose step takes it, e.g. DDIM);
    ``num_images_per_prompt`` (1 only: this returns one image; use ``generate_images``).

    Introduced in notebooks/04_text_and_cross_attention.ipynb.
    """
    steps, scale = resolve_settings(pipe, num_inference_steps, guidance_scale)
    kwargs = checks.check_generate_options(kwargs, pipe.scheduler, pipe.tokenizer, scale)
    checks.check_prompt(prompt, pipe.tokenizer, allow_empty=scale == 0)
    g = make_generators(checks.check_seed(seed))
    # diffusers resets both sides to the default when only one is given: check both here
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    height, width = checks.check_size(
        side if kwargs.get("height") is None else kwargs["height"],
        side if kwargs.get("width") is None else kwargs["width"], multiple=pipe.vae_scale_factor)
    kwargs.update(height=height, width=width)
    check_generation_memory(pipe, "height" if height >= width else "width", max(height, width),
                            1, height, width, guidance=scale > 1)
    return pipe(prompt, num_inference_steps=steps, guidance_scale=scale, generator=g,
                **kwargs).images[0]


@torch.no_grad()
def generate_images(pipe, prompts, seeds, num_inference_steps: int | None = None,
                    guidance_scale: float | None = None, batch_size: int = 8,
                    output: str = "pil", desc: str = "generating",
                    known_words_only: bool | None = None) -> list:
    """One image per seed, ``batch_size`` per pipeline call, one CPU generator per seed (the
    same seed gives the same starting noise whatever the batch; the same seeds and batch size
    give the same images bit for bit). ``prompts``: one str, or one per seed;
    the empty prompt is allowed (the unconditional model, e.g. with ``guidance_scale=0``).
    ``output``: ``"pil"`` (PIL images) or ``"uint8"`` ((H, W, 3) arrays). Steps and guidance
    default to ``default_settings(pipe)``. ``known_words_only=False`` lets prompts hold words
    the toy has no token for (a rare identifier such as ``sks`` splits into pieces). A batch,
    or a set of images, whose estimated memory is over ``sdkit.device.memory_limit`` is
    refused (raise the limit with ``SDKIT_MEMORY_LIMIT``); a progress bar over all steps
    shows when the call takes more than 2 s, and an interrupt leaves the pipeline as it was.

    Introduced in notebooks/10_fine_tuning.ipynb.
    """
    seeds = checks.check_list("seeds", seeds)
    prompts = checks.check_per_seed("prompts", prompts, len(seeds))
    steps, scale = resolve_settings(pipe, num_inference_steps, guidance_scale)
    for p in set(prompts):
        checks.check_prompt(p, pipe.tokenizer, name="prompts", allow_empty=True,
                            known_words_only=known_words_only)
    batch_size = checks.check_int("batch_size", batch_size, 1, MAX_BATCH)
    output = checks.check_choice("output", output, ("pil", "uint8"))
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    check_generation_memory(pipe, "batch_size", batch_size, min(batch_size, len(seeds)), side,
                            side, guidance=scale > 1)
    check_generation_memory(pipe, "seeds", f"{len(seeds)} seeds", 1, side, side, scale > 1,
                            extra_bytes=len(seeds) * side * side * 3 * 2)  # uint8 + PIL
    generators = make_generators(seeds)  # after the memory checks: each holds a 5 KB state
    starts = range(0, len(seeds), batch_size)
    bar = tqdm(total=len(starts) * steps, desc=desc, leave=False, delay=2,
               unit="step")  # shown only when the call takes more than 2 s
    config = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(disable=True)
    images = []
    try:  # an interrupt (Jupyter's stop button) leaves the pipe's progress bar as it was
        for i in starts:
            out = pipe(prompts[i:i + batch_size], num_inference_steps=steps, guidance_scale=scale,
                       generator=generators[i:i + batch_size], output_type="np",
                       callback_on_step_end=lambda *a: (bar.update(1), a[3])[1]).images
            images += list((np.clip(out, 0, 1) * 255).round().astype(np.uint8))  # (H, W, 3)
    finally:
        pipe.set_progress_bar_config(**config)
        bar.close()
    return images if output == "uint8" else [Image.fromarray(im) for im in images]


def sibling_pipeline(cls, pipe):
    """A diffusers pipeline of class ``cls`` (``StableDiffusionImg2ImgPipeline``,
    ``StableDiffusionInpaintPipeline``) on ``pipe``'s very parts (no weight is copied), to
    compare the kit's loops with. ``requires_safety_checker`` follows ``pipe``: False when it
    has no safety checker (the toy model, or one loaded with ``safety_checker=False``), so
    diffusers prints no notice about a checker that was never there; a pipeline with a
    checker keeps it.

    Introduced in notebooks/08_image_to_image.ipynb.
    """
    if not isinstance(cls, type) or not hasattr(pipe, "components"):
        checks.fail("cls", cls, "expected a diffusers pipeline class and a pipeline, e.g. "
                                "sibling_pipeline(StableDiffusionImg2ImgPipeline, pipe)")
    has_checker = getattr(pipe, "safety_checker", None) is not None
    return cls(**pipe.components, requires_safety_checker=has_checker)


def training_scheduler(pipe_or_scheduler) -> DDPMScheduler:
    """The noise schedule the model was trained with, as a ``DDPMScheduler`` built from the
    pipeline's (or the scheduler's) own config: same betas, ``alphas_cumprod``, prediction type
    and timestep spacing, whatever sampler the pipeline carries.

    A pipeline ships its *sampler* (the toy model: DPM-Solver++). The sampler's ``add_noise``
    only works at the timesteps of its own sampling plan, and with a zero terminal SNR
    schedule it stores ``alphas_cumprod[-1] = 2**-24`` instead of 0 so that its first sigma is
    finite. Rebuilding a DDPMScheduler from the same config gives the training-time forward
    process at every t, with the exact betas.

    Introduced in notebooks/01_forward_noising.ipynb.
    """
    scheduler = getattr(pipe_or_scheduler, "scheduler", pipe_or_scheduler)
    if not hasattr(scheduler, "config") or "num_train_timesteps" not in scheduler.config:
        checks.fail("pipe_or_scheduler", type(pipe_or_scheduler).__name__,
                    "expected a diffusers pipeline or scheduler, e.g. pipe or pipe.scheduler")
    return DDPMScheduler.from_config(scheduler.config)


def dpm_solver(scheduler_config) -> DPMSolverMultistepScheduler:
    """The kit's default sampler: DPM-Solver++ on the training schedule ``scheduler_config``
    (a scheduler's ``.config``), ending on sigma 0 (``final_sigmas_type="zero"``).
    """
    if not hasattr(scheduler_config, "get") or "num_train_timesteps" not in scheduler_config:
        checks.fail("scheduler_config", type(scheduler_config).__name__,
                    "expected a scheduler's config, e.g. pipe.scheduler.config")
    return DPMSolverMultistepScheduler.from_config(scheduler_config, final_sigmas_type="zero")


# ------------------------------------------------------------------------------ the model card


def training_info(folder=TOY_DIR) -> dict:
    """What ``python -m sdkit.training train`` recorded in the model folder (recipe, minutes,
    loss curve), read from its ``training.json``; {} if none.

    Introduced in notebooks/12_training_from_scratch.ipynb.
    """
    return _read_json(folder, "training.json")


def evaluation_figures(folder=TOY_DIR) -> dict:
    """The model card's figures: what ``python -m sdkit.evaluation`` wrote into the model
    folder's ``evaluation.json``; {} if it has not been run. Notebooks print the card's
    figures from here, so no number about the model is typed into their text.

    Introduced in notebooks/12_training_from_scratch.ipynb.
    """
    return _read_json(folder, "evaluation.json")


def _read_json(folder, name: str) -> dict:
    f = checks.check_folder("folder", folder) / name
    return json.loads(f.read_text()) if f.exists() else {}
