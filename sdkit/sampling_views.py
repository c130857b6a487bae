"""Looking at runs of the denoising loop (notebook 02): a trajectory's pictures step by step
and as an animation, how far each step's guess of x_0 is from the end result, the samplers
compared over numbers of steps, and the checker of notebook 02's exercise.

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

from . import checks
from .sampling import SCHEDULER_NAMES, Trajectory, predicted_x0, sample

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


def _bare(ax, title: str = "", ylabel: str = ""):
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)
    if ylabel:
        ax.set_ylabel(ylabel, fontsize=9)


def scheduler_grid(results: dict, item: int = 0, scale: int = 2):
    """One image per (sampler, steps) of ``compare_schedulers``' results as a labelled
    matplotlib figure: a row per sampler, a column per number of steps.

    Introduced in notebooks/02_reverse_denoising.ipynb.
    """
    names = list(dict.fromkeys(n for n, _ in results))
    steps = sorted({k for _, k in results})
    fig, axes = plt.subplots(len(names), len(steps), squeeze=False,
                             figsize=(0.9 * scale * len(steps), 0.9 * scale * len(names)))
    for r, n in enumerate(names):
        for c, k in enumerate(steps):
            axes[r, c].imshow(results[(n, k)][item])
            _bare(axes[r, c], f"{k} steps" if r == 0 else "", n if c == 0 else "")
    fig.tight_layout()
    return fig


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
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- one trajectory


def plot_trajectory(traj: Trajectory, item: int = 0, max_steps: int = 10, vae: bool = True):
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
    fig, axes = plt.subplots(2, len(idx), figsize=(1.5 * len(idx), 3.4), squeeze=False)
    for col, i in enumerate(idx):
        for row, (ims, label) in enumerate(((xt, "x_t"), (x0, "predicted x_0"))):
            axes[row, col].imshow(ims[i])
            _bare(axes[row, col], ylabel=label if col == 0 else "")
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
    scale = checks.check_int("scale", scale, 1, 16)
    ms_per_frame = checks.check_int("ms_per_frame", ms_per_frame, 20, 10_000)
    xt, x0 = Trajectory.checked(traj).latent_images(item), traj.pred_x0_images(item)
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


def check_pred_x0_exercise(answer, traj: Trajectory, step: int, item: int = 0) -> bool:
    """Checker for notebook 02's exercise: your predicted x_0 at ``step`` from x_t and the
    guided model output, compared with ``traj.pred_x0[step, item]``.

    ``answer``: a tensor (C, h, w), or None (not attempted: prints a hint). Prints what is
    wrong and returns False, or prints "correct" and returns True.

    Introduced in notebooks/02_reverse_denoising.ipynb.
    """
    step = checks.check_int("step", step, 0, Trajectory.checked(traj).num_inference_steps - 1)
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
        unguided = predicted_x0(traj.vp_latents()[step, item], traj.noise_pred_cond[step, item],
                                traj.alphas_cumprod[step], traj.prediction_type)
        hint = (" It matches the *conditional* output's x_0: use the guided prediction."
                if (answer - unguided).abs().max().item() < 1e-4 else "")
        print(f"Not yet: max |difference| = {err:.3g}.{hint} Check which of sqrt(a) and "
              f"sqrt(1 - a) multiplies x_t ({traj.prediction_type}).")
        return False
    print(f"Correct: max |difference| = {err:.2g}.")
    return True
