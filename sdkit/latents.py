"""The VAE's latent space: pictures in and out of latents, and cheap tools to look at them.

Stable Diffusion's UNet never sees pixels. The VAE encoder E turns a (3, H, W) picture
into a (4, H/f, W/f) latent (f = 8 for SD, 4 for the kit's toy model), the latent is
multiplied by ``vae.config.scaling_factor`` so that it has roughly unit variance, the
diffusion runs there, and the decoder D turns the result back into pixels. Notebook 04
takes this apart; this module keeps what later notebooks reuse:

* ``encode`` / ``decode``: pictures <-> scaled latents, exactly as the pipeline does it;
* ``vae_scale_factor``, ``compression_factor``, ``psnr``;
* ``show_channels``: the latent channels as images;
* ``slerp``: spherical interpolation (the right way to mix two noise latents);
* ``fit_latent_rgb`` / ``latents_to_rgb_preview``: a fitted linear 4 -> 3 map that previews
  latents as colours without running the decoder (fitted once per model and kernel);
* ``unet_flops``: the UNet's floating-point operations for one step at a given size;
* ``check_brightness_channel``: the checker of notebook 04's exercise.

Left out: training the VAE (``sdkit.toy.train_vae``, notebook 11), the KL term and the
posterior's variance beyond ``sample=True``, tiled decoding of large images.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from . import checks
from .noising import to_tensor

# ------------------------------------------------------------------------------ encode / decode


def _check_vae(vae):
    if not all(hasattr(vae, a) for a in ("encode", "decode", "config")):
        checks.fail("vae", type(vae).__name__, "expected a diffusers AutoencoderKL, e.g. pipe.vae")
    return vae


def vae_scale_factor(vae) -> int:
    """How many pixels one latent pixel stands for along each side: 8 for SD, 4 for the toy.

    Same rule as diffusers' pipelines: ``2 ** (len(block_out_channels) - 1)``.

    Introduced in notebooks/04_vae_latents.ipynb.
    """
    return 2 ** (len(_check_vae(vae).config.block_out_channels) - 1)


@torch.no_grad()
def encode(vae, images, sample: bool = False, generator=None) -> torch.Tensor:
    """Pictures -> scaled latents (B, 4, H/f, W/f), what the UNet works on.

    ``images`` as for ``sdkit.noising.to_tensor`` (one picture, a list, or a uint8 batch);
    height and width must be multiples of the VAE's factor f (``vae_scale_factor``). The
    encoder gives a Gaussian per latent pixel: its mean by default, a sample from it with
    ``sample=True`` (as in training; draw with ``generator``). The result is multiplied by
    ``vae.config.scaling_factor``, as the pipelines do. Notebook 04 explains each part.

    Introduced in notebooks/01_forward_noising.ipynb.
    """
    _check_vae(vae)
    x = to_tensor(images)  # (B, 3, H, W) in [-1, 1]
    f = vae_scale_factor(vae)
    checks.check_size(x.shape[2], x.shape[3], multiple=f)
    x = x.to(vae.device, vae.dtype)
    dist = vae.encode(x).latent_dist
    z = dist.sample(generator) if sample else dist.mean  # (B, 4, H/f, W/f)
    return z * vae.config.scaling_factor


@torch.no_grad()
def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents (B, 4, h, w) -> pictures (B, 3, h*f, w*f) in [-1, 1], on the CPU, float32.

    Divides by ``vae.config.scaling_factor`` first, as the pipelines do; show the result
    with ``sdkit.noising.to_pil``.

    Introduced in notebooks/01_forward_noising.ipynb.
    """
    _check_vae(vae)
    c = vae.config.latent_channels
    if not torch.is_tensor(latents) or latents.ndim != 4 or latents.shape[1] != c:
        checks.fail("latents", tuple(latents.shape) if torch.is_tensor(latents) else latents,
                    f"expected a tensor (B, {c}, h, w) of scaled latents")
    z = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor
    return vae.decode(z).sample.float().cpu().clamp(-1, 1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of two picture tensors in [-1, 1], on the 0..1 scale:
    ``10 log10(1 / MSE)``. Higher is better: ~20 dB is visibly blurry, 30+ dB is close.

    Introduced in notebooks/04_vae_latents.ipynb.
    """
    for name, x in (("a", a), ("b", b)):
        if not torch.is_tensor(x):
            checks.fail(name, x, "expected a tensor in [-1, 1]")
    if a.shape != b.shape:
        checks.fail("b", f"tensor of shape {tuple(b.shape)}",
                    f"expected a's shape {tuple(a.shape)}")
    mse = ((a.float().cpu().clamp(-1, 1) - b.float().cpu().clamp(-1, 1)) / 2).pow(2).mean().item()
    return 10 * float(np.log10(1 / max(mse, 1e-12)))


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
    import matplotlib.pyplot as plt

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


# ----------------------------------------------------------------------------- latent -> RGB


def _toy_images(n: int, seed: int) -> np.ndarray:
    from . import shapes

    return shapes.make_dataset(n, seed=seed)[0]  # (n, 64, 64, 3) uint8


@functools.lru_cache(maxsize=8)
def _fit_cached(vae, n_images: int, seed: int, size: int) -> torch.Tensor:
    if size == 64:
        images = _toy_images(n_images, seed)
    else:  # other sizes (real SD's 512 px): the same shapes, drawn at 64 px and enlarged
        from PIL import Image

        images = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC))
                           for im in _toy_images(n_images, seed)])
    f = vae_scale_factor(vae)
    zs, xs = [], []
    for i in range(0, n_images, 64):
        z = encode(vae, images[i:i + 64]).float().cpu()  # (b, 4, h, w)
        x = F.avg_pool2d(to_tensor(images[i:i + 64]), f)  # (b, 3, h, w): pixels averaged down
        zs.append(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]))  # (b*h*w, 4)
        xs.append(x.permute(0, 2, 3, 1).reshape(-1, 3))  # (b*h*w, 3)
    return solve_latent_rgb(torch.cat(zs), torch.cat(xs))


def solve_latent_rgb(z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Least squares from latent pixels z (N, C) plus a bias to colours x (N, 3): (C + 1, 3).

    Introduced in notebooks/04_vae_latents.ipynb.
    """
    design = torch.cat([z.float(), torch.ones(len(z), 1)], dim=1).double()  # (N, C + 1)
    return torch.linalg.lstsq(design, x.double()).solution.float()  # (C + 1, 3)


def fit_latent_rgb(vae, n_images: int = 128, seed: int = 0, size: int = 64) -> torch.Tensor:
    """Fit a linear map from a latent pixel's 4 channels (plus a bias) to the RGB colour of
    the f x f pixels it stands for, by least squares on ``n_images`` toy pictures drawn at
    ``size`` px. Returns the weights (5, 3): rows 0-3 per channel, row 4 the bias.

    Cached per model and arguments (``functools.lru_cache``): fitted once per kernel.

    Introduced in notebooks/04_vae_latents.ipynb.
    """
    _check_vae(vae)
    n_images = checks.check_int("n_images", n_images, 8, 10_000)
    seed = checks.check_seed(seed)
    size = checks.check_int("size", size, 8, 2048)
    checks.check_size(size, size, multiple=vae_scale_factor(vae))
    return _fit_cached(vae, n_images, seed, size).clone()


def latents_to_rgb_preview(latents: torch.Tensor, weights: torch.Tensor,
                           upsample: int = 1) -> torch.Tensor:
    """A cheap colour preview of latents (B, 4, h, w): each latent pixel's colour from the
    linear map ``weights`` (5, 3) of ``fit_latent_rgb``; no decoder involved. Returns
    (B, 3, h*upsample, w*upsample) in [-1, 1] (bilinear enlargement when ``upsample`` > 1).

    Introduced in notebooks/04_vae_latents.ipynb.
    """
    if not torch.is_tensor(weights) or weights.ndim != 2 or weights.shape[1] != 3:
        checks.fail("weights", getattr(weights, "shape", weights),
                    "expected a tensor (channels + 1, 3) from fit_latent_rgb")
    c = weights.shape[0] - 1
    if not torch.is_tensor(latents) or latents.ndim != 4 or latents.shape[1] != c:
        checks.fail("latents", getattr(latents, "shape", latents),
                    f"expected a tensor (B, {c}, h, w)")
    upsample = checks.check_int("upsample", upsample, 1, 64)
    z = latents.detach().float().cpu()
    w = weights.float().cpu()
    rgb = torch.einsum("bchw,cd->bdhw", z, w[:c]) + w[c].reshape(1, 3, 1, 1)  # (B, 3, h, w)
    if upsample > 1:
        rgb = F.interpolate(rgb, scale_factor=upsample, mode="bilinear", align_corners=False)
    return rgb.clamp(-1, 1)


# ------------------------------------------------------------------------------ cost


def unet_flops(unet, latent_shape, text_shape) -> int:
    """Floating-point operations of one UNet call (one denoising step, batch 1), counted by
    ``torch.utils.flop_counter`` (matrix products and convolutions; a multiply-add is 2).

    ``latent_shape`` (C, h, w); ``text_shape`` (tokens, width) of the text vectors. Works
    on a UNet built on the ``meta`` device too (shapes only, no memory, no weights), which
    is how notebook 04 counts full-size SD without downloading it.

    Introduced in notebooks/04_vae_latents.ipynb.
    """
    from torch.utils.flop_counter import FlopCounterMode

    for name, shape, n in (("latent_shape", latent_shape, 3), ("text_shape", text_shape, 2)):
        if not isinstance(shape, (tuple, list, torch.Size)) or len(shape) != n:
            checks.fail(name, shape, f"expected a tuple of {n} ints")
        for i, v in enumerate(shape):
            checks.check_int(f"{name}[{i}]", v, 1)
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
    _check_vae(vae)
    n_images = checks.check_int("n_images", n_images, 2, 10_000)
    seed = checks.check_seed(seed)
    return _brightness_cached(vae, n_images, seed).clone()


@functools.lru_cache(maxsize=8)
def _brightness_cached(vae, n_images: int, seed: int) -> torch.Tensor:
    images = _toy_images(n_images, seed)
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
