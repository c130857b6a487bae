"""Token grounding: a training loss that asks each object's colour and shape words to spend
their cross-attention inside that object (notebook 12).

SD 1.x learnt where each word goes from LAION alone, and its per-word maps (notebook 04) come
out localized. The kit's UNet, trained on the toy CLIP's frozen text tower, learnt instead to
read the word that ends each phrase ("left" in "a red circle on the left"), which in a causal
text encoder carries the whole phrase; its colour and shape words' maps then peak outside
their objects. TokenCompose (Wang et al., CVPR 2024) fine-tuned SD 1.4 with masks from a
segmenter and this loss; the shapes world draws its own masks, so the loss is free here:

    L_token = mean over objects k, their words w and the cross-attention layers l of
              (1 - sum_{pixels in mask_k} A_l[w] / sum_{all pixels} A_l[w])^2

with A_l[w] the layer's map of word w, averaged over heads (``attention.AttentionStore``
with ``keep_graph=True``), the mask box-averaged to the layer's side. The UNet's loss is
the v-prediction loss plus ``weight`` x L_token.

Left out: TokenCompose's pixel-level BCE term, and any grounding of the position words.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from . import checks, shapes
from .attention import token_indices

MAX_OBJECTS = 2  # a shapes-world scene holds one or two objects


def latent_masks(masks, side: int = 16) -> np.ndarray:
    """A scene's object masks ((k, 64, 64) bool, ``shapes.Example.masks``, k = 0, 1 or 2) as
    each object's share of each cell of a ``side`` x ``side`` grid: (2, side, side) float16,
    zeros for a missing object.

    Introduced in notebooks/12_training_from_scratch.ipynb.
    """
    m = np.asarray(masks) if len(masks) else np.zeros((0, shapes.SIZE, shapes.SIZE), bool)
    if m.ndim != 3 or m.shape[0] > MAX_OBJECTS or m.shape[1:] != (shapes.SIZE,) * 2:
        checks.fail("masks", f"array of shape {m.shape}",
                    f"expected 0, 1 or 2 masks of {shapes.SIZE}x{shapes.SIZE}, an Example's masks")
    side = checks.check_int("side", side, 1, shapes.SIZE)
    if shapes.SIZE % side:
        checks.fail("side", side, f"expected a divisor of {shapes.SIZE}, e.g. 16")
    f = shapes.SIZE // side
    out = np.zeros((MAX_OBJECTS, side, side), np.float16)
    out[: len(m)] = m.reshape(len(m), side, f, side, f).mean((2, 4))
    return out


def object_tokens(tokenizer, captions) -> torch.Tensor:
    """Where each object's colour and shape words sit in each tokenized caption:
    (C, 2 objects, 2 words) positions (start token = 0), -1 for a word or an object the
    caption does not name (the empty caption; a one-object caption's second object; "a circle
    on the left", whose colour no word names). Objects are the caption's phrases, in order.

    Introduced in notebooks/12_training_from_scratch.ipynb.
    """
    captions = checks.check_list("captions", captions)
    out = torch.full((len(captions), MAX_OBJECTS, 2), -1, dtype=torch.long)
    for i, c in enumerate(captions):
        phrases = c.split(" and ") if c else []
        if len(phrases) > MAX_OBJECTS:
            checks.fail("captions", c, "expected captions of one or two objects")
        ids = tokenizer(c).input_ids
        for k, phrase in enumerate(phrases):
            start = token_indices(tokenizer, c, phrase)[0]  # the phrase's first token, 'a'
            for j, word in enumerate(phrase.split()):
                slot = 0 if word in shapes.COLOURS else 1 if word in shapes.SHAPES else None
                if slot is None:
                    continue
                if tokenizer(word, add_special_tokens=False).input_ids != [ids[start + j]]:
                    checks.fail("tokenizer", type(tokenizer).__name__, f"expected one token per "
                                f"word of the shapes world (clip.write_tokenizer's); {word!r}")
                out[i, k, slot] = start + j
    return out


def grounding_loss(records, tokens: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """TokenCompose's token loss (the module docstring) over one batch's cross-attention
    ``records`` (``AttentionStore(unet, guided=False, keep_graph=True).records``, probs
    (B, HW, T)), ``tokens`` (B, 2, 2) from ``object_tokens`` and ``masks`` (B, 2, s, s) from
    ``latent_masks``. A scalar in [0, 1]; 0.0 (with a gradient) when no row has an object.

    Introduced in notebooks/12_training_from_scratch.ipynb.
    """
    if not records:
        checks.fail("records", "[]", "expected the records of a UNet call made inside "
                    "AttentionStore(unet, guided=False, keep_graph=True)")
    b = records[0][2].shape[0]
    if tuple(tokens.shape) != (b, MAX_OBJECTS, 2):
        checks.fail("tokens", f"tensor of shape {tuple(tokens.shape)}",
                    f"expected ({b}, 2, 2) word positions from object_tokens")
    if masks.ndim != 4 or tuple(masks.shape[:2]) != (b, MAX_OBJECTS):
        checks.fail("masks", f"tensor of shape {tuple(masks.shape)}",
                    f"expected ({b}, 2, side, side) shares from latent_masks")
    valid = (tokens >= 0).flatten(1)  # (B, 4) which words have an object
    index = tokens.clamp(min=0).flatten(1)  # (B, 4)
    losses = []
    for _, _, probs in records:  # (B, HW, T)
        side = math.isqrt(probs.shape[1])
        m = F.adaptive_avg_pool2d(masks.float(), side).flatten(2)  # (B, 2, HW)
        m = m.repeat_interleave(2, dim=1)  # (B, 4, HW): colour, shape of each object
        a = probs.gather(2, index[:, None, :].expand(-1, probs.shape[1], -1)).transpose(1, 2)
        inside = (a * m).sum(-1) / a.sum(-1).clamp_min(1e-8)  # (B, 4)
        losses.append(((1 - inside) ** 2)[valid])
    hits = torch.cat(losses)
    return hits.mean() if hits.numel() else records[0][2].sum() * 0.0
