"""Cross-attention: how the UNet reads the prompt, and the per-word maps it makes.

``AttentionStore`` records every cross-attention layer's (``attn2``) weights *through* the
installed attention processor (diffusers' own, a hypernetwork's, a LoRA's): forward hooks keep
the query and key the layer computes, and softmax(QK^T / sqrt(d)) of the conditional half is
kept, averaged over heads. Nothing is replaced or run twice: the image is bit-identical and
capture is cheap. ``word_maps`` turns the records into one map per token.

Also here: ``cross_attention_by_hand`` (notebook 04's hand computation), ``capture_io``,
where a word sits (``prompt_tokens``, ``token_indices``), whether an object's words' map
peaks inside it (``point_objects``; ``pointing_rate`` is the model card's figure), heatmaps,
and the checker of notebook 04's exercise.

Left out: self-attention maps (only cross-attention says which word goes where) and
prompt-to-prompt editing, which rewrites these maps instead of reading them.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from tqdm.auto import tqdm

from . import checks, figures, shapes
from .pipeline import generate
from .unet import record_calls

# ----------------------------------------------------------------------------- capture


class AttentionStore:
    """Records cross-attention maps of every ``attn2`` layer at every denoising step.

    Use as a context manager around a generation::

        with AttentionStore(pipe.unet) as store:
            image = pipe(prompt, ...).images[0]
        maps = store.word_maps()  # (T, 16, 16) averaged over heads, layers and steps

    ``guided=True`` expects the guidance batch ``[uncond, cond]`` and keeps the conditional
    half (with an odd batch, or ``guided=False``, every item). ``resolutions`` limits capture
    to layers of those sides (e.g. ``(16,)``; default: all). Each record is (layer, step,
    probs), probs (b, HW, T) head-averaged, on the CPU, in ``dtype`` (float16: real SD records
    hundreds of maps); ``keep_graph=True`` keeps them as made, gradient too, for a loss on the
    maps (notebook 12). Each further call of a layer is the next step; ``reset()`` forgets all.
    The same store entered again inside its block records once; the outer exit unhooks.

    Introduced in notebooks/04_text_and_cross_attention.ipynb.
    """

    def __init__(self, unet, guided: bool = True, resolutions=None, dtype=torch.float16,
                 keep_graph: bool = False):
        if not hasattr(unet, "attn_processors") or not hasattr(unet, "named_modules"):
            checks.fail("unet", unet, "expected a diffusers UNet2DConditionModel (pipe.unet)")
        self.guided = checks.check_bool("guided", guided)
        if resolutions is not None:
            resolutions = tuple(checks.check_int("resolutions", r, 1, 1024) for r in resolutions)
        if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            checks.fail("dtype", dtype, "expected a torch floating dtype, e.g. torch.float16")
        self.keep_graph = checks.check_bool("keep_graph", keep_graph)
        self.unet, self.resolutions, self.dtype = unet, resolutions, dtype
        self.records: list[tuple[str, int, torch.Tensor]] = []  # (layer, step, (b, HW, T))
        self._calls, self._handles, self._depth = {}, [], 0  # layer -> calls; hooks; nesting

    def _hooks(self, name: str, attn) -> list:
        """One layer's hooks: keep the outputs of to_q and to_k; after the layer, record."""
        seen: dict = {}

        def keep(key):
            return lambda module, args, output: seen.__setitem__(key, output)

        def after(module, args, kwargs, output):
            ctx = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
            if ctx is not None and len(seen) == 2:  # without a context it is self-attention
                mask = kwargs.get("attention_mask", args[2] if len(args) > 2 else None)
                self._keep(name, attn, seen["query"], seen["key"], mask)
            seen.clear()

        return [attn.to_q.register_forward_hook(keep("query")),
                attn.to_k.register_forward_hook(keep("key")),
                attn.register_forward_hook(after, with_kwargs=True)]

    def _keep(self, name, attn, query, key, attention_mask):
        """softmax(q k^T * scale) averaged over heads, as AttnProcessor2_0 goes from q, k."""
        step = self._calls.get(name, 0)
        self._calls[name] = step + 1  # a skipped resolution still counts the step
        side = math.isqrt(query.shape[1])  # query (B, HW, inner), key (B, T, inner)
        if self.resolutions is not None and side not in self.resolutions:
            return
        b, h = key.shape[0], attn.heads
        cond = slice(b // 2, b) if self.guided and b % 2 == 0 else slice(0, b)
        d = key.shape[-1] // h
        q = query[cond].view(-1, query.shape[1], h, d).transpose(1, 2)  # (b, h, HW, d)
        k = key[cond].view(-1, key.shape[1], h, d).transpose(1, 2)  # (b, h, T, d)
        q = q if attn.norm_q is None else attn.norm_q(q)
        k = k if attn.norm_k is None else attn.norm_k(k)
        scores = q @ k.transpose(-1, -2) * attn.scale  # (b, h, HW, T)
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, key.shape[1], b)
            scores = scores + mask.view(b, h, -1, mask.shape[-1])[cond]
        probs = scores.float().softmax(-1).mean(1)  # (b, HW, T)
        self.records.append((name, step, probs if self.keep_graph else
                             probs.detach().to("cpu", self.dtype)))

    def reset(self):
        """Forget every record (the hooks stay on while inside the ``with`` block)."""
        self.records, self._calls = [], {}

    def __enter__(self):
        if self._depth == 0:  # entered again inside (nested): the hooks are on, once
            for name, module in self.unet.named_modules():
                if name.rsplit(".", 1)[-1] == "attn2" and isinstance(module, Attention):
                    self._handles += self._hooks(name, module)
        self._depth += 1
        return self

    def __exit__(self, *exc):  # on success, error or KeyboardInterrupt alike
        self._depth -= 1
        while self._depth == 0 and self._handles:
            self._handles.pop().remove()

    @property
    def layers(self) -> list[str]:
        """Names of the layers recorded, in the order the UNet ran them."""
        return list(dict.fromkeys(n for n, _, _ in self.records))

    @property
    def resolutions_seen(self) -> list[int]:
        """Sides of the recorded maps, largest first (toy: [16, 8, 4]; SD 1.5: [64, 32, 16, 8])."""
        return sorted({math.isqrt(p.shape[1]) for _, _, p in self.records}, reverse=True)

    @property
    def num_steps(self) -> int:
        """How many UNet calls were recorded (the denoising steps of one generation)."""
        return max((s + 1 for _, s, _ in self.records), default=0)

    def word_maps(self, size: int | None = None, layers=None, steps=None, item: int = 0,
                  resolution: int | None = None) -> torch.Tensor:
        """Attention maps per token, (T, size, size) float32.

        Each layer's (HW, T) map is reshaped to its side, resized bilinearly to ``size``
        (default: the largest recorded) and averaged over the chosen ``layers`` (names),
        ``steps`` (0 = the first, noisiest) and ``resolution`` (a side), default all. ``item``
        picks a prompt of a batch. Each pixel's weights over the tokens sum to 1.

        Introduced in notebooks/04_text_and_cross_attention.ipynb.
        """
        if not self.records:
            checks.fail("store", "no records", "run a generation inside `with "
                        "AttentionStore(pipe.unet) as store:` first")
        if layers is not None:
            layers = [checks.check_choice("layers", n, self.layers) for n in layers]
        if steps is not None:
            steps = [checks.check_int("steps", s, 0, self.num_steps - 1) for s in steps]
        if resolution is not None:
            checks.check_choice("resolution", resolution, self.resolutions_seen)
        recs = [(n, s, p) for n, s, p in self.records
                if (layers is None or n in layers) and (steps is None or s in steps)
                and (resolution is None or math.isqrt(p.shape[1]) == resolution)]
        if not recs:
            checks.fail("layers/steps", (layers, steps), "no record matches these layers and steps")
        item = checks.check_int("item", item, 0, recs[0][2].shape[0] - 1)
        size = max(self.resolutions_seen) if size is None else size
        size = checks.check_int("size", size, 1, 4096)
        acc = torch.zeros(recs[0][2].shape[2], size, size)
        for _, _, p in recs:
            side = math.isqrt(p.shape[1])
            m = p[item].detach().float().T.reshape(1, -1, side, side)  # (1, T, side, side)
            acc += F.interpolate(m, size=(size, size), mode="bilinear", align_corners=False)[0]
        return acc / len(recs)


@contextlib.contextmanager
def capture_io(module):
    """Keep the inputs and output of every call of an attention layer ``module``.

    Yields a list that holds, at the end of the block (also after an error), one dict per
    call: ``hidden_states``, ``encoder_hidden_states`` (None for self-attention) and
    ``output``, all detached: notebook 03's ``unet.record_calls`` with the tensors named as
    an attention layer takes them.

    Introduced in notebooks/04_text_and_cross_attention.ipynb.
    """
    if not isinstance(module, torch.nn.Module):
        checks.fail("module", module, "expected a torch.nn.Module, e.g. a UNet's attn2 layer")
    calls: list[dict] = []
    with record_calls(module) as raw:
        try:
            yield calls
        finally:
            for call in raw:
                args, kwargs = call["args"], call["kwargs"]
                ctx = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
                calls.append({"hidden_states": args[0] if args else kwargs["hidden_states"],
                              "encoder_hidden_states": ctx, "output": call["output"]})


@torch.no_grad()
def cross_attention_by_hand(attn, hidden_states, encoder_hidden_states):
    """One diffusers ``Attention`` layer written out: returns (output, probs).

    Q = to_q(x), K = to_k(ctx), V = to_v(ctx), split into heads; probs = softmax(Q K^T /
    sqrt(d)) per head, (B, heads, HW, T); output = to_out(probs V with heads joined). The
    layer must be a plain one like SD's attn2 (no group norm, no residual inside).

    Introduced in notebooks/04_text_and_cross_attention.ipynb.
    """
    if not isinstance(attn, Attention) or any(
            getattr(attn, f) is not None for f in ("group_norm", "spatial_norm", "norm_q", "norm_k")
    ) or attn.norm_cross or attn.residual_connection or attn.rescale_output_factor != 1:
        checks.fail("attn", type(attn).__name__, "expected a plain diffusers Attention layer "
                                                 "like SD's attn2 (no norms, no residual)")
    for name, x in (("hidden_states", hidden_states), ("encoder_hidden_states",
                                                        encoder_hidden_states)):
        if not torch.is_tensor(x) or x.ndim != 3:
            checks.fail(name, x, "expected a tensor (B, N, C): N pixels or N tokens")
    b, h = hidden_states.shape[0], attn.heads
    q = attn.to_q(hidden_states)  # (B, HW, h*d)
    k, v = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)  # (B, T, h*d)
    d = q.shape[-1] // h
    q, k, v = (x.view(b, -1, h, d).transpose(1, 2) for x in (q, k, v))  # (B, h, HW or T, d)
    probs = (q @ k.transpose(-1, -2) / math.sqrt(d)).softmax(-1)  # (B, h, HW, T)
    out = (probs @ v).transpose(1, 2).reshape(b, -1, h * d)  # (B, HW, h*d)
    return attn.to_out[1](attn.to_out[0](out)), probs


# ----------------------------------------------------------------------------- tokens


def prompt_tokens(tokenizer, prompt: str) -> list[str]:
    """The prompt's tokens as readable strings, start and end tokens included (CLIP marks a
    word's end with ``</w>``; it is dropped here, pieces of a word keep no mark).

    Introduced in notebooks/04_text_and_cross_attention.ipynb.
    """
    checks.check_prompt(prompt, tokenizer, allow_empty=True, known_words_only=False)
    ids = tokenizer(prompt).input_ids
    return [t.replace("</w>", "") for t in tokenizer.convert_ids_to_tokens(ids)]


def token_indices(tokenizer, prompt: str, word: str) -> list[int]:
    """Positions (start token = 0) of the tokens of ``word`` (a word or a phrase) in the
    tokenized prompt, first occurrence; a word split into pieces gives several positions.

    Introduced in notebooks/04_text_and_cross_attention.ipynb.
    """
    checks.check_prompt(prompt, tokenizer, known_words_only=False)
    checks.check_prompt(word, tokenizer, name="word", known_words_only=False)
    ids = tokenizer(prompt).input_ids
    target = tokenizer(word, add_special_tokens=False).input_ids
    for i in range(1, len(ids) - len(target) + 1):
        if ids[i:i + len(target)] == target:
            return list(range(i, i + len(target)))
    checks.fail("word", word, f"expected a word of the prompt {prompt!r}, whose tokens are "
                              f"{prompt_tokens(tokenizer, prompt)[1:-1]}")


# ----------------------------------------------------------------------------- pointing


def _maps(maps, name: str = "maps", shape: str = "(T, h, w)") -> torch.Tensor:
    """Finite word maps of this shape ((T, h, w), or one map (H, W)) as a float32 tensor."""
    m = torch.as_tensor(np.asarray(maps, dtype=np.float32))
    if m.ndim != shape.count(",") + 1 or not torch.isfinite(m).all():
        checks.fail(name, f"array of shape {tuple(m.shape)}", f"expected finite maps {shape}")
    return m


def peak_inside(word_map: torch.Tensor | np.ndarray, mask: np.ndarray) -> bool:
    """True when the map's maximum, resized to the mask's size, falls inside the mask.

    Introduced in notebooks/04_text_and_cross_attention.ipynb.
    """
    m, mask = _maps(word_map, "word_map", "(H, W)"), np.asarray(mask)
    if mask.ndim != 2 or mask.dtype not in (np.bool_, np.uint8):
        checks.fail("mask", f"array of shape {mask.shape}, dtype {mask.dtype}",
                    "expected a (H, W) bool mask, e.g. shapes.find_blobs(image)[0].mask")
    m = _upsample(m[None], mask.shape)[0]
    y, x = np.unravel_index(int(m.argmax()), mask.shape)
    return bool(mask[y, x])


def point_objects(image, maps, prompt: str, tokenizer) -> list[dict]:
    """For each object of a shapes-world prompt that the checker finds (right colour and
    shape), whether the attention of its colour and shape words peaks inside its blob.

    ``maps`` (T, h, w) from ``AttentionStore.word_maps``; an object's map is the mean of
    its colour and shape tokens' maps. Returns one dict per found object: ``obj``,
    ``indices``, ``map`` (h, w), ``mask`` (64, 64) bool (the checker's blob), ``hit``.

    Introduced in notebooks/04_text_and_cross_attention.ipynb.
    """
    arr = (checks.check_image(image) * 255).round().astype(np.uint8)
    maps = _maps(maps)
    blobs = shapes.find_blobs(arr)
    out = []
    for sc in shapes.score_image(arr, prompt):
        if not sc.colour_shape:
            continue
        blob = [b for b in blobs if b.colour == sc.obj.colour and b.shape == sc.obj.shape][0]
        start = token_indices(tokenizer, prompt, sc.obj.phrase)[0]
        idx = [start + 1, start + 2]  # 'a' <colour> <shape>
        m = maps[idx].mean(0)
        out.append({"obj": sc.obj, "indices": idx, "map": m, "mask": blob.mask,
                    "hit": peak_inside(m, blob.mask)})
    return out


def collect_pointing(pipe, prompts, seeds, num_inference_steps: int | None = None,
                     guidance_scale: float | None = None) -> list[dict]:
    """Generate each prompt with its seed (``pipeline.generate``, one image at a time) under
    an ``AttentionStore`` and point its objects (``point_objects``).

    Returns one dict per prompt: ``prompt``, ``seed``, ``image`` (64, 64, 3) uint8, ``maps``
    (T, 16, 16) and ``objects`` (``point_objects``' list), with a progress bar.

    Introduced in notebooks/04_text_and_cross_attention.ipynb.
    """
    prompts, seeds = checks.check_list("prompts", prompts), checks.check_list("seeds", seeds)
    if len(prompts) != len(seeds):
        checks.fail("seeds", seeds, f"expected one seed per prompt ({len(prompts)} prompts)")
    out = []
    for p, s in tqdm(list(zip(prompts, seeds, strict=True)), desc="generating with capture"):
        with AttentionStore(pipe.unet) as store:
            im = np.asarray(generate(pipe, p, s, num_inference_steps, guidance_scale))  # uint8
        maps = store.word_maps()  # (T, 16, 16)
        out.append({"prompt": p, "seed": s, "image": im, "maps": maps,
                    "objects": point_objects(im, maps, p, pipe.tokenizer)})
    return out


def pointing_rate(pipe, prompts, seeds, num_inference_steps: int | None = None,
                  guidance_scale: float | None = None) -> dict:
    """The model card's attention figure: of the objects the checker finds in the images of
    ``prompts`` (one seed each), the share whose colour-and-shape words' map (averaged over
    heads, layers and steps) peaks inside the object's blob (``collect_pointing``). Returns
    ``attention_pointing`` (0.0 if none found) and ``attention_objects`` (how many), and the
    same for one- and two-object prompts apart (``attention_pointing_one``, ``..._two``).

    Introduced in notebooks/04_text_and_cross_attention.ipynb.
    """
    out: dict = {}
    found = {1: [], 2: []}
    for r in collect_pointing(pipe, prompts, seeds, num_inference_steps, guidance_scale):
        found[len(shapes.parse_caption(r["prompt"]))] += [o["hit"] for o in r["objects"]]
    for key, hits in (("", found[1] + found[2]), ("_one", found[1]), ("_two", found[2])):
        out[f"attention_pointing{key}"] = sum(hits) / max(len(hits), 1)
        out[f"attention_objects{key}"] = len(hits)
    return out


# ----------------------------------------------------------------------------- pictures


def _grid(cells, cols: int, title=None, row_titles=None, col_titles=None):
    """Pictures in rows of ``cols`` (``figures.image_grid``: borders, labels, large enough):
    each cell (image, map (H, W) or None, label over it) is the image with the map over it
    as a heatmap, scaled to its own max. Returns the figure."""
    rows = [cells[i:i + cols] for i in range(0, len(cells), cols)]
    fig = figures.image_grid([[c[0] for c in r] for r in rows], [[c[2] for c in r] for r in rows],
                             row_titles=row_titles, col_titles=col_titles, title=title,
                             labels_above=True)
    for ax, (_, m, _) in zip(fig.axes, cells):
        if m is not None:
            ax.imshow((m / m.max().clamp_min(1e-12)).numpy(), cmap="jet", alpha=0.55, vmin=0,
                      vmax=1)
    return fig


def _upsample(maps, size) -> torch.Tensor:
    """Maps (N, h, w) resized bilinearly to ``size`` (H, W)."""
    return F.interpolate(maps[None], size=size, mode="bilinear", align_corners=False)[0]


def show_word_maps(image, maps, tokens, skip_special: bool = True, cols: int = 8, title=None):
    """The image, then one heatmap per token over it (each map scaled to its own max).

    ``maps`` (T, h, w) from ``AttentionStore.word_maps``; ``tokens`` the labels of the first
    ``len(tokens)`` maps (``prompt_tokens(tokenizer, prompt)``). Start and end tokens are
    left out unless ``skip_special=False``. Returns the matplotlib figure.

    Introduced in notebooks/04_text_and_cross_attention.ipynb.
    """
    img, maps = checks.check_image(image), _maps(maps)
    if not isinstance(tokens, (list, tuple)) or not tokens or len(tokens) > maps.shape[0]:
        checks.fail("tokens", tokens, f"expected a list of 1 to {maps.shape[0]} token labels")
    checks.check_int("cols", cols, 1, 32)
    special = ("<|startoftext|>", "<|endoftext|>")
    up = _upsample(maps, img.shape[:2])
    shown = [(i, t) for i, t in enumerate(tokens) if not (skip_special and t in special)]
    cells = [(img, None, "image")] + [(img, up[i], f"{i}: {t}") for i, t in shown]
    return _grid(cells, min(cols, len(cells), int(figures.MAX_WIDTH_IN // figures.MIN_THUMB_IN)),
                 title)


def show_map_rows(image, rows: dict, tokens, indices):
    """A table of heatmaps over the image: one row per entry of ``rows`` (label -> (T, h, w)
    maps, e.g. one per resolution or per part of the denoising), one column per token index
    in ``indices``. Each map is scaled to its own max. Returns the matplotlib figure.

    Introduced in notebooks/04_text_and_cross_attention.ipynb.
    """
    img = checks.check_image(image)
    if not isinstance(rows, dict) or not rows:
        checks.fail("rows", rows, "expected a dict label -> (T, h, w) maps")
    indices = [checks.check_int("indices", i, 0, len(tokens) - 1) for i in indices]
    cells = []
    for label, maps in rows.items():
        up = _upsample(_maps(maps, f"rows[{label!r}]")[indices], img.shape[:2])
        cells += [(img, None, None)] + [(img, m, None) for m in up]
    return _grid(cells, len(indices) + 1, row_titles=[str(k) for k in rows],
                 col_titles=["image"] + [f"{i}: {tokens[i]}" for i in indices])


def show_pointing(results, max_objects: int = 8):
    """Objects from ``collect_pointing``: the image with the checker's blob outlined (white)
    and the peak of the object's attention map (a cross: green inside, red outside).

    Introduced in notebooks/04_text_and_cross_attention.ipynb.
    """
    checks.check_int("max_objects", max_objects, 1, 64)
    objs = [(r, o) for r in results for o in r["objects"]][:max_objects]
    if not objs:
        checks.fail("results", "no objects", "expected results with objects the checker found")
    ups = [_upsample(o["map"][None].float(), o["mask"].shape)[0] for _, o in objs]
    fig = _grid([(r["image"], m, f"{o['obj'].colour} {o['obj'].shape}")
                 for (r, o), m in zip(objs, ups, strict=True)],
                min(len(objs), int(figures.MAX_WIDTH_IN // figures.MIN_THUMB_IN)),
                title="peak of each object's word map (green x: inside its blob)")
    for ax, (_, o), m in zip(fig.axes, objs, ups, strict=True):
        y, x = np.unravel_index(int(m.argmax()), o["mask"].shape)
        ax.contour(o["mask"], levels=[0.5], colors="white", linewidths=1)
        ax.plot(x, y, "x", color="lime" if o["hit"] else "red", markersize=10, mew=3)
    return fig


# ----------------------------------------------------------------------------- exercises


def _verdict(ok: bool, text: str) -> bool:
    """The checkers' one convention: say what is right or wrong, return True or False."""
    print(text)
    return ok


def check_head_weights(answer, attn, hidden_states, encoder_hidden_states, head: int,
                       atol: float = 1e-5) -> bool:
    """Checker of notebook 04's exercise: one head's attention weights softmax(Q K^T / sqrt(d)),
    (HW, T), for item 0 of the batch. ``answer`` is a tensor, or a function ``answer(attn,
    hidden_states, encoder_hidden_states, head)`` that computes it, tried on these inputs and
    on random ones of the same shapes (so a copy of one result does not pass). Prints what is
    right or wrong, with a hint, and returns True or False; a wrong answer (of any type, or a
    function that raises) never raises. None, or a function returning None: not solved yet.

    Introduced in notebooks/04_text_and_cross_attention.ipynb.
    """
    head = checks.check_int("head", head, 0, attn.heads - 1)
    cases = [(hidden_states, encoder_hidden_states)]
    if callable(answer):
        g = torch.Generator().manual_seed(0)
        cases.append(tuple(torch.randn(x.shape, generator=g) for x in cases[0]))
    for i, (x, ctx) in enumerate(cases):
        want = cross_attention_by_hand(attn, x, ctx)[1][0, head]  # (HW, T)
        got, where = answer, " on random inputs" if i else ""
        if callable(answer):
            try:
                with torch.no_grad():
                    got = answer(attn, x, ctx, head)
            except Exception as e:  # the learner's code: report it, do not stop the notebook
                return _verdict(False, f"Not quite: your function raised{where} "
                                       f"{type(e).__name__}: {e}")
        if got is None:
            return _verdict(False, f"Exercise not solved yet: return a tensor of shape "
                                   f"{tuple(want.shape)} (pixels x tokens).")
        try:
            got = torch.as_tensor(got, dtype=torch.float32).detach()
        except (TypeError, ValueError, RuntimeError):
            return _verdict(False, f"Not quite: expected a tensor of shape "
                                   f"{tuple(want.shape)}, got {type(got).__name__}.")
        if got.shape != want.shape:
            return _verdict(False, f"Not quite: expected shape {tuple(want.shape)} (pixels x "
                                   f"tokens), got {tuple(got.shape)}.")
        if not torch.allclose(got.sum(-1), torch.ones(want.shape[0]), atol=1e-4):
            return _verdict(False, "Not quite: each row (one pixel) should sum to 1 over the "
                                   "tokens: did you take the softmax over the last axis?")
        err = (got - want).abs().max().item()
        if err > atol:
            d = attn.to_q.out_features // attn.heads
            return _verdict(False, f"Not quite: max difference {err:.3g}{where}. Did you "
                                   f"scale by 1/sqrt(d) with d = {d}, the head's size, not the "
                                   f"layer's width? And take head {head}'s slice of Q and K "
                                   f"(channels {head * d} to {(head + 1) * d - 1})?")
    return _verdict(True, f"Correct: head {head}'s weights match"
                          + (" on the layer's inputs and on random ones." if len(cases) > 1
                             else "."))
