"""sdkit.sampling: the hand-written denoising loop equals diffusers' pipeline, and its records
(predicted x_0, guidance) equal the library's own computations. Uses a tiny random pipeline
with the toy model's tokenizer and sampler, so it needs no trained weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdkit import sampling, toy
from sdkit.checks import SdkitInputError

PROMPT = "a red circle on the left"


def tiny_pipeline(tmp_dir):
    """A StableDiffusionPipeline of the toy model's kind, with tiny random weights (16 px)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = toy.write_tokenizer(tmp_dir)
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
                        norm_num_groups=8, sample_size=16, layers_per_block=1)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=tok.model_max_length,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=2, norm_num_groups=8)
    pipe = toy.build_pipeline(vae, text_encoder, tok, unet)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return tiny_pipeline(tmp_path_factory.mktemp("tok"))


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
    s, b, lat = 5, 2, (4, 8, 8)
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
    # the starting latents are the seeded noise times init_noise_sigma (1 for DDIM)
    noise = sampling.initial_latents(pipe, [0, 1], 2)
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
    assert len(traj.images()) == 1 and traj.image.size == (16, 16)
    x0 = traj.pred_x0_images()
    xt = traj.latent_images()
    prev = traj.preview("pred_x0", size=32)
    assert len(x0) == 3 and len(xt) == 4 and len(prev) == 3
    assert prev[0].size == (32, 32) and x0[0].size == (16, 16)
    # the last x_t image is the final image (same latents, same decoder)
    assert np.array_equal(np.asarray(xt[-1]), np.asarray(traj.image))
    assert traj.pred_x0_images() is x0  # memoized


def _ddim(prediction_type):
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(toy.make_scheduler().config, prediction_type=prediction_type,
                                     rescale_betas_zero_snr=prediction_type == "v_prediction")


@pytest.mark.parametrize("prediction_type", ["v_prediction", "epsilon"])
def test_predicted_x0_formula_equals_ddim_pred_original_sample(prediction_type):
    sched = _ddim(prediction_type)
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


# ------------------------------------------------------------------ guidance and replay


def test_combine_identities():
    g = torch.Generator().manual_seed(0)
    u, c = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    assert torch.equal(sampling.combine(u, c, 0.0), u)
    assert torch.allclose(sampling.combine(u, c, 1.0), c, atol=1e-6)
    # linear in s: the step from s to s + 1 adds (cond - uncond)
    assert torch.allclose(sampling.combine(u, c, 5.0) - sampling.combine(u, c, 4.0), c - u,
                          atol=1e-5)


def test_replay_same_scale_is_exact_and_first_step_exact_for_new_scale(pipe):
    traj = sampling.sample(pipe, PROMPT, 4, 5, 3.0)
    same = sampling.replay(traj, 3.0)
    assert torch.equal(same.latents, traj.latents)
    assert torch.equal(same.pred_x0, traj.pred_x0)
    new = sampling.sample(pipe, PROMPT, 4, 5, 8.0)
    approx = sampling.replay(traj, 8.0)
    assert approx.scheduler.endswith("(replayed)") and approx.guidance_scale == 8.0
    # step 0 uses x_T, which does not depend on s: exact
    assert torch.allclose(approx.latents[1], new.latents[1], atol=1e-5)
    assert torch.allclose(approx.pred_x0[0], new.pred_x0[0], atol=1e-5)
    # later steps are only approximate
    assert not torch.allclose(approx.latents[-1], new.latents[-1], atol=1e-4)


def test_replay_ddpm_reuses_the_same_step_noise(pipe):
    traj = sampling.sample(pipe, PROMPT, 9, 4, 3.0, scheduler="DDPM")
    assert torch.equal(sampling.replay(traj, 3.0).latents, traj.latents)


# ------------------------------------------------------------------ checks


def test_make_scheduler_names_and_bad_name(pipe):
    for name in sampling.SCHEDULER_NAMES:
        s = sampling.make_scheduler(name, pipe)
        assert s.config.prediction_type == "v_prediction"
        assert torch.equal(s.alphas_cumprod[:-1], pipe.scheduler.alphas_cumprod[:-1])
        assert sampling.scheduler_name(s) == name
    with pytest.raises(SdkitInputError, match=r"name='dpm'.*DPM-Solver\+\+"):
        sampling.make_scheduler("dpm", pipe)


@pytest.mark.parametrize("kwargs, name", [
    (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(guidance_scale=-1.0), "guidance_scale"),
    (dict(seed=-3), "seed"),
    (dict(seed=[1, 2]), "seed"),
    (dict(prompt="a purple star"), "prompt"),
    (dict(prompt=""), "prompt"),
    (dict(scheduler="PNDM"), "name"),
    (dict(negative_prompt=["a", "b"]), "negative_prompt"),
    (dict(height=15), "height"),
])
def test_sample_rejects_bad_inputs(pipe, kwargs, name):
    args = dict(prompt=PROMPT, seed=0, num_inference_steps=2, guidance_scale=3.0) | kwargs
    with pytest.raises(SdkitInputError, match=f"{name}="):
        sampling.sample(pipe, **args)


def test_exercise_checker(pipe, capsys):
    traj = sampling.sample(pipe, PROMPT, 0, 4, 3.0)
    step = 2
    a = traj.alphas_cumprod[step]
    x_t, v = traj.latents[step, 0], traj.noise_pred()[step, 0]
    assert sampling.check_pred_x0_exercise(a.sqrt() * x_t - (1 - a).sqrt() * v, traj, step)
    assert not sampling.check_pred_x0_exercise(None, traj, step)
    wrong = (1 - a).sqrt() * x_t - a.sqrt() * v
    assert not sampling.check_pred_x0_exercise(wrong, traj, step)
    cond_only = a.sqrt() * x_t - (1 - a).sqrt() * traj.noise_pred_cond[step, 0]
    assert not sampling.check_pred_x0_exercise(cond_only, traj, step)
    assert "conditional" in capsys.readouterr().out
