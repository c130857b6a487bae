"""The toy CLIP (sdkit/clip.py, notebook 04): its loss equals transformers' own, its captions and
hard negatives say what they claim, the shipped CLIP loads with the stock class and has the
recipe's shapes, and it is good at what the card says (measured here on new scenes)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import CLIPModel, CLIPTokenizer

from sdkit import clip, shapes

needs_clip = pytest.mark.skipif(
    not (clip.TOY_CLIP_DIR / "config.json").is_file(),
    reason="data/toy-clip is missing: run `python -m sdkit.training train`")


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer.from_pretrained(clip.TOY_CLIP_DIR.parent / "toy-sd" / "tokenizer")


@pytest.fixture(scope="module")
def toy_clip():
    return CLIPModel.from_pretrained(clip.TOY_CLIP_DIR, use_safetensors=True).eval()


def test_contrastive_loss_is_clips_own_loss(tokenizer):
    """With one true caption per picture and no extra negatives, the soft-label InfoNCE is
    exactly CLIPModel's return_loss=True loss."""
    torch.manual_seed(0)
    model = clip.make_clip(tokenizer).eval()
    ex = [shapes.make_example(i) for i in range(6)]
    ids = tokenizer([e.caption for e in ex], padding="max_length", max_length=20,
                    return_tensors="pt").input_ids
    pixels = clip.to_tensor(np.stack([e.image for e in ex]))
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels, return_loss=True)
        ours = clip.contrastive_loss(out.image_embeds, out.text_embeds, model.logit_scale,
                                     torch.eye(6))
    assert torch.allclose(ours, out.loss, atol=1e-5), (ours, out.loss)


def test_soft_labels_spread_over_every_true_caption():
    """Two identical captions in a batch: each picture's target is half on each, so the loss
    is at least log 2 even with perfect embeddings."""
    img = torch.eye(3)[[0, 0, 1]]  # pictures 0 and 1 alike
    txt = torch.eye(3)[[0, 0, 1]]
    truth = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.float32)
    loss = clip.contrastive_loss(img, txt, torch.tensor(np.log(100.0)), truth)
    assert np.log(2) * 2 / 3 - 1e-4 < loss.item() < np.log(2)


def test_captions_and_hard_negatives_say_what_they_claim():
    rng = np.random.default_rng(0)
    for seed in range(200):
        e = shapes.make_example(seed)
        text, parts = clip._caption_parts(e.objects, rng)
        assert clip._describes(parts, e.objects), (text, e.caption)
        for neg in clip.hard_negatives(e.objects):
            objs = shapes.parse_caption(neg)
            assert not clip._describes([(o.colour, o.shape, o.position) for o in objs], e.objects)
            if len(e.objects) == 2:  # the same words, only bound differently
                assert sorted(neg.split()) == sorted(e.caption.split()), (neg, e.caption)


@needs_clip
def test_shipped_clip_is_stock_safetensors_with_the_recipes_shapes(toy_clip, tokenizer, toy_pipe):
    files = {p.name for p in clip.TOY_CLIP_DIR.iterdir()}
    assert "model.safetensors" in files and not files & {"pytorch_model.bin"}
    ours = {k: v.shape for k, v in clip.make_clip(tokenizer).state_dict().items()}
    assert ours == {k: v.shape for k, v in toy_clip.state_dict().items()}
    # its text tower has the pipeline's text encoder's shapes: --text-encoder clip swaps it in
    assert ({k: v.shape for k, v in toy_clip.text_model.state_dict().items()}
            == {k: v.shape for k, v in toy_pipe.text_encoder.state_dict().items()})


@needs_clip
def test_shipped_clip_retrieves_and_binds(toy_clip, tokenizer):
    """On 200 scenes no training step saw: the full caption is found and each attribute,
    binding included, decides (chance is 0.5 per attribute, 1/100+ for retrieval)."""
    figs = clip.retrieval(toy_clip, tokenizer, n=200)
    assert figs["image_to_caption_top1"] >= 0.9, figs
    assert figs["caption_to_image_top1"] >= 0.9, figs
    assert min(figs[f"attribute_{a}"] for a in clip.ATTRIBUTES) >= 0.9, figs
    card = json.loads((clip.TOY_CLIP_DIR.parent / "toy-sd" / "evaluation.json").read_text())
    if "clip_attribute_binding" in card:  # the card was measured on this CLIP
        assert abs(card["clip_attribute_binding"] - figs["attribute_binding"]) < 0.1


@needs_clip
def test_clip_score_ranks_right_pictures_over_wrong(toy_clip, tokenizer):
    ex = [shapes.make_example(clip.TEST_SEED + i) for i in range(16)]
    pics, caps = [e.image for e in ex], [e.caption for e in ex]
    right = clip.clip_score(toy_clip, tokenizer, pics, caps)
    wrong = clip.clip_score(toy_clip, tokenizer, pics, caps[3:] + caps[:3])
    assert 0 <= wrong < right <= 100
