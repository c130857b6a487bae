"""Editing pictures with a text-to-image model: image-to-image, inpainting and outpainting.

All three reuse the text-to-image denoising loop and change only where it starts and what
it may touch:

* ``img2img``: encode the picture with the VAE, noise its latents to the timestep where a
  truncated schedule begins (``strength`` = how far along the schedule we start), and
  denoise with a new prompt. Same seed, same image as diffusers'
  ``StableDiffusionImg2ImgPipeline``: the random numbers are drawn in the pipeline's order.
* ``inpaint``: after every scheduler step, put back the original latents (noised to the
  next timestep) wherever the mask is 0 ("latent blending"). This works with any
  4-channel UNet and equals ``StableDiffusionInpaintPipeline`` with such a UNet. Optionally
  paste the original pixels back outside the mask, as the pipeline's ``apply_overlay`` does.
* ``outpaint``: widen the canvas (edge pixels repeated into the new strip), mask the new
  strip and inpaint it.

Left out: dedicated 9-channel inpainting UNets (notebook 08 explains them; they need their
own weights), ``padding_mask_crop``, IP-adapters and batches of more than one image.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from . import checks

OUTPUT_TYPES = ("pil", "np", "latent")
SIDES = ("left", "right")


# ----------------------------------------------------------------------------- small helpers


def _settings(pipe, num_inference_steps, guidance_scale) -> tuple[int, float]:
    from .pipeline import default_settings

    d = default_settings(pipe)
    steps = checks.check_steps(d["num_inference_steps"] if num_inference_steps is None
                               else num_inference_steps)
    scale = checks.check_guidance(d["guidance_scale"] if guidance_scale is None
                                  else guidance_scale)
    return steps, scale


def image_to_tensor(image, name: str = "image") -> torch.Tensor:
    """A picture as the VAE wants it: (1, 3, H, W) float32 in [-1, 1].

    ``image``: PIL (RGBA is composited on white, greyscale repeated into RGB, as
    ``checks.check_image`` documents), uint8 (H, W, 3) or float (H, W, 3) in [0, 1]. Height
    and width must be multiples of 8 (the VAE shrinks by 8); nothing is resized.
    Same numbers as diffusers' ``VaeImageProcessor.preprocess`` for a PIL image.

    Introduced in notebooks/07_image_to_image.ipynb.
    """
    arr = _image_array(image, name)  # (H, W, 3) in [0, 1]
    # (1, 3, H, W) as a view of the (1, H, W, 3) array: the same channels-last strides as
    # diffusers' VaeImageProcessor, so that the VAE's convolutions sum in the same order
    # (a contiguous copy changes the last bits of the latents)
    x = torch.from_numpy(arr[None].transpose(0, 3, 1, 2))
    return 2.0 * x - 1.0


def _image_array(image, name: str = "image") -> np.ndarray:
    arr = checks.check_image(image, name=name)  # (H, W, 3) float32 in [0, 1]
    h, w = arr.shape[:2]
    for side, v in (("height", h), ("width", w)):
        if v % 8:
            checks.fail(name, f"image of size {h}x{w}",
                        f"expected {side} a multiple of 8 (Stable Diffusion's VAE shrinks "
                        f"images by 8); crop or pad it to {v - v % 8 or 8} first")
    return arr


def to_pil(images: torch.Tensor):
    """(B, 3, H, W) in [-1, 1] -> list of PIL images (as the pipelines' postprocess)."""
    from PIL import Image

    arr = to_numpy(images)
    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in arr]


def to_numpy(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> float32 (B, H, W, 3) in [0, 1]."""
    return (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()


@torch.no_grad()
def vae_reconstruction(pipe, image) -> np.ndarray:
    """Encode and decode a picture with the posterior mean: float32 (H, W, 3) in [0, 1].

    What the VAE alone keeps of a picture: the best any latent-space edit can do outside
    the edited area.

    Introduced in notebooks/07_image_to_image.ipynb.
    """
    x = image_to_tensor(image).to(pipe.device, pipe.vae.dtype)
    z = pipe.vae.encode(x).latent_dist.mean
    return to_numpy(pipe.vae.decode(z).sample)[0]


def truncated_timesteps(scheduler, num_inference_steps: int, strength: float):
    """The timesteps img2img runs, as diffusers' ``get_timesteps``: the last
    ``int(num_inference_steps * strength)`` steps of the full schedule.

    Calls ``scheduler.set_timesteps`` and ``set_begin_index``; returns the timesteps tensor
    (empty when the strength is too small for a single step).

    Introduced in notebooks/07_image_to_image.ipynb.
    """
    steps = checks.check_steps(num_inference_steps)
    strength = checks.check_strength(strength)
    scheduler.set_timesteps(steps)
    init_timestep = min(int(steps * strength), steps)
    t_start = steps - init_timestep
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * scheduler.order)
    return scheduler.timesteps[t_start * scheduler.order:]


def _fresh_scheduler(pipe):
    # a copy, so that an edit never changes the state of pipe.scheduler
    return type(pipe.scheduler).from_config(pipe.scheduler.config)


def _encode(pipe, prompt, scale):
    do_cfg = scale > 1.0  # the pipelines' rule
    cond, uncond = pipe.encode_prompt(prompt, pipe.device, 1, do_cfg)  # (1, 77|20, D) each
    return (torch.cat([uncond, cond]) if do_cfg else cond), do_cfg


def _predict(pipe, scheduler, latents, t, prompt_embeds, do_cfg, scale):
    x = torch.cat([latents] * 2) if do_cfg else latents
    x = scheduler.scale_model_input(x, t)
    noise_pred = pipe.unet(x, t, encoder_hidden_states=prompt_embeds).sample
    if do_cfg:
        noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
        noise_pred = noise_pred_uncond + scale * (noise_pred_text - noise_pred_uncond)
    return noise_pred


def _output(pipe, latents, output_type, original=None, mask=None):
    if output_type == "latent":
        return latents
    images = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample  # (1, 3, H, W)
    out = to_numpy(images)[0]  # (H, W, 3) in [0, 1]
    if original is not None:
        m = mask[..., None]  # (H, W, 1): 1 = generated, 0 = original
        out = m * out + (1 - m) * original
    if output_type == "np":
        return out
    from PIL import Image

    return Image.fromarray((out * 255).round().astype(np.uint8))


# ----------------------------------------------------------------------------- img2img


@torch.no_grad()
def img2img(pipe, image, prompt: str, strength: float, seed: int,
            num_inference_steps: int | None = None, guidance_scale: float | None = None,
            output_type: str = "pil"):
    """Redraw ``image`` towards ``prompt``: start ``strength`` of the way along the schedule.

    The picture is encoded (a posterior sample, as the pipeline does), noised with
    ``scheduler.add_noise`` to the first timestep of the truncated schedule and denoised
    with classifier-free guidance. ``strength`` 1 starts from (almost) pure noise, so the
    picture barely matters; a strength too small for one step (``int(steps * strength) ==
    0``, e.g. 0) runs no step and returns the VAE reconstruction of the posterior sample
    (diffusers' pipeline fails there instead). Random numbers are drawn in the pipeline's
    order (posterior sample, then noise) from ``torch.Generator("cpu").manual_seed(seed)``,
    so the result equals ``StableDiffusionImg2ImgPipeline(**pipe.components)``.

    ``output_type``: "pil", "np" (float (H, W, 3) in [0, 1]) or "latent".

    Introduced in notebooks/07_image_to_image.ipynb.
    """
    x = image_to_tensor(image).to(pipe.device, pipe.vae.dtype)  # (1, 3, H, W)
    checks.check_prompt(prompt, pipe.tokenizer, allow_empty=True)
    strength = checks.check_strength(strength)
    seed = checks.check_seed(seed)
    steps, scale = _settings(pipe, num_inference_steps, guidance_scale)
    checks.check_choice("output_type", output_type, OUTPUT_TYPES)
    generator = torch.Generator("cpu").manual_seed(seed)

    prompt_embeds, do_cfg = _encode(pipe, prompt, scale)
    scheduler = _fresh_scheduler(pipe)
    timesteps = truncated_timesteps(scheduler, steps, strength)
    sf = pipe.vae.config.scaling_factor
    init_latents = sf * pipe.vae.encode(x).latent_dist.sample(generator)  # (1, 4, H/8, W/8)
    noise = torch.randn(init_latents.shape, generator=generator, dtype=init_latents.dtype)
    noise = noise.to(pipe.device)
    if len(timesteps) == 0:
        return _output(pipe, init_latents, output_type)
    latents = scheduler.add_noise(init_latents, noise, timesteps[:1])
    for t in timesteps:
        noise_pred = _predict(pipe, scheduler, latents, t, prompt_embeds, do_cfg, scale)
        latents = scheduler.step(noise_pred, t, latents).prev_sample
    return _output(pipe, latents, output_type)


# ----------------------------------------------------------------------------- masks


def dilate_mask(mask, pixels: int) -> np.ndarray:
    """Grow a mask by ``pixels`` in every direction (a square structuring element): float32.

    Introduced in notebooks/08_inpainting_and_outpainting.ipynb.
    """
    from scipy import ndimage

    mask = np.asarray(mask)
    if mask.ndim != 2:
        checks.fail("mask", f"array of shape {mask.shape}", "expected a 2-D mask (H, W)")
    m = checks.check_mask(mask, mask.shape)
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

    Introduced in notebooks/08_inpainting_and_outpainting.ipynb.
    """
    f = checks.check_int("scale_factor", scale_factor, 1, 64)
    mask = np.asarray(mask, dtype=np.float32)
    if mask.ndim != 2 or mask.shape[0] % f or mask.shape[1] % f:
        checks.fail("mask", f"array of shape {mask.shape}",
                    f"expected a 2-D mask whose height and width are multiples of {f}")
    m = checks.check_mask(mask, mask.shape)
    m = torch.from_numpy((m >= 0.5).astype(np.float32))[None, None]  # (1, 1, H, W)
    return F.interpolate(m, size=(mask.shape[0] // f, mask.shape[1] // f))


def outside_error(a, b, mask) -> float:
    """Mean absolute difference of two pictures where ``mask`` is 0, on the 0..1 scale.

    Introduced in notebooks/08_inpainting_and_outpainting.ipynb.
    """
    a, b = checks.check_image(a, name="a"), checks.check_image(b, name="b")
    if a.shape != b.shape:
        checks.fail("b", f"image of size {b.shape[0]}x{b.shape[1]}",
                    f"expected the size of a, {a.shape[0]}x{a.shape[1]}")
    m = checks.check_mask(mask, a.shape[:2]) < 0.5
    if not m.any():
        checks.fail("mask", "a mask that covers everything", "expected some pixels outside it")
    return float(np.abs(a - b)[m].mean())


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

    ``mask``: (H, W) array in [0, 1] (or uint8 0..255, or a PIL L image), the image's size.
    ``callback(i, t, latents)`` is called after each blended step (for plots and tests).

    Introduced in notebooks/08_inpainting_and_outpainting.ipynb.
    """
    x = image_to_tensor(image).to(pipe.device, pipe.vae.dtype)  # (1, 3, H, W)
    original = _image_array(image)  # (H, W, 3) in [0, 1]
    pixel_mask = checks.check_mask(mask, original.shape[:2])  # (H, W) in [0, 1]
    checks.check_prompt(prompt, pipe.tokenizer, allow_empty=True)
    seed = checks.check_seed(seed)
    strength = checks.check_strength(strength)
    steps, scale = _settings(pipe, num_inference_steps, guidance_scale)
    checks.check_choice("output_type", output_type, OUTPUT_TYPES)
    if not isinstance(paste_back, bool):
        checks.fail("paste_back", paste_back, "expected True or False")
    if callback is not None and not callable(callback):
        checks.fail("callback", callback, "expected a function (i, t, latents) or None")
    if int(steps * strength) < 1:
        checks.fail("strength", strength, f"expected int(num_inference_steps * strength) >= 1 "
                                          f"(with {steps} steps: strength >= {1 / steps:g})")
    if pipe.unet.config.in_channels != 4:
        checks.fail("pipe", f"a UNet with {pipe.unet.config.in_channels} input channels",
                    "expected a 4-channel UNet (use StableDiffusionInpaintPipeline for 9)")
    generator = torch.Generator("cpu").manual_seed(seed)

    prompt_embeds, do_cfg = _encode(pipe, prompt, scale)
    scheduler = _fresh_scheduler(pipe)
    timesteps = truncated_timesteps(scheduler, steps, strength)
    sf = pipe.vae.config.scaling_factor
    image_latents = sf * pipe.vae.encode(x).latent_dist.sample(generator)  # (1, 4, h, w)
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
    m = latent_mask(pixel_mask, pipe.vae_scale_factor)  # (1, 1, h, w)
    m = m.to(pipe.device, latents.dtype)
    for i, t in enumerate(timesteps):
        noise_pred = _predict(pipe, scheduler, latents, t, prompt_embeds, do_cfg, scale)
        latents = scheduler.step(noise_pred, t, latents).prev_sample
        init_latents_proper = image_latents
        if i < len(timesteps) - 1:  # noised to the timestep the next step starts from
            init_latents_proper = scheduler.add_noise(image_latents, noise, timesteps[i + 1:i + 2])
        latents = (1 - m) * init_latents_proper + m * latents
        if callback is not None:
            callback(i, t, latents)
    return _output(pipe, latents, output_type, original if paste_back else None, pixel_mask)


# ----------------------------------------------------------------------------- outpainting


def outpaint_canvas(image, new_width: int, side: str = "right"):
    """The wider canvas and its mask for outpainting: (uint8 (H, new_width, 3), float32 mask).

    The old picture keeps its pixels; the new strip repeats the old picture's edge
    column (so the VAE sees a plausible background there) and is where the mask is 1.

    Introduced in notebooks/08_inpainting_and_outpainting.ipynb.
    """
    arr = _image_array(image)
    h, w = arr.shape[:2]
    new_width = checks.check_int("new_width", new_width, w + 8, 4096)
    if new_width % 8:
        checks.fail("new_width", new_width, f"expected a multiple of 8 larger than the image's "
                                            f"width {w}, e.g. {new_width - new_width % 8}")
    side = checks.check_choice("side", side, SIDES)
    extra = new_width - w
    pad = ((0, 0), (0, extra), (0, 0)) if side == "right" else ((0, 0), (extra, 0), (0, 0))
    canvas = np.pad((arr * 255).round().astype(np.uint8), pad, mode="edge")
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
    image. The prompt describes the whole new canvas (the old part included). Returns a
    picture of size (H, new_width).

    Introduced in notebooks/08_inpainting_and_outpainting.ipynb.
    """
    canvas, mask = outpaint_canvas(image, new_width, side)
    return inpaint(pipe, canvas, mask, prompt, seed, 1.0, num_inference_steps, guidance_scale,
                   paste_back=paste_back, output_type=output_type)


# ----------------------------------------------------------------------------- exercises


def check_timesteps_answer(fn) -> bool:
    """Exercise of notebook 07: ``fn(num_inference_steps, strength)`` must return the list
    of int timesteps that img2img runs with the toy model's training schedule (trailing
    spacing over 1000 steps). Raises AssertionError with a hint when it does not.

    Introduced in notebooks/07_image_to_image.ipynb.
    """
    from .toy import make_sampler

    if not callable(fn):
        checks.fail("fn", fn, "expected a function (num_inference_steps, strength) -> list")
    for steps in (4, 10, 25):
        for strength in (0.0, 0.15, 0.3, 0.5, 0.74, 1.0):
            want = [int(t) for t in truncated_timesteps(make_sampler(), steps, strength)]
            got = [int(t) for t in fn(steps, strength)]
            assert got == want, (f"steps={steps}, strength={strength}: expected {want}, got "
                                 f"{got} (hint: int(steps * strength) steps from the end)")
    return True


def check_latent_mask_answer(fn) -> bool:
    """Exercise of notebook 08: ``fn(mask, scale_factor)`` for a (H, W) float mask must
    return the (H/f, W/f) mask the latents see, as ``latent_mask`` computes it. Raises
    AssertionError with a hint when it does not.

    Introduced in notebooks/08_inpainting_and_outpainting.ipynb.
    """
    if not callable(fn):
        checks.fail("fn", fn, "expected a function (mask (H, W), scale_factor) -> (H/f, W/f)")
    rng = np.random.default_rng(0)
    for h, w, f in ((64, 64, 4), (64, 96, 4), (16, 40, 8)):
        mask = rng.random((h, w)).astype(np.float32)
        want = latent_mask(mask, f)[0, 0].numpy()
        got = np.asarray(fn(mask, f), dtype=np.float32)
        assert got.shape == want.shape, f"mask {h}x{w}, f={f}: expected shape {want.shape}"
        assert np.array_equal(got, want), (
            f"mask {h}x{w}, f={f}: wrong latent mask (hint: binarise at 0.5, then keep the "
            f"top-left pixel of each f x f block)")
    return True


# ----------------------------------------------------------------------------- plotting


def show(images, titles=None, scale: float = 1.6, suptitle: str | None = None):
    """Show pictures in a row with titles (matplotlib, ``plt.show()``).

    Introduced in notebooks/07_image_to_image.ipynb.
    """
    import matplotlib.pyplot as plt

    images = list(images)
    if not images:
        checks.fail("images", images, "expected at least one picture")
    titles = list(titles) if titles is not None else [""] * len(images)
    if len(titles) != len(images):
        checks.fail("titles", titles, f"expected {len(images)} titles, one per picture")
    arrs = [np.asarray(im) for im in images]
    widths = [a.shape[1] / a.shape[0] for a in arrs]
    fig, axes = plt.subplots(1, len(arrs), figsize=(scale * sum(widths), scale * 1.25),
                             gridspec_kw={"width_ratios": widths}, squeeze=False)
    for ax, a, t in zip(axes[0], arrs, titles):
        ax.imshow(a, interpolation="nearest")
        ax.set_title(t, fontsize=8)
        ax.axis("off")
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    plt.show()
