"""The kit's own CLIP: a text tower and an image tower trained contrastively on the shapes
world (notebook 04), as OpenAI's CLIP ViT-L/14 was on web pictures before SD 1.x read its text
tower frozen (``python -m sdkit.training train --text-encoder clip`` does that here).

Stock ``CLIPModel`` (a ``CLIPTextModel`` of width 128, 3 layers, and a ViT of 8x8 patches on
64x64 pictures), trained with InfoNCE and CLIP's learnable temperature on captions that name a
whole scene or only parts of it ("a red circle", "a circle on the left"), with hard negatives
in each batch (the two objects' positions swapped, their colours exchanged) so that a bag of
words cannot win. The labels are soft: a caption counts as true of every picture in the batch
it describes, in proportion to how much of the scene it names. ``retrieval`` measures it
zero-shot on pictures drawn from seeds training never used; ``clip_score`` is the CLIP score
of generated pictures (100 x cosine, floored at 0). The pictures go in as the kit's tensors
in [-1, 1] (``images.to_tensor``): no image processor. The tokenizer writer lives here too.

Left out: web-scale data, a ViT-L, the image processor's resize and normalisation.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTokenizer, CLIPVisionConfig

from . import checks, device, shapes
from .images import to_tensor
from .pipeline import MAX_LENGTH, TOY_DIR

TOY_CLIP_DIR = TOY_DIR.parent / "toy-clip"  # the kit's CLIP, shipped beside the toy model
CLIP_SEED = 30_000_000  # training pictures of the CLIP start at this seed
TEST_SEED = 40_000_000  # and its zero-shot test pictures at this one
ATTRIBUTES = ("colour", "shape", "position", "binding")


def load_clip(folder=TOY_CLIP_DIR) -> CLIPModel:
    """A saved toy CLIP (``data/toy-clip``, or a recipe's ``runs/.../clip``) with the stock
    ``CLIPModel.from_pretrained`` (safetensors only, local files only), frozen, in eval mode.

    Introduced in notebooks/11_image_variations.ipynb.
    """
    folder = checks.check_folder("folder", folder)
    if not (folder / "config.json").is_file():
        checks.fail("folder", str(folder), "a CLIPModel folder (config.json, model.safetensors), "
                                           "e.g. data/toy-clip")
    model = CLIPModel.from_pretrained(folder, use_safetensors=True, local_files_only=True)
    return model.eval().requires_grad_(False)


def text_config(tokenizer) -> CLIPTextConfig:
    """The text tower's shape for ``tokenizer``: 3 layers of width 128, 4 heads, 20 tokens.

    Introduced in notebooks/04_text_and_cross_attention.ipynb.
    """
    if not all(hasattr(tokenizer, a) for a in ("bos_token_id", "eos_token_id", "__len__")):
        checks.fail("tokenizer", type(tokenizer).__name__, "expected a CLIPTokenizer")
    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512,
        num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, projection_dim=128)


def make_clip(tokenizer) -> CLIPModel:
    """The toy CLIP, untrained: ``text_config`` and a ViT (64x64 pictures, 8x8 patches).

    Introduced in notebooks/04_text_and_cross_attention.ipynb.
    """
    vision = CLIPVisionConfig(image_size=shapes.SIZE, patch_size=8, num_channels=3,
                              hidden_size=128, intermediate_size=512, num_hidden_layers=3,
                              num_attention_heads=4, projection_dim=128)
    return CLIPModel(CLIPConfig(text_config=text_config(tokenizer).to_dict(),
                                vision_config=vision.to_dict(), projection_dim=128))


# ------------------------------------------------------------------------------ tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's map from bytes to printable characters (the byte-level BPE alphabet)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
          *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in bs]  # mapped past 255, in order
    return dict(zip(bs + rest, map(chr, bs + [256 + i for i in range(len(rest))])))


def _learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Byte-pair encoding, learned until every word is a single token (CLIP's </w> marks ends)."""
    seqs = {w: list(w[:-1]) + [w[-1] + "</w>"] for w in words}
    merges = []
    while any(len(s) > 1 for s in seqs.values()):
        counts = Counter(pair for s in seqs.values() for pair in zip(s, s[1:]))
        best = max(sorted(counts), key=counts.get)  # sorted: ties broken the same way every time
        merges.append(best)
        # merge every (a, b) neighbour pair, left to right, never overlapping (words are letters)
        pair = re.compile(rf"(?<!\S){re.escape(best[0])} {re.escape(best[1])}(?!\S)")
        seqs = {w: pair.sub(a + b, " ".join(s)).split() for w, s in seqs.items() for a, b in [best]}
    return merges


def write_tokenizer(folder) -> CLIPTokenizer:
    """Write a real CLIP tokenizer (vocab.json, merges.txt) whose vocabulary is CLIP's 512
    byte symbols plus one merge chain per word of the shapes world; returns it loaded.

    Introduced in notebooks/12_training_from_scratch.ipynb.
    """
    folder = checks.check_folder("folder", folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab_list = chars + [c + "</w>" for c in chars]
    merges = _learn_merges(shapes.world_words())
    vocab_list += [a + b for a, b in merges] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                       encoding="utf-8")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                        model_max_length=MAX_LENGTH)
    split = [w for w in shapes.world_words() if len(tok(w, add_special_tokens=False).input_ids) > 1]
    if split:  # the merges are learnt until no word is split: a bug, not a bad input
        raise RuntimeError(f"words that are not a single token: {split}")
    tok.save_pretrained(folder)
    return tok


# ------------------------------------------------------------------------------ captions


def _phrase(colour, shape, position) -> str:
    words = ["a", colour, shape, shapes.PHRASES[position] if position else None]
    return " ".join(w for w in words if w)


def _describes(parts, objects) -> bool:
    """Whether a caption's parts ((colour|None, shape|None, position|None) per object) are
    true of a scene's objects: each part matches its own object of the scene."""
    def fits(p, o):
        return all(a is None or a == b for a, b in zip(p, (o.colour, o.shape, o.position)))
    if len(parts) == 1:
        return any(fits(parts[0], o) for o in objects)
    return len(objects) == 2 and ((fits(parts[0], objects[0]) and fits(parts[1], objects[1]))
                                  or (fits(parts[0], objects[1]) and fits(parts[1], objects[0])))


def _target(parts, objects) -> float:
    """How much of the scene a caption says, if it is true of it: the share of the scene's
    attributes it names (1 for the whole caption, 1/3 for "a red circle" of a two-object
    scene), else 0. The soft labels: a picture's likeliest caption is its whole caption."""
    named = sum(a is not None for p in parts for a in p)
    return named / (3 * len(objects)) if _describes(parts, objects) else 0.0


def _caption_parts(objects, rng: np.random.Generator):
    """One training caption of a scene: the whole caption half the time, else a part of it
    (one object, with its colour, shape or position left out). Returns (text, parts)."""
    full = [(o.colour, o.shape, o.position) for o in objects]
    if rng.random() < 0.5:
        return shapes.caption_of(objects), full
    c, s, p = full[rng.integers(len(full))]
    part = [(c, s, None), (None, s, p), (c, s, p)][rng.integers(3)]
    return _phrase(*part), [part]


def hard_negatives(objects) -> list[str]:
    """Captions that use the scene's words but are false of it: for two objects, their
    positions swapped and (when they differ) their colours exchanged; for one, another position.

    Introduced in notebooks/04_text_and_cross_attention.ipynb.
    """
    if len(objects) == 1:
        o = objects[0]
        return [_phrase(o.colour, o.shape, p) for p in shapes.POSITIONS if p != o.position][:1]
    a, b = objects
    swapped = [shapes.Obj(a.colour, a.shape, b.position), shapes.Obj(b.colour, b.shape, a.position)]
    Obj = shapes.Obj
    exchanged = [Obj(b.colour, a.shape, a.position), Obj(a.colour, b.shape, b.position)]
    if a.colour == b.colour:  # exchanging equal colours changes nothing: not a negative
        return [shapes.caption_of(swapped)]
    return [shapes.caption_of(swapped), shapes.caption_of(exchanged)]


def _examples(n: int, seed: int) -> list:
    held = shapes.heldout_captions()
    out, s = [], seed
    while len(out) < n:
        e = shapes.make_example(s)
        s += 1
        if e.caption not in held:
            out.append(e)
    return out


# ------------------------------------------------------------------------------ training


def _ids(tokenizer, texts) -> torch.Tensor:
    return tokenizer(list(texts), padding="max_length", max_length=MAX_LENGTH, truncation=True,
                     return_tensors="pt").input_ids  # (N, 20)


def contrastive_loss(image_embeds, text_embeds, logit_scale, truth) -> torch.Tensor:
    """InfoNCE both ways with soft labels: ``truth`` (B, T) is > 0 where text j is true of
    picture i (the target shares are proportional to it); texts past the first B are
    negatives only (no picture of their own).

    Introduced in notebooks/04_text_and_cross_attention.ipynb.
    """
    img = F.normalize(image_embeds, dim=-1)  # (B, D)
    txt = F.normalize(text_embeds, dim=-1)  # (T, D)
    logits = logit_scale.exp() * img @ txt.T  # (B, T)
    b = len(img)
    to_text = -(truth / truth.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
    t = truth[:, :b].T  # (B, B): which pictures each of the first B texts is true of
    to_image = -(t / t.sum(1, keepdim=True) * logits[:, :b].T.log_softmax(1)).sum(1).mean()
    return (to_text + to_image) / 2


def train_clip(tokenizer, steps: int = 2000, batch: int = 128, n_images: int = 20_000,
               lr: float = 1e-3, seed: int = 0, log=print) -> CLIPModel:
    """Train ``make_clip(tokenizer)`` contrastively (``contrastive_loss``) on ``n_images``
    scenes of the training world (held-out captions skipped), one caption of each drawn per
    step (``_caption_parts``) plus the batch's ``hard_negatives``.

    Introduced in notebooks/04_text_and_cross_attention.ipynb.
    """
    steps = checks.check_int("steps", steps, 1, 10**6)
    batch = checks.check_int("batch", batch, 2, 4096)
    n_images = checks.check_int("n_images", n_images, batch, shapes.MAX_DATASET)
    lr = checks.check_float("lr", lr, 1e-6, 1.0)
    device.check_memory("n_images", n_images, 4 * 3 * n_images * shapes.SIZE**2,
                        f"{n_images:,} pictures as float32", "cpu")
    torch.manual_seed(checks.check_seed(seed))
    model = make_clip(tokenizer)
    examples = _examples(n_images, CLIP_SEED + seed * 1_000_000)
    pixels = to_tensor(np.stack([e.image for e in examples]))  # (N, 3, 64, 64)
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    t0 = time.time()
    bar = tqdm(range(steps), desc="CLIP")
    for step in bar:
        for g in opt.param_groups:  # warm-up, then cosine
            g["lr"] = lr * min(1, (step + 1) / 100) * 0.5 * (1 + np.cos(np.pi * step / steps))
        idx = rng.choice(len(examples), batch, replace=False)
        scenes = [examples[i].objects for i in idx]
        drawn = [_caption_parts(o, rng) for o in scenes]
        negs = sorted({c for o in scenes for c in hard_negatives(o)})
        texts = [t for t, _ in drawn] + negs
        parts = [p for _, p in drawn] + [[(o.colour, o.shape, o.position)
                                          for o in shapes.parse_caption(c)] for c in negs]
        truth = torch.tensor([[_target(p, o) for p in parts] for o in scenes],
                             dtype=torch.float32)  # (B, T)
        out = model(input_ids=_ids(tokenizer, texts), pixel_values=pixels[idx])
        loss = contrastive_loss(out.image_embeds, out.text_embeds, model.logit_scale, truth)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, np.log(100))  # CLIP's cap on the temperature
        if step % 25 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}",
                            scale=f"{model.logit_scale.exp().item():.1f}")
    log(f"CLIP: {steps} steps in {time.time() - t0:.0f} s")
    return model.eval().requires_grad_(False)


# ------------------------------------------------------------------------------ measuring


@torch.no_grad()
def embed_texts(model, tokenizer, texts) -> torch.Tensor:
    """Unit-length text embeddings (N, 128) of ``texts`` (``CLIPModel.get_text_features``).

    Introduced in notebooks/04_text_and_cross_attention.ipynb.
    """
    texts = checks.check_list("texts", texts)
    feats = [model.get_text_features(input_ids=_ids(tokenizer, texts[i:i + 512]))
             for i in range(0, len(texts), 512)]
    return F.normalize(torch.cat([getattr(f, "pooler_output", f) for f in feats]), dim=-1)


@torch.no_grad()
def embed_images(model, images) -> torch.Tensor:
    """Unit-length image embeddings (N, 128) of pictures (uint8 (N, 64, 64, 3) or the kit's
    tensors) (``CLIPModel.get_image_features``).

    Introduced in notebooks/04_text_and_cross_attention.ipynb.
    """
    x = images if isinstance(images, torch.Tensor) else to_tensor(images)  # (N, 3, 64, 64)
    if x.ndim != 4 or tuple(x.shape[1:]) != (3, shapes.SIZE, shapes.SIZE):
        checks.fail("images", tuple(x.shape),
                    f"expected pictures (N, 3, {shapes.SIZE}, {shapes.SIZE})")
    feats = [model.get_image_features(pixel_values=x[i:i + 256]) for i in range(0, len(x), 256)]
    return F.normalize(torch.cat([getattr(f, "pooler_output", f) for f in feats]), dim=-1)


def clip_score(model, tokenizer, images, captions) -> float:
    """The CLIP score: mean of 100 x max(cos(image, caption), 0) over pairs.

    Introduced in notebooks/04_text_and_cross_attention.ipynb.
    """
    captions = checks.check_list("captions", captions)
    img, txt = embed_images(model, images), embed_texts(model, tokenizer, captions)
    if len(img) != len(txt):
        checks.fail("captions", f"{len(txt)} captions", f"expected one per image ({len(img)})")
    return float((100 * (img * txt).sum(-1).clamp(min=0)).mean())


def _variant(objects, attribute: str):
    """The scene's caption with one attribute made false, or None where it cannot be."""
    o = list(objects)
    if attribute == "colour":
        c = next(c for c in shapes.TRAIN_COLOURS if c not in {x.colour for x in o})
        o[0] = shapes.Obj(c, o[0].shape, o[0].position)
    elif attribute == "shape":
        s = next(s for s in shapes.TRAIN_SHAPES if s not in {x.shape for x in o})
        o[0] = shapes.Obj(o[0].colour, s, o[0].position)
    elif attribute == "position":
        return hard_negatives(objects)[0]
    elif len(o) < 2 or o[0].colour == o[1].colour:
        return None
    else:  # binding: the two colours exchanged
        return hard_negatives(objects)[1]
    return shapes.caption_of(o)


def retrieval(model, tokenizer, n: int = 400) -> dict:
    """Zero-shot figures on ``n`` scenes from seeds training never used: image->caption top-1
    among the grammar's captions of as many objects, and among all 588 (``..._of_all``: one
    object's phrase is true of a two-object picture too, and ``image_to_true_caption_top1``
    counts it); caption->image
    top-1 among the ``n`` pictures; and per attribute, how often the true caption
    beats the same caption with one attribute made false (chance 0.5). A caption is right when
    it names the scene's objects, in either order.

    Introduced in notebooks/04_text_and_cross_attention.ipynb.
    """
    n = checks.check_int("n", n, 8, 5000)
    ex = [shapes.make_example(TEST_SEED + i) for i in range(n)]
    img = embed_images(model, np.stack([e.image for e in ex]))  # (n, 128)
    grammar = shapes.all_captions()
    txt = embed_texts(model, tokenizer, grammar)  # (588, 128)
    # a scene is its set of objects: both orders of a two-object caption say the same thing
    parsed = [set(shapes.parse_caption(c)) for c in grammar]
    sims = img @ txt.T  # (n, 588)
    true_first = [parsed[i] <= set(e.objects) for i, e in zip(sims.argmax(1).tolist(), ex)]
    count = torch.tensor([[len(p) == len(e.objects) for p in parsed] for e in ex])
    right = [parsed[i] == set(e.objects)
             for i, e in zip(sims.masked_fill(~count, -2).argmax(1).tolist(), ex)]
    own = embed_texts(model, tokenizer, [e.caption for e in ex])  # (n, 128)
    best = (own @ img.T).argmax(1).tolist()
    found = [set(e.objects) <= set(ex[j].objects) for j, e in zip(best, ex)]  # true of it
    held = shapes.heldout_captions()
    whole = [parsed[i] == set(e.objects) for i, e in zip(sims.argmax(1).tolist(), ex)]
    figs = {"n_test_scenes": n, "image_to_true_caption_top1": float(np.mean(true_first)),
            "image_to_caption_top1_of_all": float(np.mean(whole)),
            "image_to_caption_top1": float(np.mean(right)),
            "caption_to_image_top1": float(np.mean(found)),
            "image_to_caption_heldout_captions": float(np.mean(
                [r for r, e in zip(right, ex) if e.caption in held] or [0.0])),
            "grammar_captions": len(grammar)}
    for a in ATTRIBUTES:
        pairs = [(i, v) for i, e in enumerate(ex) if (v := _variant(e.objects, a))]
        neg = embed_texts(model, tokenizer, [v for _, v in pairs])
        rows = torch.tensor([i for i, _ in pairs])
        wins = (img[rows] * own[rows]).sum(-1) > (img[rows] * neg).sum(-1)
        figs[f"attribute_{a}"] = float(wins.float().mean())
    return figs
