"""The kit's own Stable Diffusion: its recipe's parts and the shipped model in data/toy-sd."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from sdkit import shapes, toy

TOY = toy.TOY_DIR
needs_model = pytest.mark.skipif(not (TOY / "model_index.json").exists(),
                                 reason="data/toy-sd is missing: run `python -m sdkit.toy train`")


def test_tokenizer_makes_each_world_word_one_token(tmp_path):
    tok = toy.write_tokenizer(tmp_path / "a")
    for w in toy.world_words():
        assert len(tok(w, add_special_tokens=False).input_ids) == 1, w
    # words outside the world fall apart into byte-level pieces, as in real CLIP
    assert len(tok("purple", add_special_tokens=False).input_ids) > 1
    ids = tok("a red circle on the left").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and len(ids) == 8
    # the recipe is deterministic: the same files every time
    toy.write_tokenizer(tmp_path / "b")
    for f in ("vocab.json", "merges.txt"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


def test_checkpoints_are_safetensors_and_resume(tmp_path):
    images, _ = toy.training_data(16)
    toy.train_vae(tmp_path, images, steps=2, batch=2, log=lambda *a: None)
    ckpt = tmp_path / "vae.ckpt.safetensors"
    assert ckpt.read_bytes()[8:9] == b"{"  # a safetensors header, not a pickle
    vae_a = toy.train_vae(tmp_path, images, steps=3, batch=2, log=lambda *a: None)  # resumes at 2
    from safetensors import safe_open

    with safe_open(str(ckpt), "pt") as f:
        assert json.loads(f.metadata()["meta"])["step"] == 3
        assert any(k.startswith("opt/") for k in f.keys())  # optimizer moments saved too
    vae_b = toy.make_vae()
    opt = torch.optim.AdamW(vae_b.parameters())
    toy._load_ckpt(ckpt, {"vae": vae_b}, opt)
    for (n, a), (_, b) in zip(vae_a.state_dict().items(), vae_b.state_dict().items()):
        assert torch.equal(a, b), n


def test_training_data_holds_out_captions():
    _, captions = toy.training_data(400)
    held = toy.heldout_captions()
    assert len(held) > 50 and not held & set(captions)


def test_v_prediction_target_and_zero_terminal_snr():
    s = toy.make_scheduler()
    assert s.alphas_cumprod[-1].item() < 1e-6  # zero terminal SNR: x_T is pure noise
    x0, noise = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    t = torch.tensor([10, 900])
    a = s.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    b = (1 - s.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(s.get_velocity(x0, noise, t), a * noise - b * x0)


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
    assert "python -m sdkit.toy train" in card and "PSNR" in card


@needs_model
def test_scaling_factor_was_measured_from_data():
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(TOY / "vae")
    sf = vae.config.scaling_factor
    assert sf != 0.18215  # SD's own value; ours was measured on the shapes world
    x = toy.to_tensor(np.stack([shapes.make_example(20_000 + i).image for i in range(64)]))
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean * sf  # (64, 4, 16, 16)
    assert z.shape == (64, 4, 16, 16)
    assert 0.8 < z.std().item() < 1.25


@needs_model
def test_small_evaluation_meets_the_bars():
    """A small version of `python -m sdkit.toy evaluate`; thresholds a little below the bars."""
    figs = toy.evaluate(TOY, n_prompts=32, write_card=False, attention_prompts=12,
                        sweep_prompts=16, log=lambda *a: None)
    assert figs["vae_psnr_db"] >= 31.5
    assert figs["objects_colour_shape"] >= 0.90
    assert figs["one_shape_all_attributes"] >= 0.75
    assert figs["two_shape_all_attributes"] >= 0.60
    # conditioning matters: the empty prompt scores far lower on the same prompts
    assert figs["uncond_one_shape_all_attributes"] <= 0.35
    assert figs["guidance_3"]["all_attributes"] > figs["guidance_0"]["all_attributes"] + 0.3
    assert figs["attention_pointing"] >= 0.6


def test_decoder_stage_trains_the_decoder_only_and_records_itself(tmp_path):
    """The recipe's last stage: the encoder (and so every latent the UNet learnt) stays
    bit-identical, the decoder moves, and the folder's VAE and training record are rewritten."""
    torch.manual_seed(0)
    vae = toy.make_vae()
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    toy.train_decoder(vae, steps=2, n_images=8, batch=4, log=lambda *_: None)
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
    psnr = toy.finetune_decoder(folder, steps=1, n_images=8, log=lambda *_: None)
    assert 0 < psnr < 100
    info = json.loads((folder / "training.json").read_text())
    assert info["recipe"]["decoder_steps"] == 1 and info["vae_psnr_db"] == round(psnr, 2)
    assert "_name_or_path" not in json.loads((folder / "vae" / "config.json").read_text())


@pytest.mark.parametrize("kwargs, name", [
    (dict(steps=-1), "steps"), (dict(n_images=0), "n_images"), (dict(batch=0), "batch"),
    (dict(lr=float("nan")), "lr"), (dict(seed=-1), "seed"),
])
def test_decoder_stage_refuses_bad_inputs(kwargs, name):
    from sdkit.checks import SdkitInputError

    with pytest.raises(SdkitInputError, match=rf"^{name}="):
        toy.train_decoder(toy.make_vae(), **{"steps": 1, **kwargs})


def test_finetune_decoder_refuses_a_folder_without_a_vae(tmp_path):
    from sdkit.checks import SdkitInputError

    with pytest.raises(SdkitInputError, match=r"^folder="):
        toy.finetune_decoder(tmp_path)
