"""Notebook 06's modules. sdkit.widgets: the guidance panel reacts to its widgets, redraws
from its cache without calling the UNet, checks each input once per update, and ``replay``
(its preview) is exact at step 0 only. sdkit.guidance: guidance gives one step whether
combined in epsilon, v or x0 space; rescale's identities; ``sample_rescaled`` is the
pipeline's own loop, ``guidance_rescale`` included; the diversity measure; the exercise's
checker. Uses conftest's tiny random pipeline (``tiny_pipe``); the panel's bad arguments and
its error line are in tests/test_bad_inputs.py, the guidance helpers' in
tests/mistakes_notebooks.py."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from PIL import Image

from sdkit import checks, guidance, sampling, widgets
from sdkit.pipeline import make_generators

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


# ------------------------------------------------------------------------------ guidance


def _eps_x0_from_v(v, x_t, a):
    """(eps, x0) from a v prediction: x_t = sqrt(a) x0 + sqrt(1-a) eps, v = sqrt(a) eps -
    sqrt(1-a) x0 (written again here, as the notebook's cell writes it)."""
    return (1 - a).sqrt() * x_t + a.sqrt() * v, a.sqrt() * x_t - (1 - a).sqrt() * v


@pytest.mark.parametrize("seed", range(12))
def test_guidance_gives_one_step_in_eps_v_and_x0_space(seed):
    """A property on random tensors: x_t, both branches' v, alphas_cumprod in (0, 1), any s
    (also s < 0 and s > 1): guiding in v, in eps or in x0 gives the same clean latents
    (the kit's predicted_x0 reads eps and v alike), because the conversions are affine with
    the same coefficients for both branches and the guidance weights add up to 1."""
    g = torch.Generator().manual_seed(seed)
    x_t, v_u, v_c = (torch.randn(2, 4, 8, 8, generator=g) * 3 for _ in range(3))
    a = torch.rand((), generator=g) * 0.98 + 0.01
    s = float(torch.empty(()).uniform_(-2, 20, generator=g))
    (eps_u, x0_u), (eps_c, x0_c) = _eps_x0_from_v(v_u, x_t, a), _eps_x0_from_v(v_c, x_t, a)
    in_v = sampling.predicted_x0(x_t, sampling.combine(v_u, v_c, s), a, "v_prediction")
    in_eps = sampling.predicted_x0(x_t, sampling.combine(eps_u, eps_c, s), a, "epsilon")
    in_x0 = sampling.combine(x0_u, x0_c, s)
    scale = in_v.abs().max()
    assert torch.allclose(in_eps, in_v, atol=1e-4 * scale)
    assert torch.allclose(in_x0, in_v, atol=1e-4 * scale)
    # a step that is not affine (rescale divides by a std) does depend on the space
    if abs(s - 1) > 0.5:
        r_v = sampling.predicted_x0(x_t, rescale_noise_cfg(sampling.combine(v_u, v_c, s), v_c,
                                                           1.0), a, "v_prediction")
        r_eps = sampling.predicted_x0(x_t, rescale_noise_cfg(sampling.combine(eps_u, eps_c, s),
                                                             eps_c, 1.0), a, "epsilon")
        assert not torch.allclose(r_v, r_eps, atol=1e-3 * scale)


def _reference_rescale():
    namespace = {"torch": torch}  # the solution uses tensors' own methods only
    exec(SOLUTION.read_text(encoding="utf-8"), namespace)
    return namespace["my_rescale"]


@pytest.mark.parametrize("phi", [0.0, 0.3, 0.7, 1.0])
def test_rescale_moves_the_spread_ratio_to_phi_plus_the_rest(phi):
    """diffusers' rescale_noise_cfg and the exercise's reference solution: the rescaled
    prediction is the guided one times one number per image, so std(out) / std(text) becomes
    phi + (1 - phi) * std(cfg) / std(text); at phi = 1 the guided std equals the text std
    (the identity), at phi = 0 nothing changes."""
    g = torch.Generator().manual_seed(3)
    text = torch.randn(3, 4, 8, 8, generator=g) * torch.tensor([0.5, 1.0, 2.0]).view(3, 1, 1, 1)
    cfg = 6 * text - 5 * torch.randn(3, 4, 8, 8, generator=g)
    r = guidance._spread(cfg) / guidance._spread(text)  # (3,), far above 1
    for fn in (rescale_noise_cfg, _reference_rescale()):
        out = fn(cfg, text, phi)
        ratio = guidance._spread(out) / guidance._spread(text)
        assert torch.allclose(ratio, phi + (1 - phi) * r, rtol=1e-5)
        if phi == 1.0:
            assert torch.allclose(guidance._spread(out), guidance._spread(text), rtol=1e-5)
        if phi == 0.0:
            assert torch.equal(out, cfg)


@pytest.mark.parametrize("s, phi", [(7.5, 0.7), (3.0, 0.0), (1.0, 0.0)])
def test_sample_rescaled_is_the_pipelines_loop(pipe, s, phi):
    """The same images as the pipeline's own call with guidance_rescale, bit for bit (at s = 1
    both run the conditional branch alone); at phi = 0 and s > 1, the same as sampling.sample."""
    prompts, seeds = [PROMPT, "a blue square at the top"], [3, 4]
    run = guidance.sample_rescaled(pipe, prompts, seeds, s, phi, num_inference_steps=3)
    want = pipe(prompts, num_inference_steps=3, guidance_scale=s, guidance_rescale=phi,
                generator=make_generators(seeds)).images
    assert [im.tobytes() for im in run.images] == [im.tobytes() for im in want]
    assert run.std_ratio.shape == (3, 2) and run.setting == (s, phi)
    if s == 1.0:
        assert torch.equal(run.std_ratio, torch.ones(3, 2))  # the conditional prediction
    if phi == 0.0 and s > 1:
        plain = sampling.sample(pipe, prompts, seeds, 3, s).images()
        assert [im.tobytes() for im in run.images] == [im.tobytes() for im in plain]


def test_sample_rescaled_at_phi_1_steps_with_the_texts_spread(pipe):
    run = guidance.sample_rescaled(pipe, PROMPT, [0, 1, 2], 9.0, 1.0, num_inference_steps=3)
    assert torch.allclose(run.std_ratio, torch.ones(3, 3), atol=1e-5)
    plain = guidance.sample_rescaled(pipe, PROMPT, [0, 1, 2], 9.0, 0.0, num_inference_steps=3)
    assert not torch.allclose(plain.std_ratio, torch.ones(3, 3), atol=1e-2)
    assert [im.tobytes() for im in run.images] != [im.tobytes() for im in plain.images]


def test_sweep_runs_each_setting_once_in_order(pipe):
    runs = guidance.sweep(pipe, [PROMPT] * 2, [5, 6], [4, (8, 0.5)], num_inference_steps=2)
    assert list(runs) == [(4.0, 0.0), (8.0, 0.5)]
    alone = guidance.sample_rescaled(pipe, [PROMPT] * 2, [5, 6], 8, 0.5, num_inference_steps=2)
    assert [im.tobytes() for im in runs[8.0, 0.5].images] == \
        [im.tobytes() for im in alone.images]
    with pytest.raises(ValueError, match=r"settings=.* is not allowed: expected each"):
        guidance.sweep(pipe, PROMPT, [5], [4, (4.0, 0.0)], num_inference_steps=2)


def test_diversity_is_zero_for_identical_pictures_and_positive_otherwise():
    rng = np.random.default_rng(0)
    a, b = (Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in range(2))
    assert guidance.diversity([a, a, b, b], ["one", "one", "two", "two"]) == 0.0
    assert guidance.diversity([a, b], ["one", "one"]) > 0
    assert guidance.diversity([a, b], "one") == guidance.diversity([b, a], "one")  # symmetric
    # a prompt with a single picture has no pair: it does not count
    assert guidance.diversity([a, a, b], ["one", "one", "two"]) == 0.0
    black, white = (Image.new("RGB", (8, 8), c) for c in ("black", "white"))
    assert guidance.diversity([black, white], "one") == pytest.approx(1.0)  # the largest
    with pytest.raises(ValueError, match="two pictures"):
        guidance.diversity([a, b], ["one", "two"])


def test_plot_grid_shows_one_column_per_setting(pipe):
    runs = guidance.sweep(pipe, [PROMPT] * 2, [5, 6], [1, 6], num_inference_steps=1)
    fig = guidance.plot_grid(runs, [1, 0])
    assert len(fig.axes) == 4 and [ax.get_title() for ax in fig.axes[:2]] == ["s = 1", "s = 6"]
    assert fig.axes[0].get_ylabel().endswith("seed 6")


SOLUTION = Path(__file__).resolve().parent.parent / "notebooks" / "solutions" / \
    "06_guidance_and_widgets.py"


def test_rescale_checker_accepts_the_reference_solution(capsys):
    assert guidance.check_rescale(_reference_rescale()) is True
    assert "Correct" in capsys.readouterr().out
    # the population std (unbiased=False) is as good: the correction cancels in the ratio
    def biased(cfg, text, phi):
        dims = list(range(1, cfg.ndim))
        r = cfg * text.std(dims, keepdim=True, unbiased=False) / cfg.std(
            dims, keepdim=True, unbiased=False)
        return phi * r + (1 - phi) * cfg
    assert guidance.check_rescale(biased) is True


def _rescale(kind):
    """Plausible wrong answers to notebook 06's exercise."""
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
    assert guidance.check_rescale(_rescale(kind)) is False
    out = capsys.readouterr().out
    assert out.startswith("Not yet") and hint in out, out


def test_rescale_checker_unsolved_and_broken_answers(capsys):
    def unsolved(noise_cfg, noise_pred_text, guidance_rescale):
        ...

    for answer in (None, unsolved):
        assert guidance.check_rescale(answer) is False
        assert "not solved yet" in capsys.readouterr().out.lower()
    # a wrong answer of any kind: a message and False, never an exception
    for wrong in (42, "cfg * ratio", lambda c, t, p: 1 / 0, lambda c, t, p: 0.0,
                  lambda c, t, p: c[0]):
        assert guidance.check_rescale(wrong) is False
        assert capsys.readouterr().out.startswith("Not yet")
