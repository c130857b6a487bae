"""sdkit.widgets: the guidance panel reacts to its widgets, redraws from its cache without
calling the UNet, shows errors and keeps working. Uses the tiny random pipeline of
tests/test_sampling.py (no trained weights needed)."""

from __future__ import annotations

import pytest
import torch
from test_sampling import tiny_pipeline  # tests/ is on sys.path under pytest (no __init__.py)

from sdkit import sampling, widgets
from sdkit.checks import SdkitInputError


class UNetCalls:
    """Counts UNet forward calls (a forward pre-hook)."""

    def __init__(self, unet):
        self.n = 0
        self.handle = unet.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.n += 1


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return tiny_pipeline(tmp_path_factory.mktemp("tok"))


@pytest.fixture
def calls(pipe):
    c = UNetCalls(pipe.unet)
    yield c
    c.handle.remove()


@pytest.fixture
def panel(pipe):
    return widgets.GuidancePanel(pipe, prompt="a red circle on the left", seed=1,
                                 num_inference_steps=3, guidance_scale=4.0)


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
    want = sampling.sample(pipe, "a red circle on the left", 1, 3, 9.0)
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
    p = widgets.GuidancePanel(pipe, prompt="a red circle on the left", seed=2,
                              num_inference_steps=3, guidance_scale=4.0, exact=False)
    n0 = calls.n
    before = p.image_bytes()
    p.guidance_slider.value = 8.0
    assert calls.n == n0
    assert p.status_mode == "approximate preview"
    assert "approximate preview" in p.status.value
    assert p.image_bytes() != before
    exact = sampling.sample(pipe, "a red circle on the left", 2, 3, 8.0)
    # exact at step 0 only
    assert torch.allclose(p.trajectory.latents[1], exact.latents[1], atol=1e-5)


def test_callback_error_is_shown_and_panel_keeps_working(panel):
    before = panel.image_bytes()
    panel.prompt_box.value = "a purple star"  # the toy tokenizer has no token for these
    assert panel.status_mode == "error"
    assert "SdkitInputError" in panel.error.value and "purple" in panel.error.value
    assert panel.image_bytes() == before  # the last good image stays
    panel.prompt_box.value = "a blue square at the top"
    assert panel.status_mode == "exact"
    assert panel.error.value == ""
    assert panel.image_bytes() != before


def test_negative_prompt_and_scheduler_change(panel, pipe):
    panel.negative_box.value = "a green triangle"
    assert panel.trajectory.negative_prompts == ["a green triangle"]
    panel.scheduler_dropdown.value = "DDIM"
    assert panel.trajectory.scheduler == "DDIM"
    want = sampling.sample(pipe, "a red circle on the left", 1, 3, 4.0, scheduler="DDIM",
                           negative_prompt="a green triangle")
    assert torch.equal(panel.trajectory.latents, want.latents)


def test_strip_shows_each_step(pipe):
    p = widgets.GuidancePanel(pipe, prompt="a red circle on the left", num_inference_steps=4,
                              strip="preview")
    from io import BytesIO

    from PIL import Image

    strip = Image.open(BytesIO(bytes(p.strip.value)))
    assert strip.size == (4 * 64 + 3 * 2, 64)
    assert widgets.strip_steps(4) == [0, 1, 2, 3]
    assert widgets.strip_steps(50) == sorted(set(widgets.strip_steps(50)))
    assert widgets.strip_steps(50)[0] == 0 and widgets.strip_steps(50)[-1] == 49
    assert len(widgets.strip_steps(50)) == 10


def test_panel_rejects_bad_arguments(pipe):
    with pytest.raises(SdkitInputError, match="scheduler="):
        widgets.GuidancePanel(pipe, scheduler="PNDM")
    with pytest.raises(SdkitInputError, match="prompt="):
        widgets.GuidancePanel(pipe, prompt="a purple star")
    with pytest.raises(SdkitInputError, match="strip="):
        widgets.GuidancePanel(pipe, strip="gif")


def test_combine_checker():
    assert widgets.check_combine_exercise(lambda u, c, s: u + s * (c - u))
    assert widgets.check_combine_exercise(lambda u, c, s: (1 - s) * u + s * c)
    assert not widgets.check_combine_exercise(lambda u, c, s: c + s * (c - u))
    assert not widgets.check_combine_exercise(lambda u, c, s: u + s * (u - c))
    assert not widgets.check_combine_exercise(None)
    assert not widgets.check_combine_exercise(lambda u, c, s: 1 / 0)
