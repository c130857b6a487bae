"""The second bad-input table, ground side (issue 12): checks, images, pipeline loading and
generation, sampling, img2img, inpainting, latents, bench.

Mistakes learners and teachers make, by kind (tests/mistakes.py says what a row is;
tests/test_classroom_mistakes.py runs them and checks the tiny pipeline's state after each):

- ``memory``: a call that would exhaust the machine is refused from its arguments, before
  anything is allocated, and the message gives the estimate and the limit. The rows set
  ``SDKIT_MEMORY_LIMIT`` so that the limit, and so the message, is the same on every machine;
  the good call after each row (two steps of the tiny pipe) needs about 2 MB.
- ``silent``: an argument that would be ignored or silently "fixed" is refused, or its
  documented conversion is checked.
- ``state``: an interrupt (Jupyter's stop button: a KeyboardInterrupt raised from inside the
  UNet) or a refusal leaves the pipeline, its scheduler and its progress-bar settings as they
  were.
- ``loading``: a broken model on disk says which file, what was expected and what was found.
  The folders are made in the row's tmp folder from data/toy-sd's small json files, with the
  untouched components linked, never copied.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from diffusers import DDIMScheduler, HeunDiscreteScheduler
from mistakes import PROMPT, Behaves, Converted, Mistake, Refused

from sdkit import (
    bench,
    checks,
    images,
    img2img,
    inpainting,
    latents,
    pipeline,
    sampling,
    sampling_views,
)
from sdkit.checks import BrokenModelError
from sdkit.pipeline import ModelNotFoundError

TOY = pipeline.TOY_DIR
LIMIT_2G = {"SDKIT_MEMORY_LIMIT": "2GiB"}
LIMIT_64M = {"SDKIT_MEMORY_LIMIT": "64MiB"}
LIMIT_16M = {"SDKIT_MEMORY_LIMIT": "16MiB"}
OVER_2G = "iB, over the memory limit of 2.0 GiB (set by SDKIT_MEMORY_LIMIT)"  # estimate, limit
OVER_64M = "iB, over the memory limit of 64.0 MiB (set by SDKIT_MEMORY_LIMIT)"
OVER_16M = "iB, over the memory limit of 16.0 MiB (set by SDKIT_MEMORY_LIMIT)"


# ------------------------------------------------------------------------------ helpers


def picture(h=64, w=64) -> np.ndarray:
    out = np.zeros((h, w, 3), np.uint8)
    out[: h // 2, : w // 2] = (200, 30, 30)
    return out


def half_mask(dtype=np.float32) -> np.ndarray:
    m = np.zeros((64, 64), dtype)
    m[:, :32] = 1
    return m


def _gen(c, **kw):
    args = dict(prompt=PROMPT, seed=0, num_inference_steps=2, guidance_scale=3.0)
    args.update(kw)
    return pipeline.generate(c.pipe, **args)


def _sample(c, **kw):
    args = dict(prompt=PROMPT, seed=0, num_inference_steps=2, guidance_scale=3.0)
    args.update(kw)
    return sampling.sample(c.pipe, **args)


def _inpaint(c, mask, **kw):
    args = dict(image=picture(), mask=mask, prompt=PROMPT, seed=0, num_inference_steps=2,
                output_type="np")
    args.update(kw)
    return inpainting.inpaint(c.pipe, **args)


class _Stop:
    """Jupyter's stop button, pressed during the ``after``-th UNet call: a forward pre-hook
    that raises KeyboardInterrupt; removed on exit."""

    def __init__(self, unet, after: int = 1):
        self.unet, self.after, self.calls = unet, after, 0

    def _hook(self, *_):
        self.calls += 1
        if self.calls >= self.after:
            raise KeyboardInterrupt

    def __enter__(self):
        self.handle = self.unet.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()
        return exc[0] is KeyboardInterrupt  # the interrupt stopped the call: swallow it here


def _interrupted(c, call, after: int = 2) -> dict:
    """Run ``call`` and press stop during its ``after``-th UNet call; what it left behind."""
    before = dict(c.pipe._progress_bar_config)
    c.pipe.set_progress_bar_config(desc="the teacher's own bar")
    scheduler = c.pipe.scheduler
    timesteps = scheduler.timesteps.clone() if scheduler.timesteps is not None else None
    try:
        with _Stop(c.pipe.unet, after) as stop:
            call()
        return {"config": dict(c.pipe._progress_bar_config), "stopped": stop.calls >= after,
                "scheduler": c.pipe.scheduler is scheduler,
                "timesteps": timesteps is None or torch.equal(scheduler.timesteps, timesteps)}
    finally:
        c.pipe.set_progress_bar_config(**before)


def _left_as_it_was(result, ctx):
    """The kit's own loops step a copy: the pipeline's scheduler keeps even its timesteps."""
    _bar_and_scheduler_kept(result, ctx)
    assert result["timesteps"], "the kit's loop stepped the pipeline's own scheduler"


def _bar_and_scheduler_kept(result, ctx):
    """(``generate`` is the pipeline's call, which sets its scheduler's timesteps each time.)"""
    assert result["stopped"], "the call never reached the UNet call that was interrupted"
    assert result["config"] == {"desc": "the teacher's own bar"}, result["config"]
    assert result["scheduler"], "the pipeline's scheduler was replaced"


def _mask_pair(dtype):
    """Inpaint with a 0/1 mask of ``dtype`` and with the same mask as floats."""
    return lambda c: (_inpaint(c, half_mask(dtype)), _inpaint(c, half_mask(np.float32)))


def _same_image(result, ctx):
    got, want = result
    np.testing.assert_array_equal(got, want)  # 0/1 integers are a binary mask, not /255


def _toy_copy(c, skip=(), index=None, real=()) -> str:
    """data/toy-sd as a folder in the row's tmp folder: model_index.json (or ``index``, the
    text to write instead), the components linked except those in ``skip`` (left out) and
    ``real`` (real folders with their config copied, weights left for the row to write)."""
    folder = c.tmp / "toy-copy"
    folder.mkdir()
    (folder / "model_index.json").write_text(
        (TOY / "model_index.json").read_text() if index is None else index)
    for part in ("scheduler", "text_encoder", "tokenizer", "unet", "vae"):
        if part in skip:
            continue
        if part in real:
            (folder / part).mkdir()
            for f in (TOY / part).glob("*.json"):
                (folder / part / f.name).write_text(f.read_text())
        else:
            (folder / part).symlink_to(TOY / part, target_is_directory=True)
    return "toy-copy"


def _unet_weights(c, data: bytes) -> str:
    folder = _toy_copy(c, real=("unet",))
    (c.tmp / folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(data)
    return folder


def _truncated_weights() -> bytes:
    """The first 256 KiB of the toy's real UNet weights (17 MB): an interrupted download."""
    with open(TOY / "unet" / "diffusion_pytorch_model.safetensors", "rb") as f:
        return f.read(256 * 1024)


def _single_file(c, name: str, tensors: dict | None = None, data: bytes | None = None) -> str:
    from safetensors.torch import save_file

    path = c.tmp / name
    if data is None:
        save_file(tensors, str(path))
    else:
        path.write_bytes(data)
    return name


def _cut(c, name: str, keep: int) -> str:
    path = c.tmp / name
    path.write_bytes(path.read_bytes()[:keep])
    return name


def _with_home(c, call):
    """``call()`` with HOME (what ``~`` means) set to the row's tmp folder, then put back."""
    old = os.environ.get("HOME")
    os.environ["HOME"] = str(c.tmp)
    try:
        return call()
    finally:
        if old is None:
            del os.environ["HOME"]
        else:
            os.environ["HOME"] = old


def _home_toy(c):
    (c.tmp / "toy-sd").symlink_to(TOY, target_is_directory=True)
    return _with_home(c, lambda: pipeline.load_pipeline("~/toy-sd", device="cpu"))


def _is_toy(pipe, ctx):
    assert pipeline.is_toy(pipe)
    assert list(pipe.unet.config.block_out_channels) == list(
        json.loads((TOY / "unet" / "config.json").read_text())["block_out_channels"])


def _ddim_like_the_pipe(traj, ctx):
    want = sampling.sample(ctx.pipe, PROMPT, 0, 2, 3.0, scheduler="DDIM")
    assert traj.prediction_type == ctx.pipe.scheduler.config.prediction_type == "v_prediction"
    assert torch.equal(traj.latents, want.latents)  # the model's schedule, not DDIM's defaults


def _given_scheduler_untouched(c):
    mine = DDIMScheduler(prediction_type="epsilon")
    _sample(c, scheduler=mine)
    return mine


def _untouched(mine, ctx):
    assert mine.config.prediction_type == "epsilon" and mine.num_inference_steps is None


def _eta_used(c):
    return (_sample(c, scheduler="DDIM", eta=1.0).latents[-1],
            _sample(c, scheduler="DDIM", eta=0.0).latents[-1])


def _differ(result, ctx):
    a, b = result
    assert not torch.equal(a, b), "eta=1.0 gave DDIM's deterministic result: it was ignored"


def _trajectory(c):
    return sampling.sample(c.pipe, PROMPT, 0, 2, 3.0)


def _progress_bar_kept(c):
    before = dict(c.pipe._progress_bar_config)
    c.pipe.set_progress_bar_config(desc="the teacher's own bar")
    try:
        pipeline.generate_images(c.pipe, PROMPT, [0, 1], num_inference_steps=1, batch_size=1)
        return dict(c.pipe._progress_bar_config)
    finally:
        c.pipe.set_progress_bar_config(**before)


def _latents_16x16(z):
    assert torch.is_tensor(z) and tuple(z.shape) == (4, 16, 16), getattr(z, "shape", z)


def _own_bar(config, ctx):
    assert config == {"desc": "the teacher's own bar"}, config  # not left disabled


def _refused_then_state(c, call):
    """A refused call, then what it left: the progress-bar settings and the scheduler."""
    config, scheduler = dict(c.pipe._progress_bar_config), c.pipe.scheduler
    try:
        call()
    except ValueError as e:
        return {"refused": str(e), "config": config == dict(c.pipe._progress_bar_config),
                "scheduler": c.pipe.scheduler is scheduler}
    raise AssertionError("the call was not refused")


def _refused_and_kept(result, ctx):
    assert " is not allowed: " in result["refused"]
    assert result["config"] and result["scheduler"]


M, R = Mistake, Refused
MEMORY = [
    M("memory", "generate-4096px", lambda c: _gen(c, height=4096, width=4096),
      R("height", "4096", OVER_2G), needs_pipe=True, env=LIMIT_2G),
    M("memory", "generate-1024px", lambda c: _gen(c, height=1024, width=1024),
      R("height", "1024", OVER_2G), needs_pipe=True, env=LIMIT_2G),
    M("memory", "generate-wide-panorama", lambda c: _gen(c, width=4096),
      R("width", "4096", OVER_2G), needs_pipe=True, env=LIMIT_2G),
    M("memory", "generate-images-200000-seeds", lambda c: pipeline.generate_images(
        c.pipe, PROMPT, list(range(200_000)), num_inference_steps=1),
      R("seeds", "200000 seeds", OVER_64M), needs_pipe=True, env=LIMIT_64M),
    M("memory", "generate-images-batch-64", lambda c: pipeline.generate_images(
        c.pipe, PROMPT, list(range(64)), num_inference_steps=1, batch_size=64),
      R("batch_size", "64", OVER_64M), needs_pipe=True, env=LIMIT_64M),
    M("memory", "sample-4096px", lambda c: _sample(c, height=4096, width=4096),
      R("height", "4096", OVER_2G), needs_pipe=True, env=LIMIT_2G),
    M("memory", "sample-1000-steps-recorded", lambda c: _sample(
        c, prompt=[PROMPT] * 8, seed=list(range(8)), num_inference_steps=1000),
      R("num_inference_steps", "1000", OVER_64M), needs_pipe=True, env=LIMIT_64M),
    M("memory", "sample-3000-prompts", lambda c: _sample(c, prompt=[PROMPT] * 3000),
      R("prompt", "a list of 3000 prompts", "at most 64 prompts per call"), needs_pipe=True),
    M("memory", "img2img-2048px-photo", lambda c: img2img.img2img(
        c.pipe, picture(2048, 2048), PROMPT, 0.5, 0, 2),
      R("image", "picture of size 2048x2048", OVER_2G), needs_pipe=True, env=LIMIT_2G),
    M("memory", "inpaint-1024px-photo", lambda c: inpainting.inpaint(
        c.pipe, picture(1024, 1024), np.ones((1024, 1024), np.float32), PROMPT, 0),
      R("image", "picture of size 1024x1024", OVER_2G), needs_pipe=True, env=LIMIT_2G),
    M("memory", "outpaint-to-4096-wide", lambda c: inpainting.outpaint(
        c.pipe, picture(), PROMPT, 4096),
      R("new_width", "4096", OVER_2G), needs_pipe=True, env=LIMIT_2G),
    M("memory", "to-tensor-40-big-pictures", lambda c: images.to_tensor(
        np.zeros((40, 256, 256, 3), np.uint8)),
      R("images", "40 picture(s) of 256x256", OVER_64M), env=LIMIT_64M),
    M("memory", "to-pil-scale-64", lambda c: images.to_pil(torch.zeros(3, 512, 512), scale=64),
      R("scale", "64", OVER_2G), env=LIMIT_2G),
    M("memory", "decode-huge-latents", lambda c: images.decode(
        c.pipe.vae, torch.zeros(1, 4, 1024, 1024)),
      R("latents", "latents of shape (1, 4, 1024, 1024)", OVER_2G), needs_pipe=True,
      env=LIMIT_2G),
    M("memory", "encode-1024px-tensor", lambda c: images.encode(
        c.pipe.vae, torch.zeros(1, 3, 1024, 1024)),
      R("images", "1 picture(s) of 1024x1024", OVER_64M), needs_pipe=True, env=LIMIT_64M),
    M("memory", "rgb-preview-upsample-64", lambda c: sampling.latents_to_rgb_preview(
        torch.zeros(100, 4, 16, 16), torch.zeros(5, 3), upsample=64),
      R("upsample", "64", OVER_2G), env=LIMIT_2G),
    M("memory", "trajectory-preview-4096px", lambda c: _trajectory(c).preview(size=4096),
      R("size", "4096", OVER_64M), needs_pipe=True, env=LIMIT_64M),
    M("memory", "unet-flops-on-real-weights-1024", lambda c: latents.unet_flops(
        c.pipe.unet, (4, 1024, 1024), (20, 32)),
      R("latent_shape", "(4, 1024, 1024)", OVER_2G), needs_pipe=True, env=LIMIT_2G),
    M("memory", "brightness-10000-pictures", lambda c: latents.brightness_correlations(
        c.pipe.vae, n_images=10_000),
      R("n_images", "10000", OVER_64M), needs_pipe=True, env=LIMIT_64M),
    M("memory", "bench-smoke-4096", lambda c: bench.main(["--smoke", "--size", "4096"]),
      R("size", "4096", OVER_2G), env=LIMIT_2G),
    M("memory", "trajectory-gif-scale-16", lambda c: sampling_views.trajectory_gif(
        _trajectory(c), c.tmp / "run.gif", scale=16),
      R("scale", "16", OVER_16M), needs_pipe=True, env=LIMIT_16M),
]


SILENT = [
    M("silent", "generate-three-images", lambda c: _gen(c, num_images_per_prompt=3),
      R("num_images_per_prompt", "3", "expected 1: generate() returns one image"),
      needs_pipe=True),
    M("silent", "generate-eta-with-dpm-solver", lambda c: _gen(c, eta=0.5),
      R("eta", "0.5", "DPMSolverMultistepScheduler ignores eta"), needs_pipe=True),
    M("silent", "generate-unknown-option", lambda c: _gen(c, guidance_rescale=0.7),
      R("guidance_rescale", "0.7", "generate() takes ['height'"), needs_pipe=True),
    M("silent", "generate-typo-num-steps", lambda c: _gen(c, num_steps=5),
      R("num_steps", "5", "generate() takes"), needs_pipe=True),
    M("silent", "generate-negative-unknown-words", lambda c: _gen(
        c, negative_prompt="a purple blob"),
      R("negative_prompt", "'a purple blob'", "no token for ['purple', 'blob']"),
      needs_pipe=True),
    M("silent", "generate-negative-without-guidance", lambda c: _gen(
        c, guidance_scale=1.0, negative_prompt="a blue square"),
      R("negative_prompt", "'a blue square'", "needs guidance_scale > 1"), needs_pipe=True),
    M("silent", "generate-height-0", lambda c: _gen(c, height=0),
      R("height", "0", "expected an int in [4, 4096]"), needs_pipe=True),
    M("silent", "generate-width-0", lambda c: _gen(c, height=64, width=0),
      R("width", "0", "expected an int in [4, 4096]"), needs_pipe=True),
    M("silent", "generate-list-of-seeds", lambda c: _gen(c, seed=[0, 1]),
      R("seed", "[0, 1]", "expected an int"), needs_pipe=True),
    M("silent", "generate-latent-output", lambda c: _gen(c, output_type="latent"),
      Converted(_latents_16x16),
      needs_pipe=True),
    M("silent", "sample-default-ddim-object", lambda c: _sample(c, scheduler=DDIMScheduler()),
      Behaves(_ddim_like_the_pipe), needs_pipe=True),
    M("silent", "sample-ddim-object-epsilon", lambda c: _sample(
        c, scheduler=DDIMScheduler(prediction_type="epsilon", rescale_betas_zero_snr=False,
                                   beta_schedule="linear")),
      Behaves(_ddim_like_the_pipe), needs_pipe=True),
    M("silent", "sample-heun-object", lambda c: _sample(c, scheduler=HeunDiscreteScheduler()),
      R("scheduler", "HeunDiscreteScheduler", "one UNet call per step"), needs_pipe=True),
    M("silent", "sample-eta-with-dpm-solver", lambda c: _sample(c, eta=0.5),
      R("eta", "0.5", "ignores eta"), needs_pipe=True),
    M("silent", "sample-ddim-eta-is-used", _eta_used, Behaves(_differ), needs_pipe=True),
    M("silent", "sample-negative-with-embeddings", lambda c: _sample(
        c, negative_prompt="a blue square",
        text_embeddings=pipeline.encode_prompt(c.pipe, [PROMPT])),
      R("negative_prompt", "given together with text_embeddings", "expected one of them"),
      needs_pipe=True),
    M("silent", "sample-progress-yes", lambda c: _sample(c, progress="yes"),
      R("progress", "'yes'", "True or False"), needs_pipe=True),
    M("silent", "preview-size-0", lambda c: _trajectory(c).preview(size=0),
      R("size", "0", "[8, 4096]"), needs_pipe=True),
    M("silent", "inpaint-uint8-01-mask", _mask_pair(np.uint8), Behaves(_same_image),
      needs_pipe=True),
    M("silent", "inpaint-int64-01-mask", _mask_pair(np.int64), Behaves(_same_image),
      needs_pipe=True),
    M("silent", "mask-uint8-0-255", lambda c: checks.check_mask(half_mask(np.uint8) * 255,
                                                                 (64, 64)),
      Converted(lambda m: np.testing.assert_array_equal(m, half_mask()))),
    M("silent", "mask-int32-0-255", lambda c: checks.check_mask(
        half_mask(np.int32) * 255, (64, 64)),
      R("mask", "int32 array with values in [0, 255]", "an integer mask of 0s and 1s")),
    M("silent", "latent-mask-of-uint8-01", lambda c: inpainting.latent_mask(
        half_mask(np.uint8), 4),
      Converted(lambda m: np.testing.assert_array_equal(m[0, 0].numpy(),
                                                        half_mask()[::4, ::4]))),
    M("silent", "inpaint-empty-mask", lambda c: _inpaint(c, np.zeros((64, 64), np.float32)),
      R("mask", "a mask with nothing to repaint", "expected some pixels >= 0.5"),
      needs_pipe=True),
    M("silent", "inpaint-mask-thinner-than-a-latent-pixel", lambda c: _inpaint(
        c, np.pad(np.ones((64, 1), np.float32), ((0, 0), (1, 62)))),
      R("mask", "a mask with nothing to repaint", "grow a thin mask with dilate_mask"),
      needs_pipe=True),
    M("silent", "slerp-zero-vector", lambda c: latents.slerp(torch.zeros(8), torch.ones(8), 0.5),
      R("a", "a zero tensor", "torch.lerp(a, b, w)")),
    M("silent", "slerp-nan", lambda c: latents.slerp(torch.ones(8), torch.full((8,), np.nan),
                                                     0.5),
      R("b", "a tensor with nan or inf", "expected a finite tensor with a direction")),
]

STATE = [
    M("state", "generate-images-interrupted", lambda c: _interrupted(
        c, lambda: pipeline.generate_images(c.pipe, PROMPT, [0, 1, 2], num_inference_steps=2,
                                            batch_size=1)),
      Behaves(_left_as_it_was), needs_pipe=True),
    M("state", "generate-images-keeps-the-progress-bar", _progress_bar_kept,
      Behaves(_own_bar), needs_pipe=True),
    M("state", "sample-interrupted", lambda c: _interrupted(
        c, lambda: _sample(c, scheduler="DDIM", num_inference_steps=4)),
      Behaves(_left_as_it_was), needs_pipe=True),
    M("state", "generate-interrupted", lambda c: _interrupted(
        c, lambda: _gen(c, num_inference_steps=4)),
      Behaves(_bar_and_scheduler_kept), needs_pipe=True),
    M("state", "img2img-interrupted", lambda c: _interrupted(
        c, lambda: img2img.img2img(c.pipe, picture(), PROMPT, 0.8, 0, 4)),
      Behaves(_left_as_it_was), needs_pipe=True),
    M("state", "inpaint-interrupted", lambda c: _interrupted(
        c, lambda: _inpaint(c, half_mask(), num_inference_steps=4)),
      Behaves(_left_as_it_was), needs_pipe=True),
    M("state", "sample-leaves-the-given-scheduler", _given_scheduler_untouched,
      Behaves(_untouched), needs_pipe=True),
    M("state", "generate-images-refused-midway", lambda c: _refused_then_state(
        c, lambda: pipeline.generate_images(c.pipe, PROMPT, [0, 1], output="np")),
      Behaves(_refused_and_kept), needs_pipe=True),
    M("state", "sample-refused-scheduler", lambda c: _refused_then_state(
        c, lambda: _sample(c, scheduler=HeunDiscreteScheduler())),
      Behaves(_refused_and_kept), needs_pipe=True),
    M("state", "outpaint-refused-size", lambda c: _refused_then_state(
        c, lambda: inpainting.outpaint(c.pipe, picture(), PROMPT, 4096)),
      Behaves(_refused_and_kept), needs_pipe=True, env=LIMIT_2G),
]

BROKEN = BrokenModelError
LOADING = [
    M("loading", "single-file-truncated", lambda c: pipeline.load_pipeline(_cut(
        c, _single_file(c, "sd.safetensors", {"model.diffusion_model.w": torch.zeros(4096)}),
        2000), device="cpu"),
      R("model", "sd.safetensors", "the file is truncated", BROKEN)),
    M("loading", "single-file-html-page", lambda c: pipeline.load_pipeline(_single_file(
        c, "sd.safetensors", data=b"<!DOCTYPE html><html>404 Not Found</html>"), device="cpu"),
      R("model", "sd.safetensors", "do not start like one", BROKEN)),
    M("loading", "single-file-empty", lambda c: pipeline.load_pipeline(_single_file(
        c, "sd.safetensors", data=b""), device="cpu"),
      R("model", "sd.safetensors", "found 0 bytes", BROKEN)),
    M("loading", "single-file-is-a-lora", lambda c: pipeline.load_pipeline(_single_file(
        c, "lora.safetensors", {"lora_unet_down.lora_up.weight": torch.zeros(4, 4)}),
        device="cpu"),
      R("model", "lora.safetensors", "expected a Stable Diffusion checkpoint", BROKEN)),
    M("loading", "folder-without-unet", lambda c: pipeline.load_pipeline(
        _toy_copy(c, skip=("unet",)), device="cpu"),
      R("model", "toy-copy/unet", "so a unet/ subfolder was expected", BROKEN)),
    M("loading", "folder-without-tokenizer", lambda c: pipeline.load_pipeline(
        _toy_copy(c, skip=("tokenizer",)), device="cpu"),
      R("model", "toy-copy/tokenizer", "names the component 'tokenizer'", BROKEN)),
    M("loading", "unet-weights-garbage", lambda c: pipeline.load_pipeline(
        _unet_weights(c, b"\x00garbage" * 100), device="cpu"),
      R("model", "diffusion_pytorch_model.safetensors", "do not start like one", BROKEN)),
    M("loading", "unet-weights-truncated", lambda c: pipeline.load_pipeline(
        _unet_weights(c, _truncated_weights()), device="cpu"),
      R("model", "diffusion_pytorch_model.safetensors", "the file is truncated", BROKEN)),
    M("loading", "unet-weights-missing", lambda c: pipeline.load_pipeline(
        _toy_copy(c, real=("unet",)), device="cpu"),
      R("model", "toy-copy/unet", "expected the unet's weights as a .safetensors file", BROKEN)),
    M("loading", "unet-pickle-weights-only", lambda c: pipeline.load_pipeline(
        _pickle_unet(c), device="cpu"),
      R("model", "toy-copy/unet", "only pickle weights", BROKEN)),
    M("loading", "unet-config-broken", lambda c: pipeline.load_pipeline(
        _broken_unet_config(c), device="cpu"),
      R("model", "unet/config.json", "expected the unet's JSON config", BROKEN)),
    M("loading", "model-index-empty", lambda c: pipeline.load_pipeline(
        _toy_copy(c, index=""), device="cpu"),
      R("model", "model_index.json", "model_index.json is empty", BROKEN)),
    M("loading", "model-index-trailing-comma", lambda c: pipeline.load_pipeline(
        _toy_copy(c, index='{"_class_name": "StableDiffusionPipeline",}'), device="cpu"),
      R("model", "model_index.json", "expected valid JSON; found a syntax error at line 1",
        BROKEN)),
    M("loading", "model-index-without-class-name", lambda c: pipeline.load_pipeline(
        _toy_copy(c, index='{"unet": ["diffusers", "UNet2DConditionModel"]}'), device="cpu"),
      R("model", "model_index.json", 'a "_class_name"', BROKEN)),
    M("loading", "model-index-a-list", lambda c: pipeline.load_pipeline(
        _toy_copy(c, index="[]"), device="cpu"),
      R("model", "model_index.json", "found list", BROKEN)),
    M("loading", "tilde-path-loads", _home_toy, Behaves(_is_toy)),
    M("loading", "tilde-path-missing", lambda c: _with_home(
        c, lambda: pipeline.load_pipeline("~/no-such-sd", device="cpu")),
      R("model", "~/no-such-sd", "no such file or folder")),
    M("loading", "env-relative-folder-read-as-hub-id", lambda c: pipeline.load_pipeline(
        device="cpu"),
      R("model", "models/sd15", "there is no folder 'models/sd15' relative to the current "
                                "directory", ModelNotFoundError),
      env={"SDKIT_MODEL": "models/sd15", "HF_HUB_OFFLINE": "1"}),
    M("loading", "env-dot-relative-folder", lambda c: pipeline.load_pipeline(device="cpu"),
      R("model", "./sd15", "relative to the current directory"), env={"SDKIT_MODEL": "./sd15"}),
    M("loading", "single-file-config-folder-broken", lambda c: pipeline.load_pipeline(
        _single_file(c, "sd.safetensors", {"model.diffusion_model.w": torch.zeros(4)}),
        device="cpu", config=_toy_copy(c, index="{")),
      R("config", "model_index.json", "expected valid JSON", BROKEN)),
]


def _pickle_unet(c) -> str:
    """A unet/ folder with pickle weights only (a dummy file: it is refused, never opened)."""
    folder = _toy_copy(c, real=("unet",))
    (c.tmp / folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04 pickle")
    return folder


def _broken_unet_config(c) -> str:
    folder = _toy_copy(c, real=("unet",))
    (c.tmp / folder / "unet" / "config.json").write_text('{"in_channels": 4,')
    (c.tmp / folder / "unet" / "diffusion_pytorch_model.safetensors").symlink_to(
        TOY / "unet" / "diffusion_pytorch_model.safetensors")
    return folder


MISTAKES = MEMORY + SILENT + STATE + LOADING
