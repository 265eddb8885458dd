"""Typed configuration: one frozen dataclass per component, named presets, a YAML reader, and `build`, the one
typed builder of a config dataclass from a mapping (also used for `ldm.training.config.TrainConfig`).

YAML files (ldm's own `configs/*.yaml` and the original CompVis/Stability inference YAMLs) are data that map
onto these fields. Their `target:` strings are read as data and never imported.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

Prediction = Literal["eps", "v"]


@dataclass(frozen=True)
class UNetConfig:
    """The openaimodel `UNetModel` with spatial transformers (CompVis naming in the comments)."""
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (4, 2, 1)  # downsampling factors that get a transformer
    num_heads: int | None = 8            # a fixed head count (SD1) ...
    num_head_channels: int | None = None  # ... or a fixed head width (SD2: 64)
    transformer_depth: int | tuple[int, ...] = 1  # blocks per transformer: one for all levels, or one per level
    transformer_depth_middle: int | None = None    # the middle block's (None: the last level's)
    context_dim: int = 768
    use_linear_in_transformer: bool = False  # SD2: proj_in/proj_out are Linear, not 1x1 Conv
    adm_in_channels: int | None = None       # SDXL: width of the vector y added to the timestep embedding
    norm_groups: int = 32
    dropout: float = 0.0

    def depth(self, level: int | None) -> int:
        """Transformer blocks of the transformers at a level of `channel_mult` (None: the middle block)."""
        depths = self.transformer_depth
        if isinstance(depths, int):
            depths = (depths,) * len(self.channel_mult)
        if len(depths) != len(self.channel_mult):
            raise ValueError(f"transformer_depth {depths} needs one depth per level of channel_mult "
                             f"{self.channel_mult}")
        if level is None:
            return depths[-1] if self.transformer_depth_middle is None else self.transformer_depth_middle
        return depths[level]

    def heads(self, channels: int) -> tuple[int, int]:
        """(number of heads, head width) for a transformer with `channels` channels."""
        if self.num_head_channels is not None:
            if channels % self.num_head_channels:
                raise ValueError(f"{channels} channels are not divisible by num_head_channels={self.num_head_channels}")
            return channels // self.num_head_channels, self.num_head_channels
        if self.num_heads is None or channels % self.num_heads:
            raise ValueError(f"{channels} channels are not divisible by num_heads={self.num_heads}")
        return self.num_heads, channels // self.num_heads


@dataclass(frozen=True)
class AutoencoderConfig:
    """AutoencoderKL (f = 2 ** (len(ch_mult) - 1), z = z_channels), `ddconfig` in CompVis YAMLs."""
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    norm_groups: int = 32
    scale_factor: float = 0.18215  # latents are multiplied by this before diffusion

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class TextEncoderConfig:
    """The CLIP text transformer: `hf-clip` (transformers' CLIPTextModel, SD1, SDXL's first) or `open-clip` (SD2,
    SDXL's second)."""
    kind: Literal["hf-clip", "open-clip"] = "hf-clip"
    vocab_size: int = 49408
    max_length: int = 77
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: int = 4
    activation: Literal["quick_gelu", "gelu"] = "quick_gelu"
    layer: Literal["last", "penultimate"] = "last"  # which hidden state conditions the UNet
    final_norm: bool = True    # that state goes through the final LayerNorm (SD1, SD2), or not (SDXL)
    projection_dim: int = 768  # open-clip text_projection width (SDXL: of the pooled embedding; SD2: unused)
    pad_token: int = 49407     # SD1 pads with the end token, SD2 (open_clip) with 0


@dataclass(frozen=True)
class ScheduleConfig:
    """The DDPM training schedule ("scaled linear": betas linear in sqrt space)."""
    num_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: Literal["scaled_linear", "linear"] = "scaled_linear"


@dataclass(frozen=True)
class ModelConfig:
    """A latent diffusion model. SD 1.x/2.x: one text encoder (`text`) under `cond_stage_model.`. SDXL (`vector`
    not empty): sgm's `conditioner.embedders.N.`, the text encoders `text` then `text_2` (the base has both, the
    refiner only the OpenCLIP one), their hidden states concatenated into the context, and the vector y: the last
    encoder's pooled embedding then a 256-wide Fourier embedding of each number of the `vector` conditions."""
    name: str
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    text_2: TextEncoderConfig | None = None
    vector: tuple[Literal["original_size", "crop_coords_top_left", "target_size", "aesthetic_score"], ...] = ()
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    prediction: Prediction = "eps"
    image_size: int = 512  # native resolution in pixels
    # The noise levels (lo, hi] where classifier-free guidance pays off for this model, the default of txt2img and
    # img2img (ldm.sampling.guidance; hi None: no bound). None: guidance at every step, as SD is sampled.
    guidance_interval: tuple[float, float | None] | None = None

    def __post_init__(self):
        widths = sum(t.width for t in self.text_encoders)
        if self.sdxl and (self.unet.adm_in_channels, self.unet.context_dim) != (self.vector_width, widths):
            raise ValueError(f"{self.name}: an SDXL UNet here takes y of width {self.vector_width} (pooled embedding "
                             f"and {', '.join(self.vector)}) and a context of width {widths} (the text encoders'), "
                             f"but unet has adm_in_channels={self.unet.adm_in_channels}, "
                             f"context_dim={self.unet.context_dim}")
        if not self.sdxl and (self.text_2 is not None or self.unet.adm_in_channels is not None):
            raise ValueError(f"{self.name}: text_2 and unet.adm_in_channels belong to SDXL models, which set `vector`")

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @property
    def sdxl(self) -> bool:
        """An SDXL model (base or refiner): sgm's conditioner and the vector conditioning."""
        return bool(self.vector)

    @property
    def text_encoders(self) -> tuple[TextEncoderConfig, ...]:
        return (self.text,) if self.text_2 is None else (self.text, self.text_2)

    @property
    def vector_width(self) -> int:
        """Width of SDXL's vector y: the pooled embedding and VECTOR_EMBED_DIM per number of the conditions."""
        return self.text_encoders[-1].projection_dim + VECTOR_EMBED_DIM * sum(map(VECTOR_CONDITIONS.get, self.vector))

    @property
    def inpainting(self) -> bool:
        """An inpainting model (CompVis `LatentInpaintDiffusion`, conditioning "hybrid"): its UNet takes the noisy
        latents, the mask and the masked image's latents concatenated, 4 + 1 + 4 channels."""
        return self.unet.in_channels == self.unet.out_channels + 1 + self.vae.embed_dim

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """A ModelConfig from a mapping (ldm's YAML, or a checkpoint's metadata), checked key by key (`build`)."""
        cfg = build(cls, d)
        return cfg.replace(guidance_interval=check_interval(cfg.guidance_interval))


# SDXL's vector conditions (sgm's GeneralConditioner keys, "_as_tuple" dropped) and how many numbers each holds;
# each number is embedded as a timestep is, VECTOR_EMBED_DIM wide.
VECTOR_CONDITIONS = {"original_size": 2, "crop_coords_top_left": 2, "target_size": 2, "aesthetic_score": 1}
VECTOR_EMBED_DIM = 256

SliceSize = int | Literal["auto"] | None  # attention query rows per slice; "auto"; None: no slicing


def is_slice_size(value: Any) -> bool:
    """Whether `value` is an attention slice size: a positive int (query rows), "auto" or None."""
    return value is None or value == "auto" or isinstance(value, int) and not isinstance(value, bool) and value >= 1


Interval = tuple[float, float | None]  # (lo, hi) in σ; hi None: no upper bound


def check_interval(interval: Interval | None) -> Interval | None:
    """A valid guidance interval as a tuple (0 <= lo < hi, hi None for ∞), or None; else ValueError."""
    if interval is None:
        return None
    try:
        lo, hi = interval
        lo, hi = float(lo), None if hi is None else float(hi)
    except (TypeError, ValueError):
        raise ValueError(f"guidance interval must be a pair (lo, hi) of noise levels σ, got {interval!r}") from None
    if not (lo >= 0.0 and (hi is None or hi > lo)):
        raise ValueError(f"guidance interval needs 0 <= lo < hi, got ({lo}, {hi})")
    return lo, None if hi == float("inf") else hi


# --- presets -------------------------------------------------------------------------------------------

SD1_TEXT = TextEncoderConfig()
SD2_TEXT = TextEncoderConfig(kind="open-clip", width=1024, layers=24, heads=16, activation="gelu",
                             layer="penultimate", projection_dim=1024, pad_token=0)
SD2_UNET = UNetConfig(num_heads=None, num_head_channels=64, context_dim=1024, use_linear_in_transformer=True)

# SDXL (sgm's sd_xl_base.yaml, sd_xl_refiner.yaml): CLIP ViT-L and OpenCLIP ViT-bigG, both conditioning with the
# penultimate block's output without the final LayerNorm; the bigG's pooled output through text_projection joins y.
SDXL_CLIP_L = TextEncoderConfig(layer="penultimate", final_norm=False)
SDXL_CLIP_G = TextEncoderConfig(kind="open-clip", width=1280, layers=32, heads=20, activation="gelu",
                                layer="penultimate", final_norm=False, projection_dim=1280, pad_token=0)
SDXL_UNET = UNetConfig(channel_mult=(1, 2, 4), attention_resolutions=(4, 2), num_heads=None, num_head_channels=64,
                       transformer_depth=(1, 2, 10), context_dim=2048, use_linear_in_transformer=True,
                       adm_in_channels=2816)
SDXL_REFINER_UNET = UNetConfig(model_channels=384, attention_resolutions=(4, 2), num_heads=None, num_head_channels=64,
                               transformer_depth=4, context_dim=1280, use_linear_in_transformer=True,
                               adm_in_channels=2560)
SDXL_VAE = AutoencoderConfig(scale_factor=0.13025)
SDXL_VECTOR = ("original_size", "crop_coords_top_left", "target_size")
SDXL_REFINER_VECTOR = ("original_size", "crop_coords_top_left", "aesthetic_score")

# Tiny configs of the same code, for tests and the bundled demo model. Group norm needs channels divisible by
# norm_groups, so the tiny presets use 8 groups.
TINY_UNET = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
                       num_heads=None, num_head_channels=16, context_dim=32, norm_groups=8)
TINY_VAE = AutoencoderConfig(ch=16, ch_mult=(1, 2, 2, 2), num_res_blocks=1, norm_groups=8)
TINY_TEXT = TextEncoderConfig(width=32, layers=2, heads=2, projection_dim=32)

TINY_CLIP_L = dataclasses.replace(TINY_TEXT, layer="penultimate", final_norm=False)
TINY_CLIP_G = dataclasses.replace(TINY_TEXT, kind="open-clip", width=48, heads=3, layers=3, activation="gelu",
                                  layer="penultimate", final_norm=False, projection_dim=48, pad_token=0)
TINY_SDXL_UNET = dataclasses.replace(TINY_UNET, channel_mult=(1, 2, 2), attention_resolutions=(2, 4),
                                     transformer_depth=(0, 1, 2), context_dim=80, use_linear_in_transformer=True,
                                     adm_in_channels=48 + 6 * 256)

PRESETS: dict[str, ModelConfig] = {
    "sd-v1": ModelConfig(name="sd-v1"),
    "sd-v2": ModelConfig(name="sd-v2", unet=SD2_UNET, text=SD2_TEXT, prediction="v", image_size=768),
    "sd-v2-base": ModelConfig(name="sd-v2-base", unet=SD2_UNET, text=SD2_TEXT, prediction="eps", image_size=512),
    "sd-v1-inpainting": ModelConfig(name="sd-v1-inpainting", unet=UNetConfig(in_channels=9)),
    "sd-v2-inpainting": ModelConfig(name="sd-v2-inpainting", unet=dataclasses.replace(SD2_UNET, in_channels=9),
                                    text=SD2_TEXT, prediction="eps", image_size=512),
    "sdxl": ModelConfig(name="sdxl", unet=SDXL_UNET, vae=SDXL_VAE, text=SDXL_CLIP_L, text_2=SDXL_CLIP_G,
                        vector=SDXL_VECTOR, image_size=1024),
    "sdxl-refiner": ModelConfig(name="sdxl-refiner", unet=SDXL_REFINER_UNET, vae=SDXL_VAE, text=SDXL_CLIP_G,
                                vector=SDXL_REFINER_VECTOR, image_size=1024),
    "tiny-sdxl": ModelConfig(name="tiny-sdxl", unet=TINY_SDXL_UNET, vae=TINY_VAE, text=TINY_CLIP_L, text_2=TINY_CLIP_G,
                             vector=SDXL_VECTOR, image_size=64),
    "tiny-sdxl-refiner": ModelConfig(
        name="tiny-sdxl-refiner", vae=TINY_VAE, text=TINY_CLIP_G, vector=SDXL_REFINER_VECTOR, image_size=64,
        unet=dataclasses.replace(TINY_SDXL_UNET, model_channels=48, transformer_depth=2, context_dim=48,
                                 adm_in_channels=48 + 5 * 256)),
    "tiny": ModelConfig(name="tiny", unet=TINY_UNET, vae=TINY_VAE, text=TINY_TEXT, image_size=64),
    "tiny-inpainting": ModelConfig(name="tiny-inpainting", unet=dataclasses.replace(TINY_UNET, in_channels=9),
                                   vae=TINY_VAE, text=TINY_TEXT, image_size=64),
    "tiny-v2": ModelConfig(
        name="tiny-v2", unet=dataclasses.replace(TINY_UNET, use_linear_in_transformer=True), vae=TINY_VAE,
        text=dataclasses.replace(TINY_TEXT, kind="open-clip", activation="gelu", layers=3, layer="penultimate",
                                 pad_token=0),
        prediction="v", image_size=64),
    # The bundled demo model (ldm/demo/ldm-demo-shapes.safetensors, `make demo-model`): an f=4 VAE (64 px ->
    # 16x16x4 latents, so a 16 px shape spans 4x4 latent pixels), a UNet with attention at 8x8 and 4x4 only (at
    # 16x16 it costs 60% more per step), and the tiny text encoder. scale_factor is measured on the trained VAE
    # by `tools/demo.py train` and stored in the checkpoint's config. Guided only above σ = 1: guidance at low
    # noise turns small squares into crosses (shape accuracy 84-89% at 7.5 everywhere, 96% with the interval:
    # README, "Demo model").
    "demo-shapes": ModelConfig(
        name="demo-shapes",
        unet=dataclasses.replace(TINY_UNET, channel_mult=(1, 2, 2), attention_resolutions=(2, 4)),
        vae=dataclasses.replace(TINY_VAE, ch_mult=(1, 2, 2)), text=TINY_TEXT, image_size=64,
        guidance_interval=(1.0, None)),
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None


# --- mappings onto dataclasses -------------------------------------------------------------------------

C = TypeVar("C")


def build(cls: type[C], values: Any, where: str = "") -> C:
    """`cls(**values)` for a config dataclass, checked key by key against its annotations: nested dataclasses
    (from mappings; None or an empty YAML section: the defaults), `X | None` and other unions, Literal,
    `tuple[X, ...]` (a single value is a 1-tuple), fixed-length tuples, lists and Path. YAML lists become tuples.
    `where` is the dotted path of `values` ("" at the top), so that each ValueError names the key: an unknown
    key (with the valid ones), a missing key without a default, a value of the wrong type or outside a Literal."""
    if not isinstance(values, dict):
        raise ValueError(f"config section '{where or 'top'}' must be a mapping of its fields, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in values if k not in fields]
    if unknown:
        close = [_key(where, m) for k in unknown for m in difflib.get_close_matches(str(k), fields, n=1)]
        hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
        raise ValueError(f"unknown key(s) {[_key(where, k) for k in unknown]}{hint}; valid keys"
                         f"{f' of {where!r}' if where else ''}: {sorted(fields)}")
    missing = [name for name, f in fields.items() if name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"missing key(s) {[_key(where, k) for k in missing]}, which have no default")
    hints = typing.get_type_hints(cls)
    return cls(**{k: _coerce(hints[k], v, _key(where, k)) for k, v in values.items()})


def _key(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


def _coerce(t: Any, v: Any, name: str) -> Any:
    """`v` as a value of the annotation `t`, or a ValueError that names the key `name`."""
    origin, args = typing.get_origin(t), typing.get_args(t)
    if dataclasses.is_dataclass(t):
        return build(t, {} if v is None else v, name)
    if origin in (typing.Union, types.UnionType):
        if v is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):  # in order: `str | tuple[str, ...]` keeps "a" whole
            with contextlib.suppress(ValueError):
                return _coerce(option, v, name)
        raise ValueError(f"{name}: expected {_describe(t)}, got {v!r}")
    if origin is Literal:
        if v in args:
            return v
        raise ValueError(f"{name} must be one of {list(args)}, got {v!r}")
    if origin in (tuple, list):
        items = list(v) if isinstance(v, (list, tuple)) else [v]
        if origin is tuple and args[-1:] != (Ellipsis,):  # fixed length: tuple[float, float | None]
            if len(items) != len(args):
                raise ValueError(f"{name}: expected {_describe(t)}, got {v!r}")
            return tuple(_coerce(a, x, f"{name}[{i}]") for i, (a, x) in enumerate(zip(args, items)))
        out = [_coerce(args[0], x, f"{name}[{i}]") for i, x in enumerate(items)]
        return tuple(out) if origin is tuple else out
    if t is Any:
        return v
    if t in (bool, str) and isinstance(v, t) or t is int and isinstance(v, int) and not isinstance(v, bool):
        return v
    if t is float and not isinstance(v, bool):
        with contextlib.suppress(TypeError, ValueError):
            return float(v)  # YAML 1.1 reads 1e-4 (no dot) as a string
    if t is Path and isinstance(v, (str, os.PathLike)):
        return Path(v)
    if t not in (bool, str, int, float, Path):
        raise TypeError(f"{name}: build cannot check a field annotated {t}")  # extend _coerce for it
    raise ValueError(f"{name}: expected {_describe(t)}, got {v!r}")


def _describe(t: Any) -> str:
    """An annotation in words: `float or None`, `'eps' or 'v'`, `a list of int`, `a list [float, float or None]`."""
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return " or ".join(map(repr, args))
    if origin is tuple and args[-1:] != (Ellipsis,):
        return f"a list [{', '.join(map(_describe, args))}]"
    if origin in (tuple, list):
        return f"a list of {_describe(args[0])}"
    return "None" if t is type(None) else getattr(t, "__name__", str(t))


# --- YAML ----------------------------------------------------------------------------------------------

def read_yaml_mapping(path: str | Path, what: str = "YAML file") -> dict[str, Any]:
    """A YAML file whose top level is a mapping, read as data (safe_load), with readable errors."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return data


def load_config(path: str | Path) -> ModelConfig:
    """Read ldm's own YAML (`preset:` plus overrides, or a full config) or an original CompVis/Stability
    inference YAML (`model: target: ...LatentDiffusion`). Anything else is a ValueError naming what is missing."""
    path = Path(path)
    data = read_yaml_mapping(path, "config file")
    if "model" in data:
        return from_compvis(data, name=path.stem, source=str(path))
    if "preset" in data:
        base = preset(data.pop("preset")).to_dict()
        for key, value in data.items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                base[key] = {**base[key], **value}
            else:
                base[key] = value
        data = base
    elif "name" not in data:
        raise ValueError(f"{path} is not an SD model config: it has neither a 'model' section (the layout of "
                         f"v1-inference.yaml) nor 'preset' or 'name' (ldm's own); its top-level keys are "
                         f"{sorted(map(str, data))}")
    try:
        return ModelConfig.from_dict(data)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: {e}") from None


class _ConfigError(ValueError):
    """A config error whose message already names the file and what is missing."""


def _section(data: Any, *keys: str, source: str, within: str = "") -> dict[str, Any]:
    """data[keys[0]][keys[1]]... as a mapping (`data` being the section `within`), or a ValueError naming the
    first missing section."""
    for i, key in enumerate(keys):
        if not isinstance(data, dict) or not isinstance(data.get(key), dict):
            where = ".".join([*filter(None, [within]), *keys[:i + 1]])
            raise _ConfigError(f"{source} is not an SD inference config: it has no '{where}' section (expected the "
                             "layout of v1-inference.yaml or v2-inference.yaml)")
        data = data[key]
    return data


def _field(section: dict[str, Any], key: str, where: str, source: str) -> Any:
    if key not in section:
        raise _ConfigError(f"{source}: the '{where}' section has no '{key}', which an SD inference config sets")
    return section[key]


def from_compvis(data: dict[str, Any], name: str = "compvis", source: str = "config") -> ModelConfig:
    """Map an original `v1-inference.yaml` / `v2-inference(-v).yaml` onto ModelConfig. Only the fields that
    define the architecture are read; `target:` strings only pick the text encoder kind. A missing section or
    field, or a value of the wrong type, is a ValueError that names it."""
    try:
        return _from_compvis(data, name, source)
    except _ConfigError:
        raise
    except (TypeError, ValueError) as e:  # a value of the wrong type, or a config ldm cannot build
        raise ValueError(f"{source}: not a valid SD inference config: {e}") from None


def _from_compvis(data: dict[str, Any], name: str, source: str) -> ModelConfig:
    p = _section(data, "model", "params", source=source)
    if "network_config" in p and "unet_config" not in p:
        raise _ConfigError(f"{source} is an sgm (SDXL) config, which ldm does not read: SDXL files are detected from "
                           "their weights, or pass the preset sdxl or sdxl-refiner")
    u = _section(p, "unet_config", "params", source=source, within="model.params")
    fs = _section(p, "first_stage_config", "params", source=source, within="model.params")
    dd = _section(fs, "ddconfig", source=source, within="model.params.first_stage_config.params")

    def unet_field(key: str) -> Any:
        return _field(u, key, "model.params.unet_config.params", source)

    def vae_field(key: str) -> Any:
        return _field(dd, key, "model.params.first_stage_config.params.ddconfig", source)

    unet = UNetConfig(
        in_channels=u.get("in_channels", 4), out_channels=u.get("out_channels", 4),
        model_channels=int(unet_field("model_channels")), channel_mult=tuple(unet_field("channel_mult")),
        num_res_blocks=int(unet_field("num_res_blocks")),
        attention_resolutions=tuple(unet_field("attention_resolutions")),
        num_heads=u.get("num_heads") if u.get("num_heads", -1) != -1 else None,
        num_head_channels=u.get("num_head_channels") if u.get("num_head_channels", -1) != -1 else None,
        transformer_depth=u.get("transformer_depth", 1), context_dim=int(unet_field("context_dim")),
        use_linear_in_transformer=u.get("use_linear_in_transformer", False))
    if unet.num_head_channels is not None:
        unet = dataclasses.replace(unet, num_heads=None)
    vae = AutoencoderConfig(in_channels=vae_field("in_channels"), out_ch=vae_field("out_ch"), ch=vae_field("ch"),
                            ch_mult=tuple(vae_field("ch_mult")), num_res_blocks=vae_field("num_res_blocks"),
                            z_channels=vae_field("z_channels"),
                            embed_dim=_field(fs, "embed_dim", "model.params.first_stage_config.params", source),
                            scale_factor=float(p.get("scale_factor", 0.18215)))
    cond = _section(p, "cond_stage_config", source=source, within="model.params")
    target = str(cond.get("target", ""))
    if "OpenCLIP" in target:
        layer = (cond.get("params") or {}).get("layer", "last")
        text = dataclasses.replace(SD2_TEXT, layer=layer)
    elif "CLIPEmbedder" in target:
        text = SD1_TEXT
    else:
        raise _ConfigError(f"{source}: unsupported cond_stage_config target {target!r}: ldm supports the CLIP (SD1) "
                           "and OpenCLIP (SD2) text encoders")
    schedule = ScheduleConfig(num_timesteps=p.get("timesteps", 1000), beta_start=p.get("linear_start", 0.00085),
                              beta_end=p.get("linear_end", 0.012))
    prediction = "v" if p.get("parameterization", "eps") == "v" else "eps"
    # The original YAMLs all say `image_size: 64`; the 768 px SD2 models are the v-prediction ones.
    image_size = 768 if (prediction == "v" and text.kind == "open-clip") else p.get("image_size", 64) * vae.downsample_factor
    cfg = ModelConfig(name=name, unet=unet, vae=vae, text=text, schedule=schedule, prediction=prediction,
                      image_size=image_size)
    key = p.get("conditioning_key", "crossattn")
    if unet.in_channels != 4 and not (cfg.inpainting and key == "hybrid"):
        raise ValueError(f"UNet with {unet.in_channels} input channels and conditioning {key!r} (a depth model?) is "
                         "not supported; ldm reads ordinary (4) and inpainting (9, 'hybrid') UNets")
    return cfg
