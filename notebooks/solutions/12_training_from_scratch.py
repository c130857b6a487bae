# Reference solution for notebooks/12_training_from_scratch.ipynb: the noise from v, eps-hat
def eps_from_v(z_t, v, alphas_cumprod, t):
    # z_t = a z0 + b eps and v = a eps - b z0, with a = sqrt(abar_t), b = sqrt(1 - abar_t):
    # a v + b z_t = (a^2 + b^2) eps + (a b - a b) z0 = eps, since a^2 + b^2 = 1. No division.
    a = alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)  # (B, 1, 1, 1): broadcasts over the latents
    b = (1 - alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    return a * v + b * z_t
