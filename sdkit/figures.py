"""Figures a class can read: the kit's one plotting style and its one grid of pictures.

Every sdkit function that draws does so inside ``style()`` (the ``styled`` decorator), so its
figure has the same readable text wherever the notebook runs:

- ``STYLE``: matplotlib settings: text at least ``MIN_FONT_PT`` points at 100 dpi (a figure
  is shown one pixel per pixel at 100% zoom), and constrained layout, so that axis labels,
  titles and tick labels never run into each other;
- ``style()`` / ``styled``: the settings for one block of code / one function; nothing is
  changed at import. ``use_style()`` applies the fonts and resolution for the rest of a
  notebook (each lesson calls it once in its first cell, so its own plots read like sdkit's);
- ``image_grid``: rows and columns of pictures, each with a border and a label under it, row
  and column titles, and thumbnails large enough to see pixels (small pictures are enlarged
  with nearest-neighbour pixels, never smoothed). diffusers' ``make_image_grid`` pastes
  pictures edge to edge without labels; this is its labelled, readable counterpart;
- ``readability_problems``: what in a figure breaks these rules (tests/test_figures_style.py).

A function here whose docstring names no notebook serves the other sdkit modules only;
no notebook calls it directly.

Left out: colour-blind palettes beyond matplotlib's default, and interactive figures.
"""

from __future__ import annotations

import contextlib
import functools
import textwrap

import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image

from . import checks, images

MIN_FONT_PT = 11  # the smallest text in any kit figure, in points at 100 dpi (about 15 px)
MAX_WIDTH_IN = 10.0  # wider figures are shrunk to fit JupyterLab's output area, text with them
THUMB_IN = 2.0  # a picture's side in a grid, in inches (200 px at 100 dpi)
MIN_THUMB_IN = 1.5  # a grid wraps into more rows rather than shrink pictures below this

STYLE = {
    "figure.dpi": 100,
    "savefig.dpi": 100,
    "figure.constrained_layout.use": True,
    "font.size": 12,
    "axes.titlesize": 12,
    "axes.labelsize": 12,
    "xtick.labelsize": MIN_FONT_PT,
    "ytick.labelsize": MIN_FONT_PT,
    "legend.fontsize": MIN_FONT_PT,
    "legend.title_fontsize": MIN_FONT_PT,
    "figure.titlesize": 13,
    "figure.labelsize": 12,
    "axes.grid": False,
    "image.interpolation": "nearest",
}


@contextlib.contextmanager
def style():
    """The kit's plotting style for the ``with`` block; the settings it changed are put back
    at the end, and only those (``matplotlib.rc_context`` would put back every setting, and
    so undo Jupyter's interactive mode when the block drew a session's first figure: the
    notebook would stop showing figures by itself)."""
    before = {k: plt.rcParams[k] for k in STYLE}
    plt.rcParams.update(STYLE)
    try:
        yield
    finally:
        plt.rcParams.update(before)


def styled(fn):
    """Decorator: run a plotting function inside ``style()``."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with style():
            return fn(*args, **kwargs)
    return wrapper


def use_style() -> None:
    """Apply the kit's fonts and resolution for the rest of this Python session (a notebook's
    own figures then read like sdkit's). The layout engine is left alone, so code that calls
    ``fig.tight_layout()`` keeps working; ask for ``layout="constrained"`` where panels are
    crowded. Undo with ``matplotlib.rcdefaults()``.

    Introduced in notebooks/01_forward_noising.ipynb.
    """
    plt.rcParams.update({k: v for k, v in STYLE.items() if k != "figure.constrained_layout.use"})


def _as_array(im, name: str) -> np.ndarray:
    """A picture as something ``imshow`` shows: PIL, (H, W[, 3|4]) arrays, tensors in [-1, 1]."""
    if isinstance(im, Image.Image):
        return np.asarray(im.convert("RGB") if im.mode not in ("RGB", "L") else im)
    if torch.is_tensor(im):
        if im.ndim == 2:
            return im.detach().float().cpu().numpy()
        if im.ndim == 4 and im.shape[0] == 1:
            im = im[0]
        return images.to_numpy(images._check_pictures(im, name))[0]  # (H, W, 3) in [0, 1]
    a = np.asarray(im) if isinstance(im, np.ndarray) else None
    if a is None or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)) \
            or a.size == 0:
        checks.fail(name, type(im).__name__ if a is None else f"array {a.shape}",
                    "expected a picture: PIL, an array (H, W) or (H, W, 3), or a tensor "
                    "(3, H, W) in [-1, 1]")
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        checks.fail(name, "array with NaN or infinity", "expected finite pixel values")
    return a


def _rows(pictures, labels, cols):
    """Pictures (flat, or a list of rows) and labels in the same shape -> rows of (pic, label)."""
    nested = all(isinstance(r, (list, tuple)) for r in pictures)
    if nested:
        rows = [checks.check_list(f"images[{i}]", r) for i, r in enumerate(pictures)]
    else:
        n = len(pictures)
        cols = n if cols is None else checks.check_int("cols", cols, 1, 64)
        rows = [pictures[i:i + cols] for i in range(0, n, cols)]
    if labels is None:
        label_rows = [[None] * len(r) for r in rows]
    else:
        flat = [x for r in labels for x in r] if nested else list(labels)
        if len(flat) != sum(len(r) for r in rows):
            checks.fail("labels", labels, f"expected {sum(len(r) for r in rows)} labels, one per "
                                          "picture, in the pictures' shape")
        it = iter(flat)
        label_rows = [[next(it) for _ in r] for r in rows]
    return rows, label_rows, nested


def _titles(name, titles, n):
    if titles is None:
        return [None] * n
    titles = checks.check_list(name, titles)
    if len(titles) != n:
        checks.fail(name, titles, f"expected {n} titles")
    return [None if t is None else str(t) for t in titles]


@styled
def image_grid(pictures, labels=None, cols: int | None = None, row_titles=None,
               col_titles=None, title: str | None = None, size: float = THUMB_IN,
               cmap: str | None = None, labels_above: bool = False):
    """A matplotlib figure of pictures in rows and columns, each with a border and (if
    given) a label under it; ``row_titles`` at the left of each row, ``col_titles`` over
    the first row, ``title`` over everything. Returns the figure (a notebook shows it).

    ``pictures``: a flat list (wrapped every ``cols`` pictures; as many as fit by default)
    or a list of rows; each a PIL image, an array (H, W) or (H, W, 3) (uint8, or floats in
    [0, 1]) or a tensor (3, H, W) in [-1, 1]. ``labels``: one str (or None) per picture, in
    the same shape. Row titles longer than 14 characters are written across, wrapped. Each
    picture is drawn ``size`` inches wide (100 px per inch) with nearest-neighbour pixels;
    a grid of rows shrinks its pictures so that the figure stays ``MAX_WIDTH_IN`` wide.
    ``fig.axes[k]`` is the k-th picture's axes, row by row, for drawing on top.
    ``labels_above=True`` writes the labels over the pictures instead (as their titles).

    Introduced in notebooks/02_reverse_denoising.ipynb.
    """
    pictures = checks.check_list("pictures", pictures)
    size = checks.check_float("size", size, 0.5, 6.0)
    checks.check_bool("labels_above", labels_above)
    if title is not None and not isinstance(title, str):
        checks.fail("title", title, "expected a str or None")
    if not (isinstance(pictures[0], (list, tuple))) and cols is None:
        cols = max(1, min(len(pictures), int(MAX_WIDTH_IN // max(size, MIN_THUMB_IN))))
    rows, label_rows, nested = _rows(pictures, labels, cols)
    n_cols = max(len(r) for r in rows)
    row_titles = _titles("row_titles", row_titles, len(rows))
    col_titles = _titles("col_titles", col_titles, n_cols)
    arrays = [[_as_array(im, f"pictures[{i}][{j}]" if nested else f"pictures[{i * n_cols + j}]")
               for j, im in enumerate(r)] for i, r in enumerate(rows)]
    long = max((len(t) for t in row_titles if t), default=0) > 14  # horizontal, wrapped
    left = (1.6 if long else 0.4) * any(row_titles)  # inches kept for the row titles
    side = min(size, (MAX_WIDTH_IN - left) / n_cols)
    aspect = max(a.shape[0] / a.shape[1] for r in arrays for a in r)
    text_h = 0.35 * any(col_titles) + 0.45 * (title is not None)
    fig = plt.figure(figsize=(side * n_cols + left,
                              side * aspect * len(rows) + 0.35 * len(rows) * (labels is not None)
                              + text_h))
    axes = []
    for i, (r, lr) in enumerate(zip(arrays, label_rows)):
        for j, (a, lab) in enumerate(zip(r, lr)):
            ax = fig.add_subplot(len(rows), n_cols, i * n_cols + j + 1)
            grey = a.ndim == 2
            ax.imshow(a, cmap=cmap or ("gray" if grey else None), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(True)
                spine.set_color("0.25")
                spine.set_linewidth(1.5)
            if lab is not None:
                (ax.set_title if labels_above else ax.set_xlabel)(str(lab))
            if i == 0 and col_titles[j] is not None:
                ax.set_title(col_titles[j])
            if j == 0 and row_titles[i] is not None and long:
                ax.set_ylabel(textwrap.fill(row_titles[i], 16), rotation=0, ha="right",
                              va="center")
            elif j == 0 and row_titles[i] is not None:
                ax.set_ylabel(row_titles[i])
            axes.append(ax)
    if title is not None:
        fig.suptitle(title)
    return fig


def readability_problems(fig, min_pt: float = MIN_FONT_PT, max_width: float = MAX_WIDTH_IN,
                         min_thumb: float = MIN_THUMB_IN * 0.9) -> list[str]:
    """What in a matplotlib figure breaks the kit's rules: text smaller than ``min_pt``
    points; a figure wider than ``max_width`` inches (JupyterLab would shrink it, text and
    all); an axes showing a picture with no title or label, without a border, or smaller than
    ``min_thumb`` inches; an axes with a plot but no axis labels; a figure with no title
    anywhere. An empty list: nothing wrong."""
    problems = []
    w, h = fig.get_size_inches()
    if w > max_width + 1e-6:
        problems.append(f"figure {w:.1f} in wide (at most {max_width})")
    fig.canvas.draw()
    for t in fig.findobj(lambda a: hasattr(a, "get_fontsize") and hasattr(a, "get_text")):
        if t.get_text().strip() and t.get_visible() and t.get_fontsize() < min_pt - 1e-6:
            problems.append(f"text {t.get_text()!r} at {t.get_fontsize():g} pt")
    titled = bool(fig._suptitle and fig._suptitle.get_text())
    pictures = [ax for ax in fig.axes if ax.images]
    # a picture in a table is named by its row's title (left) or its column's (top)
    row_named = {round(ax.get_position().y0, 3) for ax in pictures if ax.get_ylabel().strip()}
    col_named = {round(ax.get_position().x0, 3) for ax in pictures if ax.get_title().strip()}
    for k, ax in enumerate(fig.axes):
        if not ax.get_visible() or not ax.axison and not ax.images:
            continue
        named = any(s.strip() for s in (ax.get_title(), ax.get_title("left"),
                                         ax.get_xlabel(), ax.get_ylabel()))
        titled = titled or bool(ax.get_title().strip())
        box = ax.get_position()
        named = named or round(box.y0, 3) in row_named or round(box.x0, 3) in col_named
        if ax.images and not (getattr(ax, "_colorbar", None) or ax.get_label() == "<colorbar>"):
            side = min(box.width * w, box.height * h)
            if not named:
                problems.append(f"axes {k}: a picture with no title or label")
            if not ax.axison or not any(s.get_visible() for s in ax.spines.values()):
                problems.append(f"axes {k}: a picture without a border")
            if side < min_thumb:
                problems.append(f"axes {k}: a picture {side:.2f} in across (at least {min_thumb})")
        elif ax.lines or ax.patches or ax.collections:
            if ax.get_label() != "<colorbar>" and not (ax.get_xlabel() and ax.get_ylabel()):
                problems.append(f"axes {k}: a plot without both axis labels")
    if not titled:
        problems.append("no title on the figure or any axes")
    return problems
