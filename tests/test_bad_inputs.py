"""Bad input, table-driven: every public sdkit function refuses it clearly, or converts it as
documented. Nothing hangs, crashes the kernel or is silently "fixed".

Each case is one row of ``CASES``: an id, a call, and what must happen:

- ``Refused(param, value, allowed)``: a ValueError (sdkit's SdkitInputError, DeviceError, ...)
  whose message contains the parameter's name, a representation of the bad value and a piece
  of what is allowed instead;
- ``Converted(check)``: a documented conversion (RGBA composited on white, greyscale repeated
  into RGB); ``check`` asserts the conversion happened and is right.

This is the one place where a bad input is tested (the other test files test behaviour):
each kind of bad value of each parameter appears once, through the highest-level public
function that takes it (``generate`` for a prompt, ``img2img`` for a strength, ...); a function
that checks a shared parameter on its own path (a seed, a step count) gets a row with another
bad value, so no two rows refuse the same value of the same parameter for the same reason. The
shared ``checks.*`` are called directly only for kinds no public function reaches first.
Rows marked ``needs_pipe`` get the tiny random pipeline of tests/conftest.py (the toy's
tokenizer, 64 px); ``needs_unclip`` rows also get a toy unCLIP model fitted to it once
(notebook 11); ``no_accelerator`` rows run as on a machine without CUDA or MPS; ``env`` rows
set environment variables first. The widget panel test at the end checks that an error in a
callback is shown in the panel, which keeps working.
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from mistakes import (  # the one frame of both tables
    Converted,
    Refused,
    assert_refused,
    fresh_environment,
)
from PIL import Image

import sdkit
from sdkit import (
    attention,
    bench,
    checkpoints,
    checks,
    clip,
    evaluation,
    finetune,
    grounding,
    hypernetwork,
    images,
    img2img,
    inpainting,
    latents,
    lora,
    noising,
    pipeline,
    sampling,
    shapes,
    textual_inversion,
    training,
    variations,
    widgets,
)
from sdkit import device as device_module
from sdkit.device import DeviceError, get_device

PROMPT = "a red circle on the left"


# ------------------------------------------------------------------------------ the table


@dataclass(frozen=True)
class Case:
    id: str
    call: Callable  # call(ctx) -> result
    expect: Refused | Converted
    needs_pipe: bool = False
    needs_unclip: bool = False  # a toy unCLIP model fitted to the tiny pipeline (implies the pipe)
    no_accelerator: bool = False  # as on a machine without CUDA and MPS
    env: dict = field(default_factory=dict)  # environment variables set for the call
    xfail: str = ""  # strict xfail reason: a known gap, with the fix it needs


class Ctx:
    """What a case's call gets: a tmp folder, the tiny pipeline and the toy unCLIP model fitted
    to it (None where not asked for)."""

    def __init__(self, tmp_path: Path, pipe, unclip=None):
        self.tmp, self._pipe, self._unclip = tmp_path, pipe, unclip

    @property
    def pipe(self):
        assert self._pipe is not None, "mark the case needs_pipe=True"
        return self._pipe

    @property
    def unclip(self):
        assert self._unclip is not None, "mark the case needs_unclip=True"
        return self._unclip


def rgb(h=64, w=64, value=(200, 30, 30)) -> np.ndarray:
    return np.broadcast_to(np.asarray(value, np.uint8), (h, w, 3)).copy()


def rgba_image() -> Image.Image:
    """Left half opaque red, right half fully transparent (any colour underneath)."""
    a = np.zeros((64, 64, 4), np.uint8)
    a[:, :32] = (200, 30, 30, 255)
    a[:, 32:] = (0, 0, 255, 0)
    return Image.fromarray(a, "RGBA")


def grey_image() -> Image.Image:
    return Image.fromarray(np.full((64, 64), 77, np.uint8), "L")


def _as_picture(x) -> np.ndarray:
    """images.to_tensor's (1, 3, 64, 64) in [-1, 1] -> (64, 64, 3) in [0, 1]."""
    assert tuple(x.shape) == (1, 3, 64, 64) and x.dtype == torch.float32
    return ((x[0].permute(1, 2, 0) + 1) / 2).numpy()


def check_rgba_converted(x):
    arr = _as_picture(x)
    np.testing.assert_allclose(arr[:, :32], np.broadcast_to([200 / 255, 30 / 255, 30 / 255],
                                                            (64, 32, 3)), atol=1e-6)
    np.testing.assert_allclose(arr[:, 32:], 1.0)  # transparent -> white, not the hidden blue


def check_grey_converted(x):
    np.testing.assert_allclose(_as_picture(x), 77 / 255, atol=1e-6)  # same in all 3 channels


# Paths are relative to the case's tmp folder (the working directory during a case), as a
# learner would type them; checks.fail shortens long values from the end, which would cut
# the file name off a long absolute tmp path.


def _pickle_file(ctx, name):
    """A dummy file with a pickle suffix: it must be refused by name, never opened."""
    (ctx.tmp / name).write_bytes(b"\x80\x04not really a pickle: it must never be opened")
    return Path(name)


def _empty_folder(ctx):
    folder = ctx.tmp / "just-some-folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("not a model")
    return Path(folder.name)


def _foreign_pipeline(ctx):
    folder = ctx.tmp / "sdxl"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name":
                                                         "StableDiffusionXLPipeline"}))
    return Path(folder.name)


def _toy_folder(ctx):
    """A folder that passes the path checks (model_index.json of the right class); the
    refusals tested with it come before any weight is read."""
    folder = ctx.tmp / "tiny-sd"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name":
                                                         "StableDiffusionPipeline"}))
    return str(Path(folder.name))


def _gen(ctx, **kw):
    args = dict(prompt=PROMPT, seed=0, num_inference_steps=1)
    args.update(kw)
    return pipeline.generate(ctx.pipe, **args)


def _gen_images(ctx, **kw):
    args = dict(prompts=PROMPT, seeds=[0, 1], num_inference_steps=1)
    args.update(kw)
    return pipeline.generate_images(ctx.pipe, **args)


def _sample(ctx, **kw):
    args = dict(prompt=PROMPT, seed=0, num_inference_steps=2)
    args.update(kw)
    return sampling.sample(ctx.pipe, **args)


def _img2img(ctx, **kw):
    args = dict(image=rgb(), prompt=PROMPT, strength=0.5, seed=0, num_inference_steps=2)
    args.update(kw)
    return img2img.img2img(ctx.pipe, **args)


def _inpaint(ctx, **kw):
    mask = np.zeros((64, 64), np.float32)
    mask[:, :32] = 1
    args = dict(image=rgb(), mask=mask, prompt=PROMPT, seed=0, num_inference_steps=2)
    args.update(kw)
    return inpainting.inpaint(ctx.pipe, **args)


def _outpaint(ctx, **kw):
    args = dict(image=rgb(), prompt=PROMPT, new_width=96, num_inference_steps=2)
    args.update(kw)
    return inpainting.outpaint(ctx.pipe, **args)


def _panel(ctx, **kw):
    args = dict(num_inference_steps=2, strip="preview")
    args.update(kw)
    return widgets.GuidancePanel(ctx.pipe, **args)


def _latents_and_captions(caption=PROMPT):
    return torch.zeros(1, 4, 16, 16), [caption]


def _textual_inversion(c, captions=("a red <star> on the left",), **kw):
    args = dict(steps=1)
    args.update(kw)
    return textual_inversion.train_textual_inversion(c.pipe, torch.zeros(1, 4, 16, 16),
                                                     list(captions), **args)


def _nine_channel_pipe(c):
    """The tiny pipeline with a 9-channel UNet (the layout of SD's inpainting checkpoints)."""
    unet = UNet2DConditionModel.from_config(c.pipe.unet.config, in_channels=9)
    return StableDiffusionPipeline(**{**c.pipe.components, "unet": unet},
                                   requires_safety_checker=False)


def _recorded_store(c):
    """An AttentionStore that has recorded one guided UNet call (16x16 and 8x8 layers, step 0)."""
    g = torch.Generator().manual_seed(1)
    store = attention.AttentionStore(c.pipe.unet)
    with torch.no_grad(), store:
        c.pipe.unet(torch.randn(2, 4, 16, 16, generator=g), torch.tensor(500),
                    torch.randn(2, 7, 32, generator=g))
    return store


def _head_weights(c, head):
    attn = next(m for n, m in c.pipe.unet.named_modules() if n.endswith("attn2"))
    x = torch.zeros(2, 256, attn.to_q.in_features)
    ctx = torch.zeros(2, 7, 32)
    return attention.check_head_weights(torch.zeros(256, 7), attn, x, ctx, head=head)


def _variations(c, **kw):
    args = dict(image=rgb(), seeds=[0], noise_level=0, num_inference_steps=1)
    args.update(kw)
    return variations.variations(c.pipe, c.unclip, **args)


def _folder_with_vae(c):
    """A folder that passes _finetune_decoder's folder check (vae/config.json); the refusals
    tested with it come before any weight is read."""
    (c.tmp / "model" / "vae").mkdir(parents=True)
    (c.tmp / "model" / "vae" / "config.json").write_text("{}")
    return "model"


def _plain_markdown(c):
    (c.tmp / "plain.md").write_text("no results table here")
    return Path("plain.md")


def _model_folder(c):
    (c.tmp / "model").mkdir()
    (c.tmp / "model" / "model_index.json").write_text("{}")
    return "model"


def _alphas():
    return DDPMScheduler(num_train_timesteps=1000).alphas_cumprod


LONG_PROMPT = " and ".join(["a red circle on the left"] * 4)
NAN = float("nan")
SEED_MAX = 2**32 - 1

CASES = [
    # ---- the shared checks, for kinds of bad value no public function below reaches first
    Case("steps-float", lambda c: checks.check_steps(2.5),
         Refused("num_inference_steps", "2.5", "expected an int")),
    Case("steps-bool", lambda c: checks.check_steps(True),
         Refused("num_inference_steps", "True", "expected an int")),
    Case("guidance-negative", lambda c: checks.check_guidance(-1.5),
         Refused("guidance_scale", "-1.5", "[0.0, 50.0]")),
    Case("guidance-inf", lambda c: checks.check_guidance(math.inf),
         Refused("guidance_scale", "inf", "finite number")),
    Case("guidance-str", lambda c: checks.check_guidance("7.5"),
         Refused("guidance_scale", "'7.5'", "finite number")),
    Case("size-zero", lambda c: checks.check_size(0, 64), Refused("height", "0", "[8, 4096]")),
    Case("prompt-not-str", lambda c: checks.check_prompt(42),
         Refused("prompt", "42", "expected a str")),
    Case("prompt-blank", lambda c: checks.check_prompt("   ", c.pipe.tokenizer),
         Refused("prompt", "'   '", "non-empty prompt"), needs_pipe=True),
    # ---- pictures: checks.check_image, and images.to_tensor's documented conversions
    Case("to-tensor-rgba-pil", lambda c: images.to_tensor(rgba_image()),
         Converted(check_rgba_converted)),
    Case("to-tensor-greyscale-pil", lambda c: images.to_tensor(grey_image()),
         Converted(check_grey_converted)),
    Case("image-greyscale-array", lambda c: checks.check_image(np.zeros((64, 64), np.uint8)),
         Refused("image", "array of shape (64, 64)", "convert RGBA/greyscale with PIL")),
    Case("image-rgba-array", lambda c: checks.check_image(np.zeros((64, 64, 4), np.uint8)),
         Refused("image", "array of shape (64, 64, 4)", "expected shape (H, W, 3)")),
    Case("image-cmyk-pil", lambda c: checks.check_image(Image.new("CMYK", (64, 64))),
         Refused("image", "mode=CMYK", "RGB, RGBA, L or P")),
    Case("image-wrong-size", lambda c: checks.check_image(rgb(32, 32), size=(64, 64)),
         Refused("image", "image of size 32x32", "expected size 64x64")),
    Case("image-float-0-255", lambda c: checks.check_image(rgb().astype(np.float32)),
         Refused("image", "float array in [30, 200]", "values in [0, 1]")),
    Case("image-float-nan", lambda c: checks.check_image(np.full((8, 8, 3), NAN, np.float32)),
         Refused("image", "float array in", "values in [0, 1]")),
    Case("image-list", lambda c: checks.check_image([[1, 2, 3]]),
         Refused("image", "[[1, 2, 3]]", "PIL image or a numpy array")),
    Case("to-tensor-mixed-sizes", lambda c: images.to_tensor([rgb(), rgb(32, 32)]),
         Refused("images[1]", "picture of size 32x32", "64x64 like images[0]")),
    Case("to-tensor-empty-list", lambda c: images.to_tensor([]),
         Refused("images", "[]", "at least one picture")),
    Case("to-pil-one-channel", lambda c: images.to_pil(torch.zeros(1, 8, 8)),
         Refused("x", "(1, 8, 8)", "(3, H, W) or (B, 3, H, W)")),
    Case("psnr-shape-mismatch", lambda c: images.psnr(torch.zeros(1, 3, 8, 8),
                                                      torch.zeros(1, 3, 4, 4)),
         Refused("b", "(1, 3, 4, 4)", "a's shape (1, 3, 8, 8)")),
    Case("decode-3-channels", lambda c: images.decode(c.pipe.vae, torch.zeros(1, 3, 16, 16)),
         Refused("latents", "(1, 3, 16, 16)", "(B, 4, h, w)"), needs_pipe=True),
    Case("decode-not-a-vae", lambda c: images.decode("vae", torch.zeros(1, 4, 16, 16)),
         Refused("vae", "'str'", "AutoencoderKL")),
    # ---- masks
    Case("mask-3d", lambda c: checks.check_mask(np.zeros((64, 64, 3)), (64, 64)),
         Refused("mask", "array of shape (64, 64, 3)", "expected shape (64, 64)")),
    Case("mask-negative", lambda c: checks.check_mask(np.full((64, 64), -0.5), (64, 64)),
         Refused("mask", "values in [-0.5, -0.5]", "expected values in [0, 1]")),
    Case("mask-rgb-pil", lambda c: checks.check_mask(Image.new("RGB", (64, 64)), (64, 64)),
         Refused("mask", "mode=RGB", "mode L or 1")),
    # ---- models on disk: pipeline.load_pipeline
    Case("model-missing-path", lambda c: pipeline.load_pipeline("no-such-model"),
         Refused("model", "no-such-model", "no such file or folder")),
    Case("model-not-a-pipeline", lambda c: pipeline.load_pipeline(str(_empty_folder(c))),
         Refused("model", "just-some-folder'", "not a diffusers pipeline (no model_index.json)")),
    Case("model-pickle", lambda c: pipeline.load_pipeline(str(_pickle_file(c, "model.ckpt"))),
         Refused("model", "model.ckpt", "pickle checkpoints are refused")),
    Case("model-other-family", lambda c: pipeline.load_pipeline(str(_foreign_pipeline(c))),
         Refused("model", "sdxl", "StableDiffusionXLPipeline")),
    Case("model-not-a-path", lambda c: pipeline.load_pipeline(42),
         Refused("model", "42", "expected 'toy', a hub id, a folder")),
    Case("model-from-env-missing", lambda c: pipeline.load_pipeline(device="cpu"),
         Refused("model", "nowhere.safetensors", "no such file or folder"),
         env={"SDKIT_MODEL": "nowhere.safetensors"}),
    Case("load-safety-checker-str", lambda c: pipeline.load_pipeline(
        _toy_folder(c), device="cpu", safety_checker="off"),
         Refused("safety_checker", "'off'", "True or False")),
    Case("load-cpu-offload-without-cuda", lambda c: pipeline.load_pipeline(
        _toy_folder(c), device="cpu", cpu_offload="model"),
         Refused("cpu_offload", "'model'", "torch.cuda.is_available() is False"),
         no_accelerator=True),
    Case("load-cpu-offload-unknown", lambda c: pipeline.load_pipeline(
        _toy_folder(c), device="cpu", cpu_offload="gpu"),
         Refused("cpu_offload", "'gpu'", "one of [None, 'model', 'sequential']")),
    # ---- devices: sdkit.device (load_pipeline passes device and dtype straight to it)
    Case("device-cuda-without-cuda", lambda c: get_device("cuda"),
         Refused("device", "'cuda'", "torch.cuda.is_available() is False", DeviceError),
         no_accelerator=True),
    Case("device-mps-without-mps", lambda c: get_device("mps"),
         Refused("device", "'mps'", "expected one of 'cpu'", DeviceError), no_accelerator=True),
    Case("device-unknown", lambda c: get_device("tpu"),
         Refused("device", "'tpu'", "expected one of 'auto', 'cpu', 'cuda'", DeviceError)),
    Case("device-int", lambda c: get_device(0),
         Refused("device", "0", "not a device sdkit knows", DeviceError)),
    Case("device-meta", lambda c: get_device(torch.device("meta")),
         Refused("device", "meta", "not a device sdkit knows", DeviceError)),
    Case("dtype-float16-on-cpu", lambda c: get_device("cpu", "float16"),
         Refused("dtype", "'float16'", "expected 'float32' or 'bfloat16' on cpu", DeviceError),
         no_accelerator=True),
    Case("dtype-float64", lambda c: get_device("cpu", "float64"),
         Refused("dtype", "'float64'", "not a dtype sdkit supports", DeviceError)),
    Case("dtype-unknown", lambda c: get_device("cpu", torch.int8),
         Refused("dtype", "torch.int8", "'float32' (fp32)", DeviceError)),
    Case("env-device-unknown", lambda c: get_device(),
         Refused("SDKIT_DEVICE", "'tpu'", "expected one of 'auto', 'cpu'", DeviceError),
         env={"SDKIT_DEVICE": "tpu"}, no_accelerator=True),
    Case("env-dtype-float16-on-cpu", lambda c: get_device(),
         Refused("SDKIT_DTYPE", "'float16'", "expected 'float32' or 'bfloat16'", DeviceError),
         env={"SDKIT_DTYPE": "float16"}, no_accelerator=True),
    # ---- pipeline.generate and generate_images: steps, guidance, prompt, seed, size
    Case("generate-steps-zero", lambda c: _gen(c, num_inference_steps=0),
         Refused("num_inference_steps", "=0", "[1, 1000]"), needs_pipe=True),
    Case("generate-guidance-nan", lambda c: _gen(c, guidance_scale=NAN),
         Refused("guidance_scale", "nan", "finite number"), needs_pipe=True),
    Case("generate-empty-prompt", lambda c: _gen(c, prompt=""),
         Refused("prompt", "''", "guidance_scale=0"), needs_pipe=True),
    Case("generate-unknown-word", lambda c: _gen(c, prompt="a purple circle on the left"),
         Refused("prompt", "purple", "no token for ['purple']"), needs_pipe=True),
    Case("generate-too-long", lambda c: _gen(c, prompt=LONG_PROMPT),
         Refused("prompt", "a red circle", "at most 18 tokens"), needs_pipe=True),
    Case("generate-seed-negative", lambda c: _gen(c, seed=-7),
         Refused("seed", "-7", f"[0, {SEED_MAX}]"), needs_pipe=True),
    Case("generate-height-63-alone", lambda c: _gen(c, height=63),
         Refused("height", "63", "multiple of 4"), needs_pipe=True),
    Case("generate-images-no-seeds", lambda c: _gen_images(c, seeds=[]),
         Refused("seeds", "[]", "non-empty list"), needs_pipe=True),
    Case("generate-images-prompts-per-seed", lambda c: _gen_images(c, prompts=[PROMPT] * 3),
         Refused("prompts", "a red circle", "a list of 2 str, one per seed"), needs_pipe=True),
    Case("generate-images-output", lambda c: _gen_images(c, output="np"),
         Refused("output", "'np'", "one of ['pil', 'uint8']"), needs_pipe=True),
    Case("initial-latents-generators", lambda c: pipeline.initial_latents(
        c.pipe, [torch.Generator().manual_seed(0)] * 2, batch_size=3),
         Refused("generator", "Generator", "one generator per image (3)"), needs_pipe=True),
    Case("training-scheduler-not-a-scheduler", lambda c: pipeline.training_scheduler(object()),
         Refused("pipe_or_scheduler", "'object'", "pipeline or scheduler")),
    # ---- sampling
    Case("sample-steps-negative", lambda c: _sample(c, num_inference_steps=-1),
         Refused("num_inference_steps", "-1", "[1, 1000]"), needs_pipe=True),
    Case("sample-height-62", lambda c: _sample(c, height=62),
         Refused("height", "62", "multiple of 4"), needs_pipe=True),
    Case("sample-unknown-scheduler", lambda c: _sample(c, scheduler="Heun"),
         Refused("name", "'Heun'", "one of ['DDPM', 'DDIM', 'Euler', 'DPM-Solver++']"),
         needs_pipe=True),
    Case("sample-eta-2", lambda c: _sample(c, eta=2.0),
         Refused("eta", "2.0", "[0.0, 1.0]"), needs_pipe=True),
    Case("sample-seeds-mismatch", lambda c: _sample(c, prompt=[PROMPT, PROMPT], seed=[1, 2, 3]),
         Refused("seed", "[1, 2, 3]", "one seed per prompt (2)"), needs_pipe=True),
    Case("predicted-x0-unknown-type", lambda c: sampling.predicted_x0(
        torch.zeros(1), torch.zeros(1), 0.5, "flow"),
         Refused("prediction_type", "'flow'", "'epsilon', 'v_prediction', 'sample'")),
    Case("sample-guidance-51", lambda c: _sample(c, guidance_scale=51.0),
         Refused("guidance_scale", "51.0", "[0.0, 50.0]"), needs_pipe=True),
    Case("sample-seed-str", lambda c: _sample(c, seed="3"),
         Refused("seed", "'3'", f"[0, {SEED_MAX}]"), needs_pipe=True),
    Case("sample-unknown-words", lambda c: _sample(c, prompt="a purple star"),
         Refused("prompt", "'a purple star'", "no token for ['purple', 'star']"),
         needs_pipe=True),
    Case("sample-negative-prompts-per-seed", lambda c: _sample(c, negative_prompt=["a", "b"]),
         Refused("negative_prompt", "['a', 'b']", "one str or a list of 1 str"),
         needs_pipe=True),
    Case("sample-text-embeddings-rows", lambda c: _sample(
        c, text_embeddings=(torch.zeros(2, 20, 32),) * 2),
         Refused("text_embeddings", "(2, 20, 32)", "(cond, uncond) from encode_prompt, 1 rows"),
         needs_pipe=True),
    Case("sample-cached-outputs-steps", lambda c: _sample(
        c, num_inference_steps=3, cached_outputs=(torch.zeros(2, 1, 4, 16, 16),) * 2),
         Refused("cached_outputs", "torch.Size([2, 1, 4, 16, 16])",
                 "each of shape (3, 1, 4, 16, 16)"), needs_pipe=True),
    Case("preview-weights-shape", lambda c: sampling.latents_to_rgb_preview(
        torch.zeros(1, 4, 8, 8), torch.zeros(4, 4)),
         Refused("weights", "torch.Size([4, 4])", "(channels + 1, 3) from fit_latent_rgb_map")),
    Case("preview-3-channel-latents", lambda c: sampling.latents_to_rgb_preview(
        torch.zeros(1, 3, 8, 8), torch.zeros(5, 3)),
         Refused("latents", "torch.Size([1, 3, 8, 8])", "expected a tensor (B, 4, h, w)")),
    Case("preview-upsample-0", lambda c: sampling.latents_to_rgb_preview(
        torch.zeros(1, 4, 8, 8), torch.zeros(5, 3), upsample=0),
         Refused("upsample", "0", "[1, 64]")),
    Case("fit-rgb-map-30px", lambda c: sampling.fit_latent_rgb_map(
        torch.zeros(1, 4, 8, 8), torch.zeros(1, 3, 30, 30)),
         Refused("pictures", "torch.Size([1, 3, 30, 30])", "(1, 3, 8*f, 8*f)")),
    # ---- img2img
    Case("img2img-strength-1.5", lambda c: _img2img(c, strength=1.5),
         Refused("strength", "1.5", "[0.0, 1.0]"), needs_pipe=True),
    Case("img2img-strength-negative", lambda c: _img2img(c, strength=-0.2),
         Refused("strength", "-0.2", "[0.0, 1.0]"), needs_pipe=True),
    Case("img2img-image-60px", lambda c: _img2img(c, image=rgb(60, 60)),
         Refused("image", "size 60x60", "multiple of 8"), needs_pipe=True),
    Case("img2img-image-int32", lambda c: _img2img(c, image=rgb().astype(np.int32)),
         Refused("image", "array of dtype int32", "uint8, float32 or float64"), needs_pipe=True),
    Case("img2img-strength-nan", lambda c: _img2img(c, strength=NAN),
         Refused("strength", "nan", "finite number in [0.0, 1.0]"), needs_pipe=True),
    Case("img2img-image-batch", lambda c: _img2img(c, image=np.zeros((2, 64, 64, 3), np.uint8)),
         Refused("image", "'2 pictures'", "one picture (batches are left out)"), needs_pipe=True),
    Case("img2img-seed-negative", lambda c: _img2img(c, seed=-2),
         Refused("seed", "-2", f"[0, {SEED_MAX}]"), needs_pipe=True),
    Case("img2img-steps-1001", lambda c: _img2img(c, num_inference_steps=1001),
         Refused("num_inference_steps", "1001", "[1, 1000]"), needs_pipe=True),
    Case("img2img-guidance-negative", lambda c: _img2img(c, guidance_scale=-1.0),
         Refused("guidance_scale", "-1.0", "[0.0, 50.0]"), needs_pipe=True),
    Case("img2img-output-type", lambda c: _img2img(c, output_type="jpeg"),
         Refused("output_type", "'jpeg'", "one of ['pil', 'np', 'latent']"), needs_pipe=True),
    # ---- inpainting and outpainting
    Case("inpaint-mask-wrong-shape", lambda c: _inpaint(c, mask=np.ones((32, 32))),
         Refused("mask", "array of shape (32, 32)", "expected shape (64, 64)"), needs_pipe=True),
    Case("inpaint-mask-range", lambda c: _inpaint(c, mask=np.full((64, 64), 3.0)),
         Refused("mask", "values in [3, 3]", "expected values in [0, 1]"), needs_pipe=True),
    Case("inpaint-strength-too-small", lambda c: _inpaint(c, strength=0.01),
         Refused("strength", "0.01", "int(num_inference_steps * strength) >= 1"),
         needs_pipe=True),
    Case("outpaint-width-100", lambda c: _outpaint(c, new_width=100),
         Refused("new_width", "100", "multiple of 8"), needs_pipe=True),
    Case("outpaint-narrower", lambda c: _outpaint(c, new_width=32),
         Refused("new_width", "32", "[72, 4096]"), needs_pipe=True),
    Case("outpaint-side-top", lambda c: _outpaint(c, side="top"),
         Refused("side", "'top'", "one of"), needs_pipe=True),
    Case("inpaint-image-width-60", lambda c: _inpaint(c, image=np.zeros((64, 60, 3), np.uint8)),
         Refused("image", "picture of size 64x60", "width a multiple of 8"), needs_pipe=True),
    Case("inpaint-paste-back-str", lambda c: _inpaint(c, paste_back="yes"),
         Refused("paste_back", "'yes'", "True or False"), needs_pipe=True),
    Case("inpaint-callback-int", lambda c: _inpaint(c, callback=3),
         Refused("callback", "3", "a function (i, t, latents) or None"), needs_pipe=True),
    Case("inpaint-9-channel-unet", lambda c: inpainting.inpaint(
        _nine_channel_pipe(c), rgb(), np.ones((64, 64)), PROMPT, seed=0, num_inference_steps=2),
         Refused("pipe", "a UNet with 9 input channels", "expected a 4-channel UNet"),
         needs_pipe=True),
    Case("outpaint-seed-negative", lambda c: _outpaint(c, seed=-3),
         Refused("seed", "-3", f"[0, {SEED_MAX}]"), needs_pipe=True),
    Case("dilate-mask-negative-pixels", lambda c: inpainting.dilate_mask(np.zeros((8, 8)), -1),
         Refused("pixels", "-1", "[0, 512]")),
    Case("latent-mask-height-60", lambda c: inpainting.latent_mask(np.zeros((60, 64)), 8),
         Refused("mask", "array of shape (60, 64)", "height and width are multiples of 8")),
    # ---- noising and latents
    Case("load-photo-unknown", lambda c: noising.load_photo("mona_lisa"),
         Refused("name", "'mona_lisa'", "expected one of")),
    Case("load-photo-size-0", lambda c: noising.load_photo(size=0),
         Refused("size", "0", "[8, 1024]")),
    Case("add-noise-t-1000", lambda c: noising.add_noise(
        torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8), 1000, _alphas()),
         Refused("t", "1000", "[0, 999]")),
    Case("add-noise-float-t", lambda c: noising.add_noise(
        torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8), torch.tensor([0.5]), _alphas()),
         Refused("t", "0.5", "integer tensor")),
    Case("add-noise-noise-shape", lambda c: noising.add_noise(
        torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 4, 4), 10, _alphas()),
         Refused("noise", "torch.Size([1, 3, 4, 4])", "shaped like x0")),
    Case("add-noise-t-per-sample", lambda c: noising.add_noise(
        torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 8), torch.tensor([1, 2, 3]), _alphas()),
         Refused("t", "tensor([1, 2, 3])", "one timestep or one per sample (2)")),
    Case("add-noise-alphas-above-1", lambda c: noising.add_noise(
        torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8), 5, _alphas() * 2),
         Refused("alphas_cumprod", "tensor([1.9998e+00", "values in [0, 1]")),
    Case("forward-chain-t-negative", lambda c: noising.forward_chain(
        torch.zeros(1, 3, 8, 8), DDPMScheduler().betas, -1),
         Refused("t", "-1", "[0, 999]")),
    Case("forward-chain-betas-above-1", lambda c: noising.forward_chain(
        torch.zeros(1, 3, 8, 8), torch.full((10,), 2.0), 3),
         Refused("betas", "tensor([2., 2.", "1-D tensor in [0, 1]")),
    Case("noise-slider-batch", lambda c: noising.noise_slider(
        torch.zeros(2, 3, 8, 8), DDPMScheduler()),
         Refused("x0", "torch.Size([2, 3, 8, 8])", "one sample, a tensor (1, C, H, W)")),
    Case("noise-slider-latents-without-decode", lambda c: noising.noise_slider(
        torch.zeros(1, 4, 8, 8), DDPMScheduler()),
         Refused("decode", "None", "a decoder for 4-channel samples")),
    Case("noise-slider-t-float", lambda c: noising.noise_slider(
        torch.zeros(1, 3, 8, 8), DDPMScheduler(), t=1.5),
         Refused("t", "1.5", "[0, 999]")),
    Case("plot-schedules-unknown-highlight", lambda c: noising.plot_schedules(
        {"a": DDPMScheduler()}, highlight="b"),
         Refused("highlight", "'b'", "one of ['a']")),
    Case("slerp-w-1.5", lambda c: latents.slerp(torch.ones(4), torch.ones(4), 1.5),
         Refused("w", "1.5", "[0.0, 1.0]")),
    Case("slerp-shapes-differ", lambda c: latents.slerp(torch.zeros(3), torch.ones(4), 0.5),
         Refused("b", "torch.Size([4])", "shaped like a (3,)")),
    Case("compression-factor-2d-image", lambda c: latents.compression_factor(
        (64, 64), (4, 16, 16)),
         Refused("image_shape", "(64, 64)", "(channels, height, width)")),
    Case("compression-factor-0-channels", lambda c: latents.compression_factor(
        (3, 64, 64), (0, 16, 16)),
         Refused("latent_shape[0]", "0", "an int >= 1")),
    Case("show-channels-batch", lambda c: latents.show_channels(torch.zeros(2, 4, 8, 8)),
         Refused("latents", "torch.Size([2, 4, 8, 8])", "one latent (C, h, w)")),
    Case("unet-flops-text-shape", lambda c: latents.unet_flops(
        c.pipe.unet, (4, 16, 16), (20,)),
         Refused("text_shape", "(20,)", "a tuple of 2 ints"), needs_pipe=True),
    Case("unet-flops-no-unet", lambda c: latents.unet_flops(None, (4, 16, 16), (20, 32)),
         Refused("unet", "'NoneType'", "UNet2DConditionModel")),
    Case("brightness-not-a-vae", lambda c: latents.brightness_correlations(object()),
         Refused("vae", "'object'", "AutoencoderKL")),
    # ---- attention
    Case("token-indices-word-not-in-prompt", lambda c: attention.token_indices(
        c.pipe.tokenizer, PROMPT, "blue"),
         Refused("word", "'blue'", "expected a word of the prompt"), needs_pipe=True),
    Case("attention-store-not-a-unet", lambda c: attention.AttentionStore("unet"),
         Refused("unet", "'unet'", "UNet2DConditionModel")),
    Case("peak-inside-float-mask", lambda c: attention.peak_inside(
        np.zeros((16, 16)), np.zeros((64, 64), np.float32)),
         Refused("mask", "dtype float32", "bool mask")),
    Case("peak-inside-maps-of-several-words", lambda c: attention.peak_inside(
        torch.zeros(2, 16, 16), np.zeros((64, 64), bool)),
         Refused("word_map", "array of shape (2, 16, 16)", "finite maps (H, W)")),
    Case("word-maps-unseen-resolution", lambda c: _recorded_store(c).word_maps(resolution=4),
         Refused("resolution", "4", "one of [16, 8]"), needs_pipe=True),
    Case("word-maps-unseen-step", lambda c: _recorded_store(c).word_maps(steps=[3]),
         Refused("steps", "3", "[0, 0]"), needs_pipe=True),
    Case("word-maps-unknown-layer", lambda c: _recorded_store(c).word_maps(
        layers=["no.such.layer"]),
         Refused("layers", "'no.such.layer'", "one of ['down_blocks.0.attentions.0"),
         needs_pipe=True),
    Case("word-maps-item-of-a-batch-of-1", lambda c: _recorded_store(c).word_maps(item=1),
         Refused("item", "1", "[0, 0]"), needs_pipe=True),
    Case("collect-pointing-seeds-per-prompt", lambda c: attention.collect_pointing(
        c.pipe, [PROMPT, PROMPT], [1]),
         Refused("seeds", "[1]", "one seed per prompt (2 prompts)"), needs_pipe=True),
    Case("head-weights-head-out-of-range", lambda c: _head_weights(c, head=2),
         Refused("head", "2", "[0, 1]"), needs_pipe=True),
    Case("show-word-maps-one-map", lambda c: attention.show_word_maps(
        rgb(), torch.zeros(16, 16), ["a"]),
         Refused("maps", "array of shape (16, 16)", "finite maps (T, h, w)")),
    Case("show-word-maps-more-tokens-than-maps", lambda c: attention.show_word_maps(
        rgb(), torch.zeros(3, 16, 16), ["<|startoftext|>", "a", "red", "<|endoftext|>"]),
         Refused("tokens", "'<|startoftext|>', 'a'", "a list of 1 to 3 token labels")),
    # ---- fine-tuning: finetune, textual_inversion, lora, hypernetwork
    Case("concept-data-unknown-colour", lambda c: finetune.make_concept_data(
        ["pink"], ["circle"]),
         Refused("colours", "['pink']", "list of words from")),
    Case("concept-data-template-without-where", lambda c: finetune.make_concept_data(
        ["red"], ["star"], template="a {colour} star"),
         Refused("template", "'a {colour} star'", "a str with a {where} field")),
    Case("fill-template-unknown-field", lambda c: finetune.fill_template(
        "a {color} star {where}", 2),
         Refused("template", "'a {color} star {where}'", "only the fields {colour}, {shape}")),
    Case("encode-images-size-60", lambda c: finetune.encode_images(c.pipe.vae, [rgb()], size=60),
         Refused("height", "60", "a multiple of 8 (the VAE shrinks images by 8)"),
         needs_pipe=True),
    Case("success-rate-target-not-a-caption", lambda c: finetune.success_rate(
        c.pipe, PROMPT, [0], "a pink blob"),
         Refused("targets", "'a pink blob'", "a caption of the shapes grammar"), needs_pipe=True),
    Case("success-rate-not-the-toy", lambda c: finetune.success_rate(
        type("P", (), {"tokenizer": list(range(5000))})(), "a", [0], PROMPT),
         Refused("pipe", "'P'", "the toy model: the shapes checker")),
    Case("textual-inversion-token-without-brackets", lambda c: (
        textual_inversion.train_textual_inversion(
            c.pipe, torch.zeros(1, 4, 16, 16), ["a <star> on the left"], token="star", steps=1)),
         Refused("token", "'star'", "angle brackets"), needs_pipe=True),
    Case("textual-inversion-token-upper-case", lambda c: _textual_inversion(
        c, captions=["a red <Star> on the left"], token="<Star>"),
         Refused("token", "'<Star>'", "lower-case letters"), needs_pipe=True),
    Case("textual-inversion-token-unclosed", lambda c: _textual_inversion(
        c, captions=["a red <triangle on the left"], token="<triangle"),
         Refused("token", "'<triangle'", "a new word in angle brackets"), needs_pipe=True),
    Case("textual-inversion-init-word-of-pieces", lambda c: _textual_inversion(
        c, init_word="purple"),
         Refused("init_word", "'purple'", "a single token; it splits into"), needs_pipe=True),
    Case("textual-inversion-steps-0", lambda c: _textual_inversion(c, steps=0),
         Refused("steps", "0", "[1, 100000]"), needs_pipe=True),
    Case("textual-inversion-steps-float", lambda c: _textual_inversion(c, steps=2.5),
         Refused("steps", "2.5", "[1, 100000]"), needs_pipe=True),
    Case("textual-inversion-lr-0", lambda c: _textual_inversion(c, lr=0.0),
         Refused("lr", "0.0", "a learning rate > 0"), needs_pipe=True),
    Case("textual-inversion-lr-nan", lambda c: _textual_inversion(c, lr=NAN),
         Refused("lr", "nan", "finite number in [0.0, 10.0]"), needs_pipe=True),
    Case("textual-inversion-lr-negative", lambda c: _textual_inversion(c, lr=-1e-3),
         Refused("lr", "-0.001", "[0.0, 10.0]"), needs_pipe=True),
    Case("textual-inversion-batch-size-0", lambda c: _textual_inversion(c, batch_size=0),
         Refused("batch_size", "0", "[1, 4096]"), needs_pipe=True),
    Case("textual-inversion-seed-float", lambda c: _textual_inversion(c, seed=1.5),
         Refused("seed", "1.5", f"[0, {SEED_MAX}]"), needs_pipe=True),
    Case("textual-inversion-captions-without-token", lambda c: _textual_inversion(
        c, captions=["a red triangle on the left"]),
         Refused("captions", "['a red triangle on the left']", "use the new token '<star>'"),
         needs_pipe=True),
    Case("save-embedding-of-another-method", lambda c: textual_inversion.save_embedding(
        finetune.FineTuneResult("hypernetwork", None, [], 0, [], 0.0), "x.safetensors"),
         Refused("result", "FineTuneResult(method='hypernetwork'",
                 "the FineTuneResult of train_textual_inversion")),
    Case("lora-rank-0", lambda c: lora.train_lora(c.pipe, *_latents_and_captions(), r=0, steps=1),
         Refused("r", "0", "[1, 1024]"), needs_pipe=True),
    Case("lora-parameter-count-rank-2048", lambda c: lora.lora_parameter_count(
        c.pipe.unet, r=2048),
         Refused("r", "2048", "[1, 1024]"), needs_pipe=True),
    Case("lora-captions-per-latent", lambda c: lora.train_lora(
        c.pipe, torch.zeros(1, 4, 16, 16), [PROMPT, PROMPT], steps=1),
         Refused("captions", "'a red circle on the left', 'a red circle on the left'",
                 "a list of 1 captions, one per latent"), needs_pipe=True),
    Case("hypernetwork-pictures-for-latents", lambda c: hypernetwork.train_hypernetwork(
        c.pipe, np.zeros((1, 64, 64, 3), np.uint8), [PROMPT], steps=1),
         Refused("latents", "shape=(1, 64, 64, 3)", "a tensor (N, 4, h, w) from encode_images"),
         needs_pipe=True),
    Case("hypernetwork-hidden-0", lambda c: hypernetwork.train_hypernetwork(
        c.pipe, *_latents_and_captions(), hidden=0, steps=1),
         Refused("hidden", "0", "[1, 65536]"), needs_pipe=True),
    Case("hypernetwork-strength-of-a-stock-pipe", lambda c: (
        hypernetwork.set_hypernetwork_strength(c.pipe, 0.5)),
         Refused("pipe", "'StableDiffusionPipeline'", "a pipeline from train_hypernetwork"),
         needs_pipe=True),
    Case("lora-p-uncond-above-1", lambda c: lora.train_lora(
        c.pipe, *_latents_and_captions(), p_uncond=1.5, steps=1),
         Refused("p_uncond", "1.5", "[0.0, 1.0]"), needs_pipe=True),
    Case("load-embedding-pickle", lambda c: textual_inversion.load_embedding(
        c.pipe, _pickle_file(c, "star.bin")),
         Refused("path", "star.bin", ".safetensors file"), needs_pipe=True),
    # ---- widgets: the panel's own limits and its seed range
    Case("panel-guidance-above-15", lambda c: _panel(c, guidance_scale=20.0),
         Refused("guidance_scale", "20.0", "[0.0, 15.0]"), needs_pipe=True),
    Case("panel-steps-above-50", lambda c: _panel(c, num_inference_steps=60),
         Refused("num_inference_steps", "60", "[1, 50]"), needs_pipe=True),
    Case("panel-seed-above-range", lambda c: _panel(c, seed=SEED_MAX + 1),
         Refused("seed", str(SEED_MAX + 1), f"[0, {SEED_MAX}]"), needs_pipe=True),
    Case("panel-image-size-0", lambda c: _panel(c, image_size=0),
         Refused("image_size", "0", "[32, 2048]"), needs_pipe=True),
    Case("panel-unknown-strip", lambda c: _panel(c, strip="film"),
         Refused("strip", "'film'", "one of ['vae', 'preview']"), needs_pipe=True),
    # ---- generation and bench (notebook 07)
    Case("bench-full-run-without-cuda", lambda c: bench.main(["--device", "cpu"]),
         Refused("device", "'cpu'", "the full benchmark needs a CUDA GPU"), no_accelerator=True),
    Case("bench-results-file-without-markers", lambda c: bench._write_results(
        {}, _plain_markdown(c)),
         Refused("path", "'plain.md'", "expected the markers <!-- sdkit.bench results: start")),
    # ---- variations
    Case("info-nce-shape-mismatch", lambda c: variations.info_nce(
        torch.zeros(4, 8), torch.zeros(3, 8), 1.0),
         Refused("text_embeds", "(3, 8)", "image_embeds' shape (4, 8)")),
    Case("variations-noise-level-1000", lambda c: _variations(c, noise_level=1000),
         Refused("noise_level", "1000", "expected an int in [0, 999]"), needs_unclip=True),
    Case("variations-noise-level-negative", lambda c: _variations(c, noise_level=-1),
         Refused("noise_level", "-1", "expected an int in [0, 999]"), needs_unclip=True),
    Case("variations-seeds-str", lambda c: _variations(c, seeds="0,1"),
         Refused("seeds", "'0,1'", "expected a list"), needs_unclip=True),
    Case("variations-seed-negative", lambda c: _variations(c, seeds=[-2]),
         Refused("seeds", "-2", f"[0, {SEED_MAX}]"), needs_unclip=True),
    Case("variations-picture-32px", lambda c: _variations(c, image=rgb(32, 32)),
         Refused("image", "picture of size 32x32", "expected size 64x64"), needs_unclip=True),
    Case("variations-steps-negative", lambda c: _variations(c, num_inference_steps=-2),
         Refused("num_inference_steps", "-2", "[1, 1000]"), needs_unclip=True),
    Case("fit-too-few-images", lambda c: variations.fit(c.pipe, n_images=0),
         Refused("n_images", "0", "[16, 1000000]"), needs_pipe=True),
    Case("fit-seed-negative", lambda c: variations.fit(c.pipe, seed=-1),
         Refused("seed", "-1", f"[0, {SEED_MAX}]"), needs_pipe=True),
    Case("noise-augment-level-1000", lambda c: variations.noise_augment(
        c.unclip, torch.zeros(2, 128), torch.tensor([0, 1000])),
         Refused("noise_level", "1000])", "expected ints in [0, 999]"), needs_unclip=True),
    # a checker never raises on a wrong answer (tests/test_variations.py), but a non-function
    # is no answer: it is refused
    # ---- training and evaluation (notebook 12)
    Case("make-unet-channels-30", lambda c: training.make_unet((30,)),
         Refused("block_out_channels", "(30,)", "multiples of 16 in [16, 1024]")),
    Case("training-data-none", lambda c: training.training_data(0),
         Refused("n", "0", "[1, 200000]")),
    Case("training-data-unnamed-0.9", lambda c: training.training_data(10, unnamed=0.9),
         Refused("unnamed", "0.9", "[0.0, 0.5]")),
    Case("make-text-encoder-clip-not-a-model", lambda c: training.make_text_encoder(
        c.pipe.tokenizer, clip_model=42),
         Refused("clip_model", "'int'", "expected a CLIPModel or None"), needs_pipe=True),
    Case("save-checkpoint-no-modules", lambda c: checkpoints.save_checkpoint(
        c.tmp / "x.safetensors", {}, None, 1),
         Refused("modules", "{}", "a non-empty dict of name -> torch module")),
    # ---- token grounding (notebook 12)
    Case("attention-store-keep-graph-1", lambda c: attention.AttentionStore(
        c.pipe.unet, keep_graph=1),
         Refused("keep_graph", "1", "expected True or False"), needs_pipe=True),
    Case("latent-masks-32px", lambda c: grounding.latent_masks(np.zeros((1, 32, 32), bool)),
         Refused("masks", "(1, 32, 32)", "expected 0, 1 or 2 masks of 64x64")),
    Case("latent-masks-side-5", lambda c: grounding.latent_masks(
        np.zeros((1, 64, 64), bool), side=5),
         Refused("side", "5", "expected a divisor of 64")),
    Case("object-tokens-three-objects", lambda c: grounding.object_tokens(
        c.pipe.tokenizer, [" and ".join([PROMPT] * 3)]),
         Refused("captions", PROMPT, "expected captions of one or two objects"), needs_pipe=True),
    Case("grounding-loss-no-records", lambda c: grounding.grounding_loss(
        [], torch.zeros(1, 2, 2), torch.zeros(1, 2, 4, 4)),
         Refused("records", "[]", "AttentionStore(unet, guided=False, keep_graph=True)")),
    Case("grounding-loss-tokens-of-another-batch", lambda c: grounding.grounding_loss(
        [("l", 0, torch.zeros(2, 16, 6))], torch.zeros(3, 2, 2), torch.zeros(2, 2, 4, 4)),
         Refused("tokens", "(3, 2, 2)", "expected (2, 2, 2) word positions")),
    Case("training-data-masks-1", lambda c: training.training_data(4, masks=1),
         Refused("masks", "1", "expected True or False")),
    # ---- the toy CLIP (notebook 04)
    Case("load-clip-folder-without-a-clip", lambda c: clip.load_clip(_empty_folder(c)),
         Refused("folder", "just-some-folder", "a CLIPModel folder (config.json")),
    Case("make-clip-not-a-tokenizer", lambda c: clip.make_clip(42),
         Refused("tokenizer", "'int'", "expected a CLIPTokenizer")),
    Case("train-clip-fewer-pictures-than-a-batch", lambda c: clip.train_clip(
        c.pipe.tokenizer, batch=8, n_images=4),
         Refused("n_images", "4", "[8, 200000]"), needs_pipe=True),
    Case("embed-images-32px", lambda c: clip.embed_images(
        clip.make_clip(c.pipe.tokenizer), np.zeros((2, 32, 32, 3), np.uint8)),
         Refused("images", "(2, 3, 32, 32)", "expected pictures (N, 3, 64, 64)"), needs_pipe=True),
    Case("clip-score-one-caption-too-many", lambda c: clip.clip_score(
        clip.make_clip(c.pipe.tokenizer), c.pipe.tokenizer, rgb()[None].repeat(2, 0),
        [PROMPT] * 3),
         Refused("captions", "3 captions", "expected one per image (2)"), needs_pipe=True),
    Case("retrieval-four-scenes", lambda c: clip.retrieval(
        clip.make_clip(c.pipe.tokenizer), c.pipe.tokenizer, n=4),
         Refused("n", "4", "[8, 5000]"), needs_pipe=True),
    Case("write-tokenizer-not-a-path", lambda c: clip.write_tokenizer(42),
         Refused("folder", "42", "a folder path (str or pathlib.Path)")),
    Case("tokenize-no-captions", lambda c: training.tokenize(c.pipe.tokenizer, []),
         Refused("captions", "[]", "a non-empty list"), needs_pipe=True),
    Case("heldout-psnr-no-pictures", lambda c: training.heldout_psnr(c.pipe.vae, n=0),
         Refused("n", "0", "[1, 4096]"), needs_pipe=True),
    Case("encode-latents-batch-0", lambda c: training.encode_latents(
        c.pipe.vae, rgb()[None], batch=0),
         Refused("batch", "0", "[1, 4096]"), needs_pipe=True),
    Case("finetune-decoder-folder-without-vae", lambda c: training._finetune_decoder(
        str(_empty_folder(c))),
         Refused("folder", "'just-some-folder'", "a pipeline folder with a vae/ subfolder")),
    Case("finetune-decoder-steps-negative", lambda c: training._finetune_decoder(
        _folder_with_vae(c), steps=-1),
         Refused("steps", "-1", "[0, 1000000]")),
    Case("finetune-decoder-no-images", lambda c: training._finetune_decoder(
        _folder_with_vae(c), n_images=0),
         Refused("n_images", "0", "[1, 200000]")),
    Case("evaluate-missing-model", lambda c: evaluation.evaluate("no-such-folder"),
         Refused("model", "'no-such-folder'", "no such file or folder")),
    Case("evaluate-one-prompt", lambda c: evaluation.evaluate(pipeline.TOY_DIR, n_prompts=1),
         Refused("n_prompts", "1", "[2, 10000]")),
    Case("evaluation-figures-not-a-path", lambda c: pipeline.evaluation_figures(None),
         Refused("folder", "None", "a folder path (str or pathlib.Path)")),
    Case("model-card-without-the-figures", lambda c: evaluation._write_model_card(
        _model_folder(c), {"n_prompts": 8}),
         Refused("figs", "['n_prompts']", "expected evaluate's figures; missing ['vae_psnr_db'")),
    # ---- shapes
    Case("parse-caption-unknown-colour", lambda c: shapes.parse_caption(
        "a pink circle on the left"),
         Refused("caption", "'a pink circle on the left'", "colour in")),
    Case("parse-caption-no-position", lambda c: shapes.parse_caption("a red circle"),
         Refused("caption", "'a red circle'", "shapes grammar")),
    Case("parse-caption-empty", lambda c: shapes.parse_caption(""),
         Refused("caption", "''", "shapes grammar")),
    Case("caption-of-three-objects", lambda c: shapes.caption_of(
        [shapes.Obj("red", "circle", "left")] * 3),
         Refused("objects", "(Obj(colour='red', shape='circle'", "1 or 2 objects")),
    Case("render-unknown-position", lambda c: shapes.render(
        [shapes.Obj("red", "circle", "middle")], 0),
         Refused("position", "'middle'", "expected one of")),
    Case("render-unknown-shape", lambda c: shapes.render(
        [shapes.Obj("red", "hexagon", "left")], 0),
         Refused("shape", "'hexagon'", "one of")),
    Case("find-blobs-rgba", lambda c: shapes.find_blobs(np.zeros((64, 64, 4), np.uint8)),
         Refused("image", "(64, 64, 4)", "(H, W, 3)")),
    Case("hits-no-images", lambda c: shapes.hits([], PROMPT),
         Refused("images", "[]", "non-empty list")),
    Case("hits-unknown-criterion", lambda c: shapes.hits([rgb()], PROMPT, criterion="colour"),
         Refused("criterion", "'colour'", "one of ['colour_shape', 'all_attributes']")),
    Case("eval-prompts-one", lambda c: shapes.eval_prompts(1),
         Refused("n", "1", "[2, 10000]")),
]


def _params():
    for case in CASES:
        # 60 s for the call itself; imports and the pipeline build happen in the fixtures
        marks = [pytest.mark.timeout(60, func_only=True)]
        if case.xfail:
            marks.append(pytest.mark.xfail(strict=True, reason=case.xfail))
        yield pytest.param(case, id=case.id, marks=marks)


def test_table_is_large_and_ids_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert len(CASES) >= 40


def test_each_bad_input_once():
    """No two rows refuse the same value of the same parameter with the same reason."""
    keys = [(c.expect.param, c.expect.value, c.expect.allowed) for c in CASES
            if isinstance(c.expect, Refused)]
    twice = {k for k in keys if keys.count(k) > 1}
    assert not twice, twice


# ------------------------------------------------------------------------------ fixtures

REMOVED_MODULES = ("toy", "editing", "offline")  # gone in the restructure (issue 11)


@pytest.fixture(scope="module")
def sdkit_modules() -> dict:
    """Every sdkit module the layers name (sdkit.GROUND, sdkit.NOTEBOOK_MODULES), imported."""
    names = [*sdkit.GROUND, *(m for mods in sdkit.NOTEBOOK_MODULES.values() for m in mods)]
    return {name: importlib.import_module(f"sdkit.{name}") for name in names}


def test_every_module_imports_and_the_removed_ones_are_gone(sdkit_modules):
    assert {"checks", "images", "pipeline", "training", "evaluation"} <= set(sdkit_modules)
    assert not set(REMOVED_MODULES) & set(sdkit_modules)
    for name in REMOVED_MODULES:
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module(f"sdkit.{name}")


@pytest.fixture(scope="module")
def toy_unclip(tiny_pipe):
    """A toy unCLIP model (notebook 11) fitted to the tiny pipeline in a few steps."""
    return variations.fit(tiny_pipe, n_images=64, projector_steps=1, batch=16,
                          progress=False)


@pytest.fixture
def ctx(request, tmp_path, monkeypatch):
    case = request.node.callspec.params["case"]
    fresh_environment(monkeypatch, tmp_path, case.env)
    if case.no_accelerator:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setattr(device_module, "_mps_available", lambda: False)
    pipe = request.getfixturevalue("tiny_pipe") if case.needs_pipe or case.needs_unclip else None
    unclip = request.getfixturevalue("toy_unclip") if case.needs_unclip else None
    return Ctx(tmp_path, pipe, unclip)


@pytest.mark.parametrize("case", list(_params()))
def test_bad_input(case: Case, ctx: Ctx):
    if isinstance(case.expect, Converted):
        result = case.call(ctx)
        case.expect.check(result)
        return
    assert_refused(case.expect, case.call, ctx)


# ------------------------------------------------------------------------------ widgets


@pytest.mark.timeout(300, func_only=True)
def test_panel_shows_callback_errors_and_keeps_working(tiny_pipe):
    """A bad prompt typed into the panel: the error line says why, the last good image stays,
    and the next good prompt works again."""
    panel = widgets.GuidancePanel(tiny_pipe, prompt=PROMPT, num_inference_steps=2,
                                  strip="preview")
    assert panel.status_mode == "exact" and panel.error.value == ""
    good = panel.image_bytes()

    panel.prompt_box.value = "a purple star on the left"  # what a learner might type
    assert panel.status_mode == "error"
    assert "prompt" in panel.error.value and "purple" in panel.error.value
    assert "no token for" in panel.error.value
    assert panel.image_bytes() == good  # the last good image stays

    panel.prompt_box.value = ""  # an empty prompt at guidance > 0
    assert panel.status_mode == "error" and "non-empty prompt" in panel.error.value

    panel.prompt_box.value = "a blue square at the top"
    assert panel.status_mode == "exact"
    assert panel.error.value == ""
    assert panel.image_bytes() != good  # it really recomputed

    panel.guidance_slider.value = panel.guidance_slider.value + 1.0
    assert panel.status_mode in ("exact", "exact (cached)") and panel.error.value == ""
