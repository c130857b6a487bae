"""Pictures in and out: picture <-> tensor, and picture <-> latents through the VAE.

The one place for each conversion every notebook needs:

- ``to_tensor``: pictures (PIL, uint8 or float arrays) -> (B, 3, H, W) float32 in [-1, 1],
  the numbers (and memory layout) of diffusers' ``VaeImageProcessor.preprocess``;
- ``to_numpy`` / ``to_uint8`` / ``to_pil``: (B, 3, H, W) in [-1, 1] -> pictures, rounded as
  diffusers' ``VaeImageProcessor.postprocess`` rounds, so a pipeline's output and ours agree
  bit for bit;
- ``encode`` / ``decode``: pictures <-> *scaled* latents (B, 4, H/f, W/f), the space the UNet
  works in (notebook 05 takes the VAE apart);
- ``psnr``: how close two pictures are, in dB;
- ``fit_latent_rgb_map`` / ``latents_to_rgb_preview``: a cheap linear latent -> RGB preview
  (notebook 05 explains it; ``sdkit.sampling`` re-exports them);
- ``make_generators`` / ``initial_latents``: seeded CPU generators and the starting noise x_T
  (re-exported by ``sdkit.pipeline``, where the notebooks meet them);
- ``hstack`` and ``show``: a strip of pictures, and a labelled row of them in matplotlib;
- memory: ``unet_memory_bytes``, ``vae_memory_bytes`` and ``check_generation_memory``
  estimate what a call needs from its arguments and the model's configs, before anything is
  allocated, and refuse what is over ``sdkit.device.memory_limit`` (half of the memory
  available now; raise it with ``SDKIT_MEMORY_LIMIT=32GiB`` on a bigger machine).

A function here whose docstring names no notebook serves the other sdkit modules only;
no notebook calls it directly.

Left out: resizing and cropping (sizes are checked, never silently changed), batches of
pictures of different sizes, and colour spaces other than RGB.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import checks
from .device import check_memory

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
    sizes = [picture_size(im) for im in images]
    need = sum(h * w for h, w in sizes if h) * 3 * 4 * 3  # float32 copies: [0, 1], stack, [-1, 1]
    check_memory(name, f"{len(images)} picture(s) of {sizes[0][0]}x{sizes[0][1]}", need,
                 "the float32 tensor of these pictures", device="cpu")
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


def picture_size(image) -> tuple[int | None, int | None]:
    """(H, W) of a picture (PIL or array) read without converting it; (None, None) when it is
    neither (``checks.check_image`` then says what is wrong)."""
    if isinstance(image, Image.Image):
        return image.size[1], image.size[0]
    if isinstance(image, np.ndarray) and image.ndim >= 2:
        return int(image.shape[0]), int(image.shape[1])
    return None, None


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

    Introduced in notebooks/10_fine_tuning.ipynb.
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
    n = 1 if single else x.shape[0]
    check_memory("scale", scale, n * x.shape[-2] * x.shape[-1] * 3 * (scale**2 + 8),
                 f"{n} picture(s) of {x.shape[-2]}x{x.shape[-1]} enlarged {scale} times",
                 device="cpu")
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

    Introduced in notebooks/05_vae_latents.ipynb.
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

    Introduced in notebooks/05_vae_latents.ipynb.
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
    check_memory("images", f"{x.shape[0]} picture(s) of {x.shape[2]}x{x.shape[3]}",
                 vae_memory_bytes(vae.config, x.shape[0], x.shape[2], x.shape[3],
                                  _element_size(vae.dtype)),
                 "the VAE encoder at full size", device=vae.device)
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
    f = vae_scale_factor(vae)
    b, _, h, w = latents.shape
    check_memory("latents", f"latents of shape {tuple(latents.shape)}",
                 vae_memory_bytes(vae.config, b, h * f, w * f, _element_size(vae.dtype)),
                 f"the VAE decoder at {h * f}x{w * f} px", device=vae.device)
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


# ------------------------------------------------------------------------------ latent -> RGB


def fit_latent_rgb_map(latents: torch.Tensor, pictures: torch.Tensor) -> torch.Tensor:
    """A linear map from a latent pixel's C channels (plus a bias) to the mean colour of the
    f x f picture pixels it stands for, fitted by least squares: weights (C + 1, 3), rows
    0..C-1 per channel, row C the bias.

    ``latents`` (B, C, h, w); ``pictures`` (B, 3, h*f, w*f) in [-1, 1], the same pictures
    (e.g. ``sdkit.images.to_tensor`` of the decoded images), average-pooled to (h, w).

    Introduced in notebooks/05_vae_latents.ipynb.
    """
    if not torch.is_tensor(latents) or latents.ndim != 4:
        checks.fail("latents", getattr(latents, "shape", latents), "expected a tensor (B, C, h, w)")
    b, c, h, w = latents.shape
    if (not torch.is_tensor(pictures) or pictures.shape[:2] != (b, 3)
            or pictures.shape[2] % h or pictures.shape[3] % w
            or pictures.shape[2] // h != pictures.shape[3] // w):
        checks.fail("pictures", getattr(pictures, "shape", pictures),
                    f"expected a tensor ({b}, 3, {h}*f, {w}*f) in [-1, 1]")
    check_memory("latents", tuple(latents.shape), b * h * w * (c + 4) * 8 * 4 + pictures.numel()
                 * 4, f"the least-squares fit over {b * h * w:,} latent pixels", device="cpu")
    x = F.avg_pool2d(pictures.float().cpu(), pictures.shape[2] // h)  # (B, 3, h, w)
    z = latents.detach().float().cpu().permute(0, 2, 3, 1).reshape(-1, c)  # (B*h*w, C)
    design = torch.cat([z, torch.ones(len(z), 1)], dim=1).double()  # (B*h*w, C + 1)
    rgb = x.permute(0, 2, 3, 1).reshape(-1, 3).double()  # (B*h*w, 3)
    return torch.linalg.lstsq(design, rgb).solution.float()  # (C + 1, 3)


def latents_to_rgb_preview(latents: torch.Tensor, weights: torch.Tensor,
                           upsample: int = 1) -> torch.Tensor:
    """A cheap colour preview of latents (B, C, h, w): each latent pixel's colour from the
    linear map ``weights`` (C + 1, 3) of ``fit_latent_rgb_map``; no decoder involved. Returns
    (B, 3, h*upsample, w*upsample) in [-1, 1] (bilinear enlargement when ``upsample`` > 1).

    Introduced in notebooks/05_vae_latents.ipynb.
    """
    if not torch.is_tensor(weights) or weights.ndim != 2 or weights.shape[1] != 3:
        checks.fail("weights", getattr(weights, "shape", weights),
                    "expected a tensor (channels + 1, 3) from fit_latent_rgb_map")
    c = weights.shape[0] - 1
    if not torch.is_tensor(latents) or latents.ndim != 4 or latents.shape[1] != c:
        checks.fail("latents", getattr(latents, "shape", latents),
                    f"expected a tensor (B, {c}, h, w)")
    upsample = checks.check_int("upsample", upsample, 1, 64)
    b, _, h, w = latents.shape
    check_memory("upsample", upsample, b * 3 * h * w * (upsample**2 * 2 + c) * 4,
                 f"{b} previews of {h * upsample}x{w * upsample}", device="cpu")
    z = latents.detach().float().cpu()
    w = weights.float().cpu()
    rgb = torch.einsum("bchw,cd->bdhw", z, w[:c]) + w[c].reshape(1, 3, 1, 1)  # (B, 3, h, w)
    if upsample > 1:
        rgb = F.interpolate(rgb, scale_factor=upsample, mode="bilinear", align_corners=False)
    return rgb.clamp(-1, 1)


# ------------------------------------------------------------------------------ starting noise

MAX_BATCH = 64  # images per pipeline call; bigger sets are generated in several batches


def make_generators(seeds):
    """One CPU ``torch.Generator`` for an int seed, a list of them for a list of seeds.

    On the CPU, so that the same seed gives the same starting noise on every device.

    Introduced in notebooks/02_reverse_denoising.ipynb.
    """
    if isinstance(seeds, (list, tuple)):
        return [torch.Generator("cpu").manual_seed(checks.check_seed(s, "seeds"))
                for s in checks.check_list("seeds", seeds)]
    return torch.Generator("cpu").manual_seed(checks.check_seed(seeds))


def initial_latents(pipe, generator, batch_size: int = 1, height: int | None = None,
                    width: int | None = None, dtype=None) -> torch.Tensor:
    """The starting noise x_T, (B, C, h, w), drawn on the CPU and moved to the UNet's device.

    ``generator``: one CPU ``torch.Generator`` draws the whole batch (like
    ``pipe(..., generator=g)``); a list gives one generator per image (like
    ``pipe(..., generator=[g1, g2, ...])``); an int or a list of ints is a shortcut that
    makes those generators from seeds. Not yet multiplied by ``scheduler.init_noise_sigma``.

    Introduced in notebooks/02_reverse_denoising.ipynb.
    """
    batch_size = checks.check_int("batch_size", batch_size, 1, MAX_BATCH)
    f = pipe.vae_scale_factor
    side = pipe.unet.config.sample_size * f
    height, width = checks.check_size(side if height is None else height,
                                      side if width is None else width, multiple=f)
    shape = (batch_size, pipe.unet.config.in_channels, height // f, width // f)
    dtype = dtype or pipe.unet.dtype
    if isinstance(generator, int) or (isinstance(generator, (list, tuple))
                                      and all(isinstance(g, int) for g in generator)):
        generator = make_generators(generator)
    if isinstance(generator, (list, tuple)) and len(generator) == 1:
        generator = generator[0]
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch_size:
            checks.fail("generator", generator,
                        f"expected one generator per image ({batch_size}) or a single one")
        noise = torch.cat([torch.randn((1, *shape[1:]), generator=g, dtype=dtype)
                           for g in generator])
    elif isinstance(generator, torch.Generator):
        noise = torch.randn(shape, generator=generator, dtype=dtype)
    else:
        checks.fail("generator", generator, "expected a CPU torch.Generator, a list of them, "
                                            "a seed or a list of seeds")
    return noise.to(pipe.unet.device)


# ------------------------------------------------------------------------------ showing


def hstack(images, gap: int = 2, thumb: int | None = None):
    """Pictures side by side on a white background (one PIL strip), each resized to
    ``thumb`` pixels (nearest neighbour) when given. For a notebook's figures use
    ``sdkit.figures.image_grid`` (borders, labels, readable sizes); this strip serves the
    widgets, which show PNG bytes.
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


def show(images, titles=None, scale: float = 2.0, suptitle: str | None = None):
    """Show pictures in a row with titles (matplotlib, ``plt.show()``).

    Introduced in notebooks/08_image_to_image.ipynb.
    """
    images = checks.check_list("images", images)
    titles = list(titles) if titles is not None else [""] * len(images)
    if len(titles) != len(images):
        checks.fail("titles", titles, f"expected {len(images)} titles, one per picture")
    scale = checks.check_float("scale", scale, 0.5, 10.0)
    arrs = [np.asarray(im) for im in images]
    widths = [a.shape[1] / a.shape[0] for a in arrs]
    # readable at 100% zoom (sdkit.figures' rules; this ground module sits below it): at most
    # 10 inches wide at 100 dpi, text of 12 pt, a border round each picture
    k = min(scale, 10.0 / sum(widths))
    fig, axes = plt.subplots(1, len(arrs), figsize=(k * sum(widths), k * 1.25 + 0.6), dpi=100,
                             gridspec_kw={"width_ratios": widths}, squeeze=False,
                             layout="constrained")
    for ax, a, t in zip(axes[0], arrs, titles):
        ax.imshow(a, interpolation="nearest")
        ax.set_title(t, fontsize=12)
        ax.set(xticks=[], yticks=[])
    if suptitle:
        fig.suptitle(suptitle, fontsize=13)
    plt.show()


# ------------------------------------------------------------------------------ memory


def _config_dict(config) -> dict:
    """A model config (a dict, a diffusers FrozenDict or an object with attributes) as a dict."""
    return dict(config) if hasattr(config, "keys") else dict(vars(config))


def _element_size(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def unet_memory_bytes(unet_config, batch: int, h: int, w: int, element_size: int = 4) -> int:
    """About how many bytes one UNet call on latents (batch, C, h, w) needs beyond its weights:
    the largest self-attention score matrix (batch x heads x (h*w)^2, at the first attention
    level, the finest one) plus the activations of the largest level (about 12 tensors of
    batch x channels x h x w live at once, the skip connections included). ``batch``
    counts both halves of a guided call. Attention slicing is not counted."""
    cfg = _config_dict(unet_config)
    chans = list(cfg.get("block_out_channels") or (320,))
    heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim") or 8
    heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * len(chans)
    score = 0
    for i, kind in enumerate(cfg.get("down_block_types") or ()):
        if "Attn" in kind:
            score = max(score, batch * heads[i] * ((h >> i) * (w >> i)) ** 2)
    acts = max(batch * c * (h >> i) * (w >> i) for i, c in enumerate(chans))
    return int((score + 12 * acts) * element_size)


def vae_memory_bytes(vae_config, batch: int, height: int, width: int,
                     element_size: int = 4) -> int:
    """About how many bytes the VAE needs to encode or decode ``batch`` pictures of
    ``height`` x ``width``: six tensors of its widest level at that level's size (the decoder
    upsamples before it narrows) plus its mid-block self-attention over the latent pixels."""
    cfg = _config_dict(vae_config)
    chans = list(cfg.get("block_out_channels") or (128,))
    n = len(chans)
    acts = max(batch * max(c, chans[min(k + 1, n - 1)]) * (height >> k) * (width >> k)
               for k, c in enumerate(chans))
    attention = 0
    if cfg.get("mid_block_add_attention", True):
        attention = batch * ((height >> (n - 1)) * (width >> (n - 1))) ** 2
    return int((6 * acts + attention) * element_size)


def check_generation_memory(pipe, name: str, value, batch: int, height: int, width: int,
                            guidance: bool = True, encode: bool = False,
                            extra_bytes: int = 0) -> None:
    """Refuse, before anything is allocated, a call that makes ``batch`` images of
    ``height`` x ``width`` with ``pipe`` (``encode``: the picture goes through the VAE
    encoder first) when its estimate (``unet_memory_bytes``, ``vae_memory_bytes``, plus
    ``extra_bytes`` such as a recorded trajectory) is over ``sdkit.device.memory_limit``:
    the message names ``name=value``, the estimate and the limit, and says how to raise it
    (``SDKIT_MEMORY_LIMIT``)."""
    f = vae_scale_factor(pipe.vae)
    size = _element_size(pipe.unet.dtype)
    unet = unet_memory_bytes(pipe.unet.config, batch * (2 if guidance else 1), height // f,
                             width // f, size)
    vae = vae_memory_bytes(pipe.vae.config, batch, height, width, _element_size(pipe.vae.dtype))
    check_memory(name, value, max(unet, vae) + extra_bytes,
                 f"{batch} image(s) of {height}x{width} px (the UNet's self-attention over "
                 f"{(height // f) * (width // f):,} latent pixels, the VAE at full size)",
                 device=pipe.unet.device)
