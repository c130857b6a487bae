"""Figures a class can read: sdkit's plotting style, its grid of pictures, and every sdkit
function that draws, called on small inputs.

``figures.readability_problems`` states the rules (text at least ``MIN_FONT_PT``, figures at
most ``MAX_WIDTH_IN`` wide, every picture bordered, labelled and large enough, every plot with
axis labels, a title somewhere); the first tests show it catches each breach, the rest that
every drawing function of the kit keeps them. ``test_every_drawing_function_is_covered``
finds the drawing functions in the source, so a new one cannot go untested.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from PIL import Image

from sdkit import (
    attention,
    checks,
    figures,
    finetune,
    guidance,
    images,
    latents,
    noising,
    samplers,
    sampling_views,
    unet,
    unet_views,
)
from sdkit.shapes import Obj

ROOT = Path(__file__).resolve().parents[1]


def pictures(n, size=64, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
            for _ in range(n)]


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


# ------------------------------------------------------------------------------ the rules catch


def test_rules_catch_small_text_a_wide_figure_and_an_unlabelled_plot():
    fig, ax = plt.subplots(figsize=(12, 3))
    ax.plot([0, 1], [0, 1])
    ax.set_title("tiny", fontsize=7)
    problems = figures.readability_problems(fig)
    assert any("12.0 in wide" in p for p in problems)
    assert any("'tiny' at 7 pt" in p for p in problems)
    assert any("without both axis labels" in p for p in problems)


def test_rules_catch_an_unbordered_unlabelled_small_picture():
    fig, axes = plt.subplots(1, 8, figsize=(8, 1.5))
    for ax, im in zip(axes, pictures(8), strict=True):
        ax.imshow(im)
        ax.axis("off")
    fig.suptitle("eight pictures, too small", fontsize=14)
    problems = figures.readability_problems(fig)
    assert sum("no title or label" in p for p in problems) == 8
    assert sum("without a border" in p for p in problems) == 8
    assert sum("in across" in p for p in problems) == 8


def test_rules_catch_a_figure_without_any_title():
    with figures.style():
        fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot([0, 1])
    ax.set(xlabel="x", ylabel="y")
    assert figures.readability_problems(fig) == ["no title on the figure or any axes"]


# ------------------------------------------------------------------------------ the grid


def test_image_grid_wraps_labels_and_borders_each_picture():
    fig = figures.image_grid(pictures(8), labels=[f"seed {i}" for i in range(8)], title="eight")
    assert figures.readability_problems(fig) == []
    axes = fig.axes
    assert len(axes) == 8
    assert [ax.get_xlabel() for ax in axes] == [f"seed {i}" for i in range(8)]
    per_row = int(figures.MAX_WIDTH_IN // figures.THUMB_IN)  # 5 pictures of 2 in per row
    assert len({round(ax.get_position().y0, 3) for ax in axes}) == -(-8 // per_row)
    w, _ = fig.get_size_inches()
    assert w <= figures.MAX_WIDTH_IN
    for ax in axes:
        assert all(s.get_visible() and s.get_linewidth() >= 1 for s in ax.spines.values())
        assert ax.images[0].get_interpolation() == "nearest"  # pixels, not a blur
        box = ax.get_position()
        assert min(box.width * w, box.height * fig.get_size_inches()[1]) >= 1.5
    assert fig._suptitle.get_text() == "eight"


def test_image_grid_table_has_row_and_column_titles():
    rows = [pictures(3, seed=1), pictures(3, seed=2)]
    fig = figures.image_grid(rows, row_titles=["DDPM", "Euler"],
                             col_titles=["2 steps", "5 steps", "10 steps"], title="table")
    assert figures.readability_problems(fig) == []
    assert [ax.get_title() for ax in fig.axes[:3]] == ["2 steps", "5 steps", "10 steps"]
    assert [fig.axes[0].get_ylabel(), fig.axes[3].get_ylabel()] == ["DDPM", "Euler"]
    assert all(not ax.get_title() for ax in fig.axes[3:])


def test_image_grid_takes_tensors_arrays_and_long_row_titles():
    x = torch.rand(3, 16, 16) * 2 - 1
    fig = figures.image_grid([[x, np.zeros((16, 16)), np.ones((16, 16, 3), np.float32)]],
                             row_titles=["a yellow circle at the bottom"],
                             labels=[["tensor", "grey", "float"]], title="three kinds")
    assert figures.readability_problems(fig) == []
    label = fig.axes[0].yaxis.label
    assert label.get_rotation() == 0 and "\n" in label.get_text()  # across, wrapped


def test_image_grid_labels_above_become_titles():
    fig = figures.image_grid(pictures(3), labels=["a", "b", "c"], labels_above=True, title="t")
    assert [ax.get_title() for ax in fig.axes] == ["a", "b", "c"]
    assert not any(ax.get_xlabel() for ax in fig.axes)
    assert figures.readability_problems(fig) == []


@pytest.mark.parametrize("call, name", [
    (lambda: figures.image_grid(pictures(3), labels=["a", "b"]), "labels"),
    (lambda: figures.image_grid([]), "pictures"),
    (lambda: figures.image_grid(["not a picture"]), "pictures[0]"),
    (lambda: figures.image_grid([np.full((8, 8), np.nan)]), "pictures[0]"),
    (lambda: figures.image_grid(pictures(2), row_titles=["one", "two"]), "row_titles"),
    (lambda: figures.image_grid(pictures(2), size=40.0), "size"),
    (lambda: figures.image_grid(pictures(2), labels_above=1), "labels_above"),
])
def test_image_grid_refuses_bad_input(call, name):
    with pytest.raises(checks.SdkitInputError, match=rf"^{re.escape(name)}=.* is not allowed"):
        call()


def test_style_is_scoped_and_use_style_leaves_the_layout_engine():
    before = dict(plt.rcParams)
    with figures.style():
        assert plt.rcParams["font.size"] >= figures.MIN_FONT_PT
    assert dict(plt.rcParams) == before  # nothing leaks out of the block
    try:
        figures.use_style()
        assert plt.rcParams["axes.titlesize"] >= figures.MIN_FONT_PT
        assert not plt.rcParams["figure.constrained_layout.use"]  # tight_layout() still fine
    finally:
        matplotlib.rcParams.update(before)


def test_style_puts_back_only_its_own_settings():
    """Jupyter's backend turns interactive mode on when a session's first figure is drawn,
    here inside the block: the block's end must not turn it off (the notebook would stop
    showing figures by itself)."""
    was = matplotlib.is_interactive()
    try:
        with figures.style():
            matplotlib.interactive(not was)
        assert matplotlib.is_interactive() == (not was)
    finally:
        matplotlib.interactive(was)


# ------------------------------------------------------------------------------ the kit's figures


class _Traj(sampling_views.Trajectory):
    """Only what plot_trajectory reads."""


def _fake_trajectory(n=6):
    t = _Traj.__new__(_Traj)
    ims = pictures(n + 1)
    t.num_inference_steps = n
    t.timesteps = torch.arange(999, 0, -999 // n)[:n]
    t.prompts, t.scheduler, t.guidance_scale = ["a red circle on the left"], "DDIM", 4.0
    t.latent_images = lambda item=0: ims
    t.pred_x0_images = lambda item=0: ims[::-1]
    return t


def _fake_run(n):
    """Only what plot_x0_paths reads: x0_hat moving smoothly from -1 to 1 as sigma falls."""
    t = _Traj.__new__(_Traj)
    t.num_inference_steps, t.prompts = n, ["a red circle on the left"]
    t.alphas_cumprod = torch.linspace(2**-24, 0.99, n)  # (S,), noisiest first
    ramp = torch.tanh(torch.linspace(-3, 3, n)).view(n, 1, 1, 1, 1)
    t.pred_x0 = ramp * torch.linspace(0.5, 2, 4 * 4 * 4).view(1, 1, 4, 4, 4)  # (S, 1, 4, 4, 4)
    t.latents = torch.zeros(n + 1, 1, 4, 4, 4)
    return t


def _word_maps():
    return torch.softmax(torch.randn(6, 8, 8), 0)  # (T, 8, 8), weights over 6 tokens


TOKENS = ["<|startoftext|>", "a", "red", "circle", "left", "<|endoftext|>"]


def _pointing_results():
    mask = np.zeros((64, 64), bool)
    mask[10:30, 10:30] = True
    objects = [{"obj": Obj("red", "circle", "left"), "map": torch.rand(8, 8), "mask": mask,
                "hit": bool(i % 2)} for i in range(3)]
    return [{"image": np.asarray(pictures(1)[0]), "objects": objects}]


def _sd15_trace():
    with torch.device("meta"):  # SD 1.5's UNet without weights: the largest diagram
        return unet.trace_shapes(UNet2DConditionModel(**unet.SD15_UNET))


def _guided_runs():
    """guidance.sweep's result, faked: 6 pictures (3 prompts, 2 seeds) at six settings."""
    prompts = [p for p in ("a red circle on the left", "a green square at the top and a blue "
                           "circle at the bottom", "a blue triangle on the right") for _ in "ab"]
    return {(s, phi): guidance.GuidedRun(prompts, [0, 1] * 3, s, phi, 10, torch.arange(10),
                                         pictures(6, seed=int(s)), torch.rand(10, 6) * s + 1)
            for s, phi in ((1, 0), (4, 0), (7.5, 0), (15, 0), (7.5, 0.7), (15, 0.7))}


def _loss_result():
    return finetune.FineTuneResult("LoRA", None, list(np.linspace(1, 0.2, 60)), 10, ["x"], 1.0)


DRAWING = {
    "noising.plot_schedules": lambda: noising.plot_schedules(
        {"linear": DDPMScheduler(), "cosine": DDPMScheduler(beta_schedule="squaredcos_cap_v2")},
        highlight="linear"),
    "samplers.plot_sigmas": lambda: samplers.plot_sigmas(
        torch.cat([torch.linspace(0.03, 50, 999), torch.tensor([float("inf")])]),
        torch.tensor([999.0, 666, 332]), torch.tensor([4096.0, 4.0, 1.0, 0.0])),
    "samplers.plot_x0_paths": lambda: samplers.plot_x0_paths(
        _fake_run(20), {"5 steps (dots)": _fake_run(5)}),
    "samplers.plot_errors": lambda: samplers.plot_errors(
        {m: {(n, k): (f / k if n != "DDPM" else f) for n, f in (("DDIM", 1.0), ("Euler", 1.0),
                                                                  ("DPM-Solver++", 0.5),
                                                                  ("DDPM", 0.5))
             for k in (1, 2, 3, 5, 10, 20)}
         for m in ("latent distance (RMS)", "pixel distance (grey levels, RMS)")},
        reference="100 steps of DPM-Solver++"),
    "sampling_views.plot_trajectory": lambda: sampling_views.plot_trajectory(_fake_trajectory()),
    "attention.show_word_maps": lambda: attention.show_word_maps(
        np.asarray(pictures(1)[0]), _word_maps(), TOKENS, title="a red circle on the left"),
    "attention.show_map_rows": lambda: attention.show_map_rows(
        np.asarray(pictures(1)[0]), {"4x4": _word_maps(), "8x8": _word_maps()}, TOKENS,
        [2, 3]),
    "attention.show_pointing": lambda: attention.show_pointing(_pointing_results()),
    "latents.show_channels": lambda: latents.show_channels(torch.randn(4, 16, 16),
                                                           title="latents"),
    "guidance.plot_grid": lambda: guidance.plot_grid(
        {k: r for k, r in _guided_runs().items() if k[0] > 1}, [0, 1, 2, 3, 4, 5]),
    "guidance.plot_measures": lambda: guidance.plot_measures(
        {k: {m: 0.1 * s * (1 - phi) for m in guidance.MEASURES} for k in _guided_runs()
         for s, phi in [k]}),
    "guidance.plot_spread": lambda: guidance.plot_spread(_guided_runs()),
    "finetune.before_after_grid": lambda: finetune.before_after_grid(pictures(8), pictures(8)),
    "finetune.plot_losses": lambda: finetune.plot_losses(_loss_result()),
    "finetune.plot_file_sizes": lambda: finetune.plot_file_sizes(
        {"embedding": 3_072, "LoRA": 11_022_336, "the UNet": 3_438_083_856}),
    "unet_views.draw_trace": lambda: unet_views.draw_trace(_sd15_trace()),
    "unet_views.plot_ablations": lambda: unet_views.plot_ablations(
        {k: {"prompts fully right": v, "objects: right colour and shape": 1 - v / 2}
         for k, v in (("intact", 0.875), ("t-emb zeroed", 0.75), ("told t = 0", 0.0),
                      ("skip #0 off", 0.75), ("all skips off", 0.125),
                      ("text off 4×4", 0.5), ("text off", 0.0))}),
    "images.show": lambda: (images.show(pictures(4), ["picture", "mask (dilated by 6 px)",
                                                      "seed 0", "seed 1"], suptitle="show"),
                            plt.gcf())[1],
}


@pytest.mark.parametrize("name", sorted(DRAWING))
def test_kit_figure_is_readable(name):
    fig = DRAWING[name]()
    assert isinstance(fig, matplotlib.figure.Figure)
    assert figures.readability_problems(fig) == []


def test_kit_figures_do_not_change_the_global_style():
    before = dict(plt.rcParams)
    for make in DRAWING.values():
        make()
    assert dict(plt.rcParams) == before


def _drawing_functions():
    """sdkit's public functions whose code draws (calls ``plt.`` or ``figures.``)."""
    found = set()
    for path in sorted((ROOT / "sdkit").glob("*.py")):
        if path.stem in ("figures",):
            continue
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
                names = {n.value.id for n in ast.walk(node)
                         if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)}
                helpers = {n.func.id for n in ast.walk(node)
                           if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
                if names & {"plt", "figures"} or helpers & {"_grid"}:
                    found.add(f"{path.stem}.{node.name}")
    return found


# drawing functions of modules this test does not cover yet, with the reason
NOT_COVERED: dict = {}


def test_every_drawing_function_is_covered():
    found = _drawing_functions()
    assert len(found) >= 10, found  # the finder finds them
    missing = found - set(DRAWING) - set(NOT_COVERED)
    assert not missing, f"drawing functions without a readability test: {sorted(missing)}"
