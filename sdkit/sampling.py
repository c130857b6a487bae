"""The reverse (denoising) process, step by step: the loop of a Stable Diffusion pipeline, recorded.

``sample(pipe, prompt, seed, ...)`` runs exactly the loop that diffusers'
``StableDiffusionPipeline.__call__`` runs (same order of operations, so on the CPU the final
image is bit-identical to ``pipe(...)`` with the same seed and settings) and returns a
``Trajectory``: for every denoising step the timestep, the latents x_t, the raw conditional
and unconditional model outputs and the predicted clean latents x_0. The loop itself::

    latents = randn(shape, generator) * scheduler.init_noise_sigma      # (B, 4, h, w)
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(cat([latents] * 2), t)         # (2B, 4, h, w)
        uncond, cond = unet(x_in, t, cat([uncond_embeds, cond_embeds])).chunk(2)
        noise_pred = uncond + s * (cond - uncond)                        # classifier-free guidance
        latents = scheduler.step(noise_pred, t, latents).prev_sample
    image = vae.decode(latents / vae.config.scaling_factor)

``make_scheduler(name, pipe)`` swaps the sampler (DDPM, DDIM, Euler, DPM-Solver++) on the
pipeline's own noise schedule; ``predicted_x0`` is the one-line formula that turns a model
output into a guess of the clean latents; ``replay`` re-runs the scheduler with cached model
outputs and a new guidance scale (an approximation, used by notebook 05's panel).

Left out: img2img/inpainting starts (notebooks 07/08 build on ``Trajectory``), guidance
rescale, IP-adapters, LCM-style guidance embeddings, and second-order samplers that call the
UNet twice per step (Heun): every sampler here makes one UNet call per timestep.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from . import checks

SCHEDULER_NAMES = ("DDPM", "DDIM", "Euler", "DPM-Solver++")


def _scheduler_classes() -> dict:
    from diffusers import (
        DDIMScheduler,
        DDPMScheduler,
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
    )

    return {"DDPM": DDPMScheduler, "DDIM": DDIMScheduler, "Euler": EulerDiscreteScheduler,
            "DPM-Solver++": DPMSolverMultistepScheduler}


def make_scheduler(name: str, pipe):
    """A fresh sampler of kind ``name`` on the pipeline's own noise schedule.

    ``name`` is one of ``SCHEDULER_NAMES``: "DDPM" (ancestral, stochastic: it draws fresh
    noise every step), "DDIM" (deterministic, eta=0), "Euler" (Euler's method on the
    probability-flow ODE, in sigma space) or "DPM-Solver++" (second-order multistep; the
    toy model's own sampler). Built with ``Class.from_config(pipe.scheduler.config)``, so
    the betas, the prediction type (v or epsilon), zero-terminal-SNR rescaling and the
    timestep spacing all carry over; the pipeline's scheduler is not touched.

    Introduced in notebooks/02_reverse_denoising.ipynb.
    """
    checks.check_choice("name", name, SCHEDULER_NAMES)
    cls = _scheduler_classes()[name]
    if name == "DPM-Solver++":
        return cls.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++")
    return cls.from_config(pipe.scheduler.config)


def scheduler_name(scheduler) -> str:
    """The kit's name for a scheduler object ("DDIM", ...), else its class name."""
    for name, cls in _scheduler_classes().items():
        if type(scheduler) is cls:
            return name
    return type(scheduler).__name__


def _fresh_scheduler(scheduler, pipe):
    """A scheduler with no state left over from an earlier run (multistep solvers keep some)."""
    if scheduler is None:
        return type(pipe.scheduler).from_config(pipe.scheduler.config)
    if isinstance(scheduler, str):
        return make_scheduler(scheduler, pipe)
    if not hasattr(scheduler, "step") or not hasattr(scheduler, "set_timesteps"):
        checks.fail("scheduler", scheduler, f"expected None, one of {list(SCHEDULER_NAMES)} or "
                                            "a diffusers scheduler object")
    return type(scheduler).from_config(scheduler.config)


def predicted_x0(x_t: torch.Tensor, model_output: torch.Tensor, alpha_prod_t,
                 prediction_type: str) -> torch.Tensor:
    """The clean latents x_0 that a model output implies, from x_t = sqrt(a) x_0 + sqrt(1-a) eps.

    ``alpha_prod_t`` is alphas_cumprod at the step's timestep (a number or a tensor that
    broadcasts); ``x_t`` is the variance-preserving noisy latent (what the UNet sees, i.e.
    after ``scheduler.scale_model_input``):

    - "epsilon" (SD 1.x/2-base):  x_0 = (x_t - sqrt(1 - a) * eps) / sqrt(a)
    - "v_prediction" (the toy model, SD 2-v): v = sqrt(a) eps - sqrt(1 - a) x_0, so
      x_0 = sqrt(a) * x_t - sqrt(1 - a) * v
    - "sample": the model predicts x_0 itself.

    Introduced in notebooks/02_reverse_denoising.ipynb.
    """
    checks.check_choice("prediction_type", prediction_type, ("epsilon", "v_prediction", "sample"))
    a = torch.as_tensor(alpha_prod_t, dtype=torch.float32).to(x_t.device)
    if prediction_type == "v_prediction":
        return (a.sqrt() * x_t.float() - (1 - a).sqrt() * model_output.float()).to(x_t.dtype)
    if prediction_type == "epsilon":
        return ((x_t.float() - (1 - a).sqrt() * model_output.float()) / a.sqrt()).to(x_t.dtype)
    return model_output.clone()


def combine(noise_pred_uncond: torch.Tensor, noise_pred_cond: torch.Tensor,
            guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance: ``uncond + s * (cond - uncond)``.

    s = 0 gives the unconditional prediction, s = 1 the conditional one, s > 1 pushes past
    it, away from the unconditional (or negative-prompt) prediction.

    Introduced in notebooks/02_reverse_denoising.ipynb.
    """
    return noise_pred_uncond + guidance_scale * (noise_pred_cond - noise_pred_uncond)


def _alpha_prod(scheduler, t) -> torch.Tensor:
    """alphas_cumprod at timestep t (rounded to the nearest training step for float timesteps)."""
    return scheduler.alphas_cumprod[int(round(float(t)))].float()


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _step_kwargs(scheduler, generator, eta: float) -> dict:
    """What the pipeline passes to ``scheduler.step`` (prepare_extra_step_kwargs in diffusers)."""
    accepted = set(inspect.signature(scheduler.step).parameters)
    kwargs = {}
    if "eta" in accepted:
        kwargs["eta"] = eta
    if "generator" in accepted:
        kwargs["generator"] = generator
    return kwargs


@torch.no_grad()
def encode_prompt(pipe, prompts: list[str], negative_prompts: list[str] | None = None):
    """Text embeddings ``(cond, uncond)``, each (B, T, D), as the pipeline makes them.

    The unconditional embedding is the text encoder's output for the empty prompt ""
    (or for the negative prompt, which simply takes its place). Two text-encoder calls,
    like ``StableDiffusionPipeline.encode_prompt``, so results are bit-identical.

    Introduced in notebooks/02_reverse_denoising.ipynb.
    """
    tok, enc = pipe.tokenizer, pipe.text_encoder
    device = enc.device

    def embed(texts, max_length):
        ids = tok(texts, padding="max_length", max_length=max_length, truncation=True,
                  return_tensors="pt").input_ids
        return enc(ids.to(device))[0]  # (B, T, D)

    cond = embed(list(prompts), tok.model_max_length)
    uncond = embed(list(negative_prompts) if negative_prompts is not None else [""] * len(prompts),
                   cond.shape[1])
    return cond, uncond


def initial_latents(pipe, generator, batch_size: int = 1, height: int | None = None,
                    width: int | None = None, dtype=None) -> torch.Tensor:
    """The starting noise x_T, (B, C, h, w), drawn on the CPU and moved to the UNet's device.

    ``generator``: one CPU ``torch.Generator`` draws the whole batch (like
    ``pipe(..., generator=g)``); a list gives one generator per image (like
    ``pipe(..., generator=[g1, g2, ...])``); an int or a list of ints is a shortcut that
    makes those generators from seeds. Not yet multiplied by ``scheduler.init_noise_sigma``.

    Introduced in notebooks/02_reverse_denoising.ipynb.
    """
    batch_size = checks.check_int("batch_size", batch_size, 1)
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    height, width = checks.check_size(height or side, width or side, multiple=pipe.vae_scale_factor)
    shape = (batch_size, pipe.unet.config.in_channels, height // pipe.vae_scale_factor,
             width // pipe.vae_scale_factor)
    dtype = dtype or pipe.unet.dtype
    if isinstance(generator, int) or (isinstance(generator, (list, tuple))
                                      and all(isinstance(g, int) for g in generator)):
        generator = _generator(generator)
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


def _generator(seed):
    """One CPU generator for an int seed, a list of them for a list of seeds."""
    if isinstance(seed, (list, tuple)):
        return [torch.Generator("cpu").manual_seed(int(s)) for s in seed]
    return torch.Generator("cpu").manual_seed(int(seed))


@dataclass(eq=False)
class Trajectory:
    """Everything one run of the denoising loop computed, step by step.

    Tensors live on the CPU; S = number of steps, B = batch size, (C, h, w) = latent shape
    ((4, 16, 16) for the toy model, (4, 64, 64) for SD at 512 px):

    - ``timesteps`` (S,): the timestep t of each step.
    - ``latents`` (S + 1, B, C, h, w): ``latents[i]`` is x_t entering step i, as the
      scheduler holds it (Euler keeps it multiplied by sqrt(sigma^2 + 1));
      ``latents[-1]`` is the final result that the VAE decodes.
    - ``noise_pred_cond`` / ``noise_pred_uncond`` (S, B, C, h, w): the raw UNet outputs
      for the prompt and for the empty (or negative) prompt. For a v-prediction model
      these are v, not epsilon; the name follows diffusers.
    - ``pred_x0`` (S, B, C, h, w): the clean latents predicted at each step from the guided
      prediction ``uncond + s * (cond - uncond)`` (see ``predicted_x0``).
    - ``alphas_cumprod`` (S,): alphas_cumprod at each timestep.
    - ``prompts``, ``negative_prompts`` (None: the empty prompt), ``seeds`` (one int: one
      generator for the batch; several: one per image), ``guidance_scale``,
      ``num_inference_steps``, ``scheduler`` (its name), ``prediction_type``.

    Images: ``images()`` (final, like the pipeline's), ``pred_x0_images(item)`` and
    ``latent_images(item)`` (one VAE call per batch of steps; results are memoized) and
    ``preview(which, item)`` (no VAE at all: a per-trajectory linear latent-to-RGB map).

    Introduced in notebooks/02_reverse_denoising.ipynb.
    """

    prompts: list[str]
    negative_prompts: list[str] | None
    seeds: list[int]
    guidance_scale: float
    num_inference_steps: int
    scheduler: str
    prediction_type: str
    timesteps: torch.Tensor
    latents: torch.Tensor
    noise_pred_cond: torch.Tensor
    noise_pred_uncond: torch.Tensor
    pred_x0: torch.Tensor
    alphas_cumprod: torch.Tensor
    pipe: Any = field(default=None, repr=False)
    _memo: dict = field(default_factory=dict, repr=False)

    def __repr__(self) -> str:
        neg = "" if self.negative_prompts is None else f", negative_prompts={self.negative_prompts}"
        return (f"Trajectory(prompts={self.prompts}{neg}, seeds={self.seeds}, "
                f"guidance_scale={self.guidance_scale:g}, scheduler={self.scheduler!r}, "
                f"steps={self.num_inference_steps}, prediction_type={self.prediction_type!r}, "
                f"timesteps={self.timesteps.tolist()}, latents {tuple(self.latents.shape)}, "
                f"pred_x0/noise_pred_cond/noise_pred_uncond {tuple(self.pred_x0.shape)})")

    @property
    def batch_size(self) -> int:
        return self.latents.shape[1]

    @property
    def prompt(self) -> str:
        """The first (for B = 1: the only) prompt."""
        return self.prompts[0]

    @property
    def seed(self) -> int:
        """The first (for B = 1: the only) seed."""
        return self.seeds[0]

    def noise_pred(self, guidance_scale: float | None = None) -> torch.Tensor:
        """Guided predictions (S, B, C, h, w) recombined from the cached ones.

        With the trajectory's own scale this is exactly what the scheduler stepped with.
        With another scale it is exact for step 0 only: later steps' inputs x_t depend on
        the scale used before them (see ``replay``)."""
        s = self.guidance_scale if guidance_scale is None else checks.check_guidance(guidance_scale)
        return combine(self.noise_pred_uncond, self.noise_pred_cond, s)

    # ----------------------------------------------------------------- decoding
    def _vae(self):
        if self.pipe is None:
            checks.fail("pipe", None, "this Trajectory has no pipeline attached to decode with; "
                                      "set traj.pipe = pipe")
        return self.pipe.vae

    def decode(self, latents: torch.Tensor, batch_size: int = 16) -> list:
        """PIL images of latents (N, C, h, w): ``vae.decode(latents / scaling_factor)``,
        ``batch_size`` at a time, post-processed exactly like the pipeline's output."""
        return decode_latents(self._vae(), latents, batch_size=batch_size)

    def images(self) -> list:
        """The final images, one per batch item (equal to the pipeline's with the same seed)."""
        if "final" not in self._memo:
            self._memo["final"] = self.decode(self.latents[-1])
        return self._memo["final"]

    @property
    def image(self):
        """The first final image."""
        return self.images()[0]

    def pred_x0_images(self, item: int = 0) -> list:
        """The predicted clean image at each step, (S) PIL images, decoded in one batch."""
        item = checks.check_int("item", item, 0, self.batch_size - 1)
        key = ("pred_x0", item)
        if key not in self._memo:
            self._memo[key] = self.decode(self.pred_x0[:, item])
        return self._memo[key]

    def latent_images(self, item: int = 0) -> list:
        """x_t decoded by the VAE at each step plus the final latents, (S + 1) PIL images.

        The VAE was never trained on noisy latents, so these show noise "as the decoder sees
        it"; with Euler, x_t is divided by sqrt(sigma^2 + 1) first so it is on the same scale."""
        item = checks.check_int("item", item, 0, self.batch_size - 1)
        key = ("latents", item)
        if key not in self._memo:
            self._memo[key] = self.decode(self._vp_latents()[:, item])
        return self._memo[key]

    def _vp_latents(self) -> torch.Tensor:
        """latents on the variance-preserving scale: sqrt(a) x_0 + sqrt(1-a) eps."""
        if self.scheduler != "Euler":
            return self.latents
        a = torch.cat([self.alphas_cumprod, torch.ones(1)]).view(-1, 1, 1, 1, 1)
        return self.latents * a.sqrt()

    def preview(self, which: str = "pred_x0", item: int = 0, size: int | None = None) -> list:
        """Cheap previews without the VAE: each latent pixel mapped to RGB by a linear map.

        The map (4 channels + bias -> RGB) is fitted by least squares to this trajectory's
        final latents and its decoded final image (one VAE call, memoized), then applied to
        every step, so a whole strip costs one small matrix product. ``which``: "pred_x0" or
        "latents". ``size``: output side in pixels (default: the decoded image's size).
        """
        checks.check_choice("which", which, ("pred_x0", "latents"))
        item = checks.check_int("item", item, 0, self.batch_size - 1)
        if "rgb_map" not in self._memo:
            final = np.stack([np.asarray(im, dtype=np.float32) / 255 for im in self.images()])
            self._memo["rgb_map"] = fit_latent_rgb_map(self.latents[-1], final)
        lat = self.pred_x0[:, item] if which == "pred_x0" else self._vp_latents()[:, item]
        size = size or self.images()[0].size[0]
        return latents_to_rgb(lat, self._memo["rgb_map"], size)


def decode_latents(vae, latents: torch.Tensor, batch_size: int = 16) -> list:
    """PIL images of latents (N, C, h, w), decoded ``batch_size`` at a time, post-processed
    like the pipeline's output: ((x / 2 + 0.5).clamp(0, 1) * 255).round() as uint8.

    Introduced in notebooks/02_reverse_denoising.ipynb.
    """
    from PIL import Image

    batch_size = checks.check_int("batch_size", batch_size, 1)
    out = []
    with torch.no_grad():
        for i in range(0, latents.shape[0], batch_size):
            z = latents[i:i + batch_size].to(vae.device, vae.dtype)
            x = vae.decode(z / vae.config.scaling_factor, return_dict=False)[0]  # (n, 3, H, W)
            x = (x / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
            out += [Image.fromarray(a) for a in (x * 255).round().astype("uint8")]
    return out


def fit_latent_rgb_map(latents: torch.Tensor, images: np.ndarray) -> torch.Tensor:
    """Linear map (C + 1, 3) from latent pixels (+ bias) to RGB in [-1, 1], fitted on these
    latents (B, C, h, w) and their decoded images (B, H, W, 3) in [0, 1], average-pooled to
    (h, w); the solver is notebook 04's ``latents.solve_latent_rgb``.

    Introduced in notebooks/02_reverse_denoising.ipynb.
    """
    from .latents import solve_latent_rgb

    b, c, h, w = latents.shape
    img = torch.as_tensor(images, dtype=torch.float32).permute(0, 3, 1, 2) * 2 - 1  # (B, 3, H, W)
    img = torch.nn.functional.adaptive_avg_pool2d(img, (h, w))  # (B, 3, h, w)
    return solve_latent_rgb(latents.float().permute(0, 2, 3, 1).reshape(-1, c),
                            img.permute(0, 2, 3, 1).reshape(-1, 3))


def latents_to_rgb(latents: torch.Tensor, rgb_map: torch.Tensor, size: int) -> list:
    """Apply a ``fit_latent_rgb_map`` map to latents (N, C, h, w): N PIL images of side size."""
    from PIL import Image

    from .latents import latents_to_rgb_preview

    rgb = (latents_to_rgb_preview(latents, rgb_map) + 1) / 2  # (N, 3, h, w) in [0, 1]
    rgb = (rgb.permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")
    return [Image.fromarray(a).resize((size, size), Image.BILINEAR) for a in rgb]


def hstack(images, gap: int = 2, thumb: int | None = None):
    """Images side by side on a white background (a strip), each resized to ``thumb`` px.

    Introduced in notebooks/02_reverse_denoising.ipynb.
    """
    from PIL import Image

    if thumb is not None:
        images = [im.resize((thumb, thumb), Image.NEAREST) for im in images]
    w = sum(im.size[0] for im in images) + gap * (len(images) - 1)
    h = max(im.size[1] for im in images)
    out = Image.new("RGB", (w, h), (255, 255, 255))
    x = 0
    for im in images:
        out.paste(im, (x, 0))
        x += im.size[0] + gap
    return out


def plot_trajectory(traj: Trajectory, item: int = 0, max_steps: int = 10, vae: bool = True):
    """A matplotlib figure: x_t (top row) and the predicted x_0 (bottom row) at each step.

    ``max_steps``: at most this many evenly spaced steps (first and last included).
    ``vae=False`` uses the cheap linear ``preview`` instead of the decoder.

    Introduced in notebooks/02_reverse_denoising.ipynb.
    """
    import matplotlib.pyplot as plt

    if not isinstance(traj, Trajectory):
        checks.fail("traj", traj, "expected a Trajectory from sdkit.sampling.sample")
    max_steps = checks.check_int("max_steps", max_steps, 1, 100)
    n = traj.num_inference_steps
    idx = sorted({int(round(v)) for v in np.linspace(0, n - 1, min(n, max_steps))})
    xt = traj.latent_images(item) if vae else traj.preview("latents", item)
    x0 = traj.pred_x0_images(item) if vae else traj.preview("pred_x0", item)
    fig, axes = plt.subplots(2, len(idx), figsize=(1.5 * len(idx), 3.4), squeeze=False)
    for col, i in enumerate(idx):
        for row, (ims, label) in enumerate(((xt, "x_t"), (x0, "predicted x_0"))):
            ax = axes[row, col]
            ax.imshow(ims[i])
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(label)
        axes[0, col].set_title(f"step {i}\nt={int(traj.timesteps[i])}", fontsize=9)
    fig.suptitle(f"{traj.prompts[item]!r}, {traj.scheduler}, s={traj.guidance_scale:g}",
                 fontsize=10)
    fig.tight_layout()
    return fig


def trajectory_gif(traj: Trajectory, path=None, item: int = 0, scale: int = 3,
                   ms_per_frame: int = 300) -> str:
    """Write an animated GIF of x_t (left) and the predicted x_0 (right), one frame per step
    plus two frames of the final image; returns its path (a temporary file by default).
    Show it with ``IPython.display.Image(filename=path)``.

    Introduced in notebooks/02_reverse_denoising.ipynb.
    """
    import tempfile

    from PIL import Image

    if not isinstance(traj, Trajectory):
        checks.fail("traj", traj, "expected a Trajectory from sdkit.sampling.sample")
    scale = checks.check_int("scale", scale, 1, 16)
    ms_per_frame = checks.check_int("ms_per_frame", ms_per_frame, 20, 10_000)
    xt, x0 = traj.latent_images(item), traj.pred_x0_images(item)
    w, h = xt[0].size
    frames = []
    for a, b in list(zip(xt, x0)) + [(xt[-1], xt[-1])] * 2:
        f = Image.new("RGB", (2 * w + 4, h), (255, 255, 255))
        f.paste(a, (0, 0))
        f.paste(b, (w + 4, 0))
        frames.append(f.resize((f.size[0] * scale, h * scale), Image.NEAREST))
    if path is None:
        path = tempfile.NamedTemporaryFile(suffix=".gif", prefix="sdkit_", delete=False).name
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=ms_per_frame, loop=0)
    return str(path)


def distance_to_final(traj: Trajectory, item: int = 0) -> np.ndarray:
    """Mean absolute pixel difference (0..1) between each step's decoded predicted x_0 and
    the final image: how far from the end result each step's guess is.

    Introduced in notebooks/02_reverse_denoising.ipynb.
    """
    final = np.asarray(traj.images()[item], dtype=np.float32) / 255
    return np.array([np.abs(np.asarray(im, dtype=np.float32) / 255 - final).mean()
                     for im in traj.pred_x0_images(item)])


@torch.no_grad()
def sample(pipe, prompt: str | list[str], seed: int | list[int] = 0,
           num_inference_steps: int | None = None, guidance_scale: float | None = None,
           scheduler=None, negative_prompt: str | list[str] | None = None,
           height: int | None = None, width: int | None = None, eta: float = 0.0,
           text_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
           progress: bool = False) -> Trajectory:
    """Run the pipeline's denoising loop and record every step in a ``Trajectory``.

    Same inputs, same order of operations as ``StableDiffusionPipeline.__call__`` with
    ``generator=torch.Generator("cpu").manual_seed(seed)`` (a list of seeds: one generator
    per image), so ``sample(...).images()`` equals ``pipe(...).images`` bit for bit on the
    CPU whenever the pipeline uses guidance (``guidance_scale > 1``).

    One difference, on purpose: the pipeline switches classifier-free guidance off when
    ``guidance_scale <= 1`` and runs the conditional branch only; ``sample`` always runs
    both branches and applies ``uncond + s * (cond - uncond)``, so s = 0 really is the
    unconditional model and s = 1 equals the pipeline's image up to float rounding.

    ``prompt``: a str or a list (the batch). ``seed``: an int or one per prompt.
    ``num_inference_steps``/``guidance_scale``: None gives ``default_settings(pipe)``.
    ``scheduler``: None (a fresh copy of ``pipe.scheduler``), a name from
    ``SCHEDULER_NAMES`` or a diffusers scheduler (copied, never mutated).
    ``negative_prompt``: replaces the empty prompt of the unconditional branch.
    ``text_embeddings``: (cond, uncond) from ``encode_prompt`` to skip the text encoder
    (notebook 05's panel caches them). ``eta``: DDIM's noise level (0 = deterministic).

    Introduced in notebooks/02_reverse_denoising.ipynb.
    """
    from tqdm.auto import tqdm

    from .pipeline import default_settings

    d = default_settings(pipe)
    steps = checks.check_steps(d["num_inference_steps"] if num_inference_steps is None
                               else num_inference_steps)
    s = checks.check_guidance(d["guidance_scale"] if guidance_scale is None else guidance_scale)
    eta = checks.check_float("eta", eta, 0.0, 1.0)
    prompts = _as_list(prompt)
    if not prompts:
        checks.fail("prompt", prompt, "expected a str or a non-empty list of str")
    for p in prompts:
        checks.check_prompt(p, pipe.tokenizer, allow_empty=s == 0)
    negatives = None
    if negative_prompt is not None:
        negatives = _as_list(negative_prompt)
        if len(negatives) == 1 and len(prompts) > 1:
            negatives = negatives * len(prompts)
        if len(negatives) != len(prompts):
            checks.fail("negative_prompt", negative_prompt,
                        f"expected a str or one per prompt ({len(prompts)})")
        for p in negatives:
            checks.check_prompt(p, pipe.tokenizer, name="negative_prompt", allow_empty=True)
    seeds = _as_list(seed)
    for v in seeds:
        checks.check_seed(v)
    if isinstance(seed, (list, tuple)) and len(seeds) != len(prompts):
        checks.fail("seed", seed, f"expected an int or one seed per prompt ({len(prompts)})")
    default_side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    height, width = checks.check_size(height or default_side, width or default_side,
                                      multiple=pipe.vae_scale_factor)
    sched = _fresh_scheduler(scheduler, pipe)
    device = pipe.unet.device

    # 1. text: the prompt's embedding and the empty (or negative) prompt's, one batch [uncond, cond]
    if text_embeddings is None:
        text_embeddings = encode_prompt(pipe, prompts, negatives)
    cond, uncond = text_embeddings
    if cond.shape[0] != len(prompts) or uncond.shape != cond.shape:
        checks.fail("text_embeddings", f"shapes {tuple(cond.shape)}, {tuple(uncond.shape)}",
                    f"expected (cond, uncond) from encode_prompt, {len(prompts)} rows each")
    prompt_embeds = torch.cat([uncond, cond])  # (2B, T, D)

    # 2. timesteps and the starting noise
    sched.set_timesteps(steps, device=device)
    generator = _generator(seed)
    latents = initial_latents(pipe, generator, len(prompts), height, width, prompt_embeds.dtype)
    latents = latents * sched.init_noise_sigma  # (B, C, h, w)
    step_kwargs = _step_kwargs(sched, generator, eta)

    rec = {k: [] for k in ("latents", "cond", "uncond", "x0", "a")}
    for t in tqdm(sched.timesteps, desc="denoising", disable=not progress, leave=False):
        rec["latents"].append(latents.detach().float().cpu())
        x_in = sched.scale_model_input(torch.cat([latents] * 2), t)  # (2B, C, h, w)
        out = pipe.unet(x_in, t, encoder_hidden_states=prompt_embeds, return_dict=False)[0]
        noise_pred_uncond, noise_pred_cond = out.chunk(2)
        noise_pred = noise_pred_uncond + s * (noise_pred_cond - noise_pred_uncond)
        a = _alpha_prod(sched, t)
        x0 = predicted_x0(x_in[len(prompts):], noise_pred, a, sched.config.prediction_type)
        for k, v in (("cond", noise_pred_cond), ("uncond", noise_pred_uncond), ("x0", x0)):
            rec[k].append(v.detach().float().cpu())
        rec["a"].append(a.cpu())
        latents = sched.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
    rec["latents"].append(latents.detach().float().cpu())

    return Trajectory(
        prompts=prompts, negative_prompts=negatives, seeds=[int(v) for v in seeds],
        guidance_scale=s, num_inference_steps=steps, scheduler=scheduler_name(sched),
        prediction_type=sched.config.prediction_type,
        timesteps=sched.timesteps.detach().cpu().clone(),
        latents=torch.stack(rec["latents"]), noise_pred_cond=torch.stack(rec["cond"]),
        noise_pred_uncond=torch.stack(rec["uncond"]), pred_x0=torch.stack(rec["x0"]),
        alphas_cumprod=torch.stack(rec["a"]), pipe=pipe,
    )


def compare_schedulers(pipe, prompts: list[str], seeds: list[int],
                       steps_list=(5, 10, 25, 50), names=SCHEDULER_NAMES,
                       guidance_scale: float | None = None) -> dict:
    """Final images for every sampler and number of steps: {(name, steps): [PIL, ...]}.

    Each (name, steps) is one batched ``sample`` call over all prompts (one seed per
    prompt), with a tqdm bar over the runs.

    Introduced in notebooks/02_reverse_denoising.ipynb.
    """
    from tqdm.auto import tqdm

    for n in names:
        checks.check_choice("names", n, SCHEDULER_NAMES)
    steps_list = [checks.check_steps(n, "steps_list") for n in steps_list]
    runs = [(n, k) for n in names for k in steps_list]
    out = {}
    for name, k in tqdm(runs, desc="samplers x steps"):
        out[(name, k)] = sample(pipe, list(prompts), list(seeds), k, guidance_scale,
                                scheduler=name).images()
    return out


def scheduler_grid(results: dict, item: int = 0, scale: int = 2):
    """One image per (sampler, steps) of ``compare_schedulers``' results as a labelled
    matplotlib figure: a row per sampler, a column per number of steps.

    Introduced in notebooks/02_reverse_denoising.ipynb.
    """
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(n for n, _ in results))
    steps = sorted({k for _, k in results})
    fig, axes = plt.subplots(len(names), len(steps), squeeze=False,
                             figsize=(0.9 * scale * len(steps), 0.9 * scale * len(names)))
    for r, n in enumerate(names):
        for c, k in enumerate(steps):
            ax = axes[r, c]
            ax.imshow(results[(n, k)][item])
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"{k} steps", fontsize=9)
            if c == 0:
                ax.set_ylabel(n, fontsize=9)
    fig.tight_layout()
    return fig


def plot_accuracy(accuracy: dict, ylabel: str = "prompts drawn right (checker)"):
    """Line plot of {(sampler, steps): value}: one line per sampler over the number of steps.

    Introduced in notebooks/02_reverse_denoising.ipynb.
    """
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for n in dict.fromkeys(n for n, _ in accuracy):
        ks = sorted(k for m, k in accuracy if m == n)
        ax.plot(ks, [accuracy[(n, k)] for k in ks], "o-", label=n)
    ax.set_xscale("log")
    ks = sorted({k for _, k in accuracy})
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("number of denoising steps")
    ax.set_ylabel(ylabel)
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


@torch.no_grad()
def replay(traj: Trajectory, guidance_scale: float) -> Trajectory:
    """An approximate trajectory for a new guidance scale, without calling the UNet.

    Runs the scheduler again from the same starting noise, but at each step recombines the
    *cached* model outputs: ``uncond_i + s * (cond_i - uncond_i)``. Step 0 is exact (its
    input x_T does not depend on s); from step 1 on the cached outputs were computed at the
    old trajectory's x_t, not at the new one, so the result is a preview whose error grows
    with the change in s. The returned Trajectory reuses the cached model outputs and says
    so in its ``scheduler`` field ("... (replayed)").

    Introduced in notebooks/05_guidance_and_widgets.ipynb.
    """
    s = checks.check_guidance(guidance_scale)
    if not isinstance(traj, Trajectory) or traj.pipe is None:
        checks.fail("traj", traj, "expected a Trajectory from sample() with its pipe attached")
    pipe = traj.pipe
    name = traj.scheduler.replace(" (replayed)", "")
    sched = (make_scheduler(name, pipe) if name in SCHEDULER_NAMES
             else type(pipe.scheduler).from_config(pipe.scheduler.config))
    sched.set_timesteps(traj.num_inference_steps, device="cpu")
    b = traj.batch_size
    seed = traj.seeds if len(traj.seeds) > 1 else traj.seeds[0]
    generator = _generator(seed)
    # draw the starting noise again: it advances the generator exactly as sample() did, so
    # DDPM's per-step noise is the same
    h, w = (n * pipe.vae_scale_factor for n in traj.latents.shape[-2:])
    latents = initial_latents(pipe, generator, b, h, w, dtype=pipe.unet.dtype).cpu().float()
    latents = latents * sched.init_noise_sigma
    step_kwargs = _step_kwargs(sched, generator, 0.0)
    lat, x0s = [latents], []
    for i, t in enumerate(sched.timesteps):
        noise_pred = traj.noise_pred_uncond[i] + s * (traj.noise_pred_cond[i]
                                                      - traj.noise_pred_uncond[i])
        x_in = sched.scale_model_input(torch.cat([latents] * 2), t)[b:]
        x0s.append(predicted_x0(x_in, noise_pred, traj.alphas_cumprod[i], traj.prediction_type))
        latents = sched.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
        lat.append(latents)
    return Trajectory(
        prompts=traj.prompts, negative_prompts=traj.negative_prompts, seeds=traj.seeds,
        guidance_scale=s, num_inference_steps=traj.num_inference_steps,
        scheduler=name + " (replayed)", prediction_type=traj.prediction_type,
        timesteps=traj.timesteps, latents=torch.stack(lat),
        noise_pred_cond=traj.noise_pred_cond, noise_pred_uncond=traj.noise_pred_uncond,
        pred_x0=torch.stack(x0s), alphas_cumprod=traj.alphas_cumprod, pipe=pipe,
    )


def check_pred_x0_exercise(answer, traj: Trajectory, step: int, item: int = 0) -> bool:
    """Checker for notebook 02's exercise: your predicted x_0 at ``step`` from x_t and the
    guided model output, compared with ``traj.pred_x0[step, item]``.

    ``answer``: a tensor (C, h, w), or None (not attempted: prints a hint). Prints what is
    wrong and returns False, or prints "correct" and returns True.

    Introduced in notebooks/02_reverse_denoising.ipynb.
    """
    if not isinstance(traj, Trajectory):
        checks.fail("traj", traj, "expected a Trajectory from sdkit.sampling.sample")
    step = checks.check_int("step", step, 0, traj.num_inference_steps - 1)
    item = checks.check_int("item", item, 0, traj.batch_size - 1)
    want = traj.pred_x0[step, item]
    if answer is None:
        print("Not attempted yet. Hint: a = traj.alphas_cumprod[step]; the guided output is "
              "traj.noise_pred()[step]; for v-prediction x_0 = sqrt(a) x_t - sqrt(1 - a) v.")
        return False
    if not torch.is_tensor(answer):
        print(f"Expected a torch tensor of shape {tuple(want.shape)}, got {type(answer).__name__}.")
        return False
    answer = answer.detach().float().cpu()
    if answer.shape != want.shape:
        print(f"Expected shape {tuple(want.shape)} (one image's latents), "
              f"got {tuple(answer.shape)}.")
        return False
    err = (answer - want).abs().max().item()
    if err > 1e-4 * max(1.0, want.abs().max().item()):
        unguided = predicted_x0(traj._vp_latents()[step, item], traj.noise_pred_cond[step, item],
                                traj.alphas_cumprod[step], traj.prediction_type)
        hint = (" It matches the *conditional* output's x_0: use the guided prediction."
                if (answer - unguided).abs().max().item() < 1e-4 else "")
        print(f"Not yet: max |difference| = {err:.3g}.{hint} Check which of sqrt(a) and "
              f"sqrt(1 - a) multiplies x_t ({traj.prediction_type}).")
        return False
    print(f"Correct: max |difference| = {err:.2g}.")
    return True

