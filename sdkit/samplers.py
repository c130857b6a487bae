"""Samplers opened (notebook 02): the noise level sigma, the probability-flow ODE, and how far
DDIM, Euler, DPM-Solver++ and DDPM land from a many-step reference as the number of steps
grows.

The steps themselves are written out where they are taught: DDIM's step and DPM-Solver++'s
second-order update in notebook 02's cells, Euler's step by the learner (the exercise). This
module keeps what those cells call around them:

- ``run_samplers(pipe, prompts, seeds, steps_list, names)``: one batched ``sampling.sample``
  per (sampler, number of steps), all from the same starting noise: {(name, steps): Trajectory};
- the figures: ``plot_sigmas`` (sigma_t against t, log scale, with a sampler's visited
  sigmas), ``plot_x0_paths`` (the predicted x_0 along the way, against sigma) and
  ``plot_errors`` (distance to a reference against the number of steps, log-log);
- ``check_euler_step(fn, pipe)``: the exercise's checker, which compares the learner's step
  with ``EulerDiscreteScheduler.step`` and names the usual mistakes.

In Euler's variables (diffusers' ``EulerDiscreteScheduler`` keeps its ``sample`` this way) the
latents are x = x_0 + sigma * eps, sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), and the UNet
sees x_t = x / sqrt(sigma^2 + 1) (``scale_model_input``). The probability-flow ODE is
dx/dsigma = (x - x0_hat(x, sigma)) / sigma.

Left out: Heun and other samplers with two UNet calls per step (``sample`` refuses them;
notebook 02 describes Heun in words), Karras or exponential sigma spacings, Euler's "churn"
(``s_churn``) and ancestral Euler, DPM-Solver++'s third-order and SDE variants.
"""

from __future__ import annotations

import diffusers
import matplotlib.pyplot as plt
import numpy as np
import torch
from tqdm.auto import tqdm

from . import checks, figures
from .sampling import SCHEDULER_NAMES, Trajectory, make_scheduler, sample

# the toy model's noise schedule (SD's betas, rescaled to zero terminal SNR, trailing timesteps):
# what the exercise's checker steps on when it is given no pipeline
TOY_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "prediction_type": "v_prediction",
                "rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
                "clip_sample": False}

# ----------------------------------------------------------------------------- the runs


def run_samplers(pipe, prompts: list[str], seeds: list[int], steps_list=(1, 2, 3, 5, 10, 20),
                 names=("DDIM", "Euler", "DPM-Solver++", "DDPM"),
                 guidance_scale: float | None = None) -> dict:
    """Every sampler at every number of steps, from the same starting noise:
    {(name, steps): Trajectory}.

    Each (name, steps) is one batched ``sample`` call over all prompts (one seed per prompt:
    the same noise for every run), with a tqdm bar over the runs; ``Trajectory.images()``
    decodes a run's final pictures when asked (memoized).

    Introduced in notebooks/02_reverse_denoising.ipynb.
    """
    names = checks.check_list("names", names)
    for n in names:
        checks.check_choice("names", n, SCHEDULER_NAMES)
    steps_list = [checks.check_steps(k, "steps_list") for k in checks.check_list("steps_list",
                                                                                 steps_list)]
    runs = [(n, k) for n in names for k in steps_list]
    return {(name, k): sample(pipe, list(prompts), list(seeds), k, guidance_scale,
                              scheduler=name, progress=False)
            for name, k in tqdm(runs, desc="samplers x steps")}


# ----------------------------------------------------------------------------- figures


def _tensor_1d(name: str, value, n: int | None = None) -> torch.Tensor:
    if not torch.is_tensor(value) or value.ndim != 1 or (n is not None and len(value) != n):
        shown = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
        checks.fail(name, shown, "expected a 1-d tensor" + (f" of {n} values" if n else ""))
    return value.detach().float().cpu()


@figures.styled
def plot_sigmas(sigmas: torch.Tensor, timesteps: torch.Tensor, sampler_sigmas: torch.Tensor,
                sampler: str = "Euler"):
    """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) against t on a log scale, and the
    (t, sigma) a sampler visits as dots.

    ``sigmas``: (T,) for t = 0 .. T-1, infinite where alpha_bar_t = 0 (a zero-terminal-SNR
    schedule's t = T-1, drawn as an arrow at the top); ``timesteps``: (S,) the sampler's;
    ``sampler_sigmas``: (S + 1,) its sigmas, the last one (0, where sampling ends) written
    out, since a log scale cannot show it.

    Introduced in notebooks/02_reverse_denoising.ipynb.
    """
    sigmas = _tensor_1d("sigmas", sigmas)
    timesteps = _tensor_1d("timesteps", timesteps)
    sampler_sigmas = _tensor_1d("sampler_sigmas", sampler_sigmas, len(timesteps) + 1)
    t = torch.arange(len(sigmas))
    finite = torch.isfinite(sigmas) & (sigmas > 0)
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    ax.plot(t[finite], sigmas[finite], "-", color="0.3", label="training schedule")
    ax.plot(timesteps, sampler_sigmas[:-1], "o", color="C1",
            label=f"{sampler}'s {len(timesteps)} steps")
    top = float(sampler_sigmas.max())
    if not bool(finite[-1]):
        ax.annotate(f"t = {len(sigmas) - 1}: " + r"$\bar\alpha = 0$, $\sigma = \infty$;"
                    f"\n{sampler} starts at $\\sigma$ = {top:.0f}", xy=(len(sigmas) - 1, top),
                    xytext=(0.36, 0.92), textcoords="axes fraction", va="top",
                    arrowprops=dict(arrowstyle="->", color="0.3"))
    ax.text(0.02, 0.04, f"(and a last step to $\\sigma$ = {float(sampler_sigmas[-1]):g})",
            transform=ax.transAxes)
    ax.set_yscale("log")
    ax.set(xlabel="timestep t", ylabel=r"$\sigma_t$ (log scale)",
           title=r"noise level $\sigma_t = \sqrt{(1 - \bar\alpha_t)\, /\, \bar\alpha_t}$")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="center left")
    return fig


def _sigmas_of(traj: Trajectory) -> np.ndarray:
    a = traj.alphas_cumprod.double()
    return ((1 - a) / a).sqrt().numpy()  # inf where alpha_bar = 0 (DDIM's t = T)


@figures.styled
def plot_x0_paths(reference: Trajectory, runs: dict | None = None, item: int = 0,
                  n_values: int = 3):
    """The predicted clean latents x0_hat along the way, against sigma (log scale, falling
    from left to right as sampling goes): ``n_values`` latent values of batch item ``item``
    of ``reference`` as lines (the ones that move most), and the same values of each run in
    ``runs`` ({label: Trajectory} of the same prompt and seed) as dots at its own sigmas.

    Introduced in notebooks/02_reverse_denoising.ipynb.
    """
    runs = {} if runs is None else runs
    if not isinstance(runs, dict):
        checks.fail("runs", type(runs).__name__, "expected a dict {label: Trajectory}")
    item = checks.check_int("item", item, 0, Trajectory.checked(reference, "reference")
                            .batch_size - 1)
    n_values = checks.check_int("n_values", n_values, 1, 8)
    x0 = reference.pred_x0[:, item].flatten(1)  # (S, C*h*w)
    which = (x0[-1] - x0[0]).abs().topk(n_values).indices
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    s = _sigmas_of(reference)
    ok = np.isfinite(s)
    for j, c in enumerate(which):
        ax.plot(s[ok], x0[ok, c], "-", color=f"C{j}",
                label=f"{reference.num_inference_steps} steps (lines)" if j == 0 else None)
    for m, (label, tr) in enumerate(runs.items()):
        tr = Trajectory.checked(tr, f"runs[{label!r}]")
        if tr.batch_size <= item:
            checks.fail("runs", label, f"expected a Trajectory with a batch item {item}")
        sr, xr = _sigmas_of(tr), tr.pred_x0[:, item].flatten(1)
        okr = np.isfinite(sr)
        for j, c in enumerate(which):
            ax.plot(sr[okr], xr[okr, c], "os^Dv"[m % 5], color=f"C{j}", mfc="none", ms=8,
                    label=label if j == 0 else None)
    ax.set_xscale("log")
    ax.invert_xaxis()
    ax.set(xlabel=r"$\sigma$ (log scale; sampling runs left to right)",
           ylabel=r"$\hat x_0$: a few latent values",
           title=r"the prediction $\hat x_0$ along the way, against $\sigma$")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return fig


@figures.styled
def plot_errors(errors: dict, reference: str = "the reference"):
    """Distance to ``reference`` against the number of steps, log-log: one panel per
    measure in ``errors`` ({measure: {(sampler, steps): value}}), one line per sampler, and a
    dashed guide of slope -1 (the error halves when the steps double) over the first
    sampler's line.

    Introduced in notebooks/02_reverse_denoising.ipynb.
    """
    if not isinstance(errors, dict) or not errors or not all(
            isinstance(v, dict) and v for v in errors.values()):
        checks.fail("errors", type(errors).__name__,
                    "expected {measure: {(sampler, steps): value}}, at least one of each")
    fig, axes = plt.subplots(1, len(errors), figsize=(min(9.8, 4.9 * len(errors)), 4.0),
                             squeeze=False)
    for ax, (measure, values) in zip(axes[0], errors.items()):
        ks = sorted({k for _, k in values})
        names = list(dict.fromkeys(n for n, _ in values))
        for j, n in enumerate(names):  # markers shrink, so lines on top of each other show
            mine = sorted(k for m, k in values if m == n)
            ax.plot(mine, [values[(n, k)] for k in mine], "-", marker="os^Dv"[j % 5],
                    ms=max(4, 10 - 2 * j), label=n)
        first = sorted(k for m, k in values if m == names[0])
        mid = first[len(first) // 2]
        guide = np.array([mid, first[-1]], dtype=float)  # above the first sampler's line
        ax.plot(guide, 1.6 * values[(names[0], mid)] * mid / guide, "--", color="0.4",
                label=r"$\propto$ 1 / steps")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set(xlabel="number of denoising steps", ylabel=measure)
        ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=figures.MIN_FONT_PT)
    fig.suptitle(f"distance to {reference}, by sampler and number of steps")
    return fig


# ----------------------------------------------------------------------------- exercise


def _x0(x, out, s, p):
    """x0_hat in Euler's variables (x = x_0 + sigma eps; the UNet saw x / sqrt(sigma^2 + 1))."""
    if p == "v_prediction":
        return x / (s**2 + 1) - s / (s**2 + 1) ** 0.5 * out
    return x - s * out


def _euler(x, x0, s, sn):
    return x + (sn - s) * (x - x0) / s


_EULER_MISTAKES = (  # (prediction types, what a usual wrong step computes, what to say)
    (("v_prediction",), lambda x, o, s, sn, p: _euler(x, x / (s**2 + 1) ** 0.5
                                                      - s / (s**2 + 1) ** 0.5 * o, s, sn),
     "x0_hat's sample term must be sample / (sigma^2 + 1), yours divides by sqrt(sigma^2 + "
     "1) only once. The UNet saw x_t = sample / sqrt(sigma^2 + 1) (scale_model_input), and "
     "x0_hat = sqrt(alpha_bar) x_t - sqrt(1 - alpha_bar) v divides again, since "
     "sqrt(alpha_bar) = 1 / sqrt(sigma^2 + 1)"),
    (("v_prediction",), lambda x, o, s, sn, p: _euler(x, x - s * o, s, sn),
     "x0_hat = sample - sigma * model_output (the same as taking the model output for the "
     "derivative) is the epsilon-model's; the toy predicts v, which is not the noise"),
    (("epsilon",), lambda x, o, s, sn, p: _euler(x, _x0(x, o, s, "v_prediction"), s, sn),
     "for prediction_type 'epsilon' the model output is the noise: x0_hat = sample - sigma "
     "* eps_hat (the v formula does not apply)"),
    (("epsilon",), lambda x, o, s, sn, p: _euler(x, x * (s**2 + 1) ** 0.5 - s * o, s, sn),
     "the x_t formula (x_t - sqrt(1 - a) eps) / sqrt(a) was used on sample, which is "
     "already x_t * sqrt(sigma^2 + 1) = x_0 + sigma * eps"),
    (("v_prediction", "epsilon"),
     lambda x, o, s, sn, p: x + (s - sn) * (x - _x0(x, o, s, p)) / s,
     "the step goes the wrong way: sigma falls, so dt = sigma_next - sigma is negative"),
    (("v_prediction", "epsilon"),
     lambda x, o, s, sn, p: _euler(x, _x0(x, o, s, p), s, sn) / (sn**2 + 1) ** 0.5,
     "the result is on the x_t scale (what the UNet sees); Euler keeps sample = x_t * "
     "sqrt(sigma^2 + 1), so return the step in those variables"),
    (("v_prediction", "epsilon"), lambda x, o, s, sn, p: _x0(x, o, s, p),
     "that jumps straight to x0_hat; one step only moves from sigma to sigma_next"),
)


def _euler_cases(pipe, prediction_type: str, steps: int, g: torch.Generator):
    """(sample, model_output, sigma, sigma_next, diffusers' prev_sample) at every step."""
    config = TOY_SCHEDULE if pipe is None else make_scheduler("Euler", pipe).config
    sched = diffusers.EulerDiscreteScheduler.from_config(config, prediction_type=prediction_type)
    sched.set_timesteps(steps)
    for i, t in enumerate(sched.timesteps):
        s, sn = sched.sigmas[i], sched.sigmas[i + 1]
        x = torch.randn((2, 4, 8, 8), generator=g) + s * torch.randn((2, 4, 8, 8), generator=g)
        out = torch.randn((2, 4, 8, 8), generator=g)
        sched.scale_model_input(x, t)  # as the loop does (and diffusers asks for)
        yield x, out, s, sn, sched.step(out, t, x).prev_sample


def check_euler_step(fn, pipe=None) -> bool:
    """Checker for notebook 02's exercise: ``fn(sample, model_output, sigma, sigma_next,
    prediction_type)`` must return Euler's next ``sample``, as
    ``EulerDiscreteScheduler.step(model_output, t, sample).prev_sample`` does.

    Tried at every step of 10- and 3-step runs (sigma from the largest, 4096 on a zero-SNR
    schedule, down to 0) for "v_prediction" and "epsilon", on random latents, with the noise
    schedule of ``pipe`` (None: the toy model's). Prints what is right or wrong, with a hint
    about the usual mistakes (scaling, v taken for the noise, the sign of dt, the model output
    as the derivative, the x_t scale), and returns True or False; a ``fn`` that is None,
    returns None or raises is reported, never raised.

    Introduced in notebooks/02_reverse_denoising.ipynb.
    """
    if fn is None:
        print("not solved yet: define euler_step(sample, model_output, sigma, sigma_next, "
              "prediction_type).")
        return False
    if not callable(fn):
        print("Expected a function euler_step(sample, model_output, sigma, sigma_next, "
              f"prediction_type), got {type(fn).__name__}.")
        return False
    g = torch.Generator().manual_seed(0)
    n, worst = 0, 0.0
    for p in ("v_prediction", "epsilon"):
        for steps in (10, 3):
            for x, out, s, sn, want in _euler_cases(pipe, p, steps, g):
                where = (f"prediction_type={p!r}, {steps} steps, sigma = {float(s):.4g} -> "
                         f"sigma_next = {float(sn):.4g}")
                ok, got = checks.call_answer(fn, (x.clone(), out.clone(), s.clone(), sn.clone(), p),
                                             "euler_step", f"(at {where})")
                if not ok:
                    return False
                if not torch.is_tensor(got) or got.shape != x.shape:
                    print(f"Expected a tensor shaped like sample {tuple(x.shape)}, got "
                          f"{tuple(got.shape) if torch.is_tensor(got) else type(got).__name__}"
                          f" (at {where}).")
                    return False
                tol = 1e-5 * (1 + float(x.abs().max()))  # float32 rounding at sigma = 4096
                err = (got.float() - want).abs().max().item()
                if not err <= tol:  # also catches nan
                    hint = next((f" It looks like this: {why}." for kinds, wrong, why in
                                 _EULER_MISTAKES if p in kinds and torch.allclose(
                                     got.float(), wrong(x, out, s, sn, p), rtol=0, atol=tol)),
                                "")
                    print(f"Not yet: at {where} your step is off by up to {err:.3g}.{hint} "
                          "Hint: x0_hat from the model output at x_t = sample / sqrt(sigma^2 "
                          "+ 1), then sample + (sigma_next - sigma) * (sample - x0_hat) / "
                          "sigma.")
                    return False
                n, worst = n + 1, max(worst, err / (1 + float(x.abs().max())))
    print(f"Right: your step equals EulerDiscreteScheduler.step on {n} inputs (v and epsilon, "
          "10 and 3 steps, from the largest sigma down to 0; largest difference "
          f"{worst:.1g} of the inputs' size). In Euler's variables it is DDIM's step: "
          "sample_next = x0_hat + sigma_next * eps_hat.")
    return True
