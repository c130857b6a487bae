"""The second bad-input table's frame (issue 12): what a row is, and how the state is checked.

The first table (tests/test_bad_inputs.py) shares ``Refused``, ``Converted`` and
``fresh_environment`` from here. The rows of this one live in two tables, by the modules they
reach: ``mistakes_ground.py`` (checks, device, images, pipeline loading and generation,
img2img, inpainting, sampling, noising, latents) and ``mistakes_notebooks.py`` (attention,
fine-tuning, variations, training, widgets, evaluation); tests/test_classroom_mistakes.py runs
them all.

A row is a ``Mistake``: its ``kind`` (one of ``KINDS``), an id, a call, and what must happen:

- ``Refused(param, value, allowed)``: a ValueError in the kit's one format
  (``name=value is not allowed: ...``) naming the parameter, showing the value and saying what
  is allowed; for memory rows the message also gives the estimate and the limit;
- ``Converted(check)``: a documented conversion; ``check(result)`` asserts it happened;
- ``Behaves(check)``: a documented behaviour; ``check(result, ctx)`` asserts it (for instance
  "the store recorded through the hypernetwork's processor", "the tokenizer is unchanged").

After every row the state is checked: the tiny pipeline's attention processors, tokenizer
size, text-encoder embedding table and scheduler config are what they were, and the next good
call (``GOOD_CALL``) gives the same image, bit for bit.

Rows marked ``needs_pipe`` get the tiny random pipeline of tests/conftest.py; every row gets a
fresh tmp folder as the current directory (``ctx.tmp``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

KINDS = ("memory", "silent", "state", "loading")
PROMPT = "a red circle on the left"


@dataclass(frozen=True)
class Refused:
    param: str  # the parameter's name, as the message must spell it
    value: str  # a representation of the bad value that must appear in the message
    allowed: str  # a piece of the "what is allowed" part (for memory rows: the limit's words)
    exc: type = ValueError


@dataclass(frozen=True)
class Converted:
    check: Callable  # check(result) -> None, asserts the documented conversion


@dataclass(frozen=True)
class Behaves:
    check: Callable  # check(result, ctx) -> None, asserts the documented behaviour


@dataclass(frozen=True)
class Mistake:
    kind: str  # one of KINDS
    id: str
    call: Callable  # call(ctx) -> result
    expect: Refused | Converted | Behaves
    needs_pipe: bool = False
    env: dict = field(default_factory=dict)  # environment variables set for the call


class Ctx:
    """What a row's call gets: a tmp folder (also the current directory) and the tiny pipe."""

    def __init__(self, tmp_path: Path, pipe):
        self.tmp, self._pipe = tmp_path, pipe

    @property
    def pipe(self):
        assert self._pipe is not None, "mark the row needs_pipe=True"
        return self._pipe


def assert_refused(expect: Refused, call: Callable, ctx) -> None:
    """``call(ctx)`` raises ``expect.exc`` in the kit's one format, naming the parameter, showing
    the value and saying what is allowed."""
    import pytest

    with pytest.raises(expect.exc) as info:
        call(ctx)
    message = str(info.value)
    assert expect.param in message, f"the message does not name {expect.param!r}: {message}"
    assert expect.value in message, f"the message does not show {expect.value!r}: {message}"
    assert expect.allowed in message, f"the message does not say what is allowed: {message}"
    assert " is not allowed: " in message, f"not the kit's one error format: {message}"


def fresh_environment(monkeypatch, tmp_path, env: dict) -> None:
    """A row's surroundings: ``tmp_path`` as the current directory, none of the kit's device or
    model variables set, then the row's own ``env``."""
    from sdkit import device, pipeline

    monkeypatch.chdir(tmp_path)
    for name in (device.DEVICE_ENV, device.DTYPE_ENV, device.MEMORY_ENV, pipeline.MODEL_ENV,
                 pipeline.CONFIG_ENV):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def good_call(pipe):
    """The next good call after each row: two DPM-Solver steps of the tiny pipe, seed 0."""
    from sdkit import pipeline

    return pipeline.generate_images(pipe, PROMPT, [0], num_inference_steps=2,
                                    guidance_scale=3.0, output="uint8")[0]  # (64, 64, 3)


def snapshot(pipe) -> dict:
    """What a row must leave as it found it."""
    return {
        "processors": {k: type(v).__name__ + f"@{id(v)}" for k, v in
                       pipe.unet.attn_processors.items()},
        "tokenizer": len(pipe.tokenizer),
        "embeddings": tuple(pipe.text_encoder.get_input_embeddings().weight.shape),
        "scheduler": (type(pipe.scheduler).__name__, dict(pipe.scheduler.config)),
        "unet_training": pipe.unet.training,
        "requires_grad": any(p.requires_grad for p in pipe.unet.parameters()),
    }
