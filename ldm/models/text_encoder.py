"""Text encoders under `cond_stage_model.`: CLIP ViT-L/14 (SD1) and OpenCLIP ViT-H/14 (SD2).

SD1 (`FrozenCLIPEmbedder`) is transformers' `CLIPTextModel`, built from a local config (never from a hub), held
as `.transformer` so its keys are `cond_stage_model.transformer.text_model.*`. Conditioning is the final
hidden state after `final_layer_norm`.

SD2 (`FrozenOpenCLIPEmbedder`) is the OpenCLIP text tower, written here natively with OpenCLIP's own names
(`cond_stage_model.model.token_embedding`, `.positional_embedding`, `.transformer.resblocks.N.attn.in_proj_weight`,
`.ln_final`, `.text_projection`). SD2 conditions on the *penultimate* block's output, then `ln_final`.

`clip_skip` (A1111's option) counts from the end: 1 uses the encoder's usual layer, 2 one block earlier, and so on;
the final LayerNorm is always applied, as A1111 does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import CLIPTextConfig, CLIPTextModel

from ldm.config import TextEncoderConfig

CLIP_BOS, CLIP_EOS = 49406, 49407


def hf_clip_config(cfg: TextEncoderConfig) -> CLIPTextConfig:
    """The ViT-L/14 text config of `openai/clip-vit-large-patch14`, from our dataclass (no hub access)."""
    return CLIPTextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.width, intermediate_size=cfg.width * cfg.mlp_ratio,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, max_position_embeddings=cfg.max_length,
        hidden_act=cfg.activation, projection_dim=cfg.projection_dim, layer_norm_eps=1e-5,
        bos_token_id=CLIP_BOS, eos_token_id=CLIP_EOS, pad_token_id=cfg.pad_token, attn_implementation="sdpa")


class TextModelHolder(nn.Module):
    """Puts a transformers-5 CLIPTextModel at `transformer.text_model`, the path of the original checkpoint keys.
    (transformers 4's CLIPTextModel nests its layers under `.text_model` itself and needs no holder.)"""

    def __init__(self, text_model: CLIPTextModel):
        super().__init__()
        self.text_model = text_model


class FrozenCLIPEmbedder(nn.Module):
    """SD1's text encoder: transformers' CLIPTextModel under `transformer.text_model.`."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.cfg = cfg
        model = CLIPTextModel(hf_clip_config(cfg))
        self.transformer = model if hasattr(model, "text_model") else TextModelHolder(model)
        # The original checkpoints store `embeddings.position_ids`; transformers keeps it as a non-persistent
        # buffer. Registering it as persistent makes our state_dict the checkpoint's key set exactly.
        emb = self.transformer.text_model.embeddings
        emb.register_buffer("position_ids", torch.arange(cfg.max_length).expand((1, -1)).clone(), persistent=True)

    def forward(self, tokens: Tensor, clip_skip: int = 1) -> Tensor:
        tm = self.transformer.text_model
        if clip_skip == 1 and self.cfg.layer == "last":
            return tm(input_ids=tokens).last_hidden_state
        out = tm(input_ids=tokens, output_hidden_states=True)
        # hidden_states[0] is the embedding output, hidden_states[-1] the last block's (before final LN)
        index = -clip_skip - (1 if self.cfg.layer == "penultimate" else 0)
        return tm.final_layer_norm(out.hidden_states[index])


class ResidualAttentionBlock(nn.Module):
    """OpenCLIP's pre-norm block; `attn` has nn.MultiheadAttention's parameter names."""

    def __init__(self, width: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        hidden = width * mlp_ratio
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, hidden))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(hidden, width))

    def forward(self, x: Tensor, causal_mask: Tensor) -> Tensor:
        y = self.ln_1(x)
        x = x + self.attention(y, causal_mask)
        return x + self.mlp(self.ln_2(x))

    def attention(self, x: Tensor, causal_mask: Tensor) -> Tensor:
        # The same computation as nn.MultiheadAttention, through SDPA on (B, heads, T, d).
        b, t, w = x.shape
        heads = self.attn.num_heads
        qkv = F.linear(x, self.attn.in_proj_weight, self.attn.in_proj_bias)  # (B, T, 3W)
        q, k, v = (z.reshape(b, t, heads, w // heads).transpose(1, 2) for z in qkv.chunk(3, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask)
        return self.attn.out_proj(out.transpose(1, 2).reshape(b, t, w))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads, mlp_ratio) for _ in range(layers))


class OpenCLIPTextTower(nn.Module):
    """The parameters of `open_clip.CLIP`'s text side, with its names."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.max_length, cfg.width))
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio)
        self.ln_final = nn.LayerNorm(cfg.width)
        self.text_projection = nn.Parameter(torch.empty(cfg.width, cfg.projection_dim))  # unused by SD
        self.logit_scale = nn.Parameter(torch.ones([]))                                  # unused by SD
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=cfg.width ** -0.5)


class FrozenOpenCLIPEmbedder(nn.Module):
    """SD2's text encoder: the OpenCLIP text tower under `model.`."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.model = OpenCLIPTextTower(cfg)

    def forward(self, tokens: Tensor, clip_skip: int = 1) -> Tensor:
        m = self.model
        t = tokens.shape[1]
        x = m.token_embedding(tokens) + m.positional_embedding[:t].to(m.token_embedding.weight.dtype)  # (B, T, W)
        causal = torch.full((t, t), float("-inf"), device=x.device, dtype=x.dtype).triu(1)
        skip = clip_skip - 1 + (1 if self.cfg.layer == "penultimate" else 0)
        blocks = m.transformer.resblocks
        if not 0 <= skip < len(blocks):
            raise ValueError(f"clip_skip={clip_skip} is out of range for a {len(blocks)}-layer text encoder")
        for block in blocks[: len(blocks) - skip]:
            x = block(x, causal)
        return m.ln_final(x)


def build_text_encoder(cfg: TextEncoderConfig) -> nn.Module:
    if cfg.kind == "hf-clip":
        return FrozenCLIPEmbedder(cfg)
    if cfg.kind == "open-clip":
        return FrozenOpenCLIPEmbedder(cfg)
    raise ValueError(f"unknown text encoder kind {cfg.kind!r}")
