# Reference solution for notebooks/11_image_variations.ipynb: Stable unCLIP's noise augmentation
def my_noise_image_embeddings(image_embeds, noise_level, noise, mean, std, alphas_cumprod):
    a = alphas_cumprod[noise_level]  # how much of the signal survives at this level
    x = (image_embeds - mean) / std  # scale: standard units (StableUnCLIPImageNormalizer.scale)
    x = a.sqrt() * x + (1 - a).sqrt() * noise  # DDPMScheduler.add_noise at noise_level
    return x * std + mean  # unscale: back to the embedding's own units
