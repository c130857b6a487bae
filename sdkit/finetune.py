"""Fine-tuning: teaching a trained Stable Diffusion something new, three ways.

The toy model never saw the colour purple or the shape star. This module teaches them
with the three classic small fine-tuning methods, each training a few parameters on the
model's own objective (the v-prediction or epsilon loss of its training schedule) while
everything else stays frozen:

* **textual inversion** learns one new row of the text encoder's token-embedding matrix
  (a new word such as ``<star>``); the UNet and the rest of the text encoder are frozen;
* **DreamBooth with LoRA** adds low-rank updates ``W + (alpha / r) B A`` to the UNet's
  attention projections and ResNet convolutions (peft) and binds a subject to a rare
  identifier (``sks``);
* **hypernetworks** (the NovelAI / AUTOMATIC1111 kind) put small MLPs in front of every
  cross-attention layer's keys and values: ``k = to_k(ctx + h_k(ctx))``, installed as a
  diffusers attention processor.

Each trainer works on copies of the parts it changes, so the pipeline you pass in is left
exactly as it was, and returns a ``FineTuneResult`` holding a ready pipeline, the loss
curve and the parameter count. ``success_rate`` measures what was learned with the
shapes checker. Trained weights are saved as safetensors.

Left out: full DreamBooth (all UNet weights), training the text encoder with LoRA,
multi-vector embeddings, learning-rate schedules, EMA, mixed precision, augmentation.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0
from tqdm.auto import tqdm

from . import checks, shapes
from .checks import fail

# What LoRA adapts: the attention projections (diffusers' DreamBooth-LoRA default) and the
# ResNet convolutions (LyCORIS calls this LoCon). A new *shape* lives in the convolutions:
# with the attention layers alone the toy model learns the star's colour but not its points.
ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
LORA_TARGETS = ATTENTION_TARGETS + ("conv1", "conv2")
P_UNCOND = 0.1  # share of empty captions in fine-tuning batches, as in the toy model's training
TOKEN_RE = re.compile(r"^<[a-z][a-z0-9_-]*>$")  # a new word for textual inversion: "<star>"

# ------------------------------------------------------------------------------ data


@dataclass
class ConceptData:
    """Training pictures of a concept: ``images`` (N, 64, 64, 3) uint8, their ``captions``
    and the ``objects`` really drawn (what the checker should find)."""

    images: np.ndarray
    captions: list[str]
    objects: list[tuple]

    def __len__(self) -> int:
        return len(self.captions)

    def grid(self, n: int = 8, scale: int = 2):
        """The first ``n`` pictures side by side (PIL), enlarged ``scale`` times."""
        from diffusers.utils import make_image_grid
        from PIL import Image

        n = checks.check_int("n", n, 1, len(self))
        ims = [Image.fromarray(im).resize((64 * scale, 64 * scale), Image.NEAREST)
               for im in self.images[:n]]
        return make_image_grid(ims, rows=1, cols=n)


def make_concept_data(colours, shapes_, n: int = 16, template: str = "a {colour} {shape} {where}",
                      positions=None, caption_colours=None, seed: int = 0) -> ConceptData:
    """Draw ``n`` single-shape pictures of the given colours and shapes with captions from
    ``template`` (fields ``{colour}``, ``{shape}``, ``{where}``).

    The (colour, shape, position) combinations are cycled in a seeded random order, so
    every combination appears before any repeats. ``caption_colours`` (default: the drawn
    colour) is the colour word the caption uses, picked per picture from this list: a style
    like "everything purple" is taught with captions that name the usual colours.

    ``make_concept_data(["red", "blue"], ["star"], 8, "a {colour} <star> {where}")`` draws
    red and blue stars captioned "a red <star> on the left", ...

    Introduced in notebooks/09_fine_tuning.ipynb.
    """
    n = checks.check_int("n", n, 1, 10_000)
    seed = checks.check_seed(seed)
    colours = _words("colours", colours, shapes.COLOURS)
    shapes_ = _words("shapes_", shapes_, shapes.SHAPES)
    positions = _words("positions", list(shapes.POSITIONS) if positions is None else positions,
                       shapes.POSITIONS)
    cap_colours = (None if caption_colours is None
                   else _words("caption_colours", caption_colours, shapes.COLOURS))
    if not isinstance(template, str) or "{where}" not in template:
        fail("template", template, "expected a str with a {where} field (and optionally "
                                   "{colour}, {shape}), e.g. 'a {colour} <star> {where}'")
    rng = np.random.default_rng(seed)
    combos = list(itertools.product(colours, shapes_, positions))
    rounds = math.ceil(n / len(combos))
    order = [combos[i] for _ in range(rounds) for i in rng.permutation(len(combos))]
    images, captions, objects = [], [], []
    for i, (colour, shape, pos) in enumerate(order[:n]):
        obj = shapes.Obj(colour, shape, pos)
        word = colour if cap_colours is None else cap_colours[int(rng.integers(len(cap_colours)))]
        try:
            caption = template.format(colour=word, shape=shape, where=shapes.PHRASES[pos])
        except (KeyError, IndexError):
            fail("template", template, "expected only the fields {colour}, {shape}, {where}")
        images.append(shapes.render([obj], seed=seed * 100_003 + i).image)
        captions.append(caption)
        objects.append((obj,))
    return ConceptData(np.stack(images), captions, objects)


def _words(name, value, allowed) -> list[str]:
    if isinstance(value, str) or not hasattr(value, "__iter__"):
        fail(name, value, f"expected a list of words from {sorted(allowed)}")
    value = list(value)
    if not value or any(v not in allowed for v in value):
        fail(name, value, f"expected a non-empty list of words from {sorted(allowed)}")
    return value


def fill_template(template: str, n: int, colours=shapes.TRAIN_COLOURS, shapes_=("circle",),
                  positions=None) -> list[str]:
    """``n`` prompts from ``template`` (fields ``{colour}``, ``{shape}``, ``{where}``),
    cycling through the colours, shapes and positions in a fixed order: prompt i uses
    ``colours[i % C]``, ``shapes_[(i // C) % S]``, ``positions[i % P]``.

    Introduced in notebooks/09_fine_tuning.ipynb.
    """
    n = checks.check_int("n", n, 1, 100_000)
    colours = _words("colours", colours, shapes.COLOURS)
    shapes_ = _words("shapes_", shapes_, shapes.SHAPES)
    positions = _words("positions", list(shapes.POSITIONS) if positions is None else positions,
                       shapes.POSITIONS)
    if not isinstance(template, str):
        fail("template", template, "expected a str such as 'a {colour} {shape} {where}'")
    out = []
    for i in range(n):
        try:
            out.append(template.format(colour=colours[i % len(colours)],
                                       shape=shapes_[(i // len(colours)) % len(shapes_)],
                                       where=shapes.PHRASES[positions[i % len(positions)]]))
        except (KeyError, IndexError):
            fail("template", template, "expected only the fields {colour}, {shape}, {where}")
    return out


@torch.no_grad()
def encode_images(vae, images, size: int | None = None, batch_size: int = 64) -> torch.Tensor:
    """Scaled VAE latents of pictures: the training set of fine-tuning.

    ``latents = vae.encode(x).latent_dist.mean * vae.config.scaling_factor`` with ``x`` the
    pictures in [-1, 1]; returns (N, 4, H/8, W/8) float32. ``images``: a uint8 array
    (N, H, W, 3) or a list of PIL images; ``size`` resizes them (bicubic) to size x size
    first, e.g. the 64 px shapes to 512 px for real SD weights. Computed once: training
    then works on latents only and never runs the VAE.

    Introduced in notebooks/09_fine_tuning.ipynb.
    """
    from PIL import Image

    if isinstance(images, (list, tuple)) and images and all(isinstance(i, Image.Image)
                                                            for i in images):
        images = np.stack([np.asarray(i.convert("RGB")) for i in images])
    if not isinstance(images, np.ndarray) or images.ndim != 4 or images.shape[-1] != 3 \
            or images.dtype != np.uint8 or len(images) == 0:
        shown = f"array {images.dtype} {images.shape}" if isinstance(images, np.ndarray) else images
        fail("images", shown, "expected a uint8 array (N, H, W, 3) or a list of PIL images")
    if size is not None:
        size = checks.check_size(size, size)[0]
        if images.shape[1:3] != (size, size):
            images = np.stack([np.asarray(Image.fromarray(i).resize((size, size), Image.BICUBIC))
                               for i in images])
    batch_size = checks.check_int("batch_size", batch_size, 1)
    p = next(vae.parameters())
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size].transpose(0, 3, 1, 2)))
        x = x.to(p.device, p.dtype) / 127.5 - 1  # (B, 3, H, W) in [-1, 1]
        out.append(vae.encode(x).latent_dist.mean.float().cpu())  # (B, 4, H/8, W/8)
    return torch.cat(out) * vae.config.scaling_factor


# ------------------------------------------------------------------------------ the objective


def training_scheduler(pipe):
    """The noise schedule the model was trained with: for the toy model
    ``sdkit.toy.make_scheduler()`` (zero terminal SNR, v-prediction); for real SD weights a
    ``DDPMScheduler`` from the pipeline's scheduler config (SD 1.x: epsilon prediction).

    Introduced in notebooks/09_fine_tuning.ipynb.
    """
    from diffusers import DDPMScheduler

    from .pipeline import is_toy
    from .toy import make_scheduler

    return make_scheduler() if is_toy(pipe) else DDPMScheduler.from_config(pipe.scheduler.config)


def diffusion_loss(unet, scheduler, latents, encoder_hidden_states, noise, timesteps,
                   cross_attention_kwargs=None) -> torch.Tensor:
    """The training loss of Stable Diffusion on one batch: noise the clean ``latents`` to
    ``timesteps``, let the UNet predict, and take the mean squared error against the target
    of the schedule's ``prediction_type`` (the velocity ``scheduler.get_velocity`` for
    v-prediction, the noise itself for epsilon).

    Introduced in notebooks/09_fine_tuning.ipynb.
    """
    noisy_latents = scheduler.add_noise(latents, noise, timesteps)  # (B, 4, h, w)
    kind = scheduler.config.prediction_type
    target = scheduler.get_velocity(latents, noise, timesteps) if kind == "v_prediction" else noise
    model_pred = unet(noisy_latents, timesteps, encoder_hidden_states,
                      cross_attention_kwargs=cross_attention_kwargs).sample
    return F.mse_loss(model_pred.float(), target.float())


# ------------------------------------------------------------------------------ results


@dataclass
class FineTuneResult:
    """What a trainer returns: a pipeline that uses the trained parts (``pipe``; the frozen
    parts are shared with the pipeline you passed in), the loss of every step, the number
    of trained parameters and where they live, and the wall time."""

    method: str
    pipe: object
    losses: list[float]
    trained_parameters: int
    trained_modules: list[str]
    seconds: float
    extra: dict = field(default_factory=dict)

    def smoothed_losses(self, window: int = 20) -> np.ndarray:
        """Moving average of the loss curve (the raw curve is noisy: random timesteps)."""
        window = checks.check_int("window", window, 1)
        x = np.asarray(self.losses, dtype=np.float64)
        w = min(window, len(x))
        return np.convolve(x, np.ones(w) / w, mode="valid")


def _rebuild(pipe, **parts):
    """A StableDiffusionPipeline of the same class sharing every part but ``parts``."""
    comps = {**pipe.components, **parts}
    with warnings.catch_warnings():  # the toy sampler's steps_offset notice, already shown on load
        warnings.simplefilter("ignore", FutureWarning)
        new = type(pipe)(**comps, requires_safety_checker=False)
    new.set_progress_bar_config(disable=True)
    return new


def _check_train_args(steps, lr, batch_size, seed, latents, captions, tokenizer):
    steps = checks.check_int("steps", steps, 1, 100_000)
    lr = checks.check_float("lr", lr, 0.0, 10.0)
    if lr == 0:
        fail("lr", lr, "expected a learning rate > 0 (e.g. 1e-3)")
    batch_size = checks.check_int("batch_size", batch_size, 1, 4096)
    seed = checks.check_seed(seed)
    if not torch.is_tensor(latents) or latents.ndim != 4:
        shown = f"tensor {tuple(latents.shape)}" if torch.is_tensor(latents) else latents
        fail("latents", shown, "expected a tensor (N, 4, h, w) from encode_images")
    if not isinstance(captions, (list, tuple)) or len(captions) != len(latents):
        fail("captions", captions, f"expected a list of {len(latents)} captions, one per latent")
    for c in captions:
        checks.check_prompt(c, tokenizer, name="captions", known_words_only=False)
    return steps, lr, batch_size, seed


def _ids(tokenizer, captions) -> torch.Tensor:
    return tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def _train(desc, unet, params, encode, latents, steps, lr, batch_size, seed, scheduler,
           class_latents=None, prior_weight=1.0, uncond=None, p_uncond=P_UNCOND):
    """The loop shared by the three methods: sample a batch, noise it, one AdamW step.

    ``encode(idx, prior)`` gives the encoder_hidden_states of the captions at ``idx``.
    With ``class_latents`` each step adds the prior-preservation loss on a batch of the
    model's own class pictures (DreamBooth), weighted by ``prior_weight``.

    ``uncond`` (1, T, d), the empty prompt's encoder_hidden_states: a share ``p_uncond`` of
    each batch trains with it instead of the caption, as the model itself was trained.
    Methods that change the UNet for every prompt need this: classifier-free guidance
    extrapolates from the unconditional prediction, and one left behind by the fine-tune
    turns ``uncond + s * (cond - uncond)`` into colour noise at the default guidance.
    """
    g = torch.Generator("cpu").manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    device = next(unet.parameters()).device
    n_train = scheduler.config.num_train_timesteps
    losses = []

    def batch_loss(lat, prior):
        idx = torch.randint(0, len(lat), (batch_size,), generator=g)
        x0 = lat[idx].to(device)  # (B, 4, h, w)
        noise = torch.randn(x0.shape, generator=g).to(device)
        t = torch.randint(0, n_train, (batch_size,), generator=g).to(device)
        context = encode(idx, prior)  # (B, T, d)
        if uncond is not None:
            drop = (torch.rand(batch_size, generator=g) < p_uncond).to(device)
            context = torch.where(drop[:, None, None], uncond.to(context.dtype), context)
        return diffusion_loss(unet, scheduler, x0, context, noise, t)

    t0 = time.time()
    bar = tqdm(range(steps), desc=desc)
    for step in bar:
        loss = batch_loss(latents, False)
        total = loss
        if class_latents is not None:
            total = loss + prior_weight * batch_loss(class_latents, True)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
    return losses, time.time() - t0


class _Frozen:
    """Context manager: requires_grad off for a module's parameters, restored on exit."""

    def __init__(self, *modules):
        self.params = [p for m in modules for p in m.parameters()]

    def __enter__(self):
        self.saved = [p.requires_grad for p in self.params]
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p, r in zip(self.params, self.saved, strict=True):
            p.requires_grad_(r)
        return False


# ------------------------------------------------------------------------------ textual inversion


def add_token(tokenizer, text_encoder, token: str, init_word: str) -> int:
    """Add ``token`` (e.g. ``"<star>"``) to the tokenizer and give it a row of the text
    encoder's embedding matrix, copied from the single-token word ``init_word``; returns
    the new token id. Changes the tokenizer and text encoder in place.

    Introduced in notebooks/09_fine_tuning.ipynb.
    """
    if not isinstance(token, str) or not TOKEN_RE.match(token):
        fail("token", token, "expected a new word in angle brackets, lower-case letters, digits, "
                             "'_' or '-', e.g. '<star>'")
    if token in tokenizer.get_vocab():
        fail("token", token, "expected a token the tokenizer does not know yet")
    if not isinstance(init_word, str):
        fail("init_word", init_word, "expected a str, a word the tokenizer has one token for")
    init_ids = tokenizer(init_word, add_special_tokens=False).input_ids
    if len(init_ids) != 1:
        fail("init_word", init_word, f"expected a word that is a single token; it splits into "
                                     f"{tokenizer.convert_ids_to_tokens(init_ids)}")
    if tokenizer.add_tokens(token) != 1:  # pragma: no cover (checked above)
        fail("token", token, "the tokenizer refused to add it")
    token_id = tokenizer.convert_tokens_to_ids(token)
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        emb = text_encoder.get_input_embeddings().weight
        emb[token_id] = emb[init_ids[0]]
    return token_id


def train_textual_inversion(pipe, latents, captions, token: str = "<star>",
                            init_word: str = "triangle", steps: int = 300, lr: float = 1e-2,
                            batch_size: int = 8, seed: int = 0) -> FineTuneResult:
    """Textual inversion: learn the embedding of a new word ``token`` from pictures.

    Works on copies of ``pipe.tokenizer`` and ``pipe.text_encoder`` (the pipeline passed in
    stays unchanged). The new token's row starts as ``init_word``'s; a gradient mask keeps
    every other row at exactly its old value (AdamW without weight decay leaves a parameter
    with zero gradient untouched). The UNet and VAE are frozen and shared.

    Returns a ``FineTuneResult`` whose ``extra`` holds ``tokenizer``, ``text_encoder``,
    ``token`` and ``token_id``.

    Introduced in notebooks/09_fine_tuning.ipynb.
    """
    tokenizer = copy.deepcopy(pipe.tokenizer)
    text_encoder = copy.deepcopy(pipe.text_encoder)
    torch.manual_seed(checks.check_seed(seed))
    token_id = add_token(tokenizer, text_encoder, token, init_word)
    steps, lr, batch_size, seed = _check_train_args(steps, lr, batch_size, seed, latents, captions,
                                                    tokenizer)
    if not any(token in c for c in captions):
        fail("captions", captions[:2], f"expected captions that use the new token {token!r}")
    text_encoder.requires_grad_(False)
    weight = text_encoder.get_input_embeddings().weight  # (V, d)
    weight.requires_grad_(True)
    mask = torch.zeros(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
    mask[token_id] = 1.0
    hook = weight.register_hook(lambda grad: grad * mask)  # only the new row gets a gradient
    ids = _ids(tokenizer, captions).to(weight.device)  # (N, T)
    with _Frozen(pipe.unet):
        losses, seconds = _train(
            f"textual inversion {token}", pipe.unet, [weight],
            lambda idx, _: text_encoder(ids[idx])[0],  # (B, T, d): the text encoder runs each step
            latents, steps, lr, batch_size, seed, training_scheduler(pipe))
    hook.remove()
    weight.requires_grad_(False)
    text_encoder.eval()
    return FineTuneResult(
        "textual inversion", _rebuild(pipe, tokenizer=tokenizer, text_encoder=text_encoder), losses,
        trained_parameters=weight.shape[1], seconds=seconds,
        trained_modules=[f"text_encoder.{_name_of(text_encoder, weight)}[{token_id}]"],
        extra={"tokenizer": tokenizer, "text_encoder": text_encoder, "token": token,
               "token_id": token_id, "init_word": init_word})


def _name_of(module, param) -> str:
    return next(n for n, p in module.named_parameters() if p is param)


def save_embedding(result: FineTuneResult, path) -> Path:
    """Save a learned word as safetensors in diffusers' format ``{token: vector (d,)}``;
    ``pipe.load_textual_inversion(path)`` of stock diffusers reads it back.

    Introduced in notebooks/09_fine_tuning.ipynb.
    """
    from safetensors.torch import save_file

    _check_result(result, "textual inversion")
    row = result.extra["text_encoder"].get_input_embeddings().weight[result.extra["token_id"]]
    path = _out_path(path)
    save_file({result.extra["token"]: row.detach().float().cpu().contiguous()}, str(path))
    return path


def load_embedding(pipe, path):
    """A new pipeline whose copied tokenizer and text encoder know the word saved in
    ``path`` (``pipe`` itself is left unchanged). Introduced in notebooks/09_fine_tuning.ipynb.
    """
    from safetensors.torch import load_file

    state = load_file(str(_in_path(path)))
    if len(state) != 1:
        fail("path", str(path), f"expected one token in the file, found {list(state)}")
    (token, row), = state.items()
    tokenizer, text_encoder = copy.deepcopy(pipe.tokenizer), copy.deepcopy(pipe.text_encoder)
    token_id = add_token(tokenizer, text_encoder, token, "a")
    with torch.no_grad():
        text_encoder.get_input_embeddings().weight[token_id] = row
    return _rebuild(pipe, tokenizer=tokenizer, text_encoder=text_encoder)


def _check_result(result, method):
    if not isinstance(result, FineTuneResult) or result.method != method:
        fail("result", result, f"expected the FineTuneResult of train_{method.replace(' ', '_')}")


def _out_path(path) -> Path:
    path = Path(path)
    if path.suffix != ".safetensors":
        fail("path", str(path), "expected a file name ending in .safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _in_path(path) -> Path:
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        fail("path", str(path), "expected an existing .safetensors file")
    return path


# ------------------------------------------------------------------------------ LoRA


def lora_config(r: int = 4, alpha: float | None = None, target_modules=LORA_TARGETS):
    """peft's ``LoraConfig`` for the UNet's attention projections, ``lora_alpha = alpha``
    (default ``r``, a scale of 1). Introduced in notebooks/09_fine_tuning.ipynb."""
    from peft import LoraConfig

    r = checks.check_int("r", r, 1, 1024)
    alpha = float(r) if alpha is None else checks.check_float("alpha", alpha, 1e-6, 1e6)
    return LoraConfig(r=r, lora_alpha=alpha, init_lora_weights=True,
                      target_modules=list(target_modules))


def lora_parameter_count(unet, r: int, target_modules=LORA_TARGETS) -> int:
    """What LoRA of rank ``r`` adds: ``r * (in + out)`` for each adapted ``nn.Linear``
    (A is r x in, B is out x r) and ``r * (in * kh * kw + out)`` for each ``nn.Conv2d``
    (A is a kh x kw convolution to r channels, B a 1x1 one back to out).

    Introduced in notebooks/09_fine_tuning.ipynb."""
    r = checks.check_int("r", r, 1, 1024)
    total = 0
    for name, m in unet.named_modules():
        if not any(name.endswith(t) for t in target_modules) or "lora_" in name:
            continue
        if isinstance(m, torch.nn.Linear):
            total += r * (m.in_features + m.out_features)
        elif isinstance(m, torch.nn.Conv2d):
            kh, kw = m.kernel_size
            total += r * (m.in_channels * kh * kw + m.out_channels)
    return total


def train_lora(pipe, latents, captions, class_latents=None, class_captions=None, r: int = 4,
               alpha: float | None = None, prior_weight: float = 1.0, steps: int = 250,
               lr: float = 2e-3, batch_size: int = 8, seed: int = 0,
               target_modules=LORA_TARGETS, p_uncond: float = P_UNCOND) -> FineTuneResult:
    """DreamBooth with LoRA: adapt a copy of the UNet to pictures of a subject captioned
    with a rare identifier (``"a sks triangle on the left"``).

    peft adds ``B @ A`` (rank ``r``, B initialised to zero so training starts from the
    model itself) next to every layer named in ``target_modules`` (default: ``to_q``,
    ``to_k``, ``to_v``, ``to_out.0`` and the ResNets' ``conv1``, ``conv2``); only A and B
    train. With ``class_latents`` / ``class_captions`` (pictures the model itself drew for
    the class, e.g. "a red triangle on the left") each step adds ``prior_weight`` times the
    same loss on them: prior preservation keeps the class word meaning what it meant.
    A share ``p_uncond`` of each batch trains on the empty prompt (see ``P_UNCOND``), so
    that classifier-free guidance still has a sound unconditional prediction.

    Returns a ``FineTuneResult``; ``extra["unet"]`` is the adapted UNet copy.

    Introduced in notebooks/09_fine_tuning.ipynb.
    """
    config = lora_config(r, alpha, target_modules)
    p_uncond = checks.check_float("p_uncond", p_uncond, 0.0, 1.0)
    steps, lr, batch_size, seed = _check_train_args(steps, lr, batch_size, seed, latents, captions,
                                                    pipe.tokenizer)
    prior_weight = checks.check_float("prior_weight", prior_weight, 0.0, 100.0)
    if (class_latents is None) != (class_captions is None):
        fail("class_captions", class_captions, "expected class_latents and class_captions together")
    if class_latents is not None:
        _check_train_args(1, 1.0, 1, 0, class_latents, class_captions, pipe.tokenizer)
    unet = copy.deepcopy(pipe.unet)
    unet.requires_grad_(False)
    torch.manual_seed(seed)  # A's random init
    unet.add_adapter(config)
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    ctx = _encode_frozen(pipe, captions)  # (N, T, d): the text encoder is frozen
    class_ctx = None if class_captions is None else _encode_frozen(pipe, class_captions)
    losses, seconds = _train(
        "DreamBooth LoRA", unet, params,
        lambda idx, prior: (class_ctx if prior else ctx)[idx], latents, steps, lr, batch_size, seed,
        training_scheduler(pipe), class_latents=class_latents, prior_weight=prior_weight,
        uncond=_encode_frozen(pipe, [""]), p_uncond=p_uncond)
    unet.eval()
    unet.requires_grad_(False)
    modules = sorted({n.split(".lora_")[0] for n, _ in unet.named_parameters() if "lora_" in n})
    return FineTuneResult("DreamBooth LoRA", _rebuild(pipe, unet=unet), losses,
                          trained_parameters=sum(p.numel() for p in params), seconds=seconds,
                          trained_modules=[f"unet.{m}" for m in modules],
                          extra={"unet": unet, "r": config.r, "alpha": config.lora_alpha,
                                 "target_modules": list(target_modules)})


@torch.no_grad()
def _encode_frozen(pipe, captions) -> torch.Tensor:
    ids = _ids(pipe.tokenizer, captions).to(pipe.text_encoder.device)
    return pipe.text_encoder(ids)[0]  # (N, T, d)


def save_lora(result: FineTuneResult, path) -> Path:
    """Save the LoRA matrices (``get_peft_model_state_dict``) as safetensors, with r and
    alpha in the file's metadata. Introduced in notebooks/09_fine_tuning.ipynb."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    _check_result(result, "DreamBooth LoRA")
    state = get_peft_model_state_dict(result.extra["unet"])  # lora_A / lora_B of every layer
    state = {k: v.detach().contiguous() for k, v in state.items()}
    path = _out_path(path)
    meta = {"r": str(result.extra["r"]), "lora_alpha": str(result.extra["alpha"]),
            "target_modules": json.dumps(result.extra["target_modules"])}
    save_file(state, str(path), metadata=meta)
    return path


def load_lora(pipe, path):
    """A new pipeline with a copy of ``pipe.unet`` carrying the LoRA saved in ``path``.

    Introduced in notebooks/09_fine_tuning.ipynb.
    """
    from peft import set_peft_model_state_dict
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = _in_path(path)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if "r" not in meta:
        fail("path", str(path), "expected a LoRA file written by save_lora (r in its metadata)")
    unet = copy.deepcopy(pipe.unet)
    unet.add_adapter(lora_config(int(meta["r"]), float(meta["lora_alpha"]),
                                 json.loads(meta["target_modules"])))
    result = set_peft_model_state_dict(unet, load_file(str(path)))
    if getattr(result, "unexpected_keys", None):
        fail("path", str(path), f"keys that fit no LoRA layer: {result.unexpected_keys[:3]}")
    unet.requires_grad_(False)
    return _rebuild(pipe, unet=unet.eval())


# ------------------------------------------------------------------------------ hypernetwork


class HypernetworkModule(torch.nn.Module):
    """``x -> x + strength * mlp(x)``: a small MLP added to the context on its way into a
    key or value projection. The output layer starts at zero, so a new module is the
    identity and training starts from the model itself."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.ReLU(),
                                       torch.nn.Linear(hidden, dim))
        torch.nn.init.zeros_(self.mlp[2].weight)
        torch.nn.init.zeros_(self.mlp[2].bias)

    def forward(self, x, strength: float = 1.0):
        return x + strength * self.mlp(x)


class Hypernetwork(torch.nn.Module):
    """One pair (h_k, h_v) of ``HypernetworkModule`` per cross-attention layer name."""

    def __init__(self, layer_names, context_dim: int, hidden: int = 64):
        super().__init__()
        self.names = list(layer_names)
        self.k = torch.nn.ModuleList(HypernetworkModule(context_dim, hidden) for _ in self.names)
        self.v = torch.nn.ModuleList(HypernetworkModule(context_dim, hidden) for _ in self.names)

    def pair(self, name: str):
        i = self.names.index(name)
        return self.k[i], self.v[i]


class HypernetworkAttnProcessor(AttnProcessor2_0):
    """diffusers' ``AttnProcessor2_0`` with the context rewritten before the key and value
    projections: ``k = to_k(ctx + h_k(ctx))``, ``v = to_v(ctx + h_v(ctx))``; queries and
    everything else as in the stock processor. Only for cross-attention (``attn2``).

    Introduced in notebooks/09_fine_tuning.ipynb.
    """

    def __init__(self, h_k: HypernetworkModule, h_v: HypernetworkModule, strength: float = 1.0):
        super().__init__()
        self.h_k, self.h_v, self.strength = h_k, h_v, strength

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        if encoder_hidden_states is None:  # self-attention: nothing to rewrite
            return super().__call__(attn, hidden_states, None, attention_mask, temb)
        # the body of AttnProcessor2_0, with the two hypernetwork lines marked
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length,
                                                         batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1,
                                                 attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)  # (B, HW, inner)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(self.h_k(encoder_hidden_states, self.strength))  # <- hypernetwork
        value = attn.to_v(self.h_v(encoder_hidden_states, self.strength))  # <- hypernetwork
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                       dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height,
                                                                    width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def cross_attention_layers(unet) -> list[dict]:
    """Every cross-attention layer of a UNet with the resolution it works at, measured by
    one forward pass: dicts with ``name`` (the processor name), ``block``, ``resolution``
    (h, w of its latent grid), ``heads``, ``query_dim`` and ``context_dim``.

    Introduced in notebooks/09_fine_tuning.ipynb.
    """
    seen = {}
    hooks = []
    for name, module in unet.named_modules():
        if name.endswith("attn2"):
            def hook(mod, args, kwargs, name=name):
                seen[name] = kwargs.get("hidden_states", args[0] if args else None).shape[1]
            hooks.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    p = next(unet.parameters())
    side = unet.config.sample_size
    side = side if isinstance(side, int) else side[0]
    try:
        with torch.no_grad():
            x = torch.zeros(1, unet.config.in_channels, side, side, device=p.device, dtype=p.dtype)
            ctx = torch.zeros(1, 2, unet.config.cross_attention_dim, device=p.device, dtype=p.dtype)
            unet(x, torch.tensor([10], device=p.device), ctx)
    finally:
        for h in hooks:
            h.remove()
    layers = []
    for name, module in unet.named_modules():
        if name in seen:
            hw = seen[name]
            s = int(round(math.sqrt(hw)))
            layers.append({"name": f"{name}.processor", "block": name.split(".attentions")[0],
                           "resolution": (s, hw // s), "heads": module.heads,
                           "query_dim": module.to_q.in_features,
                           "context_dim": module.to_k.in_features})
    return layers


def install_hypernetwork(unet, hypernetwork: Hypernetwork, strength: float = 1.0):
    """Set ``HypernetworkAttnProcessor`` on every cross-attention layer of ``unet`` (the
    self-attention layers keep their processors). Introduced in notebooks/09_fine_tuning.ipynb."""
    strength = checks.check_float("strength", strength, -10.0, 10.0)
    procs = {}
    for name, proc in unet.attn_processors.items():
        if ".attn2." in name:
            if name not in hypernetwork.names:
                fail("hypernetwork", name, "expected a hypernetwork made for this UNet's layers")
            procs[name] = HypernetworkAttnProcessor(*hypernetwork.pair(name), strength=strength)
        else:
            procs[name] = proc
    unet.set_attn_processor(procs)
    return unet


def set_hypernetwork_strength(pipe, strength: float):
    """Scale every hypernetwork correction of a pipeline's UNet (0 = the original model).

    Introduced in notebooks/09_fine_tuning.ipynb.
    """
    strength = checks.check_float("strength", strength, -10.0, 10.0)
    procs = [p for p in pipe.unet.attn_processors.values()
             if isinstance(p, HypernetworkAttnProcessor)]
    if not procs:
        fail("pipe", pipe, "expected a pipeline from train_hypernetwork or load_hypernetwork")
    for p in procs:
        p.strength = strength


def make_hypernetwork(unet, hidden: int = 64, seed: int = 0) -> Hypernetwork:
    """A fresh (identity) hypernetwork for every ``attn2`` layer of ``unet``.

    Introduced in notebooks/09_fine_tuning.ipynb.
    """
    hidden = checks.check_int("hidden", hidden, 1, 65536)
    torch.manual_seed(checks.check_seed(seed))
    names = [n for n in unet.attn_processors if ".attn2." in n]
    p = next(unet.parameters())
    return Hypernetwork(names, unet.config.cross_attention_dim, hidden).to(p.device, p.dtype)


def train_hypernetwork(pipe, latents, captions, hidden: int = 64, steps: int = 400,
                       lr: float = 5e-4, batch_size: int = 8, seed: int = 0,
                       p_uncond: float = 0.3) -> FineTuneResult:
    """Train a hypernetwork on a copy of the UNet whose weights all stay frozen.

    It is always on: every prompt's keys and values pass through it, so it is the tool
    for a *style* (here: "draw everything purple") rather than for a new word. A style
    changes the unconditional picture too (the empty prompt's keys and values pass through
    it as well), so a larger share ``p_uncond`` of each batch trains on the empty prompt
    than the model's own 10%: with 10%, guidance 4 still extrapolates from a half-adapted
    unconditional prediction and washes the colour out.

    Returns a ``FineTuneResult``; ``extra["hypernetwork"]`` is the trained module.

    Introduced in notebooks/09_fine_tuning.ipynb.
    """
    steps, lr, batch_size, seed = _check_train_args(steps, lr, batch_size, seed, latents, captions,
                                                    pipe.tokenizer)
    p_uncond = checks.check_float("p_uncond", p_uncond, 0.0, 1.0)
    unet = copy.deepcopy(pipe.unet)
    unet.requires_grad_(False)
    hyper = make_hypernetwork(unet, hidden, seed)
    install_hypernetwork(unet, hyper)
    ctx = _encode_frozen(pipe, captions)  # (N, T, d)
    hyper.train()
    losses, seconds = _train("hypernetwork", unet, list(hyper.parameters()),
                             lambda idx, _: ctx[idx], latents, steps, lr, batch_size, seed,
                             training_scheduler(pipe), uncond=_encode_frozen(pipe, [""]),
                             p_uncond=p_uncond)
    hyper.eval().requires_grad_(False)
    return FineTuneResult("hypernetwork", _rebuild(pipe, unet=unet), losses,
                          trained_parameters=sum(p.numel() for p in hyper.parameters()),
                          seconds=seconds,
                          trained_modules=[f"unet.{n} (h_k, h_v)" for n in hyper.names],
                          extra={"hypernetwork": hyper, "unet": unet, "hidden": hidden})


def save_hypernetwork(result: FineTuneResult, path) -> Path:
    """Save the hypernetwork's weights as safetensors (layer names in the metadata).

    Introduced in notebooks/09_fine_tuning.ipynb.
    """
    from safetensors.torch import save_file

    _check_result(result, "hypernetwork")
    hyper = result.extra["hypernetwork"]
    state = {k: v.detach().contiguous() for k, v in hyper.state_dict().items()}
    path = _out_path(path)
    save_file(state, str(path), metadata={"names": json.dumps(hyper.names),
                                          "hidden": str(result.extra["hidden"])})
    return path


def load_hypernetwork(pipe, path, strength: float = 1.0):
    """A new pipeline with a copy of ``pipe.unet`` running the hypernetwork in ``path``.

    Introduced in notebooks/09_fine_tuning.ipynb.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = _in_path(path)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if "names" not in meta:
        fail("path", str(path), "expected a hypernetwork file written by save_hypernetwork")
    unet = copy.deepcopy(pipe.unet)
    hyper = Hypernetwork(json.loads(meta["names"]), unet.config.cross_attention_dim,
                         int(meta["hidden"]))
    hyper.load_state_dict(load_file(str(path)))
    install_hypernetwork(unet, hyper.eval().requires_grad_(False), strength)
    return _rebuild(pipe, unet=unet)


# ------------------------------------------------------------------------------ measuring


@dataclass
class SuccessRate:
    """The checker's verdict on generated pictures: ``rate`` (share of hits), one ``hits``
    flag and one PIL ``images`` entry per seed."""

    rate: float
    hits: list[bool]
    images: list

    def __repr__(self) -> str:
        return f"SuccessRate({sum(self.hits)}/{len(self.hits)} = {self.rate:.0%})"


@torch.no_grad()
def generate_images(pipe, prompts, seeds, batch_size: int = 8, desc: str = "generating") -> list:
    """PIL images for ``prompts`` (one str, or one per seed) at the kit's default settings,
    one CPU generator per seed (same seed, same starting noise, on every device).

    Prompts are checked against the tokenizer's window but may contain words the toy
    model has no token for (a rare identifier such as ``sks`` splits into pieces).

    Introduced in notebooks/09_fine_tuning.ipynb.
    """
    from .pipeline import default_settings

    seeds = [checks.check_seed(s, "seeds") for s in _listify("seeds", seeds)]
    prompts = _per_seed("prompts", prompts, len(seeds))
    for p in set(prompts):
        checks.check_prompt(p, pipe.tokenizer, name="prompts", known_words_only=False)
    batch_size = checks.check_int("batch_size", batch_size, 1, 1024)
    d = default_settings(pipe)
    pipe.set_progress_bar_config(disable=True)
    images = []
    for i in tqdm(range(0, len(seeds), batch_size), desc=desc, leave=False):
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds[i:i + batch_size]]
        images += pipe(prompts[i:i + batch_size], generator=gens, **d).images
    return images


def success_rate(pipe, prompts, seeds, targets, criterion: str = "colour_shape",
                 batch_size: int = 8) -> SuccessRate:
    """Generate one picture per seed and ask the shapes checker whether each ``targets``
    object is in it (``targets``: a caption in the shapes grammar, e.g. "a purple star on
    the left", or one per seed). ``criterion``: ``"colour_shape"`` (an object of the right
    colour and shape anywhere) or ``"all_attributes"`` (also at the right position).

    The checker only knows the toy model's world, so this works for the toy model only.

    Introduced in notebooks/09_fine_tuning.ipynb.
    """
    from .pipeline import is_toy

    if not is_toy(pipe):
        fail("pipe", type(pipe).__name__, "expected the toy model: the shapes checker scores "
                                          "pictures of the shapes world only")
    criterion = checks.check_choice("criterion", criterion, ["colour_shape", "all_attributes"])
    seeds = _listify("seeds", seeds)
    targets = _per_seed("targets", targets, len(seeds))
    for t in set(targets):
        try:
            shapes.parse_caption(t)
        except ValueError:
            fail("targets", t, "expected a caption of the shapes grammar, e.g. 'a purple star "
                               "on the left'")
    images = generate_images(pipe, prompts, seeds, batch_size)
    hits = [all(getattr(s, criterion) for s in shapes.check_image(np.asarray(im), t))
            for im, t in zip(images, targets, strict=True)]
    return SuccessRate(float(np.mean(hits)), hits, images)


def _listify(name, value) -> list:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        fail(name, value, "expected a list")
    value = list(value)
    if not value:
        fail(name, value, "expected a non-empty list")
    return value


def _per_seed(name, value, n) -> list[str]:
    if isinstance(value, str):
        return [value] * n
    value = _listify(name, value)
    if len(value) != n or not all(isinstance(v, str) for v in value):
        fail(name, value, f"expected one str or a list of {n} str, one per seed")
    return value


# ------------------------------------------------------------------------------ showing


def before_after_grid(before, after, scale: int = 2):
    """Two rows of PIL images, before (top) and after (bottom) fine-tuning, same seeds.

    Introduced in notebooks/09_fine_tuning.ipynb.
    """
    from diffusers.utils import make_image_grid
    from PIL import Image

    before, after = _listify("before", before), _listify("after", after)
    if len(before) != len(after):
        fail("after", f"{len(after)} images", f"expected as many as before ({len(before)})")
    ims = [im.resize((im.width * scale, im.height * scale), Image.NEAREST) for im in before + after]
    return make_image_grid(ims, rows=2, cols=len(before))


def plot_losses(results, window: int = 20):
    """The smoothed loss curves of one or more ``FineTuneResult``s, one panel each.

    Introduced in notebooks/09_fine_tuning.ipynb.
    """
    import matplotlib.pyplot as plt

    results = [results] if isinstance(results, FineTuneResult) else _listify("results", results)
    fig, axes = plt.subplots(1, len(results), figsize=(4 * len(results), 3), squeeze=False)
    for ax, r in zip(axes[0], results, strict=True):
        ax.plot(r.losses, color="0.8", lw=0.8, label="each step")
        ax.plot(np.arange(len(r.smoothed_losses(window))) + min(window, len(r.losses)) - 1,
                r.smoothed_losses(window), label=f"mean of {window}")
        ax.set(title=r.method, xlabel="step", ylabel="loss")
        ax.legend()
    fig.tight_layout()
    return fig


def file_size(path) -> int:
    """Size of a saved file in bytes. Introduced in notebooks/09_fine_tuning.ipynb."""
    return os.path.getsize(_in_path(path))


def summary_table(rows) -> str:
    """A Markdown table of dicts (one row each, columns from the first row's keys).

    Introduced in notebooks/09_fine_tuning.ipynb.
    """
    rows = _listify("rows", rows)
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ exercise


def check_exercise(answer, text_encoder) -> bool:
    """Checker for notebook 09's exercise: how many numbers does textual inversion train for
    one new word of this text encoder? Prints whether ``answer`` is right (with a hint if
    not) and returns True or False.

    Introduced in notebooks/09_fine_tuning.ipynb.
    """
    weight = text_encoder.get_input_embeddings().weight  # (V, d)
    if answer is None:
        print("Not answered yet: set `answer` to a number of parameters (an int).")
        return False
    if torch.is_tensor(answer) and answer.numel() == 1:
        answer = answer.item()
    if isinstance(answer, bool) or not isinstance(answer, (int, np.integer)):
        print(f"answer={answer!r}: expected an int.")
        return False
    if int(answer) == weight.shape[1]:
        print(f"Right: one row of the token-embedding matrix, {weight.shape[1]} numbers (SD 1.x: "
              f"768, SD 2.x: 1024). Every other weight stays frozen.")
        return True
    hint = ("that is the whole embedding matrix; only the new word's row trains"
            if answer == weight.numel() else
            "look at the shape of text_encoder.get_input_embeddings().weight: (vocabulary, width)")
    print(f"answer={answer} is not it. Hint: {hint}.")
    return False
