"""The kit's own small Stable Diffusion: the recipe that trains it from scratch, and its exam.

    python -m sdkit.toy train      # ~1 hour on a 2-core CPU; resumable; writes data/toy-sd
    python -m sdkit.toy finetune-decoder  # the last stage alone, on a saved model (3 min)
    python -m sdkit.toy evaluate   # prints every figure and writes them into the model card

The model is made of the stock classes of a real Stable Diffusion, only smaller:
``CLIPTokenizer`` (vocab.json and merges.txt written here for the shapes world's words),
``CLIPTextModel``, ``AutoencoderKL`` (64 px images -> 4x16x16 latents), a
``UNet2DConditionModel`` with cross-attention at every resolution and a diffusers scheduler.
It is saved as a ``StableDiffusionPipeline`` folder that stock diffusers loads without sdkit.

Two choices differ from SD 1.5, and notebook 11 shows why: the noise schedule is rescaled
to zero terminal SNR with v-prediction (with SD's own schedule the last timestep still
holds a trace of the image, so at sampling time the starting noise, not the prompt, decides
where the shapes go), and the text encoder is trained jointly with the UNet (SD keeps a
pretrained CLIP frozen; there is no pretrained CLIP for the shapes world).

Left out: the safety checker (the shapes world needs none), LAION-scale data, EMA
warm-up schedules, mixed precision and multi-GPU training.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import shapes

ROOT = Path(__file__).resolve().parent.parent
TOY_DIR = ROOT / "data" / "toy-sd"
MAX_LENGTH = 20  # tokens per prompt, BOS and EOS included (SD uses 77)
DEFAULT_STEPS = 10  # the kit's default number of denoising steps for the toy model
DEFAULT_GUIDANCE = 4.0  # the kit's default guidance scale for the toy model

# ------------------------------------------------------------------------------ tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's map from bytes to printable characters (the byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def world_words() -> list[str]:
    """The words of the training captions: each becomes a single token."""
    words = set()
    for cap in shapes.all_captions():
        words.update(cap.split())
    return sorted(words)


def _learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Byte-pair encoding, learned until every word is a single token (CLIP's </w> marks ends)."""
    seqs = {w: list(w[:-1]) + [w[-1] + "</w>"] for w in words}
    merges = []
    while any(len(s) > 1 for s in seqs.values()):
        counts: dict[tuple[str, str], int] = {}
        for s in seqs.values():
            for pair in zip(s, s[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        best = max(sorted(counts), key=counts.get)  # sorted: ties broken the same way every time
        merges.append(best)
        for w, s in seqs.items():
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[w] = out
    return merges


def write_tokenizer(folder) -> CLIPTokenizer:  # noqa: F821
    """Write a real CLIP tokenizer (vocab.json, merges.txt) whose vocabulary is CLIP's 512
    byte symbols plus one merge chain per word of the shapes world; returns it loaded.

    Introduced in notebooks/03_text_and_cross_attention.ipynb.
    """
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab_list = chars + [c + "</w>" for c in chars]
    merges = _learn_merges(world_words())
    vocab_list += [a + b for a, b in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                        model_max_length=MAX_LENGTH)
    for w in world_words():
        ids = tok(w, add_special_tokens=False).input_ids
        assert len(ids) == 1, f"word {w!r} is not a single token: {ids}"
    tok.save_pretrained(folder)
    return tok


# ------------------------------------------------------------------------------ the models


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16,
        mid_block_add_attention=False,  # fully convolutional: it can train on crops
    )


def make_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512,
        num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, projection_dim=128,
    )
    return CLIPTextModel(config)


def make_unet(block_out_channels=(32, 64, 128)):
    """The UNet: one level per channel count (16x16, 8x8, 4x4), cross-attention at each.

    Introduced in notebooks/11_training_from_scratch.ipynb.
    """
    from diffusers import UNet2DConditionModel

    n = len(block_out_channels)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=tuple(block_out_channels),
        down_block_types=("CrossAttnDownBlock2D",) * n, up_block_types=("CrossAttnUpBlock2D",) * n,
        cross_attention_dim=128,
        attention_head_dim=tuple(c // 16 for c in block_out_channels),  # diffusers' name: heads
        norm_num_groups=8,
    )


def make_scheduler():
    """The training schedule: SD's scaled_linear betas rescaled to zero terminal SNR."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
        beta_end=0.012, prediction_type="v_prediction", rescale_betas_zero_snr=True,
        timestep_spacing="trailing", clip_sample=False,
        steps_offset=1,  # unused by "trailing" spacing; set so diffusers does not warn
    )


def make_sampler(train_scheduler=None):
    """The default sampler: DPM-Solver++ on the training schedule."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler.from_config((train_scheduler or make_scheduler()).config,
                                                   final_sigmas_type="zero")


# ------------------------------------------------------------------------------ checkpoints
# Resumable checkpoints are safetensors too (weights and optimizer moments); nothing is pickled.


def _save_ckpt(path: Path, modules: dict, opt, step: int, extra: dict | None = None):
    from safetensors.torch import save_file

    tensors, meta = {}, {"step": step, **(extra or {})}
    for name, m in modules.items():
        for k, v in m.state_dict().items():
            tensors[f"{name}/{k}"] = v.detach().contiguous()
    sd = opt.state_dict()
    for i, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"opt/{i}/{k}"] = v.detach().contiguous() if torch.is_tensor(v) else torch.tensor(v)
    meta["param_groups"] = sd["param_groups"]
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"meta": json.dumps(meta)})
    os.replace(tmp, path)


def _load_ckpt(path: Path, modules: dict, opt) -> dict:
    from safetensors import safe_open
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["meta"])
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


# ------------------------------------------------------------------------------ training

HOLDOUT_EVERY = 10  # every 10th two-shape caption is never shown in training


def heldout_captions() -> set[str]:
    """Two-shape captions kept out of training, to test composition on unseen prompts."""
    pairs = [c for c in shapes.all_captions() if " and " in c]
    return set(pairs[::HOLDOUT_EVERY])


def training_data(n: int, seed: int = 0):
    """``n`` training examples from seeds ``seed...``, skipping held-out captions."""
    held = heldout_captions()
    images, captions, s = [], [], seed
    with tqdm(total=n, desc="drawing shapes", leave=False) as bar:
        while len(images) < n:
            e = shapes.make_example(s)
            s += 1
            if e.caption in held:
                continue
            images.append(e.image)
            captions.append(e.caption)
            bar.update()
    return np.stack(images), captions


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, 64, 64, 3) -> float (N, 3, 64, 64) in [-1, 1], contiguous."""
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).float() / 127.5 - 1


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two image batches in [-1, 1], on the 0..1 scale."""
    mse = ((a.clamp(-1, 1) - b.clamp(-1, 1)) / 2).pow(2).mean().item()
    return 10 * math.log10(1 / max(mse, 1e-12))


def _lr(step, total, peak, warmup=200):
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


def train_vae(workdir: Path, images: np.ndarray, steps: int, batch: int = 32, crop: int = 32,
              seed: int = 0, log=print):
    """Train the autoencoder on random crops: MSE + a tiny KL term (SD used 1e-6 as well)."""
    torch.manual_seed(seed)
    vae = make_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    ckpt = workdir / "vae.ckpt.safetensors"
    start = _load_ckpt(ckpt, {"vae": vae}, opt)["step"] if ckpt.exists() else 0
    gen = np.random.default_rng(seed + start)
    held = to_tensor(shapes.make_dataset(64, seed=10_000_000)[0])
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
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.5f}", psnr=f"{psnr(rec, x):.1f}")
        if (step + 1) % 500 == 0 or step + 1 == steps:
            _save_ckpt(ckpt, {"vae": vae}, opt, step + 1)
            with torch.no_grad():
                p = psnr(vae.decode(vae.encode(held).latent_dist.mean).sample, held)
            log(f"VAE step {step + 1}: held-out PSNR {p:.2f} dB, {time.time() - t0:.0f} s")
    log(f"VAE: {steps - start} steps in {time.time() - t0:.0f} s")
    return vae.eval()


def train_decoder(vae, steps: int, n_images: int = 6000, batch: int = 32, lr: float = 3e-4,
                  seed: int = 0, log=print):
    """Fine-tune the VAE *decoder* on every picture the world can draw, purple and stars too.

    SD's VAE was trained on far more kinds of pictures than any one prompt asks for, so a
    fine-tune (notebook 09) can teach the UNet a new colour and the decoder already draws it.
    The toy VAE learnt from the training world only and decoded purple as blue. The encoder
    stays frozen, so the latents the UNet learnt from keep their meaning; only the way back
    to pixels learns more colours and shapes (and gets sharper on the old ones).

    Introduced in notebooks/09_fine_tuning.ipynb (section 1: what the model does not know).
    """
    from .checks import check_float, check_int, check_seed

    steps, n_images = check_int("steps", steps, 0, 1_000_000), check_int("n_images", n_images, 1)
    batch, seed = check_int("batch", batch, 1, 4096), check_seed(seed)
    lr = check_float("lr", lr, 1e-12, 1.0)
    torch.manual_seed(seed)
    images, _ = shapes.make_dataset(n_images, seed=20_000_000 + seed * n_images,
                                    colours=tuple(shapes.COLOURS), shapes=shapes.SHAPES)
    x_all = to_tensor(images)  # (N, 3, 64, 64)
    z_all = encode_latents(vae, images)  # (N, 4, 16, 16), unscaled posterior means
    vae.requires_grad_(False)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    bar = tqdm(range(steps), desc="VAE decoder")
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, lr, warmup=20)
        idx = torch.randint(0, n_images, (batch,), generator=gen)
        loss = F.mse_loss(vae.decode(z_all[idx]).sample, x_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 25 == 0:
            bar.set_postfix(loss=f"{loss.item():.5f}")
    vae.requires_grad_(False)
    log(f"VAE decoder: {steps} steps in {time.time() - t0:.0f} s")
    return vae.eval()


def finetune_decoder(folder=TOY_DIR, steps: int | None = None, n_images: int = 6000,
                     log=print) -> float:
    """Run the decoder stage of the recipe on a saved model folder (its VAE is rewritten);
    returns the held-out PSNR afterwards. ``python -m sdkit.toy finetune-decoder``.

    Introduced in notebooks/09_fine_tuning.ipynb (section 1: what the model does not know).
    """
    from diffusers import AutoencoderKL

    from .checks import fail

    folder = Path(folder)
    if not (folder / "vae" / "config.json").is_file():
        fail("folder", str(folder), "expected a diffusers pipeline folder with a vae/ subfolder")
    vae = AutoencoderKL.from_pretrained(folder / "vae", use_safetensors=True, local_files_only=True)
    steps = RECIPE["decoder_steps"] if steps is None else steps
    t0 = time.time()
    train_decoder(vae, steps, n_images=n_images, log=log)
    vae.save_pretrained(folder / "vae")
    config = json.loads((folder / "vae" / "config.json").read_text())
    config.pop("_name_or_path", None)  # this machine's path: not part of the model
    (folder / "vae" / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    p = heldout_psnr(vae)
    log(f"VAE held-out PSNR after the decoder stage: {p:.2f} dB")
    info = training_info(folder)
    if info:  # keep the folder's record of how it was made true
        info["recipe"]["decoder_steps"] = steps
        info["vae_psnr_db"] = round(p, 2)
        info["decoder_minutes"] = round((time.time() - t0) / 60, 1)
        (folder / "training.json").write_text(json.dumps(info, indent=1))
    return p


def heldout_psnr(vae, n: int = 256) -> float:
    """Reconstruction PSNR (dB) on ``n`` held-out pictures of the training world (the model
    card's figure). Introduced in notebooks/11_training_from_scratch.ipynb."""
    held = to_tensor(shapes.make_dataset(n, seed=10_000_000)[0])
    with torch.no_grad():
        return psnr(vae.decode(vae.encode(held).latent_dist.mean).sample, held)


@torch.no_grad()
def encode_latents(vae, images: np.ndarray, batch: int = 256) -> torch.Tensor:
    """Posterior means of the images, unscaled: (N, 4, 16, 16)."""
    out = []
    for i in tqdm(range(0, len(images), batch), desc="encoding latents", leave=False):
        out.append(vae.encode(to_tensor(images[i:i + batch])).latent_dist.mean)
    return torch.cat(out)


def tokenize(tokenizer, captions) -> torch.Tensor:
    return tokenizer(list(captions), padding="max_length", max_length=MAX_LENGTH,
                     truncation=True, return_tensors="pt").input_ids


def train_unet(workdir: Path, latents: torch.Tensor, captions: list[str], tokenizer, steps: int,
               batch: int = 64, lr: float = 1e-3, p_uncond: float = 0.1, ema_decay: float = 0.999,
               seed: int = 0, log=print, on_checkpoint=None):
    """Train the UNet and the text encoder together on the v-prediction objective.

    latents are already scaled (unit variance). Every ``p_uncond`` of captions is replaced
    by the empty prompt, so the same network also learns the unconditional prediction
    that classifier-free guidance needs.
    """
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
    ema_pairs = [(e, p) for e, p in zip(itertools.chain(ema_unet.parameters(), ema_text.parameters()),
                                        params)]
    t0, losses = time.time(), []
    bar = tqdm(range(start, steps), desc="UNet + text encoder", initial=start, total=steps)
    for step in bar:
        idx = torch.randint(0, len(latents), (batch,), generator=gen)
        x0 = latents[idx]  # (B, 4, 16, 16)
        ids = ids_all[idx].clone()
        drop = torch.rand(batch, generator=gen) < p_uncond
        ids[drop] = empty
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=gen)
        x_t = scheduler.add_noise(x0, noise, t)
        target = scheduler.get_velocity(x0, noise, t)
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, lr)
        cond = text_encoder(ids)[0]  # (B, 20, 128)
        pred = unet(x_t, t, cond).sample
        loss = F.mse_loss(pred, target)
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
            _append_losses(workdir, step + 1 - len(losses), losses)
            losses = []
            if on_checkpoint is not None:
                on_checkpoint(step + 1, ema_unet, ema_text)
    log(f"UNet: {steps - start} steps in {time.time() - t0:.0f} s")
    return ema_unet.eval(), ema_text.eval()


def loss_curve(workdir, points: int = 100) -> list[tuple[int, float]]:
    """The training loss, averaged into ``points`` windows: [(step, loss), ...]."""
    f = Path(workdir) / "losses.csv"
    if not f.exists():
        return []
    rows = np.loadtxt(f, delimiter=",", ndmin=2)
    rows = rows[np.argsort(rows[:, 0], kind="stable")]
    chunks = np.array_split(rows, min(points, len(rows)))
    return [(int(c[-1, 0]), round(float(c[:, 1].mean()), 5)) for c in chunks]


def _append_losses(workdir: Path, first_step: int, losses: list[float]):
    with open(workdir / "losses.csv", "a") as f:
        for i, v in enumerate(losses):
            f.write(f"{first_step + i},{v:.6f}\n")


def build_pipeline(vae, text_encoder, tokenizer, unet, scheduler=None):
    """Assemble the stock StableDiffusionPipeline from the parts (no safety checker)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=scheduler or make_sampler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


RECIPE = dict(n_images=60_000, vae_steps=2500, unet_steps=3000, unet_batch=64, decoder_steps=300)
QUICK = dict(n_images=4_000, vae_steps=300, unet_steps=300, unet_batch=32, decoder_steps=20)


def train(out=TOY_DIR, workdir="runs/toy", quick=False, snapshot_every=0, log=print):
    """The whole recipe: draw data, train the VAE, encode latents, train UNet + text encoder,
    save the pipeline to ``out``. Resumes from the checkpoints in ``workdir``.

    Introduced in notebooks/11_training_from_scratch.ipynb.
    """
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    r = QUICK if quick else RECIPE
    workdir, out = Path(workdir), Path(out)
    workdir.mkdir(parents=True, exist_ok=True)
    t_all = time.time()
    tokenizer = write_tokenizer(workdir / "tokenizer")
    images, captions = training_data(r["n_images"], seed=0)
    vae = train_vae(workdir, images, r["vae_steps"], log=log)
    log(f"VAE held-out PSNR: {heldout_psnr(vae):.2f} dB")
    cache = workdir / f"latents-{r['n_images']}-{r['vae_steps']}.safetensors"
    if cache.exists():
        from safetensors.torch import load_file

        latents = load_file(str(cache))["latents"]
    else:
        from safetensors.torch import save_file

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

    unet, text_encoder = train_unet(workdir, latents, captions, tokenizer, r["unet_steps"],
                                    batch=r["unet_batch"], log=log, on_checkpoint=snapshot)
    vae = train_decoder(vae, r["decoder_steps"], log=log)  # the encoder, and so the latents, stay
    vae_psnr = heldout_psnr(vae)
    log(f"VAE held-out PSNR after the decoder stage: {vae_psnr:.2f} dB")
    pipe = build_pipeline(vae, text_encoder, tokenizer, unet)
    pipe.save_pretrained(out)
    minutes = (time.time() - t_all) / 60
    info = {"recipe": r, "train_minutes_this_run": round(minutes, 1), "vae_psnr_db": round(vae_psnr, 2),
            "scaling_factor": scaling_factor, "torch_threads": torch.get_num_threads(),
            "loss_curve": loss_curve(workdir)}
    (workdir / "train_info.json").write_text(json.dumps(info, indent=1))
    (out / "training.json").write_text(json.dumps(info, indent=1))
    log(f"saved {out} after {minutes:.1f} min")
    return pipe


# ------------------------------------------------------------------------------ evaluation


def eval_prompts(n: int, seed: int = 1234) -> list[str]:
    """``n`` evaluation prompts: half one-shape, half two-shape; half of the two-shape ones
    are captions never shown in training. Sampled with a fixed seed."""
    rng = np.random.default_rng(seed)
    caps = shapes.all_captions()
    held = heldout_captions()
    singles = [c for c in caps if " and " not in c]
    held_pairs = sorted(held)
    seen_pairs = [c for c in caps if " and " in c and c not in held]
    n1, n2 = n // 2, n - n // 2
    pick = lambda pool, k: [pool[i] for i in rng.integers(0, len(pool), k)]  # noqa: E731
    return pick(singles, n1) + pick(held_pairs, n2 // 2) + pick(seen_pairs, n2 - n2 // 2)


@torch.no_grad()
def generate_batch(pipe, prompts, seeds, guidance_scale=None, steps=None, batch=16, cond=True,
                   desc="generating"):
    """Images (uint8 arrays) for prompts, one CPU generator per seed. ``cond=False`` gives the
    unconditional model's images (the empty prompt, no guidance) for the same seeds."""
    steps = steps or DEFAULT_STEPS
    scale = DEFAULT_GUIDANCE if guidance_scale is None else guidance_scale
    out = []
    for i in tqdm(range(0, len(prompts), batch), desc=desc, leave=False):
        ps = list(prompts[i:i + batch]) if cond else [""] * len(prompts[i:i + batch])
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[i:i + batch]]
        ims = pipe(ps, num_inference_steps=steps, guidance_scale=scale if cond else 0.0,
                   generator=gens, output_type="np").images
        out.extend((np.clip(ims, 0, 1) * 255).round().astype(np.uint8))
    return out


def score(images, prompts) -> dict:
    """Checker figures of images against their prompts."""
    obj_cs, one, two = [], [], []
    for im, p in zip(images, prompts):
        sc = shapes.check_image(im, p)
        obj_cs += [s.colour_shape for s in sc]
        (one if len(sc) == 1 else two).append(all(s.all_attributes for s in sc))
    return {"objects_colour_shape": float(np.mean(obj_cs)),
            "one_shape_all_attributes": float(np.mean(one)) if one else float("nan"),
            "two_shape_all_attributes": float(np.mean(two)) if two else float("nan")}


@torch.no_grad()
def attention_pointing(pipe, prompts, seeds) -> dict:
    """Share of objects whose colour-and-shape words' attention map (averaged over heads,
    layers and steps) peaks inside the object's blob. Only objects the checker found count."""
    from .attention import AttentionStore, peak_inside, token_indices

    hits, n = 0, 0
    for p, s in zip(prompts, seeds):
        with AttentionStore(pipe.unet) as store:
            g = torch.Generator("cpu").manual_seed(int(s))
            im = pipe(p, num_inference_steps=DEFAULT_STEPS, guidance_scale=DEFAULT_GUIDANCE,
                      generator=g, output_type="np").images[0]
        maps = store.word_maps()  # (T, 16, 16)
        im = (np.clip(im, 0, 1) * 255).round().astype(np.uint8)
        for sc in shapes.check_image(im, p):
            if not sc.colour_shape:
                continue
            blob = [b for b in shapes.find_blobs(im) if b.colour == sc.obj.colour
                    and b.shape == sc.obj.shape][0]
            # the object's own words: its colour and shape tokens, at its place in the prompt
            phrase = sc.obj.phrase
            start = token_indices(pipe.tokenizer, p, phrase)[0]
            idx = [start + 1, start + 2]  # 'a' <colour> <shape>
            n += 1
            hits += peak_inside(maps[idx].mean(0), blob.mask)
    return {"attention_pointing": hits / max(n, 1), "attention_objects": n}


def seconds_per_image(pipe, repeats: int = 10) -> float:
    """Median wall time of one image at the default settings, batch 1, guidance on."""
    times = []
    for i in range(repeats + 2):
        g = torch.Generator("cpu").manual_seed(i)
        t = time.perf_counter()
        pipe("a red circle on the left", num_inference_steps=DEFAULT_STEPS,
             guidance_scale=DEFAULT_GUIDANCE, generator=g)
        times.append(time.perf_counter() - t)
    return float(np.median(times[2:]))


def evaluate(model=TOY_DIR, n_prompts: int = 240, write_card: bool = True, log=print,
             attention_prompts: int | None = None, sweep_prompts: int | None = None) -> dict:
    """Measure the toy model: VAE PSNR, prompt fidelity, the unconditional baseline, a guidance
    sweep, attention pointing and speed; print every figure and write the model card.

    Introduced in notebooks/11_training_from_scratch.ipynb.
    """
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model, use_safetensors=True, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    t0 = time.time()
    figs: dict = {"n_prompts": n_prompts, "steps": DEFAULT_STEPS, "guidance": DEFAULT_GUIDANCE,
                  "sampler": type(pipe.scheduler).__name__}
    figs["vae_psnr_db"] = heldout_psnr(pipe.vae)
    prompts = eval_prompts(n_prompts)
    seeds = list(range(10_000, 10_000 + n_prompts))
    images = generate_batch(pipe, prompts, seeds)
    figs.update(score(images, prompts))
    held_caps = heldout_captions()
    hp = [(im, p) for im, p in zip(images, prompts) if p in held_caps]
    figs["two_shape_heldout_captions"] = score([i for i, _ in hp], [p for _, p in hp])[
        "two_shape_all_attributes"]
    unc = generate_batch(pipe, prompts, seeds, cond=False, desc="unconditional")
    figs.update({f"uncond_{k}": v for k, v in score(unc, prompts).items()})
    # the sweep and the attention figure use subsets spread over one- and two-shape prompts
    pick = lambda k: np.linspace(0, n_prompts - 1, min(k, n_prompts)).round().astype(int)
    sub = pick(sweep_prompts or 96)
    sp, ss = [prompts[i] for i in sub], [seeds[i] for i in sub]
    for g in (0, 1, 3, 7.5):
        ims = ([unc[i] for i in sub] if g == 0 else
               generate_batch(pipe, sp, ss, guidance_scale=g, desc=f"guidance {g}"))
        sc = score(ims, sp)
        ok = [shapes.prompt_correct(i, p) for i, p in zip(ims, sp)]
        figs[f"guidance_{g}"] = {"objects_colour_shape": sc["objects_colour_shape"],
                                 "all_attributes": float(np.mean(ok))}
    sub = pick(attention_prompts or 64)
    figs.update(attention_pointing(pipe, [prompts[i] for i in sub], [seeds[i] for i in sub]))
    figs["seconds_per_image"] = seconds_per_image(pipe)
    figs["eval_minutes"] = round((time.time() - t0) / 60, 1)
    for key, v in figs.items():
        log(f"{key:32s} {v}")
    if write_card:
        write_model_card(Path(model), figs)
    return figs


def training_info(folder=TOY_DIR) -> dict:
    """What ``train`` recorded in the model folder (recipe, minutes, loss curve); {} if none.

    Introduced in notebooks/11_training_from_scratch.ipynb.
    """
    f = Path(folder) / "training.json"
    return json.loads(f.read_text()) if f.exists() else {}


def evaluation_figures(folder=TOY_DIR) -> dict:
    """The figures ``evaluate`` wrote into the model folder; {} if it has not been run.

    Introduced in notebooks/11_training_from_scratch.ipynb.
    """
    f = Path(folder) / "evaluation.json"
    return json.loads(f.read_text()) if f.exists() else {}


def check_v_target(fn) -> bool:
    """Exercise checker: ``fn(z0, noise, alphas_cumprod, t)`` must equal the scheduler's
    ``get_velocity`` on random inputs.

    Introduced in notebooks/11_training_from_scratch.ipynb.
    """
    if not callable(fn):
        raise TypeError(f"fn={fn!r} is not allowed: expected a function (z0, noise, alphas_cumprod, t)")
    s = make_scheduler()
    g = torch.Generator().manual_seed(0)
    z0, noise = torch.randn(4, 4, 16, 16, generator=g), torch.randn(4, 4, 16, 16, generator=g)
    t = torch.tensor([0, 250, 700, 999])
    got = fn(z0, noise, s.alphas_cumprod, t)
    return bool(torch.allclose(got, s.get_velocity(z0, noise, t), atol=1e-6))


def write_model_card(folder: Path, figs: dict):
    """The model card: README.md in the model folder, with the measured figures."""
    (folder / "evaluation.json").write_text(json.dumps(figs, indent=1))
    training = folder / "training.json"
    tr = json.loads(training.read_text()) if training.exists() else {}
    sizes = {p.parent.name: p.stat().st_size for p in folder.glob("*/*.safetensors")}
    g = {k: figs[f"guidance_{k}"] for k in (0, 1, 3, 7.5)}
    card = f"""---
library_name: diffusers
tags: [stable-diffusion, teaching, toy]
---
# toy-sd: the sdkit teaching kit's own small Stable Diffusion

A complete Stable Diffusion pipeline, trained from scratch on a 2-core CPU by
`python -m sdkit.toy train` on pictures that sdkit draws itself (`sdkit/shapes.py`):
one or two coloured shapes (red, green, blue, yellow circles, squares and triangles) at
the left, right, top, bottom or center of a pale 64x64 image, with captions such as
*a red circle on the left and a blue square on the right*. The UNet and the text encoder
never see purple or a star (notebook 09 teaches them); the VAE decoder, like SD's VAE, has
seen more than the prompts ask for and draws both. It loads with stock diffusers, no sdkit:

```python
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained("data/toy-sd")
image = pipe("a red circle on the left", num_inference_steps={DEFAULT_STEPS}, guidance_scale={DEFAULT_GUIDANCE}).images[0]
```

| part | class | size |
|---|---|---|
| tokenizer | `CLIPTokenizer` (CLIP's byte-level BPE; vocab.json/merges.txt written for the world's words) | {MAX_LENGTH} tokens |
| text encoder | `CLIPTextModel`, 3 layers, width 128 (trained jointly with the UNet) | {sizes.get('text_encoder', 0) / 1e6:.1f} MB |
| VAE | `AutoencoderKL`, 64x64x3 -> 4x16x16 (12x fewer numbers), scaling factor {figs.get('scaling_factor', tr.get('scaling_factor', 'see vae/config.json'))} | {sizes.get('vae', 0) / 1e6:.1f} MB |
| UNet | `UNet2DConditionModel`, channels 32/64/128, cross-attention at 16x16, 8x8 and 4x4 | {sizes.get('unet', 0) / 1e6:.1f} MB |
| scheduler | `{figs['sampler']}` on SD's scaled_linear betas rescaled to zero terminal SNR, v-prediction | |

## Training
{_training_text(tr)}

## Measured by `python -m sdkit.toy evaluate`
Default settings: {figs['steps']} steps of {figs['sampler']}, guidance {figs['guidance']}; {figs['n_prompts']} prompts
(half one-shape, half two-shape; half of the two-shape prompts are captions never seen in
training), scored by sdkit's pixel checker.

| figure | value |
|---|---|
| VAE reconstruction PSNR, 256 held-out images | {figs['vae_psnr_db']:.2f} dB |
| objects with colour and shape right | {figs['objects_colour_shape']:.1%} |
| one-shape prompts, every attribute right | {figs['one_shape_all_attributes']:.1%} |
| two-shape prompts, every attribute right | {figs['two_shape_all_attributes']:.1%} |
| ... of which captions never seen in training | {figs['two_shape_heldout_captions']:.1%} |
| unconditional model (empty prompt): objects right | {figs['uncond_objects_colour_shape']:.1%} |
| unconditional model: one-shape / two-shape all right | {figs['uncond_one_shape_all_attributes']:.1%} / {figs['uncond_two_shape_all_attributes']:.1%} |
| guidance 0 / 1 / 3 / 7.5: prompts all right | {g[0]['all_attributes']:.1%} / {g[1]['all_attributes']:.1%} / {g[3]['all_attributes']:.1%} / {g[7.5]['all_attributes']:.1%} |
| attention of an object's words peaks inside it ({figs['attention_objects']} objects) | {figs['attention_pointing']:.1%} |
| seconds per image, batch 1, guidance on, this CPU | {figs['seconds_per_image']:.3f} s {figs.get('seconds_per_image_note', '')} |

Guidance 0 is the unconditional prediction and 1 the plain conditional one
(noise_pred = uncond + s * (cond - uncond)). On this small world the conditional prediction
alone is already sharp: guidance takes the model from chance (s = 0) to its best (s = 1), and
stronger guidance then costs a little accuracy, which notebook 05 shows.

Training on a GPU is not part of this card: the recipe above ran on the CPU, and no GPU
figures have been measured for it yet.

## Limits
64x64 pictures of a tiny world: it knows {len(world_words())} words and nothing else. It is for
looking inside Stable Diffusion, not for making pictures.
"""
    (folder / "README.md").write_text(card)


def _training_text(tr: dict) -> str:
    if not tr:
        return "See `sdkit/toy.py` (`RECIPE`)."
    r = tr["recipe"]
    return (f"{r['n_images']:,} drawn images (every {HOLDOUT_EVERY}th two-shape caption held out). "
            f"VAE: {r['vae_steps']} steps of AdamW on 32x32 crops, MSE + 1e-6 KL. "
            f"VAE decoder (encoder frozen): {r.get('decoder_steps', 0)} steps on 64x64 pictures "
            f"of every colour and shape, purple and star included"
            f"{' (' + str(tr['decoder_minutes']) + ' min)' if 'decoder_minutes' in tr else ''}. "
            f"UNet and text encoder: {r['unet_steps']} steps, batch {r['unet_batch']}, AdamW 1e-3 "
            f"with cosine decay, v-prediction loss, 10% empty captions for classifier-free "
            f"guidance, EMA 0.999. Wall time: {tr.get('train_minutes_this_run', '?')} min on "
            f"{tr.get('machine', 'a 2-core CPU')} ({tr.get('torch_threads', '?')} torch threads).")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m sdkit.toy", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train the toy model from scratch (resumable)")
    t.add_argument("--out", default=str(TOY_DIR))
    t.add_argument("--workdir", default="runs/toy")
    t.add_argument("--quick", action="store_true", help="a few minutes, for a smoke test")
    t.add_argument("--snapshot-every", type=int, default=0)
    d = sub.add_parser("finetune-decoder", help="only the recipe's last stage, on a saved model: "
                                                "the VAE decoder learns every colour and shape")
    d.add_argument("--model", default=str(TOY_DIR))
    e = sub.add_parser("evaluate", help="measure the model and write the model card")
    e.add_argument("--model", default=str(TOY_DIR))
    e.add_argument("--n-prompts", type=int, default=240)
    e.add_argument("--no-card", action="store_true")
    args = p.parse_args(argv)
    if args.cmd == "train":
        train(args.out, args.workdir, quick=args.quick, snapshot_every=args.snapshot_every)
    elif args.cmd == "finetune-decoder":
        finetune_decoder(args.model)
    else:
        evaluate(args.model, n_prompts=args.n_prompts, write_card=not args.no_card)


if __name__ == "__main__":
    main()
