"""sdkit.widgets: the guidance panel reacts to its widgets, redraws from its cache without
calling the UNet, checks each input once per update, and ``replay`` (its preview) is exact at
step 0 only. Uses conftest's tiny random pipeline (``tiny_pipe``); the panel's bad arguments
and its error line are in tests/test_bad_inputs.py."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import pytest
import torch
from PIL import Image

from sdkit import checks, sampling, widgets

PROMPT = "a red circle on the left"


class UNetCalls:
    """Counts UNet forward calls (a forward pre-hook)."""

    def __init__(self, unet):
        self.n = 0
        self.handle = unet.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.n += 1


@pytest.fixture(scope="module")
def pipe(tiny_pipe):
    return tiny_pipe


@pytest.fixture
def calls(pipe):
    c = UNetCalls(pipe.unet)
    yield c
    c.handle.remove()


@pytest.fixture
def panel(pipe):
    return widgets.GuidancePanel(pipe, prompt=PROMPT, seed=1, num_inference_steps=3,
                                 guidance_scale=4.0)


def test_panel_starts_with_an_exact_image_and_css_classes(panel):
    assert panel.status_mode == "exact"
    assert panel.image_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert panel.error.value == ""
    assert panel.guidance_slider.continuous_update is False
    assert panel.steps_slider.continuous_update is False
    for w, cls in ((panel.guidance_slider, "sdkit-guidance"), (panel.steps_slider, "sdkit-steps"),
                   (panel.image, "sdkit-image"), (panel.widget, "sdkit-panel"),
                   (panel.prompt_box, "sdkit-prompt"), (panel.error, "sdkit-error")):
        assert cls in w._dom_classes
    bundle = panel._repr_mimebundle_()  # what Jupyter displays for `panel`
    assert bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == panel.widget.model_id
    for cls in widgets.CSS.values():  # every class name is documented in the module docstring
        assert cls in widgets.__doc__


def test_guidance_slider_changes_the_image_exactly(panel, pipe):
    before = panel.image_bytes()
    panel.guidance_slider.value = 9.0  # fires the observer, as a slider release does
    assert panel.status_mode == "exact"
    assert panel.image_bytes() != before
    want = sampling.sample(pipe, PROMPT, 1, 3, 9.0)
    assert torch.equal(panel.trajectory.latents, want.latents)
    assert set(panel.timings) == {"preview_s", "exact_s"}


def test_steps_slider_changes_the_image(panel):
    before = panel.image_bytes()
    panel.steps_slider.value = 5
    assert panel.image_bytes() != before
    assert panel.trajectory.num_inference_steps == 5


def test_cache_hit_redraws_without_the_unet(panel, calls):
    first = panel.image_bytes()
    panel.guidance_slider.value = 7.0
    assert calls.n == 3  # one exact run: one UNet call per step
    panel.guidance_slider.value = 4.0  # back to a scale already computed
    assert calls.n == 3
    assert panel.status_mode == "exact (cached)"
    assert panel.image_bytes() == first
    assert set(panel.timings) == {"cached_redraw_s"}


def test_approximate_preview_without_exact_calls_no_unet(pipe, calls):
    p = widgets.GuidancePanel(pipe, prompt=PROMPT, seed=2, num_inference_steps=3,
                              guidance_scale=4.0, exact=False)
    n0 = calls.n
    before = p.image_bytes()
    p.guidance_slider.value = 8.0
    assert calls.n == n0
    assert p.status_mode == "approximate preview"
    assert "approximate preview" in p.status.value
    assert p.image_bytes() != before
    exact = sampling.sample(pipe, PROMPT, 2, 3, 8.0)
    # exact at step 0 only
    assert torch.allclose(p.trajectory.latents[1], exact.latents[1], atol=1e-5)


def test_a_seen_prompt_is_neither_encoded_nor_checked_again(panel, pipe, monkeypatch):
    """A new seed with the prompt already seen: the cached text embeddings are used and the
    prompt is checked once (by sampling.sample), not by the panel as well."""
    seen = []
    real_check = checks.check_prompt
    monkeypatch.setattr(checks, "check_prompt", lambda p, *a, **k: seen.append(p) or
                        real_check(p, *a, **k))
    encoder = UNetCalls(pipe.text_encoder)
    try:
        panel.seed_box.value = 5
    finally:
        encoder.handle.remove()
    assert panel.status_mode == "exact" and panel.trajectory.seed == 5
    assert encoder.n == 0
    assert seen == [PROMPT]


def test_seed_range_is_the_kits(pipe):
    p = widgets.GuidancePanel(pipe, prompt=PROMPT, seed=checks.SEED_MAX, num_inference_steps=2,
                              strip="preview")
    assert p.seed_box.max == checks.SEED_MAX and p.trajectory.seed == checks.SEED_MAX
    assert p.settings()["seed"] == checks.SEED_MAX  # the box did not clamp it


def test_negative_prompt_and_scheduler_change(panel, pipe):
    panel.negative_box.value = "a green triangle"
    assert panel.trajectory.negative_prompts == ["a green triangle"]
    panel.scheduler_dropdown.value = "DDIM"
    assert panel.trajectory.scheduler == "DDIM"
    want = sampling.sample(pipe, PROMPT, 1, 3, 4.0, scheduler="DDIM",
                           negative_prompt="a green triangle")
    assert torch.equal(panel.trajectory.latents, want.latents)


@pytest.mark.parametrize("steps, thumbs", [(4, 4), (12, 10)])
def test_strip_shows_each_step_up_to_ten(pipe, steps, thumbs):
    p = widgets.GuidancePanel(pipe, prompt=PROMPT, num_inference_steps=steps, strip="preview")
    strip = Image.open(BytesIO(bytes(p.strip.value)))
    assert strip.size == (thumbs * 64 + (thumbs - 1) * 2, 64)
    first, last = (p.trajectory.preview("pred_x0")[i].resize((64, 64), Image.Resampling.NEAREST)
                   for i in (0, steps - 1))
    assert strip.crop((0, 0, 64, 64)).tobytes() == first.tobytes()  # the first step ...
    assert strip.crop((strip.size[0] - 64, 0, strip.size[0], 64)).tobytes() == last.tobytes()


def test_replay_same_scale_is_exact_and_first_step_exact_for_new_scale(pipe):
    traj = sampling.sample(pipe, PROMPT, 4, 5, 3.0)
    same = widgets.replay(traj, 3.0)
    assert torch.equal(same.latents, traj.latents)
    assert torch.equal(same.pred_x0, traj.pred_x0)
    new = sampling.sample(pipe, PROMPT, 4, 5, 8.0)
    approx = widgets.replay(traj, 8.0)
    assert approx.scheduler.endswith("(replayed)") and approx.guidance_scale == 8.0
    # step 0 uses x_T, which does not depend on s: exact
    assert torch.allclose(approx.latents[1], new.latents[1], atol=1e-5)
    assert torch.allclose(approx.pred_x0[0], new.pred_x0[0], atol=1e-5)
    # later steps are only approximate
    assert not torch.allclose(approx.latents[-1], new.latents[-1], atol=1e-4)


def test_replay_ddpm_reuses_the_same_step_noise(pipe):
    traj = sampling.sample(pipe, PROMPT, 9, 4, 3.0, scheduler="DDPM")
    assert torch.equal(widgets.replay(traj, 3.0).latents, traj.latents)


def test_guidance_sweep_matches_sample_and_plots(pipe):
    sweep = widgets.guidance_sweep(pipe, [PROMPT, "a blue square at the top"], [1, 2],
                                   scales=(0, 4), num_inference_steps=2)
    assert list(sweep) == [0, 4] and all(len(v) == 2 for v in sweep.values())
    want = sampling.sample(pipe, [PROMPT, "a blue square at the top"], [1, 2], 2, 4).images()
    assert [im.tobytes() for im in sweep[4]] == [im.tobytes() for im in want]
    assert sweep[0][0].tobytes() != sweep[4][0].tobytes()
    fig = widgets.plot_sweep(sweep, row_labels=["one", "two"])
    assert [ax.get_title() for ax in fig.axes[:1]] == ["s = 0"] and len(fig.axes) == 4


SOLUTION = Path(__file__).resolve().parent.parent / "notebooks" / "solutions" / \
    "05_guidance_and_widgets.py"


def test_rescale_checker_accepts_the_reference_solution(capsys):
    namespace = {"torch": torch}  # the solution uses tensors' own methods only
    exec(SOLUTION.read_text(encoding="utf-8"), namespace)
    assert widgets.check_rescale(namespace["my_rescale"]) is True
    assert "Correct" in capsys.readouterr().out
    # the population std (unbiased=False) is as good: the correction cancels in the ratio
    def biased(cfg, text, phi):
        dims = list(range(1, cfg.ndim))
        r = cfg * text.std(dims, keepdim=True, unbiased=False) / cfg.std(
            dims, keepdim=True, unbiased=False)
        return phi * r + (1 - phi) * cfg
    assert widgets.check_rescale(biased) is True


def _rescale(kind):
    """Plausible wrong answers to notebook 05's exercise."""
    def fn(cfg, text, phi):
        dims = list(range(1, cfg.ndim))
        if kind == "whole-batch":
            ratio = text.std() / cfg.std()
        elif kind == "per-channel":
            ratio = text.std(dim=(2, 3), keepdim=True) / cfg.std(dim=(2, 3), keepdim=True)
        elif kind == "upside-down":
            ratio = cfg.std(dims, keepdim=True) / text.std(dims, keepdim=True)
        else:
            ratio = text.std(dims, keepdim=True) / cfg.std(dims, keepdim=True)
        rescaled = cfg * ratio
        if kind == "wrong-way-round":
            return (1 - phi) * rescaled + phi * cfg
        if kind == "no-blend":
            return rescaled
        if kind == "no-keepdim":
            return cfg * text.std(dims) / cfg.std(dims)
        if kind == "mean-not-std":  # no variant names it: the general hint
            rescaled = cfg - cfg.mean(dims, keepdim=True) + text.mean(dims, keepdim=True)
        return phi * rescaled + (1 - phi) * cfg
    return fn


@pytest.mark.parametrize("kind, hint", [
    ("whole-batch", "per image"), ("per-channel", "per channel"),
    ("wrong-way-round", "wrong way round"), ("upside-down", "upside down"),
    ("no-blend", "not blended"), ("no-keepdim", "raised"),
    ("mean-not-std", "conditional (text) prediction")])
def test_rescale_checker_rejects_plausible_mistakes_with_a_hint(capsys, kind, hint):
    assert widgets.check_rescale(_rescale(kind)) is False
    out = capsys.readouterr().out
    assert out.startswith("Not yet") and hint in out, out


def test_rescale_checker_unsolved_and_broken_answers(capsys):
    def unsolved(noise_cfg, noise_pred_text, guidance_rescale):
        ...

    for answer in (None, unsolved):
        assert widgets.check_rescale(answer) is False
        assert "not solved yet" in capsys.readouterr().out.lower()
    # a wrong answer of any kind: a message and False, never an exception
    for wrong in (42, "cfg * ratio", lambda c, t, p: 1 / 0, lambda c, t, p: 0.0,
                  lambda c, t, p: c[0]):
        assert widgets.check_rescale(wrong) is False
        assert capsys.readouterr().out.startswith("Not yet")
