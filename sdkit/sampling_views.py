"""Looking at one run of the denoising loop (notebook 02): a trajectory's pictures step by
step and as an animation, and how far each step's guess of x_0 is from the end result.

The loop itself and its record (``sample``, ``Trajectory``) are ``sdkit.sampling``'s; this
module only draws what it recorded. The samplers compared, sigma and the probability-flow
ODE, and notebook 02's exercise checker (one Euler step): ``sdkit.samplers``.

Left out: interactive views (notebook 06's panel), attention maps (notebook 04).
"""

from __future__ import annotations

import tempfile

import numpy as np
from PIL import Image

from . import checks, figures
from .device import check_memory
from .sampling import Trajectory

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
