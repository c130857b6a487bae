"""Fine-tuning, the shared part: concept data, the objective, the training loop, measuring.

The toy model never saw the colour purple or the shape star. Notebook 10 teaches them with
three small fine-tuning methods, each in its own module, each training a few parameters on
the model's own objective while everything else stays frozen:

* ``sdkit.textual_inversion``: one new row of the text encoder's token-embedding matrix;
* ``sdkit.lora``: LoRA-DreamBooth, low-rank updates next to the UNet's layers (peft);
* ``sdkit.hypernetwork``: small MLPs in front of every cross-attention layer's keys and values.

This module holds what the three share: concept pictures and captions (``make_concept_data``,
``fill_template``), their latents (``encode_images``), the loss (``diffusion_loss``), the
training loop, the ``FineTuneResult`` it returns, the checker's success rate on generated
pictures (``success_rate``), plots and tables. The notebook writes each method's core in
its cells (the masked step, the peft wrapping, the processor); these run the loops.

Left out: full DreamBooth (every UNet weight), LoRA on the text encoder, multi-vector
embeddings, learning-rate schedules, EMA, mixed precision, augmentation.
"""

from __future__ import annotations

import itertools
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from tqdm.auto import tqdm

from . import checks, device, figures, images, pipeline, shapes
from .checks import fail

P_UNCOND = 0.1  # share of empty captions in fine-tuning batches, as in the toy model's training

# ------------------------------------------------------------------------------ data


@dataclass
class ConceptData:
    """Training pictures of a concept: ``images`` (N, 64, 64, 3) uint8, their ``captions``
    and the ``objects`` really drawn (what the checker should find); ``make_concept_data``
    makes it.

    Introduced in notebooks/10_fine_tuning.ipynb.
    """

    images: np.ndarray
    captions: list[str]
    objects: list[tuple]

    def __len__(self) -> int:
        return len(self.captions)


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

    Introduced in notebooks/10_fine_tuning.ipynb.
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
    pictures, captions, objects = [], [], []
    for i, (colour, shape, pos) in enumerate(order[:n]):
        obj = shapes.Obj(colour, shape, pos)
        word = colour if cap_colours is None else cap_colours[int(rng.integers(len(cap_colours)))]
        try:
            caption = template.format(colour=word, shape=shape, where=shapes.PHRASES[pos])
        except (KeyError, IndexError):
            fail("template", template, "expected only the fields {colour}, {shape}, {where}")
        pictures.append(shapes.render([obj], seed=seed * 100_003 + i).image)
        captions.append(caption)
        objects.append((obj,))
    return ConceptData(np.stack(pictures), captions, objects)


def _words(name, value, allowed) -> list[str]:
    value = checks.check_list(name, value)
    if any(v not in allowed for v in value):
        fail(name, value, f"expected a non-empty list of words from {sorted(allowed)}")
    return value


def fill_template(template: str, n: int, colours=shapes.TRAIN_COLOURS, shapes_=("circle",),
                  positions=None) -> list[str]:
    """``n`` prompts from ``template`` (fields ``{colour}``, ``{shape}``, ``{where}``),
    cycling through the colours, shapes and positions in a fixed order: prompt i uses
    ``colours[i % C]``, ``shapes_[(i // C) % S]``, ``positions[i % P]``.

    Introduced in notebooks/10_fine_tuning.ipynb.
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
def encode_images(vae, pictures, size: int | None = None, batch_size: int = 64) -> torch.Tensor:
    """The training set of fine-tuning: ``images.encode`` (scaled posterior means) of
    pictures at the model's size, ``batch_size`` at a time, as float32 on the CPU.

    ``pictures``: anything ``images.to_tensor`` takes (a uint8 array (N, H, W, 3), a list of
    PIL images, ...); ``size`` resizes them (bicubic, antialiased) to size x size first, e.g.
    the 64 px shapes to 512 px for real SD weights. The VAE gets them in a contiguous
    (N, 3, H, W) layout, not ``to_tensor``'s channels-last view of the pictures: the CPU
    convolutions then sum in the same order whatever the batch size, so a training set's
    latents do not depend on how it was batched. Computed once: training then works on
    latents only and never runs the VAE.

    Introduced in notebooks/10_fine_tuning.ipynb.
    """
    x = images.to_tensor(pictures, name="pictures").contiguous()  # (N, 3, H, W) in [-1, 1]
    if size is not None:
        size = checks.check_size(size, size)[0]
        if tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True).clamp(-1, 1)
    batch_size = checks.check_int("batch_size", batch_size, 1, 4096)
    return torch.cat([images.encode(vae, x[i:i + batch_size]).float().cpu()  # (B, 4, h, w)
                      for i in range(0, len(x), batch_size)])


# ------------------------------------------------------------------------------ the objective


def diffusion_loss(unet, scheduler, latents, encoder_hidden_states, noise, timesteps,
                   cross_attention_kwargs=None, reduction: str = "mean") -> torch.Tensor:
    """The training loss of Stable Diffusion on one batch: noise the clean ``latents`` to
    ``timesteps``, let the UNet predict, and take the mean squared error against the target
    of the schedule's ``prediction_type`` (the velocity ``scheduler.get_velocity`` for
    v-prediction, the noise itself for epsilon). ``scheduler``: the training schedule,
    ``pipeline.training_scheduler(pipe)``. ``reduction="none"``: one mean per picture, (B,),
    so that one UNet call can serve two losses (DreamBooth's subject and class halves).

    Introduced in notebooks/10_fine_tuning.ipynb.
    """
    reduction = checks.check_choice("reduction", reduction, ["mean", "none"])
    noisy_latents = scheduler.add_noise(latents, noise, timesteps)  # (B, 4, h, w)
    kind = scheduler.config.prediction_type
    target = scheduler.get_velocity(latents, noise, timesteps) if kind == "v_prediction" else noise
    model_pred = unet(noisy_latents, timesteps, encoder_hidden_states,
                      cross_attention_kwargs=cross_attention_kwargs).sample
    loss = F.mse_loss(model_pred.float(), target.float(), reduction=reduction)
    return loss.flatten(1).mean(1) if reduction == "none" else loss  # (B,) or one number


# ------------------------------------------------------------------------------ training


@dataclass
class FineTuneResult:
    """What a trainer returns: a pipeline that uses the trained parts (``pipe``; the frozen
    parts are shared with the pipeline you passed in), the loss of every step, the number
    of trained parameters and where they live, and the wall time.

    Introduced in notebooks/10_fine_tuning.ipynb.
    """

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
    if not torch.isfinite(latents).all():  # NaN in, NaN loss out: a black model
        fail("latents", f"tensor {tuple(latents.shape)} with NaN or infinite values",
             "expected finite latents from encode_images")
    if not isinstance(captions, (list, tuple)) or len(captions) != len(latents):
        fail("captions", captions, f"expected a list of {len(latents)} captions, one per latent")
    for c in captions:
        checks.check_prompt(c, tokenizer, name="captions", known_words_only=False)
    return steps, lr, batch_size, seed


def _ids(tokenizer, captions) -> torch.Tensor:
    return tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids  # (N, T)


@torch.no_grad()
def _encode_frozen(pipe, captions) -> torch.Tensor:
    """The frozen text encoder's output for captions, computed once: (N, T, d)."""
    ids = _ids(pipe.tokenizer, captions).to(pipe.text_encoder.device)
    return pipe.text_encoder(ids)[0]  # (N, T, d)


def _train(desc, unet, params, encode, latents, steps, lr, batch_size, seed, scheduler,
           class_latents=None, prior_weight=1.0, uncond=None, p_uncond=P_UNCOND):
    """The loop shared by the three methods: sample a batch, noise it, one AdamW step.

    ``encode(idx, prior)`` gives the encoder_hidden_states of the captions at ``idx``. With
    ``class_latents`` each step adds ``prior_weight`` times the loss on a batch of the model's
    own class pictures (DreamBooth's prior preservation), in the same UNet call: one batch of
    2B, subject then class, as in diffusers' DreamBooth script.

    ``uncond`` (1, T, d), the empty prompt's encoder_hidden_states: a share ``p_uncond`` of
    each batch trains with it instead of the caption, as the model itself was trained.
    Methods that change the UNet for every prompt need this: classifier-free guidance
    extrapolates from the unconditional prediction, and one left behind by the fine-tune
    turns ``uncond + s * (cond - uncond)`` into colour noise at the default guidance.
    Returns the loss of every step and the wall time in seconds.
    """
    g = torch.Generator("cpu").manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    device = next(unet.parameters()).device
    n_train = scheduler.config.num_train_timesteps
    losses = []

    def draw(lat, prior):
        idx = torch.randint(0, len(lat), (batch_size,), generator=g)
        x0 = lat[idx].to(device)  # (B, 4, h, w)
        noise = torch.randn(x0.shape, generator=g).to(device)
        t = torch.randint(0, n_train, (batch_size,), generator=g).to(device)
        context = encode(idx, prior)  # (B, T, d)
        if uncond is not None:
            drop = (torch.rand(batch_size, generator=g) < p_uncond).to(device)
            context = torch.where(drop[:, None, None], uncond.to(context.dtype), context)
        return x0, context, noise, t  # diffusion_loss's order

    def step_losses():  # the subject's loss, and the total
        if class_latents is None:
            loss = diffusion_loss(unet, scheduler, *draw(latents, False))
            return loss, loss
        parts = zip(draw(latents, False), draw(class_latents, True), strict=True)
        per_picture = diffusion_loss(unet, scheduler, *(torch.cat(z) for z in parts),
                                     reduction="none")  # (2B,)
        loss = per_picture[:batch_size].mean()
        return loss, loss + prior_weight * per_picture[batch_size:].mean()

    _check_train_memory(unet, latents, batch_size, params, class_latents is not None)
    t0 = time.time()
    bar = tqdm(range(steps), desc=desc)
    try:
        for step in bar:
            loss, total = step_losses()
            _finite(total, "lr", lr, f"expected a smaller learning rate (e.g. lr={lr / 10:g}): "
                                     f"the loss at step {step + 1} of {steps}")
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            losses.append(loss.item())
            if step % 10 == 0 or step == steps - 1:
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
    except KeyboardInterrupt:  # Jupyter's stop button: the pipeline passed in is untouched
        raise KeyboardInterrupt(f"{desc} stopped after {len(losses)} of {steps} steps") from None
    finally:
        bar.close()
    return losses, time.time() - t0


def _check_train_memory(unet, latents, batch_size, params, prior: bool):
    """Refuse a batch that cannot fit: a picture's UNet activations x the batch (x 2 with a
    prior), plus the trained parameters, their gradients and AdamW's two moments."""
    p = next(unet.parameters())
    x = torch.zeros(1, *latents.shape[1:], device=p.device, dtype=p.dtype)  # (1, 4, h, w)
    ctx = x.new_zeros(1, pipeline.MAX_LENGTH, unet.config.cross_attention_dim)  # (1, T, d)
    one = device._per_sample_bytes(unet, lambda: unet(x, torch.tensor([1], device=p.device), ctx))
    need = one * batch_size * (2 if prior else 1) + 4 * sum(q.numel() * q.element_size()
                                                             for q in params)
    device.check_memory("batch_size", batch_size, need, f"training on batches of {batch_size} "
                        f"{tuple(latents.shape[1:])} latents", p.device)


def _finite(loss, name: str, value, what: str):
    """Stop at the first non-finite loss, before the optimizer step (the weights stay sound)."""
    if not torch.isfinite(loss):
        fail(name, value, f"{what} became {loss.item()}: training diverged (nothing was kept)")


def _check_result(result, method):
    if not isinstance(result, FineTuneResult) or result.method != method:
        fail("result", result, f"expected the FineTuneResult of train_{method.replace(' ', '_')}")


def _out_path(path) -> Path:
    path = checks.check_folder("path", path)
    if path.suffix != ".safetensors":
        fail("path", str(path), "expected a file name ending in .safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _in_path(path) -> Path:
    """An existing .safetensors file (``~`` expanded); a folder names the files it holds."""
    path = checks.check_folder("path", path)
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.safetensors"))[:3]
        fail("path", str(path), "a folder; expected the .safetensors file itself"
                                + (f", e.g. one of {inside}" if inside else " (it holds none)"))
    if path.suffix != ".safetensors" or not path.is_file():
        fail("path", str(path), "expected an existing .safetensors file" + (
            "" if path.suffix == ".safetensors" else " (pickle files are never loaded)"))
    return path


def _read(path, what: str) -> tuple[dict, dict]:
    """The tensors and metadata of a safetensors file; a truncated or foreign file says so."""
    path = _in_path(path)
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        return load_file(str(path)), meta
    except Exception as e:  # safetensors' own error kinds: SafetensorError, OSError, ...
        fail("path", str(path), f"not a readable safetensors file ({type(e).__name__}: "
                                f"{str(e)[:80]}); expected {what}")


# ------------------------------------------------------------------------------ measuring


@dataclass
class SuccessRate:
    """The checker's verdict on generated pictures: ``rate`` (share of hits), one ``hits``
    flag and one PIL ``images`` entry per seed; ``success_rate`` makes it.

    Introduced in notebooks/10_fine_tuning.ipynb.
    """

    rate: float
    hits: list[bool]
    images: list

    def __repr__(self) -> str:
        return f"SuccessRate({sum(self.hits)}/{len(self.hits)} = {self.rate:.0%})"


def success_rate(pipe, prompts, seeds, targets, criterion: str = "colour_shape",
                 batch_size: int = 8) -> SuccessRate:
    """Generate one picture per seed (``pipeline.generate_images`` at the kit's default
    settings; prompts may hold words the toy has no token for, such as ``sks``) and ask the
    shapes checker (``shapes.hits``) whether each ``targets`` object is in it (``targets``:
    a caption in the shapes grammar, e.g. "a purple star on the left", or one per seed).
    ``criterion``: ``"colour_shape"`` (an object of the right colour and shape anywhere) or
    ``"all_attributes"`` (also at the right position).

    The checker only knows the toy model's world, so this works for the toy model only.
    Introduced in notebooks/10_fine_tuning.ipynb.
    """
    if not pipeline.is_toy(pipe):
        fail("pipe", type(pipe).__name__, "expected the toy model: the shapes checker scores "
                                          "pictures of the shapes world only")
    criterion = checks.check_choice("criterion", criterion, ["colour_shape", "all_attributes"])
    seeds = checks.check_list("seeds", seeds)
    targets = checks.check_per_seed("targets", targets, len(seeds))
    for t in set(targets):
        try:
            shapes.parse_caption(t)
        except ValueError:
            fail("targets", t, "expected a caption of the shapes grammar, e.g. 'a purple star "
                               "on the left'")
    pictures = pipeline.generate_images(pipe, prompts, seeds, batch_size=batch_size,
                                        known_words_only=False)
    flags = shapes.hits(pictures, targets, criterion)
    return SuccessRate(float(np.mean(flags)), flags, pictures)


# ------------------------------------------------------------------------------ showing


def before_after_grid(before, after, cols: int = 6,
                      title: str | None = "before and after fine-tuning, the same seeds"):
    """A figure of pictures before (rows titled "before") and after fine-tuning (the row
    under it, "after"), same seeds, ``cols`` seeds per pair of rows (``figures.image_grid``).

    Introduced in notebooks/10_fine_tuning.ipynb.
    """
    before, after = checks.check_list("before", before), checks.check_list("after", after)
    if len(before) != len(after):
        fail("after", f"{len(after)} images", f"expected as many as before ({len(before)})")
    cols = checks.check_int("cols", cols, 1, 16)
    rows = [part[i:i + cols] for i in range(0, len(before), cols) for part in (before, after)]
    return figures.image_grid(rows, row_titles=["before", "after"] * (len(rows) // 2),
                              title=title)


@figures.styled
def plot_losses(results, window: int = 20):
    """The smoothed loss curves of one or more ``FineTuneResult``s, one panel each.

    Introduced in notebooks/10_fine_tuning.ipynb.
    """
    results = ([results] if isinstance(results, FineTuneResult)
               else checks.check_list("results", results))
    fig, axes = plt.subplots(1, len(results), squeeze=False,
                             figsize=(min(5 * len(results), figures.MAX_WIDTH_IN), 3.2))
    for ax, r in zip(axes[0], results, strict=True):
        ax.plot(r.losses, color="0.8", lw=0.8, label="each step")
        ax.plot(np.arange(len(r.smoothed_losses(window))) + min(window, len(r.losses)) - 1,
                r.smoothed_losses(window), label=f"mean of {window}")
        ax.set(title=r.method, xlabel="step", ylabel="loss")
        ax.legend()
    return fig


@figures.styled
def plot_file_sizes(sizes: dict, title: str = "what each method saves, for SD 1.5"):
    """Horizontal bars of file sizes (``{label: bytes}``) on a log scale, each labelled in
    KB, MB or GB (powers of 1000). Introduced in notebooks/10_fine_tuning.ipynb."""
    if not isinstance(sizes, dict) or not sizes or not all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0
            for v in sizes.values()):
        fail("sizes", sizes, "expected a non-empty dict {label: bytes} of positive ints")
    labels, values = list(sizes)[::-1], [int(v) for v in sizes.values()][::-1]
    fig, ax = plt.subplots(figsize=(min(8, figures.MAX_WIDTH_IN), 0.6 * len(sizes) + 1.2))
    ax.barh(labels, values, color="tab:purple")
    for y, v in enumerate(values):
        unit, f = next(uf for uf in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3), ("B", 1)) if v >= uf[1])
        ax.text(v * 1.15, y, f"{v / f:.3g} {unit}", va="center")
    ax.set(xscale="log", xlim=(min(values) / 3, max(values) * 12), xlabel="bytes (log scale)",
           ylabel="file", title=title)
    return fig


def file_size(path) -> int:
    """Size of a saved file in bytes. Introduced in notebooks/10_fine_tuning.ipynb."""
    return _in_path(path).stat().st_size


def summary_table(rows) -> str:
    """A Markdown table of dicts (one row each, columns from the first row's keys).

    Introduced in notebooks/10_fine_tuning.ipynb.
    """
    rows = checks.check_list("rows", rows)
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)
