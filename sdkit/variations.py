"""Image variations: the idea of Stable unCLIP, built small enough to train in a notebook.

Stable unCLIP conditions the UNet on a CLIP *image* embedding (alongside the text), with
noise added to that embedding at a chosen ``noise_level``; diffusers runs it as
``StableUnCLIPImg2ImgPipeline``. Here the image embedding is the kit's own CLIP's
(``data/toy-clip``, notebook 04), frozen, as Stable unCLIP's is CLIP ViT-H's. The toy UNet
was never taught to read image embeddings, so a small part that trains in seconds on a CPU
translates them into what it does read:

1. ``clip.embed_images``: the toy CLIP's image tower and projection, unit-length (B, 128).
2. ``Projector``: an MLP from a (noise-augmented) image embedding plus the noise level to
   the (20, 128) text hidden states the UNet's cross-attention reads, trained with MSE on
   drawn shapes pictures (``fit``). Noise augmentation is unCLIP's: normalise the embedding,
   ``DDPMScheduler.add_noise`` at ``noise_level``, un-normalise, and tell the projector the
   level.
3. ``variations``: embed a picture, noise, project, and sample the unchanged toy
   pipeline with ``prompt_embeds`` and several seeds (``shapes.hits`` then says which
   variations kept the picture's objects).

Training is deterministic by seed and cached in memory (``fit``). Notebook 11 writes CLIP's
InfoNCE in a cell (asserted equal to ``info_nce``, the toy CLIP's ``clip.contrastive_loss``
with one true caption per picture); its real-weights path (diffusers'
``StableUnCLIPImg2ImgPipeline``) is ``sdkit.unclip``. Left out: unCLIP's prior (text -> image
embedding), mixing text and image conditioning in one prompt, and fine-tuning the toy UNet
itself to read the embedding through its class-embedding input.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.models.embeddings import get_timestep_embedding
from tqdm.auto import tqdm
from transformers import CLIPModel, CLIPTokenizer

from . import checks, clip, device, finetune, pipeline, shapes
from .images import to_tensor

EMBED_DIM = 128  # the toy CLIP's image-text embedding width (its projection_dim)
LEVEL_DIM = 32  # width of the sinusoidal noise-level embedding given to the projector
MAX_NOISE_LEVEL = 999  # noise levels run 0..999, as unCLIP's image_noising_scheduler
_ORDER = {"left": 0, "top": 0, "center": 1, "right": 2, "bottom": 2}


# ----------------------------------------------------------------------------- models


class Projector(nn.Module):
    """(noised image embedding (B, 128), noise level (B,)) -> text hidden states (B, 20, 128).

    Introduced in notebooks/11_image_variations.ipynb.
    """

    def __init__(self, seq_len: int, hidden: int, embed_dim: int = EMBED_DIM, width: int = 512):
        super().__init__()
        self.seq_len, self.hidden = seq_len, hidden
        self.mlp = nn.Sequential(
            nn.Linear(embed_dim + LEVEL_DIM, width), nn.SiLU(),
            nn.Linear(width, width), nn.SiLU(),
            nn.Linear(width, seq_len * hidden),
        )

    def forward(self, image_embeds, noise_level):
        lev = get_timestep_embedding(noise_level, LEVEL_DIM, flip_sin_to_cos=True,
                                     downscale_freq_shift=0)  # (B, 32), as unCLIP
        out = self.mlp(torch.cat([image_embeds, lev.to(image_embeds.dtype)], dim=-1))
        return out.view(-1, self.seq_len, self.hidden)  # (B, 20, 128)


class ToyUnCLIP(nn.Module):
    """What ``fit`` returns: the frozen toy CLIP (``clip_model``; its image tower is the
    encoder) with its ``tokenizer``, the trained projector and the embeddings' statistics.

    Introduced in notebooks/11_image_variations.ipynb.
    """

    def __init__(self, clip_model: CLIPModel, tokenizer, seq_len: int, hidden: int):
        super().__init__()
        if not isinstance(clip_model, CLIPModel):
            checks.fail("clip_model", type(clip_model).__name__,
                        "expected a CLIPModel, e.g. the kit's from clip.TOY_CLIP_DIR")
        self.clip, self.tokenizer = clip_model.eval().requires_grad_(False), tokenizer
        dim = clip_model.config.projection_dim
        self.projector = Projector(seq_len, hidden, embed_dim=dim)
        self.register_buffer("embeds_mean", torch.zeros(dim))
        self.register_buffer("embeds_std", torch.ones(dim))
        self.history: dict[str, list[float]] = {}


# ----------------------------------------------------------------------------- pieces


def info_nce(image_embeds: torch.Tensor, text_embeds: torch.Tensor,
             logit_scale: torch.Tensor | float) -> torch.Tensor:
    """CLIP's symmetric contrastive loss for a batch of matching (image, text) pairs.

    Both embeddings (B, D) are L2-normalised here; logits = scale * cos similarity
    (B, B); the right partner of row i is column i, in both directions.

    Introduced in notebooks/11_image_variations.ipynb.
    """
    for name, e in (("image_embeds", image_embeds), ("text_embeds", text_embeds)):
        if not torch.is_tensor(e) or e.ndim != 2:
            checks.fail(name, e, "expected a tensor (B, D)")
    if image_embeds.shape != text_embeds.shape:
        checks.fail("text_embeds", f"tensor of shape {tuple(text_embeds.shape)}",
                    f"expected the image_embeds' shape {tuple(image_embeds.shape)}")
    # the toy CLIP's loss with one true caption per picture: labels 0, 1, ..., B-1 both ways
    truth = torch.eye(len(image_embeds), device=image_embeds.device)
    return clip.contrastive_loss(image_embeds, text_embeds, torch.as_tensor(logit_scale), truth)


def _image_noising_scheduler() -> DDPMScheduler:
    """The scheduler that noises image embeddings (unCLIP uses a DDPMScheduler for this)."""
    return DDPMScheduler(num_train_timesteps=MAX_NOISE_LEVEL + 1,
                         beta_schedule="squaredcos_cap_v2")


def noise_augment(model: ToyUnCLIP, image_embeds: torch.Tensor, noise_level,
                  noise: torch.Tensor | None = None, generator=None) -> torch.Tensor:
    """unCLIP's noise augmentation: normalise, ``add_noise`` at ``noise_level``, un-normalise.

    ``noise_level``: an int in [0, 999] or a (B,) int tensor. Level 0 keeps the embedding
    (almost) as it is; level 999 replaces it by noise.

    Introduced in notebooks/11_image_variations.ipynb.
    """
    b = image_embeds.shape[0]
    if torch.is_tensor(noise_level):
        levels = noise_level.long()
        if levels.shape != (b,) or levels.min() < 0 or levels.max() > MAX_NOISE_LEVEL:
            checks.fail("noise_level", noise_level, f"expected ints in [0, {MAX_NOISE_LEVEL}]")
    else:
        levels = torch.full((b,), checks.check_int("noise_level", noise_level, 0, MAX_NOISE_LEVEL))
    if noise is None:
        noise = torch.randn(image_embeds.shape, generator=generator)
    x = (image_embeds - model.embeds_mean) / model.embeds_std
    x = _image_noising_scheduler().add_noise(x, noise.to(x), levels)
    return x * model.embeds_std + model.embeds_mean


def canonical_caption(objects) -> str:
    """The caption with its objects in reading order (left before right, top before bottom).

    A two-shape picture has two correct captions; the projector learns one of them so that
    its MSE target is a single point, not the average of two word orders.

    Introduced in notebooks/11_image_variations.ipynb.
    """
    return shapes.caption_of(sorted(objects, key=lambda o: _ORDER[o.position]))


@torch.no_grad()
def text_features(pipe, captions) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen text encoder's view of captions: pooled (N, 128) and hidden states (N, 20, 128).

    Pooled = CLIP's pooler output (the final-layer state at the end token).

    Introduced in notebooks/11_image_variations.ipynb.
    """
    captions = list(captions)
    tok = pipe.tokenizer
    ids = tok(captions, padding="max_length", max_length=tok.model_max_length,
              truncation=True, return_tensors="pt").input_ids.to(pipe.text_encoder.device)
    out = pipe.text_encoder(ids)
    return out.pooler_output.float().cpu(), out.last_hidden_state.float().cpu()


def _images(n: int, seed: int):
    examples = [shapes.make_example(seed + i) for i in range(n)]
    x = to_tensor(np.stack([e.image for e in examples]))  # (n, 3, 64, 64)
    return x, [canonical_caption(e.objects) for e in examples]


def _pictures(images, name: str) -> torch.Tensor:
    """One 64x64 picture or a list of them -> (B, 3, 64, 64) in [-1, 1]."""
    x = to_tensor(images, name=name)
    if tuple(x.shape[-2:]) != (shapes.SIZE, shapes.SIZE):
        checks.fail(name, f"picture of size {x.shape[-2]}x{x.shape[-1]}",
                    f"expected size {shapes.SIZE}x{shapes.SIZE} (the image encoder's input)")
    return x


# ----------------------------------------------------------------------------- training

_CACHE: dict = {}
_BROKEN = "expected finite text features (are the text encoder's weights NaN?): the "


def _fingerprint(module) -> tuple:
    p = next(module.parameters())
    return (id(module), float(p.detach().double().sum()))


def fit(pipe, seed: int = 0, n_images: int = 3000, projector_steps: int = 400,
        batch: int = 128, progress: bool = True, clip_folder=clip.TOY_CLIP_DIR) -> ToyUnCLIP:
    """Train the projector from the toy CLIP's image embeddings (``clip_folder``, frozen) to
    ``pipe``'s text hidden states; cached in memory.

    Deterministic by ``seed`` (its own RNGs; the global torch RNG is left as it was).
    Calling again with the same pipe and arguments returns the cached model at once.
    The pictures (``n_images`` of them, kept as float32) and their embedding in chunks of 256
    must fit in memory: the error gives the estimate and the limit (``SDKIT_MEMORY_LIMIT=32GiB``
    raises it). A progress bar shows the steps (``progress=False`` hides it); Jupyter's stop
    button (KeyboardInterrupt) stops it with nothing cached, and a non-finite loss stops it
    with an error.

    Introduced in notebooks/11_image_variations.ipynb.
    """
    seed = checks.check_seed(seed)
    n_images = checks.check_int("n_images", n_images, 16, 1_000_000)
    projector_steps = checks.check_int("projector_steps", projector_steps, 0, 100_000)
    batch = checks.check_int("batch", batch, 2, n_images)
    progress = checks.check_bool("progress", progress)
    key = (_fingerprint(pipe.text_encoder), seed, str(clip_folder), n_images, projector_steps,
           batch)
    if key in _CACHE:
        return _CACHE[key]
    clip_model, tokenizer = clip.load_clip(clip_folder), CLIPTokenizer.from_pretrained(clip_folder)
    per_item = device._per_sample_bytes(clip_model, lambda: clip_model.get_image_features(
        pixel_values=torch.zeros(1, 3, shapes.SIZE, shapes.SIZE)), training=False)
    picture = 3 * shapes.SIZE * shapes.SIZE  # one drawn picture: uint8, then float32
    device.check_memory("n_images", n_images, n_images * (6 * picture + 4 * EMBED_DIM)
                        + min(n_images, 256) * per_item, f"{n_images:,} training pictures "
                        f"and their CLIP embeddings", "cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _fit(pipe, clip_model, tokenizer, seed, n_images, projector_steps, batch,
                     progress)
    _CACHE[key] = model
    return model


def _fit(pipe, clip_model, tokenizer, seed, n_images, projector_steps, batch, progress):
    images, captions = _images(n_images, seed=50_000_000 + seed)  # away from other seeds
    uniq = sorted(set(captions))
    _, hidden = text_features(pipe, uniq)  # (U, 20, 128): what the UNet reads
    index = torch.tensor([uniq.index(c) for c in captions])
    model = ToyUnCLIP(clip_model, tokenizer, hidden.shape[1], hidden.shape[2])
    gen = torch.Generator().manual_seed(seed)
    embeds = clip.embed_images(model.clip, images)  # (N, 128) unit vectors, frozen
    model.embeds_mean.copy_(embeds.mean(0))
    model.embeds_std.copy_(embeds.std(0) + 1e-6)
    opt = torch.optim.AdamW(model.projector.parameters(), lr=1e-3, weight_decay=0.0)
    losses = []
    bar = tqdm(range(projector_steps), desc="toy unCLIP projector", disable=not progress)
    for step in bar:  # noised image embedding + level -> the caption's hidden states
        idx = torch.randint(0, n_images, (batch,), generator=gen)
        levels = torch.randint(0, MAX_NOISE_LEVEL + 1, (batch,), generator=gen)
        noise = torch.randn(batch, embeds.shape[1], generator=gen)
        x = noise_augment(model, embeds[idx], levels, noise=noise)
        loss = F.mse_loss(model.projector(x, levels), hidden[index[idx]])
        finetune._finite(loss, "pipe", "its text features", _BROKEN + f"the MSE at step {step + 1}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(mse=f"{np.mean(losses[-20:]):.4f}")
    model.history["projector_mse"] = losses
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- using it


def embed_images(model: ToyUnCLIP, images) -> torch.Tensor:
    """The toy CLIP's unit-length image embeddings (B, 128) of a list of 64x64 pictures
    (``clip.embed_images`` on ``model.clip``).

    Introduced in notebooks/11_image_variations.ipynb.
    """
    return clip.embed_images(model.clip, _pictures(images, "images"))


@torch.no_grad()
def retrieve(model: ToyUnCLIP, images, captions=None) -> list[str]:
    """The caption whose toy-CLIP embedding is nearest each picture's (CLIP's zero-shot
    classification). ``captions`` defaults to every caption of the shapes grammar (in reading
    order).

    Introduced in notebooks/11_image_variations.ipynb.
    """
    if captions is None:
        captions = sorted({canonical_caption(shapes.parse_caption(c))
                           for c in shapes.all_captions()})
    txt = clip.embed_texts(model.clip, model.tokenizer, captions)  # (C, 128)
    sims = embed_images(model, images) @ txt.T  # (B, C)
    return [captions[i] for i in sims.argmax(-1).tolist()]


@torch.no_grad()
def variations(pipe, model: ToyUnCLIP, image, seeds, noise_level: int = 0,
               num_inference_steps: int | None = None, guidance_scale: float | None = None):
    """Variations of one 64x64 picture: one PIL image per seed.

    For each seed, a CPU generator draws the embedding's noise first and then the
    starting latents (unCLIP's order); the projected hidden states go to the unchanged
    pipeline as ``prompt_embeds`` (the empty prompt is the unconditional side). ``model``
    must be ``fit`` on this pipe; four seeds or more show a progress bar.

    Introduced in notebooks/11_image_variations.ipynb.
    """
    steps, scale = pipeline.resolve_settings(pipe, num_inference_steps, guidance_scale)
    level = checks.check_int("noise_level", noise_level, 0, MAX_NOISE_LEVEL)
    seeds = [seeds] if isinstance(seeds, (int, np.integer)) else checks.check_list("seeds", seeds)
    generators = pipeline.make_generators(seeds)  # one CPU generator per seed
    emb = embed_images(model, image)  # (1, 128)
    if len(emb) != 1:
        checks.fail("image", f"{len(emb)} pictures", "expected one picture")
    out = []
    if (model.projector.seq_len, model.projector.hidden) != tuple(hidden_shape := (
            pipe.tokenizer.model_max_length, pipe.text_encoder.config.hidden_size)):
        checks.fail("model", f"a ToyUnCLIP for ({model.projector.seq_len}, "
                             f"{model.projector.hidden}) text states", f"expected one fit on "
                             f"this pipe, whose text states are {hidden_shape}")
    for g in tqdm(generators, desc="variations", disable=len(generators) < 4):
        x = noise_augment(model, emb, level, generator=g)
        hidden = model.projector(x, torch.tensor([level])).to(pipe.device, pipe.unet.dtype)
        out.append(pipe(prompt_embeds=hidden, num_inference_steps=steps, guidance_scale=scale,
                        generator=g).images[0])
    return out
