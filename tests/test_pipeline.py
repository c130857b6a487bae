"""sdkit.pipeline: loading folders and single files offline, and running a pipeline the kit's way.

Loading: the tiny pipeline of tests/conftest.py (two resnets per block like SD's, VAE
mid-block attention on, weights redrawn far from zero) is saved to a temporary folder and as
one .safetensors file in the original SD key layout (tests/single_file.py); both are loaded
back through load_pipeline and must give the same weights and images. Running: the shared
pieces (settings, prompt encoder, seeded noise, one image, a seeded batch, the default
sampler) must equal what the stock diffusers pipeline computes, bit for bit.

Bad arguments (pickle files, folders without model_index.json, other families, CUDA without
CUDA, ...) are rows of tests/test_bad_inputs.py.
"""

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import SlicedAttnProcessor
from single_file import save_single_file  # tests/single_file.py (test-only)

from sdkit import checks, pipeline

PROMPT = "a red circle on the left"
OTHER = "a blue square at the top"


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_pipe_factory):
    """(original pipeline, diffusers folder, single .safetensors file)"""
    root = tmp_path_factory.mktemp("tiny-sd")
    pipe = tiny_pipe_factory(unet_config={"layers_per_block": 2},  # SD's 2 per block
                             vae_config={"mid_block_add_attention": True}, weight_std=0.05)
    folder = root / "tiny-sd"
    pipe.save_pretrained(folder, safe_serialization=True)
    single = save_single_file(pipe, root / "tiny-sd.safetensors")
    return pipe, folder, single


def _image(pipe, seed=3):
    img = pipeline.generate(pipe, PROMPT, seed=seed, num_inference_steps=2, guidance_scale=3.0,
                            height=16, width=16)
    return np.asarray(img)


def _same_weights(a, b):
    for name in ("unet", "vae", "text_encoder"):
        want, got = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert want.keys() == got.keys(), name
        for k in want:
            assert torch.equal(want[k], got[k]), f"{name}.{k}"


# ------------------------------------------------------------------------------ loading


def test_folder_round_trip(saved):
    original, folder, _ = saved
    pipe = pipeline.load_pipeline(str(folder), device="cpu", dtype="float32")
    assert pipe.unet.dtype == torch.float32 and pipe.device.type == "cpu"
    _same_weights(original, pipe)
    a = _image(pipe)
    assert a.shape == (16, 16, 3) and a.dtype == np.uint8
    assert np.array_equal(a, _image(pipe))  # same seed, same image
    assert not np.array_equal(a, _image(pipe, seed=4))
    assert np.array_equal(a, _image(original))  # what was saved is what was loaded


def test_single_file_round_trip(saved):
    original, folder, single = saved
    from safetensors import safe_open

    with safe_open(str(single), "pt") as f:
        keys = list(f.keys())
    # the original SD layout, not diffusers'
    assert any(k.startswith("model.diffusion_model.input_blocks.") for k in keys)
    assert any(k.startswith("first_stage_model.decoder.up.") for k in keys)
    assert any(".mid.attn_1.q." in k for k in keys)
    assert "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight" in keys
    pipe = pipeline.load_pipeline(str(single), device="cpu", dtype="float32", config=str(folder))
    _same_weights(original, pipe)  # every weight came back, unchanged
    assert np.array_equal(_image(pipe), _image(original))


def test_single_file_config_from_env(saved, monkeypatch):
    _, folder, single = saved
    monkeypatch.setenv("SDKIT_MODEL", str(single))
    monkeypatch.setenv("SDKIT_MODEL_CONFIG", str(folder))
    pipe = pipeline.load_pipeline(device="cpu")
    assert pipe.unet.config.layers_per_block == 2  # the saved architecture, not the toy's


def test_single_file_without_config_offline(saved, monkeypatch):
    _, _, single = saved
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("SDKIT_MODEL_CONFIG", raising=False)
    with pytest.raises(pipeline.ModelNotFoundError) as e:
        pipeline.load_pipeline(str(single), device="cpu")
    msg = str(e.value)
    assert str(single) in msg and "config=" in msg and "not on disk" in msg


def test_missing_hub_id_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    model = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    with pytest.raises(pipeline.ModelNotFoundError) as e:
        pipeline.load_pipeline(model, device="cpu")
    msg = str(e.value)
    assert model in msg and "not on disk" in msg and "offline" in msg
    assert f"hf download {model}" in msg
    assert e.value.__cause__ is None and e.value.__suppress_context__  # no hub stack first
    assert isinstance(e.value, OSError)


def test_memory_options_are_applied(saved):
    _, folder, _ = saved
    plain = pipeline.load_pipeline(str(folder), device="cpu")
    lean = pipeline.load_pipeline(str(folder), device="cpu", attention_slicing=True,
                                  vae_tiling=True)
    assert lean.vae.use_tiling and not plain.vae.use_tiling
    sliced = {type(p) for p in lean.unet.attn_processors.values()}
    assert sliced == {SlicedAttnProcessor}
    assert SlicedAttnProcessor not in {type(p) for p in plain.unet.attn_processors.values()}


def test_toy_missing_says_how_to_train(monkeypatch, tmp_path):
    monkeypatch.setattr(pipeline, "TOY_DIR", tmp_path / "toy-sd")
    with pytest.raises(pipeline.ModelNotFoundError, match="python -m sdkit.training train"):
        pipeline.load_pipeline("toy", device="cpu")


# ------------------------------------------------------------------------------ running


def test_explicit_settings_win_even_when_falsy(tiny_pipe):
    """None means "the kit's default"; 0 guidance is a real setting, not a missing one."""
    steps, scale = pipeline.resolve_settings(tiny_pipe)
    assert (steps, scale) == (pipeline.DEFAULT_STEPS, pipeline.DEFAULT_GUIDANCE)
    assert pipeline.resolve_settings(tiny_pipe, 1, 0.0) == (1, 0.0)
    assert pipeline.resolve_settings(tiny_pipe, guidance_scale=0) == (pipeline.DEFAULT_STEPS, 0.0)


@pytest.mark.parametrize("negative", [None, ["a green triangle at the bottom", ""]])
def test_encode_prompt_equals_the_pipelines(tiny_pipe, negative):
    prompts = [PROMPT, OTHER]
    cond, uncond = pipeline.encode_prompt(tiny_pipe, prompts, negative)
    with torch.no_grad():
        ref_cond, ref_uncond = tiny_pipe.encode_prompt(
            prompts, "cpu", 1, True, negative_prompt=negative)
    assert cond.shape == (2, tiny_pipe.tokenizer.model_max_length, 32)  # (B, T, D)
    assert torch.equal(cond, ref_cond) and torch.equal(uncond, ref_uncond)
    assert not torch.equal(cond[0], cond[1])  # the prompt really went in


def test_initial_latents_are_the_pipelines_noise(tiny_pipe):
    """The same starting noise the pipeline draws, for one generator and for one per image."""
    f, c = tiny_pipe.vae_scale_factor, tiny_pipe.unet.config.in_channels
    sigma = tiny_pipe.scheduler.init_noise_sigma
    for gen in (lambda: torch.Generator().manual_seed(5),
                lambda: [torch.Generator().manual_seed(s) for s in (5, 6)]):
        ours = pipeline.initial_latents(tiny_pipe, gen(), 2, height=32, width=48)
        ref = tiny_pipe.prepare_latents(2, c, 32, 48, torch.float32, torch.device("cpu"), gen())
        assert ours.shape == (2, c, 32 // f, 48 // f)  # (B, 4, 8, 12)
        assert torch.equal(ours * sigma, ref)
    by_seed = pipeline.initial_latents(tiny_pipe, [5, 6], 2)  # seeds: the shortcut
    assert torch.equal(by_seed[1], pipeline.initial_latents(tiny_pipe, 6)[0])
    assert not torch.equal(by_seed[0], by_seed[1])


def test_generate_is_the_pipeline_call_with_a_cpu_generator(tiny_pipe):
    ours = np.asarray(pipeline.generate(tiny_pipe, PROMPT, seed=9, num_inference_steps=2))
    ref = tiny_pipe(PROMPT, num_inference_steps=2, guidance_scale=pipeline.DEFAULT_GUIDANCE,
                    generator=torch.Generator("cpu").manual_seed(9)).images[0]
    assert ours.shape == (64, 64, 3)
    assert np.array_equal(ours, np.asarray(ref))


def test_generate_with_only_the_height_keeps_the_default_width(tiny_pipe):
    img = pipeline.generate(tiny_pipe, PROMPT, seed=0, num_inference_steps=1, height=32)
    assert img.size == (64, 32)  # (width, height): the width stays the default


def test_generate_images_same_seed_same_image_whatever_the_batch(tiny_pipe):
    """One generator per seed: the same starting noise in any batch. The pictures agree to
    float summation order (batched CPU kernels add in another order: at most 1 grey level on
    a few pixels), and are bit-identical call after call at the same batch size."""
    seeds, prompts = [3, 4, 5], [PROMPT, OTHER, PROMPT]
    one_by_one = pipeline.generate_images(tiny_pipe, prompts, seeds, 2, batch_size=1,
                                          output="uint8")
    batched = pipeline.generate_images(tiny_pipe, prompts, seeds, 2, batch_size=3,
                                       output="uint8")
    again = pipeline.generate_images(tiny_pipe, prompts, seeds, 2, batch_size=3, output="uint8")
    assert [im.shape for im in batched] == [(64, 64, 3)] * 3
    assert all(im.dtype == np.uint8 for im in batched)
    for a, b, c in zip(one_by_one, batched, again, strict=True):
        assert np.array_equal(b, c)
        diff = np.abs(a.astype(int) - b)
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    assert np.abs(batched[0].astype(int) - batched[2]).mean() > 5  # same prompt, other seed
    # one by one, each is the image generate() gives for its seed and prompt
    for im, p, s in zip(one_by_one, prompts, seeds, strict=True):
        assert np.array_equal(im, np.asarray(pipeline.generate(tiny_pipe, p, s, 2)))
    pil = pipeline.generate_images(tiny_pipe, PROMPT, [3], 2)
    assert np.array_equal(np.asarray(pil[0]), one_by_one[0])


def test_generate_images_unconditional(tiny_pipe):
    """The empty prompt at guidance 0: the unconditional model, no error."""
    a, b = pipeline.generate_images(tiny_pipe, "", [1, 2], 2, guidance_scale=0.0, output="uint8")
    ref = tiny_pipe("", num_inference_steps=2, guidance_scale=0.0,
                    generator=torch.Generator().manual_seed(1), output_type="np").images[0]
    assert np.array_equal(a, (ref * 255).round().astype(np.uint8))
    assert not np.array_equal(a, b)


def test_default_sampler_rebuilt_from_the_training_schedule_is_the_shipped_one(tiny_pipe):
    """The toy ships DPM-Solver++ on its training schedule: training_scheduler() and
    dpm_solver() take it apart and put it back together unchanged."""
    train = pipeline.training_scheduler(tiny_pipe)
    assert type(train).__name__ == "DDPMScheduler"
    assert torch.equal(train.betas, tiny_pipe.scheduler.betas)
    assert train.config.prediction_type == "v_prediction"
    x0, noise = torch.ones(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    # zero terminal SNR: at the last step the training process has forgotten x0 entirely
    assert torch.equal(train.add_noise(x0, noise, torch.tensor([999])), noise)
    rebuilt = pipeline.dpm_solver(train.config)
    assert type(rebuilt) is type(tiny_pipe.scheduler)
    assert dict(rebuilt.config) == dict(tiny_pipe.scheduler.config)
    assert pipeline.training_scheduler(tiny_pipe.scheduler).config == train.config


# ------------------------------------------------------------------------------ a clean screen


def _printed(capfd, caplog) -> str:
    """What diffusers' and transformers' loggers said since the last call (either way out)."""
    text = capfd.readouterr().err + caplog.text
    caplog.clear()
    return text


def test_sibling_pipeline_of_a_pipe_without_checker_prints_no_notice(tiny_pipe, capfd, caplog):
    """diffusers' long safety-checker notice is for a checker that was removed from real
    weights; a sibling of a pipeline that never had one (the toy) does not print it."""
    from diffusers import StableDiffusionImg2ImgPipeline

    caplog.set_level("WARNING")
    _printed(capfd, caplog)
    sibling = pipeline.sibling_pipeline(StableDiffusionImg2ImgPipeline, tiny_pipe)
    assert sibling.unet is tiny_pipe.unet and sibling.safety_checker is None
    assert sibling.config.requires_safety_checker is False
    assert "safety checker" not in _printed(capfd, caplog)
    StableDiffusionImg2ImgPipeline(**tiny_pipe.components)  # built by hand: the notice
    assert "safety checker" in _printed(capfd, caplog)  # (so the check above can fail)


def test_a_too_long_prompt_is_refused_without_the_tokenizers_warning(capfd, caplog):
    """checks.check_prompt counts the tokens without the tokenizer's own "Token indices
    sequence length is longer than ..." warning: the kit's refusal says it instead."""
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(pipeline.TOY_DIR / "tokenizer"))
    caplog.set_level("WARNING")
    _printed(capfd, caplog)
    with pytest.raises(ValueError, match="expected at most 18 tokens"):
        checks.check_prompt(" and ".join([PROMPT] * 4), tokenizer)
    assert "Token indices sequence length" not in _printed(capfd, caplog)
    tokenizer(" and ".join([PROMPT] * 4))  # the plain call warns: the check above can fail
    assert "Token indices sequence length" in _printed(capfd, caplog)
