# Reference solution for notebooks/02_reverse_denoising.ipynb: x_0 from a v-prediction
def pred_x0_from_v(x_t, v, alpha_bar):
    """The clean latents x_0 implied by x_t and a v-prediction at alphas_cumprod alpha_bar."""
    # x_t = sqrt(a) x_0 + sqrt(1 - a) eps and v = sqrt(a) eps - sqrt(1 - a) x_0, so
    # sqrt(a) x_t - sqrt(1 - a) v = (a + (1 - a)) x_0 + (sqrt(a(1 - a)) - sqrt((1 - a)a)) eps
    #                             = x_0
    return alpha_bar**0.5 * x_t - (1 - alpha_bar) ** 0.5 * v
