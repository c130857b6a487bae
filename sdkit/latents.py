"""The VAE's latent space: what latents are, and cheap tools to look at them.

Stable Diffusion's UNet never sees pixels. The VAE encoder E turns a (3, H, W) picture
into a (4, H/f, W/f) latent (f = 8 for SD, 4 for the kit's toy model), the latent is
multiplied by ``vae.config.scaling_factor`` so that it has roughly unit variance, the
diffusion runs there, and the decoder D turns the result back into pixels. Notebook 04
takes this apart. Encoding, decoding, ``vae_scale_factor`` and ``psnr`` are the ground's
(``sdkit.images``); the linear latent -> RGB preview is notebook 02's
(``sdkit.sampling.fit_latent_rgb_map`` / ``latents_to_rgb_preview``: a trajectory's
previews use it). This module keeps:

* ``compression_factor``: how many picture numbers one latent number stands for;
* ``show_channels``: the latent channels as images;
* ``slerp``: spherical interpolation (the right way to mix two noise latents);
* ``unet_flops``: the UNet's floating-point operations for one step at a given latent
  size, the kit's one FLOP counter (notebook 06 reuses it);
* ``brightness_correlations`` / ``check_brightness_channel``: notebook 04's exercise.

Left out: training the VAE (notebook 11), the KL term and the posterior's variance beyond
``sample=True``, tiled decoding of large images.
"""

from __future__ import annotations

import functools

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from . import checks, shapes
from .images import encode, to_tensor, vae_scale_factor


def compression_factor(image_shape, latent_shape) -> float:
    """How many numbers of the picture each latent number stands for.

    ``compression_factor((3, 512, 512), (4, 64, 64)) == 48`` (SD 1.5);
    ``compression_factor((3, 64, 64), (4, 16, 16)) == 12`` (the toy model).

    Introduced in notebooks/04_vae_latents.ipynb.
    """
    sizes = []
    for name, shape in (("image_shape", image_shape), ("latent_shape", latent_shape)):
        if not isinstance(shape, (tuple, list, torch.Size)) or len(shape) != 3:
            checks.fail(name, shape, "expected (channels, height, width)")
        for i, v in enumerate(shape):
            checks.check_int(f"{name}[{i}]", v, 1)
        sizes.append(int(np.prod(shape)))
    return sizes[0] / sizes[1]


# ------------------------------------------------------------------------------ pictures of latents


def show_channels(latents: torch.Tensor, title: str = ""):
    """The channels of one latent (C, h, w) or (1, C, h, w) side by side, one shared colour
    scale (blue negative, red positive); returns the matplotlib figure.

    Introduced in notebooks/04_vae_latents.ipynb.
    """
    if torch.is_tensor(latents) and latents.ndim == 4 and latents.shape[0] == 1:
        latents = latents[0]
    if not torch.is_tensor(latents) or latents.ndim != 3:
        checks.fail("latents", getattr(latents, "shape", latents), "expected one latent (C, h, w)")
    z = latents.detach().float().cpu()
    lim = float(z.abs().max()) or 1.0
    fig, axes = plt.subplots(1, len(z), figsize=(2.4 * len(z), 2.6))
    for i, ax in enumerate(np.atleast_1d(axes)):
        im = ax.imshow(z[i].numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax.set_title(f"channel {i}")
        ax.axis("off")
    fig.colorbar(im, ax=list(np.atleast_1d(axes)), shrink=0.8)
    if title:
        fig.suptitle(title)
    return fig


def slerp(a: torch.Tensor, b: torch.Tensor, w: float) -> torch.Tensor:
    """Spherical interpolation between two tensors of the same shape, ``w`` in [0, 1].

    Moves along the great circle between ``a`` and ``b`` (each flattened), so two equally
    long vectors give equally long mixtures. Falls back to straight (linear) interpolation
    when they point the same way.

    Introduced in notebooks/04_vae_latents.ipynb.
    """
    w = checks.check_float("w", w, 0.0, 1.0)
    if not torch.is_tensor(a) or not torch.is_tensor(b) or a.shape != b.shape:
        checks.fail("b", getattr(b, "shape", b), f"expected a tensor shaped like a "
                    f"{tuple(getattr(a, 'shape', ()))}")
    a64, b64 = a.double().flatten(), b.double().flatten()
    cos = torch.dot(a64, b64) / (a64.norm() * b64.norm())
    theta = torch.arccos(cos.clamp(-1, 1))
    if theta < 1e-4:
        return torch.lerp(a, b, w)
    out = (torch.sin((1 - w) * theta) * a64 + torch.sin(w * theta) * b64) / torch.sin(theta)
    return out.reshape(a.shape).to(a.dtype)


# ------------------------------------------------------------------------------ cost


def unet_flops(unet, latent_shape, text_shape) -> int:
    """Floating-point operations of one UNet call (one denoising step, batch 1), counted by
    ``torch.utils.flop_counter`` (matrix products and convolutions; a multiply-add is 2).

    ``latent_shape`` (C, h, w): the picture's size divided by the VAE's factor (read it
    with ``sdkit.images.vae_scale_factor``, never assume 8); ``text_shape`` (tokens, width)
    of the text vectors. The count is linear in the batch: a guided step (batch 2) costs
    twice this. Works on a UNet built on the ``meta`` device too (shapes only, no memory, no
    weights), which is how notebook 04 counts full-size SD without downloading it. The
    kit's one FLOP counter: notebook 06 uses it too.

    Introduced in notebooks/04_vae_latents.ipynb.
    """
    for name, shape, n in (("latent_shape", latent_shape, 3), ("text_shape", text_shape, 2)):
        if not isinstance(shape, (tuple, list, torch.Size)) or len(shape) != n:
            checks.fail(name, shape, f"expected a tuple of {n} ints")
        for i, v in enumerate(shape):
            checks.check_int(f"{name}[{i}]", v, 1)
    if not isinstance(unet, torch.nn.Module) or not hasattr(unet, "config"):
        checks.fail("unet", type(unet).__name__, "expected a UNet2DConditionModel, e.g. pipe.unet")
    p = next(unet.parameters())
    sample = torch.zeros(1, *latent_shape, device=p.device, dtype=p.dtype)
    text = torch.zeros(1, *text_shape, device=p.device, dtype=p.dtype)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        unet(sample, 999, text)
    return int(counter.get_total_flops())


# ------------------------------------------------------------------------------ exercise


def brightness_correlations(vae, n_images: int = 64, seed: int = 0) -> torch.Tensor:
    """Correlation of each latent channel with brightness (the mean of R, G, B averaged over
    the f x f pixels each latent pixel stands for), over ``n_images`` toy pictures: (C,).
    Cached per model and arguments, so the exercise checker answers at once after the first call.

    Introduced in notebooks/04_vae_latents.ipynb.
    """
    vae_scale_factor(vae)  # checks that it is a VAE
    n_images = checks.check_int("n_images", n_images, 2, 10_000)
    seed = checks.check_seed(seed)
    return _brightness_cached(vae, n_images, seed).clone()


@functools.lru_cache(maxsize=8)
def _brightness_cached(vae, n_images: int, seed: int) -> torch.Tensor:
    images = shapes.make_dataset(n_images, seed=seed)[0]  # (n, 64, 64, 3) uint8
    z = encode(vae, images).float().cpu()  # (n, C, h, w)
    bright = F.avg_pool2d(to_tensor(images).mean(1, keepdim=True), vae_scale_factor(vae))
    zc = z.permute(1, 0, 2, 3).reshape(z.shape[1], -1)  # (C, n*h*w)
    b = bright.reshape(1, -1)
    zc, b = zc - zc.mean(1, keepdim=True), b - b.mean()
    return (zc * b).sum(1) / (zc.norm(dim=1) * b.norm())


def check_brightness_channel(answer, vae) -> bool:
    """Checker for notebook 04's exercise: the index of the latent channel most correlated
    with brightness, positively or negatively (largest absolute correlation). Prints
    whether ``answer`` is right (with a hint if not) and returns True or False.

    Introduced in notebooks/04_vae_latents.ipynb.
    """
    corr = brightness_correlations(vae)
    expected = int(corr.abs().argmax())
    if answer is None:
        print("Not answered yet: set `answer` to a channel index (an int).")
        return False
    if isinstance(answer, torch.Tensor) and answer.numel() == 1:
        answer = answer.item()
    if isinstance(answer, bool) or not isinstance(answer, (int, np.integer)):
        print(f"answer={answer!r}: expected an int channel index.")
        return False
    if not 0 <= int(answer) < len(corr):
        print(f"answer={answer}: the latents have channels 0 to {len(corr) - 1}.")
        return False
    if int(answer) == expected:
        print(f"Right: channel {expected} (correlation {corr[expected]:+.2f} with brightness).")
        return True
    print(f"answer={answer} is not it (its correlation is {corr[int(answer)]:+.2f}). "
          f"Hint: correlate each channel with the image's brightness averaged down to the "
          f"latent grid, and compare absolute values.")
    return False
