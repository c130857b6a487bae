"""sdkit.training: the recipe's parts (tokenizer, architectures, schedule, data, checkpoints,
stages) and the shipped model in data/toy-sd that the recipe made; and notebook 12's exercise
checker (``evaluation.check_eps_from_v``) with its reference solution."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from safetensors import safe_open
from transformers import CLIPModel

from sdkit import clip, evaluation, pipeline, shapes, training

TOY = pipeline.TOY_DIR
needs_model = pytest.mark.skipif(
    not (TOY / "model_index.json").exists(),
    reason="data/toy-sd is missing: run `python -m sdkit.training train`")


def _quiet(*_):
    pass


def test_tokenizer_makes_each_world_word_one_token(tmp_path):
    tok = clip.write_tokenizer(tmp_path / "a")
    for w in shapes.world_words():
        assert len(tok(w, add_special_tokens=False).input_ids) == 1, w
    # words outside the world fall apart into byte-level pieces, as in real CLIP
    assert len(tok("purple", add_special_tokens=False).input_ids) > 1
    ids = tok("a red circle on the left").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and len(ids) == 8
    # the recipe is deterministic: the same files every time
    clip.write_tokenizer(tmp_path / "b")
    for f in ("vocab.json", "merges.txt"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


@needs_model
def test_tokenizer_writer_rebuilds_the_shipped_tokenizer(tmp_path):
    """Vocabulary, merges, special tokens and pre-/post-processing all equal the shipped
    tokenizer's; only the padding/truncation state a pipeline call leaves behind may differ."""
    clip.write_tokenizer(tmp_path)

    def read(folder):
        spec = json.loads((folder / "tokenizer.json").read_text())
        spec.pop("truncation"), spec.pop("padding")
        return spec

    assert read(tmp_path) == read(TOY / "tokenizer")
    assert ((tmp_path / "tokenizer_config.json").read_text()
            == (TOY / "tokenizer" / "tokenizer_config.json").read_text())


@needs_model
def test_architectures_and_schedule_are_the_shipped_ones(toy_pipe):
    """The constructors build the shipped model's shapes, and the schedule the recipe trains
    with is the one the shipped pipeline carries (rebuilt by pipeline.training_scheduler)."""
    parts = {"vae": training.make_vae(), "unet": training.make_unet(),
             "text_encoder": training.make_text_encoder(toy_pipe.tokenizer)}
    for name, part in parts.items():
        shipped = getattr(toy_pipe, name).state_dict()
        assert {k: v.shape for k, v in part.state_dict().items()} == {
            k: v.shape for k, v in shipped.items()}, name
    ours, theirs = training.make_scheduler(), pipeline.training_scheduler(toy_pipe)
    assert torch.equal(ours.alphas_cumprod, theirs.alphas_cumprod)
    assert ours.config.prediction_type == theirs.config.prediction_type == "v_prediction"
    assert ours.alphas_cumprod[-1].item() < 1e-6  # zero terminal SNR: x_T is pure noise


def test_checkpoints_are_safetensors_and_resume(tmp_path):
    images, _ = training.training_data(16)
    training._train_vae(tmp_path, images, steps=2, batch=2, log=_quiet)
    ckpt = tmp_path / "vae.ckpt.safetensors"
    assert ckpt.read_bytes()[8:9] == b"{"  # a safetensors header, not a pickle
    vae_a = training._train_vae(tmp_path, images, steps=3, batch=2, log=_quiet)  # resumes at 2
    with safe_open(str(ckpt), "pt") as f:
        assert json.loads(f.metadata()["meta"])["step"] == 3
        assert any(k.startswith("opt/") for k in f.keys())  # optimizer moments saved too
    vae_b = training.make_vae()
    training._load_ckpt(ckpt, {"vae": vae_b}, torch.optim.AdamW(vae_b.parameters()))
    for (n, a), (_, b) in zip(vae_a.state_dict().items(), vae_b.state_dict().items()):
        assert torch.equal(a, b), n


def test_training_data_holds_out_captions():
    images, captions = training.training_data(400)
    held = shapes.heldout_captions()
    assert images.shape == (400, 64, 64, 3) and images.dtype == np.uint8
    assert len(held) > 50 and not held & set(captions)
    # the same pictures as drawing the seeds one by one, the held-out ones skipped
    kept = [e for e in map(shapes.make_example, range(440)) if e.caption not in held][:400]
    assert [e.caption for e in kept] == captions
    assert np.array_equal(np.stack([e.image for e in kept]), images)


def test_tokenize_pads_to_the_toys_length(tiny_pipe):
    ids = training.tokenize(tiny_pipe.tokenizer, ["a red circle on the left", ""])
    assert ids.shape == (2, pipeline.MAX_LENGTH)
    assert ids[1, 0] == tiny_pipe.tokenizer.bos_token_id


@needs_model
def test_shipped_model_loads_with_stock_diffusers_and_no_sdkit():
    code = (
        "import sys, torch\n"
        "from diffusers import StableDiffusionPipeline\n"
        f"p = StableDiffusionPipeline.from_pretrained({str(TOY)!r}, local_files_only=True)\n"
        "im = p('a red circle on the left', num_inference_steps=4, output_type='np',"
        " generator=torch.Generator().manual_seed(0)).images[0]\n"
        "assert 'sdkit' not in sys.modules\n"
        "print(type(p.text_encoder).__name__, type(p.unet).__name__,"
        " type(p.vae).__name__, im.shape)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd="/", env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "CLIPTextModel UNet2DConditionModel AutoencoderKL (64, 64, 3)" in out.stdout


@needs_model
def test_shipped_folder_is_small_safetensors_with_a_model_card():
    files = [p for p in TOY.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 25 * 2**20
    assert not [p for p in files if p.suffix in (".bin", ".ckpt", ".pt", ".pth", ".pkl")]
    assert len([p for p in files if p.suffix == ".safetensors"]) == 3
    card = (TOY / "README.md").read_text()
    assert "python -m sdkit.training train" in card and "python -m sdkit.evaluation" in card
    assert "sdkit.toy" not in card


@needs_model
def test_scaling_factor_was_measured_from_data():
    vae = AutoencoderKL.from_pretrained(TOY / "vae")
    assert vae.config.scaling_factor != 0.18215  # SD's own value; ours was measured here
    images = np.stack([shapes.make_example(20_000 + i).image for i in range(64)])
    z = training.encode_latents(vae, images, batch=32)  # (64, 4, 16, 16), scaled
    assert z.shape == (64, 4, 16, 16)
    assert 0.8 < z.std().item() < 1.25


def test_decoder_stage_trains_the_decoder_only_and_records_itself(tmp_path):
    """The recipe's last stage: the encoder (and so every latent the UNet learnt) stays
    bit-identical, the decoder moves, and the folder's VAE and training record are rewritten
    with the held-out PSNR of the VAE now in the folder."""
    torch.manual_seed(0)
    vae = training.make_vae()
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    training._train_decoder(vae, steps=2, n_images=8, batch=4, log=_quiet)
    after = vae.state_dict()
    enc = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    dec = [k for k in before if k.startswith(("decoder.", "post_quant_conv."))]
    assert enc and dec and len(enc) + len(dec) == len(before)
    assert all(torch.equal(before[k], after[k]) for k in enc)
    assert any(not torch.equal(before[k], after[k]) for k in dec)
    assert not any(p.requires_grad for p in vae.parameters())

    folder = tmp_path / "model"
    vae.save_pretrained(folder / "vae")
    (folder / "training.json").write_text(json.dumps({"recipe": {"decoder_steps": 0}}))
    psnr = training._finetune_decoder(folder, steps=1, n_images=8, log=_quiet)
    saved = AutoencoderKL.from_pretrained(folder / "vae")
    assert psnr == training.heldout_psnr(saved)  # the figure is the saved VAE's
    assert not all(torch.equal(after[k], v) for k, v in saved.state_dict().items())
    info = json.loads((folder / "training.json").read_text())
    assert info["recipe"]["decoder_steps"] == 1 and info["vae_psnr_db"] == round(psnr, 2)
    assert "_name_or_path" not in json.loads((folder / "vae" / "config.json").read_text())


def test_cli_lists_both_commands(capsys):
    with pytest.raises(SystemExit) as e:
        training._main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "python -m sdkit.training" in out and "train" in out and "finetune-decoder" in out


# ------------------------------------------------------------------------------ the exercise

SOLUTION = Path(__file__).resolve().parent.parent / "notebooks" / "solutions" / \
    "12_training_from_scratch.py"


def _ab(ac, t):
    return ac[t].sqrt().view(-1, 1, 1, 1), (1 - ac[t]).sqrt().view(-1, 1, 1, 1)


def test_eps_from_v_checker_accepts_the_reference_solution(capsys):
    namespace = {"torch": torch}  # the solution needs nothing else of the notebook
    exec(SOLUTION.read_text(encoding="utf-8"), namespace)
    assert evaluation.check_eps_from_v(namespace["eps_from_v"]) is True
    assert "Right" in capsys.readouterr().out
    # the same noise by way of z0-hat, dividing by sqrt(1 - alpha_bar) > 0: right too
    def via_z0(z_t, v, ac, t):
        a, b = _ab(ac, t)
        return (z_t - a * (a * z_t - b * v)) / b

    assert evaluation.check_eps_from_v(via_z0) is True


@pytest.mark.parametrize("fn, said", [
    (lambda z_t, v, ac, t: _ab(ac, t)[0] * z_t - _ab(ac, t)[1] * v, "that is x0-hat"),
    (lambda z_t, v, ac, t: _ab(ac, t)[1] * v + _ab(ac, t)[0] * z_t, "swapped"),
    (lambda z_t, v, ac, t: _ab(ac, t)[0] * v - _ab(ac, t)[1] * z_t, "sign"),
    # through z0-hat from v, then epsilon from z0-hat dividing by sqrt(alpha_bar): nan at T
    (lambda z_t, v, ac, t: (z_t - _ab(ac, t)[1] * v) / _ab(ac, t)[0], "not finite at t = [999]"),
    (lambda z_t, v, ac, t: ac[t] * v + (1 - ac[t]) * z_t, "raised RuntimeError"),  # no view
    (lambda z_t, v, ac, t: _ab(ac, t)[0] ** 2 * v + _ab(ac, t)[1] ** 2 * z_t, "square roots"),
    (lambda z_t, v, ac, t: v.mean(0), "Expected a tensor of shape"),
    (lambda z_t, v, ac, t: z_t, "Hint: write z_t and v"),  # right at t = T only
])
def test_eps_from_v_checker_rejects_typical_mistakes_with_a_hint(fn, said, capsys):
    assert evaluation.check_eps_from_v(fn) is False
    out = capsys.readouterr().out
    assert said in out and "Hint" in out


def test_eps_from_v_checker_unsolved(capsys):
    def eps_from_v(z_t, v, alphas_cumprod, t):
        ...  # the learner's cell as shipped

    assert evaluation.check_eps_from_v(eps_from_v) is False
    assert "not solved yet" in capsys.readouterr().out.lower()


@pytest.mark.parametrize("frozen", [False, True])
def test_unet_stage_trains_or_freezes_the_text_encoder_and_resumes(tmp_path, frozen, toy_pipe):
    """The shipped recipe trains the text encoder with the UNet; --text-encoder clip leaves
    the toy CLIP's text tower bit-identical. Both resume from their checkpoint."""
    tok = toy_pipe.tokenizer
    caps = [shapes.make_example(i).caption for i in range(8)]
    lat = torch.randn(8, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    te = training.make_text_encoder(
        tok, CLIPModel.from_pretrained(clip.TOY_CLIP_DIR, use_safetensors=True) if frozen else None)
    before = [p.detach().clone() for p in te.parameters()]
    unet, out = training._train_unet(tmp_path, lat, caps, tok, te, steps=2, batch=4,
                                     frozen=frozen, log=_quiet)
    changed = any(not torch.equal(a, b) for a, b in zip(before, te.parameters()))
    assert changed != frozen
    ckpt = tmp_path / "unet.ckpt.safetensors"
    assert json.loads(safe_open(str(ckpt), "pt").metadata()["meta"])["step"] == 2
    training._train_unet(tmp_path, lat, caps, tok, te, steps=3, batch=4, frozen=frozen,
                         log=_quiet)  # resumes at step 2
    assert json.loads(safe_open(str(ckpt), "pt").metadata()["meta"])["step"] == 3
