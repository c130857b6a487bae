"""sdkit.pipeline: loading real diffusers folders and single files offline, and its refusals.

A tiny random StableDiffusionPipeline (UNet2DConditionModel, AutoencoderKL, CLIPTextModel and
a real CLIPTokenizer) is saved to a temporary folder, and also as one .safetensors file in the
original SD key layout; both are loaded back through load_pipeline and generate images.
"""

import numpy as np
import pytest
import torch

from sdkit import checks, pipeline, toy
from sdkit.device import DeviceError

PROMPT = "a red circle on the left"


def _tiny_pipeline(folder):
    from diffusers import (
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    tokenizer = toy.write_tokenizer(folder / "_tok")
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,  # SD's 2 per block
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=4, norm_num_groups=8)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=8, sample_size=16)  # mid-block attention kept
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    for module in (unet, vae, text_encoder):  # random weights that are not near zero
        for p in module.parameters():
            p.data.normal_(0, 0.05)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet,
        scheduler=DPMSolverMultistepScheduler(steps_offset=1), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    return pipe


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(original pipeline, diffusers folder, single .safetensors file)"""
    root = tmp_path_factory.mktemp("tiny-sd")
    pipe = _tiny_pipeline(root)
    folder = root / "tiny-sd"
    pipe.save_pretrained(folder, safe_serialization=True)
    single = pipeline.save_single_file(pipe, root / "tiny-sd.safetensors")
    return pipe, folder, single


def _image(pipe, seed=3):
    img = pipeline.generate(pipe, PROMPT, seed=seed, num_inference_steps=2, guidance_scale=3.0,
                            height=16, width=16)
    return np.asarray(img)


def test_folder_round_trip(saved):
    original, folder, _ = saved
    assert sorted(p.name for p in (folder / "unet").iterdir() if p.suffix == ".safetensors")
    pipe = pipeline.load_pipeline(str(folder), device="cpu", dtype="float32")
    assert pipe.unet.dtype == torch.float32 and pipe.device.type == "cpu"
    a, b = _image(pipe), _image(pipe)
    assert a.shape == (16, 16, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)  # same seed, same image
    assert not np.array_equal(a, _image(pipe, seed=4))
    assert np.array_equal(a, _image(original))  # what was saved is what was loaded


def test_single_file_round_trip(saved):
    original, folder, single = saved
    from safetensors import safe_open

    with safe_open(str(single), "pt") as f:
        keys = list(f.keys())
    # the original SD layout, not diffusers'
    assert any(k.startswith("model.diffusion_model.input_blocks.") for k in keys)
    assert any(k.startswith("first_stage_model.decoder.up.") for k in keys)
    assert "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight" in keys
    pipe = pipeline.load_pipeline(str(single), device="cpu", dtype="float32", config=str(folder))
    for name in ("unet", "vae", "text_encoder"):  # every weight came back, unchanged
        want, got = getattr(original, name).state_dict(), getattr(pipe, name).state_dict()
        assert want.keys() == got.keys(), name
        for k in want:
            assert torch.equal(want[k], got[k]), f"{name}.{k}"
    a = _image(pipe)
    assert a.shape == (16, 16, 3)
    assert np.array_equal(a, _image(pipe))
    assert np.array_equal(a, _image(original))


def test_single_file_config_from_env(saved, monkeypatch):
    _, folder, single = saved
    monkeypatch.setenv("SDKIT_MODEL", str(single))
    monkeypatch.setenv("SDKIT_MODEL_CONFIG", str(folder))
    pipe = pipeline.load_pipeline(device="cpu")
    assert pipe.unet.config.layers_per_block == 2


def test_single_file_without_config_offline(saved, monkeypatch):
    _, _, single = saved
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("SDKIT_MODEL_CONFIG", raising=False)
    with pytest.raises(pipeline.ModelNotFoundError) as e:
        pipeline.load_pipeline(str(single), device="cpu")
    msg = str(e.value)
    assert str(single) in msg and "config=" in msg and "not on disk" in msg


def test_missing_hub_id_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    model = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    with pytest.raises(pipeline.ModelNotFoundError) as e:
        pipeline.load_pipeline(model, device="cpu")
    msg = str(e.value)
    assert model in msg and "not on disk" in msg and "offline" in msg
    assert f"hf download {model}" in msg
    assert e.value.__cause__ is None and e.value.__suppress_context__  # no hub stack first
    assert isinstance(e.value, OSError)


def test_model_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SDKIT_MODEL", str(tmp_path / "nowhere.safetensors"))
    with pytest.raises(checks.SdkitInputError, match="nowhere.safetensors"):
        pipeline.load_pipeline(device="cpu")


@pytest.mark.parametrize("suffix", [".ckpt", ".bin", ".pt"])
def test_pickle_refused(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"not loaded")
    with pytest.raises(checks.SdkitInputError, match="pickle"):
        pipeline.load_pipeline(str(path), device="cpu")


def test_folder_without_model_index_refused(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(checks.SdkitInputError, match="model_index.json"):
        pipeline.load_pipeline(str(tmp_path), device="cpu")


def test_other_pipeline_family_refused(saved, tmp_path):
    import json
    import shutil

    _, folder, _ = saved
    other = tmp_path / "xl"
    shutil.copytree(folder, other)
    info = json.loads((other / "model_index.json").read_text())
    info["_class_name"] = "StableDiffusionXLPipeline"
    (other / "model_index.json").write_text(json.dumps(info))
    with pytest.raises(checks.SdkitInputError, match="StableDiffusionXLPipeline"):
        pipeline.load_pipeline(str(other), device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_cuda_and_offload_refused_without_cuda(saved):
    _, folder, _ = saved
    with pytest.raises(DeviceError, match="cuda"):
        pipeline.load_pipeline(str(folder), device="cuda")
    for mode in ("model", "sequential"):
        with pytest.raises(checks.SdkitInputError, match="CUDA"):
            pipeline.load_pipeline(str(folder), device="cpu", cpu_offload=mode)
    with pytest.raises(checks.SdkitInputError, match="cpu_offload"):
        pipeline.load_pipeline(str(folder), device="cpu", cpu_offload="everything")


def test_memory_options_keep_the_image(saved):
    _, folder, _ = saved
    plain = pipeline.load_pipeline(str(folder), device="cpu")
    lean = pipeline.load_pipeline(str(folder), device="cpu", attention_slicing=True,
                                  vae_tiling=True)
    assert lean.vae.use_tiling and not plain.vae.use_tiling
    # slicing changes the order of float sums only
    diff = np.abs(_image(plain).astype(int) - _image(lean).astype(int))
    assert diff.max() <= 2


def test_safety_checker_flag_checked(saved):
    _, folder, _ = saved
    with pytest.raises(checks.SdkitInputError, match="safety_checker"):
        pipeline.load_pipeline(str(folder), device="cpu", safety_checker="off")


def test_parameter_counts_and_exercise(saved, capsys):
    original, _, _ = saved
    counts = pipeline.parameter_counts(original)
    assert set(counts) == {"unet", "vae", "text_encoder"}
    assert counts["unet"] == sum(p.numel() for p in original.unet.parameters())
    assert pipeline.check_fp16_bytes(original, counts["unet"] * 2)
    assert not pipeline.check_fp16_bytes(original, counts["unet"] * 4)
    assert "float32" in capsys.readouterr().out
    assert pipeline.peak_memory_bytes("cpu") > 10 * 2**20  # this process holds torch at least


def test_toy_missing_says_how_to_train(monkeypatch, tmp_path):
    monkeypatch.setattr(pipeline, "TOY_DIR", tmp_path / "toy-sd")
    with pytest.raises(pipeline.ModelNotFoundError, match="python -m sdkit.toy train"):
        pipeline.load_pipeline("toy", device="cpu")
