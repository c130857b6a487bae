"""Tests of sdkit.latents: shapes and checks on a tiny untrained VAE, quality on the toy VAE."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from sdkit import latents, noising, shapes
from sdkit.checks import SdkitInputError
from sdkit.toy import TOY_DIR, make_unet, make_vae


@pytest.fixture(scope="module")
def tiny_vae():
    torch.manual_seed(0)
    return make_vae().eval()  # the toy architecture, untrained: for shapes and checks


@pytest.fixture(scope="module")
def toy_vae():
    """The trained toy VAE (SDKIT_MODEL if it names a diffusers folder, else data/toy-sd)."""
    from diffusers import AutoencoderKL

    model = os.environ.get("SDKIT_MODEL", "toy")
    folder = TOY_DIR if model == "toy" else Path(model)
    if not (folder / "vae" / "config.json").exists():
        pytest.skip(f"no trained VAE in {folder}: run `python -m sdkit.toy train` first")
    vae = AutoencoderKL.from_pretrained(folder / "vae", use_safetensors=True, local_files_only=True)
    if vae.config.latent_channels != 4 or len(vae.config.block_out_channels) != 3:
        pytest.skip(f"{folder} is not the toy model")
    return vae.eval()


# ---------------------------------------------------------------- shapes and plain math


def test_encode_decode_shapes(tiny_vae):
    images = shapes.make_dataset(3, seed=0)[0]
    z = latents.encode(tiny_vae, images)
    assert latents.vae_scale_factor(tiny_vae) == 4
    assert z.shape == (3, 4, 16, 16)
    out = latents.decode(tiny_vae, z)
    assert out.shape == (3, 3, 64, 64) and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1
    # fully convolutional: other multiples of the factor work too
    assert latents.encode(tiny_vae, noising.load_photo("coffee", 40)).shape == (1, 4, 10, 10)


def test_encode_applies_the_scaling_factor(tiny_vae):
    images = shapes.make_dataset(2, seed=1)[0]
    with torch.no_grad():
        raw = tiny_vae.encode(noising.to_tensor(images)).latent_dist.mean
    assert torch.allclose(latents.encode(tiny_vae, images), raw * tiny_vae.config.scaling_factor)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(latents.encode(tiny_vae, images, sample=True, generator=g1),
                       latents.encode(tiny_vae, images, sample=True, generator=g2))


def test_compression_factor():
    assert latents.compression_factor((3, 64, 64), (4, 16, 16)) == 12
    assert latents.compression_factor((3, 512, 512), (4, 64, 64)) == 48
    assert latents.compression_factor((3, 1024, 1024), (4, 128, 128)) == 48  # SDXL
    assert latents.compression_factor((3, 256, 256), (4, 32, 32)) == 48


def test_psnr():
    a = torch.zeros(1, 3, 4, 4)
    assert latents.psnr(a, a + 0.2) == pytest.approx(10 * math.log10(1 / 0.01))  # error 0.1 on 0..1
    assert latents.psnr(a, a) > 100


def test_slerp_keeps_the_length_of_equal_length_vectors():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 16, 16, generator=g), torch.randn(4, 16, 16, generator=g)
    b = b * a.norm() / b.norm()
    assert torch.allclose(latents.slerp(a, b, 0.0), a, atol=1e-5)
    assert torch.allclose(latents.slerp(a, b, 1.0), b, atol=1e-5)
    for w in (0.25, 0.5, 0.8):
        assert latents.slerp(a, b, w).norm().item() == pytest.approx(a.norm().item(), rel=1e-5)
    assert torch.lerp(a, b, 0.5).norm() < 0.8 * a.norm()  # lerp shrinks noise
    # the angle moves linearly with w
    cos = lambda u, v: (u * v).sum() / (u.norm() * v.norm())  # noqa: E731
    theta = torch.arccos(cos(a, b))
    assert torch.arccos(cos(a, latents.slerp(a, b, 0.25))).item() == pytest.approx(
        0.25 * theta.item(), rel=1e-3)
    # parallel vectors fall back to lerp
    assert torch.allclose(latents.slerp(a, 2 * a, 0.5), 1.5 * a)


def test_preview_shapes_and_cache(tiny_vae):
    latents._fit_cached.cache_clear()
    w1 = latents.fit_latent_rgb(tiny_vae, n_images=16)
    w2 = latents.fit_latent_rgb(tiny_vae, n_images=16)
    info = latents._fit_cached.cache_info()
    assert (info.misses, info.hits) == (1, 1)  # fitted once
    assert torch.equal(w1, w2) and w1.shape == (5, 3)
    w1 += 1  # callers get a copy: the cached weights stay as fitted
    assert torch.equal(latents.fit_latent_rgb(tiny_vae, n_images=16), w2)
    z = torch.randn(2, 4, 16, 16)
    assert latents.latents_to_rgb_preview(z, w2).shape == (2, 3, 16, 16)
    out = latents.latents_to_rgb_preview(z, w2, upsample=4)
    assert out.shape == (2, 3, 64, 64) and out.min() >= -1 and out.max() <= 1


def test_unet_flops_latent_vs_pixel():
    torch.manual_seed(0)
    unet = make_unet()
    with torch.device("meta"):
        from diffusers import UNet2DConditionModel

        pixel = UNet2DConditionModel.from_config({**unet.config, "in_channels": 3,
                                                  "out_channels": 3})
    lat = latents.unet_flops(unet, (4, 16, 16), (20, 128))
    pix = latents.unet_flops(pixel, (3, 64, 64), (20, 128))
    assert lat > 1e8  # ~0.3 GFLOP for the toy UNet
    assert pix > 12 * lat  # more than the compression factor: attention is quadratic


# ---------------------------------------------------------------- the trained toy VAE


def test_scaling_brings_latent_std_near_one(toy_vae):
    z = latents.encode(toy_vae, shapes.make_dataset(64, seed=40_000)[0])
    assert abs(z.std().item() - 1) < 0.1, z.std()
    raw_std = (z / toy_vae.config.scaling_factor).std().item()
    assert abs(raw_std * toy_vae.config.scaling_factor - 1) < 0.1


def test_toy_vae_reconstructs_shapes_far_better_than_a_photo(toy_vae):
    images = shapes.make_dataset(16, seed=41_000)[0]
    rec = latents.decode(toy_vae, latents.encode(toy_vae, images))
    toy = latents.psnr(rec, noising.to_tensor(images))
    photo = noising.load_photo("astronaut", 64)
    photo_psnr = latents.psnr(latents.decode(toy_vae, latents.encode(toy_vae, photo)),
                              noising.to_tensor(photo))
    assert toy > 28, toy  # final toy VAE: ~33 dB
    assert photo_psnr < toy - 5, (photo_psnr, toy)


def test_latent_rgb_preview_beats_the_average_colour(toy_vae):
    weights = latents.fit_latent_rgb(toy_vae, n_images=64)
    images = shapes.make_dataset(16, seed=42_000)[0]
    x = noising.to_tensor(images)
    z = latents.encode(toy_vae, images)
    preview = latents.psnr(latents.latents_to_rgb_preview(z, weights, upsample=4), x)
    baseline = latents.psnr(x.mean((0, 2, 3), keepdim=True).expand_as(x), x)
    decoder = latents.psnr(latents.decode(toy_vae, z), x)
    assert preview > baseline + 3, (preview, baseline)
    assert decoder > preview, (decoder, preview)


def test_brightness_exercise_checker(toy_vae, capsys):
    corr = latents.brightness_correlations(toy_vae)
    best = int(corr.abs().argmax())
    assert corr.abs()[best] > 0.5  # some channel carries brightness
    assert latents.check_brightness_channel(best, toy_vae) is True
    assert latents.check_brightness_channel((best + 1) % 4, toy_vae) is False
    assert latents.check_brightness_channel(7, toy_vae) is False
    assert latents.check_brightness_channel(None, toy_vae) is False
    assert "Right" in capsys.readouterr().out


# ---------------------------------------------------------------- input checks


def _raises(match, fn, *args, **kwargs):
    with pytest.raises(SdkitInputError, match=match):
        fn(*args, **kwargs)


def test_bad_inputs_are_refused(tiny_vae):
    odd = np.zeros((62, 62, 3), np.uint8)  # not a multiple of the VAE's factor
    _raises(r"^height=62", latents.encode, tiny_vae, odd)
    _raises(r"^width=66", latents.encode, tiny_vae, np.zeros((64, 66, 3), np.uint8))
    _raises(r"^vae=", latents.encode, object(), np.zeros((64, 64, 3), np.uint8))
    _raises(r"^latents=", latents.decode, tiny_vae, torch.zeros(1, 3, 16, 16))
    _raises(r"^b=", latents.psnr, torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 4, 4))
    _raises(r"^image_shape=", latents.compression_factor, (64, 64), (4, 16, 16))
    _raises(r"^latent_shape\[0\]=0", latents.compression_factor, (3, 64, 64), (0, 16, 16))
    _raises(r"^w=1.5", latents.slerp, torch.zeros(3), torch.ones(3), 1.5)
    _raises(r"^b=", latents.slerp, torch.zeros(3), torch.ones(4), 0.5)
    preview = latents.latents_to_rgb_preview
    _raises(r"^weights=", preview, torch.zeros(1, 4, 8, 8), torch.zeros(4, 4))
    _raises(r"^latents=", preview, torch.zeros(1, 3, 8, 8), torch.zeros(5, 3))
    _raises(r"^upsample=0", latents.latents_to_rgb_preview, torch.zeros(1, 4, 8, 8),
            torch.zeros(5, 3), upsample=0)
    _raises(r"^n_images=2", latents.fit_latent_rgb, tiny_vae, n_images=2)
    _raises(r"^height=66", latents.fit_latent_rgb, tiny_vae, size=66)
    _raises(r"^latents=", latents.show_channels, torch.zeros(2, 4, 8, 8))
    _raises(r"^text_shape=", latents.unet_flops, None, (4, 16, 16), (20,))
