"""The reverse (denoising) process, step by step: the loop of a Stable Diffusion pipeline, recorded.

``sample(pipe, prompt, seed, ...)`` runs exactly the loop of diffusers'
``StableDiffusionPipeline.__call__`` (same order of operations: on the CPU the final image is
bit-identical to ``pipe(...)`` with the same seed and settings) and returns a ``Trajectory``:
per step the timestep, the latents x_t, the raw conditional and unconditional model outputs
and the predicted clean latents x_0. The loop itself::

    latents = randn(shape, generator) * scheduler.init_noise_sigma      # (B, 4, h, w)
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(cat([latents] * 2), t)         # (2B, 4, h, w)
        uncond, cond = unet(x_in, t, cat([uncond_embeds, cond_embeds])).chunk(2)
        noise_pred = uncond + s * (cond - uncond)                        # classifier-free guidance
        latents = scheduler.step(noise_pred, t, latents).prev_sample
    image = vae.decode(latents / vae.config.scaling_factor)

Prompt encoding, starting noise and decoding are the ground's (``sdkit.pipeline``,
``sdkit.images``). ``make_scheduler(name, pipe)`` swaps the sampler (DDPM, DDIM, Euler,
DPM-Solver++) on the pipeline's own noise schedule; ``predicted_x0`` turns a model output
into a guess of the clean latents; ``sample(..., cached_outputs=...)`` re-steps cached model
outputs at a new guidance scale (``sdkit.widgets.replay``, notebook 06's quick preview).
``Trajectory.preview`` uses a linear latent -> RGB map (``fit_latent_rgb_map``,
``latents_to_rgb_preview``: the ground's, ``sdkit.images``, re-exported here; notebook 05
explains it). Plots of one run: ``sdkit.sampling_views``; sigma, the
probability-flow ODE, the samplers compared against a many-step reference and notebook 02's
exercise checker: ``sdkit.samplers``.

Left out: img2img/inpainting starts (notebooks 08/09 build on ``Trajectory``), guidance
rescale (``sdkit.guidance``, notebook 06), IP-adapters, LCM-style guidance embeddings, and
second-order samplers that call the UNet twice per step (Heun): every sampler here makes one
UNet call per timestep.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import diffusers
import torch
from PIL import Image
from tqdm.auto import tqdm

from . import checks
from .device import check_memory
from .images import (
    MAX_BATCH,
    check_generation_memory,
    decode_to_pil,
    fit_latent_rgb_map,
    latents_to_rgb_preview,
    to_pil,
    to_tensor,
)
from .pipeline import encode_prompt, initial_latents, make_generators, resolve_settings

_SCHEDULER_CLASSES = {"DDPM": diffusers.DDPMScheduler, "DDIM": diffusers.DDIMScheduler,
                      "Euler": diffusers.EulerDiscreteScheduler,
                      "DPM-Solver++": diffusers.DPMSolverMultistepScheduler}
SCHEDULER_NAMES = tuple(_SCHEDULER_CLASSES)  # ("DDPM", "DDIM", "Euler", "DPM-Solver++")
# what a scheduler object handed to sample() takes from the pipeline's own scheduler config:
# the model's training schedule and the range of its latents, never the class's defaults
MODEL_SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
                       "trained_betas", "prediction_type", "rescale_betas_zero_snr",
                       "timestep_spacing", "steps_offset", "clip_sample", "clip_sample_range",
                       "thresholding", "sample_max_value", "dynamic_thresholding_ratio")


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
    cls = _SCHEDULER_CLASSES[name]
    if name == "DPM-Solver++":
        return cls.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++")
    return cls.from_config(pipe.scheduler.config)


def scheduler_name(scheduler) -> str:
    """The kit's name for a scheduler object ("DDIM", ...), else its class name.

    Introduced in notebooks/02_reverse_denoising.ipynb.
    """
    names = {cls: name for name, cls in _SCHEDULER_CLASSES.items()}
    return names.get(type(scheduler), type(scheduler).__name__)


def _fresh_sampler(scheduler, pipe):
    """The sampler one run steps with, with no state left over from an earlier run."""
    if scheduler is None:
        return type(pipe.scheduler).from_config(pipe.scheduler.config)
    if isinstance(scheduler, str):
        return make_scheduler(scheduler, pipe)
    if not all(hasattr(scheduler, a) for a in ("step", "set_timesteps", "config")):
        checks.fail("scheduler", scheduler, f"expected None, one of {list(SCHEDULER_NAMES)} or "
                                            "a diffusers scheduler object")
    if getattr(scheduler, "order", 1) != 1 or not hasattr(scheduler, "alphas_cumprod"):
        checks.fail("scheduler", type(scheduler).__name__, "expected a sampler with one UNet call "
                                                           "per step and alphas_cumprod (order 1;"
                                                           " second-order ones are left out)")
    accepted = inspect.signature(type(scheduler).__init__).parameters
    model = {k: pipe.scheduler.config[k] for k in MODEL_SCHEDULE_KEYS
             if k in pipe.scheduler.config and k in accepted}
    own = {k: v for k, v in scheduler.config.items() if k != "_use_default_values"}
    return type(scheduler).from_config({**own, **model})  # (listed defaults would be dropped)


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

    Introduced in notebooks/06_guidance_and_widgets.ipynb.
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

    Introduced in notebooks/06_guidance_and_widgets.ipynb.
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


# ----------------------------------------------------------------------------- the record


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

    @staticmethod
    def checked(traj, name: str = "traj") -> Trajectory:
        """``traj`` if it is a Trajectory, else the kit's input error."""
        if not isinstance(traj, Trajectory):
            checks.fail(name, traj, "expected a Trajectory from sdkit.sampling.sample")
        return traj

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
        the scale used before them (see ``sample``'s ``cached_outputs``)."""
        s = self.guidance_scale if guidance_scale is None else checks.check_guidance(guidance_scale)
        return combine(self.noise_pred_uncond, self.noise_pred_cond, s)

    # ----------------------------------------------------------------- decoding
    def decode(self, latents: torch.Tensor, batch_size: int = 16) -> list:
        """PIL images of latents (N, C, h, w): ``vae.decode(latents / scaling_factor)``,
        ``batch_size`` at a time, post-processed exactly like the pipeline's output."""
        if self.pipe is None:
            checks.fail("pipe", None, "this Trajectory has no pipeline attached to decode with; "
                                      "set traj.pipe = pipe")
        return decode_to_pil(self.pipe.vae, latents, batch_size=batch_size)

    def _memoized(self, key, make):
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    def images(self) -> list:
        """The final images, one per batch item (equal to the pipeline's with the same seed)."""
        return self._memoized("final", lambda: self.decode(self.latents[-1]))

    @property
    def image(self):
        """The first final image."""
        return self.images()[0]

    def pred_x0_images(self, item: int = 0) -> list:
        """The predicted clean image at each step, (S) PIL images, decoded in one batch."""
        item = checks.check_int("item", item, 0, self.batch_size - 1)
        return self._memoized(("pred_x0", item), lambda: self.decode(self.pred_x0[:, item]))

    def latent_images(self, item: int = 0) -> list:
        """x_t decoded by the VAE at each step plus the final latents, (S + 1) PIL images.

        The VAE was never trained on noisy latents, so these show noise "as the decoder sees
        it"; with Euler, x_t is divided by sqrt(sigma^2 + 1) first so it is on the same scale."""
        item = checks.check_int("item", item, 0, self.batch_size - 1)
        return self._memoized(("latents", item),
                              lambda: self.decode(self.vp_latents()[:, item]))

    def vp_latents(self) -> torch.Tensor:
        """latents on the variance-preserving scale: sqrt(a) x_0 + sqrt(1-a) eps."""
        if self.scheduler != "Euler":
            return self.latents
        a = torch.cat([self.alphas_cumprod, torch.ones(1)]).view(-1, 1, 1, 1, 1)
        return self.latents * a.sqrt()

    def preview(self, which: str = "pred_x0", item: int = 0, size: int | None = None) -> list:
        """Cheap previews without the VAE: each latent pixel mapped to RGB by a linear map.

        The map (C channels + bias -> RGB, ``fit_latent_rgb_map``) is fitted by least
        squares to this trajectory's final latents and its decoded final images (one VAE
        call, memoized), then applied to every step, so a whole strip costs one small matrix
        product. ``which``: "pred_x0" or "latents". ``size``: output side in pixels
        (default: the decoded image's size).
        """
        checks.check_choice("which", which, ("pred_x0", "latents"))
        item = checks.check_int("item", item, 0, self.batch_size - 1)
        weights = self._memoized("rgb_map", lambda: fit_latent_rgb_map(
            self.latents[-1], to_tensor(self.images())))
        lat = self.pred_x0[:, item] if which == "pred_x0" else self.vp_latents()[:, item]
        size = self.images()[0].size[0] if size is None else checks.check_int("size", size, 8,
                                                                               4096)
        check_memory("size", size, len(lat) * size * size * 3 * 2, f"{len(lat)} previews of "
                     f"{size}x{size}", device="cpu")
        return [im.resize((size, size), Image.Resampling.BILINEAR)
                for im in to_pil(latents_to_rgb_preview(lat, weights))]


# ----------------------------------------------------------------------------- the loop


def _check_embeddings(text_embeddings, n: int):
    if (not isinstance(text_embeddings, (tuple, list)) or len(text_embeddings) != 2
            or not all(torch.is_tensor(e) for e in text_embeddings)
            or text_embeddings[0].shape[0] != n
            or text_embeddings[0].shape != text_embeddings[1].shape):
        shown = [tuple(e.shape) if torch.is_tensor(e) else e for e in _as_list(text_embeddings)]
        checks.fail("text_embeddings", shown,
                    f"expected (cond, uncond) from encode_prompt, {n} rows each")
    return text_embeddings


@torch.no_grad()
def sample(pipe, prompt: str | list[str], seed: int | list[int] = 0,
           num_inference_steps: int | None = None, guidance_scale: float | None = None,
           scheduler=None, negative_prompt: str | list[str] | None = None,
           height: int | None = None, width: int | None = None, eta: float = 0.0,
           text_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
           cached_outputs: tuple[torch.Tensor, torch.Tensor] | None = None,
           progress: bool | None = None) -> Trajectory:
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
    ``SCHEDULER_NAMES`` or a diffusers scheduler object, copied (never mutated) and
    configured from the pipeline: it keeps its own sampling options but takes
    ``MODEL_SCHEDULE_KEYS`` (betas, prediction type, zero-SNR rescaling, timestep spacing,
    clipping) from ``pipe.scheduler.config``, so ``DDIMScheduler()`` with its defaults draws
    like ``"DDIM"``; second-order samplers (``order`` 2) are refused.
    ``negative_prompt``: replaces the empty prompt of the unconditional branch (not with
    ``text_embeddings`` or ``cached_outputs``, which fix that branch already).
    ``text_embeddings``: (cond, uncond) from ``encode_prompt`` to skip the text encoder
    (notebook 06's panel caches them). ``eta``: DDIM's noise level (0 = deterministic;
    refused non-zero for a scheduler that ignores it). At most ``MAX_BATCH`` prompts; a call
    whose estimated memory (the UNet, the VAE and the recorded trajectory) is over
    ``sdkit.device.memory_limit`` is refused (raise it with ``SDKIT_MEMORY_LIMIT``).
    ``progress``: None shows a bar when the loop takes more than 2 s, True always, False never.
    ``cached_outputs``: (uncond, cond), each (S, B, C, h, w), e.g. a trajectory's
    ``noise_pred_uncond`` and ``noise_pred_cond``: step with these instead of calling the
    text encoder and the UNet. With the trajectory's own settings this gives its latents
    back exactly; with a new guidance scale it is exact at step 0 only (later steps' x_t
    differ from the ones the outputs were computed at): a preview, as in notebook 06's panel.

    Introduced in notebooks/02_reverse_denoising.ipynb.
    """
    steps, s = resolve_settings(pipe, num_inference_steps, guidance_scale)
    eta = checks.check_float("eta", eta, 0.0, 1.0)
    prompts = checks.check_list("prompt", _as_list(prompt))
    if len(prompts) > MAX_BATCH:
        checks.fail("prompt", f"a list of {len(prompts)} prompts", f"expected at most {MAX_BATCH} "
                    "prompts per call (a trajectory records every step of each); for more "
                    "images use pipeline.generate_images, which runs them in batches")
    if cached_outputs is None:  # with cached outputs the prompts only label the result
        for p in prompts:
            checks.check_prompt(p, pipe.tokenizer, allow_empty=s == 0)
    negatives = checks.check_negative_prompt(negative_prompt, pipe.tokenizer, len(prompts))
    for given, what in ((text_embeddings, "text_embeddings"), (cached_outputs, "cached_outputs")):
        if given is not None and (negatives is not None or what == "text_embeddings"
                                  and cached_outputs is not None):
            checks.fail("negative_prompt" if negatives is not None else what, "given together "
                        f"with {what}", f"expected one of them: {what} already fix the "
                        "unconditional branch, so the other would be ignored")
    if progress is not None:
        checks.check_bool("progress", progress)
    generator = make_generators(seed)  # checks the seeds
    seeds = _as_list(seed)
    if isinstance(seed, (list, tuple)) and len(seeds) != len(prompts):
        checks.fail("seed", seed, f"expected an int or one seed per prompt ({len(prompts)})")
    sched = _fresh_sampler(scheduler, pipe)
    checks.check_eta(eta, sched)
    b = len(prompts)
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    hh, ww = checks.check_size(side if height is None else height,
                               side if width is None else width, multiple=pipe.vae_scale_factor)
    f2 = pipe.vae_scale_factor ** 2
    record = 4 * (steps + 1) * b * pipe.unet.config.in_channels * hh * ww // f2 * 4
    sized = height is not None or width is not None
    check_generation_memory(pipe, ("height" if hh >= ww else "width") if sized else "prompt",
                            max(hh, ww) if sized else f"{b} prompt(s)", b, hh, ww)
    check_memory("num_inference_steps", steps, record, f"the trajectory's record of {steps} "
                 f"steps x {b} image(s)", device="cpu")

    # 1. text: the prompt's embedding and the empty (or negative) prompt's, one batch [uncond, cond]
    if cached_outputs is None:
        if text_embeddings is None:
            text_embeddings = encode_prompt(pipe, prompts, negatives)
        cond, uncond = _check_embeddings(text_embeddings, b)
        prompt_embeds = torch.cat([uncond, cond])  # (2B, T, D)

        def model(i, x_in, t):  # (2B, C, h, w) -> uncond, cond (B, C, h, w) each
            out = pipe.unet(x_in, t, encoder_hidden_states=prompt_embeds, return_dict=False)[0]
            return out.chunk(2)
    else:
        def model(i, x_in, t):
            return cached_outputs[0][i].to(x_in), cached_outputs[1][i].to(x_in)

    # 2. timesteps and the starting noise
    sched.set_timesteps(steps, device=pipe.unet.device)
    dtype = pipe.unet.dtype if cached_outputs is not None else prompt_embeds.dtype
    latents = initial_latents(pipe, generator, b, height, width, dtype)
    if cached_outputs is not None:
        want = (steps, *latents.shape)
        given = _as_list(cached_outputs)
        if len(given) != 2 or any(getattr(o, "shape", None) != want for o in given):
            checks.fail("cached_outputs", [getattr(o, "shape", o) for o in given],
                        f"expected (uncond, cond), each of shape {want}")
    latents = latents * sched.init_noise_sigma  # (B, C, h, w)
    step_kwargs = _step_kwargs(sched, generator, eta)

    # 3. the loop, recorded
    rec = {k: [] for k in ("latents", "cond", "uncond", "x0", "a")}
    for i, t in enumerate(tqdm(sched.timesteps, desc="denoising", disable=progress is False,
                               delay=0 if progress else 2, leave=False)):
        rec["latents"].append(latents.detach().float().cpu())
        x_in = sched.scale_model_input(torch.cat([latents] * 2), t)  # (2B, C, h, w)
        noise_pred_uncond, noise_pred_cond = model(i, x_in, t)
        noise_pred = noise_pred_uncond + s * (noise_pred_cond - noise_pred_uncond)
        a = _alpha_prod(sched, t)
        x0 = predicted_x0(x_in[b:], noise_pred, a, sched.config.prediction_type)
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
