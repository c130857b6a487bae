"""Classifier-free guidance to play with: an ipywidgets panel over the denoising loop.

``GuidancePanel(pipe)`` shows a prompt box, sliders for the guidance scale and the number of
steps, a seed, a sampler choice, the generated image and a strip of the predicted clean image
x_0 at each step. Sliders have ``continuous_update=False``: work starts when you let go.

How it stays fast. Every run of the loop is a ``sdkit.sampling.Trajectory`` and is cached
under (prompt, negative prompt, seed, steps, sampler), one per guidance scale; text
embeddings are cached per prompt. Moving the guidance slider then does, in order:

1. an exact trajectory for this scale is cached: redraw it (no UNet call, no VAE call);
2. else, at once, an **approximate preview** (labelled so in the panel): ``replay``
   re-runs the scheduler with the *cached* conditional and unconditional predictions
   recombined with the new scale. Only step 0 of that is exact: from step 1 on, x_t itself
   depends on the scale used in the steps before, and the cached predictions were made at
   the old x_t;
3. then the **exact** image: the loop re-run with the new scale from the cached text
   embeddings (one UNet call per step), which replaces the preview and is cached.

``GuidancePanel(pipe, exact=False)`` stops after step 2 (for slow machines or big models).
The settings are checked by ``sampling.sample`` alone (the panel does not check them again;
the widgets' ranges bound the numbers; a redraw from the cache checks nothing). Errors in a
callback (for instance a word the toy model has no token for) are shown in the panel's error
line; the panel keeps its last good image and keeps working.

Stable CSS class names, for browser tests (e.g. Playwright in JupyterLab) and styling:

=====================  =============================================================
``sdkit-panel``        the whole panel (a VBox)
``sdkit-prompt``       prompt text box (applies on Enter or when it loses focus)
``sdkit-negative``     negative prompt text box ("" = the plain unconditional branch)
``sdkit-guidance``     guidance scale slider (FloatSlider 0..15, continuous_update=False)
``sdkit-steps``        number of steps slider (IntSlider, continuous_update=False)
``sdkit-seed``         seed box (BoundedIntText, 0..checks.SEED_MAX like every seed)
``sdkit-scheduler``    sampler drop-down (DDPM, DDIM, Euler, DPM-Solver++)
``sdkit-image``        the generated image (ipywidgets.Image, PNG)
``sdkit-strip``        predicted x_0 at each step (ipywidgets.Image, PNG)
``sdkit-status``       "exact", "exact (cached)" or "approximate preview", with timings
``sdkit-error``        the last error message, empty when all is well
=====================  =============================================================

Also here: ``replay``, the preview. The guidance measurements of notebook 06 (the sweep over
scales and guidance rescale, its plots, the exercise's checker) are ``sdkit.guidance``.

Left out: threads (the exact image is computed right after the preview in the same
callback, so nbval and scripts see deterministic results), image-to-image and
multi-prompt weighting.
"""

from __future__ import annotations

import html
import io
import time
from collections import OrderedDict

import ipywidgets as W
from PIL import Image
from traitlets import validate

from . import checks, device, images, sampling
from .pipeline import default_settings, encode_prompt, is_toy

CSS = {
    "panel": "sdkit-panel", "prompt": "sdkit-prompt", "negative": "sdkit-negative",
    "guidance": "sdkit-guidance", "steps": "sdkit-steps", "seed": "sdkit-seed",
    "scheduler": "sdkit-scheduler", "image": "sdkit-image", "strip": "sdkit-strip",
    "status": "sdkit-status", "error": "sdkit-error",
}
MAX_THUMBS = 10  # steps shown in the x_0 strip at most (evenly spaced, first and last included)


def _refusing(cls):
    """A bounded ipywidget class that refuses a value outside [min, max] instead of clamping it
    (ipywidgets' own behaviour): the value stays as it was and the widget's ``refused(widget,
    value)`` callback, when set, is told (the panel shows it in its error line)."""

    class Refusing(cls):
        @validate("value")
        def _validate_value(self, proposal):
            value = proposal["value"]
            if self.min <= value <= self.max:
                return value
            if getattr(self, "refused", None) is not None:
                self.refused(self, value)
            return self.value

    Refusing.__name__ = cls.__name__
    return Refusing


_FloatSlider, _IntSlider, _SeedBox = map(_refusing, (W.FloatSlider, W.IntSlider,
                                                     W.BoundedIntText))


def replay(traj: sampling.Trajectory, guidance_scale: float) -> sampling.Trajectory:
    """An approximate trajectory for a new guidance scale, without calling the UNet:
    ``sampling.sample`` again with the trajectory's settings and its cached model outputs
    (``cached_outputs``). Exact at step 0 only: later steps' x_t differ from the ones the
    outputs were computed at. Its ``scheduler`` field says "... (replayed)".

    Introduced in notebooks/06_guidance_and_widgets.ipynb.
    """
    if sampling.Trajectory.checked(traj).pipe is None:
        checks.fail("traj.pipe", None, "expected a Trajectory with its pipe attached")
    name = traj.scheduler.replace(" (replayed)", "")
    h, w = (n * traj.pipe.vae_scale_factor for n in traj.latents.shape[-2:])
    out = sampling.sample(traj.pipe, traj.prompts, traj.seeds if len(traj.seeds) > 1
                          else traj.seed, traj.num_inference_steps, guidance_scale,
                          scheduler=name if name in sampling.SCHEDULER_NAMES else None,
                          height=h, width=w,
                          cached_outputs=(traj.noise_pred_uncond, traj.noise_pred_cond))
    out.scheduler, out.negative_prompts = name + " (replayed)", traj.negative_prompts  # labels
    return out


def _png_bytes(image, size: int | None = None) -> bytes:
    """A PIL image as PNG bytes, upscaled (nearest neighbour) to ``size`` wide when given."""
    if size is not None:
        image = image.resize((size, round(image.size[1] * size / image.size[0])),
                             Image.Resampling.NEAREST)
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _strip_steps(num_steps: int) -> list[int]:
    """Which steps the strip shows: all of them up to ``MAX_THUMBS``, else evenly spaced ones
    that always include the first and the last."""
    if num_steps <= MAX_THUMBS:
        return list(range(num_steps))
    return sorted({round(i * (num_steps - 1) / (MAX_THUMBS - 1)) for i in range(MAX_THUMBS)})


class GuidancePanel:
    """An ipywidgets panel: prompt, guidance scale, steps, seed and sampler -> image + x_0 strip.

    ``pipe``: a StableDiffusionPipeline (the toy model or real weights). The other arguments
    are the starting values (None: the kit's defaults for this pipeline, ``default_settings``),
    checked against the sliders' ranges (``max_steps``, ``max_guidance``). A value set later
    from code outside a widget's range is not clamped (as ipywidgets would): the widget keeps
    its value and the error line says what is allowed. ``exact``: after
    an approximate preview, also compute the exact image (default True; see the module
    docstring for what is exact when). ``strip``: "vae" decodes each shown step's x_0 with the
    VAE (one batched call, memoized); "preview" uses the trajectory's cheap linear
    latent-to-RGB map instead (no VAE). ``cache_size``: how many (prompt, seed, steps,
    sampler) settings to keep; they must fit in memory (the error gives the estimate and the
    limit; ``SDKIT_MEMORY_LIMIT=32GiB`` raises it).

    Display it as the last expression of a cell (``panel``) or with ``display(panel)``.
    Drive it from code by setting widget values (``panel.guidance_slider.value = 7.5``):
    the same callback runs as for a slider moved by hand. ``panel.status_mode`` is
    "exact", "exact (cached)", "approximate preview" or "error"; ``panel.error_text`` the
    error line as plain text ("" when all is well); ``panel.timings`` holds the seconds the
    last update took.

    Introduced in notebooks/06_guidance_and_widgets.ipynb.
    """

    def __init__(self, pipe, prompt: str | None = None, seed: int = 0,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 scheduler: str | None = None, negative_prompt: str = "", exact: bool = True,
                 strip: str = "vae", image_size: int = 256, max_steps: int = 50,
                 max_guidance: float = 15.0, cache_size: int = 32):
        d = default_settings(pipe)  # the starting values; the sliders' ranges are the check
        if prompt is None:
            prompt = "a red circle on the left" if is_toy(pipe) else "a photo of a red apple"
        for name, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
            if not isinstance(text, str):  # the text boxes need one; sample checks the rest
                checks.fail(name, text, "expected a str (\"\" for no negative prompt)")
        seed = checks.check_seed(seed)
        max_steps = checks.check_steps(max_steps, "max_steps")
        steps = checks.check_int("num_inference_steps", d["num_inference_steps"]
                                 if num_inference_steps is None else num_inference_steps,
                                 1, max_steps)
        max_guidance = checks.check_float("max_guidance", max_guidance, 1.0, 50.0)
        s = checks.check_float("guidance_scale", d["guidance_scale"] if guidance_scale is None
                               else guidance_scale, 0.0, max_guidance)
        if scheduler is None:
            own = sampling.scheduler_name(pipe.scheduler)
            scheduler = own if own in sampling.SCHEDULER_NAMES else "DPM-Solver++"
        checks.check_choice("scheduler", scheduler, sampling.SCHEDULER_NAMES)
        self.exact = checks.check_bool("exact", exact)
        self.strip_mode = checks.check_choice("strip", strip, ("vae", "preview"))
        self.image_size = checks.check_int("image_size", image_size, 32, 2048)
        self.cache_size = checks.check_int("cache_size", cache_size, 1, 10_000)
        side = pipe.unet.config.sample_size  # a cached run keeps ~4 latents per step, float32
        side = side if isinstance(side, int) else side[0]
        device.check_memory("cache_size", cache_size, 16 * cache_size * max_steps * side**2
                            * pipe.unet.config.in_channels, f"{cache_size} cached runs of up "
                            f"to {max_steps} steps", pipe.device)
        self.pipe = pipe

        lay = W.Layout(width="95%")
        self.prompt_box = W.Text(value=prompt, description="prompt", continuous_update=False,
                                 layout=lay)
        self.negative_box = W.Text(value=negative_prompt, description="negative",
                                   continuous_update=False, layout=lay,
                                   placeholder="empty: the unconditional branch uses \"\"")
        self.guidance_slider = _FloatSlider(value=s, min=0.0, max=max_guidance, step=0.5,
                                             description="guidance", continuous_update=False,
                                             readout_format=".1f")
        self.steps_slider = _IntSlider(value=steps, min=1, max=max_steps, description="steps",
                                        continuous_update=False)
        self.seed_box = _SeedBox(value=seed, min=0, max=checks.SEED_MAX,
                                         description="seed")
        self.scheduler_dropdown = W.Dropdown(options=list(sampling.SCHEDULER_NAMES),
                                             value=scheduler, description="sampler")
        self.image = W.Image(format="png", width=self.image_size, height=self.image_size)
        self.strip = W.Image(format="png", layout=W.Layout(max_width="100%"))
        self.status = W.HTML()
        self.error = W.HTML()
        for name, w in (("prompt", self.prompt_box), ("negative", self.negative_box),
                        ("guidance", self.guidance_slider), ("steps", self.steps_slider),
                        ("seed", self.seed_box), ("scheduler", self.scheduler_dropdown),
                        ("image", self.image), ("strip", self.strip),
                        ("status", self.status), ("error", self.error)):
            w.add_class(CSS[name])
        controls = W.VBox([self.prompt_box, self.negative_box,
                           W.HBox([self.guidance_slider, self.steps_slider]),
                           W.HBox([self.seed_box, self.scheduler_dropdown])])
        self.widget = W.VBox([controls, self.error, self.image,
                              W.Label("predicted x\u2080 at each step (left: first step)"),
                              self.strip, self.status])
        self.widget.add_class(CSS["panel"])
        for w in (self.guidance_slider, self.steps_slider, self.seed_box):
            w.refused = self._refused

        self._runs: OrderedDict = OrderedDict()  # key -> {guidance: Trajectory}
        self._embeds: OrderedDict = OrderedDict()  # (prompt, negative) -> (cond, uncond)
        self.trajectory: sampling.Trajectory | None = None
        self.status_mode = self.error_text = ""  # error_text: the error line as plain text
        self.timings: dict[str, float] = {}
        self._update()  # the first image; a bad prompt (or seed, ...) raises here
        for w in (self.prompt_box, self.negative_box, self.guidance_slider, self.steps_slider,
                  self.seed_box, self.scheduler_dropdown):
            w.observe(self._on_change, names="value")

    # ------------------------------------------------------------------ display
    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    # ------------------------------------------------------------------ settings
    def settings(self) -> dict:
        """The panel's current settings, as the widgets hold them (their ranges bound the
        numbers; ``sampling.sample`` checks everything when a setting is first computed)."""
        return {"prompt": self.prompt_box.value, "negative_prompt": self.negative_box.value or None,
                "seed": int(self.seed_box.value),
                "num_inference_steps": int(self.steps_slider.value),
                "scheduler": self.scheduler_dropdown.value,
                "guidance_scale": float(self.guidance_slider.value)}

    @staticmethod
    def _key(st: dict) -> tuple:
        return (st["prompt"], st["negative_prompt"], st["seed"], st["num_inference_steps"],
                st["scheduler"])

    # ------------------------------------------------------------------ work
    def _on_change(self, change):
        self.update()

    def update(self):
        """Recompute (or redraw from the cache) for the widgets' current values.

        Never raises: an error is shown in the panel's error line and the last good image
        stays. Returns the mode it ended in."""
        try:
            self._update()
        except Exception as e:  # shown in the panel: a notebook callback must not die
            self._error(e)
        return self.status_mode

    def _refused(self, widget, value):
        """A value outside a widget's range, set from code: said in the error line, not clamped
        (the widget keeps its value, and the image stays)."""
        name, hint = {id(self.guidance_slider): ("guidance_scale", "max_guidance"),
                      id(self.steps_slider): ("num_inference_steps", "max_steps"),
                      id(self.seed_box): ("seed", None)}[id(widget)]
        self._error(checks.SdkitInputError(checks.message(
            name, value, f"expected a value in [{widget.min}, {widget.max}], the panel's range"
                         + (f" (GuidancePanel({hint}=...) widens it)" if hint else "")
                         + f"; it keeps {widget.value}")))

    def _error(self, e: Exception):
        self.status_mode = "error"
        self.error_text = f"{type(e).__name__}: {e}"
        self.error.value = (f"<span style='color:#b00020'><b>{type(e).__name__}:</b> "
                            f"{html.escape(str(e))}</span>")

    def _update(self):
        t0 = time.perf_counter()
        self.timings = {}
        st = self.settings()
        key, s = self._key(st), st["guidance_scale"]
        runs = self._runs.get(key)
        if runs is not None and s in runs:
            self._runs.move_to_end(key)
            self._show(runs[s], "exact (cached)")
            self.timings["cached_redraw_s"] = time.perf_counter() - t0
        else:
            if runs:
                nearest = min(runs, key=lambda g: abs(g - s))
                self._show(replay(runs[nearest], s), "approximate preview",
                           note=f"from cached predictions at s={nearest:g}"
                                + ("; computing the exact image..." if self.exact else ""))
                self.timings["preview_s"] = time.perf_counter() - t0
            if self.exact or not runs:
                self._show(self._run(st), "exact")
                self.timings["exact_s"] = time.perf_counter() - t0
        self.error.value = self.error_text = ""

    def _run(self, st: dict) -> sampling.Trajectory:
        """The loop for these settings, from cached text embeddings when the prompt was seen
        (``sample`` checks every setting; only checked ones enter the caches)."""
        k = (st["prompt"], st["negative_prompt"])
        emb = self._embeds.get(k)
        negatives = checks.check_negative_prompt(k[1], self.pipe.tokenizer, 1)
        if emb is None:
            emb = encode_prompt(self.pipe, [k[0]], negatives)
        traj = sampling.sample(self.pipe, st["prompt"], st["seed"], st["num_inference_steps"],
                               st["guidance_scale"], scheduler=st["scheduler"],
                               text_embeddings=emb)  # the negative prompt is in emb already
        traj.negative_prompts = negatives  # so the trajectory says what its uncond branch was
        key = self._key(st)
        self._embeds[k] = emb
        self._runs.setdefault(key, {})[st["guidance_scale"]] = traj
        for cache, last in ((self._embeds, k), (self._runs, key)):
            cache.move_to_end(last)
            while len(cache) > self.cache_size:
                cache.popitem(last=False)
        return traj

    def strip_image(self, traj: sampling.Trajectory):
        """The x_0 strip of a trajectory as one PIL image (``strip`` mode decides how)."""
        idx = _strip_steps(traj.num_inference_steps)

        def make():
            ims = (traj.decode(traj.pred_x0[idx, 0]) if self.strip_mode == "vae"
                   else [traj.preview("pred_x0")[i] for i in idx])
            return images.hstack(ims, thumb=64)

        return traj._memoized(("strip", self.strip_mode, tuple(idx)), make)

    def _show(self, traj: sampling.Trajectory, mode: str, note: str = ""):
        self.image.value = _png_bytes(traj.image, self.image_size)
        self.strip.value = _png_bytes(self.strip_image(traj))
        self.trajectory, self.status_mode = traj, mode
        colour = "#a15c00" if mode == "approximate preview" else "#1b5e20"
        self.status.value = (f"<span style='color:{colour}'><b>{mode}</b></span> - "
                             f"{traj.scheduler}, {traj.num_inference_steps} steps, "
                             f"s={traj.guidance_scale:g}, seed {traj.seed}"
                             + (f" ({html.escape(note)})" if note else ""))

    # ------------------------------------------------------------------ for tests and notebooks
    def image_bytes(self) -> bytes:
        """The PNG bytes currently shown in the image widget."""
        return bytes(self.image.value)
