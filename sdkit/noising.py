"""Forward noising: how a clean image (or latent) is turned into noise, and the schedules behind it.

Diffusion training corrupts a clean sample ``x_0`` with Gaussian noise ``eps``. After ``t``
steps of ``q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I)`` the result has the
closed form ``x_t = sqrt(alphas_cumprod[t]) x_0 + sqrt(1 - alphas_cumprod[t]) eps``, which is
what diffusers' ``scheduler.add_noise`` computes. Notebook 01 derives it; this module keeps
the parts later notebooks reuse:

* ``load_photo``: scikit-image's public-domain photographs, no downloads (pictures to and
  from tensors are the ground's: ``sdkit.images.to_tensor`` / ``to_pil``);
* schedules: ``beta_schedules`` (linear, scaled_linear, cosine and the pipeline's own, from
  ``sdkit.pipeline.training_scheduler``), ``describe_schedule``, ``log_snr``,
  ``plot_schedules``;
* the forward process written out: ``add_noise`` (closed form) and ``forward_chain`` (one
  step at a time), both tested against diffusers;
* ``noise_slider``: an ipywidgets slider over t;
* ``check_snr_crossing``: the checker of notebook 01's exercise (where the toy's SNR
  meets SD 1.5's terminal SNR).

Left out: the reverse (denoising) process, which is notebook 02's, and the continuous-time
(SDE) view of diffusion.
"""

from __future__ import annotations

import math

import ipywidgets as widgets
import matplotlib.pyplot as plt
import numpy as np
import skimage.data
import torch
from diffusers import DDPMScheduler
from IPython.display import display
from PIL import Image

from . import checks, figures
from .images import to_pil
from .pipeline import training_scheduler

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")  # RGB photos shipped with scikit-image

# Schedules to compare: name -> DDPMScheduler keyword arguments.
SCHEDULES = {
    "linear": dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02),  # the DDPM paper's
    # Stable Diffusion's
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "squaredcos_cap_v2": dict(beta_schedule="squaredcos_cap_v2"),  # the cosine schedule
}


# ------------------------------------------------------------------------------ pictures


def load_photo(name: str = "astronaut", size: int = 64) -> np.ndarray:
    """A public-domain photograph from scikit-image, centre-cropped to a square and resized
    to ``size`` x ``size``: uint8 (size, size, 3). No download: the files ship with
    scikit-image. ``name`` is one of ``PHOTOS``.

    Introduced in notebooks/01_forward_noising.ipynb.
    """
    checks.check_choice("name", name, PHOTOS)
    size = checks.check_int("size", size, 8, 1024)
    photo = getattr(skimage.data, name)()  # (H, W, 3) uint8
    h, w = photo.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    square = Image.fromarray(photo[top:top + s, left:left + s])
    return np.asarray(square.resize((size, size), Image.Resampling.LANCZOS))


# ------------------------------------------------------------------------------ schedules


def beta_schedules(pipe=None, num_train_timesteps: int = 1000) -> dict:
    """Schedulers to compare: ``linear`` (DDPM), ``scaled_linear`` (Stable Diffusion's),
    ``squaredcos_cap_v2`` (cosine) and, given a pipeline (or its scheduler), that model's
    own training schedule under the key ``"this model"``. Values are DDPMSchedulers.

    Introduced in notebooks/01_forward_noising.ipynb.
    """
    n = checks.check_int("num_train_timesteps", num_train_timesteps, 2, 10_000)
    out = {name: DDPMScheduler(num_train_timesteps=n, **kw) for name, kw in SCHEDULES.items()}
    if pipe is not None:
        out["this model"] = training_scheduler(pipe)
    return out


def describe_schedule(pipe) -> str:
    """A one-line description of a pipeline's (or a scheduler's) training beta schedule,
    e.g. ``scaled_linear, rescaled to zero terminal SNR, 1000 steps``.

    Introduced in notebooks/01_forward_noising.ipynb.
    """
    c = training_scheduler(pipe).config
    text = c.beta_schedule
    if c.get("rescale_betas_zero_snr"):
        text += ", rescaled to zero terminal SNR"
    return f"{text}, {c.num_train_timesteps} steps"


def log_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Log signal-to-noise ratio, ``log(alphas_cumprod / (1 - alphas_cumprod))``, per timestep.

    It is ``-inf`` where ``alphas_cumprod`` is exactly 0 (pure noise, zero terminal SNR).
    Computed in float64 so that values near 1 do not round to an infinite SNR.

    Introduced in notebooks/01_forward_noising.ipynb.
    """
    a = _check_alphas_cumprod(alphas_cumprod).double()
    return torch.log(a) - torch.log1p(-a)


def _check_alphas_cumprod(alphas_cumprod, name: str = "alphas_cumprod") -> torch.Tensor:
    if not torch.is_tensor(alphas_cumprod) or alphas_cumprod.ndim != 1:
        checks.fail(name, alphas_cumprod, "expected a 1-D tensor, e.g. scheduler.alphas_cumprod")
    if alphas_cumprod.numel() < 2 or alphas_cumprod.min() < 0 or alphas_cumprod.max() > 1:
        checks.fail(name, alphas_cumprod, "expected values in [0, 1] (a cumulative product)")
    return alphas_cumprod


@figures.styled
def plot_schedules(schedules: dict, highlight: str | None = None):
    """Two panels over t: ``alphas_cumprod`` (signal kept) and log SNR; returns the figure.

    ``schedules`` maps a name to a scheduler (anything with ``alphas_cumprod``) or to an
    ``alphas_cumprod`` tensor. The ``highlight`` curve is drawn thicker.

    Introduced in notebooks/01_forward_noising.ipynb.
    """
    if not isinstance(schedules, dict) or not schedules:
        checks.fail("schedules", schedules, "expected a non-empty dict name -> scheduler")
    if highlight is not None:
        checks.check_choice("highlight", highlight, schedules)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))  # constrained layout (the style)
    for name, s in schedules.items():
        a = _check_alphas_cumprod(getattr(s, "alphas_cumprod", s), f"schedules[{name!r}]")
        t = np.arange(len(a))
        lw = 3 if name == highlight else 1.5
        ax1.plot(t, a.numpy(), lw=lw, label=name)
        snr = log_snr(a).numpy()
        ax2.plot(t[np.isfinite(snr)], snr[np.isfinite(snr)], lw=lw, label=name)
    ax1.set(xlabel="timestep t", ylabel="alphas_cumprod[t]", title="signal kept: ᾱ_t")
    ax2.axhline(0, color="grey", lw=0.8, ls="--")
    ax2.set(xlabel="timestep t", ylabel="log SNR = log(ᾱ_t / (1 - ᾱ_t))",
            title="signal-to-noise ratio (log)")
    ax1.legend()
    return fig


# ------------------------------------------------------------------------------ forward process


def _check_timesteps(t, n: int, name: str = "t") -> torch.Tensor:
    given = t
    if isinstance(t, (int, np.integer)) and not isinstance(t, bool):
        t = torch.tensor([int(t)])
    if not torch.is_tensor(t) or t.dtype.is_floating_point or t.dtype == torch.bool:
        checks.fail(name, given,
                    f"expected an int or an integer tensor of timesteps in [0, {n - 1}]")
    if t.numel() == 0 or t.min() < 0 or t.max() > n - 1:
        checks.fail(name, given, f"expected timesteps in [0, {n - 1}]")
    return t.reshape(-1)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t, alphas_cumprod: torch.Tensor):
    """The closed form ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``, abar = alphas_cumprod.

    ``t`` is an int or a tensor with one timestep per sample of ``x0`` (B, ...). Written with
    the same operations in the same order as diffusers' ``DDPMScheduler.add_noise``, so the
    two agree bit for bit (tests/test_noising.py).

    Introduced in notebooks/01_forward_noising.ipynb.
    """
    a = _check_alphas_cumprod(alphas_cumprod)
    t = _check_timesteps(t, len(a))
    if not torch.is_tensor(x0) or not torch.is_tensor(noise) or x0.shape != noise.shape:
        checks.fail("noise", getattr(noise, "shape", noise), "expected a tensor shaped like x0 "
                    f"{tuple(getattr(x0, 'shape', ()))}")
    if len(t) not in (1, x0.shape[0]):
        checks.fail("t", t, f"expected one timestep or one per sample ({x0.shape[0]})")
    abar = a.to(device=x0.device, dtype=x0.dtype)[t.to(x0.device)]  # (B,)
    abar = abar.reshape(-1, *([1] * (x0.ndim - 1)))  # (B, 1, 1, 1)
    return abar ** 0.5 * x0 + (1 - abar) ** 0.5 * noise


@torch.no_grad()
def forward_chain(x0: torch.Tensor, betas: torch.Tensor, t: int, generator=None) -> torch.Tensor:
    """Noise ``x0`` one step at a time: ``x_s = sqrt(1 - beta_s) x_{s-1} + sqrt(beta_s) eps_s``
    for s = 0, 1, ..., t (diffusers counts timesteps from 0, and ``alphas_cumprod[t]``
    includes step t). Returns x_t, distributed like ``add_noise(x0, eps, t, alphas_cumprod)``.
    The fresh noise comes from ``generator`` (a CPU ``torch.Generator``).

    Introduced in notebooks/01_forward_noising.ipynb.
    """
    if not torch.is_tensor(betas) or betas.ndim != 1 or betas.min() < 0 or betas.max() > 1:
        checks.fail("betas", betas, "expected a 1-D tensor in [0, 1], e.g. scheduler.betas")
    t = checks.check_int("t", t, 0, len(betas) - 1)
    if not torch.is_tensor(x0):
        checks.fail("x0", x0, "expected a tensor")
    x = x0.float().cpu().clone()
    for s in range(t + 1):
        eps = torch.randn(x.shape, generator=generator)
        x = (1 - betas[s]).sqrt() * x + betas[s].sqrt() * eps
    return x.to(x0.device)


def noise_slider(x0: torch.Tensor, scheduler, noise: torch.Tensor | None = None, decode=None,
                 t: int = 0, step: int = 10, scale: int = 4, seed: int = 0):
    """An ipywidgets slider over t that shows ``x_t`` for one clean sample ``x0`` (1, C, H, W).

    The picture is made with ``add_noise`` on ``scheduler.alphas_cumprod`` (pass
    ``sdkit.pipeline.training_scheduler(pipe)``) and the fixed ``noise`` (default: drawn from
    ``seed``), so moving the slider changes only t. ``decode`` maps a noisy sample to a
    (1, 3, H, W) image in [-1, 1] (e.g. the VAE decoder for latents); without it ``x0``
    must be an image. Returns the ``ipywidgets.interactive``: ``.result`` is the shown PIL
    image, ``.children[0]`` the slider.

    Introduced in notebooks/01_forward_noising.ipynb.
    """
    a = _check_alphas_cumprod(getattr(scheduler, "alphas_cumprod", None), "scheduler")
    n = len(a)
    if not torch.is_tensor(x0) or x0.ndim != 4 or x0.shape[0] != 1:
        checks.fail("x0", getattr(x0, "shape", x0), "expected one sample, a tensor (1, C, H, W)")
    if decode is None and x0.shape[1] != 3:
        checks.fail("decode", decode, f"expected a decoder for {x0.shape[1]}-channel samples")
    t = checks.check_int("t", t, 0, n - 1)
    step = checks.check_int("step", step, 1, n)
    seed = checks.check_seed(seed)
    if noise is None:
        noise = torch.randn(x0.shape, generator=torch.Generator("cpu").manual_seed(seed))
    elif not torch.is_tensor(noise) or noise.shape != x0.shape:
        checks.fail("noise", getattr(noise, "shape", noise), f"expected shape {tuple(x0.shape)}")
    noise = noise.to(x0.device, x0.dtype)

    def show(t):
        x_t = add_noise(x0, noise, t, a)
        picture = decode(x_t) if decode is not None else x_t
        image = to_pil(picture[0], scale=scale)
        abar = float(a[t])
        snr = abar / (1 - abar) if abar < 1 else math.inf
        print(f"t = {t}: ᾱ_t = {abar:.4f}, signal ×{abar ** 0.5:.3f}, "
              f"noise ×{(1 - abar) ** 0.5:.3f}, SNR = {snr:.4g}")
        display(image)
        return image

    slider = widgets.IntSlider(value=t, min=0, max=n - 1, step=step, description="t",
                               continuous_update=False)
    return widgets.interactive(show, t=slider)


# ------------------------------------------------------------------------------ exercise


def _sd_terminal_snr() -> float:
    """SD 1.5's terminal SNR ``abar_999 / (1 - abar_999)`` on its training schedule
    (scaled_linear betas from 0.00085 to 0.012, 1000 steps): the least signal it trains on."""
    a = DDPMScheduler(num_train_timesteps=1000, **SCHEDULES["scaled_linear"]).alphas_cumprod
    a_T = a[-1].double()
    return float(a_T / (1 - a_T))


def _first_t_at_or_below(snr: torch.Tensor, threshold: float) -> int | None:
    hits = torch.nonzero(snr <= threshold)
    return int(hits[0]) if len(hits) else None


def check_snr_crossing(answer, pipe) -> bool:
    """Checker for notebook 01's exercise: the first timestep t of the model's *training*
    schedule (``training_scheduler(pipe)``) whose SNR ``abar_t / (1 - abar_t)`` is at or below
    SD 1.5's terminal SNR (about 0.0047). From there on the model trains on noise
    levels SD 1.5 never sees. Prints whether ``answer`` is right, with a hint about the usual
    mistakes if not, and returns True or False; never raises on an answer.

    Introduced in notebooks/01_forward_noising.ipynb.
    """
    a = training_scheduler(pipe).alphas_cumprod.double()
    snr = a / (1 - a)
    n = len(a)
    target = _sd_terminal_snr()
    expected = _first_t_at_or_below(snr, target)
    if answer is None:
        print("not solved yet: set `t_cross` to a timestep (an int).")
        return False
    if torch.is_tensor(answer) and answer.numel() == 1 and not answer.is_floating_point():
        answer = answer.item()
    if isinstance(answer, bool) or not isinstance(answer, (int, np.integer)):
        print(f"t_cross = {answer!r}: expected an int timestep in [0, {n - 1}], not the SNR "
              "itself (or a float).")
        return False
    answer = int(answer)
    if expected is None:  # cannot happen for a schedule that ends at or below SD's
        print(f"This model's SNR never drops to SD 1.5's terminal SNR ({target:.4g}).")
        return False
    if answer == expected:
        print(f"Right: t = {expected}. From there to t = {n - 1} ({n - expected} of {n} steps) "
              f"the model trains on as little signal as SD 1.5 ever sees, or less (SD's "
              f"terminal SNR {target:.4g}, log SNR {math.log(target):.2f}).")
        return True
    sqrt_snr = snr.sqrt()
    log = torch.log(a) - torch.log1p(-a)
    sd_linear = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear",
                              beta_start=0.00085, beta_end=0.012).alphas_cumprod[-1].double()
    mistakes = {  # the answer each usual mistake gives -> what to say about it
        expected - 1: f"one too early: at t = {expected - 1} the SNR is {snr[expected - 1]:.4g}, "
                      f"still above {target:.4g}. The question asks for the first t at or below.",
        expected + 1: f"one too late: at t = {expected} the SNR is already {snr[expected]:.4g} "
                      f"<= {target:.4g}. diffusers counts t from 0.",
        _first_t_at_or_below(log, target): "that is where the toy's *log* SNR drops below SD's "
                      "SNR (also the first t with SNR < 1): compare SNR with SNR, or log SNR "
                      "with log SNR.",
        _first_t_at_or_below(sqrt_snr, target): "that compares sqrt(SNR) (the amplitude ratio "
                      "sqrt(ᾱ)/sqrt(1 - ᾱ)) with the SNR, a power ratio: use ᾱ/(1 - ᾱ) on both "
                      "sides.",
        _first_t_at_or_below(snr, target ** 0.5): "that compares the SNR with SD's sqrt(SNR): "
                      "use ᾱ/(1 - ᾱ) on both sides.",
        _first_t_at_or_below(snr, float(sd_linear / (1 - sd_linear))): "that is SD with *linear* "
                      "betas; SD 1.5 uses beta_schedule='scaled_linear' (sqrt(β) is linear).",
        n - 1: "that is this model's last step (where the toy's SNR is 0). SD's terminal SNR is "
               "not 0: build SD's schedule from its own numbers (scaled_linear, 0.00085 to "
               "0.012), not from this model's config or its sampler (whose ᾱ_999 is 2**-24).",
    }
    mistakes.pop(expected, None)
    if answer in mistakes:
        print(f"t_cross = {answer} is not it: {mistakes[answer]}")
    else:
        side = "too early" if answer < expected else "too late"
        print(f"t_cross = {answer} is {side}. Hint: SD's terminal SNR is ᾱ_999/(1 - ᾱ_999) on "
              "its scaled_linear schedule; find the first t where this model's training "
              "schedule (training_scheduler(pipe).alphas_cumprod) has ᾱ_t/(1 - ᾱ_t) <= it, "
              "e.g. with torch.nonzero.")
    return False
