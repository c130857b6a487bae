"""Pictures in and out: picture <-> tensor, and picture <-> latents through the VAE.

The one place for each conversion every notebook needs:

- ``to_tensor``: pictures (PIL, uint8 or float arrays) -> (B, 3, H, W) float32 in [-1, 1],
  the numbers (and memory layout) of diffusers' ``VaeImageProcessor.preprocess``;
- ``to_numpy`` / ``to_uint8`` / ``to_pil``: (B, 3, H, W) in [-1, 1] -> pictures, rounded as
  diffusers' ``VaeImageProcessor.postprocess`` rounds, so a pipeline's output and ours agree
  bit for bit;
- ``encode`` / ``decode``: pictures <-> *scaled* latents (B, 4, H/f, W/f), the space the UNet
  works in (notebook 04 takes the VAE apart);
- ``psnr``: how close two pictures are, in dB;
- ``hstack`` and ``show``: a strip of pictures, and a labelled row of them in matplotlib.

A function here whose docstring names no notebook serves the other sdkit modules only;
no notebook calls it directly.

Left out: resizing and cropping (sizes are checked, never silently changed), batches of
pictures of different sizes, and colour spaces other than RGB.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image

from . import checks

# ------------------------------------------------------------------------------ picture <-> tensor


def to_tensor(images, name: str = "images", multiple: int = 1) -> torch.Tensor:
    """Pictures -> float32 tensor (B, 3, H, W) in [-1, 1], the range the VAE and the UNet use.

    ``images``: one picture or a list of them (PIL: RGBA is composited on white, greyscale
    repeated into RGB, as ``checks.check_image`` documents; uint8 (H, W, 3); float (H, W, 3)
    in [0, 1]), or a uint8 batch (B, H, W, 3). All must share one size, and height and width
    must be multiples of ``multiple`` (the VAE's factor when the tensor is to be encoded);
    nothing is resized. Same numbers and the same channels-last strides as diffusers'
    ``VaeImageProcessor.preprocess``, so that the VAE's convolutions sum in the same order.

    Introduced in notebooks/01_forward_noising.ipynb.
    """
    multiple = checks.check_int("multiple", multiple, 1, 64)
    if isinstance(images, np.ndarray) and images.ndim == 4:
        images = list(images)
    elif not isinstance(images, (list, tuple)):
        images = [images]
    if not images:
        checks.fail(name, images, "expected at least one picture")
    arrays = [checks.check_image(im, name=name if len(images) == 1 else f"{name}[{i}]")
              for i, im in enumerate(images)]  # each (H, W, 3) float32 in [0, 1]
    h, w = arrays[0].shape[:2]
    for i, a in enumerate(arrays):
        if a.shape[:2] != (h, w):
            checks.fail(f"{name}[{i}]", f"picture of size {a.shape[0]}x{a.shape[1]}",
                        f"expected every picture to be {h}x{w} like {name}[0]")
    for side, v in (("height", h), ("width", w)):
        if v % multiple:
            checks.fail(name, f"picture of size {h}x{w}",
                        f"expected {side} a multiple of {multiple} (the VAE shrinks pictures "
                        f"by {multiple}); crop or pad it to {v - v % multiple or multiple} first")
    batch = np.stack(arrays)  # (B, H, W, 3)
    # a (B, 3, H, W) view of the (B, H, W, 3) array, as diffusers' numpy_to_pt makes it
    x = torch.from_numpy(batch.transpose(0, 3, 1, 2))
    return 2.0 * x - 1.0


def _check_pictures(x, name: str = "x") -> torch.Tensor:
    if not torch.is_tensor(x) or x.ndim not in (3, 4) or x.shape[-3] != 3:
        shown = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        checks.fail(name, shown, "expected a tensor (3, H, W) or (B, 3, H, W) in [-1, 1]")
    return x


def to_numpy(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) (or (3, H, W)) in [-1, 1] -> float32 (B, H, W, 3) in [0, 1].

    Values outside [-1, 1] (noisy samples have them) are clipped.
    """
    x = _check_pictures(x)
    batch = x[None] if x.ndim == 3 else x
    # diffusers' VaeImageProcessor.denormalize, then pt_to_numpy
    return (batch.detach() * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3), rounded as the pipelines' output is.

    Introduced in notebooks/09_fine_tuning.ipynb.
    """
    return (to_numpy(x) * 255).round().astype(np.uint8)


def to_pil(x: torch.Tensor, scale: int = 1):
    """A tensor in [-1, 1], (3, H, W) or (B, 3, H, W), -> a PIL image or a list of them.

    Values outside [-1, 1] are clipped for display. ``scale`` enlarges each picture with
    nearest-neighbour pixels, so small images stay crisp.

    Introduced in notebooks/01_forward_noising.ipynb.
    """
    single = _check_pictures(x).ndim == 3
    scale = checks.check_int("scale", scale, 1, 64)
    out = []
    for im in to_uint8(x):  # (H, W, 3)
        pil = Image.fromarray(im)
        if scale > 1:
            pil = pil.resize((pil.width * scale, pil.height * scale), Image.Resampling.NEAREST)
        out.append(pil)
    return out[0] if single else out


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of two picture tensors in [-1, 1], on the 0..1 scale:
    ``10 log10(1 / MSE)``. Higher is better: ~20 dB is visibly blurry, 30+ dB is close.
    Identical pictures give 120 dB (the MSE is floored at 1e-12).

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


# ------------------------------------------------------------------------------ through the VAE


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

    ``images``: anything ``to_tensor`` takes, or a tensor (B, 3, H, W) in [-1, 1]; height
    and width must be multiples of the VAE's factor f (``vae_scale_factor``). The encoder
    gives a Gaussian per latent pixel: its mean by default, a sample from it with
    ``sample=True`` (as in training and in diffusers' img2img; draw with ``generator``). The
    result is multiplied by ``vae.config.scaling_factor``, as the pipelines do.

    The VAE sees a tensor in the memory layout it is given. ``to_tensor``'s channels-last
    view is diffusers' own, so one picture gives the img2img pipeline's latents bit for bit;
    pass ``x.contiguous()`` where latents must not depend on the batch size (training sets).

    Introduced in notebooks/01_forward_noising.ipynb.
    """
    f = vae_scale_factor(vae)
    checks.check_bool("sample", sample)
    if torch.is_tensor(images):
        x = _check_pictures(images, "images")
        x = x[None] if x.ndim == 3 else x
        checks.check_size(x.shape[2], x.shape[3], multiple=f)
    else:
        x = to_tensor(images, multiple=f)  # (B, 3, H, W) in [-1, 1]
    dist = vae.encode(x.to(vae.device, vae.dtype)).latent_dist
    z = dist.sample(generator) if sample else dist.mean  # (B, 4, H/f, W/f)
    return z * vae.config.scaling_factor


@torch.no_grad()
def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents (B, 4, h, w) -> pictures (B, 3, h*f, w*f) in [-1, 1], on the CPU, float32.

    Divides by ``vae.config.scaling_factor`` first, as the pipelines do; show the result
    with ``to_pil``.

    Introduced in notebooks/01_forward_noising.ipynb.
    """
    _check_vae(vae)
    c = vae.config.latent_channels
    if not torch.is_tensor(latents) or latents.ndim != 4 or latents.shape[1] != c:
        checks.fail("latents", tuple(latents.shape) if torch.is_tensor(latents) else latents,
                    f"expected a tensor (B, {c}, h, w) of scaled latents")
    z = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor
    return vae.decode(z).sample.float().cpu().clamp(-1, 1)


def decode_to_pil(vae, latents: torch.Tensor, batch_size: int = 16) -> list:
    """PIL images of scaled latents (N, C, h, w), decoded ``batch_size`` at a time and
    rounded like the pipeline's output.

    Introduced in notebooks/02_reverse_denoising.ipynb.
    """
    batch_size = checks.check_int("batch_size", batch_size, 1, 256)
    out = []
    for i in range(0, latents.shape[0] if torch.is_tensor(latents) else 1, batch_size):
        out += to_pil(decode(vae, latents[i:i + batch_size]))
    return out


# ------------------------------------------------------------------------------ showing


def hstack(images, gap: int = 2, thumb: int | None = None):
    """Pictures side by side on a white background (one PIL strip), each resized to
    ``thumb`` pixels (nearest neighbour) when given.

    Introduced in notebooks/02_reverse_denoising.ipynb.
    """
    images = [im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im))
              for im in checks.check_list("images", images)]
    gap = checks.check_int("gap", gap, 0, 64)
    if thumb is not None:
        thumb = checks.check_int("thumb", thumb, 8, 1024)
        images = [im.resize((thumb, thumb), Image.Resampling.NEAREST) for im in images]
    w = sum(im.size[0] for im in images) + gap * (len(images) - 1)
    h = max(im.size[1] for im in images)
    out = Image.new("RGB", (w, h), (255, 255, 255))
    x = 0
    for im in images:
        out.paste(im.convert("RGB"), (x, 0))
        x += im.size[0] + gap
    return out


def show(images, titles=None, scale: float = 1.6, suptitle: str | None = None):
    """Show pictures in a row with titles (matplotlib, ``plt.show()``).

    Introduced in notebooks/07_image_to_image.ipynb.
    """
    images = checks.check_list("images", images)
    titles = list(titles) if titles is not None else [""] * len(images)
    if len(titles) != len(images):
        checks.fail("titles", titles, f"expected {len(images)} titles, one per picture")
    scale = checks.check_float("scale", scale, 0.5, 10.0)
    arrs = [np.asarray(im) for im in images]
    widths = [a.shape[1] / a.shape[0] for a in arrs]
    fig, axes = plt.subplots(1, len(arrs), figsize=(scale * sum(widths), scale * 1.25),
                             gridspec_kw={"width_ratios": widths}, squeeze=False)
    for ax, a, t in zip(axes[0], arrs, titles):
        ax.imshow(a, interpolation="nearest")
        ax.set_title(t, fontsize=9)
        ax.axis("off")
    if suptitle:
        fig.suptitle(suptitle, fontsize=11)
    fig.tight_layout()
    plt.show()
