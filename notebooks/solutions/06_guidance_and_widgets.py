# Reference solution for notebooks/06_guidance_and_widgets.ipynb: guidance rescale (Lin et al.,
# 2024, section 3.4), the guided prediction given the conditional one's spread, then blended.
def my_rescale(noise_cfg, noise_pred_text, guidance_rescale):
    dims = list(range(1, noise_cfg.ndim))  # every dim but the batch: one std per image
    std_text = noise_pred_text.std(dim=dims, keepdim=True)  # (B, 1, 1, 1)
    std_cfg = noise_cfg.std(dim=dims, keepdim=True)
    rescaled = noise_cfg * (std_text / std_cfg)  # the conditional prediction's spread
    return guidance_rescale * rescaled + (1 - guidance_rescale) * noise_cfg  # 0: plain CFG
