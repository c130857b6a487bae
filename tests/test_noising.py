"""Tests of sdkit.noising: the forward process written out equals diffusers'; the schedules and
the exercise checker give the numbers worked out by hand. (Bad inputs: tests/test_bad_inputs.py.)"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

from sdkit import images, noising
from sdkit.pipeline import TOY_DIR, training_scheduler


@pytest.fixture(scope="module")
def toy_sampler():
    """The toy model's shipped sampler (DPM-Solver++ on a zero terminal SNR schedule)."""
    return DPMSolverMultistepScheduler.from_pretrained(TOY_DIR / "scheduler")


@pytest.fixture(scope="module")
def toy_schedule(toy_sampler):
    return training_scheduler(toy_sampler)  # the toy model's training schedule


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


def test_the_rebuilt_training_schedule_differs_from_the_sampler_only_at_the_end(
        toy_sampler, toy_schedule):
    assert toy_sampler.alphas_cumprod[-1] == 2.0**-24  # diffusers' stand-in for 0 in the sampler
    assert toy_schedule.alphas_cumprod[-1] == 0
    assert torch.equal(toy_schedule.alphas_cumprod[:-1], toy_sampler.alphas_cumprod[:-1])
    assert noising.describe_schedule(toy_sampler) == (
        "scaled_linear, rescaled to zero terminal SNR, 1000 steps")


def test_beta_schedules_names_and_order(toy_sampler):
    s = noising.beta_schedules(toy_sampler)
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


SOLUTIONS = Path(__file__).resolve().parent.parent / "notebooks" / "solutions"


def sd_terminal_abar():
    return float(noising.beta_schedules()["scaled_linear"].alphas_cumprod[-1])


def test_snr_crossing_checker_on_a_schedule_worked_out_by_hand(capsys):
    # SNR <= SNR_SD(999) <=> abar <= abar_SD(999), SNR being increasing in abar. A constant beta
    # with (1 - beta)^400.5 = abar_SD(999) gives abar_t = (1 - beta)^(t + 1) <= abar_SD(999)
    # exactly when t + 1 > 400.5: the answer is t = 400
    beta = 1 - sd_terminal_abar() ** (1 / 400.5)
    schedule = DDPMScheduler(num_train_timesteps=1000, trained_betas=[beta] * 1000)
    for right in (400, np.int64(400), torch.tensor(400)):
        assert noising.check_snr_crossing(right, schedule) is True
    assert "Right: t = 400" in capsys.readouterr().out
    assert noising.check_snr_crossing(399, schedule) is False
    assert "one too early" in capsys.readouterr().out
    assert noising.check_snr_crossing(401, schedule) is False
    assert "one too late" in capsys.readouterr().out
    assert noising.check_snr_crossing(None, schedule) is False
    assert "not solved yet" in capsys.readouterr().out
    for not_an_answer in ("400", 400.0, True, torch.tensor(400.0)):  # printed, never raised
        assert noising.check_snr_crossing(not_an_answer, schedule) is False
        assert "expected an int" in capsys.readouterr().out


def test_the_reference_solution_passes_the_checker(tiny_pipe, capsys):
    # the tiny pipeline carries the toy's scheduler: the toy's training schedule
    namespace = {"pipe": tiny_pipe}
    exec((SOLUTIONS / "01_forward_noising.py").read_text(), namespace)
    assert isinstance(namespace["t_cross"], int)
    assert noising.check_snr_crossing(namespace["t_cross"], tiny_pipe) is True
    assert "Right" in capsys.readouterr().out


def test_snr_crossing_checker_names_the_usual_mistakes(toy_sampler, toy_schedule, capsys):
    a = toy_schedule.alphas_cumprod.double()
    snr = a / (1 - a)
    a_sd = torch.tensor(sd_terminal_abar(), dtype=torch.float64)
    sd_snr = a_sd / (1 - a_sd)
    first = lambda mask: int(torch.nonzero(mask)[0])  # noqa: E731
    right = first(snr <= sd_snr)
    assert 800 < right < 999  # the toy's SNR meets SD's least signal late, but before the end
    assert noising.check_snr_crossing(right, toy_sampler) is True
    capsys.readouterr()
    log_snr = noising.log_snr(a)
    lin = DDPMScheduler(beta_schedule="linear", beta_start=0.00085, beta_end=0.012)
    a_lin = lin.alphas_cumprod[-1].double()
    wrong = {
        right - 1: "one too early",  # the last t above, not the first at or below
        first(log_snr <= sd_snr): "log",  # log SNR compared with SNR (the first t with SNR < 1)
        first(snr.sqrt() <= sd_snr): "sqrt(SNR)",  # amplitude ratio against a power ratio
        first(snr <= a_lin / (1 - a_lin)): "linear",  # SD's betas taken as linear
        999: "2**-24",  # SD's schedule built from the toy's config or sampler
    }
    assert len(wrong) == 5 and right not in wrong
    for answer, hint in wrong.items():
        assert noising.check_snr_crossing(answer, toy_sampler) is False, answer
        assert hint in capsys.readouterr().out, answer
    assert noising.check_snr_crossing(right - 50, toy_sampler) is False
    assert "too early. Hint" in capsys.readouterr().out


# ---------------------------------------------------------------- pictures and the slider


def test_load_photo():
    photo = noising.load_photo("chelsea", 48)
    assert photo.shape == (48, 48, 3) and photo.dtype == np.uint8
    assert photo.std() > 20  # a photograph, not a flat colour


def test_noise_slider_callback_redraws(toy_schedule):
    x0 = images.to_tensor(noising.load_photo("astronaut", 16))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    panel = noising.noise_slider(x0, toy_schedule, noise=noise, t=100, scale=1)

    def want(t):  # diffusers' own forward process at t
        return np.asarray(images.to_pil(toy_schedule.add_noise(x0, noise, torch.tensor([t]))[0]))

    assert np.array_equal(np.asarray(panel.result), want(100))
    panel.children[0].value = 900
    assert np.array_equal(np.asarray(panel.result), want(900))
