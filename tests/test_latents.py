"""Tests of sdkit.latents against answers known by construction or by hand (a stand-in VAE whose
brightness channel is chosen, a convolution whose FLOPs are counted on paper), and the
notebook's claims about the trained toy VAE. (Bad inputs: tests/test_bad_inputs.py.)"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

from sdkit import images, latents, noising, sampling, shapes


class BrightnessVAE(torch.nn.Module):
    """A stand-in for an AutoencoderKL (factor 4, 4 channels) whose latent channel ``channel``
    is minus the brightness of each 4 x 4 patch and whose other channels are noise: the answer
    to notebook 05's exercise is ``channel`` by construction."""

    def __init__(self, channel: int):
        super().__init__()
        self.channel = channel
        self.config = SimpleNamespace(block_out_channels=(8, 8, 8), latent_channels=4,
                                      scaling_factor=1.0)
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.device, self.dtype = torch.device("cpu"), torch.float32

    def encode(self, x):
        brightness = F.avg_pool2d(x.mean(1), 4)  # (B, h, w)
        g = torch.Generator().manual_seed(0)
        z = torch.randn((x.shape[0], 4, *brightness.shape[1:]), generator=g)
        z[:, self.channel] = -brightness
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=z))

    def decode(self, z):  # pragma: no cover - never decoded here
        raise NotImplementedError


class OneConv(torch.nn.Module):
    """A 'UNet' made of one 3x3 convolution, 4 -> 4 channels: its FLOPs are counted on paper."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1, bias=False)

    def forward(self, sample, t, text):
        return self.conv(sample)


# ---------------------------------------------------------------- plain math


def test_compression_factor():
    assert latents.compression_factor((3, 64, 64), (4, 16, 16)) == 12
    assert latents.compression_factor((3, 512, 512), (4, 64, 64)) == 48
    assert latents.compression_factor((3, 1024, 1024), (4, 128, 128)) == 48  # SDXL
    assert latents.compression_factor((3, 256, 256), (4, 32, 32)) == 48


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


def test_slerp_of_orthogonal_unit_vectors_is_the_circle():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    for w in (0.1, 0.5, 0.9):  # (cos, sin) of the angle w * 90 degrees
        want = torch.tensor([math.cos(w * math.pi / 2), math.sin(w * math.pi / 2)])
        assert torch.allclose(latents.slerp(a, b, w), want, atol=1e-6)


def test_unet_flops_of_one_convolution_by_hand():
    # 3x3 conv, 4 -> 4 channels, 16 x 16 outputs: 4 * 4 * 9 multiply-adds per pixel, 2 FLOPs each
    assert latents.unet_flops(OneConv(), (4, 16, 16), (20, 32)) == 2 * 4 * 4 * 9 * 16 * 16
    # linear in the number of latent pixels: a 32 x 16 latent costs twice as much
    assert latents.unet_flops(OneConv(), (4, 32, 16), (20, 32)) == 2 * 4 * 4 * 9 * 32 * 16


def test_unet_flops_latent_vs_pixel(tiny_pipe):
    with torch.device("meta"):  # shapes only: the pixel twin needs no memory
        pixel = UNet2DConditionModel.from_config({**tiny_pipe.unet.config, "in_channels": 3,
                                                  "out_channels": 3})
    f = images.vae_scale_factor(tiny_pipe.vae)
    text = (tiny_pipe.tokenizer.model_max_length, tiny_pipe.text_encoder.config.hidden_size)
    lat = latents.unet_flops(tiny_pipe.unet, (4, 64 // f, 64 // f), text)
    pix = latents.unet_flops(pixel, (3, 64, 64), text)
    assert pix > 12 * lat  # more than the compression factor: attention is quadratic


# ---------------------------------------------------------------- the exercise


SOLUTIONS = Path(__file__).resolve().parent.parent / "notebooks" / "solutions"


def reference_answer(vae) -> torch.Tensor:
    namespace = {"vae": vae}  # what the solution reads from the notebook
    exec((SOLUTIONS / "05_vae_latents.py").read_text(), namespace)
    return namespace["brightness_corr"]


@pytest.mark.parametrize("channel", [0, 2])
def test_brightness_correlations_find_the_constructed_channel(channel):
    corr = latents.brightness_correlations(BrightnessVAE(channel), n_images=16)
    assert corr[channel].item() == pytest.approx(-1.0, abs=1e-5)  # minus brightness, exactly
    others = [c for c in range(4) if c != channel]
    assert corr[others].abs().max() < 0.3  # noise


@pytest.mark.parametrize("channel", [0, 2])
def test_the_reference_solution_passes_the_checker(channel, capsys):
    vae = BrightnessVAE(channel)
    answer = reference_answer(vae)
    assert answer[channel].item() == pytest.approx(-1.0, abs=1e-5)
    assert latents.check_brightness_correlations(answer, vae) is True
    out = capsys.readouterr().out
    assert f"Channel {channel} carries brightness" in out and "darker" in out
    assert latents.check_brightness_correlations(answer.tolist(), vae) is True  # a list will do


def test_brightness_checker_names_the_usual_mistakes(capsys):
    vae = BrightnessVAE(1)
    pictures = shapes.make_dataset(64, seed=0)[0]
    z = images.encode(vae, pictures).float()  # (64, 4, 16, 16)
    x = images.to_tensor(pictures)

    def corr(target):  # (64, 16, 16) -> (4,)
        return torch.stack([torch.corrcoef(torch.stack([z[:, c].flatten(), target.flatten()]))[0, 1]
                            for c in range(4)])

    right = reference_answer(vae)
    wrong = {
        "absolute values": right.abs(),
        "covariance": torch.stack([torch.cov(torch.stack([z[:, c].flatten(),
                                                          F.avg_pool2d(x.mean(1), 4).flatten()]),
                                             correction=0)[0, 1] for c in range(4)]),
        "one pixel of each": corr(x.mean(1)[:, ::4, ::4]),
        "red channel only": corr(F.avg_pool2d(x[:, 0], 4)),
    }
    for name, answer in wrong.items():
        assert not torch.allclose(answer, right, atol=2e-3), name
        assert latents.check_brightness_correlations(answer, vae) is False, name
        assert name in capsys.readouterr().out, name
    assert latents.check_brightness_correlations(right + 0.1, vae) is False
    assert "Hint: encode the 64 pictures" in capsys.readouterr().out
    assert latents.check_brightness_correlations(None, vae) is False
    assert "not solved yet" in capsys.readouterr().out
    for not_an_answer in ([0.1, 0.2], 3, torch.zeros(2, 4)):  # printed and False, never raised
        assert latents.check_brightness_correlations(not_an_answer, vae) is False
        assert "Expected 4 numbers" in capsys.readouterr().out
    for not_a_number in ("abc", object(), [0.1, "x", 0.2, 0.3]):
        assert latents.check_brightness_correlations(not_a_number, vae) is False
        assert "expected 4 numbers" in capsys.readouterr().out


# ---------------------------------------------------------------- the trained toy VAE


@pytest.fixture(scope="module")
def toy_vae(toy_pipe):
    return toy_pipe.vae


def test_scaling_brings_latent_std_near_one(toy_vae):
    z = images.encode(toy_vae, shapes.make_dataset(64, seed=40_000)[0])
    assert abs(z.std().item() - 1) < 0.1, z.std()


def test_toy_vae_reconstructs_shapes_far_better_than_a_photo(toy_vae):
    pictures = shapes.make_dataset(16, seed=41_000)[0]
    rec = images.decode(toy_vae, images.encode(toy_vae, pictures))
    toy = images.psnr(rec, images.to_tensor(pictures))
    photo = noising.load_photo("astronaut", 64)
    photo_psnr = images.psnr(images.decode(toy_vae, images.encode(toy_vae, photo)),
                             images.to_tensor(photo))
    assert toy > 28, toy  # final toy VAE: ~33 dB
    assert photo_psnr < toy - 5, (photo_psnr, toy)


def test_latent_rgb_preview_beats_the_average_colour(toy_vae):
    fit = shapes.make_dataset(64, seed=0)[0]
    weights = sampling.fit_latent_rgb_map(images.encode(toy_vae, fit), images.to_tensor(fit))
    pictures = shapes.make_dataset(16, seed=42_000)[0]
    x = images.to_tensor(pictures)
    z = images.encode(toy_vae, pictures)
    preview = images.psnr(sampling.latents_to_rgb_preview(z, weights, upsample=4), x)
    baseline = images.psnr(x.mean((0, 2, 3), keepdim=True).expand_as(x), x)
    decoder = images.psnr(images.decode(toy_vae, z), x)
    assert preview > baseline + 3, (preview, baseline)
    assert decoder > preview, (decoder, preview)


def test_toy_brightness_correlations_agree_with_numpy(toy_vae, capsys):
    pictures = shapes.make_dataset(64, seed=0)[0]
    z = images.encode(toy_vae, pictures).float().numpy()  # (64, 4, 16, 16)
    brightness = pictures.astype(np.float64).mean(-1).reshape(64, 16, 4, 16, 4).mean((2, 4))
    corr = [np.corrcoef(z[:, c].ravel(), brightness.ravel())[0, 1] for c in range(4)]
    assert np.abs(corr).max() > 0.5  # some channel carries brightness
    assert np.allclose(latents.brightness_correlations(toy_vae).numpy(), corr, atol=1e-4)
    assert latents.check_brightness_correlations(corr, toy_vae) is True
    assert latents.check_brightness_correlations(reference_answer(toy_vae), toy_vae) is True
    assert f"Channel {int(np.argmax(np.abs(corr)))} carries" in capsys.readouterr().out
