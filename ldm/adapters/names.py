"""The names adapter files give ldm's layers.

ldm's modules carry the CompVis names of the checkpoint (`input_blocks.1.1.transformer_blocks.0.attn1.to_q`). LoRA
files name the same layers after diffusers' modules (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`),
and kohya's files write those names with underscores (`lora_unet_down_blocks_0_attentions_0_..._attn1_to_q`).
`unet_names(cfg)` gives every UNet layer's diffusers name, derived from the config as diffusers' own checkpoint
converter lays the blocks out: level i of the encoder holds `num_res_blocks` ResBlocks (each followed by a
transformer where the level has attention) and, except the last level, a downsampler; the decoder mirrors it
with one ResBlock more per level.
"""
from __future__ import annotations

from ldm.config import UNetConfig

# ResBlock layers: CompVis -> diffusers
_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.0": "norm2",
           "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
# the layers outside the blocks
_TOP = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
        "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out",
        "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2"}  # SDXL's y


def unet_block_names(cfg: UNetConfig) -> dict[str, tuple[str, str]]:
    """CompVis block prefix -> (diffusers block prefix, kind), kind "resnet", "attention", "down" or "up"."""
    blocks: dict[str, tuple[str, str]] = {}
    per_level = cfg.num_res_blocks
    levels = len(cfg.channel_mult)
    k, ds = 1, 1
    for i in range(levels):
        for j in range(per_level):
            blocks[f"input_blocks.{k}.0"] = (f"down_blocks.{i}.resnets.{j}", "resnet")
            if ds in cfg.attention_resolutions:
                blocks[f"input_blocks.{k}.1"] = (f"down_blocks.{i}.attentions.{j}", "attention")
            k += 1
        if i != levels - 1:
            blocks[f"input_blocks.{k}.0"] = (f"down_blocks.{i}.downsamplers.0", "down")
            k += 1
            ds *= 2
    blocks["middle_block.0"] = ("mid_block.resnets.0", "resnet")
    blocks["middle_block.1"] = ("mid_block.attentions.0", "attention")
    blocks["middle_block.2"] = ("mid_block.resnets.1", "resnet")
    k = 0
    for i in range(levels):  # up_blocks.0 is the deepest level
        attention = ds in cfg.attention_resolutions
        for j in range(per_level + 1):
            blocks[f"output_blocks.{k}.0"] = (f"up_blocks.{i}.resnets.{j}", "resnet")
            if attention:
                blocks[f"output_blocks.{k}.1"] = (f"up_blocks.{i}.attentions.{j}", "attention")
            if i != levels - 1 and j == per_level:
                blocks[f"output_blocks.{k}.{2 if attention else 1}"] = (f"up_blocks.{i}.upsamplers.0", "up")
            k += 1
        ds //= 2
    return blocks


def unet_names(cfg: UNetConfig, compvis_names: list[str]) -> dict[str, str]:
    """diffusers name -> CompVis name, for each of the given CompVis layer names of a UNet with config `cfg` (the
    names of its layers with weights, relative to the UNet)."""
    blocks = unet_block_names(cfg)
    out = {}
    for name in compvis_names:
        if name in _TOP:
            out[_TOP[name]] = name
            continue
        parts = name.split(".")
        prefix = ".".join(parts[:3]) if parts[0] != "middle_block" else ".".join(parts[:2])
        inner = name[len(prefix) + 1:]
        if prefix not in blocks:
            continue
        block, kind = blocks[prefix]
        if kind == "resnet":
            inner = _RESNET.get(inner)
        elif kind in ("down", "up"):
            inner = "conv" if inner in ("op", "conv") else None
        if inner is not None:
            out[f"{block}.{inner}"] = name
    return out
