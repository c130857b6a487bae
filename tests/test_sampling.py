"""sdkit.sampling and sdkit.sampling_views: the hand-written denoising loop equals diffusers'
pipeline, and its records (predicted x_0, guidance) equal the library's own computations. Uses
the tiny random pipeline of tests/conftest.py (the toy's tokenizer and sampler, 64 px, 16 x 16
latents), so it needs no trained weights. (Bad inputs: tests/test_bad_inputs.py.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from sdkit import images, sampling, sampling_views

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


SOLUTIONS = Path(__file__).resolve().parent.parent / "notebooks" / "solutions"


def reference_pred_x0_from_v():
    namespace = {}  # the solution needs nothing from the notebook
    exec((SOLUTIONS / "02_reverse_denoising.py").read_text(), namespace)
    return namespace["pred_x0_from_v"]


def test_the_reference_solution_passes_the_checker(pipe, capsys):
    traj = sampling.sample(pipe, PROMPT, 0, 4, 3.0)  # the tiny pipeline predicts v, like the toy
    fn = reference_pred_x0_from_v()
    assert sampling_views.check_pred_x0_from_v(fn, traj) is True
    assert "On step 2 of traj" in capsys.readouterr().out
    assert sampling_views.check_pred_x0_from_v(fn) is True  # made-up latents only
    x_t, v = torch.randn(3, 4, 4), torch.randn(3, 4, 4)  # and it is predicted_x0's formula
    assert torch.allclose(fn(x_t, v, torch.tensor(0.3)),
                          sampling.predicted_x0(x_t, v, 0.3, "v_prediction"), atol=1e-6)


@pytest.mark.parametrize("wrong, hint", [
    (lambda x, v, a: (1 - a).sqrt() * x - a.sqrt() * v, "swapped"),
    (lambda x, v, a: a.sqrt() * x + (1 - a).sqrt() * v, "sign of the v term"),
    (lambda x, v, a: (x - (1 - a).sqrt() * v) / a.sqrt(), "epsilon formula"),  # v taken for eps
    (lambda x, v, a: a * x - (1 - a) * v, "square roots"),
    (lambda x, v, a: a.sqrt() * x - (1 - a).sqrt() * v + 0.01, "Hint: write x_0 = c1 x_t"),
])
def test_checker_names_the_usual_mistakes(wrong, hint, capsys):
    assert sampling_views.check_pred_x0_from_v(wrong) is False
    assert hint in capsys.readouterr().out


def test_checker_reports_unsolved_and_broken_answers_without_raising(pipe, capsys):
    def unsolved(x_t, v, alpha_bar):
        ...

    for answer in (None, unsolved):
        assert sampling_views.check_pred_x0_from_v(answer) is False
        assert "not solved yet" in capsys.readouterr().out

    def broken(x_t, v, alpha_bar):
        return x_t.reshape(3, -1)  # a bug: 512 numbers do not split in 3

    assert sampling_views.check_pred_x0_from_v(broken) is False
    assert "raised RuntimeError" in capsys.readouterr().out
    assert sampling_views.check_pred_x0_from_v(lambda x, v, a: x[0]) is False
    assert "Expected a tensor shaped like x_t" in capsys.readouterr().out
    assert sampling_views.check_pred_x0_from_v("x0") is False
    assert "Expected a function" in capsys.readouterr().out
    # right on made-up latents but not on the trajectory: the learner's function is not
    # given the trajectory's inputs, so only a function that looks at its input's shape fails
    fn = reference_pred_x0_from_v()
    traj = sampling.sample(pipe, PROMPT, 0, 4, 3.0)
    picky = lambda x, v, a: fn(x, v, a) if x.ndim == 4 else fn(x, v, a) + 1  # noqa: E731
    assert sampling_views.check_pred_x0_from_v(picky, traj) is False
    assert "on step 2 of traj it is off" in capsys.readouterr().out
