"""The VAE's latent space: what latents are, and cheap tools to look at them.

Stable Diffusion's UNet never sees pixels. The VAE encoder E turns a (3, H, W) picture
into a (4, H/f, W/f) latent (f = 8 for SD, 4 for the kit's toy model), the latent is
multiplied by ``vae.config.scaling_factor`` so that it has roughly unit variance, the
diffusion runs there, and the decoder D turns the result back into pixels. Notebook 05
takes this apart. Encoding, decoding, ``vae_scale_factor`` and ``psnr`` are the ground's
(``sdkit.images``); the linear latent -> RGB preview is notebook 02's
(``sdkit.sampling.fit_latent_rgb_map`` / ``latents_to_rgb_preview``: a trajectory's
previews use it). This module keeps:

* ``compression_factor``: how many picture numbers one latent number stands for;
* ``show_channels``: the latent channels as images;
* ``slerp``: spherical interpolation (the right way to mix two noise latents);
* ``unet_flops``: the UNet's floating-point operations for one step at a given latent
  size, the kit's one FLOP counter (notebook 07 reuses it);
* ``brightness_correlations`` / ``check_brightness_correlations``: notebook 05's exercise
  (which latent channel carries brightness).

Left out: training the VAE (notebook 12), the KL term and the posterior's variance beyond
``sample=True`` (which notebook 05 compares with the mean), tiled decoding of large images.
"""

from __future__ import annotations

import functools

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from . import checks, figures, shapes
from .device import check_memory
from .images import encode, to_tensor, unet_memory_bytes, vae_memory_bytes, vae_scale_factor


def compression_factor(image_shape, latent_shape) -> float:
    """How many numbers of the picture each latent number stands for.

    ``compression_factor((3, 512, 512), (4, 64, 64)) == 48`` (SD 1.5);
    ``compression_factor((3, 64, 64), (4, 16, 16)) == 12`` (the toy model).

    Introduced in notebooks/05_vae_latents.ipynb.
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


@figures.styled
def show_channels(latents: torch.Tensor, title: str = ""):
    """The channels of one latent (C, h, w) or (1, C, h, w) side by side, one shared colour
    scale (blue negative, red positive); returns the matplotlib figure.

    Introduced in notebooks/05_vae_latents.ipynb.
    """
    if torch.is_tensor(latents) and latents.ndim == 4 and latents.shape[0] == 1:
        latents = latents[0]
    if not torch.is_tensor(latents) or latents.ndim != 3:
        checks.fail("latents", getattr(latents, "shape", latents), "expected one latent (C, h, w)")
    z = latents.detach().float().cpu()
    lim = float(z.abs().max()) or 1.0
    fig, axes = plt.subplots(1, len(z), figsize=(min(2.4 * len(z), figures.MAX_WIDTH_IN), 2.8))
    for i, ax in enumerate(np.atleast_1d(axes)):
        im = ax.imshow(z[i].numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
        ax.set(title=f"channel {i}", xticks=[], yticks=[])
    fig.colorbar(im, ax=list(np.atleast_1d(axes)), shrink=0.8)
    if title:
        fig.suptitle(title)
    return fig


def slerp(a: torch.Tensor, b: torch.Tensor, w: float) -> torch.Tensor:
    """Spherical interpolation between two tensors of the same shape, ``w`` in [0, 1].

    Moves along the great circle between ``a`` and ``b`` (each flattened), so two equally
    long vectors give equally long mixtures. Falls back to straight (linear) interpolation
    when they point the same way. A zero (or non-finite) tensor has no direction, so there is
    no great circle: it is refused (``torch.lerp(a, b, w)`` is the straight line instead).

    Introduced in notebooks/05_vae_latents.ipynb.
    """
    w = checks.check_float("w", w, 0.0, 1.0)
    if not torch.is_tensor(a) or not torch.is_tensor(b) or a.shape != b.shape:
        checks.fail("b", getattr(b, "shape", b), f"expected a tensor shaped like a "
                    f"{tuple(getattr(a, 'shape', ()))}")
    a64, b64 = a.double().flatten(), b.double().flatten()
    for name, v in (("a", a64), ("b", b64)):
        if not torch.isfinite(v).all() or v.norm() == 0:
            checks.fail(name, "a zero tensor" if torch.isfinite(v).all() else "a tensor with "
                        "nan or inf", "expected a finite tensor with a direction: slerp moves "
                        "along the great circle between two directions (for a straight line "
                        "use torch.lerp(a, b, w))")
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
    weights), which is how notebook 05 counts full-size SD without downloading it. The
    kit's one FLOP counter: notebook 07 uses it too.

    Introduced in notebooks/05_vae_latents.ipynb.
    """
    for name, shape, n in (("latent_shape", latent_shape, 3), ("text_shape", text_shape, 2)):
        if not isinstance(shape, (tuple, list, torch.Size)) or len(shape) != n:
            checks.fail(name, shape, f"expected a tuple of {n} ints")
        for i, v in enumerate(shape):
            checks.check_int(f"{name}[{i}]", v, 1)
    if not isinstance(unet, torch.nn.Module) or not hasattr(unet, "config"):
        checks.fail("unet", type(unet).__name__, "expected a UNet2DConditionModel, e.g. pipe.unet")
    p = next(unet.parameters())
    if p.device.type != "meta":  # on the meta device nothing is allocated
        check_memory("latent_shape", tuple(latent_shape), unet_memory_bytes(
            unet.config, 1, latent_shape[1], latent_shape[2], p.element_size()),
            "one UNet call at this latent size (count on the meta device for bigger ones)",
            device=p.device)
    sample = torch.zeros(1, *latent_shape, device=p.device, dtype=p.dtype)
    text = torch.zeros(1, *text_shape, device=p.device, dtype=p.dtype)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        unet(sample, 999, text)
    return int(counter.get_total_flops())


# ------------------------------------------------------------------------------ exercise


def brightness_correlations(vae, n_images: int = 64, seed: int = 0) -> torch.Tensor:
    """Correlation of each latent channel with brightness (the mean of R, G, B averaged over
    the f x f pixels each latent pixel stands for), over the latent pixels of ``n_images``
    toy pictures (``shapes.make_dataset(n_images, seed=seed)``, 64 px): (C,).
    Cached per model and arguments, so the exercise checker answers at once after the first call.

    Introduced in notebooks/05_vae_latents.ipynb.
    """
    vae_scale_factor(vae)  # checks that it is a VAE
    n_images = checks.check_int("n_images", n_images, 2, 10_000)
    seed = checks.check_seed(seed)
    check_memory("n_images", n_images, vae_memory_bytes(vae.config, n_images, 64, 64) +
                 n_images * 64 * 64 * 3 * 4 * 4, f"encoding {n_images} pictures of 64x64 at once",
                 device=vae.device)
    return _brightness_cached(vae, n_images, seed)[0].clone()


def _correlations(z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of each channel of z (n, C, h, w) with target (n, h, w): (C,)."""
    zc = z.permute(1, 0, 2, 3).reshape(z.shape[1], -1).double()  # (C, n*h*w)
    b = target.reshape(1, -1).double()
    zc, b = zc - zc.mean(1, keepdim=True), b - b.mean()
    return ((zc * b).sum(1) / (zc.norm(dim=1) * b.norm())).float()


@functools.lru_cache(maxsize=8)
def _brightness_cached(vae, n_images: int, seed: int) -> tuple[torch.Tensor, dict]:
    """The correlations, and what the usual mistakes give instead: name -> (C,) tensor."""
    pictures = shapes.make_dataset(n_images, seed=seed)[0]  # (n, 64, 64, 3) uint8
    z = encode(vae, pictures).float().cpu()  # (n, C, h, w)
    f = vae_scale_factor(vae)
    x = to_tensor(pictures)  # (n, 3, 64, 64) in [-1, 1]
    bright = F.avg_pool2d(x.mean(1, keepdim=True), f)[:, 0]  # (n, h, w)
    right = _correlations(z, bright)
    zc = z - z.mean((0, 2, 3), keepdim=True)
    wrong = {  # what a usual mistake gives -> what to say about it
        "These are absolute values: keep the sign, it says whether the channel goes up or down "
        "with brightness.": right.abs(),
        "This looks like the covariance: a correlation is the covariance divided by both "
        "standard deviations.": (zc * (bright - bright.mean())[:, None]).mean((0, 2, 3)),
        "This looks like one pixel of each f x f patch (a stride): average the whole patch "
        "(F.avg_pool2d).": _correlations(z, x.mean(1)[:, ::f, ::f]),
        "This looks like the red channel only: brightness is the mean of R, G and B.":
            _correlations(z, F.avg_pool2d(x[:, :1], f)[:, 0]),
        "This looks like the average of 64 per-picture correlations: correlate over all "
        "latent pixels of all pictures at once.":
            torch.stack([_correlations(z[i:i + 1], bright[i:i + 1]) for i in range(len(z))])
            .nanmean(0),
    }
    return right, wrong


def _numbers(t: torch.Tensor) -> str:
    return "[" + ", ".join(f"{v:+.3f}" for v in t.tolist()) + "]"


def check_brightness_correlations(answer, vae) -> bool:
    """Checker for notebook 05's exercise: the correlation of each latent channel with
    brightness over the 64 pictures ``shapes.make_dataset(64, seed=0)`` (``answer``: C numbers,
    a tensor, list or array, in channel order; see ``brightness_correlations``). Prints whether
    it is right, with a hint about the usual mistakes if not, and which channel carries
    brightness; returns True or False and never raises on an answer.

    Introduced in notebooks/05_vae_latents.ipynb.
    """
    right, wrong = _brightness_cached(vae, 64, 0)
    if answer is None:
        print("not solved yet: set `brightness_corr` to one correlation per latent channel.")
        return False
    if torch.is_tensor(answer):
        answer = answer.detach().cpu().numpy()
    try:
        got = torch.as_tensor(np.asarray(answer, dtype=np.float64)).float().flatten()
    except (TypeError, ValueError, RuntimeError):
        print(f"brightness_corr = {answer!r}: expected {len(right)} numbers (a tensor or a list).")
        return False
    if got.shape != right.shape:
        print(f"Expected {len(right)} numbers, one per latent channel; got {got.numel()}.")
        return False
    if torch.allclose(got, right, atol=2e-3):
        c = int(right.abs().argmax())
        print(f"Right: {_numbers(right)}. Channel {c} carries brightness (correlation "
              f"{right[c]:+.2f}: the {'lighter' if right[c] > 0 else 'darker'} a patch, the "
              f"higher channel {c}).")
        return True
    hint = next((why for why, values in wrong.items()
                 if torch.allclose(got, values, atol=2e-3)), None)
    if hint is None and (got.abs() > 1 + 1e-6).any():
        hint = "A correlation lies in [-1, 1]: divide the covariance by both standard deviations."
    print(f"Not yet: {_numbers(got)} is off by up to "
          f"{(got - right).abs().max():.3f}. "
          + (hint or "Hint: encode the 64 pictures with images.encode, average the brightness "
             "over each f x f patch (F.avg_pool2d) and correlate each channel with it over all "
             "latent pixels (torch.corrcoef)."))
    return False
