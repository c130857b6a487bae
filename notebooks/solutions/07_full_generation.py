# Reference solution for notebooks/07_full_generation.ipynb: SD 1.5's weights in float16, in MiB
from sdkit import generation

sd15 = generation.sd15_parameter_counts()  # weights per part, from SD 1.5's configs (meta device)
sd15_fp16_mib = sum(sd15.values()) * 2 / 2**20  # 2 bytes per float16 weight; 2**20 bytes per MiB
