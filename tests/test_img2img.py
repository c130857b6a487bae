"""sdkit.img2img against diffusers' StableDiffusionImg2ImgPipeline.

The tiny random pipeline of conftest.py (the toy's tokenizer and scheduler, VAE factor 4,
64 px pictures, 16 x 16 latents), as diffusers' own tests do: identities hold for any weights.
Bad inputs are rows of tests/test_bad_inputs.py's table.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdkit import images, shapes
from sdkit.img2img import check_timesteps_answer, img2img, truncated_timesteps
from sdkit.pipeline import dpm_solver, make_generators

STEPS = 4
PROMPT = "a blue triangle on the left"




@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_img2img_equals_the_pipeline_bit_for_bit(tiny_pipe, example, strength):
    from diffusers import StableDiffusionImg2ImgPipeline

    ours = img2img(tiny_pipe, Image.fromarray(example.image), PROMPT, strength, seed=7,
                   num_inference_steps=STEPS, guidance_scale=4.0, output_type="latent")
    ref = StableDiffusionImg2ImgPipeline(**tiny_pipe.components)
    ref.set_progress_bar_config(disable=True)
    theirs = ref(PROMPT, image=Image.fromarray(example.image), strength=strength,
                 num_inference_steps=STEPS, guidance_scale=4.0, generator=make_generators(7),
                 output_type="latent").images
    assert ours.shape == (1, 4, 16, 16)
    assert torch.equal(ours, theirs)


def test_img2img_pictures_are_the_pipelines(tiny_pipe, example):
    from diffusers import StableDiffusionImg2ImgPipeline

    ours = img2img(tiny_pipe, example.image, PROMPT, 0.5, seed=2, num_inference_steps=STEPS)
    ref = StableDiffusionImg2ImgPipeline(**tiny_pipe.components)
    ref.set_progress_bar_config(disable=True)
    theirs = ref(PROMPT, image=Image.fromarray(example.image), strength=0.5,
                 num_inference_steps=STEPS, guidance_scale=4.0,
                 generator=make_generators(2)).images[0]
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))


def test_truncated_timesteps_are_the_pipelines(tiny_pipe):
    from diffusers import StableDiffusionImg2ImgPipeline

    ref = StableDiffusionImg2ImgPipeline(**tiny_pipe.components)
    for steps in (3, 10):
        for strength in (0.2, 0.5, 0.99, 1.0):
            ref.scheduler.set_timesteps(steps)
            want, n = ref.get_timesteps(steps, strength, "cpu")
            got = truncated_timesteps(dpm_solver(tiny_pipe.scheduler.config), steps, strength)
            assert torch.equal(got, want) and len(got) == n == int(steps * strength)


def test_strength_zero_returns_the_vae_reconstruction(tiny_pipe, example):
    # no denoising step runs: the output is exactly the decoded posterior sample the
    # pipeline would draw first with this seed
    out = img2img(tiny_pipe, example.image, PROMPT, 0.0, seed=3, num_inference_steps=STEPS,
                  output_type="np")
    z = images.encode(tiny_pipe.vae, example.image, sample=True, generator=make_generators(3))
    want = images.to_numpy(images.decode(tiny_pipe.vae, z))[0]
    assert out.shape == (64, 64, 3)
    np.testing.assert_array_equal(out, want)
    # any strength too small for one step (int(4 * 0.2) == 0) is the same
    small = img2img(tiny_pipe, example.image, PROMPT, 0.2, seed=3, num_inference_steps=STEPS,
                    output_type="np")
    np.testing.assert_array_equal(small, want)


def test_strength_one_ignores_the_image(tiny_pipe, example):
    # at strength 1 the start is sqrt(alphas_cumprod[999]) * x0 + sqrt(1 - ...) * noise with
    # sqrt(alphas_cumprod[999]) = 2**-12 (zero terminal SNR), against about 0.5 at strength
    # 0.5: the same two pictures change the result at strength 1 by under 5% of what they
    # change it at strength 0.5 (same seed, so the same noise; the random UNet only scales
    # the start's difference)
    other = shapes.make_example(11, n_objects=2).image
    a1 = img2img(tiny_pipe, example.image, PROMPT, 1.0, 5, STEPS, output_type="latent")
    b1 = img2img(tiny_pipe, other, PROMPT, 1.0, 5, STEPS, output_type="latent")
    a5 = img2img(tiny_pipe, example.image, PROMPT, 0.5, 5, STEPS, output_type="latent")
    b5 = img2img(tiny_pipe, other, PROMPT, 0.5, 5, STEPS, output_type="latent")
    assert dpm_solver(tiny_pipe.scheduler.config).alphas_cumprod[-1].item() == 2.0**-24
    d1, d5 = (a1 - b1).abs().max().item(), (a5 - b5).abs().max().item()
    assert d5 > 0 and d1 < 0.05 * d5, (d1, d5)


def test_img2img_leaves_the_pipelines_scheduler_alone(tiny_pipe, example):
    before = tiny_pipe.scheduler.timesteps
    img2img(tiny_pipe, example.image, PROMPT, 0.5, seed=0, num_inference_steps=7,
            output_type="latent")
    assert tiny_pipe.scheduler.timesteps is before


SOLUTION = Path(__file__).resolve().parent.parent / "notebooks" / "solutions" / \
    "08_image_to_image.py"


def _solution(pipe):
    namespace = {"pipe": pipe}  # what the solution reads from the notebook
    exec(SOLUTION.read_text(encoding="utf-8"), namespace)
    return namespace["my_timesteps"]


def test_reference_solution_passes_the_timesteps_checker(tiny_pipe, capsys):
    assert check_timesteps_answer(_solution(tiny_pipe), tiny_pipe) is True
    assert "Right" in capsys.readouterr().out


def test_timesteps_checker_rejects_the_typical_mistakes_with_a_hint(tiny_pipe, capsys):
    def schedule(steps):
        full = type(tiny_pipe.scheduler).from_config(tiny_pipe.scheduler.config)
        full.set_timesteps(steps)
        return full.timesteps.tolist()

    wrong = {
        # the first (noisiest) int(N * s) steps instead of the last
        "first, noisiest": lambda n, s: schedule(n)[:int(n * s)],
        # round() instead of int(): one step too many at e.g. 4 x 0.15 = 0.6
        "rounds down": lambda n, s: schedule(n)[n - round(n * s):],
        # timesteps[-k:] runs the whole schedule when k = 0
        "timesteps[-0:]": lambda n, s: schedule(n)[-int(n * s):],
        # off by one: one step more than int(N * s)
        "steps from the end": lambda n, s: schedule(n)[max(n - int(n * s) - 1, 0):],
    }
    for hint, fn in wrong.items():
        assert check_timesteps_answer(fn, tiny_pipe) is False, hint
        out = capsys.readouterr().out
        assert "Not quite" in out and hint in out, (hint, out)


def test_timesteps_checker_unsolved_and_broken_answers_never_raise(tiny_pipe, capsys):
    assert check_timesteps_answer(None, tiny_pipe) is False
    assert "not solved yet" in capsys.readouterr().out

    def unsolved(num_inference_steps, strength):  # the learner's cell as it ships
        ...

    assert check_timesteps_answer(unsolved, tiny_pipe) is False
    assert "not solved yet" in capsys.readouterr().out
    assert check_timesteps_answer(lambda steps, strength: 1 / 0, tiny_pipe) is False
    assert "ZeroDivisionError" in capsys.readouterr().out
    assert check_timesteps_answer([999, 899], tiny_pipe) is False
    assert "is not a function" in capsys.readouterr().out
