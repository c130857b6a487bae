"""The tests' fixtures: one builder of a small random pipeline, and the trained toy pipeline
(the run's set-up, network guard included, is in the repository's conftest.py).

The tiny pipeline, in the manner of diffusers' ``get_dummy_components``:

- ``get_dummy_components(**overrides) -> dict``: the toy model's kinds of parts at tiny widths
  and random (seeded, so deterministic) weights: the toy's real tokenizer
  (data/toy-sd/tokenizer), its scheduler (data/toy-sd/scheduler), a VAE with factor 4 and a
  UNet of cross-attention blocks like the toy's, 64 px pictures, 16 x 16 latents;
- ``make_tiny_pipe(**overrides)``: those parts as a StableDiffusionPipeline, CPU float32, eval
  mode, progress bar off;
- fixtures: ``tiny_pipe`` (module scope, ``make_tiny_pipe()``), ``tiny_pipe_factory`` (the
  function itself, for tests that need other sizes), ``toy_pipe`` (session scope, the trained
  toy model; skips when it is not trained).

Test modules reach the builder through the fixtures (no test module imports another).
"""

import json
import time
from pathlib import Path

import pytest

TOY_DIR = Path(__file__).resolve().parent.parent / "data" / "toy-sd"

# ------------------------------------------------------------------------------ tiny pipeline

# The toy's architecture (data/toy-sd/*/config.json) at tiny widths.
UNET_CONFIG = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D",) * 2,
    up_block_types=("CrossAttnUpBlock2D",) * 2, cross_attention_dim=32,
    attention_head_dim=(2, 4), norm_num_groups=8)
VAE_CONFIG = dict(  # three blocks: factor 4, like the toy's
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16),
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    layers_per_block=1, norm_num_groups=8, sample_size=64, mid_block_add_attention=False)
TEXT_ENCODER_CONFIG = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)

_CONFIG_KEYS = ("unet_config", "vae_config", "text_encoder_config")
_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "safety_checker",
          "feature_extractor", "image_encoder")


def get_dummy_components(**overrides) -> dict:
    """The parts of a tiny StableDiffusionPipeline, keyed as ``StableDiffusionPipeline(**...)``
    takes them (unet, vae, text_encoder, tokenizer, scheduler, safety_checker=None,
    feature_extractor=None, image_encoder=None).

    Overrides: a part by name (``scheduler=...``) replaces it; ``unet_config``, ``vae_config``,
    ``text_encoder_config`` (dicts) change the tiny configs above; ``seed`` (0) seeds the
    weights (the global torch RNG is left as it was); ``weight_std`` (None) redraws every
    weight from N(0, std), for tests that need weights far from diffusers' initialisation.
    """
    import torch
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    unknown = set(overrides) - set(_PARTS) - set(_CONFIG_KEYS) - {"seed", "weight_std"}
    if unknown:
        raise TypeError(f"get_dummy_components: unknown overrides {sorted(unknown)}")
    seed = overrides.pop("seed", 0)
    weight_std = overrides.pop("weight_std", None)
    configs = {key: overrides.pop(key, None) or {} for key in _CONFIG_KEYS}

    tokenizer = overrides.get("tokenizer") or CLIPTokenizer.from_pretrained(
        str(TOY_DIR / "tokenizer"))
    scheduler_config = json.loads((TOY_DIR / "scheduler" / "scheduler_config.json").read_text())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**{**UNET_CONFIG, **configs["unet_config"]})
        vae = AutoencoderKL(**{**VAE_CONFIG, **configs["vae_config"]})
        text_encoder = CLIPTextModel(CLIPTextConfig(**{
            **TEXT_ENCODER_CONFIG, "vocab_size": len(tokenizer),
            "max_position_embeddings": tokenizer.model_max_length,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id, **configs["text_encoder_config"]}))
        if weight_std is not None:
            for module in (unet, vae, text_encoder):
                for p in module.parameters():
                    p.data.normal_(0, weight_std)
    components = {
        "unet": unet.eval(), "vae": vae.eval(), "text_encoder": text_encoder.eval(),
        "tokenizer": tokenizer,
        "scheduler": DPMSolverMultistepScheduler.from_config(scheduler_config),
        "safety_checker": None, "feature_extractor": None, "image_encoder": None,
    }
    components.update(overrides)
    return components


def make_tiny_pipe(**overrides):
    """``get_dummy_components(**overrides)`` as a StableDiffusionPipeline: CPU, float32,
    progress bar off, no safety checker required."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**get_dummy_components(**overrides),
                                   requires_safety_checker=False)
    # built on the CPU in float32 already: no .to() (diffusers warns about casting)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def tiny_pipe():
    """``make_tiny_pipe()``: one tiny random pipeline per test module (64 px, 16 x 16 latents).
    Tests that change it (processors, scheduler, weights) put back what they changed."""
    return make_tiny_pipe()


@pytest.fixture(scope="session")
def tiny_pipe_factory():
    """``make_tiny_pipe`` itself: call it with overrides for a pipeline of another shape."""
    return make_tiny_pipe


@pytest.fixture(scope="session")
def dummy_components_factory():
    """``get_dummy_components`` itself: the parts, for tests that assemble another pipeline."""
    return get_dummy_components


@pytest.fixture(scope="session")
def example():
    """A drawn one-shape scene (``shapes.make_example(3, n_objects=1)``): the picture the
    editing tests (img2img, inpainting) start from."""
    from sdkit import shapes

    return shapes.make_example(3, n_objects=1)


@pytest.fixture(scope="session")
def toy_pipe():
    """The kit's toy pipeline (sdkit.pipeline.load_pipeline(), CPU float32), loaded once.

    Skips (with how to get it) when data/toy-sd has not been trained yet. A snapshot being
    written at that moment is retried a few times.
    """
    from sdkit.pipeline import ModelNotFoundError, load_pipeline

    for attempt in range(4):
        try:
            pipe = load_pipeline("toy", device="cpu", dtype="float32")
            break
        except ModelNotFoundError as e:
            pytest.skip(f"the toy model is not trained yet: {e}")
        except (OSError, ValueError, RuntimeError):  # a snapshot half-written right now
            if attempt == 3:
                raise
            time.sleep(5)
    pipe.set_progress_bar_config(disable=True)
    return pipe


