"""Bad input, table-driven: every public sdkit function refuses it clearly, or converts it as
documented. Nothing hangs, crashes the kernel or is silently "fixed".

Each case is one row of ``CASES``: an id, a call, and what must happen:

- ``Refused(param, value, allowed)``: a ValueError (sdkit's SdkitInputError, DeviceError, ...)
  whose message contains the parameter's name, a representation of the bad value and a piece
  of what is allowed instead;
- ``Converted(check)``: a documented conversion (RGBA composited on white, greyscale repeated
  into RGB); ``check`` asserts the conversion happened and is right.

Rows marked ``needs_pipe`` use the toy pipeline (loaded once per session). The widget panel
test at the end checks that an error in a callback is shown in the panel, which keeps working.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdkit import checks, shapes
from sdkit.device import get_device

PROMPT = "a red circle on the left"


# ------------------------------------------------------------------------------ the table


@dataclass(frozen=True)
class Refused:
    param: str  # the parameter's name, as the message must spell it
    value: str  # a representation of the bad value that must appear in the message
    allowed: str  # a piece of the "what is allowed" part
    exc: type = ValueError


@dataclass(frozen=True)
class Converted:
    check: Callable  # check(result) -> None, asserts the documented conversion


@dataclass(frozen=True)
class Case:
    id: str
    call: Callable  # call(ctx) -> result
    expect: Refused | Converted
    needs_pipe: bool = False
    needs_no_cuda: bool = False
    xfail: str = ""  # strict xfail reason: a known gap, with the fix it needs


class Ctx:
    """What a case's call gets: a tmp folder and the toy pipeline (None if not needed)."""

    def __init__(self, tmp_path: Path, pipe):
        self.tmp, self._pipe = tmp_path, pipe

    @property
    def pipe(self):
        assert self._pipe is not None, "mark the case needs_pipe=True"
        return self._pipe


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


def check_rgba_converted(arr):
    arr = np.asarray(arr)
    assert arr.shape == (64, 64, 3) and arr.dtype == np.float32
    np.testing.assert_allclose(arr[:, :32], np.broadcast_to([200 / 255, 30 / 255, 30 / 255],
                                                            (64, 32, 3)), atol=1e-6)
    np.testing.assert_allclose(arr[:, 32:], 1.0)  # transparent -> white, not the hidden blue


def check_grey_converted(arr):
    arr = np.asarray(arr)
    assert arr.shape == (64, 64, 3) and arr.dtype == np.float32
    np.testing.assert_allclose(arr, 77 / 255, atol=1e-6)  # same value in all three channels


def check_rgba_tensor(x):
    """editing.image_to_tensor: (1, 3, H, W) in [-1, 1]; RGBA composited on white."""
    assert tuple(x.shape) == (1, 3, 64, 64)
    check_rgba_converted(((x[0].permute(1, 2, 0) + 1) / 2).numpy())


def check_grey_tensor(x):
    assert tuple(x.shape) == (1, 3, 64, 64)
    check_grey_converted(((x[0].permute(1, 2, 0) + 1) / 2).numpy())


def check_noising_rgba(x):
    """noising.to_tensor: (B, 3, H, W) in [-1, 1]."""
    assert tuple(x.shape) == (1, 3, 64, 64)
    check_rgba_converted(((x[0].permute(1, 2, 0) + 1) / 2).numpy())


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


def _load(model, **kw):
    from sdkit.pipeline import load_pipeline

    return load_pipeline(model, **kw)


def _gen(ctx, **kw):
    from sdkit.pipeline import generate

    args = dict(prompt=PROMPT, seed=0)
    args.update(kw)
    return generate(ctx.pipe, **args)


def _sample(ctx, **kw):
    from sdkit import sampling

    args = dict(prompt=PROMPT, seed=0, num_inference_steps=2)
    args.update(kw)
    return sampling.sample(ctx.pipe, **args)


def _img2img(ctx, **kw):
    from sdkit import editing

    args = dict(image=rgb(), prompt=PROMPT, strength=0.5, seed=0, num_inference_steps=2)
    args.update(kw)
    return editing.img2img(ctx.pipe, **args)


def _inpaint(ctx, **kw):
    from sdkit import editing

    mask = np.zeros((64, 64), np.float32)
    mask[:, :32] = 1
    args = dict(image=rgb(), mask=mask, prompt=PROMPT, seed=0, num_inference_steps=2)
    args.update(kw)
    return editing.inpaint(ctx.pipe, **args)


def _outpaint(ctx, **kw):
    from sdkit import editing

    args = dict(image=rgb(), prompt=PROMPT, new_width=96, num_inference_steps=2)
    args.update(kw)
    return editing.outpaint(ctx.pipe, **args)


def _panel(ctx, **kw):
    from sdkit.widgets import GuidancePanel

    args = dict(num_inference_steps=2, strip="preview")
    args.update(kw)
    return GuidancePanel(ctx.pipe, **args)


def _alphas():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000).alphas_cumprod


def _noising():
    from sdkit import noising

    return noising


def _latents():
    from sdkit import latents

    return latents


def _attention():
    from sdkit import attention

    return attention


def _finetune():
    from sdkit import finetune

    return finetune


def _sampling():
    from sdkit import sampling

    return sampling


def _editing():
    from sdkit import editing

    return editing


def _variations():
    from sdkit import variations

    return variations


def _widgets():
    from sdkit import widgets

    return widgets


LONG_PROMPT = " and ".join(["a red circle on the left"] * 4)
NAN = float("nan")

CASES = [
    # ---- sdkit.checks: the shared checks every function uses
    Case("steps-zero", lambda c: checks.check_steps(0),
         Refused("num_inference_steps", "=0", "[1, 1000]")),
    Case("steps-negative", lambda c: checks.check_steps(-3),
         Refused("num_inference_steps", "=-3", "[1, 1000]")),
    Case("steps-float", lambda c: checks.check_steps(2.5),
         Refused("num_inference_steps", "2.5", "expected an int")),
    Case("steps-bool", lambda c: checks.check_steps(True),
         Refused("num_inference_steps", "True", "expected an int")),
    Case("guidance-nan", lambda c: checks.check_guidance(NAN),
         Refused("guidance_scale", "nan", "finite number")),
    Case("guidance-negative", lambda c: checks.check_guidance(-1.5),
         Refused("guidance_scale", "-1.5", "[0.0, 50.0]")),
    Case("guidance-inf", lambda c: checks.check_guidance(math.inf),
         Refused("guidance_scale", "inf", "finite number")),
    Case("guidance-str", lambda c: checks.check_guidance("7.5"),
         Refused("guidance_scale", "'7.5'", "finite number")),
    Case("strength-above-1", lambda c: checks.check_strength(1.5),
         Refused("strength", "1.5", "[0.0, 1.0]")),
    Case("strength-negative", lambda c: checks.check_strength(-0.1),
         Refused("strength", "-0.1", "[0.0, 1.0]")),
    Case("seed-negative", lambda c: checks.check_seed(-1),
         Refused("seed", "-1", "expected an int")),
    Case("size-height-60", lambda c: checks.check_size(60, 64),
         Refused("height", "60", "multiple of 8")),
    Case("size-width-100", lambda c: checks.check_size(64, 100),
         Refused("width", "100", "multiple of 8")),
    Case("size-zero", lambda c: checks.check_size(0, 64), Refused("height", "0", "[8, 4096]")),
    Case("prompt-not-str", lambda c: checks.check_prompt(42),
         Refused("prompt", "42", "expected a str")),
    Case("prompt-empty", lambda c: checks.check_prompt("", c.pipe.tokenizer),
         Refused("prompt", "''", "non-empty prompt"), needs_pipe=True),
    Case("prompt-blank", lambda c: checks.check_prompt("   ", c.pipe.tokenizer),
         Refused("prompt", "'   '", "non-empty prompt"), needs_pipe=True),
    Case("prompt-too-long", lambda c: checks.check_prompt(LONG_PROMPT, c.pipe.tokenizer),
         Refused("prompt", "a red circle on the left and", "at most 18 tokens"),
         needs_pipe=True),
    Case("prompt-unknown-words", lambda c: checks.check_prompt("a purple star on the left",
                                                               c.pipe.tokenizer),
         Refused("prompt", "'a purple star on the left'", "no token for ['purple', 'star']"),
         needs_pipe=True),
    Case("choice-unknown", lambda c: checks.check_choice("side", "top", ("left", "right")),
         Refused("side", "'top'", "one of ['left', 'right']")),
    # ---- pictures: sdkit.checks.check_image (documented conversions and refusals)
    Case("image-rgba-pil", lambda c: checks.check_image(rgba_image()),
         Converted(check_rgba_converted)),
    Case("image-greyscale-pil", lambda c: checks.check_image(grey_image()),
         Converted(check_grey_converted)),
    Case("image-greyscale-array", lambda c: checks.check_image(np.zeros((64, 64), np.uint8)),
         Refused("image", "array of shape (64, 64)", "convert RGBA/greyscale with PIL")),
    Case("image-rgba-array", lambda c: checks.check_image(np.zeros((64, 64, 4), np.uint8)),
         Refused("image", "array of shape (64, 64, 4)", "expected shape (H, W, 3)")),
    Case("image-cmyk-pil", lambda c: checks.check_image(Image.new("CMYK", (64, 64))),
         Refused("image", "mode=CMYK", "RGB, RGBA, L or P")),
    Case("image-wrong-size", lambda c: checks.check_image(rgb(32, 32), size=(64, 64)),
         Refused("image", "image of size 32x32", "expected size 64x64")),
    Case("image-int64", lambda c: checks.check_image(rgb().astype(np.int64)),
         Refused("image", "array of dtype int64", "uint8, float32 or float64")),
    Case("image-float-0-255", lambda c: checks.check_image(rgb().astype(np.float32)),
         Refused("image", "float array in [30, 200]", "values in [0, 1]")),
    Case("image-float-nan", lambda c: checks.check_image(np.full((8, 8, 3), NAN, np.float32)),
         Refused("image", "float array in", "values in [0, 1]")),
    Case("image-list", lambda c: checks.check_image([[1, 2, 3]]),
         Refused("image", "[[1, 2, 3]]", "PIL image or a numpy array")),
    # ---- masks
    Case("mask-wrong-shape", lambda c: checks.check_mask(np.zeros((32, 32)), (64, 64)),
         Refused("mask", "array of shape (32, 32)", "expected shape (64, 64)")),
    Case("mask-3d", lambda c: checks.check_mask(np.zeros((64, 64, 3)), (64, 64)),
         Refused("mask", "array of shape (64, 64, 3)", "expected shape (64, 64)")),
    Case("mask-above-1", lambda c: checks.check_mask(np.full((64, 64), 2.0), (64, 64)),
         Refused("mask", "values in [2, 2]", "expected values in [0, 1]")),
    Case("mask-negative", lambda c: checks.check_mask(np.full((64, 64), -0.5), (64, 64)),
         Refused("mask", "values in [-0.5, -0.5]", "expected values in [0, 1]")),
    Case("mask-rgb-pil", lambda c: checks.check_mask(Image.new("RGB", (64, 64)), (64, 64)),
         Refused("mask", "mode=RGB", "mode L or 1")),
    # ---- models on disk: sdkit.checks.check_model_path and sdkit.pipeline.load_pipeline
    Case("model-missing-path", lambda c: _load("no-such-model"),
         Refused("model", "no-such-model", "no such file or folder")),
    Case("model-not-a-pipeline", lambda c: _load(str(_empty_folder(c))),
         Refused("model", "just-some-folder'", "not a diffusers pipeline (no model_index.json)")),
    Case("model-ckpt-pickle", lambda c: _load(str(_pickle_file(c, "model.ckpt"))),
         Refused("model", "model.ckpt", "pickle checkpoints are refused")),
    Case("model-bin-pickle", lambda c: _load(str(_pickle_file(c, "pytorch_model.bin"))),
         Refused("model", "pytorch_model.bin", "pickle checkpoints are refused")),
    Case("model-pt-pickle", lambda c: checks.check_model_path(_pickle_file(c, "weights.pt")),
         Refused("model", "weights.pt", "use a .safetensors file")),
    Case("model-other-family", lambda c: _load(str(_foreign_pipeline(c))),
         Refused("model", "sdxl", "StableDiffusionXLPipeline")),
    Case("model-not-a-path", lambda c: _load(42),
         Refused("model", "42", "expected 'toy', a hub id, a folder")),
    # ---- devices: sdkit.device
    Case("device-cuda-without-cuda", lambda c: get_device("cuda"),
         Refused("device", "'cuda'", "allowed here: 'cpu'"), needs_no_cuda=True),
    Case("device-cuda-1-without-cuda", lambda c: get_device("cuda:1"),
         Refused("device", "'cuda:1'", "allowed here: 'cpu'"), needs_no_cuda=True),
    Case("device-unknown", lambda c: get_device("tpu"),
         Refused("device", "'tpu'", "allowed: 'auto', 'cpu', 'cuda'")),
    Case("dtype-float16-on-cpu", lambda c: get_device("cpu", "float16"),
         Refused("dtype", "'float16'", "allowed on cpu: 'float32'")),
    Case("dtype-unknown", lambda c: get_device("cpu", "int8"),
         Refused("dtype", "'int8'", "'float32' (fp32)")),
    Case("load-on-cuda-without-cuda", lambda c: _load("toy", device="cuda"),
         Refused("device", "'cuda'", "allowed here: 'cpu'"), needs_no_cuda=True),
    Case("load-cpu-offload-without-cuda", lambda c: _load("toy", device="cpu",
                                                          cpu_offload="model"),
         Refused("cpu_offload", "'model'", "torch.cuda.is_available() is False"),
         needs_no_cuda=True),
    Case("load-cpu-offload-unknown", lambda c: _load("toy", cpu_offload="gpu"),
         Refused("cpu_offload", "'gpu'", "one of [None, 'model', 'sequential']")),
    # ---- sdkit.pipeline.generate
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
         Refused("seed", "-7", "expected an int"), needs_pipe=True),
    Case("generate-height-63-width-64", lambda c: _gen(c, height=63, width=64,
                                                        num_inference_steps=1),
         Refused("height", "63", "multiple of 8"), needs_pipe=True),
    Case("generate-height-63-alone", lambda c: _gen(c, height=63, num_inference_steps=1),
         Refused("height", "63", "multiple of 8"), needs_pipe=True),
    # ---- sdkit.sampling
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
    Case("make-scheduler-unknown", lambda c: _sampling().make_scheduler("PNDM", c.pipe),
         Refused("name", "'PNDM'", "one of ['DDPM'"), needs_pipe=True),
    Case("predicted-x0-unknown-type", lambda c: _sampling().predicted_x0(
        torch.zeros(1), torch.zeros(1), 0.5, "flow"),
         Refused("prediction_type", "'flow'", "'epsilon', 'v_prediction', 'sample'")),
    # ---- sdkit.editing: img2img, inpaint, outpaint
    Case("img2img-strength-1.5", lambda c: _img2img(c, strength=1.5),
         Refused("strength", "1.5", "[0.0, 1.0]"), needs_pipe=True),
    Case("img2img-strength-negative", lambda c: _img2img(c, strength=-0.2),
         Refused("strength", "-0.2", "[0.0, 1.0]"), needs_pipe=True),
    Case("img2img-image-60px", lambda c: _img2img(c, image=rgb(60, 60)),
         Refused("image", "image of size 60x60", "multiple of 8"), needs_pipe=True),
    Case("img2img-image-int32", lambda c: _img2img(c, image=rgb().astype(np.int32)),
         Refused("image", "array of dtype int32", "uint8, float32 or float64"), needs_pipe=True),
    Case("img2img-unknown-word", lambda c: _img2img(c, prompt="a red star on the left"),
         Refused("prompt", "star", "no token for ['star']"), needs_pipe=True),
    Case("image-to-tensor-rgba", lambda c: _editing().image_to_tensor(rgba_image()),
         Converted(check_rgba_tensor)),
    Case("image-to-tensor-greyscale", lambda c: _editing().image_to_tensor(grey_image()),
         Converted(check_grey_tensor)),
    Case("inpaint-mask-wrong-shape", lambda c: _inpaint(c, mask=np.ones((32, 32))),
         Refused("mask", "array of shape (32, 32)", "expected shape (64, 64)"), needs_pipe=True),
    Case("inpaint-mask-range", lambda c: _inpaint(c, mask=np.full((64, 64), 3.0)),
         Refused("mask", "values in [3, 3]", "expected values in [0, 1]"), needs_pipe=True),
    Case("inpaint-strength-too-small", lambda c: _inpaint(c, strength=0.01),
         Refused("strength", "0.01", "int(num_inference_steps * strength) >= 1"),
         needs_pipe=True),
    Case("inpaint-strength-above-1", lambda c: _inpaint(c, strength=2.0),
         Refused("strength", "2.0", "[0.0, 1.0]"), needs_pipe=True),
    Case("outpaint-width-100", lambda c: _outpaint(c, new_width=100),
         Refused("width", "100", "multiple of 8"), needs_pipe=True),
    Case("outpaint-narrower", lambda c: _outpaint(c, new_width=32),
         Refused("new_width", "32", "[72, 4096]"), needs_pipe=True),
    Case("outpaint-side-top", lambda c: _outpaint(c, side="top"),
         Refused("side", "'top'", "one of"), needs_pipe=True),
    Case("dilate-mask-negative-pixels", lambda c: _editing().dilate_mask(np.zeros((8, 8)), -1),
         Refused("pixels", "-1", "[0, 512]")),
    # ---- sdkit.noising and sdkit.latents
    Case("load-photo-unknown", lambda c: _noising().load_photo("mona_lisa"),
         Refused("name", "'mona_lisa'", "expected one of")),
    Case("load-photo-size-0", lambda c: _noising().load_photo(size=0),
         Refused("size", "0", "[8, 1024]")),
    Case("noising-rgba-to-tensor", lambda c: _noising().to_tensor(rgba_image()),
         Converted(check_noising_rgba)),
    Case("add-noise-t-1000", lambda c: _noising().add_noise(
        torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8), 1000, _alphas()),
         Refused("t", "1000", "[0, 999]")),
    Case("add-noise-float-t", lambda c: _noising().add_noise(
        torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8), torch.tensor([0.5]), _alphas()),
         Refused("t", "0.5", "integer tensor")),
    Case("add-noise-noise-shape", lambda c: _noising().add_noise(
        torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 4, 4), 10, _alphas()),
         Refused("noise", "torch.Size([1, 3, 4, 4])", "shaped like x0")),
    Case("to-pil-one-channel", lambda c: _noising().to_pil(torch.zeros(1, 8, 8)),
         Refused("x", "(1, 8, 8)", "(3, H, W) or (B, 3, H, W)")),
    Case("slerp-w-1.5", lambda c: _latents().slerp(torch.ones(4), torch.ones(4), 1.5),
         Refused("w", "1.5", "[0.0, 1.0]")),
    Case("latents-decode-3-channels", lambda c: _latents().decode(c.pipe.vae,
                                                                   torch.zeros(1, 3, 16, 16)),
         Refused("latents", "(1, 3, 16, 16)", "(B, 4, h, w)"), needs_pipe=True),
    Case("latents-encode-62px", lambda c: _latents().encode(c.pipe.vae, rgb(62, 62)),
         Refused("height", "62", "multiple of 4"), needs_pipe=True),
    # ---- sdkit.attention
    Case("token-indices-word-not-in-prompt", lambda c: _attention().token_indices(
        c.pipe.tokenizer, PROMPT, "blue"),
         Refused("word", "'blue'", "expected a word of the prompt"), needs_pipe=True),
    Case("attention-store-not-a-unet", lambda c: _attention().AttentionStore("unet"),
         Refused("unet", "'unet'", "UNet2DConditionModel")),
    Case("peak-inside-float-mask", lambda c: _attention().peak_inside(
        np.zeros((16, 16)), np.zeros((64, 64), np.float32)),
         Refused("mask", "dtype float32", "bool mask")),
    # ---- sdkit.finetune
    Case("concept-data-unknown-colour", lambda c: _finetune().make_concept_data(
        ["pink"], ["circle"]),
         Refused("colours", "['pink']", "list of words from")),
    Case("add-token-without-brackets", lambda c: _finetune().add_token(
        c.pipe.tokenizer, c.pipe.text_encoder, "star", "triangle"),
         Refused("token", "'star'", "angle brackets"), needs_pipe=True),
    Case("lora-rank-0", lambda c: _finetune().lora_config(r=0),
         Refused("r", "0", "[1, 1024]")),
    Case("lora-p-uncond-above-1", lambda c: _finetune().train_lora(
        c.pipe, torch.zeros(1, 4, 16, 16), ["a red circle on the left"], p_uncond=1.5),
         Refused("p_uncond", "1.5", "[0.0, 1.0]"), needs_pipe=True),
    Case("load-embedding-pickle", lambda c: _finetune().load_embedding(
        c.pipe, _pickle_file(c, "star.bin")),
         Refused("path", "star.bin", ".safetensors file"), needs_pipe=True),
    # ---- sdkit.widgets
    Case("panel-guidance-negative", lambda c: _panel(c, guidance_scale=-1.0),
         Refused("guidance_scale", "-1.0", "[0.0, 15.0]"), needs_pipe=True),
    Case("panel-steps-zero", lambda c: _panel(c, num_inference_steps=0),
         Refused("num_inference_steps", "=0", "[1, 50]"), needs_pipe=True),
    Case("panel-unknown-word", lambda c: _panel(c, prompt="a purple star on the left"),
         Refused("prompt", "purple", "no token for"), needs_pipe=True),
    Case("panel-unknown-scheduler", lambda c: _panel(c, scheduler="Heun"),
         Refused("scheduler", "'Heun'", "one of"), needs_pipe=True),
    Case("png-bytes-size-0", lambda c: _widgets().png_bytes(Image.new("RGB", (8, 8)), size=0),
         Refused("size", "0", "[8, 4096]")),
    # ---- sdkit.variations
    Case("info-nce-shape-mismatch", lambda c: _variations().info_nce(
        torch.zeros(4, 8), torch.zeros(3, 8), 1.0),
         Refused("text_embeds", "(3, 8)", "image_embeds' shape (4, 8)")),
    Case("images-to-tensor-32px", lambda c: _variations().images_to_tensor([rgb(32, 32)]),
         Refused("image", "image of size 32x32", "expected size 64x64")),
    Case("images-to-tensor-rgba", lambda c: _variations().images_to_tensor([rgba_image()]),
         Converted(check_noising_rgba)),
    Case("keeps-content-bad-caption", lambda c: _variations().keeps_content(
        [rgb()], "a pink blob"),
         Refused("caption", "'a pink blob'", "shapes grammar")),
    Case("keeps-content-no-images", lambda c: _variations().keeps_content(
        [], "a red circle on the left"),
         Refused("images", "[]", "at least one")),
    # ---- sdkit.shapes
    Case("parse-caption-unknown-colour", lambda c: shapes.parse_caption(
        "a pink circle on the left"),
         Refused("caption", "'a pink circle on the left'", "colour in")),
    Case("caption-of-three-objects", lambda c: shapes.caption_of(
        [shapes.Obj("red", "circle", "left")] * 3),
         Refused("objects", "got 3", "1 or 2 objects")),
    Case("render-unknown-position", lambda c: shapes.render(
        [shapes.Obj("red", "circle", "middle")], 0),
         Refused("position", "'middle'", "allowed")),
    Case("make-example-seed-negative", lambda c: shapes.make_example(-1),
         Refused("seed", "-1", "non-negative int")),
    Case("find-blobs-rgba", lambda c: shapes.find_blobs(np.zeros((64, 64, 4), np.uint8)),
         Refused("image", "(64, 64, 4)", "shape (H, W, 3)")),
    Case("find-blobs-float-0-255", lambda c: shapes.find_blobs(rgb().astype(np.float32)),
         Refused("image", "float", "[0, 1]")),
]


def _params():
    for case in CASES:
        # 60 s for the call itself; imports and the pipeline load happen in the fixtures
        marks = [pytest.mark.timeout(60, func_only=True)]
        if case.xfail:
            marks.append(pytest.mark.xfail(strict=True, reason=case.xfail))
        yield pytest.param(case, id=case.id, marks=marks)


def test_table_is_large_and_ids_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert len(CASES) >= 40


@pytest.fixture(scope="session")
def sdkit_modules():
    """Import every module the table calls once, outside the per-case time limit."""
    import diffusers  # noqa: F401
    import transformers  # noqa: F401

    from sdkit import (  # noqa: F401
        attention,
        editing,
        finetune,
        latents,
        noising,
        pipeline,
        sampling,
        variations,
        widgets,
    )


@pytest.fixture
def ctx(request, tmp_path, monkeypatch, sdkit_modules):
    case = request.node.callspec.params["case"]
    monkeypatch.chdir(tmp_path)
    if case.needs_no_cuda and torch.cuda.is_available():
        pytest.skip("this machine has CUDA: asking for it is not an error here")
    pipe = request.getfixturevalue("toy_pipe") if case.needs_pipe else None
    return Ctx(tmp_path, pipe)


@pytest.mark.parametrize("case", list(_params()))
def test_bad_input(case: Case, ctx: Ctx):
    if isinstance(case.expect, Converted):
        result = case.call(ctx)
        case.expect.check(result)
        return
    exp = case.expect
    with pytest.raises(exp.exc) as info:
        case.call(ctx)
    message = str(info.value)
    assert exp.param in message, f"the message does not name {exp.param!r}: {message}"
    assert exp.value in message, f"the message does not show the value {exp.value!r}: {message}"
    assert exp.allowed in message, f"the message does not say what is allowed: {message}"


# ------------------------------------------------------------------------------ widgets


@pytest.mark.timeout(300, func_only=True)
def test_panel_shows_callback_errors_and_keeps_working(toy_pipe):
    """A bad prompt typed into the panel: the error line says why, the last good image stays,
    and the next good prompt works again."""
    from sdkit.widgets import GuidancePanel

    panel = GuidancePanel(toy_pipe, prompt=PROMPT, num_inference_steps=2, strip="preview")
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
