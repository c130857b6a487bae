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

import math
import os
from pathlib import Path

import numpy as np
from PIL import Image


class SdkitInputError(ValueError):
    """A bad argument to an sdkit function; the message says which, what and what is allowed."""


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


def check_bool(name: str, value) -> bool:
    """True or False (not 0/1, not a string)."""
    if not isinstance(value, bool):
        fail(name, value, "expected True or False")
    return value


def check_list(name: str, value) -> list:
    """A non-empty list (or tuple, or other iterable that is not a string)."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
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
    ids = tokenizer(prompt).input_ids
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
                               f"{', '.join(words)} (notebook 03 shows what real CLIP does "
                               f"with unknown words)")
    return prompt


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

    Accepted: bool or numeric arrays (H, W) with values in [0, 1], uint8 arrays with
    values in {0, 255} or [0, 255], and PIL images of mode L or 1.
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
    if mask.dtype == np.uint8:
        return mask.astype(np.float32) / 255.0
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
    """An existing diffusers folder (with model_index.json) or a ``.safetensors`` file.

    Pickle checkpoints (``.ckpt``, ``.bin``, ``.pt``, ``.pth``) are refused: loading them
    runs arbitrary code. Convert them to safetensors on a machine you trust first.
    """
    p = Path(path)
    if p.suffix.lower() in (".ckpt", ".bin", ".pt", ".pth", ".pkl"):
        fail(name, str(path), "pickle checkpoints are refused (unpickling can run arbitrary "
                              "code): use a .safetensors file or a diffusers folder")
    if not p.exists():
        fail(name, str(path), "no such file or folder on this machine; expected a diffusers "
                              "folder, a .safetensors file or a hub id")
    if p.is_dir() and not (p / "model_index.json").exists():
        fail(name, str(path), "this folder is not a diffusers pipeline (no model_index.json)")
    if p.is_file() and p.suffix.lower() != ".safetensors":
        fail(name, str(path), "expected a .safetensors single-file checkpoint")
    return p
