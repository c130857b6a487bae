"""Tests of sdkit.noising: the forward process written out equals diffusers'; inputs are checked."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from sdkit import noising
from sdkit.checks import SdkitInputError
from sdkit.toy import make_sampler, make_scheduler


@pytest.fixture(scope="module")
def toy_schedule():
    return make_scheduler()  # the toy model's training schedule (zero terminal SNR)


@pytest.fixture(scope="module")
def sd_schedule():
    return noising.beta_schedules()["scaled_linear"]


# ---------------------------------------------------------------- closed form == diffusers


@pytest.mark.parametrize("name", ["toy", "scaled_linear", "linear", "squaredcos_cap_v2"])
def test_add_noise_equals_scheduler_add_noise_exactly(name, toy_schedule):
    s = toy_schedule if name == "toy" else noising.beta_schedules()[name]
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand((6, 4, 16, 16), generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0, 1, 337, 500, 998, 999])
    assert torch.equal(noising.add_noise(x0, noise, t, s.alphas_cumprod), s.add_noise(x0, noise, t))
    # one int timestep for the whole batch
    assert torch.equal(noising.add_noise(x0, noise, 250, s.alphas_cumprod),
                       s.add_noise(x0, noise, torch.full((6,), 250)))


def test_alphas_cumprod_is_the_cumulative_product_of_one_minus_betas(toy_schedule):
    assert torch.equal(torch.cumprod(1 - toy_schedule.betas, 0), toy_schedule.alphas_cumprod)


@pytest.mark.parametrize("t", [0, 150, 600])
def test_step_by_step_chain_has_the_closed_form_moments(t, toy_schedule):
    n = 8000
    pixels = torch.tensor([-1.0, 0.0, 0.7])
    x = noising.forward_chain(pixels.repeat(n, 1), toy_schedule.betas, t,
                              torch.Generator().manual_seed(t))
    a = toy_schedule.alphas_cumprod[t]
    mean, var = a.sqrt() * pixels, 1 - a
    assert ((x.mean(0) - mean).abs() < 5 * (var / n).sqrt()).all()
    assert ((x.var(0) - var).abs() < 5 * var * math.sqrt(2 / n)).all()


def test_chain_at_the_last_step_of_a_zero_snr_schedule_forgets_x0(toy_schedule):
    # beta_999 == 1: the last step keeps nothing of its input
    x = noising.forward_chain(torch.full((4, 3), 5.0), toy_schedule.betas, 999,
                              torch.Generator().manual_seed(0))
    y = noising.forward_chain(torch.full((4, 3), -5.0), toy_schedule.betas, 999,
                              torch.Generator().manual_seed(0))
    assert torch.equal(x, y)


# ---------------------------------------------------------------- schedules


def test_zero_terminal_snr_only_for_the_toy_schedule(toy_schedule, sd_schedule):
    assert toy_schedule.alphas_cumprod[-1] == 0
    assert toy_schedule.betas[-1] == 1
    assert 0.004 < sd_schedule.alphas_cumprod[-1] < 0.006  # SD keeps ~0.47% of the signal power
    assert noising.log_snr(toy_schedule.alphas_cumprod)[-1] == -math.inf
    assert torch.isfinite(noising.log_snr(sd_schedule.alphas_cumprod)).all()


def test_training_scheduler_recovers_the_schedule_from_the_sampler(toy_schedule):
    sampler = make_sampler()
    assert sampler.alphas_cumprod[-1] == 2.0**-24  # diffusers' stand-in for 0 in the sampler
    rebuilt = noising.training_scheduler(sampler)
    assert isinstance(rebuilt, DDPMScheduler)
    assert torch.equal(rebuilt.alphas_cumprod, toy_schedule.alphas_cumprod)
    assert "zero terminal SNR" in noising.describe_schedule(sampler)


def test_beta_schedules_names_and_order():
    s = noising.beta_schedules(make_sampler())
    assert list(s) == ["linear", "scaled_linear", "squaredcos_cap_v2", "this model"]
    for name, sched in s.items():
        a = sched.alphas_cumprod
        assert len(a) == 1000 and (a[1:] <= a[:-1]).all(), name  # signal only ever decreases
    assert s["linear"].betas[0].item() == pytest.approx(1e-4)
    assert s["scaled_linear"].betas[-1].item() == pytest.approx(0.012)


def test_log_snr_values():
    a = torch.tensor([0.5, 0.9, 0.0, 1e-3])
    out = noising.log_snr(a)
    assert out[0] == 0
    assert out[1].item() == pytest.approx(math.log(9))
    assert out[2] == -math.inf
    assert out[3].item() == pytest.approx(math.log(1e-3 / (1 - 1e-3)))


def test_snr_exercise_checker(toy_schedule, capsys):
    a = toy_schedule.alphas_cumprod.double()
    right = int(torch.nonzero(a / (1 - a) < 1)[0])
    assert a[right] < 0.5 <= a[right - 1]
    assert noising.check_snr_exercise(right, make_sampler()) is True
    assert noising.check_snr_exercise(right + 1, make_sampler()) is False
    assert noising.check_snr_exercise(None, make_sampler()) is False
    assert noising.check_snr_exercise("337", make_sampler()) is False
    assert "Hint" in capsys.readouterr().out


# ---------------------------------------------------------------- pictures and the slider


def test_load_photo_and_round_trip():
    photo = noising.load_photo("chelsea", 48)
    assert photo.shape == (48, 48, 3) and photo.dtype == np.uint8
    x = noising.to_tensor(photo)
    assert x.shape == (1, 3, 48, 48) and x.min() >= -1 and x.max() <= 1
    assert np.array_equal(np.asarray(noising.to_pil(x[0])), photo)
    big = noising.to_pil(x, scale=3)
    assert isinstance(big, list) and big[0].size == (144, 144)


def test_noise_slider_callback_redraws(toy_schedule):
    x0 = noising.to_tensor(noising.load_photo("astronaut", 16))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    panel = noising.noise_slider(x0, toy_schedule, noise=noise, t=100, scale=1)
    want = lambda t: np.asarray(noising.to_pil(  # noqa: E731
        noising.add_noise(x0, noise, t, toy_schedule.alphas_cumprod)[0]))
    assert np.array_equal(np.asarray(panel.result), want(100))
    panel.children[0].value = 900
    assert np.array_equal(np.asarray(panel.result), want(900))


# ---------------------------------------------------------------- input checks


def _raises(match, fn, *args, **kwargs):
    with pytest.raises(SdkitInputError, match=match):
        fn(*args, **kwargs)


def test_bad_timesteps_are_refused(toy_schedule):
    x0, noise = torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 8)
    a = toy_schedule.alphas_cumprod
    _raises(r"^t=1000", noising.add_noise, x0, noise, 1000, a)
    _raises(r"^t=-1", noising.add_noise, x0, noise, -1, a)
    _raises(r"^t=", noising.add_noise, x0, noise, torch.tensor([0.5]), a)
    _raises(r"^t=", noising.add_noise, x0, noise, torch.tensor([1, 2, 3]), a)  # 3 for 2 samples
    _raises(r"^noise=", noising.add_noise, x0, torch.zeros(2, 3, 4, 4), 5, a)
    _raises(r"^alphas_cumprod=", noising.add_noise, x0, noise, 5, a * 2)
    _raises(r"^t=1000", noising.forward_chain, x0, toy_schedule.betas, 1000)
    _raises(r"^betas=", noising.forward_chain, x0, toy_schedule.betas * 2, 3)


def test_bad_pictures_are_refused(toy_schedule):
    _raises(r"^name='lena'", noising.load_photo, "lena")
    _raises(r"^size=4", noising.load_photo, "astronaut", 4)
    _raises(r"^images\[1\]=", noising.to_tensor,
            [np.zeros((8, 8, 3), np.uint8), np.zeros((16, 16, 3), np.uint8)])
    _raises(r"^images\[0\]=", noising.to_tensor, [np.zeros((8, 8, 4), np.uint8)])
    _raises(r"^images=", noising.to_tensor, [])
    _raises(r"^x=", noising.to_pil, torch.zeros(4, 8, 8))
    _raises(r"^scale=0", noising.to_pil, torch.zeros(3, 8, 8), scale=0)
    _raises(r"^x0=", noising.noise_slider, torch.zeros(2, 3, 8, 8), toy_schedule)
    _raises(r"^decode=", noising.noise_slider, torch.zeros(1, 4, 8, 8), toy_schedule)
    _raises(r"^t=1000", noising.noise_slider, torch.zeros(1, 3, 8, 8), toy_schedule, t=1000)
    _raises(r"^scheduler=", noising.training_scheduler, object())
    _raises(r"^highlight=", noising.plot_schedules, {"a": toy_schedule}, highlight="b")
