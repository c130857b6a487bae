"""The exam of the kit's own model (notebook 12): every figure of its model card.

    python -m sdkit.evaluation            # ~1 min on 2 CPU cores: print the figures, write the card
    python -m sdkit.evaluation --no-card  # prints them only

``evaluate`` measures the model in data/toy-sd: the VAE's held-out PSNR, prompt fidelity by
the shapes checker (one- and two-shape prompts, captions never seen in training), the
unconditional baseline, a guidance sweep, attention pointing and the speed of one image. The
figures go to ``evaluation.json`` and into the model card (``README.md``), whose text is the
template ``sdkit/model_card.md``. The recipe that trains the model is ``sdkit.training``;
``check_eps_from_v`` is the learner's exam of notebook 12 (the noise a v-prediction
model implies).

Left out: FID and CLIP scores (the shapes world has its own exact checker), GPU timings.
"""

from __future__ import annotations

import argparse
import json
import time
from importlib.resources import files
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

from . import attention, checks, clip, device, shapes
from .pipeline import (
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    MAX_LENGTH,
    TOY_DIR,
    generate_images,
    training_info,
)
from .training import heldout_psnr, make_scheduler

EVAL_SEED = 10_000  # prompt i of the evaluation is generated with seed EVAL_SEED + i
GUIDANCE_SWEEP = (0, 1, 3, 7.5)
BATCH = 16  # images per pipeline call


def _seconds_per_image(pipe, repeats: int = 10) -> float:
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
    sweep (``sweep_prompts``, 96), attention pointing (``attention_prompts``, 64) and speed;
    print every figure and, with ``write_card``, write them into the model folder's card.
    The images kept must fit in memory (``SDKIT_MEMORY_LIMIT=32GiB`` raises the limit); each
    stage shows a progress bar and stops on KeyboardInterrupt, writing nothing.

    Introduced in notebooks/12_training_from_scratch.ipynb.
    """
    folder = checks.check_model_path(model)
    if not folder.is_dir():
        checks.fail("model", str(model), "expected a diffusers pipeline folder, e.g. data/toy-sd")
    n_prompts = checks.check_int("n_prompts", n_prompts, 2, 10_000)
    write_card = checks.check_bool("write_card", write_card)
    n_attention = checks.check_int("attention_prompts", 64 if attention_prompts is None
                                   else attention_prompts, 1, 10_000)  # 0 is refused, not 64
    n_sweep = checks.check_int("sweep_prompts", 96 if sweep_prompts is None else sweep_prompts,
                               1, 10_000)
    pipe = StableDiffusionPipeline.from_pretrained(folder, use_safetensors=True,
                                                   local_files_only=True)
    side, kept = pipe.vae.config.sample_size, 2 * n_prompts + len(GUIDANCE_SWEEP) * n_sweep
    device.check_memory("n_prompts", n_prompts, kept * 3 * side**2 + n_attention * 4 * MAX_LENGTH
                        * side**2, f"{kept} evaluation images of {side}x{side}", "cpu")
    pipe.set_progress_bar_config(disable=True)
    t0 = time.time()
    figs: dict = {"n_prompts": n_prompts, "steps": DEFAULT_STEPS, "guidance": DEFAULT_GUIDANCE,
                  "sampler": type(pipe.scheduler).__name__}
    figs["vae_psnr_db"] = heldout_psnr(pipe.vae)
    prompts = shapes.eval_prompts(n_prompts)
    seeds = list(range(EVAL_SEED, EVAL_SEED + n_prompts))

    def generate(ps, ss, guidance_scale=DEFAULT_GUIDANCE, desc="generating"):
        return generate_images(pipe, ps, ss, num_inference_steps=DEFAULT_STEPS,
                               guidance_scale=guidance_scale, batch_size=BATCH, output="uint8",
                               desc=desc)

    images = generate(prompts, seeds)
    figs.update(shapes.score_images(images, prompts))
    held = shapes.heldout_captions()
    hp = [(im, p) for im, p in zip(images, prompts) if p in held]
    figs["two_shape_heldout_captions"] = shapes.score_images(
        [i for i, _ in hp], [p for _, p in hp])["two_shape_all_attributes"]
    # the unconditional model: the empty prompt without guidance, same seeds
    unc = generate("", seeds, guidance_scale=0.0, desc="unconditional")
    figs.update({f"uncond_{k}": v for k, v in shapes.score_images(unc, prompts).items()})
    # the sweep and the attention figure use subsets spread over one- and two-shape prompts
    pick = lambda k: np.linspace(0, n_prompts - 1, min(k, n_prompts)).round().astype(int)
    sub = pick(n_sweep)
    sp, ss = [prompts[i] for i in sub], [seeds[i] for i in sub]
    for g in GUIDANCE_SWEEP:
        ims = [unc[i] for i in sub] if g == 0 else generate(sp, ss, g, desc=f"guidance {g}")
        ok = shapes.hits(ims, sp, criterion="all_attributes")
        figs[f"guidance_{g}"] = {
            "objects_colour_shape": shapes.score_images(ims, sp)["objects_colour_shape"],
            "all_attributes": float(np.mean(ok))}
    sub = pick(n_attention)
    figs.update(attention.pointing_rate(pipe, [prompts[i] for i in sub],
                                        [seeds[i] for i in sub]))
    # what a user of the stock pipeline gets first: 50 steps, guidance 7.5
    two = [i for i, p in enumerate(prompts) if " and " in p]
    ims = generate_images(pipe, [prompts[i] for i in two], [seeds[i] for i in two],
                          num_inference_steps=50, guidance_scale=7.5, batch_size=BATCH,
                          output="uint8", desc="stock defaults")
    figs["stock_defaults_two_shape_all_attributes"] = float(np.mean(
        shapes.hits(ims, [prompts[i] for i in two], criterion="all_attributes")))
    clip_dir = folder.parent / "toy-clip"
    if (clip_dir / "config.json").is_file():  # the CLIP score, as real SD evaluations report
        toy_clip = clip.load_clip(clip_dir)
        drawn = [shapes.render(shapes.parse_caption(p), s).image for p, s in zip(prompts, seeds)]
        figs.update({f"clip_score_{k}": clip.clip_score(toy_clip, pipe.tokenizer, ims_k, prompts)
                     for k, ims_k in (("generated", images), ("unconditional", unc),
                                      ("drawn", drawn))})
        figs.update({f"clip_{k}": v for k, v in clip.retrieval(toy_clip, pipe.tokenizer).items()})
    figs["seconds_per_image"] = _seconds_per_image(pipe)
    figs["eval_minutes"] = round((time.time() - t0) / 60, 1)
    for key, v in figs.items():
        log(f"{key:32s} {v}")
    if write_card:
        _write_model_card(folder, figs)
    return figs


def _training_text(tr: dict) -> str:
    if not tr:
        return "See `sdkit/training.py` (`RECIPE`)."
    r = tr["recipe"]
    return (f"{r['n_images']:,} drawn images (every {shapes.HOLDOUT_EVERY}th two-shape caption "
            f"held out). "
            f"VAE: {r['vae_steps']} steps of AdamW on 32x32 crops, MSE + 1e-6 KL. "
            f"VAE decoder (encoder frozen): {r.get('decoder_steps', 0)} steps on 64x64 pictures "
            f"of every colour and shape, purple and star included"
            f"{' (' + str(tr['decoder_minutes']) + ' min)' if 'decoder_minutes' in tr else ''}. "
            + (f"Toy CLIP: {r['clip_steps']} contrastive steps (notebook 04); UNet on its frozen "
               f"text tower, {r.get('unnamed', 0):.0%} of pictures of every colour and shape "
               f"(no caption says purple or star: a purple object is called red or blue, a star "
               f"is left out)"
               + (f", token-grounding loss weight {r['grounding']} (`sdkit.grounding`)"
                  if r.get("grounding") else "") + ": " if "clip_steps" in r
               else "UNet and text encoder: ")
            + f"{r['unet_steps']} steps, batch {r['unet_batch']}, AdamW 1e-3 "
            f"with cosine decay, v-prediction loss, 10% empty captions for classifier-free "
            f"guidance, EMA 0.999. Wall time: {tr.get('train_minutes_this_run', '?')} min on "
            f"{tr.get('machine', 'a 2-core CPU')} ({tr.get('torch_threads', '?')} torch threads)"
            f"{'; per stage (min): ' + str(tr['stage_minutes']) if 'stage_minutes' in tr else ''}.")


def _text_encoder_notes(recipe: dict) -> dict:
    """The card's words on where the pipeline's text encoder comes from."""
    if "clip_steps" in recipe:
        return {"text_encoder_origin": "the toy CLIP's text tower, frozen while the UNet trained",
                "clip_note": "The pipeline's text encoder is its text tower, frozen while the UNet "
                             "trained, as SD 1.x's is CLIP ViT-L's."}
    return {"text_encoder_origin": "trained jointly with the UNet",
            "clip_note": "The pipeline's text encoder is not its text tower: it trained jointly "
                         "with the UNet. `python -m sdkit.training train --text-encoder clip` "
                         "trains the UNet on the CLIP's frozen tower instead, with a "
                         "token-grounding loss (`sdkit.grounding`); that model is not shipped, "
                         "as textual inversion (notebook 10) finds no purple in it."}


_CLIP_ROWS = (  # the model card's rows for the toy CLIP and the CLIP score, when measured
    ("clip_image_to_caption_top1", "toy CLIP, zero-shot on 400 new scenes: a picture's caption "
     "ranked first of the grammar's captions with as many objects", ".1%"),
    ("clip_image_to_caption_top1_of_all", "... ranked first of all the grammar's 588", ".1%"),
    ("clip_image_to_caption_heldout_captions", "... on scenes whose caption training never saw",
     ".1%"),
    ("clip_caption_to_image_top1", "toy CLIP: a caption's picture ranked first of the 400", ".1%"),
    ("clip_attribute_colour", "toy CLIP: true caption over one with a colour changed", ".1%"),
    ("clip_attribute_shape", "toy CLIP: ... with a shape changed", ".1%"),
    ("clip_attribute_position", "toy CLIP: ... with the positions swapped", ".1%"),
    ("clip_attribute_binding", "toy CLIP: ... with the two colours exchanged", ".1%"),
    ("clip_score_generated", "CLIP score (100 x cosine) of the generated pictures", ".1f"),
    ("clip_score_drawn", "... of pictures drawn from the same prompts (the ceiling)", ".1f"),
    ("clip_score_unconditional", "... of the unconditional model's pictures (the floor)", ".1f"),
    ("stock_defaults_two_shape_all_attributes", "two-shape prompts all right at the stock "
     "pipeline's defaults (50 steps, guidance 7.5)", ".1%"),
    ("attention_pointing_one", "attention pointing, one-object prompts", ".1%"),
    ("attention_pointing_two", "attention pointing, two-object prompts", ".1%"),
)


def _write_model_card(folder, figs: dict) -> Path:
    """Write ``figs`` to ``evaluation.json`` and the model card ``README.md`` (the template
    ``sdkit/model_card.md`` filled in) into the model folder; returns the card's path.
    ``evaluate`` calls it (``python -m sdkit.evaluation``)."""
    folder = checks.check_model_path(folder)
    missing = [k for k in ("vae_psnr_db", "attention_pointing", "seconds_per_image", "sampler",
                           *(f"guidance_{g}" for g in GUIDANCE_SWEEP)) if k not in figs]
    if missing:
        checks.fail("figs", sorted(figs)[:8], f"expected evaluate's figures; missing {missing}")
    (folder / "evaluation.json").write_text(json.dumps(figs, indent=1))
    tr = training_info(folder)
    sizes = {p.parent.name: p.stat().st_size for p in folder.glob("*/*.safetensors")}
    values = {k: v for k, v in figs.items() if not k.startswith("guidance_")}
    values.update({f"guidance_{g}".replace(".", "_"): figs[f"guidance_{g}"]["all_attributes"]
                   for g in GUIDANCE_SWEEP})
    values.setdefault("seconds_per_image_note", "")
    values["clip_rows"] = "".join(f"| {label} | {figs[k]:{fmt}} |\n" for k, label, fmt in _CLIP_ROWS
                                  if k in figs)
    values.update(
        default_steps=DEFAULT_STEPS, default_guidance=DEFAULT_GUIDANCE, max_length=MAX_LENGTH,
        scaling_factor=figs.get("scaling_factor", tr.get("scaling_factor", "see vae/config.json")),
        training_text=_training_text(tr), n_words=len(shapes.world_words()),
        **_text_encoder_notes(tr.get("recipe", {})),
        **{f"{part}_mb": sizes.get(part, 0) / 1e6 for part in ("text_encoder", "vae", "unet")})
    template = files("sdkit").joinpath("model_card.md").read_text(encoding="utf-8")
    card = folder / "README.md"
    card.write_text(template.format(**values))
    return card


# ------------------------------------------------------------------------------ the learner's exam


def _eps_mistakes(z_t, v, a, b) -> list[tuple[torch.Tensor, str]]:
    """What the typical wrong versions of eps from v give, each with what went wrong."""
    return [
        (a * z_t - b * v, "that is x0-hat, the clean latent; the question asks for the noise"),
        (b * v + a * z_t, "sqrt(alpha_bar_t) and sqrt(1 - alpha_bar_t) are swapped"),
        (a * v - b * z_t, "a sign is wrong: check the sign of z0 in v"),
        (a**2 * v + b**2 * z_t, "the square roots are missing: alpha_bar_t is already the "
                                "signal's variance, its square root the signal's share"),
    ]


def check_eps_from_v(fn) -> bool:
    """Notebook 12's exercise: ``fn(z_t, v, alphas_cumprod, t)`` must give back the noise
    that made ``z_t`` from the v-prediction target ``v``, for a batch with one timestep per
    latent, on the toy's training schedule (zero terminal SNR), t = T included.

    Prints what is right or wrong, with a hint naming the typical mistake it recognises (the
    clean latent instead, swapped or missing square roots, a division that fails at t = T);
    a learner's exception is a wrong answer (reported, not raised); a function returning None
    is not solved yet. Returns True or False.

    Introduced in notebooks/12_training_from_scratch.ipynb.
    """
    if not callable(fn):
        print(f"Not solved yet: expected a function eps_from_v(z_t, v, alphas_cumprod, t), "
              f"got {type(fn).__name__}.")
        return False
    s = make_scheduler()
    g = torch.Generator().manual_seed(0)
    z0, noise = torch.randn(4, 4, 16, 16, generator=g), torch.randn(4, 4, 16, 16, generator=g)
    t = torch.tensor([0, 250, 700, s.config.num_train_timesteps - 1])
    z_t, v = s.add_noise(z0, noise, t), s.get_velocity(z0, noise, t)
    hint = ("Hint: write z_t and v in terms of z0 and the noise, and eliminate z0; "
            "alpha_bar_t + (1 - alpha_bar_t) = 1. Shape alphas_cumprod[t] (B,) to (B, 1, 1, 1).")
    ok, got = checks.call_answer(fn, (z_t.clone(), v.clone(), s.alphas_cumprod.clone(), t.clone()),
                                 "eps_from_v", hint)
    if not ok:
        return False
    if not torch.is_tensor(got) or got.shape != noise.shape:
        shown = tuple(got.shape) if torch.is_tensor(got) else type(got).__name__
        print(f"Expected a tensor of shape {tuple(noise.shape)}, got {shown}. {hint}")
        return False
    got = got.detach().float()
    if not torch.isfinite(got).all():
        bad = sorted({int(t[k]) for k in range(len(t)) if not torch.isfinite(got[k]).all()})
        print(f"Not yet: not finite at t = {bad}. Hint: on this schedule alpha_bar_T = 0, so "
              "a formula that divides by sqrt(alpha_bar_t) fails at t = T; one without any "
              "division exists.")
        return False
    if not torch.allclose(got, noise, atol=1e-4):
        ac = s.alphas_cumprod[t].view(-1, 1, 1, 1)
        why = next((w for want, w in _eps_mistakes(z_t, v, ac.sqrt(), (1 - ac).sqrt())
                    if torch.allclose(got, want, atol=1e-4)), None)
        err = (got - noise).abs().amax(dim=(1, 2, 3))
        print(f"Not yet: largest difference from the true noise at t = {t.tolist()}: "
              f"{[round(e, 4) for e in err.tolist()]}. " + (f"Hint: {why}." if why else hint))
        return False
    print("Right: eps-hat = sqrt(alpha_bar_t) v + sqrt(1 - alpha_bar_t) z_t, no division, so it "
          "holds at t = T too, where it reads eps-hat = z_T: at zero SNR the input is the noise.")
    return True


def _main(argv=None):
    p = argparse.ArgumentParser(prog="python -m sdkit.evaluation",
                                description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(TOY_DIR))
    p.add_argument("--n-prompts", type=int, default=240)
    p.add_argument("--no-card", action="store_true", help="print the figures only")
    args = p.parse_args(argv)
    evaluate(args.model, n_prompts=args.n_prompts, write_card=not args.no_card)


if __name__ == "__main__":
    _main()
