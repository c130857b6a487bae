"""Test-only: write a pipeline as one original-layout Stable Diffusion ``.safetensors`` file.

The tests check that ``sdkit.pipeline.load_pipeline`` reads single files (``from_single_file``);
to have one without a download they write it from a tiny pipeline with ``save_single_file``:
the diffusers -> original (LDM) key mapping, the inverse of diffusers'
``convert_ldm_unet_checkpoint`` / ``convert_ldm_vae_checkpoint``. No notebook uses it, so it
lives with the tests. Left out: the tokenizer, scheduler and configs (load the file back with
``config=`` a diffusers folder), SDXL and other families.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file


def _unet_to_ldm(sd: dict, config) -> dict:
    """diffusers UNet keys -> the original SD (LDM) keys: the inverse of diffusers'
    ``convert_ldm_unet_checkpoint`` (after diffusers' scripts/convert_diffusers_to_original)."""
    per = config.layers_per_block + 1  # LDM numbers resnets, attentions and samplers together
    n = len(config.block_out_channels)
    prefixes = [("time_embedding.linear_1.", "time_embed.0."),
                ("time_embedding.linear_2.", "time_embed.2."),
                ("conv_in.", "input_blocks.0.0."), ("conv_norm_out.", "out.0."),
                ("conv_out.", "out.2."), ("mid_block.resnets.0.", "middle_block.0."),
                ("mid_block.attentions.0.", "middle_block.1."),
                ("mid_block.resnets.1.", "middle_block.2.")]
    for i in range(n):
        for j in range(config.layers_per_block):
            prefixes += [(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{per * i + j + 1}.0."),
                         (f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{per * i + j + 1}.1.")]
        prefixes.append((f"down_blocks.{i}.downsamplers.0.conv.",
                         f"input_blocks.{per * (i + 1)}.0.op."))
        has_attn = "CrossAttn" in config.up_block_types[i]
        for j in range(per):
            prefixes += [(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{per * i + j}.0."),
                         (f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{per * i + j}.1.")]
        prefixes.append((f"up_blocks.{i}.upsamplers.0.",
                         f"output_blocks.{per * i + per - 1}.{2 if has_attn else 1}."))
    resnet = [("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."), ("norm2.", "out_layers.0."),
              ("conv2.", "out_layers.3."), ("time_emb_proj.", "emb_layers.1."),
              ("conv_shortcut.", "skip_connection.")]
    out = {}
    for key, value in sd.items():
        new = key
        for hf, ldm in prefixes:
            if key.startswith(hf):
                new = ldm + key[len(hf):]
                if ".resnets." in hf:
                    for a, b in resnet:
                        new = new.replace("." + a, "." + b)
                break
        else:
            raise KeyError(f"no original-layout name for UNet weight {key}")
        out["model.diffusion_model." + new] = value
    return out


def _vae_to_ldm(sd: dict, config) -> dict:
    """diffusers VAE keys -> original SD keys (the decoder's up blocks count the other way)."""
    n = len(config.block_out_channels)
    prefixes = [("encoder.conv_norm_out.", "encoder.norm_out."),
                ("decoder.conv_norm_out.", "decoder.norm_out.")]
    for part in ("encoder", "decoder"):
        prefixes += [(f"{part}.mid_block.resnets.{k}.", f"{part}.mid.block_{k + 1}.")
                     for k in (0, 1)]
        prefixes.append((f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1."))
    for i in range(n):
        prefixes += [(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block."),
                     (f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."),
                     (f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{n - 1 - i}.block."),
                     (f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{n - 1 - i}.upsample.")]
    attn = [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
            ("to_out.0.", "proj_out.")]
    out = {}
    for key, value in sd.items():
        new = key
        for hf, ldm in prefixes:
            if key.startswith(hf):
                new = ldm + key[len(hf):]
                break
        if ".mid.attn_1." in new:
            for a, b in attn:
                new = new.replace(".attn_1." + a, ".attn_1." + b)
            if value.ndim == 2:  # LDM's attention projections are 1x1 convolutions
                value = value[:, :, None, None]
        out["first_stage_model." + new.replace("conv_shortcut", "nin_shortcut")] = value
    return out


def save_single_file(pipe, path) -> Path:
    """Write the pipeline's unet, vae and text_encoder as one ``.safetensors`` file in the
    original SD key layout (``model.diffusion_model.*``, ``first_stage_model.*``,
    ``cond_stage_model.transformer.*``), the format ``from_single_file`` reads. The tokenizer,
    scheduler and configs are not in it: load it back with ``config=`` a diffusers folder."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"save_single_file: {path} should end in .safetensors")
    state = _unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config)
    state.update(_vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config))
    te = pipe.text_encoder.state_dict()
    state.update({"cond_stage_model.transformer.text_model." + k.removeprefix("text_model."): v
                  for k, v in te.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path))
    return path
