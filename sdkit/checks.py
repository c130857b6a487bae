"""Input checks shared by every public sdkit function.

Each check either returns the value (converted where the conversion is documented, such
as an RGBA or greyscale picture becoming RGB) or raises ``SdkitInputError``: a
``ValueError`` whose message names the parameter, the value it got and what is allowed.
Nothing is silently "fixed": a size that is not a multiple of 8 is refused, not rounded.

This is the bottom of the kit's layers: it imports no other sdkit module.

A function here whose docstring names no notebook serves the other sdkit modules only;
no notebook calls it directly.

Left out: checks of things diffusers already checks well (scheduler configs, tensor
devices inside a pipeline call).
"""

from __future__ import annotations

import inspect
import json
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image


class SdkitInputError(ValueError):
    """A bad argument to an sdkit function; the message says which, what and what is allowed."""


class BrokenModelError(SdkitInputError):
    """A model on disk that cannot be loaded as it is (a truncated or garbage weights file, a
    missing component folder, a broken ``model_index.json``): the message names the path,
    what was expected and what was found, in the kit's one format."""


SEED_MAX = 2**32 - 1  # the one seed range of the kit (numpy, torch and the widgets take it)


def message(name: str, value, allowed: str) -> str:
    """The kit's one error format: ``name=value is not allowed: what is allowed``."""
    shown = repr(value)
    if len(shown) > 80:  # keep both ends: a long path's file name stays visible
        shown = shown[:38] + "..." + shown[-39:]
    return f"{name}={shown} is not allowed: {allowed}"


def fail(name: str, value, allowed: str, error: type[Exception] = SdkitInputError):
    """Raise the kit's standard error (``SdkitInputError``, or ``error``): ``message``'s text."""
    raise error(message(name, value, allowed))


def call_answer(fn, args: tuple, fn_name: str, hint: str = ""):
    """Call a learner's exercise function for its checker: ``(True, fn(*args))``, or
    ``(False, None)`` after printing why there is nothing to check: it raised (``hint`` is
    added), or it returned None, as the unsolved cell does. A learner's bug is a wrong
    answer, never a crash of the checker or of the notebook."""
    try:
        got = fn(*args)
    except Exception as e:  # noqa: BLE001 - any error of the learner's code
        print(f"Not yet: {fn_name} raised {type(e).__name__}: {e}. {hint}".rstrip())
        return False, None
    if got is None:
        print(f"Exercise not solved yet: {fn_name} returns None (fill it in, then run this "
              "cell again).")
        return False, None
    return True, got


def check_bool(name: str, value) -> bool:
    """True or False (not 0/1, not a string)."""
    if not isinstance(value, bool):
        fail(name, value, "expected True or False")
    return value


def check_list(name: str, value) -> list:
    """A non-empty list (or tuple, or other iterable that is not a string)."""
    # the type, not the instance: a diffusers model's __getattr__ warns on unknown names
    if isinstance(value, (str, bytes)) or not hasattr(type(value), "__iter__"):
        fail(name, value, "expected a list")
    value = list(value)
    if not value:
        fail(name, value, "expected a non-empty list")
    return value


def check_per_seed(name: str, value, n: int) -> list[str]:
    """One str for every seed, or a list of ``n`` str (one per seed)."""
    if isinstance(value, str):
        return [value] * n
    value = check_list(name, value)
    if len(value) != n or not all(isinstance(v, str) for v in value):
        fail(name, value, f"expected one str or a list of {n} str, one per seed")
    return value


def check_int(name: str, value, lo: int | None = None, hi: int | None = None) -> int:
    """An int (not a bool, not a float) in [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        fail(name, value, f"expected an int{_range(lo, hi)}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        fail(name, value, f"expected an int{_range(lo, hi)}")
    return int(value)


def check_float(name: str, value, lo: float | None = None, hi: float | None = None) -> float:
    """A finite real number in [lo, hi] (NaN and infinity are refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        fail(name, value, f"expected a finite number{_range(lo, hi)}")
    v = float(value)
    if not math.isfinite(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
        fail(name, value, f"expected a finite number{_range(lo, hi)}")
    return v


def _range(lo, hi) -> str:
    if lo is not None and hi is not None:
        return f" in [{lo}, {hi}]"
    if lo is not None:
        return f" >= {lo}"
    if hi is not None:
        return f" <= {hi}"
    return ""


def check_steps(num_inference_steps, name: str = "num_inference_steps") -> int:
    return check_int(name, num_inference_steps, 1, 1000)


def check_guidance(guidance_scale, name: str = "guidance_scale") -> float:
    return check_float(name, guidance_scale, 0.0, 50.0)


def check_strength(strength, name: str = "strength") -> float:
    return check_float(name, strength, 0.0, 1.0)


def check_seed(seed, name: str = "seed") -> int:
    return check_int(name, seed, 0, SEED_MAX)


def check_size(height, width, multiple: int = 8) -> tuple[int, int]:
    """Image height and width: positive ints divisible by ``multiple`` (the VAE's factor)."""
    for name, v in (("height", height), ("width", width)):
        check_int(name, v, multiple, 4096)
        if v % multiple:
            fail(name, v, f"expected a multiple of {multiple} (the VAE shrinks images by "
                          f"{multiple}), e.g. {v - v % multiple or multiple}")
    return int(height), int(width)


def check_choice(name: str, value, allowed) -> str:
    allowed = list(allowed)
    if value not in allowed:
        fail(name, value, f"expected one of {allowed}")
    return value


def check_prompt(prompt, tokenizer=None, name: str = "prompt", allow_empty: bool = False,
                 known_words_only: bool | None = None) -> str:
    """A prompt string that fits the tokenizer.

    Refused: non-strings; the empty prompt unless ``allow_empty`` (unconditional
    generation is asked for with ``guidance_scale=0`` or an explicit empty prompt where a
    function says so); prompts longer than the text encoder's window (SD would silently
    cut them; the kit says so instead); and, for the toy model's small vocabulary
    (``known_words_only``, default: when the tokenizer has under 2,000 tokens), words it
    has no token for.
    """
    if not isinstance(prompt, str):
        fail(name, prompt, "expected a str")
    if not prompt.strip() and not allow_empty:
        fail(name, prompt, "expected a non-empty prompt (for the unconditional image use "
                           "guidance_scale=0 or the function's unconditional option)")
    if tokenizer is None:
        return prompt
    # verbose=False: counting the tokens of a long prompt must not print the tokenizer's own
    # "Token indices sequence length is longer than ..." warning; the refusal below says it
    ids = tokenizer(prompt, truncation=False, verbose=False).input_ids
    limit = tokenizer.model_max_length
    if len(ids) > limit:
        fail(name, prompt, f"expected at most {limit - 2} tokens (the text encoder's window is "
                           f"{limit} with start and end tokens); this prompt has {len(ids) - 2}")
    if known_words_only is None:
        known_words_only = len(tokenizer) < 2000
    if known_words_only:
        vocab = tokenizer.get_vocab()
        unknown = [w for w in prompt.lower().split()
                   if w + "</w>" not in vocab and w not in vocab]
        if unknown:
            # the toy's words: the word-final tokens its merges built (CLIP's 512 byte symbols
            # come first), less the pieces that end a longer word ("cle" of "circle")
            ends = {t[:-4] for t, i in vocab.items() if t.endswith("</w>") and i >= 512}
            words = sorted({w for w in ends if not any(o != w and o.endswith(w) for o in ends)}
                           | (set(tokenizer.get_added_vocab()) - set(tokenizer.all_special_tokens)))
            fail(name, prompt, f"the toy model has no token for {unknown}; known words: "
                               f"{', '.join(words)} (notebook 04 shows what real CLIP does "
                               f"with unknown words)")
    return prompt


def check_negative_prompt(negative_prompt, tokenizer, n: int,
                          name: str = "negative_prompt") -> list[str] | None:
    """None, or one negative prompt per image (one str for all, or a list of ``n``), each
    checked like a prompt (the empty one allowed): the one check of ``sample`` and
    ``generate``."""
    if negative_prompt is None:
        return None
    negatives = check_per_seed(name, negative_prompt, n)
    for p in negatives:
        check_prompt(p, tokenizer, name=name, allow_empty=True)
    return negatives


GENERATE_OPTIONS = ("height", "width", "negative_prompt", "output_type", "eta",
                    "num_images_per_prompt")


def check_generate_options(kwargs: dict, scheduler, tokenizer, guidance_scale: float) -> dict:
    """``pipeline.generate``'s keyword arguments: only ``GENERATE_OPTIONS``, each checked
    (height and width are checked there, against the model's size); returns the ones to pass
    to the pipeline. Refused: other names (never passed on unread), ``num_images_per_prompt``
    other than 1, a negative prompt ``sampling.sample`` would refuse or one at
    ``guidance_scale <= 1`` (no unconditional branch then), a non-zero ``eta`` with a
    scheduler whose step ignores it."""
    unknown = sorted(set(kwargs) - set(GENERATE_OPTIONS))
    if unknown:
        fail(unknown[0], kwargs[unknown[0]], f"generate() takes {list(GENERATE_OPTIONS)} besides "
                                             "its own arguments; call pipe(...) for others")
    kwargs = dict(kwargs)
    n = kwargs.pop("num_images_per_prompt", 1)
    if isinstance(n, bool) or n != 1:
        fail("num_images_per_prompt", n, "expected 1: generate() returns one image; for several "
                                         "use generate_images(pipe, prompt, seeds), one per seed")
    negative = check_negative_prompt(kwargs.get("negative_prompt"), tokenizer, 1)
    if negative is not None and guidance_scale <= 1:
        fail("negative_prompt", negative[0], f"a negative prompt needs guidance_scale > 1 (at "
                                             f"{guidance_scale:g} the pipeline runs no "
                                             "unconditional branch for it to replace)")
    check_choice("output_type", kwargs.setdefault("output_type", "pil"), ("pil", "np", "latent"))
    if "eta" in kwargs:
        check_float("eta", kwargs["eta"], 0.0, 1.0)
        check_eta(kwargs["eta"], scheduler)
    return kwargs


def check_eta(eta: float, scheduler) -> float:
    """A non-zero ``eta`` only for a scheduler whose ``step`` takes it (DDIM)."""
    if eta and "eta" not in inspect.signature(scheduler.step).parameters:
        fail("eta", eta, f"{type(scheduler).__name__} ignores eta: only DDIM-like samplers take "
                         "it (use scheduler='DDIM', or sampling.make_scheduler('DDIM', pipe))")
    return eta


def check_image(image, name: str = "image", size: tuple[int, int] | None = None) -> np.ndarray:
    """A picture as float32 (H, W, 3) RGB in [0, 1].

    Accepted: a PIL image (RGBA is composited on white, greyscale ``L`` is repeated into
    three channels: documented conversions), a uint8 array (H, W, 3), or a float array
    (H, W, 3) with values in [0, 1]. Refused: other dtypes, other channel counts, values
    out of range, and a size other than ``size`` (H, W) when one is asked for.
    """
    if isinstance(image, Image.Image):
        if image.mode == "RGBA":
            bg = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(bg, image).convert("RGB")
        elif image.mode in ("L", "1", "P", "LA"):
            image = image.convert("RGB")
        elif image.mode != "RGB":
            fail(name, image, "expected a PIL image in mode RGB, RGBA, L or P")
        arr = np.asarray(image, dtype=np.float32) / 255.0
    else:
        if not isinstance(image, np.ndarray):
            fail(name, image, "expected a PIL image or a numpy array (H, W, 3)")
        if image.ndim != 3 or image.shape[2] != 3:
            fail(name, f"array of shape {image.shape}",
                 "expected shape (H, W, 3) RGB (convert RGBA/greyscale with PIL first)")
        if image.dtype == np.uint8:
            arr = image.astype(np.float32) / 255.0
        elif image.dtype in (np.float32, np.float64):
            if not np.isfinite(image).all() or image.min() < 0 or image.max() > 1:
                fail(name, f"float array in [{image.min():.3g}, {image.max():.3g}]",
                     "expected float values in [0, 1] (or a uint8 array)")
            arr = image.astype(np.float32)
        else:
            fail(name, f"array of dtype {image.dtype}", "expected uint8, float32 or float64")
    if size is not None and arr.shape[:2] != tuple(size):
        fail(name, f"image of size {arr.shape[0]}x{arr.shape[1]}",
             f"expected size {size[0]}x{size[1]} (height x width)")
    return arr


def check_mask(mask, size: tuple[int, int], name: str = "mask") -> np.ndarray:
    """A mask as float32 (H, W) in [0, 1]: 1 where the image is to be repainted.

    Accepted: bool arrays; integer arrays (any integer dtype, uint8 included) whose values are
    all 0 or 1: a binary mask, 1 = repaint (so ``mask.astype(np.uint8)`` of a 0/1 mask repaints
    where it is 1; it is never divided by 255); other uint8 arrays: 0..255 grey levels,
    divided by 255 (255 = repaint); float arrays with values in [0, 1]; PIL images of mode L
    or 1 (read as their uint8 values, by the same rules). Refused: other integer values,
    floats outside [0, 1] or not finite, other shapes.
    """
    if isinstance(mask, Image.Image):
        if mask.mode not in ("L", "1"):
            fail(name, mask, "expected a PIL mask of mode L or 1")
        mask = np.asarray(mask.convert("L"))
    if not isinstance(mask, np.ndarray):
        fail(name, mask, "expected a numpy array (H, W) or a PIL image of mode L")
    if mask.ndim != 2:
        fail(name, f"array of shape {mask.shape}", f"expected shape {tuple(size)} (H, W)")
    if mask.shape != tuple(size):
        fail(name, f"array of shape {mask.shape}",
             f"expected shape {tuple(size)}, the image's size")
    if mask.dtype == np.bool_:
        return mask.astype(np.float32)
    if np.issubdtype(mask.dtype, np.integer):
        lo, hi = (int(mask.min()), int(mask.max())) if mask.size else (0, 0)
        if lo >= 0 and hi <= 1:
            return mask.astype(np.float32)  # a binary mask: 1 = repaint
        if mask.dtype == np.uint8:
            return mask.astype(np.float32) / 255.0
        fail(name, f"{mask.dtype} array with values in [{lo}, {hi}]",
             "expected an integer mask of 0s and 1s (1 = repaint), uint8 grey levels 0..255, "
             "or floats in [0, 1]")
    if not np.issubdtype(mask.dtype, np.floating):
        fail(name, f"array of dtype {mask.dtype}", "expected a bool, integer or float mask")
    m = mask.astype(np.float64)
    if not np.isfinite(m).all() or m.min() < 0 or m.max() > 1:
        fail(name, f"array with values in [{m.min():.3g}, {m.max():.3g}]",
             "expected values in [0, 1] (1 = repaint), or uint8 in [0, 255]")
    return m.astype(np.float32)


def check_folder(name: str, folder) -> Path:
    """A folder path (str or ``os.PathLike``), ``~`` expanded; it need not exist yet."""
    if not isinstance(folder, (str, os.PathLike)):
        fail(name, folder, "expected a folder path (str or pathlib.Path)")
    return Path(folder).expanduser()


def check_model_path(path, name: str = "model") -> Path:
    """An existing diffusers folder (with model_index.json) or a ``.safetensors`` file; ``~``
    is expanded, and a relative path is read from the current directory (the message of a
    missing one says which directory that is).

    Pickle checkpoints (``.ckpt``, ``.bin``, ``.pt``, ``.pth``) are refused: loading them
    runs arbitrary code. Convert them to safetensors on a machine you trust first.
    """
    p = Path(os.fspath(path)).expanduser()
    if p.suffix.lower() in (".ckpt", ".bin", ".pt", ".pth", ".pkl"):
        fail(name, str(path), "pickle checkpoints are refused (unpickling can run arbitrary "
                              "code): use a .safetensors file or a diffusers folder")
    if not p.exists():
        where = "" if p.is_absolute() else f" (relative to the current directory, {Path.cwd()})"
        fail(name, str(path), f"no such file or folder on this machine{where}; expected a "
                              "diffusers folder, a .safetensors file or a hub id (hub ids look "
                              "like owner/name)")
    if p.is_dir() and not (p / "model_index.json").exists():
        fail(name, str(path), "this folder is not a diffusers pipeline (no model_index.json)")
    if p.is_file() and p.suffix.lower() != ".safetensors":
        fail(name, str(path), "expected a .safetensors single-file checkpoint")
    return p


# ------------------------------------------------------------------------------ models on disk

_EXAMPLE_INDEX = ('{"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", '
                  '"UNet2DConditionModel"], ...}')


def _broken(name: str, path, allowed: str):
    fail(name, str(path), allowed, BrokenModelError)


def check_safetensors(path, name: str = "model") -> dict:
    """The header of a ``.safetensors`` file (tensor name -> dtype, shape, offsets), read
    without loading a weight; a file that is too short, garbage or truncated (an interrupted
    download or copy) raises ``BrokenModelError`` saying what was expected and what was found.
    """
    p = Path(path)
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or n > min(size - 8, 100 * 2**20):
            _broken(name, path, f"expected a safetensors file (an 8-byte header length, then a "
                                f"JSON header); found {size} bytes that do not start like one "
                                "(garbage, an HTML error page or a truncated download?)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, ValueError):
            header = None
    if not isinstance(header, dict):
        _broken(name, path, "expected a safetensors file; its header is not a JSON object "
                            "(a garbage or corrupted file)")
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
                  default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        _broken(name, path, "expected a safetensors file; its header has no valid data_offsets")
    if size < 8 + n + end:
        _broken(name, path, f"the file is truncated: its header describes {len(header)} tensors "
                            f"ending at byte {8 + n + end:,}, but it holds only {size:,} bytes "
                            "(an interrupted download or copy? get the file again)")
    return header


def check_checkpoint(path, name: str = "model") -> dict:
    """A single-file Stable Diffusion checkpoint (the original key layout, ``model.
    diffusion_model.*``): its safetensors header, checked; another kind of safetensors file
    (a LoRA, a learned embedding, one diffusers component) is refused, naming what it holds."""
    header = check_safetensors(path, name)
    keys = [k for k in header if k != "__metadata__"]
    if not any(k.startswith("model.diffusion_model.") for k in keys):
        _broken(name, path, "expected a Stable Diffusion checkpoint (keys model.diffusion_model."
                            f"*, first_stage_model.*, cond_stage_model.*); found {len(keys)} "
                            f"tensors such as {keys[:3]} (a LoRA, an embedding or one component "
                            "of a diffusers folder?)")
    return header


def read_model_index(folder, name: str = "model") -> dict:
    """A diffusers folder's ``model_index.json``, parsed; empty, not JSON, or without
    ``_class_name``: ``BrokenModelError`` naming the file and what it holds."""
    index = Path(folder) / "model_index.json"
    try:
        text = index.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        _broken(name, index, f"expected a readable JSON file; found {type(e).__name__}: {e}")
    if not text.strip():
        _broken(name, index, f"model_index.json is empty; expected the pipeline's index, e.g. "
                             f"{_EXAMPLE_INDEX}")
    try:
        info = json.loads(text)
    except ValueError as e:
        _broken(name, index, f"expected valid JSON; found a syntax error at line "
                             f"{getattr(e, 'lineno', '?')}, column {getattr(e, 'colno', '?')}: "
                             f"{getattr(e, 'msg', e)}")
    if not isinstance(info, dict) or "_class_name" not in info:
        found = sorted(info)[:6] if isinstance(info, dict) else type(info).__name__
        _broken(name, index, f"expected a JSON object with a \"_class_name\" (e.g. "
                             f"{_EXAMPLE_INDEX}); found {found}")
    return info


def check_components(folder, info: dict, name: str = "model", weights: bool = True) -> None:
    """Every component ``model_index.json`` names (``"unet": ["diffusers",
    "UNet2DConditionModel"]``) has its subfolder, a config that parses and, for models (with
    ``weights``), safetensors weights that are whole (``check_safetensors``); else
    ``BrokenModelError``."""
    folder = Path(folder)
    for part, entry in info.items():
        if part.startswith("_") or not isinstance(entry, list) or len(entry) != 2 \
                or None in entry:
            continue
        sub, cls = folder / part, str(entry[1])
        if not sub.is_dir():
            found = sorted(p.name for p in folder.iterdir())
            _broken(name, sub, f"model_index.json names the component {part!r} ({cls}), so a "
                               f"{part}/ subfolder was expected; found only {found}")
        if "Tokenizer" in cls or "Processor" in cls or "FeatureExtractor" in cls:
            continue
        config = sub / ("scheduler_config.json" if "Scheduler" in cls else "config.json")
        try:
            json.loads(config.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            _broken(name, config, f"expected the {part}'s JSON config; found "
                                  f"{type(e).__name__}: {str(e)[:120]}")
        if "Scheduler" in cls or not weights:
            continue
        files = sorted(sub.glob("*.safetensors"))
        if not files:
            pickles = sorted(p.name for p in sub.iterdir() if p.suffix in (".bin", ".ckpt", ".pt"))
            _broken(name, sub, f"expected the {part}'s weights as a .safetensors file; found "
                               + (f"only pickle weights {pickles} (refused: convert them to "
                                  "safetensors)" if pickles else
                                  f"{sorted(p.name for p in sub.iterdir())}"))
        for w in files:
            check_safetensors(w, name)
