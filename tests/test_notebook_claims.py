"""The lessons' speed claims, measured here instead of in the lessons' flow.

A lesson says what costs little and what is instant; timing loops and goals against a
machine belong in the tests (issue 16: a lesson never prints a pass/fail line against a
goal). Times are CPU time of this process where other programs could disturb wall time, and
the bounds carry a margin for a busy machine; the goals on a quiet machine are in comments.
"""

from __future__ import annotations

import time

import numpy as np

from sdkit import widgets
from sdkit.attention import AttentionStore
from sdkit.pipeline import generate

PROMPT = "a red circle on the left and a blue square on the right"


def _cpu_seconds(fn) -> float:
    c0 = time.process_time()
    fn()
    return time.process_time() - c0


def test_attention_capture_costs_little(toy_pipe):
    """Notebook 04: capture adds one small matmul and softmax per cross-attention layer.
    Goal on a quiet machine: at most +10% CPU time per image (measured +4%); the bound here
    leaves room for a busy machine, and still fails if capture recomputed the layers."""
    generate(toy_pipe, PROMPT, 3)  # warm up

    def captured():
        with AttentionStore(toy_pipe.unet):
            generate(toy_pipe, PROMPT, 3)

    plain, store = [], []
    for _ in range(4):  # interleaved, so a slowdown of the machine hits both
        plain.append(_cpu_seconds(lambda: generate(toy_pipe, PROMPT, 3)))
        store.append(_cpu_seconds(captured))
    overhead = np.median(store) / np.median(plain) - 1
    assert overhead < 0.5, f"capture overhead {overhead:+.1%} of CPU time (goal: at most +10%)"


def test_guidance_panel_redraws_from_its_cache_at_once(toy_pipe):
    """Notebook 06: a setting seen before is redrawn from the cache (goal: at most 50 ms);
    the approximate preview needs no UNet call and is faster than a full regeneration
    (goal on a laptop CPU: at most 300 ms for the toy model's 10 steps)."""
    panel = widgets.GuidancePanel(toy_pipe, prompt="a red circle on the left", seed=1000,
                                  exact=False)
    s = panel.guidance_slider.value
    full, preview, cached = [], [], []
    for i in range(3):
        panel.seed_box.value = 1001 + i  # a new setting: the whole loop
        full.append(panel.timings["exact_s"])
        panel.guidance_slider.value = s + 2 + i  # exact=False: the preview only
        preview.append(panel.timings["preview_s"])
        panel.guidance_slider.value = s  # computed before: from the cache
        cached.append(panel.timings["cached_redraw_s"])
    assert np.median(cached) <= 0.05, f"redraw from cache {1000 * np.median(cached):.0f} ms"
    assert np.median(cached) < np.median(preview) < np.median(full), (cached, preview, full)
