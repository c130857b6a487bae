"""The recipe that trains the kit's own small Stable Diffusion from scratch (notebook 12).

    python -m sdkit.training train             # ~1 hour on 2 CPU cores, resumable: data/toy-sd
    python -m sdkit.training finetune-decoder  # the last stage alone, on a saved model (3 min)

The stock classes of a real SD, only smaller (``CLIPTokenizer`` with vocab.json and merges.txt
written here for the shapes world's words, ``CLIPTextModel``, ``AutoencoderKL``, a
``UNet2DConditionModel``), saved as a folder stock diffusers loads without sdkit. Unlike SD 1.5
(notebook 12 shows why): a zero-terminal-SNR schedule with v-prediction, and a text encoder
trained with the UNet (no pretrained CLIP exists for the shapes world). The exam of the model
is ``sdkit.evaluation``. Left out: safety checker, LAION-scale data, mixed precision, multi-GPU.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from . import checks, device, finetune, shapes
from .images import decode, encode, psnr, to_tensor
from .pipeline import MAX_LENGTH, TOY_DIR, dpm_solver

RECIPE = dict(n_images=60_000, vae_steps=2500, unet_steps=3000, unet_batch=64, decoder_steps=300)
QUICK = dict(n_images=4_000, vae_steps=300, unet_steps=300, unet_batch=32, decoder_steps=20)
HELDOUT_SEED = 10_000_000  # the held-out pictures of the VAE's PSNR start at this seed

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


def make_text_encoder(tokenizer) -> CLIPTextModel:
    """The text encoder, untrained: a 3-layer ``CLIPTextModel`` of width 128 for ``tokenizer``.

    Introduced in notebooks/12_training_from_scratch.ipynb.
    """
    if not all(hasattr(tokenizer, a) for a in ("bos_token_id", "eos_token_id", "__len__")):
        checks.fail("tokenizer", type(tokenizer).__name__, "expected a CLIPTokenizer")
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512,
        num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, projection_dim=128,
    ))


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


# ------------------------------------------------------------------------------ checkpoints
# Resumable checkpoints are safetensors too (weights and optimizer moments); nothing is pickled.


def _save_ckpt(path: Path, modules: dict, opt, step: int):
    tensors, meta = {}, {"step": step}
    for name, m in modules.items():
        for k, v in m.state_dict().items():
            tensors[f"{name}/{k}"] = v.detach().contiguous()
    sd = opt.state_dict()
    for i, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"opt/{i}/{k}"] = torch.as_tensor(v).detach().contiguous()
    meta["param_groups"] = sd["param_groups"]
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"meta": json.dumps(meta)})
    os.replace(tmp, path)


def _load_ckpt(path: Path, modules: dict, opt) -> dict:
    tensors, meta = finetune._read(path, "a checkpoint written by sdkit.training")
    meta = json.loads(meta["meta"])
    for name, m in modules.items():
        pre = f"{name}/"
        m.load_state_dict({k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)})
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("opt/"):
            _, i, key = k.split("/", 2)
            state.setdefault(int(i), {})[key] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return meta


# ------------------------------------------------------------------------------ data


def training_data(n: int, seed: int = 0):
    """``n`` training examples (uint8 (n, 64, 64, 3), captions) from seeds ``seed...``,
    skipping the held-out captions (``shapes.heldout_captions``).

    Introduced in notebooks/12_training_from_scratch.ipynb.
    """
    n, seed = checks.check_int("n", n, 1, shapes.MAX_DATASET), checks.check_seed(seed)
    device.check_memory("n", n, 2 * n * 3 * shapes.SIZE**2, f"{n:,} pictures (uint8)", "cpu")
    held = shapes.heldout_captions()
    drawn = (shapes.make_example(s) for s in itertools.count(seed))
    kept = itertools.islice((e for e in drawn if e.caption not in held), n)
    kept = list(tqdm(kept, total=n, desc="drawing shapes", leave=False))
    return np.stack([e.image for e in kept]), [e.caption for e in kept]


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


def _train_unet(workdir: Path, latents: torch.Tensor, captions: list[str], tokenizer, steps: int,
                batch: int = 64, lr: float = 1e-3, p_uncond: float = 0.1, ema_decay: float = 0.999,
                seed: int = 0, log=print, on_checkpoint=None):
    """Train the UNet and the text encoder together on the v-prediction objective (latents
    already scaled to unit variance); a ``p_uncond`` share of captions is the empty prompt."""
    torch.manual_seed(seed)
    unet, text_encoder = make_unet(), make_text_encoder(tokenizer)
    scheduler = make_scheduler()
    ema_unet, ema_text = make_unet(), make_text_encoder(tokenizer)
    ema_unet.load_state_dict(unet.state_dict())
    ema_text.load_state_dict(text_encoder.state_dict())
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    ckpt = workdir / "unet.ckpt.safetensors"
    mods = {"unet": unet, "text_encoder": text_encoder, "ema_unet": ema_unet, "ema_text": ema_text}
    start = _load_ckpt(ckpt, mods, opt)["step"] if ckpt.exists() else 0
    ids_all = tokenize(tokenizer, captions)  # (N, 20)
    empty = tokenize(tokenizer, [""])[0]
    gen = torch.Generator().manual_seed(seed + start)
    ema_pairs = list(zip(itertools.chain(ema_unet.parameters(), ema_text.parameters()), params))
    t0, losses = time.time(), []
    bar = tqdm(range(start, steps), desc="UNet + text encoder", initial=start, total=steps)
    for step in bar:
        idx = torch.randint(0, len(latents), (batch,), generator=gen)
        x0 = latents[idx]  # (B, 4, 16, 16)
        ids = ids_all[idx].clone()
        ids[torch.rand(batch, generator=gen) < p_uncond] = empty  # learn the unconditional too
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=gen)
        x_t = scheduler.add_noise(x0, noise, t)
        target = scheduler.get_velocity(x0, noise, t)
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, lr)
        cond = text_encoder(ids)[0]  # (B, 20, 128)
        loss = F.mse_loss(unet(x_t, t, cond).sample, target)
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
                on_checkpoint(step + 1, ema_unet, ema_text)
    log(f"UNet: {steps - start} steps in {time.time() - t0:.0f} s")
    return ema_unet.eval(), ema_text.eval()


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
          log=print) -> StableDiffusionPipeline:
    """The whole recipe (``python -m sdkit.training train``): draw data, train the VAE, encode
    latents, train UNet + text encoder, fine-tune the VAE decoder, save the pipeline to
    ``out``; resumes from the checkpoints in ``workdir``."""
    out, workdir = checks.check_folder("out", out), checks.check_folder("workdir", workdir)
    quick, snapshot_every = checks.check_bool("quick", quick), checks.check_int(
        "snapshot_every", snapshot_every, 0, 1_000_000)
    r = QUICK if quick else RECIPE
    workdir.mkdir(parents=True, exist_ok=True)
    t_all = time.time()
    tokenizer = write_tokenizer(workdir / "tokenizer")
    images, captions = training_data(r["n_images"], seed=0)
    vae = _train_vae(workdir, images, r["vae_steps"], log=log)
    log(f"VAE held-out PSNR: {heldout_psnr(vae):.2f} dB")
    cache = workdir / f"latents-{r['n_images']}-{r['vae_steps']}.safetensors"
    if cache.exists():
        latents = load_file(str(cache))["latents"]
    else:
        vae.register_to_config(scaling_factor=1.0)  # the posterior means as they come
        latents = encode_latents(vae, images)
        save_file({"latents": latents.contiguous()}, str(cache))
    scaling_factor = float(1 / latents.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    log(f"latent std {latents.std():.4f} -> scaling_factor {scaling_factor:.5f}")
    latents = latents * scaling_factor

    def snapshot(step, unet, text_encoder):
        if snapshot_every and step % snapshot_every == 0:
            build_pipeline(vae, text_encoder, tokenizer, unet).save_pretrained(out)
            log(f"snapshot at step {step} -> {out}")

    unet, text_encoder = _train_unet(workdir, latents, captions, tokenizer, r["unet_steps"],
                                     batch=r["unet_batch"], log=log, on_checkpoint=snapshot)
    vae = _train_decoder(vae, r["decoder_steps"], log=log)  # the encoder, and so the latents, stay
    vae_psnr = heldout_psnr(vae)
    log(f"VAE held-out PSNR after the decoder stage: {vae_psnr:.2f} dB")
    pipe = build_pipeline(vae, text_encoder, tokenizer, unet)
    pipe.save_pretrained(out)
    minutes = (time.time() - t_all) / 60
    info = {"recipe": r, "train_minutes_this_run": round(minutes, 1),
            "vae_psnr_db": round(vae_psnr, 2), "scaling_factor": scaling_factor,
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
    d = sub.add_parser("finetune-decoder", help="only the recipe's last stage, on a saved model: "
                                                "the VAE decoder learns every colour and shape")
    d.add_argument("--model", default=str(TOY_DIR))
    args = p.parse_args(argv)
    if args.cmd == "train":
        _train(args.out, args.workdir, quick=args.quick, snapshot_every=args.snapshot_every)
    else:
        _finetune_decoder(args.model)


if __name__ == "__main__":
    _main()
