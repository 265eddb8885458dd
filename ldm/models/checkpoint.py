"""Reading and writing single-file checkpoints in the original Stable Diffusion layout.

- The file format is chosen by magic bytes, never by extension: safetensors (an 8-byte header length then a
  JSON header), a torch zip archive (`PK\\x03\\x04`) or a legacy torch pickle (`\\x80`).
- Pickles (`.ckpt`) are read only through `torch.load(weights_only=True)`: a payload that needs arbitrary
  globals is refused and never executed.
- Loading is strict and lean: the model is built on the meta device, key sets and shapes are compared and
  reported in one readable error, then the tensors are adopted with `load_state_dict(assign=True)`.
"""
from __future__ import annotations

import json
import os
import re
import struct
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from ldm import __version__, accel
from ldm.accel.cpu import check_precision
from ldm.config import ModelConfig, load_config, preset
from ldm.models.stable_diffusion import SCHEDULE_BUFFERS, StableDiffusion, schedule_buffers

METADATA_CONFIG_KEY = "ldm_config"

# Keys in real checkpoints that ldm deliberately does not load. EMA weights (`model_ema.*`) are loaded only on
# request (`use_ema=True`); `logvar` and `lvlb_weights` are training-only buffers of the original LatentDiffusion;
# `loss.*` are the discriminator weights that VAE training checkpoints carry.
IGNORED_PREFIXES = ("model_ema.", "logvar", "lvlb_weights", "loss.")

# Keys that may be absent (older or pruned files): they are recomputed from the config.
POSITION_IDS_KEY = "cond_stage_model.transformer.text_model.embeddings.position_ids"
SDXL_POSITION_IDS_KEY = "conditioner.embedders.0.transformer.text_model.embeddings.position_ids"
OPTIONAL_KEYS = (*SCHEDULE_BUFFERS, POSITION_IDS_KEY, SDXL_POSITION_IDS_KEY)

VAE_PREFIX = "first_stage_model."


class CheckpointError(ValueError):
    """A file that is not a usable checkpoint, or that does not fit the model. The message says why and how to fix it."""


# --- reading files -------------------------------------------------------------------------------------------

def sniff_format(path: Path) -> str:
    """'safetensors', 'torch-zip' or 'torch-pickle', from the first bytes of the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(9)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint not found: {path}") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path} is a directory, not a checkpoint file (diffusers folders are not supported; "
                              "give the single-file .safetensors)") from None
    if len(head) >= 9:
        (header_len,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{" and 8 + header_len <= size:
            return "safetensors"
        if head[8:9] == b"{":
            raise CheckpointError(f"{path} is a truncated safetensors file: its header says {header_len} bytes "
                                  f"but the file has {size}. Download it again.")
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    if head[:1] == b"\x80":
        return "torch-pickle"
    raise CheckpointError(f"{path} is not a checkpoint: expected a .safetensors file or a torch .ckpt "
                          f"(first bytes {head[:8]!r})")


class _InertStub:
    """Stand-in for harmless metadata classes that training frameworks pickle into .ckpt files."""

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _stub(module: str, name: str) -> type:
    return type(name, (_InertStub,), {"__module__": module, "__qualname__": name})


# PyTorch Lightning stores its ModelCheckpoint callback state in the original SD .ckpt files. Allowing it as an
# inert stub (no code of its own, attributes only) lets those files load with weights_only=True.
_SAFE_STUBS = [_stub("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint")]


def read_state_dict(path: str | Path, dtype: torch.dtype | None = None) -> tuple[dict[str, Tensor], dict[str, str]]:
    """All tensors of a checkpoint file (floating ones cast to `dtype` if given) and its metadata."""
    path = Path(path)
    fmt = sniff_format(path)
    metadata: dict[str, str] = {}
    tensors: dict[str, Tensor] = {}
    if fmt == "safetensors":
        from safetensors import SafetensorError

        try:
            # Tensors that keep their dtype stay memory-mapped views of the file (no copy). Tensors to be cast are
            # read into memory first: mapped pages of the file would stay resident until the last view is gone,
            # so casting from the mapping would add the file's size to the peak memory.
            with _safe_open(path, "mmap") as mapped, _safe_open(path, "pread") as read:
                metadata = dict(mapped.metadata() or {})
                for key in mapped.keys():
                    t = mapped.get_tensor(key)  # a view: no page of the file is read yet
                    tensors[key] = t if not _needs_cast(key, t, dtype) else _cast(key, read.get_tensor(key), dtype)
        except (SafetensorError, json.JSONDecodeError, RuntimeError) as e:
            raise CheckpointError(f"{path} is a corrupt safetensors file ({e}). Download it again.") from None
        return tensors, metadata
    obj = read_pickle(path, fmt)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    for key, value in obj.items():
        if isinstance(value, Tensor):
            tensors[str(key)] = _cast(str(key), value, dtype)
    if not tensors:
        raise CheckpointError(f"{path} contains no tensors")
    return tensors, metadata


SAFETENSORS_FLOATS = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


def _header(path: Path) -> dict[str, Any]:
    """A safetensors file's header (tensor name -> dtype, shape, offsets), without its metadata."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return header


def stored_dtype(path: str | Path) -> torch.dtype:
    """The dtype of most of a file's floating tensors (read from a safetensors header; fp32 for a pickle)."""
    path = Path(path)
    if sniff_format(path) != "safetensors":
        return torch.float32
    counts: dict[torch.dtype, int] = {}
    for entry in _header(path).values():
        if entry["dtype"] in SAFETENSORS_FLOATS:
            dtype = SAFETENSORS_FLOATS[entry["dtype"]]
            counts[dtype] = counts.get(dtype, 0) + 1
    return max(counts, key=counts.get, default=torch.float32)


def loaded_bytes(path: str | Path, dtype: torch.dtype) -> int:
    """About the memory a file's tensors take once loaded in `dtype` (a pickle: its size)."""
    path = Path(path)
    if sniff_format(path) != "safetensors":
        return path.stat().st_size
    total = 0
    for entry in _header(path).values():
        stored = entry["data_offsets"][1] - entry["data_offsets"][0]
        if entry["dtype"] in SAFETENSORS_FLOATS:
            stored = stored // SAFETENSORS_FLOATS[entry["dtype"]].itemsize * dtype.itemsize
        total += stored
    return total


def read_pickle(path: Path, fmt: str | None = None) -> Any:
    """The object a torch pickle (.ckpt, .pt, .bin) holds, through the restricted unpickler: tensors, numbers,
    strings and containers only; anything that would run code is refused with a CheckpointError."""
    try:
        with torch.serialization.safe_globals(_SAFE_STUBS):
            return _torch_load(path, fmt or sniff_format(path))
    except Exception as e:  # noqa: BLE001 - any failure of the restricted unpickler means "refused"
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "weights_only" in str(e) or "global" in str(e).lower():
            # torch's message advises `weights_only=False` or allow-listing, i.e. running the payload; name only
            # the offending global.
            found = re.search(r"GLOBAL ([\w.]+)", str(e))
            why = f"it asks for {found.group(1)}" if found else "unsupported pickle data"
            raise CheckpointError(
                f"refused to load {path}: its pickle needs Python objects beyond plain tensors ({why}). ldm never "
                "runs code from a checkpoint. Use the .safetensors version of this file.") from None
        raise CheckpointError(f"{path} is not a readable torch checkpoint ({msg})") from None


def _torch_load(path: Path, fmt: str) -> Any:
    """`torch.load` through the restricted unpickler, memory-mapped when the file is a zip archive."""
    if path.suffix != ".safetensors":
        return torch.load(path, map_location="cpu", weights_only=True, mmap=fmt == "torch-zip")
    # torch.load reads any *path* ending in .safetensors as safetensors, whatever its bytes; a file object avoids
    # that, at the cost of mmap, which needs a path.
    with open(path, "rb") as f:
        return torch.load(f, map_location="cpu", weights_only=True)


def _safe_open(path: Path, backend: str):
    """safetensors' reader; `backend="pread"` reads each tensor into its own memory (safetensors >= 0.8)."""
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt", device="cpu", backend=backend)
    except TypeError:  # an older safetensors: memory-mapped only
        return safe_open(str(path), framework="pt", device="cpu")


def _needs_cast(key: str, t: Tensor, dtype: torch.dtype | None) -> bool:
    """Floating tensors go to `dtype`; the schedule buffers keep the dtype they are stored in (fp32 in real files)."""
    return dtype is not None and key not in SCHEDULE_BUFFERS and t.is_floating_point() and t.dtype != dtype


def _cast(key: str, t: Tensor, dtype: torch.dtype | None) -> Tensor:
    return t.to(dtype) if _needs_cast(key, t, dtype) else t


# --- architecture detection -------------------------------------------------------------------------------------

def detect_config(keys_and_shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str]) -> ModelConfig:
    """The config stored by `ldm.save`, else the preset whose every key and shape matches the file."""
    if METADATA_CONFIG_KEY in metadata:
        return ModelConfig.from_dict(json.loads(metadata[METADATA_CONFIG_KEY]))
    if any(k.startswith("cond_stage_model.model.") for k in keys_and_shapes):
        candidates = ["sd-v2", "sd-v2-base"]
    elif any(k.startswith("cond_stage_model.transformer.") for k in keys_and_shapes):
        candidates = ["sd-v1"]
    elif any(k.startswith("conditioner.embedders.1.model.") for k in keys_and_shapes):
        candidates = ["sdxl"]  # CLIP ViT-L and OpenCLIP ViT-bigG
    elif any(k.startswith("conditioner.embedders.0.model.") for k in keys_and_shapes):
        candidates = ["sdxl-refiner"]  # the bigG alone
    else:
        raise CheckpointError("cannot tell the architecture: the file has no cond_stage_model.* or conditioner.* "
                              "text encoder keys. Is it a VAE or a diffusers UNet? Pass config= with a preset name "
                              "or YAML.")
    conv_in = keys_and_shapes.get("model.diffusion_model.input_blocks.0.0.weight", (0, 4))
    if conv_in[1] == 9:  # the inpainting variants (CompVis LatentInpaintDiffusion): eps, 512 px
        candidates = ["sd-v2-inpainting" if candidates[0] == "sd-v2" else "sd-v1-inpainting"]
    cfg = preset(candidates[0])
    problems = compare_keys(expected_shapes(cfg), keys_and_shapes)
    if problems:
        raise CheckpointError(f"the file does not match the {cfg.name} architecture; pass config= (a preset name "
                              f"or an inference YAML) if it is a variant.\n{problems}")
    return cfg


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = StableDiffusion(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def compare_keys(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]],
                 optional: tuple[str, ...] = OPTIONAL_KEYS) -> str:
    """A readable report of missing, unexpected and mis-shaped keys, or '' when they agree."""
    missing = sorted(k for k in expected if k not in found and k not in optional)
    unexpected = sorted(k for k in found if k not in expected and not k.startswith(IGNORED_PREFIXES))
    shapes = sorted(f"{k}: checkpoint {list(found[k])}, model {list(expected[k])}"
                    for k in expected if k in found and tuple(found[k]) != tuple(expected[k]))
    lines = []
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
            lines.append(f"{len(items)} {title}:\n  " + "\n  ".join(shown))
    return "\n".join(lines)


def ema_key(key: str) -> str:
    """`model.diffusion_model.a.b` -> `model_ema.diffusion_modelab`, the original LitEma buffer naming."""
    return "model_ema." + key[len("model."):].replace(".", "")


# --- load / save ----------------------------------------------------------------------------------------------------

def resolve_config(config: str | Path | ModelConfig | None) -> ModelConfig | None:
    if config is None or isinstance(config, ModelConfig):
        return config
    text = str(config)
    if text.endswith((".yaml", ".yml")) or os.path.sep in text:
        return load_config(text)
    return preset(text)


def load(path: str | Path, *, config: str | Path | ModelConfig | None = None, vae: str | Path | None = None,
         device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, prediction: str | None = None,
         use_ema: bool = False, allow_emulated_bf16: bool = False, accelerate: bool = True) -> StableDiffusion:
    """Load a single-file SD 1.x/2.x or SDXL checkpoint (.safetensors, or .ckpt through the restricted unpickler).

    config: a preset name (`sd-v1`, `sd-v2`, `sd-v2-base`, `sdxl`, `sdxl-refiner`, ...), a YAML (ldm's or the original inference YAML)
        or a ModelConfig; default: the config saved in the file, else detected from keys and shapes.
    vae: a separate VAE file, with or without the `first_stage_model.` prefix, replacing the bundled one.
    prediction: "eps" or "v", overriding the config and the probe.
    use_ema: load the `model_ema.*` UNet weights of a full training checkpoint instead of the raw ones.
    allow_emulated_bf16: load bf16 weights for a CPU without native bf16 arithmetic (AVX-512 BF16 or AMX), which
        is otherwise refused with a ValueError before anything is read (`ldm.accel.cpu.check_precision`): there bf16 runs
        emulated, slower than fp32. For tests and measurements.

    accelerate: run the UNet and the VAE on ldm's speed code (`ldm.accel.accelerate`: packed CPU weights, in-place
        blocks; the same images up to float summation order). False gives the plain networks of `ldm.models`.

    The model comes back frozen, for inference: eval mode, no parameter requiring grad. Training turns on what it
    trains (and loads with accelerate=False).
    """
    check_precision(dtype, device, allow_emulated_bf16)
    tensors, metadata = read_state_dict(path, dtype=dtype)
    cfg = resolve_config(config)
    if cfg is None:
        cfg = detect_config({k: tuple(v.shape) for k, v in tensors.items()}, metadata)
    if use_ema:
        _swap_in_ema(tensors, path)
    if vae is not None:
        tensors.update(read_vae(vae, dtype))
    tensors = {k: v for k, v in tensors.items() if not k.startswith(IGNORED_PREFIXES)}
    probe = (prediction is None and config is None and METADATA_CONFIG_KEY not in metadata
             and cfg.text.kind == "open-clip" and not cfg.inpainting and not cfg.sdxl)
    if prediction is not None:
        if prediction not in ("eps", "v"):
            raise ValueError(f"prediction must be 'eps' or 'v', got {prediction!r}")
        cfg = cfg.replace(prediction=prediction)
    model = build_and_adopt(cfg, tensors, source=str(path))
    model.source_name = Path(path).stem
    model.to(device).eval().requires_grad_(False)
    if probe:
        is_v = probe_v_prediction(model)
        name = ("sd-v2" if is_v else "sd-v2-base") if cfg.name in ("sd-v2", "sd-v2-base") else cfg.name
        model.config = cfg.replace(name=name, prediction="v" if is_v else "eps",
                                   image_size=768 if is_v else 512)
    return accel.accelerate(model) if accelerate else model


def build_and_adopt(cfg: ModelConfig, tensors: dict[str, Tensor], source: str = "checkpoint") -> StableDiffusion:
    """Build the model on the meta device and adopt `tensors` (strict, one report for all problems)."""
    with torch.device("meta"):
        model = StableDiffusion(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = compare_keys(expected, {k: tuple(v.shape) for k, v in tensors.items()})
    if problems:
        raise CheckpointError(f"{source} does not fit the {cfg.name} model:\n{problems}")
    s = cfg.schedule
    defaults = schedule_buffers(s)
    for key in (POSITION_IDS_KEY, SDXL_POSITION_IDS_KEY):
        defaults[key] = torch.arange(cfg.text.max_length).expand((1, -1)).clone()
        if key in tensors:  # some files store it as float
            tensors[key] = tensors[key].round().long()
    for key in OPTIONAL_KEYS:
        if key in expected and key not in tensors:
            tensors[key] = defaults[key]
    model.load_state_dict(tensors, strict=True, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"internal error: tensors left uninitialised after loading: {left[:5]}")
    return model


def read_vae(path: str | Path, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """A standalone VAE file (e.g. vae-ft-mse-840000-ema-pruned) as `first_stage_model.*` tensors."""
    tensors, _ = read_state_dict(path, dtype=dtype)
    out = {}
    for key, value in tensors.items():
        if key.startswith(IGNORED_PREFIXES):
            continue
        key = key if key.startswith(VAE_PREFIX) else VAE_PREFIX + key
        if key.startswith(VAE_PREFIX):
            out[key] = value
    if not any(k.startswith(VAE_PREFIX + "decoder.") for k in out):
        raise CheckpointError(f"{path} is not a VAE: it has no decoder.* keys")
    return {k: v for k, v in out.items() if k.startswith(VAE_PREFIX)}


def _swap_in_ema(tensors: dict[str, Tensor], path: str | Path) -> None:
    unet_keys = [k for k in tensors if k.startswith("model.diffusion_model.")]
    missing = [k for k in unet_keys if ema_key(k) not in tensors]
    if missing:
        raise CheckpointError(f"{path} has no EMA weights (model_ema.*) for {len(missing)} UNet keys, e.g. "
                              f"{missing[0]}; load it without use_ema")
    for key in unet_keys:
        tensors[key] = tensors[ema_key(key)]


@torch.no_grad()
def probe_v_prediction(model: StableDiffusion) -> bool:
    """A1111's test for SD2 checkpoints: at t=999 an eps model returns about its input, a v model far below it."""
    x = torch.full((1, model.config.unet.in_channels, 8, 8), 0.5, device=model.device, dtype=model.dtype)
    context = torch.full((1, 2, model.config.unet.context_dim), 0.5, device=model.device, dtype=model.dtype)
    t = torch.tensor([model.config.schedule.num_timesteps - 1], device=model.device)
    out = model.unet(x, t, context).float()
    return (out - x.float()).mean().item() < -1.0


def save(model: StableDiffusion, path: str | Path, *, dtype: torch.dtype | None = None, overwrite: bool = False,
         metadata: Mapping[str, str] | None = None) -> Path:
    """Write `model.state_dict()` as a single-file .safetensors in the original layout, atomically, with the config
    in the metadata so that `ldm.load` needs no config= for it."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    state = {}
    for key, value in model.state_dict().items():
        value = value.detach().to("cpu")
        if dtype is not None and value.is_floating_point() and key not in SCHEDULE_BUFFERS:
            value = value.to(dtype)
        state[key] = value.contiguous().clone() if not value.is_contiguous() or _shares_storage(value) else value
    meta = {METADATA_CONFIG_KEY: json.dumps(model.config.to_dict()), "ldm_version": __version__, "format": "pt"}
    meta.update(metadata or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write_safetensors(state, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_safetensors(tensors: Mapping[str, Tensor], path: str | Path, metadata: Mapping[str, str] | None = None) -> None:
    """safetensors' save_file, giving the file the umask's mode rather than save_file's 0600."""
    from safetensors.torch import save_file

    from ldm.generation.images import default_file_mode

    save_file(dict(tensors), str(path), metadata=dict(metadata) if metadata else None)
    os.chmod(path, default_file_mode())


def _shares_storage(t: Tensor) -> bool:
    return t.untyped_storage().nbytes() != t.numel() * t.element_size()
