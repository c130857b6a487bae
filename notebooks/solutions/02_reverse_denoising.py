# Reference solution for notebooks/02_reverse_denoising.ipynb: one Euler step in sigma space
def euler_step(sample, model_output, sigma, sigma_next, prediction_type):
    """Euler's next sample: one step of dx/dsigma = (x - x0_hat) / sigma, to sigma_next."""
    # Euler's variables: sample = x_0 + sigma * eps; the UNet saw x_t = sample / sqrt(sigma^2 + 1)
    # (scheduler.scale_model_input), at alpha_bar = 1 / (sigma^2 + 1)
    x_t = sample / (sigma**2 + 1) ** 0.5
    alpha_bar = 1 / (sigma**2 + 1)
    if prediction_type == "v_prediction":  # v = sqrt(a) eps - sqrt(1 - a) x_0
        pred_x0 = alpha_bar**0.5 * x_t - (1 - alpha_bar) ** 0.5 * model_output
    else:  # "epsilon": the model predicts the noise, and sample = x_0 + sigma * eps
        pred_x0 = sample - sigma * model_output
    derivative = (sample - pred_x0) / sigma  # dx/dsigma: the predicted noise
    return sample + (sigma_next - sigma) * derivative  # sigma_next < sigma: dt is negative
