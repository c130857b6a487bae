"""Cross-attention: how the UNet reads the prompt, and the per-word maps it makes.

``AttentionStore`` installs a diffusers attention processor on every cross-attention
layer (``attn2``) of a UNet. The processor runs exactly the steps of diffusers' own
``AttnProcessor2_0`` (so capture cannot change the image: the output is bit-identical)
and, on the side, keeps softmax(QK^T / sqrt(d)) for the conditional half of the batch,
averaged over heads, from the same query and key it already computed (no projection is
run twice, so capture is cheap). ``word_maps`` turns the records into one map per token.

Also here: ``cross_attention_by_hand`` (the reference for notebook 03's hand computation),
``capture_io`` (a forward hook that keeps a layer's inputs and output), ``token_indices``
and ``prompt_tokens`` (where a word sits in the tokenized prompt), ``peak_inside`` and
``point_objects`` (does a word's map peak inside its shape?), ``show_word_maps`` (heatmaps
over the image) and the checkers of notebook 03's exercises.

Left out: self-attention maps (only cross-attention says which word goes where) and
prompt-to-prompt editing, which rewrites these maps instead of reading them.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0

from . import checks

# ----------------------------------------------------------------------------- capture


class _StoringProcessor(AttnProcessor2_0):
    """AttnProcessor2_0 that also records the cross-attention probabilities.

    The steps are AttnProcessor2_0's, in the same order, on the same tensors: the layer's
    output is bit-identical (tests/test_attention.py checks it). The only extra work is one
    small matmul and softmax on the conditional half, from the query and key already made.
    """

    def __init__(self, store: AttentionStore, name: str):
        super().__init__()
        self.store, self.name = store, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        if encoder_hidden_states is None or not self.store.active:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask,
                                    temb, *args, **kwargs)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = encoder_hidden_states.shape
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = mask.view(batch_size, attn.heads, -1, mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)  # (B, HW, inner)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)  # (B, T, inner)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (B, h, HW, d)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (B, h, T, d)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        self.store._keep(self.name, query, key, attention_mask, attn.scale)

        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(
                batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class AttentionStore:
    """Records cross-attention maps of every ``attn2`` layer at every denoising step.

    Use as a context manager around a generation::

        with AttentionStore(pipe.unet) as store:
            image = pipe(prompt, ...).images[0]
        maps = store.word_maps()  # (T, 16, 16) averaged over heads, layers and steps

    ``guided=True`` (the default) expects the pipeline's classifier-free-guidance batch
    ``[uncond, cond]`` and keeps the conditional half only (with an odd batch, or
    ``guided=False``, every item is kept). ``resolutions`` limits capture to layers of
    those sides (e.g. ``(16,)``; default: all). Each record is (layer, step, probs) with
    probs (b, HW, T) head-averaged, on the CPU, in ``dtype`` (float16 by default: a real
    SD generation records hundreds of maps). Each further call of the UNet counts as the
    next step; ``reset()`` forgets everything.

    Introduced in notebooks/03_text_and_cross_attention.ipynb.
    """

    def __init__(self, unet, guided: bool = True, resolutions=None, dtype=torch.float16):
        if not hasattr(unet, "attn_processors") or not hasattr(unet, "set_attn_processor"):
            checks.fail("unet", unet, "expected a diffusers UNet2DConditionModel (pipe.unet)")
        if not isinstance(guided, bool):
            checks.fail("guided", guided, "expected True or False")
        if resolutions is not None:
            resolutions = tuple(checks.check_int("resolutions", r, 1, 1024) for r in resolutions)
        if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            checks.fail("dtype", dtype, "expected a torch floating dtype, e.g. torch.float16")
        self.unet, self.guided, self.active = unet, guided, True
        self.resolutions, self.dtype = resolutions, dtype
        self.records: list[tuple[str, int, torch.Tensor]] = []  # (layer, step, (b, HW, T))
        self._calls: dict[str, int] = {}
        self._saved = None

    def cond_slice(self, batch: int) -> slice:
        return slice(batch // 2, batch) if self.guided and batch % 2 == 0 else slice(0, batch)

    def record(self, name: str, probs: torch.Tensor):
        step = self._calls.get(name, 0)
        self._calls[name] = step + 1
        self.records.append((name, step, probs))

    @torch.no_grad()
    def _keep(self, name, query, key, attention_mask, scale):
        """probs = softmax(q k^T * scale), averaged over heads, from the processor's q and k."""
        side = math.isqrt(query.shape[2])
        if self.resolutions is not None and side not in self.resolutions:
            self._calls[name] = self._calls.get(name, 0) + 1  # the step still counts
            return
        cond = self.cond_slice(query.shape[0])
        scores = query[cond] @ key[cond].transpose(-1, -2) * scale  # (b, h, HW, T)
        if attention_mask is not None:
            scores = scores + attention_mask[cond]
        probs = scores.float().softmax(-1).mean(1)  # (b, HW, T)
        self.record(name, probs.to("cpu", self.dtype))

    def reset(self):
        """Forget every record (the processors stay installed)."""
        self.records, self._calls = [], {}

    def __enter__(self):
        self._saved = self.unet.attn_processors
        procs = {n: (_StoringProcessor(self, n) if ".attn2." in n else p)
                 for n, p in self._saved.items()}
        self.unet.set_attn_processor(procs)
        return self

    def __exit__(self, *exc):
        self.unet.set_attn_processor(self._saved)
        return False

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

        Each layer's (HW, T) map is reshaped to its own resolution, resized bilinearly to
        ``size`` (default: the largest recorded) and averaged over the chosen ``layers``
        (names), ``steps`` (indices, 0 = the first, noisiest step) and ``resolution`` (a
        side, e.g. 8), default all. ``item`` picks a prompt of a batch. Every pixel's map
        over tokens sums to 1 (a softmax, and averages of softmaxes).

        Introduced in notebooks/03_text_and_cross_attention.ipynb.
        """
        if not self.records:
            checks.fail("store", "no records", "run a generation inside `with "
                        "AttentionStore(pipe.unet) as store:` before asking for word maps")
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
        batch = recs[0][2].shape[0]
        item = checks.check_int("item", item, 0, batch - 1)
        sides = [math.isqrt(p.shape[1]) for _, _, p in recs]
        largest = max(self.resolutions_seen)
        size = checks.check_int("size", size, 1, 4096) if size is not None else largest
        acc = torch.zeros(recs[0][2].shape[2], size, size)
        for (_, _, p), side in zip(recs, sides, strict=True):
            m = p[item].float().T.reshape(1, -1, side, side)  # (1, T, side, side)
            if side != size:
                m = F.interpolate(m, size=(size, size), mode="bilinear", align_corners=False)
            acc += m[0]
        return acc / len(recs)


@contextlib.contextmanager
def capture_io(module):
    """Keep the inputs and output of every call of ``module`` (a forward hook).

    Yields a list that fills with one dict per call: ``hidden_states`` (the first
    positional input), ``encoder_hidden_states`` (keyword input, None for self-attention)
    and ``output``, all detached. The hook is removed on leaving the ``with`` block.

    Introduced in notebooks/03_text_and_cross_attention.ipynb.
    """
    if not isinstance(module, torch.nn.Module):
        checks.fail("module", module, "expected a torch.nn.Module, e.g. a UNet's attn2 layer")
    calls: list[dict] = []

    def hook(mod, args, kwargs, output):
        x = args[0] if args else kwargs["hidden_states"]
        ctx = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        calls.append({"hidden_states": x.detach().clone(),
                      "encoder_hidden_states": None if ctx is None else ctx.detach().clone(),
                      "output": output.detach().clone()})

    handle = module.register_forward_hook(hook, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


@torch.no_grad()
def cross_attention_by_hand(attn, hidden_states, encoder_hidden_states):
    """One diffusers ``Attention`` layer written out: returns (output, probs).

    Q = to_q(x), K = to_k(ctx), V = to_v(ctx), split into heads; probs = softmax(Q K^T /
    sqrt(d)) per head, (B, heads, HW, T); output = to_out(probs V with heads joined). The
    layer must be a plain one like SD's attn2 (no group norm, no residual inside).

    Introduced in notebooks/03_text_and_cross_attention.ipynb.
    """
    for flag in ("group_norm", "spatial_norm", "norm_q", "norm_k"):
        if getattr(attn, flag, None) is not None:
            checks.fail("attn", type(attn).__name__, f"expected a plain layer (no {flag})")
    if attn.norm_cross or attn.residual_connection or attn.rescale_output_factor != 1:
        checks.fail("attn", type(attn).__name__, "expected a plain layer like SD's attn2")
    if not torch.is_tensor(hidden_states) or hidden_states.ndim != 3:
        checks.fail("hidden_states", hidden_states, "expected a tensor (B, HW, C)")
    if not torch.is_tensor(encoder_hidden_states) or encoder_hidden_states.ndim != 3:
        checks.fail("encoder_hidden_states", encoder_hidden_states, "expected a tensor (B, T, C)")
    b, h = hidden_states.shape[0], attn.heads
    q = attn.to_q(hidden_states)  # (B, HW, h*d)
    k, v = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)  # (B, T, h*d)
    d = q.shape[-1] // h
    q = q.view(b, -1, h, d).transpose(1, 2)  # (B, h, HW, d)
    k = k.view(b, -1, h, d).transpose(1, 2)  # (B, h, T, d)
    v = v.view(b, -1, h, d).transpose(1, 2)  # (B, h, T, d)
    probs = (q @ k.transpose(-1, -2) / math.sqrt(d)).softmax(-1)  # (B, h, HW, T)
    out = (probs @ v).transpose(1, 2).reshape(b, -1, h * d)  # (B, HW, h*d)
    return attn.to_out[1](attn.to_out[0](out)), probs


# ----------------------------------------------------------------------------- tokens


def prompt_tokens(tokenizer, prompt: str) -> list[str]:
    """The prompt's tokens as readable strings, start and end tokens included (CLIP marks a
    word's end with ``</w>``; it is dropped here, pieces of a word keep no mark).

    Introduced in notebooks/03_text_and_cross_attention.ipynb.
    """
    checks.check_prompt(prompt, tokenizer, allow_empty=True, known_words_only=False)
    ids = tokenizer(prompt).input_ids
    return [t.replace("</w>", "") for t in tokenizer.convert_ids_to_tokens(ids)]


def token_indices(tokenizer, prompt: str, word: str) -> list[int]:
    """Positions (start token = 0) of the tokens of ``word`` (one word or a phrase) in the
    tokenized prompt: the first occurrence. A word the tokenizer splits into pieces gives
    several positions.

    Introduced in notebooks/03_text_and_cross_attention.ipynb.
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


def _map2d(word_map, name="word_map") -> torch.Tensor:
    m = torch.as_tensor(np.asarray(word_map, dtype=np.float32))
    if m.ndim != 2 or not torch.isfinite(m).all():
        checks.fail(name, f"array of shape {tuple(m.shape)}", "expected one finite (H, W) map")
    return m


def peak_inside(word_map: torch.Tensor | np.ndarray, mask: np.ndarray) -> bool:
    """True when the map's maximum, resized to the mask's size, falls inside the mask.

    Introduced in notebooks/03_text_and_cross_attention.ipynb.
    """
    m = _map2d(word_map)[None, None]
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.dtype not in (np.bool_, np.uint8):
        checks.fail("mask", f"array of shape {mask.shape}, dtype {mask.dtype}",
                    "expected a (H, W) bool mask, e.g. shapes.find_blobs(image)[0].mask")
    m = F.interpolate(m, size=mask.shape, mode="bilinear", align_corners=False)[0, 0]
    y, x = np.unravel_index(int(m.argmax()), mask.shape)
    return bool(mask[y, x])


def point_objects(image, maps, prompt: str, tokenizer) -> list[dict]:
    """For each object of a shapes-world prompt that the checker finds (right colour and
    shape), whether the attention of its colour and shape words peaks inside its blob.

    ``maps`` (T, h, w) from ``AttentionStore.word_maps``. The object's map is the mean of
    its colour and shape tokens' maps (the definition ``python -m sdkit.toy evaluate`` uses
    for ``attention_pointing``). Returns one dict per found object: ``obj``, ``indices``,
    ``map`` (h, w), ``mask`` (64, 64) bool (the checker's blob), ``hit``.

    Introduced in notebooks/03_text_and_cross_attention.ipynb.
    """
    from . import shapes

    arr = (checks.check_image(image) * 255).round().astype(np.uint8)
    maps = torch.as_tensor(maps)
    if maps.ndim != 3:
        checks.fail("maps", f"tensor of shape {tuple(maps.shape)}", "expected (T, h, w) word maps")
    blobs = shapes.find_blobs(arr)
    out = []
    for sc in shapes.check_image(arr, prompt):
        if not sc.colour_shape:
            continue
        blob = [b for b in blobs if b.colour == sc.obj.colour and b.shape == sc.obj.shape][0]
        start = token_indices(tokenizer, prompt, sc.obj.phrase)[0]
        idx = [start + 1, start + 2]  # 'a' <colour> <shape>
        m = maps[idx].mean(0)
        out.append({"obj": sc.obj, "indices": idx, "map": m, "mask": blob.mask,
                    "hit": peak_inside(m, blob.mask)})
    return out


@torch.no_grad()
def collect_pointing(pipe, prompts, seeds, num_inference_steps: int | None = None,
                     guidance_scale: float | None = None) -> list[dict]:
    """Generate each prompt with its seed under an ``AttentionStore`` (one image at a time, as
    ``python -m sdkit.toy evaluate`` does) and point its objects (``point_objects``).

    Returns one dict per prompt: ``prompt``, ``seed``, ``image`` (64, 64, 3) uint8, ``maps``
    (T, 16, 16) and ``objects`` (the list ``point_objects`` gives). Shows a progress bar.

    Introduced in notebooks/03_text_and_cross_attention.ipynb.
    """
    from tqdm.auto import tqdm

    from .pipeline import default_settings

    d = default_settings(pipe)
    steps = checks.check_steps(d["num_inference_steps"] if num_inference_steps is None
                               else num_inference_steps)
    scale = checks.check_guidance(d["guidance_scale"] if guidance_scale is None else guidance_scale)
    prompts, seeds = list(prompts), list(seeds)
    if len(prompts) != len(seeds) or not prompts:
        checks.fail("seeds", seeds, f"expected one seed per prompt ({len(prompts)} prompts)")
    out = []
    for p, s in tqdm(list(zip(prompts, seeds, strict=True)), desc="generating with capture"):
        checks.check_prompt(p, pipe.tokenizer)
        g = torch.Generator("cpu").manual_seed(checks.check_seed(s))
        with AttentionStore(pipe.unet) as store:
            im = pipe(p, num_inference_steps=steps, guidance_scale=scale, generator=g,
                      output_type="np").images[0]
        im = (np.clip(im, 0, 1) * 255).round().astype(np.uint8)
        maps = store.word_maps()
        out.append({"prompt": p, "seed": s, "image": im, "maps": maps,
                    "objects": point_objects(im, maps, p, pipe.tokenizer)})
    return out


# ----------------------------------------------------------------------------- pictures


def show_word_maps(image, maps, tokens, skip_special: bool = True, cols: int = 8, title=None):
    """The image, then one heatmap per token over it (each map scaled to its own max).

    ``maps`` (T, h, w) from ``AttentionStore.word_maps``; ``tokens`` the labels of the first
    ``len(tokens)`` maps (``prompt_tokens(tokenizer, prompt)``). Start and end tokens are
    left out unless ``skip_special=False``. Returns the matplotlib figure.

    Introduced in notebooks/03_text_and_cross_attention.ipynb.
    """
    import matplotlib.pyplot as plt

    img = checks.check_image(image)
    maps = torch.as_tensor(maps).float()
    if maps.ndim != 3:
        checks.fail("maps", f"tensor of shape {tuple(maps.shape)}", "expected (T, h, w) word maps")
    if not isinstance(tokens, (list, tuple)) or not tokens or len(tokens) > maps.shape[0]:
        checks.fail("tokens", tokens, f"expected a list of 1 to {maps.shape[0]} token labels")
    checks.check_int("cols", cols, 1, 32)
    special = ("<|startoftext|>", "<|endoftext|>")
    shown = [(i, t) for i, t in enumerate(tokens) if not (skip_special and t in special)]
    up = F.interpolate(maps[None], size=img.shape[:2], mode="bilinear", align_corners=False)[0]
    n = len(shown) + 1
    cols = min(cols, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.75 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    axes.flat[0].imshow(img)
    axes.flat[0].set_title("image", fontsize=9)
    for ax, (i, t) in zip(axes.flat[1:], shown, strict=False):
        m = up[i] / up[i].max().clamp_min(1e-12)
        ax.imshow(img)
        ax.imshow(m.numpy(), cmap="jet", alpha=0.55, vmin=0, vmax=1)
        ax.set_title(f"{i}: {t}", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def show_map_rows(image, rows: dict, tokens, indices):
    """A table of heatmaps over the image: one row per entry of ``rows`` (label -> (T, h, w)
    maps, e.g. one per resolution or per part of the denoising), one column per token index
    in ``indices``. Each map is scaled to its own max. Returns the matplotlib figure.

    Introduced in notebooks/03_text_and_cross_attention.ipynb.
    """
    import matplotlib.pyplot as plt

    img = checks.check_image(image)
    if not isinstance(rows, dict) or not rows:
        checks.fail("rows", rows, "expected a dict label -> (T, h, w) maps")
    indices = [checks.check_int("indices", i, 0, len(tokens) - 1) for i in indices]
    fig, axes = plt.subplots(len(rows), len(indices) + 1,
                             figsize=(1.5 * (len(indices) + 1), 1.6 * len(rows)), squeeze=False)
    for r, (label, maps) in enumerate(rows.items()):
        maps = torch.as_tensor(maps).float()
        if maps.ndim != 3:
            checks.fail("rows", f"{label}: shape {tuple(maps.shape)}", "expected (T, h, w) maps")
        up = F.interpolate(maps[None, indices], size=img.shape[:2], mode="bilinear",
                           align_corners=False)[0]
        axes[r, 0].imshow(img)
        axes[r, 0].set_ylabel(str(label), fontsize=9)
        for c, i in enumerate(indices):
            ax = axes[r, c + 1]
            ax.imshow(img)
            ax.imshow((up[c] / up[c].max().clamp_min(1e-12)).numpy(), cmap="jet", alpha=0.55,
                      vmin=0, vmax=1)
            if r == 0:
                ax.set_title(f"{i}: {tokens[i]}", fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return fig


def show_pointing(results, max_objects: int = 8):
    """Objects from ``collect_pointing``: the image with the checker's blob outlined (white)
    and the peak of the object's attention map (a cross: green inside, red outside).

    Introduced in notebooks/03_text_and_cross_attention.ipynb.
    """
    import matplotlib.pyplot as plt

    checks.check_int("max_objects", max_objects, 1, 64)
    objs = [(r, o) for r in results for o in r["objects"]][:max_objects]
    if not objs:
        checks.fail("results", "no objects", "expected results with objects the checker found")
    fig, axes = plt.subplots(1, len(objs), figsize=(1.9 * len(objs), 2.3), squeeze=False)
    for ax, (r, o) in zip(axes[0], objs, strict=True):
        h, w = o["mask"].shape
        m = F.interpolate(o["map"][None, None].float(), size=(h, w), mode="bilinear",
                          align_corners=False)[0, 0]
        y, x = np.unravel_index(int(m.argmax()), (h, w))
        ax.imshow(r["image"])
        ax.imshow(m.numpy(), cmap="jet", alpha=0.4)
        ax.contour(o["mask"], levels=[0.5], colors="white", linewidths=1)
        ax.plot(x, y, "x", color="lime" if o["hit"] else "red", markersize=10, mew=3)
        ax.set_title(f"{o['obj'].colour} {o['obj'].shape}", fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- exercises


def check_token_index(answer, tokenizer, prompt: str, word: str) -> bool:
    """Checker: is ``answer`` the position of ``word`` in the tokenized ``prompt``?

    Prints what is right or wrong and returns True/False (None means "not answered yet").

    Introduced in notebooks/03_text_and_cross_attention.ipynb.
    """
    right = token_indices(tokenizer, prompt, word)
    expected = right[0] if len(right) == 1 else right
    if answer is None:
        print("Not answered yet: set `answer` to an int.")
        return False
    if isinstance(answer, torch.Tensor):
        answer = answer.tolist()
    if answer == expected or (isinstance(answer, list) and answer == right):
        print(f"Correct: {word!r} is token {expected} (the start token is 0).")
        return True
    hint = (" Remember the start token <|startoftext|> sits at position 0."
            if isinstance(answer, int) and isinstance(expected, int) and answer == expected - 1
            else " Look at prompt_tokens(tokenizer, prompt).")
    print(f"Not quite: {answer!r} is not where {word!r} sits.{hint}")
    return False


def check_head_weights(answer, attn, hidden_states, encoder_hidden_states, head: int,
                       atol: float = 1e-5) -> bool:
    """Checker: is ``answer`` (HW, T) one head's attention weights softmax(Q K^T / sqrt(d))
    for item 0 of the batch? Prints what is right or wrong; returns True/False.

    Introduced in notebooks/03_text_and_cross_attention.ipynb.
    """
    checks.check_int("head", head, 0, attn.heads - 1)
    _, probs = cross_attention_by_hand(attn, hidden_states, encoder_hidden_states)
    want = probs[0, head]  # (HW, T)
    if answer is None:
        print(f"Not answered yet: set `answer` to a tensor of shape {tuple(want.shape)}.")
        return False
    answer = torch.as_tensor(answer, dtype=torch.float32)
    if answer.shape != want.shape:
        print(f"Not quite: expected shape {tuple(want.shape)} (pixels x tokens), "
              f"got {tuple(answer.shape)}.")
        return False
    if not torch.allclose(answer.sum(-1), torch.ones(want.shape[0]), atol=1e-4):
        print("Not quite: each row (one pixel) should sum to 1 over the tokens: did you "
              "take the softmax over the last axis?")
        return False
    err = (answer - want).abs().max().item()
    if err <= atol:
        print(f"Correct: head {head}'s weights match (max difference {err:.1e}).")
        return True
    d = attn.to_q.out_features // attn.heads
    print(f"Not quite: max difference {err:.3g}. Did you scale by 1/sqrt(d) with d = {d}, the "
          f"head's size, not the layer's width? And take head {head}'s slice of Q and K?")
    return False
