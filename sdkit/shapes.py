"""The world of shapes: the images and captions the kit's own Stable Diffusion learns from.

Each picture is 64x64 RGB: one or two flat-coloured shapes on a pale background with a
gentle colour gradient, with an English caption such as ``a red circle on the left`` or
``a blue square at the top and a green triangle at the bottom``, and one mask per shape.
Everything is deterministic by seed and drawn with numpy in a fraction of a millisecond.

The module also holds the *checker*: a deterministic pixel reader that finds the coloured
blobs in an image and reads colour, shape and position back. It scores generated images
against their prompts (notebooks 02-12 and ``python -m sdkit.evaluation``).

A function here whose docstring names no notebook serves the other sdkit modules only;
no notebook calls it directly.

Left out on purpose: rotation, occlusion, textures, more than two objects. The colour
``purple`` and the shape ``star`` can be drawn but are never used in training, so that the
fine-tuning notebook has something genuinely new to teach.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull

from . import checks

SIZE = 64  # image side in pixels

# RGB of each colour; purple is drawn but never trained on.
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 165, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 200, 20),
    "purple": (150, 60, 200),
}
SHAPES = ("circle", "square", "triangle", "star")  # star is never trained on
TRAIN_COLOURS = ("red", "green", "blue", "yellow")
TRAIN_SHAPES = ("circle", "square", "triangle")

# Where each position puts the centre of a shape, in pixels (x, y).
POSITIONS = {
    "left": (16, 32),
    "right": (48, 32),
    "top": (32, 16),
    "bottom": (32, 48),
    "center": (32, 32),
}
PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
PAIRS = (("left", "right"), ("top", "bottom"))  # the layouts of a two-shape picture
JITTER = 3  # pixels of random offset around the anchor
HALF_SIZES = (9, 12)  # a shape's half-width is drawn from this range (inclusive)
SUPERSAMPLE = 4  # anti-aliasing: shapes are drawn at 4x and averaged down
HOLDOUT_EVERY = 10  # every 10th two-shape caption is never shown in training
MAX_DATASET = 200_000  # pictures per call: 200,000 x 12 KiB = 2.3 GiB of uint8


@dataclass(frozen=True)
class Obj:
    """One shape in a scene: its colour, shape and position words.

    Introduced in notebooks/05_vae_latents.ipynb.
    """

    colour: str
    shape: str
    position: str

    @property
    def phrase(self) -> str:
        return f"a {self.colour} {self.shape} {PHRASES[self.position]}"


@dataclass
class Example:
    """A drawn scene: ``image`` (64, 64, 3) uint8, its ``caption``, ``objects`` and ``masks``
    (one (64, 64) bool array per object, in caption order)."""

    image: np.ndarray
    caption: str
    objects: tuple[Obj, ...]
    masks: tuple[np.ndarray, ...]


def caption_of(objects) -> str:
    """The caption of a scene: its objects' phrases joined by ``and``, in the given order."""
    objects = tuple(objects)
    if len(objects) not in (1, 2):
        checks.fail("objects", objects, "expected a scene of 1 or 2 objects")
    return " and ".join(o.phrase for o in objects)


_PHRASE_RE = re.compile(
    r"^a (?P<colour>\w+) (?P<shape>\w+) (?P<where>on the left|on the right|at the top|"
    r"at the bottom|in the center)$"
)
_WHERE = {v: k for k, v in PHRASES.items()}


def parse_caption(caption: str) -> tuple[Obj, ...]:
    """Read the objects back from a caption of the shapes grammar.

    ``parse_caption("a red circle on the left")`` -> ``(Obj('red', 'circle', 'left'),)``.
    Raises ValueError naming the caption when it is not of the grammar.

    Introduced in notebooks/11_image_variations.ipynb.
    """
    if not isinstance(caption, str):
        checks.fail("caption", caption, "expected a str")
    objects = []
    for part in caption.strip().split(" and "):
        m = _PHRASE_RE.match(part.strip())
        if not m or m["colour"] not in COLOURS or m["shape"] not in SHAPES:
            checks.fail("caption", caption,
                        "expected the shapes grammar: phrases like 'a <colour> <shape> "
                        f"<position>' joined by ' and ', with colour in {sorted(COLOURS)}, "
                        f"shape in {list(SHAPES)}, position in {list(PHRASES.values())}")
        objects.append(Obj(m["colour"], m["shape"], _WHERE[m["where"]]))
    if len(objects) > 2:
        checks.fail("caption", caption, f"expected at most 2 objects, got {len(objects)}")
    return tuple(objects)


def all_captions(colours=TRAIN_COLOURS, shapes=TRAIN_SHAPES) -> list[str]:
    """Every caption of the grammar for these colours and shapes (singles, then pairs).

    Pairs name two different (colour, shape) objects, in either order.
    """
    kinds = list(itertools.product(colours, shapes))
    captions = [caption_of([Obj(c, s, p)]) for c, s in kinds for p in POSITIONS]
    for (c1, s1), (c2, s2) in itertools.permutations(kinds, 2):
        for a, b in PAIRS:
            captions.append(caption_of([Obj(c1, s1, a), Obj(c2, s2, b)]))
            captions.append(caption_of([Obj(c1, s1, b), Obj(c2, s2, a)]))
    return captions


def _shape_mask(shape: str, cx: float, cy: float, h: float) -> np.ndarray:
    """Coverage in [0, 1] of a shape centred at (cx, cy) with half-size h, (64, 64)."""
    # only the pixels of a window around the shape are sampled, at 4x4 sub-pixel centres
    x0, x1 = max(int(cx - h) - 2, 0), min(int(cx + h) + 3, SIZE)
    y0, y1 = max(int(cy - h) - 2, 0), min(int(cy + h) + 3, SIZE)
    gx = x0 + (np.arange((x1 - x0) * SUPERSAMPLE) + 0.5) / SUPERSAMPLE
    gy = y0 + (np.arange((y1 - y0) * SUPERSAMPLE) + 0.5) / SUPERSAMPLE
    x, y = np.meshgrid(gx, gy)  # (4*window_h, 4*window_w)
    dx, dy = x - cx, y - cy
    if shape == "circle":
        inside = dx**2 + dy**2 <= h**2
    elif shape == "square":
        s = 0.85 * h  # a square of the same half-width looks bigger than the others
        inside = (np.abs(dx) <= s) & (np.abs(dy) <= s)
    elif shape == "triangle":
        # upright triangle: apex (0, -h), base from (-h, h) to (h, h)
        t = (dy + h) / (2 * h)  # 0 at the apex, 1 at the base
        inside = (dy <= h) & (dy >= -h) & (np.abs(dx) <= t * h)
    elif shape == "star":
        r = np.hypot(dx, dy)
        a = np.arctan2(dx, -dy)  # 0 pointing up
        k = 5
        seg = np.mod(a, 2 * np.pi / k) - np.pi / k  # angle from the nearest spike's bisector
        r_in = 0.45 * h
        # boundary between spike tip (radius h at seg=+-pi/k) and inner vertex (r_in at seg=0)
        phi = np.pi / k
        # line from inner vertex (r_in, 0) to tip (h, phi) in polar coordinates
        p1 = np.array([r_in, 0.0])
        p2 = np.array([h * np.cos(phi), h * np.sin(phi)])
        u, v = r * np.cos(np.abs(seg)), r * np.sin(np.abs(seg))
        cross = (p2[0] - p1[0]) * (v - p1[1]) - (p2[1] - p1[1]) * (u - p1[0])
        inside = (cross >= 0) & (r <= h)
    else:
        checks.check_choice("shape", shape, SHAPES)
    cov = np.zeros((SIZE, SIZE), np.float32)
    cov[y0:y1, x0:x1] = inside.reshape(y1 - y0, SUPERSAMPLE, x1 - x0, SUPERSAMPLE).mean(axis=(1, 3))
    return cov


def world_words() -> list[str]:
    """The words of the training captions: the toy tokenizer makes each a single token.

    Introduced in notebooks/04_text_and_cross_attention.ipynb.
    """
    words = set()
    for cap in all_captions():
        words.update(cap.split())
    return sorted(words)


def heldout_captions() -> set[str]:
    """Two-shape captions kept out of training (every ``HOLDOUT_EVERY``-th), to test
    composition on prompts the model never saw.

    Introduced in notebooks/12_training_from_scratch.ipynb.
    """
    pairs = [c for c in all_captions() if " and " in c]
    return set(pairs[::HOLDOUT_EVERY])


def eval_prompts(n: int, seed: int = 1234) -> list[str]:
    """``n`` evaluation prompts: half one-shape, half two-shape; half of the two-shape ones
    are captions never shown in training. Sampled with a fixed seed.

    Introduced in notebooks/04_text_and_cross_attention.ipynb.
    """
    n = checks.check_int("n", n, 2, 10_000)
    rng = np.random.default_rng(checks.check_seed(seed))
    caps = all_captions()
    held = heldout_captions()
    singles = [c for c in caps if " and " not in c]
    held_pairs = sorted(held)
    seen_pairs = [c for c in caps if " and " in c and c not in held]
    n1, n2 = n // 2, n - n // 2

    def pick(pool, k):
        return [pool[i] for i in rng.integers(0, len(pool), k)]

    return pick(singles, n1) + pick(held_pairs, n2 // 2) + pick(seen_pairs, n2 - n2 // 2)


def render(objects, seed: int) -> Example:
    """Draw a scene of these objects; ``seed`` fixes the background, jitter and sizes.

    Introduced in notebooks/05_vae_latents.ipynb.
    """
    objects = tuple(objects)
    for o in objects:
        checks.check_choice("colour", o.colour, sorted(COLOURS))
        checks.check_choice("shape", o.shape, SHAPES)
        checks.check_choice("position", o.position, POSITIONS)
    caption = caption_of(objects)  # checks the count
    rng = np.random.default_rng(seed)
    # pale background: a random light tint plus a gentle linear gradient
    base = rng.uniform(225, 250, size=3)
    gx, gy = rng.uniform(-10, 10, size=2)
    ramp = np.linspace(-0.5, 0.5, SIZE)
    img = base[None, None, :] + gx * ramp[None, :, None] + gy * ramp[:, None, None]
    img = np.broadcast_to(img, (SIZE, SIZE, 3)).astype(np.float32).copy()
    masks = []
    for o in objects:
        ax, ay = POSITIONS[o.position]
        cx, cy = ax + rng.uniform(-JITTER, JITTER), ay + rng.uniform(-JITTER, JITTER)
        h = rng.uniform(*HALF_SIZES)
        cov = _shape_mask(o.shape, cx, cy, h)[..., None]  # (64, 64, 1)
        img = img * (1 - cov) + np.asarray(COLOURS[o.colour], np.float32) * cov
        masks.append(cov[..., 0] >= 0.5)
    image = np.clip(np.round(img), 0, 255).astype(np.uint8)
    return Example(image, caption, objects, tuple(masks))


def random_objects(rng: np.random.Generator, colours=TRAIN_COLOURS, shapes=TRAIN_SHAPES,
                   n_objects: int | None = None) -> tuple[Obj, ...]:
    """Draw one scene description: 1 or 2 objects, distinct (colour, shape) pairs."""
    n = int(rng.integers(1, 3)) if n_objects is None else n_objects
    kinds = list(itertools.product(colours, shapes))
    if n == 1:
        c, s = kinds[rng.integers(len(kinds))]
        return (Obj(c, s, list(POSITIONS)[rng.integers(len(POSITIONS))]),)
    i, j = rng.choice(len(kinds), size=2, replace=False)
    a, b = PAIRS[rng.integers(len(PAIRS))]
    if rng.random() < 0.5:
        a, b = b, a
    (c1, s1), (c2, s2) = kinds[i], kinds[j]
    return (Obj(c1, s1, a), Obj(c2, s2, b))


def make_example(seed: int, colours=TRAIN_COLOURS, shapes=TRAIN_SHAPES,
                 n_objects: int | None = None) -> Example:
    """One random scene, fully determined by ``seed``.

    Introduced in notebooks/01_forward_noising.ipynb.
    """
    seed = checks.check_seed(seed)
    if n_objects is not None:
        checks.check_choice("n_objects", n_objects, (1, 2))
    rng = np.random.default_rng([int(seed), 1])
    objects = random_objects(rng, colours, shapes, n_objects)
    return render(objects, seed=int(seed))


def make_dataset(n: int, seed: int = 0, **kwargs):
    """``n`` examples from consecutive seeds: images (n, 64, 64, 3) uint8 and captions.

    Introduced in notebooks/05_vae_latents.ipynb.
    """
    n = checks.check_int("n", n, 1, MAX_DATASET)
    examples = [make_example(seed + i, **kwargs) for i in range(n)]
    return np.stack([e.image for e in examples]), [e.caption for e in examples]


# ----------------------------------------------------------------------------- the checker


@dataclass(frozen=True)
class Blob:
    """A coloured region found by the checker."""

    colour: str
    shape: str
    position: str
    area: int
    centre: tuple[float, float]  # (x, y) of the bounding box centre
    mask: np.ndarray = field(repr=False, compare=False, default=None)  # (H, W) bool


def _to_uint8_rgb(image) -> np.ndarray:
    """Accept a PIL image, a (64, 64, 3) uint8 array or a float array in [0, 1]."""
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        checks.fail("image", f"array of shape {arr.shape}", "expected an RGB image (H, W, 3)")
    if arr.dtype != np.uint8:
        # check_image refuses floats outside [0, 1]
        arr = (checks.check_image(arr) * 255).round().astype(np.uint8)
    return arr


def find_blobs(image, min_area: int = 20) -> list[Blob]:
    """Find the coloured shapes in an image and read colour, shape and position of each.

    A pixel belongs to a shape when it is saturated (the background is pale grey-ish);
    it takes the nearest palette colour; connected regions of one colour are blobs.
    Shape comes from how much of its bounding box a blob fills (square ~1, circle ~0.79,
    triangle ~0.5) and from its solidity (a star is far from convex); position is the
    nearest anchor to the blob's bounding-box centre, in a 64-pixel frame.

    Introduced in notebooks/09_inpainting_and_outpainting.ipynb.
    """
    arr = _to_uint8_rgb(image).astype(np.int32)
    h, w, _ = arr.shape
    sat = arr.max(axis=2) - arr.min(axis=2)
    fg = sat >= 70
    names = list(COLOURS)
    pal = np.array([COLOURS[c] for c in names], np.int32)  # (K, 3)
    dist = ((arr[:, :, None, :] - pal[None, None]) ** 2).sum(-1)  # (H, W, K)
    nearest = dist.argmin(-1)
    blobs = []
    sx, sy = SIZE / w, SIZE / h
    for k, name in enumerate(names):
        lab, n = ndimage.label(fg & (nearest == k))
        for i in range(1, n + 1):
            m = lab == i
            area = int(m.sum())
            if area < min_area * (h * w) / SIZE**2:
                continue
            ys, xs = np.nonzero(m)
            x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
            extent = area / ((x1 - x0) * (y1 - y0))
            cx, cy = (x0 + x1) / 2 * sx, (y0 + y1) / 2 * sy
            if extent > 0.9:
                shape = "square"
            elif extent > 0.66:
                shape = "circle"
            else:
                # triangle vs star: a triangle is convex, a star is not
                solid = _solidity(m[y0:y1, x0:x1])
                shape = "triangle" if solid > 0.8 else "star"
            pos = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2
                      + (POSITIONS[p][1] - cy) ** 2)
            blobs.append(Blob(name, shape, pos, area, (float(cx), float(cy)), m))
    blobs.sort(key=lambda b: -b.area)
    return blobs


def _solidity(m: np.ndarray) -> float:
    """Area of a mask over the area of its convex hull: ~1 for a triangle, ~0.6 for a star."""
    ys, xs = np.nonzero(m)
    corners = np.concatenate([np.stack([xs + dx, ys + dy], 1) for dx in (0, 1) for dy in (0, 1)])
    try:
        hull_area = ConvexHull(corners).volume  # in 2-D, "volume" is the area
    except Exception:  # degenerate (a line of pixels)
        return 1.0
    return float(m.sum() / hull_area)


@dataclass(frozen=True)
class ObjectScore:
    """How well one object of a prompt appears in an image."""

    obj: Obj
    found: Blob | None  # the blob matched to it (same colour, largest), or None
    colour_shape: bool  # a blob of the right colour and shape exists
    all_attributes: bool  # ... and it is at the right position


def score_image(image, caption_or_objects) -> list[ObjectScore]:
    """Score an image against the objects of a caption: one ObjectScore per object.

    For each object, the blobs of its colour are looked at; the object counts as
    ``colour_shape`` right when one of them has its shape, and ``all_attributes`` right
    when one of them has its shape and position.

    Introduced in notebooks/05_vae_latents.ipynb.
    """
    objects = (parse_caption(caption_or_objects) if isinstance(caption_or_objects, str)
               else tuple(caption_or_objects))
    blobs = find_blobs(image)
    scores = []
    for o in objects:
        same = [b for b in blobs if b.colour == o.colour]
        shaped = [b for b in same if b.shape == o.shape]
        placed = [b for b in shaped if b.position == o.position]
        found = (placed or shaped or same or [None])[0]
        scores.append(ObjectScore(o, found, bool(shaped), bool(placed)))
    return scores


def prompt_correct(image, caption) -> bool:
    """True when every object of the caption is in the image with every attribute right.

    Introduced in notebooks/02_reverse_denoising.ipynb.
    """
    return all(s.all_attributes for s in score_image(image, caption))


def hits(images, captions, criterion: str = "all_attributes") -> list[bool]:
    """One verdict per image: is every object of its caption there? ``criterion``:
    ``"colour_shape"`` (right colour and shape anywhere) or ``"all_attributes"`` (also at the
    right position). ``captions``: one caption for all images, or one per image.

    Introduced in notebooks/10_fine_tuning.ipynb.
    """
    images = checks.check_list("images", images)
    criterion = checks.check_choice("criterion", criterion, ("colour_shape", "all_attributes"))
    captions = checks.check_per_seed("captions", captions, len(images))
    return [all(getattr(s, criterion) for s in score_image(im, c))
            for im, c in zip(images, captions)]


def score_images(images, captions) -> dict:
    """The checker's figures for images against their prompts: the share of objects with the
    right colour and shape, and the share of one- and of two-shape prompts with every
    attribute right (NaN where there is no such prompt).

    Introduced in notebooks/12_training_from_scratch.ipynb.
    """
    images = checks.check_list("images", images)
    captions = checks.check_per_seed("captions", captions, len(images))
    obj_cs, one, two = [], [], []
    for im, c in zip(images, captions):
        sc = score_image(im, c)
        obj_cs += [s.colour_shape for s in sc]
        (one if len(sc) == 1 else two).append(all(s.all_attributes for s in sc))
    return {"objects_colour_shape": float(np.mean(obj_cs)),
            "one_shape_all_attributes": float(np.mean(one)) if one else float("nan"),
            "two_shape_all_attributes": float(np.mean(two)) if two else float("nan")}
