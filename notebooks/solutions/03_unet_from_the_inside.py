# Reference solution for notebooks/03_unet_from_the_inside.ipynb: the sinusoidal timestep
# embedding with all of diffusers' settings (get_timestep_embedding).
import math

import torch
import torch.nn.functional as F


def my_timestep_embedding(timesteps, dim, flip_sin_to_cos, downscale_freq_shift):
    """(N,) timesteps -> (N, dim): diffusers' sinusoidal timestep embedding."""
    h = dim // 2  # the number of frequencies
    exponent = -math.log(10000) * torch.arange(h) / (h - downscale_freq_shift)
    angles = timesteps[:, None].float() * torch.exp(exponent)[None, :]  # (N, h)
    sin, cos = torch.sin(angles), torch.cos(angles)
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)  # (N, 2h)
    return F.pad(emb, (0, dim % 2))  # an odd dim: one column of zeros at the end
