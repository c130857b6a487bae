"""sdkit.sampling and sdkit.samplers (notebook 02): the hand-written denoising loop equals
diffusers' pipeline, and its records (predicted x_0, guidance) equal the library's own
computations; the steps notebook 02 writes by hand (DDIM's, Euler's in the reference solution,
DPM-Solver++'s 2M update) equal diffusers' ``scheduler.step``; the distance to a many-step
reference falls as steps grow; the exercise's checker accepts the reference solution and names
the usual wrong ones. Uses the tiny random pipeline of tests/conftest.py (the toy's tokenizer
and sampler, 64 px, 16 x 16 latents), so it needs no trained weights. (Bad inputs:
tests/test_bad_inputs.py, tests/mistakes_notebooks.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler

from sdkit import images, samplers, sampling

PROMPT = "a red circle on the left"


@pytest.fixture(scope="module")
def pipe(tiny_pipe):
    return tiny_pipe


def pipeline_output(pipe, prompt, generator, steps, scale, output_type, **kw):
    return pipe(prompt, num_inference_steps=steps, guidance_scale=scale, generator=generator,
                output_type=output_type, **kw).images


# ------------------------------------------------------------------ the loop == the pipeline


@pytest.mark.parametrize("name", sampling.SCHEDULER_NAMES)
def test_sample_equals_pipeline_bit_for_bit(pipe, name):
    own = pipe.scheduler
    try:
        pipe.scheduler = sampling.make_scheduler(name, pipe)
        g = torch.Generator("cpu").manual_seed(3)
        ref = pipeline_output(pipe, PROMPT, g, 4, 3.0, "latent")
        traj = sampling.sample(pipe, PROMPT, 3, 4, 3.0)  # scheduler=None: a copy of pipe's
    finally:
        pipe.scheduler = own
    assert traj.scheduler == name
    assert torch.equal(traj.latents[-1], ref.float())


def test_final_image_equals_pipeline_image(pipe):
    g = torch.Generator("cpu").manual_seed(11)
    ref = pipeline_output(pipe, PROMPT, g, 5, 4.0, "pil")[0]
    traj = sampling.sample(pipe, PROMPT, 11, 5, 4.0)
    assert np.array_equal(np.asarray(traj.image), np.asarray(ref))


def test_batch_with_seed_list_and_negative_prompt_equals_pipeline(pipe):
    prompts = [PROMPT, "a blue square at the top"]
    gens = [torch.Generator("cpu").manual_seed(s) for s in (1, 2)]
    ref = pipeline_output(pipe, prompts, gens, 3, 5.0, "latent",
                          negative_prompt=["a green triangle"] * 2)
    traj = sampling.sample(pipe, prompts, [1, 2], 3, 5.0, negative_prompt="a green triangle")
    assert torch.equal(traj.latents[-1], ref.float())
    assert traj.negative_prompts == ["a green triangle"] * 2
    # a single seed for a batch: one generator draws the whole batch, as in the pipeline
    ref1 = pipeline_output(pipe, prompts, torch.Generator("cpu").manual_seed(7), 3, 5.0, "latent")
    assert torch.equal(sampling.sample(pipe, prompts, 7, 3, 5.0).latents[-1], ref1.float())


def test_guidance_one_matches_pipeline_without_cfg_up_to_rounding(pipe):
    # the pipeline drops the unconditional branch at s <= 1; sample() keeps the formula
    ref = pipeline_output(pipe, PROMPT, torch.Generator("cpu").manual_seed(5), 4, 1.0, "latent")
    traj = sampling.sample(pipe, PROMPT, 5, 4, 1.0)
    assert torch.allclose(traj.latents[-1], ref.float(), atol=1e-4)
    # at s = 0 the pipeline still follows the prompt; sample() gives the unconditional model
    ref0 = pipeline_output(pipe, PROMPT, torch.Generator("cpu").manual_seed(5), 4, 0.0, "latent")
    uncond = sampling.sample(pipe, "", 5, 4, 0.0)
    traj0 = sampling.sample(pipe, PROMPT, 5, 4, 0.0)
    assert torch.allclose(ref0.float(), ref.float(), atol=1e-4)
    assert torch.allclose(traj0.latents[-1], uncond.latents[-1], atol=1e-5)
    assert not torch.allclose(traj0.latents[-1], ref.float(), atol=1e-3)


# ------------------------------------------------------------------ the trajectory's records


def test_trajectory_shapes_and_fields(pipe):
    traj = sampling.sample(pipe, [PROMPT, "a yellow triangle at the bottom"], [0, 1], 5, 2.5,
                           scheduler="DDIM")
    s, b, lat = 5, 2, (4, 16, 16)
    assert traj.timesteps.shape == (s,)
    assert traj.latents.shape == (s + 1, b, *lat)
    for name in ("pred_x0", "noise_pred_cond", "noise_pred_uncond"):
        assert getattr(traj, name).shape == (s, b, *lat), name
    assert traj.alphas_cumprod.shape == (s,)
    assert (traj.prompts, traj.seeds, traj.guidance_scale) == (
        [PROMPT, "a yellow triangle at the bottom"], [0, 1], 2.5)
    assert (traj.scheduler, traj.prediction_type, traj.num_inference_steps) == (
        "DDIM", "v_prediction", 5)
    assert traj.batch_size == 2 and traj.prompt == PROMPT and traj.seed == 0
    # the starting latents are the seeded noise, one CPU generator per seed, times
    # init_noise_sigma (1 for DDIM)
    noise = torch.cat([torch.randn((1, *lat), generator=torch.Generator("cpu").manual_seed(s))
                       for s in (0, 1)])
    assert torch.equal(traj.latents[0], noise)
    # timesteps run downwards; the noise level falls
    assert (traj.timesteps[1:] < traj.timesteps[:-1]).all()
    assert (traj.alphas_cumprod[1:] > traj.alphas_cumprod[:-1]).all()
    # DDIM's last step (t = 199, so t - 1000 // 5 < 0: alpha_prev = 1) lands on its x_0
    assert torch.allclose(traj.latents[-1], traj.pred_x0[-1], atol=1e-5)
    # the recorded guided prediction is uncond + s (cond - uncond)
    assert torch.equal(traj.noise_pred(), sampling.combine(traj.noise_pred_uncond,
                                                           traj.noise_pred_cond, 2.5))


def test_images_previews_and_decoding(pipe):
    traj = sampling.sample(pipe, PROMPT, 0, 3, 4.0)
    assert len(traj.images()) == 1 and traj.image.size == (64, 64)
    x0 = traj.pred_x0_images()
    xt = traj.latent_images()
    prev = traj.preview("pred_x0", size=32)
    assert len(x0) == 3 and len(xt) == 4 and len(prev) == 3
    assert prev[0].size == (32, 32) and x0[0].size == (64, 64)
    # the last x_t image is the final image (same latents, same decoder)
    assert np.array_equal(np.asarray(xt[-1]), np.asarray(traj.image))
    assert traj.pred_x0_images() is x0  # memoized


@pytest.mark.parametrize("prediction_type", ["v_prediction", "epsilon"])
def test_predicted_x0_formula_equals_ddim_pred_original_sample(pipe, prediction_type):
    sched = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type=prediction_type,
                                      rescale_betas_zero_snr=prediction_type == "v_prediction")
    sched.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    for t in sched.timesteps[1:]:  # t = 999 has alpha = 0 on the zero-SNR schedule
        x_t = torch.randn(2, 4, 8, 8, generator=g)
        out = torch.randn(2, 4, 8, 8, generator=g)
        want = sched.step(out, t, x_t).pred_original_sample
        got = sampling.predicted_x0(x_t, out, sched.alphas_cumprod[t], prediction_type)
        assert torch.allclose(got, want, atol=1e-5), int(t)


def test_predicted_x0_of_v_model_at_zero_snr_is_minus_v():
    # the toy model's first step: alpha_bar = 0, x_t is pure noise, so x_0 = -v
    v, x_t = torch.randn(4, 4, 4), torch.randn(4, 4, 4)
    assert torch.equal(sampling.predicted_x0(x_t, v, 0.0, "v_prediction"), -v)


def test_recorded_pred_x0_equals_scheduler_own(pipe):
    traj = sampling.sample(pipe, PROMPT, 2, 5, 3.0, scheduler="DDIM")
    sched = sampling.make_scheduler("DDIM", pipe)
    sched.set_timesteps(5)
    guided = traj.noise_pred()
    for i, t in enumerate(sched.timesteps):
        out = sched.step(guided[i], t, traj.latents[i])
        assert torch.allclose(traj.pred_x0[i], out.pred_original_sample, atol=1e-5)
        assert torch.allclose(traj.latents[i + 1], out.prev_sample, atol=1e-6)


def test_recorded_pred_x0_equals_euler_own(pipe):
    # Euler keeps x_t in sigma space; the formula works on the UNet's (scaled) input
    traj = sampling.sample(pipe, PROMPT, 2, 4, 3.0, scheduler="Euler")
    sched = sampling.make_scheduler("Euler", pipe)
    sched.set_timesteps(4)
    guided = traj.noise_pred()
    for i, t in enumerate(sched.timesteps):
        out = sched.step(guided[i], t, traj.latents[i])
        assert torch.allclose(traj.pred_x0[i], out.pred_original_sample, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ the linear latent -> RGB map


def test_fit_latent_rgb_map_recovers_a_known_linear_map():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 4, 8, 8, generator=g)
    true = torch.randn(5, 3, generator=g) * 0.2  # 4 channels + bias -> RGB
    rgb = torch.einsum("bchw,cd->bdhw", z, true[:4]) + true[4].reshape(1, 3, 1, 1)
    pictures = rgb.repeat_interleave(4, 2).repeat_interleave(4, 3)  # each latent pixel 4 x 4
    weights = sampling.fit_latent_rgb_map(z, pictures)
    assert weights.shape == (5, 3)
    assert torch.allclose(weights, true, atol=1e-5)
    # the preview applies the map (then clips to [-1, 1]) and enlarges
    assert torch.allclose(sampling.latents_to_rgb_preview(z, true), rgb.clamp(-1, 1), atol=1e-6)
    assert sampling.latents_to_rgb_preview(z, true, upsample=4).shape == (3, 3, 32, 32)


def test_preview_of_the_final_latents_approximates_the_final_image(pipe):
    traj = sampling.sample(pipe, PROMPT, 0, 3, 4.0)
    final = images.to_tensor(traj.images())  # (1, 3, 64, 64)
    preview = images.to_tensor(traj.preview("latents", size=64)[-1:])
    baseline = final.mean((2, 3), keepdim=True).expand_as(final)  # the average colour
    assert images.psnr(preview, final) > images.psnr(baseline, final)


# ------------------------------------------------------------------ guidance


def test_combine_identities():
    g = torch.Generator().manual_seed(0)
    u, c = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    assert torch.equal(sampling.combine(u, c, 0.0), u)
    assert torch.allclose(sampling.combine(u, c, 1.0), c, atol=1e-6)
    # linear in s: the step from s to s + 1 adds (cond - uncond)
    assert torch.allclose(sampling.combine(u, c, 5.0) - sampling.combine(u, c, 4.0), c - u,
                          atol=1e-5)


# ------------------------------------------------------------------ checks


def test_make_scheduler_names(pipe):
    for name in sampling.SCHEDULER_NAMES:
        s = sampling.make_scheduler(name, pipe)
        assert s.config.prediction_type == "v_prediction"
        assert torch.equal(s.alphas_cumprod[:-1], pipe.scheduler.alphas_cumprod[:-1])
        assert sampling.scheduler_name(s) == name


NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOK = NOTEBOOKS / "02_reverse_denoising.ipynb"


def notebook_function(name):
    """The function ``name`` as notebook 02 writes it in a cell of its own (the cell that
    starts with ``def name(``), executed with torch only."""
    cells = json.loads(NOTEBOOK.read_text(encoding="utf-8"))["cells"]
    (source,) = ["".join(c["source"]) for c in cells
                 if c["cell_type"] == "code" and "".join(c["source"]).startswith(f"def {name}(")]
    namespace = {"torch": torch}
    exec(source, namespace)
    return namespace[name]


def reference_euler_step():
    namespace = {}  # the solution needs nothing from the notebook
    exec((NOTEBOOKS / "solutions" / "02_reverse_denoising.py").read_text(), namespace)
    return namespace["euler_step"]


# schedules of both kinds: the toy's (v, zero terminal SNR) and SD 1.x's (epsilon, not rescaled)
SCHEDULES = {
    "v_prediction": samplers.TOY_SCHEDULE,
    "epsilon": {**samplers.TOY_SCHEDULE, "prediction_type": "epsilon",
                "rescale_betas_zero_snr": False, "timestep_spacing": "leading",
                "steps_offset": 1},
}


@pytest.mark.parametrize("prediction_type", list(SCHEDULES))
@pytest.mark.parametrize("steps", [10, 3])
def test_notebook_ddim_step_equals_diffusers(prediction_type, steps):
    ddim_step = notebook_function("ddim_step")
    sched = DDIMScheduler.from_config(SCHEDULES[prediction_type])
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(steps)
    for t in sched.timesteps:
        x_t, out = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
        t_prev = t - sched.config.num_train_timesteps // steps  # as the notebook's cell
        a_prev = sched.alphas_cumprod[t_prev] if t_prev >= 0 else sched.final_alpha_cumprod
        mine = ddim_step(out, x_t, sched.alphas_cumprod[t], a_prev, prediction_type)
        assert torch.allclose(mine, sched.step(out, t, x_t).prev_sample, atol=1e-5), int(t)


@pytest.mark.parametrize("prediction_type", list(SCHEDULES))
@pytest.mark.parametrize("steps", [10, 3])
def test_reference_euler_step_equals_diffusers(prediction_type, steps):
    euler_step = reference_euler_step()
    sched = EulerDiscreteScheduler.from_config(SCHEDULES[prediction_type])
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(steps)
    for i, t in enumerate(sched.timesteps):
        s, s_next = sched.sigmas[i], sched.sigmas[i + 1]
        x = torch.randn(2, 4, 8, 8, generator=g) + s * torch.randn(2, 4, 8, 8, generator=g)
        out = torch.randn(2, 4, 8, 8, generator=g)
        sched.scale_model_input(x, t)  # as the loop does before every step
        want = sched.step(out, t, x).prev_sample
        got = euler_step(x, out, s, s_next, prediction_type)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * (1 + float(s))), (i, float(s))


@pytest.mark.parametrize("prediction_type", list(SCHEDULES))
def test_ddim_step_in_sigma_variables_is_euler_step(prediction_type):
    """Notebook 02, section 6: divided by sqrt(alpha_bar_prev), DDIM's step is Euler's."""
    ddim_step = notebook_function("ddim_step")
    sched = EulerDiscreteScheduler.from_config(SCHEDULES[prediction_type])
    sched.set_timesteps(7)
    g = torch.Generator().manual_seed(1)
    for i, t in enumerate(sched.timesteps):
        s, s_next = sched.sigmas[i], sched.sigmas[i + 1]
        x = torch.randn(1, 4, 8, 8, generator=g) + s * torch.randn(1, 4, 8, 8, generator=g)
        out = torch.randn(1, 4, 8, 8, generator=g)
        x_t = sched.scale_model_input(x, t)  # x / sqrt(sigma^2 + 1)
        via_ddim = ddim_step(out, x_t, 1 / (s**2 + 1), 1 / (s_next**2 + 1),
                             prediction_type) * (s_next**2 + 1).sqrt()
        assert torch.allclose(via_ddim, sched.step(out, t, x).prev_sample, rtol=1e-4,
                              atol=1e-4 * (1 + float(s))), i


def test_dpm_solver_2m_update_as_notebook_02_writes_it(pipe):
    """DPM-Solver++(2M): DDIM's step in sigma toward x0_hat extrapolated from the last two."""
    traj = sampling.sample(pipe, PROMPT, 4, 6, 3.0, scheduler="DPM-Solver++")
    dpm = sampling.make_scheduler("DPM-Solver++", pipe)
    dpm.set_timesteps(6)
    sig = dpm.sigmas.view(-1, 1, 1, 1, 1)
    x = traj.latents * (sig**2 + 1).sqrt()
    for i in range(1, 5):
        h, h_prev = (sig[i] / sig[i + 1]).log(), (sig[i - 1] / sig[i]).log()
        d = traj.pred_x0[i] + h / (2 * h_prev) * (traj.pred_x0[i] - traj.pred_x0[i - 1])
        assert torch.allclose(d + sig[i + 1] / sig[i] * (x[i] - d), x[i + 1], rtol=1e-4,
                              atol=1e-4), i
        plain = traj.pred_x0[i] + sig[i + 1] / sig[i] * (x[i] - traj.pred_x0[i])
        assert not torch.allclose(plain, x[i + 1], atol=1e-3), i  # not DDIM's step: it reuses
    # the first step has no earlier x0_hat, the last lands on sigma = 0: plain DDIM steps
    for i in (0, 5):
        plain = traj.pred_x0[i] + sig[i + 1] / sig[i] * (x[i] - traj.pred_x0[i])
        assert torch.allclose(plain, x[i + 1], rtol=1e-4, atol=1e-4), i


def test_distance_to_a_many_step_reference_falls_with_steps(pipe):
    """Notebook 02, section 8, on the tiny pipeline: deterministic samplers approach the
    reference as steps grow, DPM-Solver++ faster than DDIM, DDPM (stochastic) does not."""
    prompts, seeds = [PROMPT, "a blue square at the top"], [1, 2]
    reference = sampling.sample(pipe, prompts, seeds, 30, 3.0, scheduler="DPM-Solver++")
    runs = samplers.run_samplers(pipe, prompts, seeds, (2, 4, 10), ("DDIM", "DPM-Solver++",
                                                                    "DDPM"), 3.0)
    assert set(runs) == {(n, k) for n in ("DDIM", "DPM-Solver++", "DDPM") for k in (2, 4, 10)}
    d = {key: (run.latents[-1] - reference.latents[-1]).pow(2).flatten(1).mean(1).sqrt().mean()
         for key, run in runs.items()}
    for name in ("DDIM", "DPM-Solver++"):
        assert d[(name, 2)] > d[(name, 4)] > d[(name, 10)], name
    assert d[("DDIM", 10)] < 0.5 * d[("DDIM", 2)]
    assert d[("DPM-Solver++", 10)] < 0.7 * d[("DDIM", 10)]
    assert d[("DDPM", 10)] > 2 * d[("DDIM", 10)]
    assert torch.equal(runs[("DDIM", 2)].latents[0], reference.latents[0])  # the same noise


def test_the_reference_solution_passes_the_checker(pipe, capsys):
    assert samplers.check_euler_step(reference_euler_step()) is True
    assert "Right: your step equals EulerDiscreteScheduler.step on 26 inputs" in \
        capsys.readouterr().out
    assert samplers.check_euler_step(reference_euler_step(), pipe) is True  # the pipe's schedule


def _x0(x, o, s, p):
    return x / (s**2 + 1) - s / (s**2 + 1) ** 0.5 * o if p == "v_prediction" else x - s * o


def _step(x0):
    return lambda x, o, s, sn, p: x + (sn - s) * (x - x0(x, o, s, p)) / s


@pytest.mark.parametrize("wrong, hint", [
    # sample used as the UNet's input (no scale_model_input), or sqrt(alpha_bar) forgotten
    (_step(lambda x, o, s, p: (x - s * o) / (s**2 + 1) ** 0.5 if p == "v_prediction"
           else x - s * o), "divides by sqrt(sigma^2 + 1) only once"),
    (_step(lambda x, o, s, p: x - s * o), "v, which is not the noise"),  # v taken for eps
    (lambda x, o, s, sn, p: x + (sn - s) * o, "v, which is not the noise"),  # output as slope
    (_step(lambda x, o, s, p: _x0(x, o, s, "v_prediction")), "the model output is the noise"),
    (_step(lambda x, o, s, p: _x0(x, o, s, p) if p == "v_prediction"
           else x * (s**2 + 1) ** 0.5 - s * o), "already x_t * sqrt(sigma^2 + 1)"),
    (lambda x, o, s, sn, p: x - (sn - s) * (x - _x0(x, o, s, p)) / s, "wrong way"),  # dt sign
    (lambda x, o, s, sn, p: _step(_x0)(x, o, s, sn, p) / (sn**2 + 1) ** 0.5, "x_t scale"),
    (lambda x, o, s, sn, p: _x0(x, o, s, p), "jumps straight to x0_hat"),
    (lambda x, o, s, sn, p: x + (sn - s) * (x - _x0(x, o, s, p)) / sn.clamp(min=1e-3),
     "Hint: x0_hat from the model output"),  # slope at the wrong sigma: the general hint
])
def test_checker_names_the_usual_mistakes(wrong, hint, capsys):
    assert samplers.check_euler_step(wrong) is False
    out = capsys.readouterr().out
    assert out.startswith("Not yet:") and hint in out, out


def test_checker_reports_unsolved_and_broken_answers_without_raising(capsys):
    def unsolved(sample, model_output, sigma, sigma_next, prediction_type):
        ...

    for answer in (None, unsolved):
        assert samplers.check_euler_step(answer) is False
        assert "not solved yet" in capsys.readouterr().out
    assert samplers.check_euler_step(lambda x, o, s, sn: x) is False  # no prediction_type
    assert "raised TypeError" in capsys.readouterr().out
    assert samplers.check_euler_step(lambda x, o, s, sn, p: x[0]) is False
    assert "Expected a tensor shaped like sample" in capsys.readouterr().out
    assert samplers.check_euler_step(lambda x, o, s, sn, p: x * float("nan")) is False
    assert "off by up to nan" in capsys.readouterr().out
    assert samplers.check_euler_step("x + dt * d") is False
    assert "Expected a function" in capsys.readouterr().out
