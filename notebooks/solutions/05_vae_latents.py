# Reference solution for notebooks/05_vae_latents.ipynb: each latent channel's r with brightness
import torch
import torch.nn.functional as F

from sdkit import images, shapes

pics = shapes.make_dataset(64, seed=0)[0]  # (64, 64, 64, 3) uint8
z_ex = images.encode(vae, pics).float().cpu()  # noqa: F821 (the notebook's vae); (64, C, h, w)
f_ex = pics.shape[1] // z_ex.shape[2]  # pixels per latent pixel
# brightness: the mean of R, G, B, averaged over the f x f patch of each latent pixel
brightness = F.avg_pool2d(images.to_tensor(pics).mean(1, keepdim=True), f_ex)  # (64, 1, h, w)
brightness_corr = torch.stack([  # Pearson's r over all 64 x h x w latent pixels, per channel
    torch.corrcoef(torch.stack([z_ex[:, c].flatten(), brightness.flatten()]))[0, 1]
    for c in range(z_ex.shape[1])])
