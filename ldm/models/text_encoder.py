"""Text encoders under `cond_stage_model.`: CLIP ViT-L/14 (SD1) and OpenCLIP ViT-H/14 (SD2).

SD1 (`FrozenCLIPEmbedder`) is transformers' `CLIPTextModel`, built from a local config (never from a hub), held
as `.transformer` so its keys are `cond_stage_model.transformer.text_model.*`. Conditioning is the final
hidden state after `final_layer_norm`.

SD2 (`FrozenOpenCLIPEmbedder`) is the OpenCLIP text tower, written here natively with OpenCLIP's own names
(`cond_stage_model.model.token_embedding`, `.positional_embedding`, `.transformer.resblocks.N.attn.in_proj_weight`,
`.ln_final`, `.text_projection`). SD2 conditions on the *penultimate* block's output, then `ln_final`.

SDXL (sgm's `GeneralConditioner`, `Conditioner` here) holds the encoders as `conditioner.embedders.N.`: the base
CLIP ViT-L (as SD1) then OpenCLIP ViT-bigG (as SD2), the refiner the bigG alone. Each conditions with its
penultimate block's output *without* the final LayerNorm, the two concatenated along the width; the bigG's last
block, through `ln_final`, at the end token, times `text_projection`, is the pooled embedding that starts the
UNet's vector y. The tokens are the same for both but for the padding: CLIP-L pads with the end token, bigG with 0.

`clip_skip` (A1111's option) counts from the end: 1 uses the encoder's usual layer, 2 one block earlier, and so on;
the final LayerNorm is applied where the encoder's own layer has it (SD1, SD2), as A1111 does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import CLIPTextConfig, CLIPTextModel

from ldm.config import VECTOR_CONDITIONS, VECTOR_EMBED_DIM, ModelConfig, TextEncoderConfig
from ldm.models.unet import timestep_embedding

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
        hidden = out.hidden_states[index]
        return tm.final_layer_norm(hidden) if self.cfg.final_norm else hidden


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
        """Tokens (B, T) -> the conditioning hidden state (B, T, W)."""
        return self._run(tokens, clip_skip, pooled=False)[0]

    def with_pooled(self, tokens: Tensor, clip_skip: int = 1) -> tuple[Tensor, Tensor]:
        """The conditioning hidden state (B, T, W) and the pooled embedding (B, projection_dim): the last block's
        output through `ln_final` at the end token (the highest id), times `text_projection` (SDXL)."""
        return self._run(tokens, clip_skip, pooled=True)

    def _run(self, tokens: Tensor, clip_skip: int, pooled: bool) -> tuple[Tensor, Tensor | None]:
        m = self.model
        t = tokens.shape[1]
        x = m.token_embedding(tokens) + m.positional_embedding[:t].to(m.token_embedding.weight.dtype)  # (B, T, W)
        causal = torch.full((t, t), float("-inf"), device=x.device, dtype=x.dtype).triu(1)
        skip = clip_skip - 1 + (1 if self.cfg.layer == "penultimate" else 0)
        blocks = m.transformer.resblocks
        if not 0 <= skip < len(blocks):
            raise ValueError(f"clip_skip={clip_skip} is out of range for a {len(blocks)}-layer text encoder")
        hidden = None
        for i, block in enumerate(blocks[: len(blocks) - (0 if pooled else skip)]):
            x = block(x, causal)
            if i == len(blocks) - 1 - skip:
                hidden = m.ln_final(x) if self.cfg.final_norm else x
        if not pooled:
            return hidden, None
        last = m.ln_final(x)
        return hidden, last[torch.arange(len(tokens), device=x.device), tokens.argmax(dim=-1)] @ m.text_projection


def repad(tokens: Tensor, pad: int) -> Tensor:
    """Token rows [start, ids..., end, padding] with the padding after each row's first end token set to `pad`."""
    after_end = (tokens == CLIP_EOS).int().cumsum(dim=1) - (tokens == CLIP_EOS).int() > 0
    return tokens.masked_fill(after_end, pad)


class Conditioner(nn.Module):
    """SDXL's text side, sgm's GeneralConditioner: `embedders.N` the text encoders of `cfg.text_encoders`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embedders = nn.ModuleList(build_text_encoder(t) for t in cfg.text_encoders)

    def forward(self, tokens: Tensor, clip_skip: int = 1) -> tuple[Tensor, Tensor]:
        """Tokens (B, T) -> the context (B, T, sum of widths) and the pooled embedding (B, projection_dim)."""
        hidden = []
        *first, last = zip(self.embedders, self.cfg.text_encoders)
        for encoder, cfg in first:
            hidden.append(encoder(repad(tokens, cfg.pad_token), clip_skip))
        encoder, cfg = last
        z, pooled = encoder.with_pooled(repad(tokens, cfg.pad_token), clip_skip)
        return torch.cat([*hidden, z], dim=-1), pooled

    def vector(self, pooled: Tensor, conditions: dict[str, tuple[float, ...]]) -> Tensor:
        """SDXL's y (B, adm_in_channels): the pooled embedding (B, P), then each of `cfg.vector`'s conditions, a
        timestep embedding of each of its numbers (`original_size` (h, w), `crop_coords_top_left` (top, left),
        `target_size` (h, w), `aesthetic_score` (s,)), the same for every row."""
        parts = [pooled]
        for name in self.cfg.vector:
            values = tuple(conditions[name])
            if len(values) != VECTOR_CONDITIONS[name]:
                raise ValueError(f"{name} takes {VECTOR_CONDITIONS[name]} numbers, got {values}")
            emb = timestep_embedding(torch.tensor(values, dtype=torch.float32, device=pooled.device), VECTOR_EMBED_DIM)
            parts.append(emb.reshape(1, -1).expand(pooled.shape[0], -1).to(pooled.dtype))
        return torch.cat(parts, dim=1)


def build_text_encoder(cfg: TextEncoderConfig) -> nn.Module:
    if cfg.kind == "hf-clip":
        return FrozenCLIPEmbedder(cfg)
    if cfg.kind == "open-clip":
        return FrozenOpenCLIPEmbedder(cfg)
    raise ValueError(f"unknown text encoder kind {cfg.kind!r}")
