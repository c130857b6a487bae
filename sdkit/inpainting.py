"""Inpainting and outpainting: repaint part of a picture with a 4-channel text-to-image model.

* ``inpaint``: after every scheduler step, put back the original latents (noised to the
  next timestep) wherever the mask is 0 ("latent blending"). This works with any 4-channel
  UNet and equals ``StableDiffusionInpaintPipeline`` with such a UNet. Optionally paste the
  original pixels back outside the mask, as the pipeline's ``apply_overlay`` does.
* ``outpaint``: widen the canvas (edge pixels repeated into the new strip, ``outpaint_canvas``),
  mask the new strip and inpaint it.
* masks: ``dilate_mask`` (grow a mask), ``latent_mask`` (the mask the latents see);
  measures: ``outside_error``, ``vae_reconstruction`` (what the VAE alone keeps);
  ``check_latent_mask_answer``: the checker of notebook 09's exercise.

The guided step, the truncated schedule and the decoding are notebook 08's
(``sdkit.img2img``).

Left out: dedicated 9-channel inpainting UNets (notebook 09 explains them; they need their
own weights), ``padding_mask_crop``, IP-adapters and batches of more than one image.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from . import checks, images
from .img2img import (
    OUTPUT_TYPES,
    SIZE_MULTIPLE,
    _embeddings,
    _noise_pred,
    _output,
    _picture,
    _scheduler_copy,
    _steps,
    truncated_timesteps,
)
from .pipeline import resolve_settings

SIDES = ("left", "right")


# ----------------------------------------------------------------------------- masks


def dilate_mask(mask, pixels: int) -> np.ndarray:
    """Grow a mask by ``pixels`` in every direction (a square structuring element): float32.

    Introduced in notebooks/09_inpainting_and_outpainting.ipynb.
    """
    from scipy import ndimage

    shape = np.asarray(mask).shape
    if len(shape) != 2:
        checks.fail("mask", f"array of shape {shape}", "expected a 2-D mask (H, W)")
    m = checks.check_mask(mask if hasattr(mask, "dtype") or hasattr(mask, "mode")
                          else np.asarray(mask), shape)
    pixels = checks.check_int("pixels", pixels, 0, 512)
    if pixels == 0:
        return (m >= 0.5).astype(np.float32)
    grown = ndimage.binary_dilation(m >= 0.5, structure=np.ones((2 * pixels + 1,) * 2, bool))
    return grown.astype(np.float32)


def latent_mask(mask, scale_factor: int) -> torch.Tensor:
    """The mask the latents see: binarised at 0.5, then nearest-neighbour downsampled.

    As ``StableDiffusionInpaintPipeline`` does (``mask_processor`` then
    ``F.interpolate``): each latent pixel takes the value of the *top-left* pixel of its
    block of ``scale_factor`` x ``scale_factor`` pixels (``pipe.vae_scale_factor``: 8 for
    Stable Diffusion, 4 for the toy model). Returns (1, 1, H/f, W/f) float32.

    Introduced in notebooks/09_inpainting_and_outpainting.ipynb.
    """
    f = checks.check_int("scale_factor", scale_factor, 1, 64)
    shape = np.asarray(mask).shape  # the mask's own dtype goes to check_mask (0/1 ints: binary)
    if len(shape) != 2 or shape[0] % f or shape[1] % f:
        checks.fail("mask", f"array of shape {shape}",
                    f"expected a 2-D mask whose height and width are multiples of {f}")
    m = checks.check_mask(mask if hasattr(mask, "dtype") or hasattr(mask, "mode")
                          else np.asarray(mask), shape)
    m = torch.from_numpy((m >= 0.5).astype(np.float32))[None, None]  # (1, 1, H, W)
    return F.interpolate(m, size=(shape[0] // f, shape[1] // f))  # (1, 1, H/f, W/f)


# ----------------------------------------------------------------------------- measures


def outside_error(a, b, mask) -> float:
    """Mean absolute difference of two pictures where ``mask`` is 0, on the 0..1 scale.

    Introduced in notebooks/09_inpainting_and_outpainting.ipynb.
    """
    a, b = checks.check_image(a, name="a"), checks.check_image(b, name="b")
    if a.shape != b.shape:
        checks.fail("b", f"image of size {b.shape[0]}x{b.shape[1]}",
                    f"expected the size of a, {a.shape[0]}x{a.shape[1]}")
    m = checks.check_mask(mask, a.shape[:2]) < 0.5
    if not m.any():
        checks.fail("mask", "a mask that covers everything", "expected some pixels outside it")
    return float(np.abs(a - b)[m].mean())


def vae_reconstruction(pipe, image) -> np.ndarray:
    """Encode and decode a picture with the posterior mean: float32 (H, W, 3) in [0, 1].

    What the VAE alone keeps of a picture: the best any latent-space edit can do outside
    the edited area.

    Introduced in notebooks/09_inpainting_and_outpainting.ipynb.
    """
    z = images.encode(pipe.vae, _picture(pipe, image))  # (1, 4, h, w), the posterior mean
    return images.to_numpy(images.decode(pipe.vae, z))[0]


# ----------------------------------------------------------------------------- inpainting


@torch.no_grad()
def inpaint(pipe, image, mask, prompt: str, seed: int, strength: float = 1.0,
            num_inference_steps: int | None = None, guidance_scale: float | None = None,
            paste_back: bool = True, output_type: str = "pil", callback=None):
    """Repaint the part of ``image`` under ``mask`` (1 = repaint) to match ``prompt``.

    Latent blending: after every scheduler step the latents outside the (latent-sized)
    mask are replaced by the original latents noised to the next timestep, so only the
    masked part is generated; it works with any 4-channel UNet. ``strength`` 1 (default)
    starts the masked part from pure noise. ``paste_back`` copies the original pixels
    back where the pixel mask is 0 (``out = mask * generated + (1 - mask) * original``,
    what the pipeline's ``apply_overlay`` does), which undoes the VAE's small round-trip
    error there. With ``paste_back=False`` the result equals
    ``StableDiffusionInpaintPipeline(**pipe.components)`` for the same seed.

    ``mask``: (H, W), the image's size: floats in [0, 1], 0/1 integers of any dtype (a
    binary mask), uint8 grey levels 0..255, or a PIL L image (``checks.check_mask``). A mask
    with nothing to repaint (no pixel >= 0.5, or none that a latent pixel sees: grow thin
    masks with ``dilate_mask``) is refused, as is a picture too big for the machine
    (``sdkit.device.memory_limit``; raise it with ``SDKIT_MEMORY_LIMIT``). A progress bar
    shows when the call takes more than 2 s; an interrupt leaves the pipeline as it was.
    ``callback(i, t, latents)`` is called after each blended step (for plots and tests).

    Introduced in notebooks/09_inpainting_and_outpainting.ipynb.
    """
    x = _picture(pipe, image)  # (1, 3, H, W) in [-1, 1]
    pixel_mask = checks.check_mask(mask, tuple(x.shape[2:]))  # (H, W) in [0, 1]
    checks.check_prompt(prompt, pipe.tokenizer, allow_empty=True)
    seed = checks.check_seed(seed)
    strength = checks.check_strength(strength)
    steps, scale = resolve_settings(pipe, num_inference_steps, guidance_scale)
    checks.check_choice("output_type", output_type, OUTPUT_TYPES)
    checks.check_bool("paste_back", paste_back)
    if callback is not None and not callable(callback):
        checks.fail("callback", callback, "expected a function (i, t, latents) or None")
    if int(steps * strength) < 1:
        checks.fail("strength", strength, f"expected int(num_inference_steps * strength) >= 1 "
                                          f"(with {steps} steps: strength >= {1 / steps:g})")
    if pipe.unet.config.in_channels != 4:
        checks.fail("pipe", f"a UNet with {pipe.unet.config.in_channels} input channels",
                    "expected a 4-channel UNet (use StableDiffusionInpaintPipeline for 9)")
    m = latent_mask(pixel_mask, images.vae_scale_factor(pipe.vae))  # (1, 1, h, w)
    if not (pixel_mask >= 0.5).any() or not m.any():
        checks.fail("mask", "a mask with nothing to repaint", "expected some pixels >= 0.5 (1 = "
                    "repaint) where a latent pixel sees them (the top-left pixel of each "
                    f"{images.vae_scale_factor(pipe.vae)}x{images.vae_scale_factor(pipe.vae)} "
                    "block); grow a thin mask with dilate_mask; this one would repaint nothing")
    generator = torch.Generator("cpu").manual_seed(seed)

    prompt_embeds, do_cfg = _embeddings(pipe, prompt, scale)
    scheduler = _scheduler_copy(pipe)
    timesteps = truncated_timesteps(scheduler, steps, strength)
    image_latents = images.encode(pipe.vae, x, sample=True, generator=generator)  # (1, 4, h, w)
    # the VAE hands back channels-last latents (its input was a channels-last view); the
    # inpaint pipeline makes them contiguous (``.repeat``), which changes how the UNet's
    # convolutions sum and so the last bits: do the same to stay bit-identical
    image_latents = image_latents.contiguous()
    noise = torch.randn(image_latents.shape, generator=generator, dtype=image_latents.dtype)
    noise = noise.to(pipe.device)
    if strength == 1.0:
        latents = noise * scheduler.init_noise_sigma
    else:
        latents = scheduler.add_noise(image_latents, noise, timesteps[:1])
    m = m.to(pipe.device, latents.dtype)
    for i, t in enumerate(_steps(timesteps, "inpainting")):
        noise_pred = _noise_pred(pipe, scheduler, latents, t, prompt_embeds, do_cfg, scale)
        latents = scheduler.step(noise_pred, t, latents).prev_sample
        init_latents_proper = image_latents
        if i < len(timesteps) - 1:  # noised to the timestep the next step starts from
            init_latents_proper = scheduler.add_noise(image_latents, noise, timesteps[i + 1:i + 2])
        latents = (1 - m) * init_latents_proper + m * latents
        if callback is not None:
            callback(i, t, latents)
    return _output(pipe, latents, output_type, x if paste_back else None, pixel_mask)


# ----------------------------------------------------------------------------- outpainting


def outpaint_canvas(image, new_width: int, side: str = "right"):
    """The wider canvas and its mask for outpainting: (uint8 (H, new_width, 3), float32 mask).

    The old picture keeps its pixels; the new strip repeats the old picture's edge
    column (so the VAE sees a plausible background there) and is where the mask is 1.

    Introduced in notebooks/09_inpainting_and_outpainting.ipynb.
    """
    arr = images.to_uint8(images.to_tensor(image, name="image", multiple=SIZE_MULTIPLE))[0]
    h, w = arr.shape[:2]
    new_width = checks.check_int("new_width", new_width, w + SIZE_MULTIPLE, 4096)
    if new_width % SIZE_MULTIPLE:
        checks.fail("new_width", new_width,
                    f"expected a multiple of {SIZE_MULTIPLE} larger than the image's width {w}, "
                    f"e.g. {new_width - new_width % SIZE_MULTIPLE}")
    side = checks.check_choice("side", side, SIDES)
    extra = new_width - w
    pad = ((0, 0), (0, extra), (0, 0)) if side == "right" else ((0, 0), (extra, 0), (0, 0))
    canvas = np.pad(arr, pad, mode="edge")  # (H, new_width, 3) uint8
    mask = np.zeros((h, new_width), np.float32)
    if side == "right":
        mask[:, w:] = 1
    else:
        mask[:, :extra] = 1
    return canvas, mask


def outpaint(pipe, image, prompt: str, new_width: int, side: str = "right", seed: int = 0,
             num_inference_steps: int | None = None, guidance_scale: float | None = None,
             paste_back: bool = True, output_type: str = "pil"):
    """Extend ``image`` sideways to ``new_width`` pixels and fill the new strip from ``prompt``.

    ``side``: "right" or "left". ``new_width`` must be a multiple of 8 larger than the
    image, and small enough for the machine (its estimated memory under
    ``sdkit.device.memory_limit``; raise it with ``SDKIT_MEMORY_LIMIT``). The prompt
    describes the whole new canvas (the old part included). Returns a picture of size
    (H, new_width).

    Introduced in notebooks/09_inpainting_and_outpainting.ipynb.
    """
    h, _ = images.picture_size(image)
    if h and isinstance(new_width, int) and not isinstance(new_width, bool) and new_width > 0:
        # refused before the canvas is made: the wider picture's edit must fit in memory
        images.check_generation_memory(pipe, "new_width", new_width, 1, h, new_width,
                                       encode=True)
    canvas, mask = outpaint_canvas(image, new_width, side)
    return inpaint(pipe, canvas, mask, prompt, seed, 1.0, num_inference_steps, guidance_scale,
                   paste_back=paste_back, output_type=output_type)


# ----------------------------------------------------------------------------- exercise


def _exercise_masks():
    """The masks the checker tries: (mask (H, W) float32, f). Random values, some exactly
    0.5 (the pipeline's binarisation counts 0.5 as masked), and a mask whose blocks are
    not uniform, so that every choice of pixel gives a different answer."""
    rng = np.random.default_rng(0)
    cases = []
    for h, w, f in ((64, 64, 4), (64, 96, 4), (16, 40, 8)):
        mask = rng.random((h, w)).astype(np.float32)
        mask[rng.random((h, w)) < 0.1] = 0.5
        cases.append((mask, f))
    return cases


def _latent_mask_hint(got: np.ndarray, mask: np.ndarray, f: int) -> str:
    """Which typical mistake gives ``got`` for ``mask``."""
    binary = (mask >= 0.5).astype(np.float32)
    h, w = mask.shape[0] // f, mask.shape[1] // f
    blocks = binary.reshape(h, f, w, f)
    if np.array_equal(got, mask[::f, ::f]):
        return "binarise first: every value >= 0.5 becomes 1, the rest 0"
    if np.array_equal(got, (mask[::f, ::f] > 0.5).astype(np.float32)):
        return "a pixel of exactly 0.5 counts as masked (>= 0.5, as the pipeline binarises)"
    if np.array_equal(got, blocks.max(axis=(1, 3))):
        return ("that is max-pooling (a block counts if any pixel is masked); nearest-neighbour "
                "downsampling keeps one pixel of each block")
    if np.array_equal(got, (blocks.mean(axis=(1, 3)) >= 0.5).astype(np.float32)):
        return ("that is a majority vote over each block; nearest-neighbour downsampling keeps "
                "one pixel of each block")
    for dy in range(f):
        for dx in range(f):
            if (dy, dx) != (0, 0) and np.array_equal(got, binary[dy::f, dx::f]):
                return (f"you kept pixel ({dy}, {dx}) of each f x f block; F.interpolate's "
                        f"'nearest' maps latent pixel i to pixel floor(i * f): which one is that?")
    return ("binarise at 0.5, then keep one pixel of each f x f block, the one "
            "F.interpolate(mode='nearest') picks (try inpainting.latent_mask on a mask with "
            "a single pixel set)")


def check_latent_mask_answer(fn) -> bool:
    """Checker of notebook 09's exercise: ``fn(mask, scale_factor)`` for a (H, W) float mask
    must return the (H/f, W/f) mask of 0/1 the latents see, as ``latent_mask`` computes it.
    Prints the first wrong case with a hint about the typical mistake it matches, or that
    all are right; "not solved yet" when ``fn`` is None or returns None. Returns True or
    False, never raises.

    Introduced in notebooks/09_inpainting_and_outpainting.ipynb.
    """
    if fn is None:
        print("not solved yet: write my_latent_mask(mask, scale_factor).")
        return False
    if not callable(fn):
        print(f"{fn!r} is not a function: expected my_latent_mask(mask, scale_factor).")
        return False
    for mask, f in _exercise_masks():
        h, w = mask.shape
        want = latent_mask(mask, f)[0, 0].numpy()
        ok, out = checks.call_answer(fn, (mask.copy(), f), "my_latent_mask",
                                     f"(mask {h}x{w}, f={f})")
        if not ok:
            return False
        try:
            got = np.asarray(out, dtype=np.float32)
        except (TypeError, ValueError):
            print(f"mask {h}x{w}, f={f}: expected an array (H/f, W/f), got {type(out).__name__}")
            return False
        if got.shape != want.shape:
            print(f"Not quite: mask {h}x{w}, f={f}: expected shape {want.shape}, got "
                  f"{got.shape}. Hint: one value per f x f block, (H/f, W/f).")
            return False
        if not np.array_equal(got, want):
            print(f"Not quite: mask {h}x{w}, f={f}: {int((got != want).sum())} of {want.size} "
                  f"latent pixels differ. Hint: {_latent_mask_hint(got, mask, f)}.")
            return False
    print("Right: binarised at 0.5 (0.5 counts as masked), then the top-left pixel of each "
          "f x f block, for every case tried.")
    return True
