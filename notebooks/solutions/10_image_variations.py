# Reference solution for notebooks/10_image_variations.ipynb: CLIP's symmetric InfoNCE loss
import torch
import torch.nn.functional as F


def my_info_nce(image_embeds, text_embeds, logit_scale):
    img = F.normalize(image_embeds, dim=-1)  # unit vectors: dot products are cosines
    txt = F.normalize(text_embeds, dim=-1)
    logits = logit_scale.exp() * img @ txt.T  # (B, B): row i = image i against every text
    labels = torch.arange(len(img))  # the right partner is on the diagonal
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
