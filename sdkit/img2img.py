"""Image-to-image: the text-to-image loop started from a noised picture instead of pure noise.

``img2img`` encodes the picture with the VAE, noises its latents to the timestep where a
truncated schedule begins (``strength`` = how far along the schedule we start, see
``truncated_timesteps``) and denoises with a new prompt. Same seed, same image as diffusers'
``StableDiffusionImg2ImgPipeline``: the random numbers are drawn in the pipeline's order.
``check_timesteps_answer`` is the checker of notebook 08's exercise.

The guided denoising step and the decoding of the result live here too; notebook 09's
inpainting (``sdkit.inpainting``) reuses them and adds a mask.

Left out: batches of more than one picture, ``latents`` passed in, IP-adapters, resizing
(sizes are checked, never changed), and schedulers with their own noise (the random numbers
are the pipeline's: posterior sample, then the starting noise).
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from . import checks, images
from .pipeline import encode_prompt, resolve_settings
from .sampling import combine

OUTPUT_TYPES = ("pil", "np", "latent")
SIZE_MULTIPLE = 8  # diffusers' Stable Diffusion pipelines want heights and widths divisible by 8


# ----------------------------------------------------------------------------- shared with 08


def _picture(pipe, image, name: str = "image", value=None) -> torch.Tensor:
    """One picture as the VAE wants it: (1, 3, H, W) float32 in [-1, 1] on the VAE's device.

    Refused before it is converted: a picture whose edit would need more memory than
    ``sdkit.device.memory_limit`` (the VAE encoder and decoder at its size, the UNet on its
    latents); ``name=value`` is what the message blames (default: the picture's size)."""
    multiple = math.lcm(SIZE_MULTIPLE, images.vae_scale_factor(pipe.vae))
    h, w = images.picture_size(image)
    if h and w:
        images.check_generation_memory(pipe, name, value or f"picture of size {h}x{w}", 1,
                                       h - h % multiple or multiple, w - w % multiple or multiple,
                                       encode=True)
    x = images.to_tensor(image, name="image", multiple=multiple)  # (B, 3, H, W)
    if x.shape[0] != 1:
        checks.fail("image", f"{x.shape[0]} pictures", "expected one picture (batches are "
                                                       "left out)")
    return x


def _scheduler_copy(pipe):
    # a copy, so that an edit never changes the state of pipe.scheduler
    return type(pipe.scheduler).from_config(pipe.scheduler.config)


def _embeddings(pipe, prompt: str, scale: float):
    """The UNet's text input: [uncond, cond] (2, T, D) with guidance, else cond (1, T, D)."""
    do_cfg = scale > 1.0  # the pipelines' rule
    cond, uncond = encode_prompt(pipe, [prompt])  # (1, T, D) each
    return (torch.cat([uncond, cond]) if do_cfg else cond), do_cfg


def _noise_pred(pipe, scheduler, latents, t, prompt_embeds, do_cfg: bool, scale: float):
    """One guided UNet call, as the pipelines make it: (1, 4, h, w)."""
    x = torch.cat([latents] * 2) if do_cfg else latents  # (2, 4, h, w) with guidance
    x = scheduler.scale_model_input(x, t)
    noise_pred = pipe.unet(x, t, encoder_hidden_states=prompt_embeds).sample
    if do_cfg:
        noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
        noise_pred = combine(noise_pred_uncond, noise_pred_text, scale)
    return noise_pred


def _steps(timesteps, desc: str):
    """The timesteps with a progress bar that shows only when the loop takes more than 2 s."""
    return tqdm(timesteps, desc=desc, leave=False, delay=2)


def _output(pipe, latents, output_type: str, original=None, pixel_mask=None):
    """Latents (1, 4, h, w) -> ``output_type``; with ``original`` (1, 3, H, W) in [-1, 1],
    its pixels are pasted back where ``pixel_mask`` (H, W) is 0."""
    if output_type == "latent":
        return latents
    x = images.decode(pipe.vae, latents)  # (1, 3, H, W) in [-1, 1], CPU float32
    if original is not None:
        m = torch.from_numpy(pixel_mask)[None, None]  # (1, 1, H, W): 1 = generated
        x = m * x + (1 - m) * original.float().cpu()
    return images.to_numpy(x)[0] if output_type == "np" else images.to_pil(x[0])


# ----------------------------------------------------------------------------- img2img


def truncated_timesteps(scheduler, num_inference_steps: int, strength: float):
    """The timesteps img2img runs, as diffusers' ``get_timesteps``: the last
    ``int(num_inference_steps * strength)`` steps of the full schedule.

    Calls ``scheduler.set_timesteps`` and ``set_begin_index``; returns the timesteps tensor
    (empty when the strength is too small for a single step).

    Introduced in notebooks/08_image_to_image.ipynb.
    """
    steps = checks.check_steps(num_inference_steps)
    strength = checks.check_strength(strength)
    if not hasattr(scheduler, "set_timesteps"):
        checks.fail("scheduler", type(scheduler).__name__, "expected a diffusers scheduler")
    scheduler.set_timesteps(steps)
    # Copied from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img.
    # StableDiffusionImg2ImgPipeline.get_timesteps (0.42.1) with changes: returns the timesteps only
    init_timestep = min(int(steps * strength), steps)
    t_start = max(steps - init_timestep, 0)
    timesteps = scheduler.timesteps[t_start * scheduler.order:]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * scheduler.order)
    return timesteps


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

    ``image``: one picture (PIL, uint8 or float (H, W, 3)), sides multiples of 8 and of the
    VAE's factor; a picture too big for the machine (its estimated memory over
    ``sdkit.device.memory_limit``; raise it with ``SDKIT_MEMORY_LIMIT``) is refused before
    anything is allocated. A progress bar shows when the call takes more than 2 s; an
    interrupt leaves the pipeline as it was (the scheduler stepped is a copy).
    ``output_type``: "pil", "np" (float (H, W, 3) in [0, 1]) or "latent".

    Introduced in notebooks/08_image_to_image.ipynb.
    """
    x = _picture(pipe, image)  # (1, 3, H, W)
    checks.check_prompt(prompt, pipe.tokenizer, allow_empty=True)
    strength = checks.check_strength(strength)
    seed = checks.check_seed(seed)
    steps, scale = resolve_settings(pipe, num_inference_steps, guidance_scale)
    checks.check_choice("output_type", output_type, OUTPUT_TYPES)
    generator = torch.Generator("cpu").manual_seed(seed)

    prompt_embeds, do_cfg = _embeddings(pipe, prompt, scale)
    scheduler = _scheduler_copy(pipe)
    timesteps = truncated_timesteps(scheduler, steps, strength)
    init_latents = images.encode(pipe.vae, x, sample=True, generator=generator)  # (1, 4, h, w)
    noise = torch.randn(init_latents.shape, generator=generator, dtype=init_latents.dtype)
    noise = noise.to(pipe.device)
    if len(timesteps) == 0:
        return _output(pipe, init_latents, output_type)
    latents = scheduler.add_noise(init_latents, noise, timesteps[:1])
    for t in _steps(timesteps, "img2img"):
        noise_pred = _noise_pred(pipe, scheduler, latents, t, prompt_embeds, do_cfg, scale)
        latents = scheduler.step(noise_pred, t, latents).prev_sample
    return _output(pipe, latents, output_type)


# ----------------------------------------------------------------------------- exercise


def _timesteps_hint(got: list[int], full: list[int], steps: int, strength: float) -> str:
    """The typical mistake that gives ``got``, where ``full`` is the whole schedule."""
    keep = int(steps * strength)
    if keep == 0 and got == full:
        return ("no step runs when int(steps * strength) is 0, but timesteps[-0:] is the "
                "whole schedule: slice from steps - k instead")
    if got and len(got) == keep and got == full[:keep]:
        return ("those are the first, noisiest steps of the schedule; img2img starts part-way "
                "along it and runs the last ones, down to the least noisy")
    if got == full[len(full) - len(got):]:  # the end of the schedule, but too long or short
        if len(got) == round(steps * strength):
            return "int() rounds down: diffusers keeps int(steps * strength) steps, not round()"
        return f"{len(got)} steps from the end instead of int(steps * strength) = {keep}"
    return "img2img runs the last int(steps * strength) timesteps of the full schedule"


def check_timesteps_answer(fn, pipe) -> bool:
    """Checker of notebook 08's exercise: ``fn(num_inference_steps, strength)`` must return
    the timesteps (a list or tensor of ints) that ``img2img`` runs with ``pipe``'s scheduler.

    Tried at several step counts and strengths; prints the first wrong case with a hint on
    the typical mistake it matches (the first steps instead of the last, round() instead of
    int(), timesteps[-0:]), or that all are right; "not solved yet" when ``fn`` is None or
    returns None. Returns True or False; never raises on a wrong answer.

    Introduced in notebooks/08_image_to_image.ipynb.
    """
    if fn is None:
        print("not solved yet: write my_timesteps(num_inference_steps, strength).")
        return False
    if not callable(fn):
        print(f"{fn!r} is not a function: expected my_timesteps(num_inference_steps, "
              f"strength) -> the list of timesteps.")
        return False
    for steps in (4, 10, 25):
        full = [int(t) for t in truncated_timesteps(_scheduler_copy(pipe), steps, 1.0)]
        for strength in (0.0, 0.15, 0.3, 0.5, 0.74, 1.0):
            want = [int(t) for t in truncated_timesteps(_scheduler_copy(pipe), steps, strength)]
            try:
                out = fn(steps, strength)
                if out is None:
                    print("not solved yet: my_timesteps returns None.")
                    return False
                got = [int(t) for t in out]
            except Exception as e:  # noqa: BLE001 - a learner's bug is a wrong answer
                print(f"steps={steps}, strength={strength}: your function raised "
                      f"{type(e).__name__}: {e}")
                return False
            if got != want:
                print(f"Not quite: steps={steps}, strength={strength}: expected "
                      f"{len(want)} timesteps, got {got}. Hint: "
                      f"{_timesteps_hint(got, full, steps, strength)}.")
                return False
    print("Right: the last int(steps * strength) timesteps, for every case tried.")
    return True
