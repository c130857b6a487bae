"""sdkit.inpainting: inpainting and outpainting against diffusers' StableDiffusionInpaintPipeline.

The tiny random pipeline of conftest.py (VAE factor 4, 64 px pictures, 16 x 16 latents):
identities hold for any weights. The last test measures quality on the trained toy model and
is skipped without it. Bad inputs are rows of tests/test_bad_inputs.py's table.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdkit import images, shapes
from sdkit.img2img import truncated_timesteps
from sdkit.inpainting import (
    check_latent_mask_answer,
    dilate_mask,
    inpaint,
    latent_mask,
    outpaint,
    outpaint_canvas,
    outside_error,
    vae_reconstruction,
)
from sdkit.pipeline import dpm_solver, make_generators

STEPS = 4
PROMPT = "a blue triangle on the left"




def _mask(example, pixels=4):
    return dilate_mask(example.masks[0], pixels)


# ----------------------------------------------------------------------------- inpainting


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_inpaint_equals_the_pipeline_bit_for_bit(tiny_pipe, example, strength):
    from diffusers import StableDiffusionInpaintPipeline

    mask = _mask(example)
    ours = inpaint(tiny_pipe, example.image, mask, PROMPT, seed=5, strength=strength,
                   num_inference_steps=STEPS, guidance_scale=4.0, paste_back=False,
                   output_type="latent")
    ref = StableDiffusionInpaintPipeline(**tiny_pipe.components)
    ref.set_progress_bar_config(disable=True)
    theirs = ref(PROMPT, image=Image.fromarray(example.image),
                 mask_image=Image.fromarray((mask * 255).astype(np.uint8)), strength=strength,
                 height=64, width=64, num_inference_steps=STEPS, guidance_scale=4.0,
                 generator=make_generators(5), output_type="latent").images
    assert torch.equal(ours, theirs)


@torch.no_grad()
def test_latent_blending_keeps_outside_latents_at_the_noised_original(tiny_pipe, example):
    mask = _mask(example)
    seen = []
    inpaint(tiny_pipe, example.image, mask, PROMPT, seed=9, num_inference_steps=STEPS,
            output_type="latent", callback=lambda i, t, lat: seen.append(lat.clone()))
    # the same random numbers the function drew: posterior sample, then noise
    g = make_generators(9)
    image_latents = images.encode(tiny_pipe.vae, example.image, sample=True, generator=g)
    noise = torch.randn(image_latents.shape, generator=g)
    sampler = dpm_solver(tiny_pipe.scheduler.config)
    timesteps = truncated_timesteps(sampler, STEPS, 1.0)
    outside = latent_mask(mask, images.vae_scale_factor(tiny_pipe.vae))[0, 0] == 0  # (16, 16)
    assert len(seen) == STEPS and 0 < outside.sum() < outside.numel()
    for i, lat in enumerate(seen):
        if i < STEPS - 1:  # the original noised to the next step's timestep
            ac = sampler.alphas_cumprod[int(timesteps[i + 1])]
            want = ac.sqrt() * image_latents + (1 - ac).sqrt() * noise
            torch.testing.assert_close(lat[..., outside], want[..., outside],
                                       rtol=1e-5, atol=1e-5)
        else:  # after the last step: the clean original latents, exactly
            want = image_latents
            assert torch.equal(lat[..., outside], want[..., outside])
        if i == 0:
            assert not torch.equal(lat[..., ~outside], want[..., ~outside])


def test_latent_mask_is_the_pipelines(tiny_pipe):
    from diffusers import StableDiffusionInpaintPipeline

    ref = StableDiffusionInpaintPipeline(**tiny_pipe.components)
    rng = np.random.default_rng(1)
    mask = (rng.random((64, 96)) > 0.6).astype(np.float32)
    pil = Image.fromarray((mask * 255).astype(np.uint8))
    cond = ref.mask_processor.preprocess(pil, height=64, width=96)
    want = torch.nn.functional.interpolate(cond, size=(16, 24))
    got = latent_mask(mask, 4)
    assert torch.equal(got, want)
    assert torch.equal(got[0, 0], torch.from_numpy(mask[::4, ::4]))  # the top-left pixels


def test_paste_back_keeps_every_pixel_outside_the_mask(tiny_pipe, example):
    mask = _mask(example)
    out = np.asarray(inpaint(tiny_pipe, example.image, mask, PROMPT, seed=1,
                             num_inference_steps=2))
    outside = mask == 0
    assert np.array_equal(out[outside], example.image[outside])
    assert outside_error(example.image, out, mask) == 0.0
    generated = inpaint(tiny_pipe, example.image, mask, PROMPT, seed=1, num_inference_steps=2,
                        paste_back=False, output_type="np")
    inside = mask == 1
    assert np.abs(out[inside] / 255 - generated[inside]).max() <= 0.5 / 255 + 1e-6


def test_vae_reconstruction_is_the_vae_round_trip(tiny_pipe, example):
    out = vae_reconstruction(tiny_pipe, example.image)
    with torch.no_grad():  # the VAE's own calls, without the latents' scaling
        x = images.to_tensor(example.image)  # (1, 3, 64, 64)
        want = tiny_pipe.vae.decode(tiny_pipe.vae.encode(x).latent_dist.mean).sample
    want = (want[0].permute(1, 2, 0).clamp(-1, 1).numpy() + 1) / 2
    assert out.shape == (64, 64, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, want, atol=1e-5)


def test_dilate_mask_grows_by_the_given_pixels(example):
    m = example.masks[0]
    grown = dilate_mask(m, 3)
    ys, xs = np.nonzero(m)
    gy, gx = np.nonzero(grown)
    assert grown.dtype == np.float32 and grown[m].all()
    assert (gy.min(), gx.min(), gy.max(), gx.max()) == (
        max(ys.min() - 3, 0), max(xs.min() - 3, 0), min(ys.max() + 3, 63), min(xs.max() + 3, 63))


# ----------------------------------------------------------------------------- outpainting


@pytest.mark.parametrize("side", ["right", "left"])
def test_outpaint_size_and_kept_part(tiny_pipe, example, side):
    out = outpaint(tiny_pipe, example.image, "a red circle on the left", 96, side, seed=0,
                   num_inference_steps=2)
    assert out.size == (96, 64)
    arr = np.asarray(out)
    old = arr[:, :64] if side == "right" else arr[:, 32:]
    assert np.array_equal(old, example.image)
    canvas, mask = outpaint_canvas(example.image, 96, side)
    assert canvas.shape == (64, 96, 3) and mask.shape == (64, 96)
    assert mask.sum() == 64 * 32
    new = slice(64, 96) if side == "right" else slice(0, 32)
    edge = 63 if side == "right" else 0
    assert (mask[:, new] == 1).all()
    assert (canvas[:, new] == example.image[:, edge:edge + 1]).all()  # edge pixels repeated


# ----------------------------------------------------------------------------- exercise


SOLUTION = Path(__file__).resolve().parent.parent / "notebooks" / "solutions" / \
    "09_inpainting_and_outpainting.py"


def test_reference_solution_passes_the_latent_mask_checker(capsys):
    namespace = {"np": np}  # what the solution reads from the notebook
    exec(SOLUTION.read_text(encoding="utf-8"), namespace)
    assert check_latent_mask_answer(namespace["my_latent_mask"]) is True
    assert "Right" in capsys.readouterr().out


def _blocks(m, f):
    return (m >= 0.5).reshape(m.shape[0] // f, f, m.shape[1] // f, f)


@pytest.mark.parametrize("wrong, hint", [
    # max-pooling: a block counts if any pixel is masked (a sensible idea, not the pipeline's)
    (lambda m, f: _blocks(m, f).max(axis=(1, 3)), "max-pooling"),
    # a majority vote over each block
    (lambda m, f: _blocks(m, f).mean(axis=(1, 3)) >= 0.5, "majority vote"),
    # the centre pixel of each block
    (lambda m, f: (m[f // 2::f, f // 2::f] >= 0.5), "you kept pixel (2, 2)"),
    # the right pixel, not binarised
    (lambda m, f: m[::f, ::f], "binarise first"),
    # > 0.5 instead of >= 0.5
    (lambda m, f: m[::f, ::f] > 0.5, "exactly 0.5 counts as masked"),
    # one value per pixel pair, not per block: the wrong shape
    (lambda m, f: m[::2, ::2] >= 0.5, "expected shape"),
])
def test_latent_mask_checker_rejects_the_typical_mistakes_with_a_hint(wrong, hint, capsys):
    assert check_latent_mask_answer(wrong) is False
    out = capsys.readouterr().out
    assert "Not quite" in out and hint in out, out


def test_latent_mask_checker_unsolved_and_broken_answers_never_raise(capsys):
    assert check_latent_mask_answer(None) is False
    assert "not solved yet" in capsys.readouterr().out

    def unsolved(mask, scale_factor):  # the learner's cell as it ships
        ...

    assert check_latent_mask_answer(unsolved) is False
    assert "not solved yet" in capsys.readouterr().out
    assert check_latent_mask_answer(lambda m, f: m.missing) is False
    assert "AttributeError" in capsys.readouterr().out
    assert check_latent_mask_answer(np.zeros((16, 16))) is False
    assert "is not a function" in capsys.readouterr().out


# ----------------------------------------------------------------------------- the toy model

# The setting of notebooks/08, which prints what the final toy model gives (success per seed,
# the error outside the mask, the VAE round trip's alone). Asserted with a margin.
INPAINT_MIN_SUCCESS = 0.8  # allows one miss in 6
OUTSIDE_MAX_ERROR_NO_PASTE = 0.03  # mean abs error outside the dilated mask, 0..1 scale


def test_toy_inpainting_quality(toy_pipe):
    ex = shapes.render([shapes.Obj("red", "circle", "left"), shapes.Obj("blue", "square", "right")],
                       seed=4)
    mask = dilate_mask(ex.masks[1], 6)
    prompt = "a red circle on the left and a blue triangle on the right"
    ok, errors = [], []
    for seed in range(6):
        out = inpaint(toy_pipe, ex.image, mask, prompt, seed, paste_back=False, output_type="np")
        errors.append(outside_error(ex.image, out, mask))
        ok.append(shapes.prompt_correct(out, prompt))
    assert np.mean(ok) >= INPAINT_MIN_SUCCESS, ok
    assert max(errors) < OUTSIDE_MAX_ERROR_NO_PASTE, errors
