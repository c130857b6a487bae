"""Classifier-free guidance measured: what the scale s buys and costs, and guidance rescale.

Notebook 06 runs one batch of prompts and seeds at several settings (s, phi) and measures
what changes with them; phi is ``guidance_rescale`` (Lin et al., 2024, *Common Diffusion
Noise Schedules and Sample Steps Are Flawed*, section 3.4), as diffusers' pipelines take it:

- ``sample_rescaled``: the denoising loop of ``StableDiffusionPipeline.__call__`` with its
  ``guidance_rescale`` (same images as ``pipe(..., guidance_rescale=phi)`` with the same
  generators), recording at each step the spread of the guided prediction over the spread
  of the conditional one, std(noise_pred) / std(noise_pred_text), per image;
- ``sweep``: that for a list of settings, one batched run each, with a progress bar;
- ``diversity``: how different the pictures of one prompt are across seeds (mean pairwise
  RMS pixel distance, averaged over the prompts);
- ``plot_grid``, ``plot_measures``, ``plot_spread``: the sweep's pictures, its measured
  figures against s, and its spread ratio at each step;
- ``check_rescale``: the checker of notebook 06's exercise (guidance rescale written by hand).

The guidance formula itself is ``sampling.combine`` (notebook 06 also shows, in a cell, that
combining in epsilon, v or x0 space gives one step). The interactive panel is
``sdkit.widgets``.

Left out: other fixes of large guidance (dynamic thresholding, guidance intervals, CFG++),
negative prompts in the sweep, and one guidance scale per image within a batch.
"""

from __future__ import annotations

import inspect
import itertools
from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from tqdm.auto import tqdm

from . import checks, figures
from .images import MAX_BATCH, check_generation_memory, decode_to_pil, initial_latents
from .pipeline import encode_prompt, make_generators, resolve_settings


@dataclass(eq=False)
class GuidedRun:
    """One batched run of ``sample_rescaled``: the final ``images`` (PIL, one per seed, in
    the order of ``prompts`` and ``seeds``), the settings, the ``timesteps`` (S,) and
    ``std_ratio`` (S, B): at each step and for each image, std(noise_pred) /
    std(noise_pred_text) over all of the image's latent values, with the prediction the
    scheduler stepped with (after rescale). 1 at s = 1, and at every s when phi = 1.

    Introduced in notebooks/06_guidance_and_widgets.ipynb.
    """

    prompts: list[str]
    seeds: list[int]
    guidance_scale: float
    guidance_rescale: float
    num_inference_steps: int
    timesteps: torch.Tensor
    images: list
    std_ratio: torch.Tensor

    @property
    def setting(self) -> tuple[float, float]:
        """(guidance_scale, guidance_rescale), the key of this run in ``sweep``'s dict."""
        return self.guidance_scale, self.guidance_rescale


def _spread(x: torch.Tensor) -> torch.Tensor:
    """One standard deviation per image, over every dim but the batch: (B,)."""
    return x.float().flatten(1).std(dim=1)


@torch.no_grad()
def sample_rescaled(pipe, prompts, seeds, guidance_scale: float | None = None,
                    guidance_rescale: float = 0.0,
                    num_inference_steps: int | None = None) -> GuidedRun:
    """Images of ``prompts`` (one str, or one per seed) from ``seeds`` (one CPU generator
    per image), with classifier-free guidance at ``guidance_scale`` and diffusers'
    ``guidance_rescale`` (phi in [0, 1]; 0: plain guidance). Steps and scale default to
    ``default_settings(pipe)``. At most ``MAX_BATCH`` images; a batch whose estimated
    memory is over ``sdkit.device.memory_limit`` is refused (``SDKIT_MEMORY_LIMIT``).

    The loop is the pipeline's, with the pipeline's scheduler (a fresh copy), so the images
    equal ``pipe(prompts, guidance_scale=s, guidance_rescale=phi, generator=...)``'s for
    s > 1. At s = 1 it runs the conditional branch alone (the formula gives it exactly, as
    the pipeline does at s <= 1); at any other s both branches, so s < 1 keeps its meaning
    (s = 0: the unconditional model), as in ``sampling.sample``.

    Introduced in notebooks/06_guidance_and_widgets.ipynb.
    """
    seeds = [checks.check_seed(s, "seeds") for s in checks.check_list("seeds", seeds)]
    prompts = checks.check_per_seed("prompts", prompts, len(seeds))
    steps, s = resolve_settings(pipe, num_inference_steps, guidance_scale)
    phi = checks.check_float("guidance_rescale", guidance_rescale, 0.0, 1.0)
    if len(seeds) > MAX_BATCH:
        checks.fail("seeds", f"a list of {len(seeds)} seeds", f"expected at most {MAX_BATCH} "
                    "images per run; split the prompts into several runs")
    for p in dict.fromkeys(prompts):
        checks.check_prompt(p, pipe.tokenizer, name="prompts", allow_empty=s == 0)
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    check_generation_memory(pipe, "seeds", f"{len(seeds)} seeds", len(seeds), side, side)

    # Copied from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion.
    # StableDiffusionPipeline.__call__ (its steps 3-7, with guidance always on and a record)
    generators = make_generators(seeds)
    cond, uncond = encode_prompt(pipe, prompts)
    prompt_embeds = torch.cat([uncond, cond])  # (2B, T, D)
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps, device=pipe.unet.device)
    latents = initial_latents(pipe, generators, len(seeds), dtype=prompt_embeds.dtype)
    latents = latents * scheduler.init_noise_sigma  # (B, C, h, w)
    accepted = set(inspect.signature(scheduler.step).parameters)
    step_kwargs = {k: v for k, v in (("eta", 0.0), ("generator", generators)) if k in accepted}
    both = s != 1  # s = 1 is the conditional prediction itself: one branch, half the work
    ratios = []
    for t in tqdm(scheduler.timesteps, desc=f"s={s:g}, rescale {phi:g}", leave=False, delay=2):
        x_in = scheduler.scale_model_input(torch.cat([latents] * 2) if both else latents, t)
        out = pipe.unet(x_in, t, encoder_hidden_states=prompt_embeds if both else cond,
                        return_dict=False)[0]  # (2B, C, h, w), or (B, ...) at s = 1
        noise_pred_uncond, noise_pred_text = out.chunk(2) if both else (out, out)
        noise_pred = noise_pred_uncond + s * (noise_pred_text - noise_pred_uncond)
        if phi > 0:
            noise_pred = rescale_noise_cfg(noise_pred, noise_pred_text, guidance_rescale=phi)
        ratios.append(_spread(noise_pred) / _spread(noise_pred_text))  # (B,)
        latents = scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
    return GuidedRun(prompts, seeds, s, phi, steps, scheduler.timesteps.detach().cpu().clone(),
                     decode_to_pil(pipe.vae, latents), torch.stack(ratios).cpu())


def sweep(pipe, prompts, seeds, settings, num_inference_steps: int | None = None) -> dict:
    """``sample_rescaled`` at each of ``settings`` (a list of (guidance_scale,
    guidance_rescale) pairs, or of scales alone for phi = 0; each checked as
    ``sample_rescaled`` checks its arguments), on the same prompts and seeds:
    {(s, phi): GuidedRun}, in the order given, one batched run per setting, with a progress
    bar over the settings.

    Introduced in notebooks/06_guidance_and_widgets.ipynb.
    """
    pairs = []
    for item in checks.check_list("settings", settings):
        pair = tuple(item) if isinstance(item, (tuple, list)) else (item, 0.0)
        if len(pair) != 2:
            checks.fail("settings", item, "expected (guidance_scale, guidance_rescale) pairs")
        pairs.append((checks.check_guidance(pair[0]),
                      checks.check_float("guidance_rescale", pair[1], 0.0, 1.0)))
    if len(set(pairs)) != len(pairs):
        checks.fail("settings", settings, "expected each (s, phi) once")
    runs = {}
    for s, phi in tqdm(pairs, desc="guidance settings", leave=False, delay=2):
        runs[s, phi] = sample_rescaled(pipe, prompts, seeds, s, phi, num_inference_steps)
    return runs


def diversity(images, prompts) -> float:
    """How different the pictures of one prompt are: for each prompt with two pictures or
    more, the mean over its pairs of the RMS pixel difference (pixels in [0, 1]), then the
    mean over those prompts. 0 when each prompt's pictures are identical; pictures of
    different prompts are never compared. ``prompts``: one per picture.

    Introduced in notebooks/06_guidance_and_widgets.ipynb.
    """
    images = checks.check_list("images", images)
    prompts = checks.check_per_seed("prompts", prompts, len(images))
    arrays = [np.asarray(im, dtype=np.float64) / 255 for im in images]
    if len({a.shape for a in arrays}) != 1:
        checks.fail("images", sorted({a.shape for a in arrays}), "expected pictures of one size")
    groups = {}
    for a, p in zip(arrays, prompts):
        groups.setdefault(p, []).append(a)
    per_prompt = [np.mean([np.sqrt(np.mean((a - b) ** 2))
                           for a, b in itertools.combinations(g, 2)])
                  for g in groups.values() if len(g) > 1]
    if not per_prompt:
        checks.fail("prompts", prompts, "expected at least one prompt with two pictures")
    return float(np.mean(per_prompt))


def _label(setting) -> str:
    s, phi = setting
    return f"s = {s:g}" + (f", rescale {phi:g}" if phi else "")


def _check_runs(runs) -> dict:
    if (not isinstance(runs, dict) or not runs
            or not all(isinstance(r, GuidedRun) for r in runs.values())):
        checks.fail("runs", type(runs).__name__, "expected sweep's dict {(s, phi): GuidedRun}")
    return runs


@figures.styled
def plot_grid(runs: dict, items, row_labels=None, size: float = 1.6):
    """The pictures of ``sweep``'s runs: one column per setting (at most 5, so that the
    pictures stay large enough to see), one row per batch index in ``items`` (labelled with
    ``row_labels``, default "prompt, seed N").

    Introduced in notebooks/06_guidance_and_widgets.ipynb.
    """
    runs = _check_runs(runs)
    if len(runs) > 5:
        checks.fail("runs", f"{len(runs)} settings", "expected at most 5 (one column each); "
                    "pass a part of the dict")
    first = next(iter(runs.values()))
    n = len(first.images)
    if any(len(r.images) != n for r in runs.values()):
        checks.fail("runs", [len(r.images) for r in runs.values()],
                    "expected runs of the same prompts and seeds (one sweep)")
    items = [checks.check_int("items", i, 0, n - 1) for i in checks.check_list("items", items)]
    if row_labels is None:
        row_labels = [f"{first.prompts[i]}, seed {first.seeds[i]}" for i in items]
    elif len(checks.check_list("row_labels", row_labels)) != len(items):
        checks.fail("row_labels", row_labels, f"expected {len(items)} labels, one per row")
    return figures.image_grid([[r.images[i] for r in runs.values()] for i in items],
                              row_titles=list(row_labels), col_titles=[_label(k) for k in runs],
                              size=checks.check_float("size", size, 0.5, 6.0),
                              title="the same prompts and seeds, by guidance setting")


MEASURES = {  # what plot_measures draws, when a table has it: key -> (panel title, y label)
    "one_shape_all_attributes": ("one-object prompts", "drawn right (checker)"),
    "two_shape_all_attributes": ("two-object prompts", "drawn right (checker)"),
    "diversity": ("diversity over seeds", "mean RMS distance"),
    "clipped": ("over-exposure", "clipped pixels (share)"),
}


@figures.styled
def plot_measures(table: dict):
    """Measured figures against the guidance scale: ``table`` maps (s, phi) to a dict of
    figures (``MEASURES``' keys: the checker's "one_shape_all_attributes" and
    "two_shape_all_attributes", "diversity", "clipped"), one panel per figure that every
    setting has, each from 0. Settings with phi = 0 are joined by a solid line, each phi > 0
    gets its own dotted line and markers (one legend for all panels, below them).

    Introduced in notebooks/06_guidance_and_widgets.ipynb.
    """
    if not isinstance(table, dict) or not table or not all(
            isinstance(k, tuple) and len(k) == 2 and isinstance(v, dict) for k, v in table.items()):
        checks.fail("table", type(table).__name__, "expected {(s, phi): {figure: value}}")
    keys = [k for k in MEASURES if all(k in v for v in table.values())]
    if not keys:
        checks.fail("table", sorted(next(iter(table.values()))),
                    f"expected some of {list(MEASURES)}")
    fig, axes = plt.subplots(1, len(keys), figsize=(2.45 * len(keys), 3.6), squeeze=False,
                             layout="constrained")
    phis = sorted({phi for _, phi in table})
    for ax, k in zip(axes[0], keys):
        for j, phi in enumerate(phis):
            pts = sorted((s, v[k]) for (s, p), v in table.items() if p == phi)
            ax.plot(*zip(*pts), color=f"C{j}", marker="o^sD"[j % 4], markersize=7,
                    linestyle="-" if phi == 0 else ":",
                    label="no rescale" if phi == 0 else f"rescale {phi:g}")
        top = max(v[k] for v in table.values())
        ax.set_ylim(0, 1.05 if k.endswith("attributes") else 1.1 * top if top > 0 else 1)
        ax.set_xlabel("guidance scale s")
        ax.set_ylabel(MEASURES[k][1])
        ax.set_title(MEASURES[k][0])
        ax.grid(alpha=0.3)
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="outside lower center",
               ncols=len(phis))
    fig.suptitle("what the guidance scale changes (the same prompts and seeds)")
    return fig


@figures.styled
def plot_spread(runs: dict):
    """``sweep``'s ``std_ratio`` at each step, the mean over the batch, one line per setting
    (log scale): how far the guided prediction's spread exceeds the conditional one's.

    Introduced in notebooks/06_guidance_and_widgets.ipynb.
    """
    runs = _check_runs(runs)
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for k, r in runs.items():
        ax.plot(range(r.num_inference_steps), r.std_ratio.mean(1).numpy(), marker="o",
                linestyle="-" if k[1] == 0 else ":", label=_label(k))
    ax.axhline(1.0, color="0.4", linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("step (0: the first, noisiest)")
    ax.set_ylabel("std(guided) / std(cond)")
    ax.set_title("the guided prediction's spread, over the conditional one's")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=figures.MIN_FONT_PT, ncols=2)
    return fig


def _rescale_variants(cfg, text, phi) -> dict:
    """The typical mistakes of notebook 06's exercise, each computed, with its hint."""
    def per(x, dims):
        return x.std(dim=dims, keepdim=True)

    def blend(r, c=cfg):
        return phi * r + (1 - phi) * c

    every = list(range(1, cfg.ndim))
    return {
        "one std over the whole batch: take it per image, over every dim but the batch "
        "(dim=list(range(1, x.ndim)), keepdim=True)": blend(cfg * text.std() / cfg.std()),
        "one std per channel: take it over every dim but the batch, channels included":
            blend(cfg * per(text, every[1:]) / per(cfg, every[1:])),
        "the std over the channels only: take it over every dim but the batch":
            blend(cfg * per(text, [1]) / per(cfg, [1])),
        "guidance_rescale applied the wrong way round: 1 keeps only the rescaled prediction, "
        "0 is plain CFG": (1 - phi) * cfg * per(text, every) / per(cfg, every) + phi * cfg,
        "the ratio upside down: scale the guided prediction by std(text) / std(cfg)":
            blend(cfg * per(cfg, every) / per(text, every)),
        "the rescaled prediction was not blended with noise_cfg by guidance_rescale":
            cfg * per(text, every) / per(cfg, every),
    }


def check_rescale(fn, seed: int = 0) -> bool:
    """Checker for notebook 06's exercise: ``fn(noise_cfg, noise_pred_text, guidance_rescale)``
    must return guidance rescale (Lin et al., 2024, section 3.4) as diffusers'
    ``rescale_noise_cfg`` computes it, on random batches whose images and channels have
    different spreads, for guidance_rescale 0, 1, 0.7 and 0.3. Prints what is right or wrong,
    naming the typical mistake it sees (std over the wrong dims, the blend the wrong way
    round, the ratio upside down), and returns True or False; a wrong answer never raises.
    None, or a function that returns None: not solved yet.

    Introduced in notebooks/06_guidance_and_widgets.ipynb.
    """
    g = torch.Generator("cpu").manual_seed(checks.check_seed(seed))
    if fn is None or not callable(fn):
        print("Exercise not solved yet: define my_rescale(noise_cfg, noise_pred_text, "
              "guidance_rescale)." if fn is None else
              f"Not yet: expected a function, got {type(fn).__name__}.")
        return False
    for phi in (0.7, 0.0, 1.0, 0.3):
        spread = torch.tensor([0.5, 1.0, 3.0]).view(3, 1, 1, 1) * torch.tensor(
            [1.0, 2.0, 0.5, 4.0]).view(1, 4, 1, 1)  # images and channels of different spread
        text = torch.randn(3, 4, 8, 8, generator=g) * spread
        cfg = 3 * text - 2 * torch.randn(3, 4, 8, 8, generator=g) * spread.flip(0)
        want = rescale_noise_cfg(cfg, text, phi)
        ok, got = checks.call_answer(fn, (cfg.clone(), text.clone(), phi), "my_rescale",
                                     "(does the std keep its dims, keepdim=True, so that it "
                                     "broadcasts against noise_cfg?)")
        if not ok:
            return False
        if not torch.is_tensor(got) or got.shape != want.shape:
            print(f"Not yet: expected a tensor of shape {tuple(want.shape)} (noise_cfg's), got "
                  f"{tuple(got.shape) if torch.is_tensor(got) else type(got).__name__}. Did "
                  "the std keep its dims (keepdim=True)?")
            return False
        if not torch.allclose(got.to(want.dtype), want, atol=1e-5, rtol=1e-4):
            close = [h for h, v in _rescale_variants(cfg, text, phi).items()
                     if got.shape == v.shape and torch.allclose(got.to(v.dtype), v, atol=1e-5)]
            print(f"Not yet at guidance_rescale = {phi:g} (max |difference| "
                  f"{(got - want).abs().max().item():.3g}). "
                  + (f"It looks like {close[0]}." if close else
                     "Hint: match the spread of the conditional (text) prediction, not of the "
                     "guided or the unconditional one; one std per image; then blend."))
            return False
    print("Correct: your rescale matches diffusers' rescale_noise_cfg at guidance_rescale 0, "
          "0.3, 0.7 and 1 (std's Bessel correction cancels in the ratio, so either is fine).")
    return True
