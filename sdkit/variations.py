"""Image variations: the idea of Stable unCLIP, built small enough to train in a notebook.

Stable unCLIP conditions the UNet on a CLIP *image* embedding (alongside the text), with
noise added to that embedding at a chosen ``noise_level``; diffusers runs it as
``StableUnCLIPImg2ImgPipeline``. The toy model has no CLIP image tower and its UNet was
never taught to read image embeddings, so this module builds the same idea from parts
that train in seconds on a CPU:

1. ``ImageEncoder``: a small CNN trained CLIP-style (symmetric InfoNCE) against the frozen
   toy text encoder's pooled caption embeddings, so that image and text embeddings share
   one space (``train_encoder``).
2. ``Projector``: an MLP from a (noise-augmented) image embedding plus the noise level to
   the (20, 128) text hidden states the UNet's cross-attention reads, trained with MSE on
   drawn shapes pictures (``train_projector``). Noise augmentation is unCLIP's: normalise
   the embedding, ``DDPMScheduler.add_noise`` at ``noise_level``, un-normalise, and tell the
   projector the level.
3. ``variations``: embed a picture, noise, project, and sample the unchanged toy
   pipeline with ``prompt_embeds`` and several seeds (``shapes.hits`` then says which
   variations kept the picture's objects).

Training is deterministic by seed and cached in memory (``fit``). Notebook 11 writes one
InfoNCE step in a cell (asserted equal to ``info_nce``) before ``fit`` runs the loop; its
real-weights path (diffusers' ``StableUnCLIPImg2ImgPipeline``) is ``sdkit.unclip``. Left out:
unCLIP's prior (text -> image embedding), mixing text and image conditioning in one prompt,
and fine-tuning the toy UNet itself to read the embedding through its class-embedding input.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.models.embeddings import get_timestep_embedding
from tqdm.auto import tqdm

from . import checks, clip, device, finetune, pipeline, shapes
from .images import to_tensor

EMBED_DIM = 128  # the shared image-text embedding width
LEVEL_DIM = 32  # width of the sinusoidal noise-level embedding given to the projector
MAX_NOISE_LEVEL = 999  # noise levels run 0..999, as unCLIP's image_noising_scheduler
_ORDER = {"left": 0, "top": 0, "center": 1, "right": 2, "bottom": 2}


# ----------------------------------------------------------------------------- models


class ImageEncoder(nn.Module):
    """(B, 3, 64, 64) in [-1, 1] -> (B, 128) unit-length embeddings.

    A 2x average pool, three stride-2 convolutions and a linear layer on the flattened
    4x4 grid (flattening keeps *where* things are, which a global pool would lose).

    Introduced in notebooks/11_image_variations.ipynb.
    """

    def __init__(self, width: int = 16, embed_dim: int = EMBED_DIM):
        super().__init__()
        self.net = nn.Sequential(
            nn.AvgPool2d(2),  # (B, 3, 32, 32)
            nn.Conv2d(3, width, 3, 2, 1), nn.SiLU(),  # (B, 16, 16, 16)
            nn.Conv2d(width, 2 * width, 3, 2, 1), nn.SiLU(),  # (B, 32, 8, 8)
            nn.Conv2d(2 * width, 4 * width, 3, 2, 1), nn.SiLU(),  # (B, 64, 4, 4)
            nn.Flatten(), nn.Linear(4 * width * 16, embed_dim),  # (B, 128)
        )

    def forward(self, x):
        return F.normalize(self.net(x), dim=-1)


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
    """The trained parts: encoder, text projection, projector and the embedding statistics
    (what ``fit`` returns).

    Introduced in notebooks/11_image_variations.ipynb.
    """

    def __init__(self, seq_len: int, hidden: int, text_dim: int):
        super().__init__()
        self.encoder = ImageEncoder()
        self.text_projection = nn.Linear(text_dim, EMBED_DIM, bias=False)  # as CLIP's
        self.logit_scale = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))  # CLIP's start
        self.projector = Projector(seq_len, hidden)
        self.register_buffer("embeds_mean", torch.zeros(EMBED_DIM))
        self.register_buffer("embeds_std", torch.ones(EMBED_DIM))
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


def _fingerprint(pipe) -> tuple:
    p = next(pipe.text_encoder.parameters())
    return (id(pipe.text_encoder), float(p.detach().double().sum()))


def fit(pipe, seed: int = 0, n_images: int = 3000, encoder_steps: int = 300,
        projector_steps: int = 400, batch: int = 128, progress: bool = True) -> ToyUnCLIP:
    """Train the toy unCLIP parts against ``pipe``'s frozen text encoder; cached in memory.

    Deterministic by ``seed`` (its own RNGs; the global torch RNG is left as it was).
    Calling again with the same pipe and arguments returns the cached model at once.
    The pictures (``n_images`` of them, kept as float32) and a ``batch``'s activations must
    fit in memory: the error gives the estimate and the limit (``SDKIT_MEMORY_LIMIT=32GiB``
    raises it). A progress bar shows the steps (``progress=False`` hides it); Jupyter's stop
    button (KeyboardInterrupt) stops it with nothing cached, and a non-finite loss stops it
    with an error.

    Introduced in notebooks/11_image_variations.ipynb.
    """
    seed = checks.check_seed(seed)
    n_images = checks.check_int("n_images", n_images, 16, 1_000_000)
    encoder_steps = checks.check_int("encoder_steps", encoder_steps, 0, 100_000)
    projector_steps = checks.check_int("projector_steps", projector_steps, 0, 100_000)
    batch = checks.check_int("batch", batch, 2, n_images)
    progress = checks.check_bool("progress", progress)
    key = (_fingerprint(pipe), seed, n_images, encoder_steps, projector_steps, batch)
    if key in _CACHE:
        return _CACHE[key]
    with torch.random.fork_rng(devices=[]):  # the estimate's encoder draws weights too
        enc = ImageEncoder()
        per_item = device._per_sample_bytes(enc, lambda: enc(torch.zeros(1, 3, shapes.SIZE,
                                                                          shapes.SIZE)))
        picture = 3 * shapes.SIZE * shapes.SIZE  # one drawn picture: uint8, then float32
        device.check_memory("n_images", n_images, n_images * (6 * picture + 4 * EMBED_DIM)
                            + batch * per_item, f"{n_images:,} training pictures and batches "
                            f"of {batch}", "cpu")
        torch.manual_seed(seed)
        model = _fit(pipe, seed, n_images, encoder_steps, projector_steps, batch, progress)
    _CACHE[key] = model
    return model


def _fit(pipe, seed, n_images, encoder_steps, projector_steps, batch, progress):
    images, captions = _images(n_images, seed=50_000_000 + seed)  # away from other seeds
    uniq = sorted(set(captions))
    pooled, hidden = text_features(pipe, uniq)  # (U, 128), (U, 20, 128)
    index = torch.tensor([uniq.index(c) for c in captions])
    model = ToyUnCLIP(hidden.shape[1], hidden.shape[2], pooled.shape[1])
    gen = torch.Generator().manual_seed(seed)
    bar = tqdm(total=encoder_steps + projector_steps, desc="toy unCLIP", disable=not progress)

    # 1. CLIP-style: images against the frozen text encoder's pooled embeddings
    params = [*model.encoder.parameters(), *model.text_projection.parameters(), model.logit_scale]
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.0)
    losses = []
    for step in range(encoder_steps):
        idx = torch.randint(0, n_images, (batch,), generator=gen)
        loss = info_nce(model.encoder(images[idx]), model.text_projection(pooled[index[idx]]),
                        model.logit_scale)
        finetune._finite(loss, "pipe", "its text features", _BROKEN + f"InfoNCE at step {step + 1}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, np.log(100))  # CLIP's cap
        losses.append(loss.item())
        bar.update()
        bar.set_postfix(info_nce=f"{np.mean(losses[-20:]):.3f}")
    model.history["info_nce"] = losses

    # 2. the projector: noised image embedding + level -> caption hidden states
    model.encoder.requires_grad_(False)
    with torch.no_grad():
        embeds = torch.cat([model.encoder(images[i:i + 512]) for i in range(0, n_images, 512)])
    model.embeds_mean.copy_(embeds.mean(0))
    model.embeds_std.copy_(embeds.std(0) + 1e-6)
    opt = torch.optim.AdamW(model.projector.parameters(), lr=1e-3, weight_decay=0.0)
    losses = []
    for step in range(projector_steps):
        idx = torch.randint(0, n_images, (batch,), generator=gen)
        levels = torch.randint(0, MAX_NOISE_LEVEL + 1, (batch,), generator=gen)
        noise = torch.randn(batch, EMBED_DIM, generator=gen)
        x = noise_augment(model, embeds[idx], levels, noise=noise)
        loss = F.mse_loss(model.projector(x, levels), hidden[index[idx]])
        finetune._finite(loss, "pipe", "its text features", _BROKEN + f"the MSE at step {step + 1}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bar.update()
        bar.set_postfix(mse=f"{np.mean(losses[-20:]):.4f}")
    model.history["projector_mse"] = losses
    bar.close()
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- using it


@torch.no_grad()
def embed_images(model: ToyUnCLIP, images) -> torch.Tensor:
    """Image embeddings (B, 128) of a list of 64x64 pictures.

    Introduced in notebooks/11_image_variations.ipynb.
    """
    return model.encoder(_pictures(images, "images"))


@torch.no_grad()
def retrieve(model: ToyUnCLIP, pipe, images, captions=None) -> list[str]:
    """The caption whose embedding is nearest each picture's (CLIP's zero-shot classification).

    ``captions`` defaults to every caption of the shapes grammar (in reading order).

    Introduced in notebooks/11_image_variations.ipynb.
    """
    if captions is None:
        captions = sorted({canonical_caption(shapes.parse_caption(c))
                           for c in shapes.all_captions()})
    pooled, _ = text_features(pipe, captions)
    txt = F.normalize(model.text_projection(pooled), dim=-1)  # (C, 128)
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
    emb = model.encoder(_pictures(image, "image"))  # (1, 128)
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
