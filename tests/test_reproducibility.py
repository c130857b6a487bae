"""Same seed, same image: bit-identical on the CPU across calls and across fresh processes.

The kit promises learners that the picture in their notebook is the picture in the book:
``sdkit.pipeline.generate`` draws the starting noise from ``torch.Generator("cpu")``, so the
same call with the same seed gives the same bytes. Checked in-process (twice) and against a
fresh Python process that loads the model itself and prints the sha256 of the image bytes.
Different seeds must give different images.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sdkit.pipeline import TOY_DIR

PROMPT = "a blue square at the top and a green triangle at the bottom"
SEED = 1234

TESTS_DIR = Path(__file__).resolve().parent
WORKER = f"""
import hashlib, sys
import numpy as np
sys.path.insert(0, {str(TESTS_DIR)!r})
import offline_guard
offline_guard.block_network()
from sdkit.pipeline import generate, load_pipeline
pipe = load_pipeline("toy", device="cpu", dtype="float32")
pipe.set_progress_bar_config(disable=True)
image = np.asarray(generate(pipe, sys.argv[1], seed=int(sys.argv[2])))
print("SHA256", hashlib.sha256(image.tobytes()).hexdigest(), image.shape, image.dtype)
"""


def _sha(image) -> str:
    return hashlib.sha256(np.asarray(image).tobytes()).hexdigest()


def _fingerprint(folder: Path) -> list:
    """Names, sizes and times of the model's files: tells whether a training run rewrote it."""
    return sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def fresh_pipe(toy_pipe):
    """A pipeline loaded now (after the model-file fingerprint), for the cross-process test."""
    from sdkit.pipeline import load_pipeline

    before = _fingerprint(TOY_DIR)
    pipe = load_pipeline("toy", device="cpu", dtype="float32")
    pipe.set_progress_bar_config(disable=True)
    return pipe, before


@pytest.mark.timeout(300)
def test_same_seed_same_image_in_process(toy_pipe):
    from sdkit.pipeline import generate

    a = np.asarray(generate(toy_pipe, PROMPT, seed=SEED))
    b = np.asarray(generate(toy_pipe, PROMPT, seed=SEED))
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b), f"max pixel difference {np.abs(a.astype(int) - b).max()}"


@pytest.mark.timeout(300)
def test_different_seeds_different_images(toy_pipe):
    from sdkit.pipeline import generate

    images = [np.asarray(generate(toy_pipe, PROMPT, seed=s)).astype(np.int16)
              for s in (SEED, SEED + 1, SEED + 2)]
    hashes = {_sha(im) for im in images}
    assert len(hashes) == 3
    for i in range(3):
        for j in range(i + 1, 3):
            diff = np.abs(images[i] - images[j]).mean()
            assert diff > 0.5, f"seeds {i} and {j}: mean pixel difference only {diff:.3f}"


@pytest.mark.timeout(600)
def test_same_seed_same_image_in_a_fresh_process(fresh_pipe):
    from sdkit.pipeline import generate

    pipe, before = fresh_pipe
    here = _sha(np.asarray(generate(pipe, PROMPT, seed=SEED)))
    env = dict(os.environ, PYTHONHASHSEED="0")
    run = subprocess.run([sys.executable, "-c", WORKER, PROMPT, str(SEED)], env=env,
                         capture_output=True, text=True, timeout=540)
    assert run.returncode == 0, run.stderr[-3000:]
    line = next(ln for ln in run.stdout.splitlines() if ln.startswith("SHA256"))
    there = line.split()[1]
    assert _fingerprint(TOY_DIR) == before, (
        "data/toy-sd was rewritten during this test (is `python -m sdkit.training train` "
        "running?); run it again when training has finished")
    assert "(64, 64, 3) uint8" in line
    assert there == here, f"in-process {here} != fresh process {there}"
