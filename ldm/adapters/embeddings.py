"""Textual inversion embeddings (Gal et al. 2022): learned token vectors that a word of the prompt stands for.

Files: AUTOMATIC1111's `.pt` (`string_to_param: {"*": (n, D)}`, read through the restricted unpickler, never
running code) and `.safetensors` (`emb_params`), and diffusers' `learned_embeds` (one tensor, (D,) or (n, D),
under the token's name). The file's name (without its extension) is the word that calls it in a prompt; a prompt's
words are looked up in the request's embeddings folder. Its n vectors take the place of n tokens in the prompt's
chunk (a chunk too full to hold them ends there, as in A1111), and the text encoder reads them instead of the
vocabulary's vectors at those places. D must be the text encoder's width (768 for SD1, 1024 for SD2). SDXL files
hold vectors for both of its text encoders (`clip_l` (n, 768), `clip_g` (n, 1280)): each encoder reads its own,
and the refiner, which has only the bigG, the `clip_g` ones.

The vectors reach the text encoder through a forward hook on its token embedding, which reads what to place from
a context variable set for the one encoding call (`placed`): other threads' calls see nothing of it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ldm.adapters.hashes import file_hash

EXTENSIONS = (".pt", ".safetensors", ".bin")
HOOK_ATTR = "_ldm_embedding_hook"
# (row, first position, vectors) of the token-embedding output to replace in the encoding call in progress
_SLOTS: ContextVar[tuple[tuple[int, int, Tensor], ...]] = ContextVar("ldm_embedding_slots", default=())
_INSTALL = threading.Lock()


class EmbeddingError(ValueError):
    """An embedding file that cannot be used with this model."""


@dataclass(frozen=True)
class Embedding:
    name: str
    vectors: Tensor  # (n, D); an SDXL file's: clip_l's then clip_g's side by side, (n, 768 + 1280)
    source: str
    hash: str = ""  # A1111's "TI hashes": the first 12 hex digits of the file's sha256
    clip_l_width: int | None = None  # SDXL files: where clip_g's columns start

    @classmethod
    def read(cls, path: str | Path) -> Embedding:
        from ldm.models.checkpoint import read_pickle, read_state_dict, sniff_format

        path = Path(path)
        if sniff_format(path) == "safetensors":
            data = read_state_dict(path)[0]
        else:
            data = read_pickle(path)
        vectors, clip_l_width = _vectors(data, path)
        return cls(path.stem, vectors, str(path), file_hash(path), clip_l_width)

    def named(self, name: str) -> Embedding:
        """The same vectors under another name (a renamed file found by its hash keeps the prompt's word)."""
        return dataclasses.replace(self, name=name)


def _vectors(data, path: Path) -> tuple[Tensor, int | None]:
    if not isinstance(data, dict):
        raise EmbeddingError(f"{path} holds a {type(data).__name__}, not an embedding")
    if "clip_l" in data or "clip_g" in data:  # SDXL
        parts = [data.get("clip_l"), data.get("clip_g")]
        if not all(isinstance(p, Tensor) and p.ndim == 2 for p in parts) or parts[0].shape[0] != parts[1].shape[0]:
            raise EmbeddingError(f"{path} is not an SDXL embedding: it needs clip_l (n, 768) and clip_g (n, 1280), "
                                 f"got {sorted(map(str, data))[:8]}")
        return torch.cat([p.detach().float() for p in parts], dim=1), parts[0].shape[1]
    if "string_to_param" in data:  # A1111 .pt
        params = data["string_to_param"]
        tensors = list(params.values()) if isinstance(params, dict) else []
    elif "emb_params" in data:  # A1111 .safetensors
        tensors = [data["emb_params"]]
    else:  # diffusers: {token: tensor}
        tensors = [v for v in data.values() if isinstance(v, Tensor)]
    if len(tensors) != 1 or not isinstance(tensors[0], Tensor):
        raise EmbeddingError(f"{path} is not a textual inversion embedding (A1111 string_to_param / emb_params, or "
                             f"diffusers' learned_embeds); keys: {sorted(map(str, data))[:8]}")
    vectors = tensors[0].detach().float()
    return (vectors[None] if vectors.ndim == 1 else vectors.reshape(-1, vectors.shape[-1])), None


def find(folder: str | Path | None, words: set[str], hashes: tuple[tuple[str, str], ...] = ()) -> dict[str, Path]:
    """The embedding files in `folder` whose names are among `words`; and for a word of `hashes` (name, A1111 hash:
    a replayed image's "TI hashes") that no file is named, the file with that hash."""
    if folder is None:
        return {}
    folder = Path(folder)
    if not folder.is_dir():
        raise EmbeddingError(f"embeddings folder not found: {folder}")
    files = [p for p in sorted(folder.iterdir()) if p.suffix in EXTENSIONS and p.is_file()]
    found = {p.stem: p for p in files if p.stem in words}
    wanted = {h: name for name, h in hashes if name in words and name not in found}
    for path in files if wanted else []:
        name = wanted.get(file_hash(path))
        if name is not None:
            found[name] = path
    return found


def for_model(embedding: Embedding, cfg) -> Embedding:
    """The embedding as `cfg`'s text side reads it (the refiner: an SDXL file's clip_g vectors), or EmbeddingError
    when its vectors are for another model."""
    widths = [t.width for t in cfg.text_encoders]
    if embedding.clip_l_width is not None and cfg.sdxl and cfg.text_2 is None:  # the SDXL refiner
        embedding = dataclasses.replace(embedding, vectors=embedding.vectors[:, embedding.clip_l_width:],
                                        clip_l_width=None)
    sdxl_file = embedding.clip_l_width is not None
    if embedding.vectors.shape[-1] != sum(widths) or sdxl_file != (len(widths) == 2):
        what = "an SDXL embedding (clip_l, clip_g)" if sdxl_file else \
            f"{embedding.vectors.shape[-1]}-wide vectors"
        raise EmbeddingError(f"{embedding.source} has {what}, for another model; this {cfg.name} model's text "
                             f"encoder{'s take' if len(widths) == 2 else ' takes'} {' + '.join(map(str, widths))}")
    return embedding


def token_embeddings(sd) -> list[nn.Embedding]:
    """The token embedding of each text encoder, in the order of the columns of the embeddings' vectors."""
    encoders = sd.text_encoder.embedders if sd.config.sdxl else [sd.text_encoder]
    return [e.transformer.text_model.embeddings.token_embedding if hasattr(e, "transformer")
            else e.model.token_embedding for e in encoders]


def install(sd) -> None:
    """Puts the hook that places embeddings on `sd`'s token embeddings (once per model); each reads its columns of
    the vectors."""
    start = 0
    for module in token_embeddings(sd):
        width = module.embedding_dim
        with _INSTALL:
            if HOOK_ATTR not in module.__dict__:
                module.register_forward_hook(_place)
                module.__dict__[HOOK_ATTR] = (start, start + width)
        start += width


def _place(module: nn.Module, inputs, output: Tensor) -> Tensor:
    slots = _SLOTS.get()
    if not slots:
        return output
    lo, hi = module.__dict__[HOOK_ATTR]
    output = output.clone()
    for row, start, vectors in slots:
        output[row, start:start + vectors.shape[0]] = vectors[:, lo:hi].to(output.device, output.dtype)
    return output


@contextlib.contextmanager
def placed(slots: tuple[tuple[int, int, Tensor], ...]) -> Iterator[None]:
    """Within the block (in this thread or task), the token embedding's output (B, T, D) has vectors[i] at row
    `row`, positions start + i, for each (row, start, vectors) of `slots`."""
    token = _SLOTS.set(slots)
    try:
        yield
    finally:
        _SLOTS.reset(token)
