"""sdkit.images, the ground's pictures in and out: the conversions equal diffusers'
``VaeImageProcessor`` bit for bit (values and memory layout), the VAE round trip has the
shapes and the scaling the pipelines use, and psnr and hstack give the numbers worked out by
hand. Uses conftest's tiny random pipeline (VAE factor 4) and, for the round trip's quality,
the trained toy model. (Bad inputs: tests/test_bad_inputs.py.)"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from sdkit import images, shapes

SCALING_FACTOR = 0.37  # not SD's 0.18215 nor the toy's: a hard-coded factor would show


@pytest.fixture(scope="module")
def pictures():
    """Four drawn scenes, uint8 (4, 64, 64, 3), and the same as PIL images."""
    arrays = shapes.make_dataset(4, seed=7)[0]
    return arrays, [Image.fromarray(a) for a in arrays]


@pytest.fixture(scope="module")
def vae(tiny_pipe_factory):
    """The tiny pipeline's VAE (factor 4) with a scaling factor of its own."""
    return tiny_pipe_factory(vae_config={"scaling_factor": SCALING_FACTOR}).vae


def _noisy(shape, seed=0):
    """Values past both ends of [-1, 1] and on rounding boundaries, as samples have them."""
    g = torch.Generator().manual_seed(seed)
    x = 1.5 * torch.randn(shape, generator=g)
    x.view(-1)[:4] = torch.tensor([-1.0, 1.0, 2 * (0.5 / 255) - 1, 2 * (127.5 / 255) - 1])
    return x


# ------------------------------------------------------------------------------ picture <-> tensor


def test_to_tensor_is_vae_image_processor_preprocess_bit_for_bit(pictures):
    arrays, pil = pictures
    ref = VaeImageProcessor(vae_scale_factor=4).preprocess(pil)  # (4, 3, 64, 64)
    for given in (arrays, list(arrays), pil):
        x = images.to_tensor(given)
        assert x.dtype == torch.float32 and x.shape == (4, 3, 64, 64)
        assert torch.equal(x, ref)
        assert x.stride() == ref.stride()  # the same (channels-last) layout, not only values
    one = images.to_tensor(pil[0])
    assert torch.equal(one, VaeImageProcessor().preprocess(pil[0]))
    assert one.stride() == VaeImageProcessor().preprocess(pil[0]).stride()
    floats = arrays[1].astype(np.float32) / 255  # a float picture in [0, 1]
    assert torch.equal(images.to_tensor(floats), ref[1:2])


def test_to_numpy_to_uint8_and_to_pil_are_postprocess_bit_for_bit():
    x = _noisy((3, 3, 16, 24))
    processor = VaeImageProcessor()
    want_np = processor.postprocess(x.clone(), output_type="np")  # (3, 16, 24, 3) float
    want_pil = processor.postprocess(x.clone(), output_type="pil")
    assert np.array_equal(images.to_numpy(x), want_np)
    as_uint8 = images.to_uint8(x)
    assert as_uint8.dtype == np.uint8 and as_uint8.shape == (3, 16, 24, 3)
    assert np.array_equal(as_uint8, np.stack([np.asarray(p) for p in want_pil]))
    pil = images.to_pil(x)
    assert [p.size for p in pil] == [(24, 16)] * 3
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(pil, want_pil))
    one = images.to_pil(x[1])  # (3, H, W): one picture, not a list
    assert isinstance(one, Image.Image) and np.array_equal(np.asarray(one), as_uint8[1])


def test_to_pil_scale_repeats_each_pixel():
    x = _noisy((3, 4, 5), seed=1)
    big = np.asarray(images.to_pil(x, scale=3))
    assert big.shape == (12, 15, 3)
    assert np.array_equal(big, images.to_uint8(x)[0].repeat(3, axis=0).repeat(3, axis=1))


def test_picture_tensor_picture_is_the_identity(pictures):
    arrays, _ = pictures
    assert np.array_equal(images.to_uint8(images.to_tensor(arrays)), arrays)


# ------------------------------------------------------------------------------ through the VAE


def test_vae_scale_factor_is_the_pipelines(tiny_pipe_factory, tiny_pipe):
    assert images.vae_scale_factor(tiny_pipe.vae) == tiny_pipe.vae_scale_factor == 4
    four_blocks = tiny_pipe_factory(vae_config={"block_out_channels": (8, 8, 16, 16),
                                                "down_block_types": ("DownEncoderBlock2D",) * 4,
                                                "up_block_types": ("UpDecoderBlock2D",) * 4})
    assert images.vae_scale_factor(four_blocks.vae) == four_blocks.vae_scale_factor == 8


def test_encode_is_the_posterior_mean_times_the_scaling_factor(vae, pictures):
    arrays, pil = pictures
    assert images.vae_scale_factor(vae) == 4
    x = images.to_tensor(arrays)
    z = images.encode(vae, arrays)
    assert z.shape == (4, 4, 16, 16) and z.dtype == torch.float32
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
    assert torch.equal(z, dist.mean * SCALING_FACTOR)
    assert torch.equal(images.encode(vae, x), z)  # a tensor in [-1, 1] is taken as it is
    assert torch.equal(images.encode(vae, pil), z)
    sampled = images.encode(vae, x, sample=True, generator=torch.Generator().manual_seed(3))
    assert torch.equal(sampled, dist.sample(torch.Generator().manual_seed(3)) * SCALING_FACTOR)
    assert not torch.equal(sampled, z)


def test_encode_and_decode_shapes_follow_the_vae_factor(vae):
    x = _noisy((2, 3, 32, 48)).clamp(-1, 1)
    z = images.encode(vae, x)
    assert z.shape == (2, 4, 8, 12)  # (B, 4, H/4, W/4)
    out = images.decode(vae, z)
    assert out.shape == (2, 3, 32, 48) and out.dtype == torch.float32
    assert out.device.type == "cpu" and out.min() >= -1 and out.max() <= 1


def test_decode_divides_by_the_scaling_factor(vae):
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        by_hand = vae.decode(z / SCALING_FACTOR).sample.clamp(-1, 1)
    assert torch.equal(images.decode(vae, z), by_hand)
    pil = images.decode_to_pil(vae, z, batch_size=1)  # one at a time, rounded as to_pil does
    assert len(pil) == 2
    for p, want in zip(pil, images.to_uint8(by_hand), strict=True):
        np.testing.assert_array_equal(np.asarray(p), want)


def test_the_toy_vae_round_trip_is_close(toy_pipe):
    """The trained toy VAE on held-out scenes (the model card measures 36.6 dB)."""
    x = images.to_tensor(shapes.make_dataset(16, seed=43_000)[0])
    assert images.psnr(images.decode(toy_pipe.vae, images.encode(toy_pipe.vae, x)), x) >= 30


# ------------------------------------------------------------------------------ psnr, hstack


def test_psnr_is_10_log10_of_one_over_the_mse():
    a = torch.zeros(2, 3, 8, 8)
    # +0.2 on the [-1, 1] scale is 0.1 on the 0..1 scale: MSE 0.01, so exactly 20 dB
    assert images.psnr(a, a + 0.2) == pytest.approx(20.0, abs=1e-5)
    b = a.clone()
    b[0] = 1.0  # half the batch off by 0.5 on the 0..1 scale: MSE 0.125
    assert images.psnr(a, b) == pytest.approx(10 * math.log10(1 / 0.125), abs=1e-5)
    assert images.psnr(b, a) == images.psnr(a, b)
    # identical pictures: finite (the MSE is floored), far above any real reconstruction
    same = images.psnr(a, a)
    assert math.isfinite(same) and same == pytest.approx(120.0)


def test_hstack_sizes_and_placement():
    red = Image.new("RGB", (64, 64), (255, 0, 0))
    tall = np.zeros((80, 30, 3), np.uint8)  # a uint8 array, 30 wide and 80 high
    strip = images.hstack([red, tall, red], gap=5)
    assert strip.size == (64 + 5 + 30 + 5 + 64, 80)
    a = np.asarray(strip)
    assert (a[:64, :64] == (255, 0, 0)).all() and (a[:, 69:99] == 0).all()
    assert (a[:, 64:69] == 255).all()  # the gaps are white
    assert (a[64:, :64] == 255).all()  # and so is the space below the shorter pictures
    assert (a[:64, 104:] == (255, 0, 0)).all()
    assert images.hstack([red, red], gap=0).size == (128, 64)
    assert images.hstack([red, tall, red], gap=2, thumb=16).size == (3 * 16 + 2 * 2, 16)


# ------------------------------------------------------------------------------ memory estimates


def test_memory_estimates_grow_with_the_attention_and_refuse_over_the_limit(monkeypatch):
    """SD 1.5 at 512 px needs a few GB (the UNet's 4096 x 4096 attention scores per head and
    image, the VAE decoder's full-size activations); doubling the side multiplies the UNet's
    attention by 16; a call over SDKIT_MEMORY_LIMIT is refused with the estimate and the limit."""
    from sdkit.generation import SD15_UNET, SD15_VAE

    unet512 = images.unet_memory_bytes(SD15_UNET, 2, 64, 64)  # a guided step at 512 px
    assert 2 * 8 * 4096**2 * 4 <= unet512 < 4 * 2**30
    assert 1 * 2**30 < images.vae_memory_bytes(SD15_VAE, 1, 512, 512) < 4 * 2**30
    unet1024 = images.unet_memory_bytes(SD15_UNET, 2, 128, 128)
    assert 12 < unet1024 / unet512 <= 16
    assert images.unet_memory_bytes(SD15_UNET, 2, 64, 64, 2) * 2 == unet512  # float16: half
    monkeypatch.setenv("SDKIT_MEMORY_LIMIT", "3GiB")
    from sdkit.device import check_memory

    check_memory("height", 512, unet512, "SD 1.5 at 512 px")  # fits: no error
    with pytest.raises(ValueError, match=r"height=1024 is not allowed: SD 1.5 at 1024 px needs "
                                         r"about .* GiB, over the memory limit of 3\.0 GiB"):
        check_memory("height", 1024, unet1024, "SD 1.5 at 1024 px")
