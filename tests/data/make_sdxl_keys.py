"""Generate reference key lists of the single-file SDXL 1.0 checkpoints.

Writes, next to this script:
  * sdxl_base_keys.tsv     (``sd_xl_base_1.0.safetensors``)
  * sdxl_refiner_keys.tsv  (``sd_xl_refiner_1.0.safetensors``)
in the same ``key<TAB>dtype<TAB>shape`` format as sd15_keys.tsv, sorted by key.

The layout is rebuilt here from the ORIGINAL reference code, independently of the
``ldm`` package (nothing from ``ldm`` is imported).  Every module below mirrors the
constructor of the class it is named after, keeping attribute names and the order
of construction, and is instantiated on the meta device so that only names and
shapes are produced.  Where each part comes from:

* ``model.diffusion_model.*`` -- Stability-AI/generative-models
  ``sgm/modules/diffusionmodules/openaimodel.py`` (``UNetModel.__init__``: the
  ``time_embed`` Sequential, ``label_emb`` for ``num_classes == "sequential"``,
  the ``input_blocks`` / ``middle_block`` / ``output_blocks`` loops over
  ``channel_mult`` / ``num_res_blocks`` / ``attention_resolutions`` /
  ``transformer_depth``, ``out``; ``ResBlock``, ``Downsample``, ``Upsample``) and
  ``sgm/modules/attention.py`` (``SpatialTransformer`` with
  ``use_linear=True`` -> Linear proj_in/proj_out, ``BasicTransformerBlock``,
  ``CrossAttention`` (to_q/k/v without bias, to_out.0), ``FeedForward`` with
  ``GEGLU``).  Hyper-parameters from ``configs/inference/sd_xl_base.yaml`` and
  ``configs/inference/sd_xl_refiner.yaml`` (network_config).
* ``first_stage_model.*`` -- ``sgm/modules/diffusionmodules/model.py``
  ``Encoder`` / ``Decoder`` / ``ResnetBlock`` / ``Downsample`` / ``Upsample`` /
  ``AttnBlock`` (q/k/v/proj_out 1x1 Conv2d) plus ``quant_conv`` /
  ``post_quant_conv`` of the AutoencoderKL (1x1 convs 2z->2e and e->z), with the
  ddconfig of the same yaml files (ch 128, ch_mult [1,2,4,4], 2 res blocks,
  attn_resolutions [], z_channels 4, double_z, embed_dim 4).  The encoder has no
  timestep embedding (temb_ch = 0), so no ``temb_proj`` keys.
* ``conditioner.embedders.N.*`` -- ``sgm/modules/encoders/modules.py``:
  ``GeneralConditioner`` keeps its embedders in ``nn.ModuleList`` ``embedders``
  in yaml order.  ``FrozenCLIPEmbedder`` stores ``self.transformer =
  CLIPTextModel`` (HF, openai/clip-vit-large-patch14: vocab 49408, hidden 768,
  12 layers, 12 heads, mlp 3072, 77 positions); its keys are taken from
  ``transformers.CLIPTextModel`` built on the meta device and written under
  ``transformer.text_model.`` (the nesting older transformers versions had, which
  the real file stores), plus ``text_model.embeddings.position_ids`` (I64
  [1, 77]) that the real base file holds (newer transformers make it a
  non-persistent buffer).  ``FrozenOpenCLIPEmbedder2`` stores ``self.model`` =
  open_clip ``CLIP`` with ``visual`` deleted; the text-tower names follow
  mlfoundations/open_clip ``src/open_clip/model.py`` (``CLIP.__init__``:
  token_embedding, positional_embedding, transformer, ln_final, text_projection
  [width, embed_dim], logit_scale [], attn_mask is a non-persistent buffer) and
  ``src/open_clip/transformer.py`` (``Transformer.resblocks`` of
  ``ResidualAttentionBlock``: ln_1, attn = nn.MultiheadAttention (in_proj_weight,
  in_proj_bias, out_proj), ls_1/ls_2 Identity, ln_2, mlp.c_fc, mlp.c_proj), with
  ``model_configs/ViT-bigG-14.json`` (embed_dim 1280; text width 1280, heads 20,
  layers 32, context 77, vocab 49408).  The ``ConcatTimestepEmbedderND``
  embedders only hold a parameter-free ``Timestep`` module, so they add no keys.
* The DiffusionEngine (``sgm/models/diffusion.py``) registers no schedule
  buffers (the discretization lives in the denoiser config, which has no
  tensors) and the released files carry no ``model_ema``; all floating tensors
  are stored as F16.

Usage: ``python tests/data/make_sdxl_keys.py`` (takes a few seconds on CPU).
"""

from __future__ import annotations

import collections
import os
import sys
import time

import torch
from torch import nn

META = torch.device("meta")


# --------------------------------------------------------------------------
# sgm/modules/diffusionmodules/openaimodel.py + sgm/modules/attention.py
# --------------------------------------------------------------------------


def normalization(channels: int) -> nn.Module:
    # GroupNorm32(32, channels)
    return nn.GroupNorm(32, channels)


class TimestepEmbedSequential(nn.Sequential):
    pass


class Downsample(nn.Module):
    def __init__(self, channels, use_conv, out_channels=None):
        super().__init__()
        out_channels = out_channels or channels
        if use_conv:
            self.op = nn.Conv2d(channels, out_channels, 3, stride=2, padding=1)
        else:
            self.op = nn.AvgPool2d(2, 2)


class Upsample(nn.Module):
    def __init__(self, channels, use_conv, out_channels=None):
        super().__init__()
        out_channels = out_channels or channels
        if use_conv:
            self.conv = nn.Conv2d(channels, out_channels, 3, padding=1)


class ResBlock(nn.Module):
    def __init__(self, channels, emb_channels, out_channels=None, use_scale_shift_norm=False):
        super().__init__()
        out_channels = out_channels or channels
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        )
        self.out_layers = nn.Sequential(
            normalization(out_channels),
            nn.SiLU(),
            nn.Dropout(0.0),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        if out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1)


class CrossAttention(nn.Module):
    def __init__(self, query_dim, context_dim=None, heads=8, dim_head=64):
        super().__init__()
        inner_dim = dim_head * heads
        context_dim = context_dim if context_dim is not None else query_dim
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(0.0))


class GEGLU(nn.Module):
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)


class FeedForward(nn.Module):
    def __init__(self, dim, mult=4, glu=True):
        super().__init__()
        inner_dim = int(dim * mult)
        project_in = GEGLU(dim, inner_dim) if glu else nn.Sequential(nn.Linear(dim, inner_dim), nn.GELU())
        self.net = nn.Sequential(project_in, nn.Dropout(0.0), nn.Linear(inner_dim, dim))


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim, n_heads, d_head, context_dim=None, disable_self_attn=False):
        super().__init__()
        self.attn1 = CrossAttention(dim, context_dim if disable_self_attn else None, n_heads, d_head)
        self.ff = FeedForward(dim, glu=True)
        self.attn2 = CrossAttention(dim, context_dim, n_heads, d_head)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)


class SpatialTransformer(nn.Module):
    def __init__(self, in_channels, n_heads, d_head, depth=1, context_dim=None, use_linear=False):
        super().__init__()
        if context_dim is not None and not isinstance(context_dim, (list, tuple)):
            context_dim = [context_dim]
        if context_dim is not None:
            if depth != len(context_dim):
                assert all(c == context_dim[0] for c in context_dim)
                context_dim = depth * [context_dim[0]]
        else:
            context_dim = [None] * depth
        inner_dim = n_heads * d_head
        self.norm = nn.GroupNorm(32, in_channels, eps=1e-6)
        if not use_linear:
            self.proj_in = nn.Conv2d(in_channels, inner_dim, 1)
        else:
            self.proj_in = nn.Linear(in_channels, inner_dim)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner_dim, n_heads, d_head, context_dim=context_dim[d]) for d in range(depth)]
        )
        if not use_linear:
            self.proj_out = nn.Conv2d(inner_dim, in_channels, 1)
        else:
            self.proj_out = nn.Linear(inner_dim, in_channels)


class UNetModel(nn.Module):
    def __init__(
        self,
        in_channels,
        model_channels,
        out_channels,
        num_res_blocks,
        attention_resolutions,
        channel_mult=(1, 2, 4, 8),
        conv_resample=True,
        num_classes=None,
        num_heads=-1,
        num_head_channels=-1,
        use_scale_shift_norm=False,
        resblock_updown=False,
        transformer_depth=1,
        context_dim=None,
        use_linear_in_transformer=False,
        adm_in_channels=None,
    ):
        super().__init__()
        if isinstance(transformer_depth, int):
            transformer_depth = len(channel_mult) * [transformer_depth]
        transformer_depth_middle = transformer_depth[-1]
        if isinstance(num_res_blocks, int):
            num_res_blocks = len(channel_mult) * [num_res_blocks]
        assert not resblock_updown  # not used by SDXL

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
        )
        if num_classes is not None:
            assert num_classes == "sequential" and adm_in_channels is not None
            self.label_emb = nn.Sequential(
                nn.Sequential(
                    nn.Linear(adm_in_channels, time_embed_dim),
                    nn.SiLU(),
                    nn.Linear(time_embed_dim, time_embed_dim),
                )
            )

        def heads_for(ch):
            if num_head_channels == -1:
                return num_heads, ch // num_heads
            return ch // num_head_channels, num_head_channels

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))]
        )
        input_block_chans = [model_channels]
        ch = model_channels
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _nr in range(num_res_blocks[level]):
                layers = [ResBlock(ch, time_embed_dim, mult * model_channels, use_scale_shift_norm)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    nh, dh = heads_for(ch)
                    layers.append(
                        SpatialTransformer(
                            ch, nh, dh, depth=transformer_depth[level], context_dim=context_dim,
                            use_linear=use_linear_in_transformer,
                        )
                    )
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                input_block_chans.append(ch)
            if level != len(channel_mult) - 1:
                out_ch = ch
                self.input_blocks.append(
                    TimestepEmbedSequential(Downsample(ch, conv_resample, out_channels=out_ch))
                )
                ch = out_ch
                input_block_chans.append(ch)
                ds *= 2

        nh, dh = heads_for(ch)
        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, time_embed_dim, ch, use_scale_shift_norm),
            SpatialTransformer(
                ch, nh, dh, depth=transformer_depth_middle, context_dim=context_dim,
                use_linear=use_linear_in_transformer,
            ),
            ResBlock(ch, time_embed_dim, None, use_scale_shift_norm),
        )

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks[level] + 1):
                ich = input_block_chans.pop()
                layers = [ResBlock(ch + ich, time_embed_dim, model_channels * mult, use_scale_shift_norm)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    nh, dh = heads_for(ch)
                    layers.append(
                        SpatialTransformer(
                            ch, nh, dh, depth=transformer_depth[level], context_dim=context_dim,
                            use_linear=use_linear_in_transformer,
                        )
                    )
                if level and i == num_res_blocks[level]:
                    layers.append(Upsample(ch, conv_resample, out_channels=ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(), nn.Conv2d(model_channels, out_channels, 3, padding=1)
        )


# --------------------------------------------------------------------------
# sgm/modules/diffusionmodules/model.py (AutoencoderKL Encoder / Decoder)
# --------------------------------------------------------------------------


def Normalize(in_channels):
    return nn.GroupNorm(32, in_channels, eps=1e-6)


class VaeDownsample(nn.Module):
    def __init__(self, in_channels, with_conv):
        super().__init__()
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, 3, stride=2, padding=0)


class VaeUpsample(nn.Module):
    def __init__(self, in_channels, with_conv):
        super().__init__()
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, 3, stride=1, padding=1)


class ResnetBlock(nn.Module):
    def __init__(self, *, in_channels, out_channels=None, conv_shortcut=False, temb_channels=512):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        if temb_channels > 0:
            self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(0.0)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            if conv_shortcut:
                self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 3, padding=1)
            else:
                self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)


class AttnBlock(nn.Module):
    # AttnBlock and MemoryEfficientAttnBlock ("vanilla-xformers") share this layout.
    def __init__(self, in_channels):
        super().__init__()
        self.norm = Normalize(in_channels)
        self.q = nn.Conv2d(in_channels, in_channels, 1)
        self.k = nn.Conv2d(in_channels, in_channels, 1)
        self.v = nn.Conv2d(in_channels, in_channels, 1)
        self.proj_out = nn.Conv2d(in_channels, in_channels, 1)


class Encoder(nn.Module):
    def __init__(self, *, ch, ch_mult, num_res_blocks, attn_resolutions, in_channels, resolution,
                 z_channels, double_z=True, resamp_with_conv=True):
        super().__init__()
        temb_ch = 0
        num_resolutions = len(ch_mult)
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        curr_res = resolution
        in_ch_mult = (1,) + tuple(ch_mult)
        self.down = nn.ModuleList()
        for i_level in range(num_resolutions):
            block = nn.ModuleList()
            attn = nn.ModuleList()
            block_in = ch * in_ch_mult[i_level]
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks):
                block.append(ResnetBlock(in_channels=block_in, out_channels=block_out, temb_channels=temb_ch))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(AttnBlock(block_in))
            down = nn.Module()
            down.block = block
            down.attn = attn
            if i_level != num_resolutions - 1:
                down.downsample = VaeDownsample(block_in, resamp_with_conv)
                curr_res = curr_res // 2
            self.down.append(down)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(in_channels=block_in, out_channels=block_in, temb_channels=temb_ch)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(in_channels=block_in, out_channels=block_in, temb_channels=temb_ch)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, padding=1)


class Decoder(nn.Module):
    def __init__(self, *, ch, out_ch, ch_mult, num_res_blocks, attn_resolutions, resolution,
                 z_channels, resamp_with_conv=True):
        super().__init__()
        temb_ch = 0
        num_resolutions = len(ch_mult)
        block_in = ch * ch_mult[num_resolutions - 1]
        curr_res = resolution // 2 ** (num_resolutions - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(in_channels=block_in, out_channels=block_in, temb_channels=temb_ch)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(in_channels=block_in, out_channels=block_in, temb_channels=temb_ch)
        self.up = nn.ModuleList()
        for i_level in reversed(range(num_resolutions)):
            block = nn.ModuleList()
            attn = nn.ModuleList()
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks + 1):
                block.append(ResnetBlock(in_channels=block_in, out_channels=block_out, temb_channels=temb_ch))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(AttnBlock(block_in))
            up = nn.Module()
            up.block = block
            up.attn = attn
            if i_level != 0:
                up.upsample = VaeUpsample(block_in, resamp_with_conv)
                curr_res = curr_res * 2
            self.up.insert(0, up)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, padding=1)


class AutoencoderKL(nn.Module):
    def __init__(self, ddconfig, embed_dim):
        super().__init__()
        self.encoder = Encoder(
            ch=ddconfig["ch"], ch_mult=ddconfig["ch_mult"], num_res_blocks=ddconfig["num_res_blocks"],
            attn_resolutions=ddconfig["attn_resolutions"], in_channels=ddconfig["in_channels"],
            resolution=ddconfig["resolution"], z_channels=ddconfig["z_channels"], double_z=ddconfig["double_z"],
        )
        self.decoder = Decoder(
            ch=ddconfig["ch"], out_ch=ddconfig["out_ch"], ch_mult=ddconfig["ch_mult"],
            num_res_blocks=ddconfig["num_res_blocks"], attn_resolutions=ddconfig["attn_resolutions"],
            resolution=ddconfig["resolution"], z_channels=ddconfig["z_channels"],
        )
        mult = 2 if ddconfig["double_z"] else 1
        self.quant_conv = nn.Conv2d(mult * ddconfig["z_channels"], mult * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)


# --------------------------------------------------------------------------
# open_clip text tower (model.py CLIP with `visual` deleted, transformer.py)
# --------------------------------------------------------------------------


class ResidualAttentionBlock(nn.Module):
    def __init__(self, d_model, n_head, mlp_ratio=4.0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model)
        self.attn = nn.MultiheadAttention(d_model, n_head)
        self.ls_1 = nn.Identity()
        self.ln_2 = nn.LayerNorm(d_model)
        mlp_width = int(d_model * mlp_ratio)
        self.mlp = nn.Sequential(
            collections.OrderedDict(
                [("c_fc", nn.Linear(d_model, mlp_width)), ("gelu", nn.GELU()), ("c_proj", nn.Linear(mlp_width, d_model))]
            )
        )
        self.ls_2 = nn.Identity()


class OpenClipTransformer(nn.Module):
    def __init__(self, width, layers, heads):
        super().__init__()
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads) for _ in range(layers)])


class OpenClipTextCLIP(nn.Module):
    """open_clip CLIP after ``del model.visual`` (FrozenOpenCLIPEmbedder2)."""

    def __init__(self, embed_dim, context_length, vocab_size, width, heads, layers):
        super().__init__()
        self.transformer = OpenClipTransformer(width, layers, heads)
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, embed_dim))
        self.register_buffer("attn_mask", torch.empty(context_length, context_length), persistent=False)
        self.logit_scale = nn.Parameter(torch.ones([]))


# ViT-bigG-14.json
BIGG = dict(embed_dim=1280, context_length=77, vocab_size=49408, width=1280, heads=20, layers=32)


# --------------------------------------------------------------------------
# HF CLIP ViT-L/14 text model (FrozenCLIPEmbedder.transformer)
# --------------------------------------------------------------------------


def clip_l_entries(prefix: str) -> list[tuple[str, str, list[int]]]:
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
    )
    with torch.device(META):
        model = CLIPTextModel(cfg)
    out = []
    for k, v in model.state_dict().items():
        if k.startswith("text_model."):
            k = k[len("text_model."):]
        if k == "embeddings.position_ids":
            continue  # added explicitly below, whatever the transformers version
        out.append((prefix + "text_model." + k, "F16", list(v.shape)))
    out.append((prefix + "text_model.embeddings.position_ids", "I64", [1, 77]))
    return out


# --------------------------------------------------------------------------


def module_entries(prefix: str, module: nn.Module) -> list[tuple[str, str, list[int]]]:
    out = []
    for k, v in module.state_dict().items():
        assert v.is_floating_point(), k
        out.append((prefix + k, "F16", list(v.shape)))
    return out


# ddconfig shared by both yaml files (first_stage_config)
VAE_DDCONFIG = dict(
    double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128,
    ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[],
)
VAE_EMBED_DIM = 4

# network_config of configs/inference/sd_xl_base.yaml
BASE_UNET = dict(
    adm_in_channels=2816, num_classes="sequential", in_channels=4, out_channels=4, model_channels=320,
    attention_resolutions=[4, 2], num_res_blocks=2, channel_mult=[1, 2, 4], num_head_channels=64,
    use_linear_in_transformer=True, transformer_depth=[1, 2, 10], context_dim=2048,
)

# network_config of configs/inference/sd_xl_refiner.yaml
REFINER_UNET = dict(
    adm_in_channels=2560, num_classes="sequential", in_channels=4, out_channels=4, model_channels=384,
    attention_resolutions=[4, 2], num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_head_channels=64,
    use_linear_in_transformer=True, transformer_depth=4, context_dim=[1280, 1280, 1280, 1280],
)


def build(kind: str) -> dict[str, list[tuple[str, str, list[int]]]]:
    parts: dict[str, list] = {}
    with torch.device(META):
        unet = UNetModel(**(BASE_UNET if kind == "base" else REFINER_UNET))
        vae = AutoencoderKL(VAE_DDCONFIG, VAE_EMBED_DIM)
        bigg = OpenClipTextCLIP(**BIGG)
    parts["unet"] = module_entries("model.diffusion_model.", unet)
    parts["vae"] = module_entries("first_stage_model.", vae)
    if kind == "base":
        # emb_models: 0 FrozenCLIPEmbedder, 1 FrozenOpenCLIPEmbedder2, 2-4 ConcatTimestepEmbedderND
        parts["clip_l"] = clip_l_entries("conditioner.embedders.0.transformer.")
        parts["bigg"] = module_entries("conditioner.embedders.1.model.", bigg)
    else:
        # emb_models: 0 FrozenOpenCLIPEmbedder2, 1-3 ConcatTimestepEmbedderND
        parts["bigg"] = module_entries("conditioner.embedders.0.model.", bigg)
    return parts


def fmt_shape(shape: list[int]) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def write(path: str, parts) -> int:
    rows = [e for p in parts.values() for e in p]
    keys = [r[0] for r in rows]
    assert len(keys) == len(set(keys)), "duplicate keys"
    rows.sort(key=lambda r: r[0])
    with open(path, "w") as f:
        f.write("key\tdtype\tshape\n")
        for k, dt, shape in rows:
            f.write(f"{k}\t{dt}\t{fmt_shape(shape)}\n")
    return len(rows)


def main() -> int:
    t0 = time.perf_counter()
    here = os.path.dirname(os.path.abspath(__file__))
    for kind, fname in (("base", "sdxl_base_keys.tsv"), ("refiner", "sdxl_refiner_keys.tsv")):
        parts = build(kind)
        n = write(os.path.join(here, fname), parts)
        counts = ", ".join(f"{k} {len(v)}" for k, v in parts.items())
        print(f"{fname}: {n} tensors ({counts})")
    print(f"done in {time.perf_counter() - t0:.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
