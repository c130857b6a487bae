# Reference solution for notebooks/01_forward_noising.ipynb: t where the toy's SNR meets SD's
import torch
from diffusers import DDPMScheduler

from sdkit.pipeline import training_scheduler

# SD 1.5's training schedule and the least signal it ever trains on (its SNR at t = 999)
sd15 = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                     beta_start=0.00085, beta_end=0.012)
a_sd = sd15.alphas_cumprod.double()
sd_terminal_snr = a_sd[-1] / (1 - a_sd[-1])  # about 0.0047

# this model's *training* schedule (not its sampler's), its SNR at every t
a_toy = training_scheduler(pipe).alphas_cumprod.double()  # noqa: F821 (the notebook's pipe)
snr_toy = a_toy / (1 - a_toy)
t_cross = int(torch.nonzero(snr_toy <= sd_terminal_snr)[0])  # the first t at or below
