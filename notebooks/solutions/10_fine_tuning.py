# Reference solution for notebooks/10_fine_tuning.ipynb: a rank-4 SD 1.5 LoRA's bytes in float16
import torch
from diffusers import UNet2DConditionModel

from sdkit.unet import SD15_UNET

with torch.device("meta"):  # SD 1.5's UNet from its config: every shape, no weights, no memory
    sd15_unet = UNet2DConditionModel(**SD15_UNET)
r = 4
numbers = 0
for name, layer in sd15_unet.named_modules():
    if name.endswith(("to_q", "to_k", "to_v", "to_out.0")):  # 128 nn.Linear layers
        numbers += r * layer.in_features + layer.out_features * r  # A is (r, in), B is (out, r)
lora_fp16_bytes = 2 * numbers  # float16: 2 bytes a number
