"""Loading a Stable Diffusion pipeline: the kit's toy model or real weights, one setting apart.

``load_pipeline()`` returns a stock diffusers ``StableDiffusionPipeline``. Which weights it
loads comes from its ``model`` argument or else the ``SDKIT_MODEL`` environment variable:

- ``"toy"`` (the default): data/toy-sd, trained by ``python -m sdkit.toy train``;
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
``save_single_file`` writes a pipeline back as one file in the original layout, so the two
layouts can be compared side by side. ``parameter_counts`` and ``peak_memory_bytes`` feed
notebook 06's memory accounting.

Left out: SDXL, SD3 and other pipeline families; ``.ckpt`` conversion (do it with diffusers'
scripts on a machine you trust); schedulers are swapped in notebook 02.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from . import checks
from .device import get_device
from .toy import DEFAULT_GUIDANCE, DEFAULT_STEPS, TOY_DIR

MODEL_ENV = "SDKIT_MODEL"
CONFIG_ENV = "SDKIT_MODEL_CONFIG"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_OFFLOAD = (None, "model", "sequential")
_FILE_SUFFIXES = (".safetensors", ".ckpt", ".bin", ".pt", ".pth", ".pkl", ".json", ".yaml")


class ModelNotFoundError(FileNotFoundError):
    """The weights (or configs) asked for are not on this machine and cannot be fetched now.

    The message names the model, says where sdkit looked and how to get it. It is an
    ``OSError``, like the hub client's own errors.

    Introduced in notebooks/06_full_generation.ipynb.
    """


def is_toy(pipe) -> bool:
    """True for the kit's own small model (its tokenizer knows only the shapes world)."""
    return len(pipe.tokenizer) < 2000


def default_settings(pipe) -> dict:
    """The kit's default ``num_inference_steps`` and ``guidance_scale`` for this pipeline.

    Introduced in notebooks/06_full_generation.ipynb.
    """
    if is_toy(pipe):
        return {"num_inference_steps": DEFAULT_STEPS, "guidance_scale": DEFAULT_GUIDANCE}
    return {"num_inference_steps": 30, "guidance_scale": 7.5}


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
    return ModelNotFoundError(
        f"model={model!r}: the weights are not on disk (not in the local hub cache) and this "
        f"machine is {where}. Get them on a connected machine with `hf download {model}` "
        "(huggingface_hub's CLI; older versions call it `huggingface-cli download`) and copy the "
        "cache folder (~/.cache/huggingface/hub) here, or download a diffusers folder with "
        f"`hf download {model} --local-dir <folder>` and set SDKIT_MODEL=<folder>. "
        f"Cause: {why}"
    )


def _check_offload(cpu_offload, device):
    checks.check_choice("cpu_offload", cpu_offload, _OFFLOAD)
    if cpu_offload is not None and not torch.cuda.is_available():
        checks.fail("cpu_offload", cpu_offload,
                    "CPU offload moves each part to a CUDA GPU only while it runs, and "
                    "torch.cuda.is_available() is False on this machine; use None")
    if cpu_offload is not None and device.type != "cuda":
        checks.fail("cpu_offload", cpu_offload, f"offloading needs device='cuda', got {device}")


def _check_class(folder: Path, model):
    info = json.loads((folder / "model_index.json").read_text())
    name = info.get("_class_name")
    if name not in ("StableDiffusionPipeline", None):
        checks.fail("model", str(model), f"expected a StableDiffusionPipeline folder (SD 1.x/2.x); "
                                         f"this one is a {name} (other families are left out)")


def load_pipeline(model: str | os.PathLike | None = None, device=None, dtype=None, *,
                  config: str | os.PathLike | None = None, safety_checker: bool = True,
                  attention_slicing: bool = False, vae_tiling: bool = False,
                  cpu_offload: str | None = None):
    """Load a StableDiffusionPipeline: ``"toy"`` (default), a hub id, a folder or a file.

    model: ``None`` reads ``SDKIT_MODEL`` (default ``"toy"``); else ``"toy"``, a hub id, a
        local diffusers folder, or a ``.safetensors`` single-file checkpoint. Pickle files
        (``.ckpt``, ``.bin``, ``.pt``) are refused. Missing weights on an offline machine raise
        ``ModelNotFoundError`` saying how to get them.
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

    Introduced in notebooks/06_full_generation.ipynb.
    """
    from diffusers import StableDiffusionPipeline

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
                "`python -m sdkit.toy train` (about an hour on a laptop CPU), or set "
                "SDKIT_MODEL to a hub id, a diffusers folder or a .safetensors file")
        pipe = StableDiffusionPipeline.from_pretrained(TOY_DIR, local_files_only=True,
                                                       trust_remote_code=False, **common)
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
    from diffusers import StableDiffusionPipeline

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
    from diffusers import StableDiffusionPipeline

    config = config if config is not None else (os.environ.get(CONFIG_ENV, "").strip() or None)
    kwargs = dict(common)
    kwargs.pop("use_safetensors")  # the suffix was checked: .safetensors only
    if config is not None:
        cfg = Path(config)
        if cfg.exists():
            checks.check_model_path(cfg, name="config")
            if not cfg.is_dir():
                checks.fail("config", str(config), "expected a diffusers folder, not a file")
            _check_class(cfg, config)
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


@torch.no_grad()
def generate(pipe, prompt: str, seed: int = 0, num_inference_steps: int | None = None,
             guidance_scale: float | None = None, **kwargs):
    """One image from the pipeline call with a seeded CPU generator; returns a PIL image.

    Same seed, same image: the generator lives on the CPU, so the starting noise is the
    same on every device.

    Introduced in notebooks/06_full_generation.ipynb.
    """
    d = default_settings(pipe)
    steps = checks.check_steps(d["num_inference_steps"] if num_inference_steps is None
                               else num_inference_steps)
    scale = checks.check_guidance(d["guidance_scale"] if guidance_scale is None else guidance_scale)
    checks.check_prompt(prompt, pipe.tokenizer, allow_empty=scale == 0)
    seed = checks.check_seed(seed)
    if "height" in kwargs or "width" in kwargs:
        # diffusers resets both to the default when only one is given: check both here
        side = pipe.unet.config.sample_size * pipe.vae_scale_factor
        kwargs["height"], kwargs["width"] = checks.check_size(kwargs.get("height") or side,
                                                              kwargs.get("width") or side)
    g = torch.Generator("cpu").manual_seed(seed)
    return pipe(prompt, num_inference_steps=steps, guidance_scale=scale, generator=g,
                **kwargs).images[0]


# ------------------------------------------------------------------------------ memory


def parameter_counts(pipe) -> dict[str, int]:
    """Number of weights in each of the pipeline's torch modules (unet, vae, text_encoder, ...).

    Introduced in notebooks/06_full_generation.ipynb.
    """
    counts = {}
    for name, part in pipe.components.items():
        if isinstance(part, torch.nn.Module):
            counts[name] = sum(p.numel() for p in part.parameters())
    return counts


def peak_memory_bytes(device=None) -> int:
    """Peak memory so far: ``torch.cuda.max_memory_allocated`` on CUDA, else the process's
    peak resident set size (``ru_maxrss``; psutil's current RSS where ``resource`` is missing).

    Introduced in notebooks/06_full_generation.ipynb.
    """
    device = get_device(device, "float32").device
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS: bytes; Linux: KiB
    except ImportError:  # Windows
        import psutil

        return int(psutil.Process().memory_info().rss)


def check_fp16_bytes(pipe, answer, part: str = "unet") -> bool:
    """Notebook 06's exercise: how many bytes do ``part``'s weights take in float16?

    ``answer``: an int, or None (not answered yet). Prints whether it is right (and a hint
    if not); returns True or False.

    Introduced in notebooks/06_full_generation.ipynb.
    """
    counts = parameter_counts(pipe)
    checks.check_choice("part", part, sorted(counts))
    if answer is None:
        print(f"Not answered yet: set answer to the number of bytes {part}'s weights take "
              "in float16.")
        return False
    answer = checks.check_int("answer", answer, 0)
    right = counts[part] * 2
    if answer == right:
        print(f"Right: {counts[part]:,} weights x 2 bytes = {right:,} bytes "
              f"({right / 2**20:.1f} MiB).")
        return True
    hint = ("that is the float32 size (4 bytes per weight)" if answer == counts[part] * 4 else
            "count the weights with parameter_counts(pipe) and multiply by the bytes per weight")
    print(f"Not quite: {answer:,} bytes; {hint}.")
    return False


# ------------------------------------------------------------------------------ single file


def _unet_to_ldm(sd: dict, config) -> dict:
    """diffusers UNet keys -> the original SD (LDM) keys: the inverse of diffusers'
    ``convert_ldm_unet_checkpoint`` (after diffusers' scripts/convert_diffusers_to_original)."""
    per = config.layers_per_block + 1  # LDM numbers resnets, attentions and samplers together
    n = len(config.block_out_channels)
    prefixes = [("time_embedding.linear_1.", "time_embed.0."),
                ("time_embedding.linear_2.", "time_embed.2."),
                ("conv_in.", "input_blocks.0.0."), ("conv_norm_out.", "out.0."),
                ("conv_out.", "out.2."), ("mid_block.resnets.0.", "middle_block.0."),
                ("mid_block.attentions.0.", "middle_block.1."),
                ("mid_block.resnets.1.", "middle_block.2.")]
    for i in range(n):
        for j in range(config.layers_per_block):
            prefixes += [(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{per * i + j + 1}.0."),
                         (f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{per * i + j + 1}.1.")]
        prefixes.append((f"down_blocks.{i}.downsamplers.0.conv.",
                         f"input_blocks.{per * (i + 1)}.0.op."))
        has_attn = "CrossAttn" in config.up_block_types[i]
        for j in range(per):
            prefixes += [(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{per * i + j}.0."),
                         (f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{per * i + j}.1.")]
        prefixes.append((f"up_blocks.{i}.upsamplers.0.",
                         f"output_blocks.{per * i + per - 1}.{2 if has_attn else 1}."))
    resnet = [("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."), ("norm2.", "out_layers.0."),
              ("conv2.", "out_layers.3."), ("time_emb_proj.", "emb_layers.1."),
              ("conv_shortcut.", "skip_connection.")]
    out = {}
    for key, value in sd.items():
        new = key
        for hf, ldm in prefixes:
            if key.startswith(hf):
                new = ldm + key[len(hf):]
                if ".resnets." in hf:
                    for a, b in resnet:
                        new = new.replace("." + a, "." + b)
                break
        else:
            raise KeyError(f"no original-layout name for UNet weight {key}")
        out["model.diffusion_model." + new] = value
    return out


def _vae_to_ldm(sd: dict, config) -> dict:
    """diffusers VAE keys -> original SD keys (the decoder's up blocks count the other way)."""
    n = len(config.block_out_channels)
    prefixes = [("encoder.conv_norm_out.", "encoder.norm_out."),
                ("decoder.conv_norm_out.", "decoder.norm_out.")]
    for part in ("encoder", "decoder"):
        prefixes += [(f"{part}.mid_block.resnets.{k}.", f"{part}.mid.block_{k + 1}.")
                     for k in (0, 1)]
        prefixes.append((f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1."))
    for i in range(n):
        prefixes += [(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block."),
                     (f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."),
                     (f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{n - 1 - i}.block."),
                     (f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{n - 1 - i}.upsample.")]
    attn = [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
            ("to_out.0.", "proj_out.")]
    out = {}
    for key, value in sd.items():
        new = key
        for hf, ldm in prefixes:
            if key.startswith(hf):
                new = ldm + key[len(hf):]
                break
        if ".mid.attn_1." in new:
            for a, b in attn:
                new = new.replace(".attn_1." + a, ".attn_1." + b)
            if value.ndim == 2:  # LDM's attention projections are 1x1 convolutions
                value = value[:, :, None, None]
        out["first_stage_model." + new.replace("conv_shortcut", "nin_shortcut")] = value
    return out


def save_single_file(pipe, path) -> Path:
    """Write the pipeline's unet, vae and text_encoder as one ``.safetensors`` file in the
    original SD key layout (``model.diffusion_model.*``, ``first_stage_model.*``,
    ``cond_stage_model.transformer.*``), the format ``from_single_file`` reads. The tokenizer,
    scheduler and configs are not in it: load it back with ``config=`` a diffusers folder.

    Introduced in notebooks/06_full_generation.ipynb.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        checks.fail("path", str(path), "expected a file name ending in .safetensors")
    state = _unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config)
    state.update(_vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config))
    te = pipe.text_encoder.state_dict()
    state.update({"cond_stage_model.transformer.text_model." + k.removeprefix("text_model."): v
                  for k, v in te.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path))
    return path
