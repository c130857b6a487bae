"""Looking at runs of the denoising loop (notebook 02): a trajectory's pictures step by step
and as an animation, how far each step's guess of x_0 is from the end result, the samplers
compared over numbers of steps, and the checker of notebook 02's exercise (x_0 from a
v-prediction).

The loop itself and its record (``sample``, ``Trajectory``) are ``sdkit.sampling``'s; this
module only runs ``sample`` and draws what it recorded.

Left out: interactive views (notebook 05's panel), attention maps (notebook 03).
"""

from __future__ import annotations

import tempfile

import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from . import checks, figures
from .device import check_memory
from .sampling import SCHEDULER_NAMES, Trajectory, sample

# ----------------------------------------------------------------------------- samplers compared


def compare_schedulers(pipe, prompts: list[str], seeds: list[int],
                       steps_list=(5, 10, 25, 50), names=SCHEDULER_NAMES,
                       guidance_scale: float | None = None) -> dict:
    """Final images for every sampler and number of steps: {(name, steps): [PIL, ...]}.

    Each (name, steps) is one batched ``sample`` call over all prompts (one seed per
    prompt), with a tqdm bar over the runs.

    Introduced in notebooks/02_reverse_denoising.ipynb.
    """
    for n in names:
        checks.check_choice("names", n, SCHEDULER_NAMES)
    steps_list = [checks.check_steps(n, "steps_list") for n in steps_list]
    runs = [(n, k) for n in names for k in steps_list]
    return {(name, k): sample(pipe, list(prompts), list(seeds), k, guidance_scale,
                              scheduler=name).images()
            for name, k in tqdm(runs, desc="samplers x steps")}


def scheduler_grid(results: dict, item: int = 0, scale: int = 2):
    """One image per (sampler, steps) of ``compare_schedulers``' results as a labelled
    matplotlib figure (``figures.image_grid``): a row per sampler, a column per number of
    steps. ``scale``: each picture's side in inches is ``scale`` (at most 2.5).

    Introduced in notebooks/02_reverse_denoising.ipynb.
    """
    names = list(dict.fromkeys(n for n, _ in results))
    steps = sorted({k for _, k in results})
    scale = checks.check_int("scale", scale, 1, 16)
    return figures.image_grid([[results[(n, k)][item] for k in steps] for n in names],
                              row_titles=names, col_titles=[f"{k} steps" for k in steps],
                              size=min(float(scale), 2.5),
                              title="the same prompt and seed, by sampler and number of steps")


@figures.styled
def plot_accuracy(accuracy: dict, ylabel: str = "prompts drawn right (checker)"):
    """Line plot of {(sampler, steps): value}: one line per sampler over the number of steps.

    Introduced in notebooks/02_reverse_denoising.ipynb.
    """
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for n in dict.fromkeys(n for n, _ in accuracy):
        ks = sorted(k for m, k in accuracy if m == n)
        ax.plot(ks, [accuracy[(n, k)] for k in ks], "o-", label=n)
    ax.set_xscale("log")
    ks = sorted({k for _, k in accuracy})
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set(xlabel="number of denoising steps", ylabel=ylabel, ylim=(-0.05, 1.05))
    ax.grid(alpha=0.3)
    ax.set_title("prompts drawn right, by sampler")
    ax.legend()
    return fig


# ----------------------------------------------------------------------------- one trajectory


def plot_trajectory(traj: Trajectory, item: int = 0, max_steps: int = 5, vae: bool = True):
    """A matplotlib figure: x_t (top row) and the predicted x_0 (bottom row) at each step.

    ``max_steps``: at most this many evenly spaced steps (first and last included).
    ``vae=False`` uses the cheap linear ``preview`` instead of the decoder.

    Introduced in notebooks/02_reverse_denoising.ipynb.
    """
    max_steps = checks.check_int("max_steps", max_steps, 1, 100)
    n = Trajectory.checked(traj).num_inference_steps
    idx = sorted({int(round(v)) for v in np.linspace(0, n - 1, min(n, max_steps))})
    xt = traj.latent_images(item) if vae else traj.preview("latents", item)
    x0 = traj.pred_x0_images(item) if vae else traj.preview("pred_x0", item)
    return figures.image_grid([[xt[i] for i in idx], [x0[i] for i in idx]],
                              row_titles=["x_t", "predicted x_0"],
                              col_titles=[f"step {i}, t={int(traj.timesteps[i])}" for i in idx],
                              title=f"{traj.prompts[item]!r}, {traj.scheduler}, "
                                    f"s={traj.guidance_scale:g}")


def trajectory_gif(traj: Trajectory, path=None, item: int = 0, scale: int = 3,
                   ms_per_frame: int = 300) -> str:
    """Write an animated GIF of x_t (left) and the predicted x_0 (right), one frame per step
    plus two frames of the final image; returns its path (a temporary file by default).
    Show it with ``IPython.display.Image(filename=path)``.

    Introduced in notebooks/02_reverse_denoising.ipynb.
    """
    scale = checks.check_int("scale", scale, 1, 16)
    ms_per_frame = checks.check_int("ms_per_frame", ms_per_frame, 20, 10_000)
    n, (h, w) = Trajectory.checked(traj).num_inference_steps, traj.latents.shape[-2:]
    f = traj.pipe.vae_scale_factor if traj.pipe is not None else 8
    check_memory("scale", scale, (n + 3) * (2 * w * f + 4) * h * f * scale**2 * 3 * 2,
                 f"{n + 3} frames enlarged {scale} times", device="cpu")
    xt, x0 = traj.latent_images(item), traj.pred_x0_images(item)
    w, h = xt[0].size
    frames = []
    for a, b in list(zip(xt, x0)) + [(xt[-1], xt[-1])] * 2:
        f = Image.new("RGB", (2 * w + 4, h), (255, 255, 255))
        f.paste(a, (0, 0))
        f.paste(b, (w + 4, 0))
        frames.append(f.resize((f.size[0] * scale, h * scale), Image.Resampling.NEAREST))
    if path is None:
        path = tempfile.NamedTemporaryFile(suffix=".gif", prefix="sdkit_", delete=False).name
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=ms_per_frame, loop=0)
    return str(path)


def distance_to_final(traj: Trajectory, item: int = 0) -> np.ndarray:
    """Mean absolute pixel difference (0..1) between each step's decoded predicted x_0 and
    the final image: how far from the end result each step's guess is.

    Introduced in notebooks/02_reverse_denoising.ipynb.
    """
    final = np.asarray(Trajectory.checked(traj).images()[item], dtype=np.float32) / 255
    return np.array([np.abs(np.asarray(im, dtype=np.float32) / 255 - final).mean()
                     for im in traj.pred_x0_images(item)])


# ----------------------------------------------------------------------------- exercise

_V_MISTAKES = {  # what a usual wrong formula computes -> what to say about it
    "sqrt(1 - a) x_t - sqrt(a) v": (lambda x, v, a: (1 - a).sqrt() * x - a.sqrt() * v,
                                    "the two coefficients are swapped"),
    "sqrt(a) x_t + sqrt(1 - a) v": (lambda x, v, a: a.sqrt() * x + (1 - a).sqrt() * v,
                                    "the sign of the v term is wrong"),
    "(x_t - sqrt(1 - a) v) / sqrt(a)": (lambda x, v, a: (x - (1 - a).sqrt() * v) / a.sqrt(),
                                        "that is the epsilon formula with v in place of epsilon; "
                                        "v is not the noise"),
    "a x_t - (1 - a) v": (lambda x, v, a: a * x - (1 - a) * v,
                          "the coefficients need square roots: x_t mixes sqrt(a) x_0 and "
                          "sqrt(1 - a) eps"),
}


def check_pred_x0_from_v(fn, traj: Trajectory | None = None) -> bool:
    """Checker for notebook 02's exercise: ``fn(x_t, v, alpha_bar)`` must return the clean
    latents x_0 that a v-prediction implies (v = sqrt(a) eps - sqrt(1 - a) x_0 with
    x_t = sqrt(a) x_0 + sqrt(1 - a) eps, a = ``alpha_bar``, a 0-d tensor).

    Tried on made-up latents whose x_0 is known, at a from 0.999 down to 0 (the toy's t = T),
    and, for a v-prediction ``traj``, on its middle step against ``traj.pred_x0``. Prints what
    is right or wrong, with a hint about the usual mistakes, and returns True or False; a
    ``fn`` that is None, returns None or raises is reported, never raised.

    Introduced in notebooks/02_reverse_denoising.ipynb.
    """
    if fn is None:
        print("not solved yet: define pred_x0_from_v(x_t, v, alpha_bar).")
        return False
    if not callable(fn):
        print(f"Expected a function pred_x0_from_v(x_t, v, alpha_bar), got {type(fn).__name__}.")
        return False
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn((2, 4, 8, 8), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    for a_value in (0.999, 0.7, 0.3, 0.01, 0.0):
        a = torch.tensor(a_value)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        v = a.sqrt() * eps - (1 - a).sqrt() * x0
        try:
            got = fn(x_t.clone(), v.clone(), a.clone())
        except Exception as e:  # a learner's bug: report it
            print(f"pred_x0_from_v raised {type(e).__name__}: {e} (at alpha_bar = {a_value}).")
            return False
        if got is None:
            print("not solved yet: pred_x0_from_v returns None (replace the `...`).")
            return False
        if not torch.is_tensor(got) or got.shape != x0.shape:
            print(f"Expected a tensor shaped like x_t {tuple(x0.shape)}, got "
                  f"{tuple(got.shape) if torch.is_tensor(got) else type(got).__name__}.")
            return False
        err = (got.float() - x0).abs().max().item()
        if not err < 1e-4:  # also catches nan
            hint = next((f" It computes {name}: {why}." for name, (wrong, why) in
                         _V_MISTAKES.items() if torch.allclose(got.float(), wrong(x_t, v, a),
                                                               atol=1e-4, equal_nan=True)), "")
            print(f"Not yet: at alpha_bar = {a_value} your x_0 is off by up to {err:.3g}.{hint} "
                  "Hint: write x_0 = c1 x_t + c2 v, put in x_t and v in terms of x_0 and eps, "
                  "and choose c1 and c2 so that the eps terms cancel and the x_0 terms add up "
                  "to x_0 (sqrt(a)^2 + sqrt(1 - a)^2 = 1 helps).")
            return False
    note = ""
    if traj is not None and Trajectory.checked(traj).prediction_type == "v_prediction":
        k = traj.num_inference_steps // 2
        x_t, a = traj.vp_latents()[k, 0], traj.alphas_cumprod[k]
        try:
            mine = fn(x_t.clone(), traj.noise_pred()[k, 0], a.clone())
            err = (mine.float() - traj.pred_x0[k, 0]).abs().max().item()
        except Exception as e:  # e.g. a function that only works on the made-up shapes
            print(f"Right on made-up latents, but on step {k} of traj it raised "
                  f"{type(e).__name__}: {e}.")
            return False
        if not err < 1e-4:
            print(f"Right on made-up latents, but on step {k} of traj it is off by {err:.3g}: "
                  "pass the guided prediction traj.noise_pred()[k] and x_t as the UNet saw it.")
            return False
        note = f" On step {k} of traj it gives traj.pred_x0[{k}] (max difference {err:.1g})."
    print("Right: x_0 = sqrt(a) x_t - sqrt(1 - a) v, exact on made-up latents from a = 0.999 "
          f"down to a = 0, where it gives -v.{note} The epsilon formula divides by sqrt(a) "
          "instead: at zero SNR it has no answer, one reason the toy model predicts v.")
    return True
