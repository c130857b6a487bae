"""The recipe that trains the kit's own small Stable Diffusion from scratch (notebook 12).

    python -m sdkit.training train             # ~1 hour on 2 CPU cores, resumable: data/toy-sd
    python -m sdkit.training train --text-encoder clip --vae-from data/toy-sd --out runs/clip-sd
    python -m sdkit.training finetune-decoder  # the VAE-decoder stage alone, on a saved model

The stock classes of a real SD, only smaller (``CLIPTokenizer`` written for the shapes world's
words by ``clip.write_tokenizer``, ``CLIPTextModel``, ``AutoencoderKL``, a
``UNet2DConditionModel``), saved as a folder stock diffusers loads without sdkit. The shipped
text encoder trained with the UNet; ``--text-encoder clip`` reads the toy CLIP's text tower
frozen instead, as SD 1.x read CLIP ViT-L's (``sdkit.clip``, notebook 04), with a
token-grounding loss on the cross-attention maps (``sdkit.grounding``).
Unlike SD 1.5 (notebook 12 shows why): a zero-SNR schedule, v-prediction. Exam:
``sdkit.evaluation``. Left out: LAION-scale data, mixed precision, multi-GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import itertools
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import CLIPModel, CLIPTextModel

from . import checks, clip, device, finetune, grounding, shapes
from .attention import AttentionStore
from .checkpoints import load_checkpoint as _load_ckpt
from .checkpoints import save_checkpoint as _save_ckpt
from .images import decode, encode, psnr, to_tensor
from .pipeline import MAX_LENGTH, TOY_DIR, dpm_solver

RECIPE = dict(n_images=60_000, vae_steps=2500, unet_steps=3000, unet_batch=64, decoder_steps=300)
QUICK = dict(n_images=4_000, vae_steps=300, unet_steps=300, unet_batch=32, decoder_steps=20)
# --text-encoder clip: the toy CLIP (notebook 04) trained first and read frozen; not shipped
CLIP_RECIPE = dict(RECIPE, unnamed=0.08, clip_steps=1200, unet_steps=2500,
                   grounding=0.1)  # the token-grounding loss's weight (sdkit.grounding)
NEAR_PURPLE = ("red", "blue")  # the named colours a purple object is captioned by (CLIP_RECIPE)
HELDOUT_SEED = 10_000_000  # the held-out pictures of the VAE's PSNR start at this seed

# ------------------------------------------------------------------------------ the models


def make_vae() -> AutoencoderKL:
    """The autoencoder, untrained: 64x64x3 pictures <-> 4x16x16 latents (factor 4).

    Introduced in notebooks/12_training_from_scratch.ipynb.
    """
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16,
        mid_block_add_attention=False,  # fully convolutional: it can train on crops
    )


def make_text_encoder(tokenizer, clip_model=None) -> CLIPTextModel:
    """The text encoder: a ``CLIPTextModel`` of ``clip.text_config(tokenizer)``, untrained, or
    the text tower of a trained toy CLIP (``clip_model``), as SD takes CLIP ViT-L's.

    Introduced in notebooks/12_training_from_scratch.ipynb.
    """
    te = CLIPTextModel(clip.text_config(tokenizer))
    if clip_model is not None:
        if not isinstance(clip_model, CLIPModel):
            checks.fail("clip_model", type(clip_model).__name__, "expected a CLIPModel or None")
        te.load_state_dict(clip_model.text_model.state_dict())
    return te.eval()


def make_unet(block_out_channels=(32, 64, 128)) -> UNet2DConditionModel:
    """The UNet: one level per channel count (16x16, 8x8, 4x4), cross-attention at each.

    Introduced in notebooks/12_training_from_scratch.ipynb.
    """
    channels = checks.check_list("block_out_channels", block_out_channels)
    if len(channels) > 4 or not all(isinstance(c, int) and 16 <= c <= 1024 and c % 16 == 0
                                    for c in channels):
        checks.fail("block_out_channels", block_out_channels,
                    "expected 1 to 4 ints, multiples of 16 in [16, 1024]")
    n = len(channels)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=tuple(channels),
        down_block_types=("CrossAttnDownBlock2D",) * n, up_block_types=("CrossAttnUpBlock2D",) * n,
        cross_attention_dim=128,
        attention_head_dim=tuple(c // 16 for c in channels),  # diffusers' name: heads
        norm_num_groups=8,
    )


def make_scheduler() -> DDPMScheduler:
    """The training schedule, built from scratch: SD's scaled_linear betas rescaled to zero
    terminal SNR, v-prediction (``pipeline.training_scheduler`` reads it back from a pipeline).

    Introduced in notebooks/12_training_from_scratch.ipynb.
    """
    return DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
        beta_end=0.012, prediction_type="v_prediction", rescale_betas_zero_snr=True,
        timestep_spacing="trailing", clip_sample=False,
        steps_offset=1,  # unused by "trailing" spacing; set so diffusers does not warn
    )


def build_pipeline(vae, text_encoder, tokenizer, unet, scheduler=None) -> StableDiffusionPipeline:
    """Assemble the stock StableDiffusionPipeline from the parts (no safety checker); the
    sampler defaults to the kit's DPM-Solver++ on ``make_scheduler()``.

    Introduced in notebooks/12_training_from_scratch.ipynb.
    """
    return StableDiffusionPipeline(
        vae, text_encoder, tokenizer, unet, scheduler or dpm_solver(make_scheduler().config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


# ------------------------------------------------------------------------------ data


def training_data(n: int, seed: int = 0, unnamed: float = 0.0, masks: bool = False):
    """``n`` training examples (uint8 (n, 64, 64, 3), captions) from seeds ``seed...``,
    skipping the held-out captions (``shapes.heldout_captions``). An ``unnamed`` share of the
    seeds draws from every colour and shape; no caption says purple or star, as LAION shows
    SD far more than its captions name: a purple object is called by a near named colour,
    red or blue at random ("a blue circle on the left" for a purple circle), and a star is
    left out (a lone star: the empty caption). ``masks`` adds the objects' masks on the
    latent grid, in the caption's order ((n, 2, 16, 16) float16, ``grounding.latent_masks``).

    Introduced in notebooks/12_training_from_scratch.ipynb.
    """
    n, seed = checks.check_int("n", n, 1, shapes.MAX_DATASET), checks.check_seed(seed)
    unnamed, masks = checks.check_float("unnamed", unnamed, 0.0, 0.5), checks.check_bool(
        "masks", masks)
    device.check_memory("n", n, 2 * n * 3 * shapes.SIZE**2, f"{n:,} pictures (uint8)", "cpu")
    held, train = shapes.heldout_captions(), set(shapes.TRAIN_COLOURS + shapes.TRAIN_SHAPES)

    def draw(s):  # no caption names purple or a star: a purple object is called by a near
        rng = np.random.default_rng([s, 2])  # named colour, red or blue; a star is left out
        if rng.random() >= unnamed:
            return shapes.make_example(s)
        e = shapes.make_example(s, colours=tuple(shapes.COLOURS), shapes=shapes.SHAPES)
        kept = [(o, m) for o, m in zip(e.objects, e.masks) if o.shape in train]
        words = [o.phrase.replace(f" {o.colour} ", f" {rng.choice(NEAR_PURPLE)} ")
                 if o.colour not in train else o.phrase for o, _ in kept]
        return dataclasses.replace(e, caption=" and ".join(words), masks=tuple(m for _, m in kept))

    drawn = (draw(s) for s in itertools.count(seed))
    kept = itertools.islice((e for e in drawn if e.caption not in held), n)
    kept = list(tqdm(kept, total=n, desc="drawing shapes", leave=False))
    out = np.stack([e.image for e in kept]), [e.caption for e in kept]
    return out + (np.stack([grounding.latent_masks(e.masks) for e in kept]),) if masks else out


def encode_latents(vae, images: np.ndarray, batch: int = 256) -> torch.Tensor:
    """Scaled latents (posterior means x ``vae.config.scaling_factor``) of many pictures,
    ``batch`` at a time: (N, 4, 16, 16). A batch must fit in memory (the error says so).

    Introduced in notebooks/12_training_from_scratch.ipynb.
    """
    batch = checks.check_int("batch", batch, 1, 4096)
    need = 16 * batch * max(vae.config.block_out_channels) * math.prod(np.shape(images)[1:3])
    device.check_memory("batch", batch, need, f"batches of {batch} pictures (VAE)", vae.device)
    starts = tqdm(range(0, len(images), batch), desc="encoding latents", leave=False)
    return torch.cat([encode(vae, images[i:i + batch]) for i in starts])  # (N, 4, 16, 16)


def tokenize(tokenizer, captions) -> torch.Tensor:
    """Token ids (N, 20) of captions, padded to the toy's ``MAX_LENGTH``.

    Introduced in notebooks/12_training_from_scratch.ipynb.
    """
    captions = checks.check_list("captions", captions)
    return tokenizer(captions, padding="max_length", max_length=MAX_LENGTH,
                     truncation=True, return_tensors="pt").input_ids


def heldout_psnr(vae, n: int = 256) -> float:
    """Reconstruction PSNR (dB) on ``n`` held-out pictures of the training world (the model
    card's figure): encode to the posterior means, decode, compare.

    Introduced in notebooks/12_training_from_scratch.ipynb.
    """
    n = checks.check_int("n", n, 1, 4096)
    device.check_memory("n", n, 32 * n * max(vae.config.block_out_channels) * shapes.SIZE**2,
                        f"{n} pictures through the VAE and back", vae.device)
    held = to_tensor(shapes.make_dataset(n, seed=HELDOUT_SEED)[0])  # (n, 3, 64, 64)
    return psnr(decode(vae, encode(vae, held)), held)


# ------------------------------------------------------------------------------ the stages


def _lr(step, total, peak, warmup=200):
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


def _train_vae(workdir: Path, images: np.ndarray, steps: int, batch: int = 32, crop: int = 32,
               seed: int = 0, log=print):
    """Train the autoencoder on random crops: MSE + a tiny KL term (SD used 1e-6 as well)."""
    torch.manual_seed(seed)
    vae = make_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    ckpt = workdir / "vae.ckpt.safetensors"
    start = _load_ckpt(ckpt, {"vae": vae}, opt)["step"] if ckpt.exists() else 0
    gen = np.random.default_rng(seed + start)
    t0 = time.time()
    bar = tqdm(range(start, steps), desc="VAE", initial=start, total=steps)
    for step in bar:
        idx = gen.integers(0, len(images), batch)
        ox, oy = gen.integers(0, 64 - crop + 1, 2)
        x = to_tensor(images[idx, oy:oy + crop, ox:ox + crop])  # (B, 3, 32, 32)
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, 1e-3, warmup=100)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = F.mse_loss(rec, x) + 1e-6 * post.kl().mean()
        finetune._finite(loss, "steps", steps, f"a finite VAE loss; at step {step + 1} it")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.5f}", psnr=f"{psnr(rec.detach(), x):.1f}")
        if (step + 1) % 500 == 0 or step + 1 == steps:
            _save_ckpt(ckpt, {"vae": vae}, opt, step + 1)
            log(f"VAE step {step + 1}: held-out PSNR {heldout_psnr(vae, 64):.2f} dB, "
                f"{time.time() - t0:.0f} s")
    log(f"VAE: {steps - start} steps in {time.time() - t0:.0f} s")
    return vae.eval()


def _train_decoder(vae, steps: int, n_images: int = 6000, batch: int = 32, lr: float = 3e-4,
                   seed: int = 0, log=print):
    """Fine-tune the VAE *decoder* on every picture the world can draw, purple and stars too
    (as SD's VAE saw more than any prompt asks for, so notebook 10 can teach the UNet a new
    colour). The encoder stays frozen, so the latents the UNet learnt from keep their meaning."""
    torch.manual_seed(seed)
    images, _ = shapes.make_dataset(n_images, seed=20_000_000 + seed * n_images,
                                    colours=tuple(shapes.COLOURS), shapes=shapes.SHAPES)
    x_all = to_tensor(images)  # (N, 3, 64, 64)
    z_all = encode_latents(vae, images) / vae.config.scaling_factor  # (N, 4, 16, 16) unscaled
    vae.requires_grad_(False)
    params = [*vae.decoder.requires_grad_(True).parameters(),
              *vae.post_quant_conv.requires_grad_(True).parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    bar = tqdm(range(steps), desc="VAE decoder")
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, lr, warmup=20)
        idx = torch.randint(0, n_images, (batch,), generator=gen)
        loss = F.mse_loss(vae.decode(z_all[idx]).sample, x_all[idx])
        finetune._finite(loss, "steps", steps, f"a finite decoder loss; at step {step + 1} it")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 25 == 0:
            bar.set_postfix(loss=f"{loss.item():.5f}")
    log(f"VAE decoder: {steps} steps in {time.time() - t0:.0f} s")
    return vae.requires_grad_(False).eval()


def _train_unet(workdir: Path, latents: torch.Tensor, captions: list[str], tokenizer,
                text_encoder, steps: int, batch: int = 64, lr: float = 1e-3,
                p_uncond: float = 0.1, frozen: bool = False, ema_decay: float = 0.999,
                seed: int = 0, log=print, on_checkpoint=None, masks=None,
                grounding_weight: float = 0.0):
    """Train the UNet on the v-prediction objective (latents already scaled to unit variance);
    a ``p_uncond`` share of captions is the empty prompt. The shipped recipe trains
    ``text_encoder`` with the UNet; ``frozen`` (``--text-encoder clip``) reads a CLIP's text
    tower frozen instead, as SD 1.x read CLIP ViT-L's. ``grounding_weight`` > 0 adds that times
    ``grounding.grounding_loss`` on ``masks`` (the objects' masks of the latents' pictures)."""
    torch.manual_seed(seed)
    unet, ema_unet, scheduler = make_unet(), make_unet(), make_scheduler()
    ema_unet.load_state_dict(unet.state_dict())
    ema_text = text_encoder if frozen else copy.deepcopy(text_encoder).requires_grad_(False)
    text_encoder.requires_grad_(not frozen)
    params = list(unet.parameters()) + ([] if frozen else list(text_encoder.parameters()))
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    ckpt, mods = workdir / "unet.ckpt.safetensors", {"unet": unet, "ema_unet": ema_unet}
    if not frozen:
        mods.update(text_encoder=text_encoder, ema_text=ema_text)
    start = _load_ckpt(ckpt, mods, opt)["step"] if ckpt.exists() else 0
    distinct = sorted(set(captions) | {""})
    row = {c: i for i, c in enumerate(distinct)}
    ids = tokenize(tokenizer, distinct)  # (C, 20)
    rows_all, empty = torch.tensor([row[c] for c in captions]), row[""]  # (N,), an int
    words_at = grounding.object_tokens(tokenizer, distinct) if grounding_weight else None
    if grounding_weight and (masks is None or len(masks) != len(latents)):
        checks.fail("masks", type(masks).__name__, "expected one (2, 16, 16) mask pair per latent")
    if frozen:
        with torch.no_grad():  # each distinct caption is encoded once
            states = torch.cat([text_encoder(ids[i:i + 512])[0] for i in range(0, len(ids), 512)])
    gen = torch.Generator().manual_seed(seed + start)
    ema_pairs = list(zip(itertools.chain(ema_unet.parameters(), ema_text.parameters()), params))
    t0, losses = time.time(), []
    bar = tqdm(range(start, steps), desc="UNet" if frozen else "UNet + text encoder",
               initial=start, total=steps)
    for step in bar:
        idx = torch.randint(0, len(latents), (batch,), generator=gen)
        x0 = latents[idx]  # (B, 4, 16, 16)
        rows = rows_all[idx].clone()
        rows[torch.rand(batch, generator=gen) < p_uncond] = empty  # learn the unconditional too
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=gen)
        x_t = scheduler.add_noise(x0, noise, t)
        target = scheduler.get_velocity(x0, noise, t)
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, lr)
        # (B, 20, 128): the frozen CLIP's states, or the jointly trained encoder's
        cond = states[rows] if frozen else text_encoder(ids[rows])[0]
        store = AttentionStore(unet, guided=False, keep_graph=True)
        with store if grounding_weight else contextlib.nullcontext():
            loss = F.mse_loss(unet(x_t, t, cond).sample, target)
        if grounding_weight:  # each object's words' maps pulled inside its mask
            token_loss = grounding.grounding_loss(store.records, words_at[rows], masks[idx])
            loss = loss + grounding_weight * token_loss
        finetune._finite(loss, "steps", steps, f"a finite UNet loss; at step {step + 1} it")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            d = min(ema_decay, (1 + step) / (10 + step))
            for e, p in ema_pairs:
                e.lerp_(p, 1 - d)
        losses.append(loss.item())
        if step % 25 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}")
        if (step + 1) % 250 == 0 or step + 1 == steps:
            _save_ckpt(ckpt, mods, opt, step + 1)
            with open(workdir / "losses.csv", "a") as f:
                first = step + 1 - len(losses)
                f.writelines(f"{first + i},{v:.6f}\n" for i, v in enumerate(losses))
            losses = []
            if on_checkpoint is not None:
                on_checkpoint(step + 1, ema_unet, text_encoder if frozen else ema_text)
    log(f"UNet: {steps - start} steps in {time.time() - t0:.0f} s")
    return ema_unet.eval(), (text_encoder if frozen else ema_text).eval()


def _loss_curve(workdir, points: int = 100) -> list[tuple[int, float]]:
    """The training loss, averaged into ``points`` windows: [(step, loss), ...]."""
    f = Path(workdir) / "losses.csv"
    if not f.exists():
        return []
    rows = np.loadtxt(f, delimiter=",", ndmin=2)
    rows = rows[np.argsort(rows[:, 0], kind="stable")]
    chunks = np.array_split(rows, min(points, len(rows)))
    return [(int(c[-1, 0]), round(float(c[:, 1].mean()), 5)) for c in chunks]


def _train(out=TOY_DIR, workdir="runs/toy", quick: bool = False, snapshot_every: int = 0,
           vae_from=None, text_encoder: str = "joint", log=print) -> StableDiffusionPipeline:
    """The whole recipe (``python -m sdkit.training train``): draw data, train the VAE (or take
    ``vae_from``'s, a pipeline folder), encode latents, train the UNet and the text encoder
    together (``"joint"``, the shipped model) or train the toy CLIP first and the UNet on its
    frozen text tower (``"clip"``; the CLIP is saved beside ``out`` as ``toy-clip``), fine-tune
    the VAE decoder, save the pipeline to ``out``; resumes from the checkpoints in ``workdir``."""
    out, workdir = checks.check_folder("out", out), checks.check_folder("workdir", workdir)
    quick, snapshot_every = checks.check_bool("quick", quick), checks.check_int(
        "snapshot_every", snapshot_every, 0, 1_000_000)
    frozen = checks.check_choice("text_encoder", text_encoder, ("joint", "clip")) == "clip"
    r = dict(CLIP_RECIPE, **QUICK, clip_steps=50) if quick and frozen else (
        QUICK if quick else CLIP_RECIPE if frozen else RECIPE)
    workdir.mkdir(parents=True, exist_ok=True)
    t_all, stages = time.time(), {}

    def stage(name, t0):  # each stage's wall time, for the card
        stages[name] = round((time.time() - t0) / 60, 1)
        return time.time()

    tokenizer = clip.write_tokenizer(workdir / "tokenizer")
    images, captions, *masks = training_data(r["n_images"], seed=0, unnamed=r.get(
        "unnamed", 0.0), masks="grounding" in r)
    t = stage("data", t_all)
    if vae_from is None:
        vae = _train_vae(workdir, images, r["vae_steps"], log=log)
        vae.register_to_config(scaling_factor=1.0)  # the posterior means as they come
    else:
        vae = AutoencoderKL.from_pretrained(checks.check_folder("vae_from", vae_from) / "vae",
                                            use_safetensors=True, local_files_only=True)
    made = "reused" if vae_from else r["vae_steps"]  # the latents' VAE
    cache = workdir / f"latents-{r['n_images']}-{made}.safetensors"
    latents = load_file(str(cache))["latents"] if cache.exists() else encode_latents(vae, images)
    save_file({"latents": latents.contiguous()}, str(cache))
    if vae_from is None:
        vae.register_to_config(scaling_factor=float(1 / latents.std()))
        latents = latents / latents.std()
    log(f"latent std {latents.std():.4f}; scaling_factor {vae.config.scaling_factor:.5f}")
    t = stage("vae" if vae_from is None else "latents (VAE reused)", t)
    toy_clip = None
    if frozen and (workdir / "clip" / "config.json").is_file():
        toy_clip = clip.load_clip(workdir / "clip")
    elif frozen:
        toy_clip = clip.train_clip(tokenizer, steps=r["clip_steps"], log=log)
        toy_clip.save_pretrained(workdir / "clip")
    torch.manual_seed(0)
    text_encoder = make_text_encoder(tokenizer, toy_clip)
    t = stage("clip", t) if frozen else t

    def snapshot(step, unet, text_encoder):
        if snapshot_every and step % snapshot_every == 0:
            build_pipeline(vae, text_encoder, tokenizer, unet).save_pretrained(out)
            log(f"snapshot at step {step} -> {out}")

    unet, text_encoder = _train_unet(workdir, latents, captions, tokenizer, text_encoder,
                                     r["unet_steps"], batch=r["unet_batch"], frozen=frozen,
                                     log=log, on_checkpoint=snapshot,
                                     masks=torch.from_numpy(masks[0]) if masks else None,
                                     grounding_weight=r.get("grounding", 0.0))
    t = stage("unet", t)
    if vae_from is None:  # the encoder, and so the latents, stay
        vae = _train_decoder(vae, r["decoder_steps"], log=log)
        t = stage("vae_decoder", t)
    vae_psnr = heldout_psnr(vae)
    log(f"VAE held-out PSNR: {vae_psnr:.2f} dB")
    pipe = build_pipeline(vae, text_encoder, tokenizer, unet)
    pipe.save_pretrained(out)
    if frozen:
        toy_clip.save_pretrained(out.parent / "toy-clip")
        tokenizer.save_pretrained(out.parent / "toy-clip")
    minutes = (time.time() - t_all) / 60
    info = {"recipe": r, "train_minutes_this_run": round(minutes, 1), "stage_minutes": stages,
            "vae_from": None if vae_from is None else Path(vae_from).name,
            "vae_psnr_db": round(vae_psnr, 2), "scaling_factor": vae.config.scaling_factor,
            "torch_threads": torch.get_num_threads(), "loss_curve": _loss_curve(workdir)}
    (workdir / "train_info.json").write_text(json.dumps(info, indent=1))
    (out / "training.json").write_text(json.dumps(info, indent=1))
    log(f"saved {out} after {minutes:.1f} min")
    return pipe


def _finetune_decoder(folder=TOY_DIR, steps: int | None = None, n_images: int = 6000,
                     log=print) -> float:
    """The recipe's last stage alone (``python -m sdkit.training finetune-decoder``): fine-tune
    the VAE decoder of a saved model folder on every colour and shape, purple and star too,
    encoder frozen; the folder's VAE and training record are rewritten. Returns the held-out
    PSNR afterwards."""
    folder = checks.check_folder("folder", folder)
    if not (folder / "vae" / "config.json").is_file():
        checks.fail("folder", str(folder), "expected a pipeline folder with a vae/ subfolder")
    steps = checks.check_int("steps", RECIPE["decoder_steps"] if steps is None else steps, 0, 10**6)
    n_images = checks.check_int("n_images", n_images, 1, shapes.MAX_DATASET)
    vae = AutoencoderKL.from_pretrained(folder / "vae", use_safetensors=True, local_files_only=True)
    t0 = time.time()
    _train_decoder(vae, steps, n_images=n_images, log=log)
    vae.save_pretrained(folder / "vae")
    config = json.loads((folder / "vae" / "config.json").read_text())
    config.pop("_name_or_path", None)  # this machine's path: not part of the model
    (folder / "vae" / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    p = heldout_psnr(vae)
    log(f"VAE held-out PSNR after the decoder stage: {p:.2f} dB")
    record = folder / "training.json"
    if record.exists():  # keep the folder's record of how it was made true
        info = json.loads(record.read_text())
        info["recipe"]["decoder_steps"] = steps
        info["vae_psnr_db"] = round(p, 2)
        info["decoder_minutes"] = round((time.time() - t0) / 60, 1)
        record.write_text(json.dumps(info, indent=1))
    return p


def _main(argv=None):
    p = argparse.ArgumentParser(prog="python -m sdkit.training", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train the toy model from scratch (resumable)")
    t.add_argument("--out", default=str(TOY_DIR))
    t.add_argument("--workdir", default="runs/toy")
    t.add_argument("--quick", action="store_true", help="a few minutes, for a smoke test")
    t.add_argument("--snapshot-every", type=int, default=0)
    t.add_argument("--vae-from", default=None, help="reuse this pipeline folder's VAE")
    t.add_argument("--text-encoder", default="joint", choices=("joint", "clip"),
                   help="joint: trained with the UNet (shipped); clip: the toy CLIP's, frozen")
    d = sub.add_parser("finetune-decoder", help="only the recipe's last stage, on a saved model: "
                                                "the VAE decoder learns every colour and shape")
    d.add_argument("--model", default=str(TOY_DIR))
    args = p.parse_args(argv)
    if args.cmd == "train":
        _train(args.out, args.workdir, quick=args.quick, snapshot_every=args.snapshot_every,
               vae_from=args.vae_from, text_encoder=args.text_encoder)
    else:
        _finetune_decoder(args.model)


if __name__ == "__main__":
    _main()
