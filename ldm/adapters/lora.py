"""LoRA files as model sites ship them, merged into a model's weights and taken out again bit for bit.

Formats (told apart by their keys):
- kohya / A1111 LoRA and LoCon: `lora_unet_<layer>.lora_down.weight` (r, in[, kh, kw]), `.lora_up.weight`
  (out, r[, 1, 1]) and `.alpha`; ΔW = up · down · alpha / r (Hu et al. 2021, eq. 3, with kohya's alpha).
  `lora_te_<layer>` for the text encoder (SDXL: `lora_te1_` CLIP ViT-L, `lora_te2_` OpenCLIP ViT-bigG). A layer is
  diffusers' module name (or the CompVis one) with "_" for ".".
- LyCORIS LoHa: `.hada_w1_a`, `.hada_w1_b`, `.hada_w2_a`, `.hada_w2_b`, `.alpha`; ΔW = (w1_a w1_b) ⊙ (w2_a w2_b)
  · alpha / r (Hyeon-Woo et al. 2022, the Hadamard product of two low-rank matrices).
- LyCORIS LoKr: `.lokr_w1` (or `.lokr_w1_a` · `.lokr_w1_b`), `.lokr_w2` (or `.lokr_w2_a` · `.lokr_w2_b`), `.alpha`;
  ΔW = w1 ⊗ w2 (Kronecker product), times alpha / r where a factor is low-rank (r its rank), else times 1.
- diffusers / PEFT: `unet.<layer>.lora_A.weight` (r, in), `unet.<layer>.lora_B.weight` (out, r), optional
  `.alpha`; `text_encoder.<layer>` for the text encoder (SDXL: and `text_encoder_2.`); ΔW = B · A · alpha / r
  (alpha = r when absent).

`merge(sd, [(lora, weight), ...])` adds weight · ΔW to each layer's weight (computed in fp32, stored in the
model's dtype) and returns a `Merged` whose `restore()` puts the original weights back, bit for bit: the merged
weights are new tensors and the originals are never written. A merged LoRA costs nothing per step. Every key of a
file must name a layer of the model with the right shape: anything else is an error that lists the keys, never
ignored.

Memory. A merge writes each changed weight anew (1.4 GiB for a LoRA of every layer of SD 1.5 in fp32), and memory
the process has not touched before is slow to hand out: on a 2-core AMD EPYC, writing 1.4 GiB of fresh pages takes
0.6 s, as long as the matrix products of a rank-128 merge. So `Adapters`, which merges and restores for the
pipeline, keeps the merged tensors of the last merge after restoring ("spare") and the next merge writes into those
of the same weights. `release_spare(sd)` frees them; the pipeline does so when memory runs short. A process that
will not need the original weights again (`ldm txt2img`) uses `fuse(sd, loras)` instead, which adds ΔW in place and
writes nothing anew.
"""
from __future__ import annotations

import contextlib
import re
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ldm.adapters.hashes import short_hash
from ldm.adapters.names import unet_names

KOHYA_UNET, KOHYA_TEXT = "lora_unet_", "lora_te_"
PEFT_UNET, PEFT_TEXT = "unet.", "text_encoder."
# SDXL base: the prefixes of its two text encoders, (kohya, PEFT) for each
SDXL_TEXT = (("lora_te1_", "text_encoder."), ("lora_te2_", "text_encoder_2."))
# the suffixes of one layer's tensors, per format
FORMATS = {
    "lora": ("lora_down.weight", "lora_up.weight", "lora_mid.weight"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
    "peft": ("lora_A.weight", "lora_B.weight"),
}
_SUFFIX = re.compile(r"\.(" + "|".join(re.escape(s) for f in FORMATS.values() for s in f) + r"|alpha|dora_scale)$")


class LoRAError(ValueError):
    """A LoRA file that does not fit the model: names the file and what to do."""


@dataclass(frozen=True)
class Target:
    """Where a layer's ΔW goes: a parameter, or a block of rows of one (the q, k, v parts of a fused projection)."""
    module: nn.Module
    param: str
    rows: slice | None = None

    @property
    def weight(self) -> Tensor:
        w = getattr(self.module, self.param)
        return w if self.rows is None else w[self.rows]


@dataclass
class LoRA:
    """The tensors of one file, grouped by layer: layer key (the file's name of the layer) -> suffix -> tensor."""
    name: str
    layers: dict[str, dict[str, Tensor]]
    source: str = ""
    hash: str = ""

    @classmethod
    def read(cls, path: str | Path) -> LoRA:
        from ldm.models.checkpoint import read_state_dict  # safetensors, or a .pt read without unpickling code

        path = Path(path)
        if not path.is_file():
            raise LoRAError(f"LoRA file not found: {path}")
        tensors, _ = read_state_dict(path)
        lora = cls.from_tensors(tensors, name=path.stem, source=str(path))
        lora.hash = short_hash(path)
        return lora

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], name: str = "lora", source: str = "") -> LoRA:
        layers: dict[str, dict[str, Tensor]] = {}
        unknown = []
        for key, value in tensors.items():
            match = _SUFFIX.search(key)
            if match is None:
                unknown.append(key)
                continue
            layers.setdefault(key[:match.start()], {})[match.group(1)] = value
        if unknown:
            raise LoRAError(f"{source or name}: not LoRA tensors (kohya, LyCORIS LoHa/LoKr or PEFT): "
                            f"{_listed(unknown)}")
        if not layers:
            raise LoRAError(f"{source or name} holds no LoRA layers")
        return cls(name, layers, source or name)

    def format_of(self, key: str) -> str:
        parts = self.layers[key]
        for fmt, suffixes in FORMATS.items():
            if any(s in parts for s in suffixes):
                return fmt
        raise LoRAError(f"{self.source}: layer {key} has only {sorted(parts)}; no LoRA weights")

    def size(self, key: str) -> tuple[int, int]:
        """(rows, columns) of the layer's ΔW as a matrix, from its tensors' shapes alone."""
        parts = self.layers[key]
        fmt = self.format_of(key)
        if fmt in ("lora", "peft"):
            down, up = ((parts["lora_down.weight"], parts["lora_up.weight"]) if fmt == "lora"
                        else (parts["lora_A.weight"], parts["lora_B.weight"]))
            return up.shape[0], down[0].numel()
        if fmt == "loha":
            return parts["hada_w1_a"].shape[0], parts["hada_w1_b"].shape[1]
        w1 = ((parts["lokr_w1"].shape[0], parts["lokr_w1"].shape[1]) if "lokr_w1" in parts
              else (parts["lokr_w1_a"].shape[0], parts["lokr_w1_b"].shape[1]))
        w2 = ((parts["lokr_w2"].shape[0], parts["lokr_w2"][0].numel()) if "lokr_w2" in parts
              else (parts["lokr_w2_a"].shape[0], parts["lokr_w2_b"][0].numel()))
        return w1[0] * w2[0], w1[1] * w2[1]

    def check(self, key: str, shape: torch.Size) -> None:
        """LoRAError unless ldm reads the layer's format and its ΔW fits a weight of `shape`."""
        self._readable(key)
        rows, columns = self.size(key)
        if rows != shape[0] or rows * columns != torch.Size(shape).numel():
            raise LoRAError(f"{self.source}: layer {key} has a {rows}x{columns} update for a weight of shape "
                            f"{tuple(shape)}; is the LoRA for another model?")

    def _readable(self, key: str) -> None:
        if any(part in self.layers[key] for part in ("dora_scale", "lora_mid.weight", "hada_t1", "lokr_t2")):
            raise LoRAError(f"{self.source}: layer {key} is a DoRA or Tucker-decomposed layer, which ldm does not "
                            "read yet")

    def add_to(self, key: str, weights: Tensor, strength: float, out: Tensor | None = None) -> Tensor:
        """weights + strength · ΔW, into `out` (default: in place). An fp32 weight takes a low-rank update as one
        matrix product accumulated into it (no ΔW is made); others get ΔW computed in fp32, added, and rounded
        once. Returns `out`."""
        out = weights if out is None else out
        parts = self.layers[key]
        fmt = self.format_of(key)
        if fmt in ("lora", "peft") and weights.dtype == torch.float32 and weights.is_contiguous() \
                and not any(k in parts for k in ("dora_scale", "lora_mid.weight")):
            down, up = ((parts["lora_down.weight"], parts["lora_up.weight"]) if fmt == "lora"
                        else (parts["lora_A.weight"], parts["lora_B.weight"]))
            rank = down.shape[0]
            alpha = parts.get("alpha")
            scale = 1.0 if alpha is None else float(alpha) / rank
            device = weights.device
            torch.addmm(weights.view(weights.shape[0], -1), up.reshape(up.shape[0], rank).to(device, torch.float32),
                        down.reshape(rank, -1).to(device, torch.float32), alpha=scale * strength,
                        out=out.view(out.shape[0], -1))
            return out
        delta = self.delta(key, weights.shape).to(weights.device)
        if weights.dtype == torch.float32:
            return torch.add(weights, delta, alpha=strength, out=out)
        return out.copy_((weights.float() + strength * delta).to(weights.dtype))

    def delta(self, key: str, shape: torch.Size) -> Tensor:
        """ΔW of one layer in fp32, of the given weight shape."""
        self._readable(key)
        parts = {k: v.float() for k, v in self.layers[key].items()}
        fmt = self.format_of(key)
        alpha = parts.get("alpha")
        if fmt in ("lora", "peft"):
            down, up = ((parts["lora_down.weight"], parts["lora_up.weight"]) if fmt == "lora"
                        else (parts["lora_A.weight"], parts["lora_B.weight"]))
            rank = down.shape[0]
            delta = up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)
            scale = 1.0 if alpha is None else float(alpha) / rank
        elif fmt == "loha":
            w1 = parts["hada_w1_a"] @ parts["hada_w1_b"]
            w2 = parts["hada_w2_a"] @ parts["hada_w2_b"]
            delta = w1 * w2
            scale = 1.0 if alpha is None else float(alpha) / parts["hada_w1_b"].shape[0]
        else:
            w1 = parts["lokr_w1"] if "lokr_w1" in parts else parts["lokr_w1_a"] @ parts["lokr_w1_b"]
            w2 = parts["lokr_w2"] if "lokr_w2" in parts else parts["lokr_w2_a"] @ parts["lokr_w2_b"]
            rank = (parts["lokr_w1_b"].shape[0] if "lokr_w1_b" in parts
                    else parts["lokr_w2_b"].shape[0] if "lokr_w2_b" in parts else None)
            w2 = w2.reshape(w2.shape[0], w2.shape[1], *([1] * (len(shape) - 2))) if w2.ndim == 2 else w2
            w1 = w1.reshape(w1.shape[0], w1.shape[1], *([1] * (len(shape) - 2)))
            delta = torch.kron(w1, w2)
            scale = 1.0 if alpha is None or rank is None else float(alpha) / rank
        if delta.numel() != torch.Size(shape).numel():
            raise LoRAError(f"{self.source}: layer {key} has a {tuple(delta.shape)} update for a weight of shape "
                            f"{tuple(shape)}; is the LoRA for another model?")
        return delta.reshape(shape) * scale


# the width of the text conditioning, which tells the base models apart: attn2.to_k's input features
CONTEXT_WIDTHS = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL", 1280: "the SDXL refiner"}
SDXL_PREFIXES = ("lora_te1_", "lora_te2_", "text_encoder_2.")


def base_model(lora: LoRA) -> str | None:
    """The base model a LoRA was trained for, where its keys or shapes tell: "SD 1.x", "SD 2.x", "SDXL" or None."""
    if any(key.startswith(SDXL_PREFIXES) for key in lora.layers):
        return "SDXL"
    for key, parts in lora.layers.items():
        if key.replace(".", "_").endswith(("attn2_to_k", "attn2_to_v")):
            down = parts.get("lora_down.weight", parts.get("lora_A.weight"))
            if down is not None:
                return CONTEXT_WIDTHS.get(down.shape[1])
    return None


def targets(sd) -> dict[str, Target]:
    """Every name a LoRA file may give a layer of `sd` -> where its ΔW goes."""
    out: dict[str, Target] = {}
    unet = sd.unet
    layers = {name: m for name, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    for diffusers, compvis in unet_names(sd.config.unet, list(layers)).items():
        target = Target(layers[compvis], "weight")
        out[KOHYA_UNET + diffusers.replace(".", "_")] = target
        out[PEFT_UNET + diffusers] = target
    for compvis, m in layers.items():
        out.setdefault(KOHYA_UNET + compvis.replace(".", "_"), Target(m, "weight"))
    if sd.config.text_2 is not None:
        encoders = [(kohya, peft, encoder) for (kohya, peft), encoder in zip(SDXL_TEXT, sd.text_encoder.embedders)]
    else:
        encoder = sd.text_encoder.embedders[0] if sd.config.sdxl else sd.text_encoder
        encoders = [(KOHYA_TEXT, PEFT_TEXT, encoder)]
    for kohya, peft, encoder in encoders:
        for name, target in _text_layers(encoder).items():
            out[kohya + name.replace(".", "_")] = target
            out[peft + name] = target
    return out


def _text_layers(encoder: nn.Module) -> dict[str, Target]:
    """A text encoder's layers under the Hugging Face CLIP names that LoRA files use (`text_model.encoder.layers.N.
    self_attn.q_proj`, `mlp.fc1`, ...); for open_clip (SD2, SDXL's bigG) the q, k and v parts of its fused input
    projection."""
    out = {}
    if hasattr(encoder, "transformer"):  # SD1: Hugging Face CLIP names already
        for name, m in encoder.transformer.named_modules():
            if isinstance(m, nn.Linear):
                out[name] = Target(m, "weight")
        return out
    for i, block in enumerate(encoder.model.transformer.resblocks):
        prefix = f"text_model.encoder.layers.{i}"
        width = block.attn.embed_dim
        for j, part in enumerate("qkv"):
            rows = slice(j * width, (j + 1) * width)
            out[f"{prefix}.self_attn.{part}_proj"] = Target(block.attn, "in_proj_weight", rows)
        out[f"{prefix}.self_attn.out_proj"] = Target(block.attn.out_proj, "weight")
        out[f"{prefix}.mlp.fc1"] = Target(block.mlp.c_fc, "weight")
        out[f"{prefix}.mlp.fc2"] = Target(block.mlp.c_proj, "weight")
    return out


# a parameter of a model: (id of its module, its name there)
Owner = tuple[int, str]


@dataclass
class Merged:
    """LoRAs merged into a model; `restore()` gives it its original weights back, bit for bit: the merged weights
    are new tensors, and restoring hands each parameter its original tensor again (nothing is copied). The merged
    tensors then go to `spare`, for a later merge to write into."""
    originals: dict[Owner, tuple[nn.Module, str, Tensor]] = field(default_factory=dict)
    loras: list[tuple[str, float]] = field(default_factory=list)
    spare: dict[Owner, Tensor] = field(default_factory=dict)

    @torch.no_grad()
    def restore(self) -> None:
        for owner, (module, param, original) in self.originals.items():
            self.spare[owner] = getattr(module, param).data  # a packed layer (ldm.accel) unpacks it here
            getattr(module, param).data = original
        self.originals.clear()
        self.loras.clear()


@torch.no_grad()
def merge(sd, loras: list[tuple[LoRA, float]], spare: dict[Owner, Tensor] | None = None) -> Merged:
    """Adds weight · ΔW of every layer of every LoRA to `sd`'s weights. All files are checked before any weight
    changes: a key that names no layer of this model, or a shape that does not fit, raises LoRAError. A merged
    weight is written into the tensor `spare` holds for it (taken out of `spare`), if any fits; restoring puts the
    merged tensors back into `spare`."""
    plan = _plan(sd, loras)
    merged = Merged(loras=[(lora.name, weight) for lora, weight in loras], spare={} if spare is None else spare)
    try:
        for target, lora, key, weight in plan:
            param = getattr(target.module, target.param)
            owner = (id(target.module), target.param)
            if owner not in merged.originals:  # the first update of a weight writes the merged weight anew
                original = param.data  # a packed layer (ldm.accel) gets its plain weight back here
                new = _fresh_or_spare(original, merged.spare.pop(owner, None))
                if target.rows is not None:  # part of the weight: the rest as it was
                    new.copy_(original)
                    lora.add_to(key, original[target.rows], weight, out=new[target.rows])
                else:
                    lora.add_to(key, original, weight, out=new)
                param.data = new
                merged.originals[owner] = (target.module, target.param, original)
            else:
                rows = param.data if target.rows is None else param.data[target.rows]
                lora.add_to(key, rows, weight)
    except BaseException:  # interrupted or out of memory: the model as it was
        merged.restore()
        raise
    return merged


def _plan(sd, loras: list[tuple[LoRA, float]]) -> list[tuple[Target, LoRA, str, float]]:
    """(target, lora, layer key, weight) for every layer of every LoRA, in order; raises LoRAError for a file that
    does not fit `sd` (another base model, a key that names no layer, a shape that does not fit, a layer ldm does not
    read)."""
    table = targets(sd)
    plan = []
    cfg = sd.config
    model = ("SDXL" if cfg.text_2 is not None else "the SDXL refiner") if cfg.sdxl else \
        CONTEXT_WIDTHS.get(cfg.unet.context_dim)
    for lora, weight in loras:
        base = base_model(lora)
        if base is not None and model is not None and base != model:
            raise LoRAError(f"{lora.source} is a LoRA for {base}; this model ({sd.config.name}) is {model}")
        missing = [key for key in lora.layers if key not in table]
        if missing:
            raise LoRAError(f"{lora.source}: {len(missing)} of its {len(lora.layers)} layers match no layer of this "
                            f"{sd.config.name} model ({_kind(missing)}): {_listed(missing)}")
        for key in lora.layers:
            lora.check(key, table[key].weight.shape)
            plan.append((table[key], lora, key, weight))
    return plan


def _fresh_or_spare(original: Tensor, spare: Tensor | None) -> Tensor:
    """A tensor for the merged weight of `original`: `spare` if it has its shape, dtype and device, else a new one."""
    if spare is not None and (spare.shape, spare.dtype, spare.device) == (original.shape, original.dtype,
                                                                          original.device) and spare.is_contiguous():
        return spare
    return torch.empty_like(original, memory_format=torch.contiguous_format)


def _kind(keys: list[str]) -> str:
    """What unmatched keys suggest about the LoRA's model."""
    if any("input_blocks" in k or "down_blocks" in k for k in keys):
        if any("transformer_blocks_1" in k or "transformer_blocks.1" in k for k in keys):
            return "SDXL-shaped keys (deeper transformers)"
    if any(k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) for k in keys):
        return "SDXL keys (two text encoders)"
    return "names from another architecture or format"


def _listed(keys: list[str], most: int = 8) -> str:
    shown = ", ".join(sorted(keys)[:most])
    return shown + (f", ... ({len(keys) - most} more)" if len(keys) > most else "")


class Adapters:
    """The LoRAs merged into one model, shared by the runs that use them: runs asking for the same LoRAs (or none)
    share the model; a run asking for others waits until the model is free, then merges them. When the last run
    using a set of LoRAs ends, the model gets its original weights back, so that between runs it is the model its
    owner loaded; the merged tensors stay as `spare`, which the next merge writes into (see the module's "Memory").
    `using(sd, loras)` is how a run takes it. After `fuse`, `fused` is the key of the LoRAs fused for good."""

    def __init__(self):
        self.condition = threading.Condition()
        self.key: tuple = ()
        self.users = 0
        self.merged: Merged | None = None
        self.spare: dict[Owner, Tensor] = {}
        self.fused: tuple | None = None

    @classmethod
    def of(cls, sd) -> Adapters:
        with _ATTACH:
            state = _STATES.get(sd)
            if state is None:
                state = _STATES[sd] = cls()
            return state


def release_spare(sd) -> int:
    """Frees the spare merged weights kept for `sd`'s next LoRA merge; returns their bytes (0 if none)."""
    state = _STATES.get(sd)
    if state is None:
        return 0
    with state.condition:
        freed = sum(t.numel() * t.element_size() for t in state.spare.values())
        state.spare.clear()
    return freed


# each model's Adapters, kept beside the model rather than in it (a Condition cannot be copied or pickled with it)
_STATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_ATTACH = threading.Lock()


def _key(loras: list[tuple[LoRA, float]]) -> tuple:
    return tuple((lora.source, weight) for lora, weight in loras)


HALF_FUSED = (("a fuse stopped half-way", 0.0),)  # the key of a model whose fuse was interrupted


def _fused_error(fused: tuple) -> LoRAError:
    if fused == HALF_FUSED:
        return LoRAError("a LoRA fuse into this model stopped half-way, leaving its weights half merged; load the "
                         "model again")
    names = ", ".join(f"{Path(source).name}:{weight:g}" for source, weight in fused)
    return LoRAError(f"this model has {names} fused into its weights for good (ldm.adapters.lora.fuse); load it "
                     "again to use other LoRAs")


@torch.no_grad()
def fuse(sd, loras: list[tuple[LoRA, float]]) -> None:
    """Merges `loras` into `sd` for good, in place: no original weight is kept, so no merged weight is written
    anew (a 150 MB LoRA of every attention and feed-forward layer of SD 1.5 in fp32: 1.4 GiB of memory less than
    `merge`, and the time of writing it; see the module's "Memory"). The weights are bit for bit those `merge`
    gives. For a process that ends with its runs, such as `ldm txt2img`: afterwards `using` exactly these LoRAs
    costs nothing, and any other set raises LoRAError, since the original weights are gone.

    The files are checked as for `merge`, before any weight changes. A fuse stopped half-way (interrupted, out of
    memory) cannot be undone: the model is half merged, and every later `using` or `fuse` refuses it."""
    if not loras:
        return
    plan = _plan(sd, loras)
    state = Adapters.of(sd)
    with state.condition:
        state.condition.wait_for(lambda: state.users == 0)
        if state.fused is not None:
            raise _fused_error(state.fused)
        state.spare.clear()
        state.fused = HALF_FUSED
        for target, lora, key, weight in plan:
            data = getattr(target.module, target.param).data  # a packed layer (ldm.accel) unpacks here
            lora.add_to(key, data if target.rows is None else data[target.rows], weight)
        state.fused = state.key = _key(loras)


@contextlib.contextmanager
def using(sd, loras: list[tuple[LoRA, float]]) -> Iterator[None]:
    """`sd` with exactly these LoRAs merged for the duration of the block (see `Adapters`); on a model with LoRAs
    fused (`fuse`), only those."""
    state = Adapters.of(sd)
    key = _key(loras)
    with state.condition:
        state.condition.wait_for(lambda: state.users == 0 or state.key == key)
        if state.fused is not None and state.fused != key:
            raise _fused_error(state.fused)
        if state.users == 0 and state.key != key:
            if loras:
                state.merged = merge(sd, loras, state.spare)  # raises before changing anything on a bad file
            state.key = key
        state.users += 1
    try:
        yield
    finally:
        with state.condition:
            state.users -= 1
            if state.users == 0:
                if state.merged is not None:
                    state.merged.restore()
                state.merged = None
                if state.fused is None:
                    state.key = ()
                state.condition.notify_all()
