"""Notebook 03's pictures of the UNet: its traced path as a diagram, and the ablations' scores.

* ``draw_trace``: the records of ``sdkit.unet.trace_shapes`` as boxes (one per stage, with
  its shapes) and arrows (the main path, and each skip from the down stage that makes it
  to the up block that takes it), the timestep embedding above them;
* ``plot_ablations``: the checker's scores of generations with one part of the UNet
  switched off (``sdkit.unet``'s ablations), as grouped bars.

Left out: drawing the layers inside a block (the notebook writes them out by hand) and
attention maps (notebook 04).
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import FancyBboxPatch, Patch

from . import checks, figures
from .unet import Record


def _dims(shape) -> str:
    return "×".join(str(s) for s in shape)


@figures.styled
def draw_trace(records, title: str | None = None):
    """The UNet's path as a diagram, drawn from ``trace_shapes``' records: the down path on
    the left (top to bottom), the mid block at the bottom, the up path on the right (bottom
    to top), each box with its block type and shapes (C×H×W); black arrows for the main
    path, orange ones for the skips (``#i`` = index in ``down_block_res_samples``, with its
    shape), and the timestep embedding that every ResNet block receives. Returns the figure.

    Introduced in notebooks/03_unet_from_the_inside.ipynb.
    """
    if not isinstance(records, (list, tuple)) or not records or not all(
            isinstance(r, Record) for r in records):  # (a UNet is no list: ask before iterating)
        checks.fail("records", records, "expected a list: the one trace_shapes(unet) returns")
    left = [r for r in records if r.kind in ("in", "down")]
    right = [r for r in records if r.kind in ("up", "out")]
    mid = [r for r in records if r.kind == "mid"]
    time = [r for r in records if r.kind == "time"]
    if not left or not right:
        checks.fail("records", f"{len(records)} records", "expected a whole UNet's trace")
    rows = max(len(left), len(right)) + bool(mid)
    fig = plt.figure(figsize=(10, 1.15 * rows + 1.9), layout="none")  # one axes, placed
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, 10)
    ax.set_ylim(-1.15 * rows + 0.1, 1.6)
    ax.axis("off")
    w, h, step = 3.15, 0.8, 1.15
    boxes = {}  # name -> (x, y) of its centre

    def box(r, x, y, colour):
        ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02",
                                    facecolor=colour, edgecolor="0.3"))
        ax.text(x, y, f"{r.name} · {r.block_type}\n{_dims(r.input_shape)} → "
                      f"{_dims(r.output_shape)}", ha="center", va="center", fontsize=11)
        boxes[r.name] = (x, y)

    for i, r in enumerate(left):
        box(r, 1.7, -step * i, "#dbe8f6")
    for j, r in enumerate(right):
        box(r, 8.3, -step * (len(right) - 1 - j), "#e3f1dc")
    for r in mid:
        box(r, 5.0, -step * (rows - 1), "#f4e3f0")

    def arrow(a, b, colour="black", bend=None):
        ax.annotate("", b, a, arrowprops=dict(arrowstyle="-|>", color=colour, lw=1.6,
                                              shrinkA=2, shrinkB=2, connectionstyle=bend))

    path = left + mid + right
    for a, b in zip(path, path[1:]):
        (xa, ya), (xb, yb) = boxes[a.name], boxes[b.name]
        if xa == xb:  # same column: down on the left, up on the right
            arrow((xa, ya + (h / 2 if yb > ya else -h / 2)),
                  (xb, yb + (-h / 2 if yb > ya else h / 2)))
        elif b.kind == "mid":  # down, then right into the mid block
            arrow((xa, ya - h / 2), (xb - w / 2, yb), bend="angle,angleA=90,angleB=0")
        else:  # out of the mid block: right, then up
            arrow((xa + w / 2, ya), (xb, yb - h / 2), bend="angle,angleA=0,angleB=90")
    producer = {i: r.name for r in left for i, _ in r.skips_out}
    pairs: dict = {}  # (producer, consumer) -> [(index, shape)]
    for r in right:
        for i, s in r.skips_in:
            if i in producer:
                pairs.setdefault((producer[i], r.name), []).append((i, s))

    def slots(ends, y_of_other):
        """Each box's arrow ends spread over its height, the one to the highest box on top
        (so that the arrows do not cross)."""
        out = {}
        for end in {e for e, _ in ends}:
            mine = sorted((o for e, o in ends if e == end), key=y_of_other, reverse=True)
            for k, other in enumerate(mine):
                out[end, other] = boxes[end][1] + (0.2 - 0.4 * k / (len(mine) - 1)
                                                   if len(mine) > 1 else 0)
        return out

    y_out = slots([(p, c) for p, c in pairs], lambda c: boxes[c][1])
    y_in = slots([(c, p) for p, c in pairs], lambda p: boxes[p][1])
    for (p, c), skips in pairs.items():
        ya, yb = y_out[p, c], y_in[c, p]
        arrow((1.7 + w / 2, ya), (8.3 - w / 2, yb), "tab:orange")
        label = " ".join(f"#{i}" for i, _ in sorted(skips)) + ": " + ", ".join(
            _dims(s) for s in sorted({s for _, s in skips}))
        ax.text(5.0, (ya + yb) / 2, label, ha="center", va="center", fontsize=11,
                color="tab:orange", bbox=dict(facecolor="white", edgecolor="none", pad=1))
    if time:
        dims = " → ".join([f"t: {_dims(time[0].input_shape) or 'a number'}"]
                          + [f"{r.name} {_dims(r.output_shape)}" for r in time])
        ax.text(5.0, 1.05, f"timestep embedding: {dims}\n(into every ResNet block, "
                           "as a per-channel bias)", ha="center", va="center", fontsize=11,
                bbox=dict(boxstyle="round,pad=0.3", facecolor="#fff4d6", edgecolor="0.3"))
    ax.legend(handles=[Patch(color="black", label="main path"),
                       Patch(color="tab:orange", label="skip (#i in down_block_res_samples)")],
              loc="lower left", bbox_to_anchor=(0.0, 0.0), frameon=False)
    fig.suptitle(title or f"the UNet's path: {len(left) + len(right) + len(mid)} stages, "
                          f"{len(producer)} skips", y=0.995, va="top")
    return fig



@figures.styled
def plot_ablations(scores: dict, title: str | None = None):
    """Grouped bars: for each ablation (``scores``' keys, in order) its figures (a dict
    name -> share in [0, 1], the same names for every ablation), each bar labelled with
    its percentage. Returns the figure.

    Introduced in notebooks/03_unet_from_the_inside.ipynb.
    """
    if not isinstance(scores, dict) or not scores or not all(
            isinstance(v, dict) and v for v in scores.values()):
        checks.fail("scores", scores, "expected a dict ablation -> {figure name: share}")
    names = list(next(iter(scores.values())))
    for ablation, figs in scores.items():
        if list(figs) != names:
            checks.fail(f"scores[{ablation!r}]", list(figs), f"expected the figures {names}")
        for k, v in figs.items():
            checks.check_float(f"scores[{ablation!r}][{k!r}]", v, 0.0, 1.0)
    fig, ax = plt.subplots(figsize=(10, 4.2))
    x, width = np.arange(len(scores)), 0.8 / len(names)
    for k, name in enumerate(names):
        vals = [100 * figs[name] for figs in scores.values()]
        bars = ax.bar(x + (k - (len(names) - 1) / 2) * width, vals, width, label=name)
        ax.bar_label(bars, [f"{v:.0f}%" for v in vals], fontsize=11)
    ax.set_xticks(x, list(scores), rotation=15)
    ax.set_ylim(0, 115)
    ax.set_ylabel("% of the prompts' set")
    ax.set_xlabel("what was switched off")
    ax.legend(loc="upper right")
    ax.set_title(title or "the checker's scores with one part of the UNet switched off")
    return fig
