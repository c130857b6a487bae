# Reference solution for notebooks/09_inpainting_and_outpainting.ipynb: the mask the latents see
import numpy as np


def my_latent_mask(mask, scale_factor):
    binary = (np.asarray(mask) >= 0.5).astype(np.float32)  # the pipeline's binarisation
    # F.interpolate(mode="nearest") maps latent pixel i to pixel floor(i * f): the top-left
    # pixel of each f x f block
    return binary[::scale_factor, ::scale_factor]
