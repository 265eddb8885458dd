"""The CLIP byte-pair-encoding tokenizer, from scratch (OpenAI CLIP's `simple_tokenizer.py`).

Text is cleaned (HTML entities, NFC, whitespace, lowercase), split into words by a regex, each word's UTF-8
bytes are mapped to printable characters, and adjacent symbols are merged greedily by merge rank until no
ranked pair is left. The last symbol of a word carries `</w>`, so "cat" and "cat" inside "cats" differ.

The vocabulary is `bpe_simple_vocab_16e6.txt.gz`, the file OpenAI and open_clip ship. We read it from the
installed `open_clip` package without importing it: importing open_clip pulls in torchvision and timm.
"""
from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import unicodedata
import warnings
from collections.abc import Sequence
from pathlib import Path

import regex
import torch

VOCAB_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
START_TEXT = "<|startoftext|>"
END_TEXT = "<|endoftext|>"
NUM_MERGES = 49152 - 256 - 2  # CLIP's vocabulary is 49408 = 2 * 256 bytes + 48894 merges + 2 specials
WORD_END = "</w>"

# Special tokens first so they survive as one piece; then English contractions, letter runs, single digits
# (so "1990" is four tokens), and runs of anything else (punctuation, emoji).
WORD_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


class TokenTruncationWarning(UserWarning):
    """A prompt was longer than the text encoder's context and its tail was dropped."""


class CLIPTokenizer:
    """Prompts to CLIP token ids: `[start, ids..., end, pad, ...]` of length `max_length`.

    SD1 (OpenAI CLIP) pads with the end token 49407; SD2 (open_clip) pads with 0, so the caller passes
    `pad_token`. The vocabulary is read once per process and shared by all instances.
    """

    def __init__(self, pad_token: int = 49407, max_length: int = 77, vocab_path: str | Path | None = None):
        if max_length < 2:
            raise ValueError(f"max_length={max_length} leaves no room for the start and end tokens")
        self.pad_token = pad_token
        self.max_length = max_length
        self.bpe = _load_bpe(Path(vocab_path) if vocab_path is not None else find_vocab())
        self.start_token = self.bpe.encoder[START_TEXT]
        self.end_token = self.bpe.encoder[END_TEXT]

    def __call__(self, prompts: str | list[str]) -> torch.Tensor:
        """Token ids of shape (B, max_length), int64; warns once naming any text that was cut off."""
        if isinstance(prompts, str):
            prompts = [prompts]
        content_length = self.max_length - 2
        rows, dropped = [], []
        for prompt in prompts:
            ids = self.encode(prompt)
            if len(ids) > content_length:
                dropped.append(self.decode(ids[content_length:]))
                ids = ids[:content_length]
            row = [self.start_token, *ids, self.end_token]
            rows.append(row + [self.pad_token] * (self.max_length - len(row)))
        if dropped:
            warnings.warn(
                "The following part of your input was truncated because CLIP can only handle sequences up to "
                f"{self.max_length} tokens: " + ", ".join(repr(text) for text in dropped),
                TokenTruncationWarning,
                stacklevel=2,
            )
        return torch.tensor(rows, dtype=torch.long)

    def encode(self, text: str) -> list[int]:
        """BPE ids of `text`, without the start and end tokens."""
        return self.bpe.encode(text)

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of `ids`: lowercase, with one space after each word (special tokens are kept as text)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.bpe.decode(ids)


def find_vocab() -> Path:
    """Path of the BPE vocabulary shipped in the installed open_clip package (which is not imported)."""
    # find_spec on a top-level name locates the package without executing its __init__.
    spec = importlib.util.find_spec("open_clip")
    directories = spec.submodule_search_locations if spec is not None else None
    for directory in directories or []:
        candidate = Path(directory) / VOCAB_FILENAME
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"CLIP's BPE vocabulary {VOCAB_FILENAME} was not found. It ships with open_clip: install it with "
        "`pip install --no-deps open_clip_torch`, or pass vocab_path= to CLIPTokenizer."
    )


@functools.cache
def _load_bpe(path: Path) -> _BytePairEncoder:
    # Keyed by path, so every tokenizer in the process shares one vocabulary and one word cache.
    if not path.is_file():
        raise FileNotFoundError(
            f"CLIP BPE vocabulary not found at {path}. Pass the path of {VOCAB_FILENAME}, or install "
            "open_clip with `pip install --no-deps open_clip_torch` and leave vocab_path unset."
        )
    lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]  # line 0 is a version header
    return _BytePairEncoder(merges)


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """A reversible map of the 256 byte values to printable characters (GPT-2's table).

    Printable Latin-1 bytes map to themselves; the rest (controls, space) are shifted above 255 so that no
    symbol is whitespace or a control character, which the BPE merges file could not represent.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {byte: chr(byte) for byte in printable}
    shifted = 0
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(256 + shifted)
            shifted += 1
    return table


def clean_text(text: str) -> str:
    """CLIP's normalisation: HTML entities, NFC, collapsed whitespace, lowercase.

    CLIP runs ftfy.fix_text, which mends mojibake and NFC-normalises. We do only the NFC part, so as not to
    depend on ftfy; the two differ only on broken encodings such as "cafÃ©", which prompts rarely contain.
    """
    text = html.unescape(html.unescape(text))  # twice, as CLIP does, for doubly escaped "&amp;amp;"
    text = unicodedata.normalize("NFC", text)
    return " ".join(text.split()).lower()


class _BytePairEncoder:
    """The vocabulary and merge ranks of one vocabulary file, and the per-word BPE."""

    def __init__(self, merges: list[tuple[str, ...]]):
        symbols = list(bytes_to_unicode().values())
        tokens = symbols + [symbol + WORD_END for symbol in symbols] + ["".join(pair) for pair in merges]
        tokens += [START_TEXT, END_TEXT]
        self.encoder = {token: index for index, token in enumerate(tokens)}
        self.decoder = {index: token for token, index in self.encoder.items()}
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {char: byte for byte, char in self.byte_encoder.items()}
        # Prompts repeat words endlessly; bounded so a long-running server does not grow without limit.
        self.bpe = functools.lru_cache(maxsize=65536)(self._bpe)

    def encode(self, text: str) -> list[int]:
        ids = []
        for word in WORD_PATTERN.findall(clean_text(text)):
            symbols = "".join(self.byte_encoder[byte] for byte in word.encode("utf-8"))
            ids.extend(self.encoder[token] for token in self.bpe(symbols))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        text = "".join(self.decoder[index] for index in ids)
        raw = bytearray(self.byte_decoder[char] for char in text)
        return raw.decode("utf-8", errors="replace").replace(WORD_END, " ").strip()

    def _bpe(self, word: str) -> tuple[str, ...]:
        """Merge the symbols of one word, lowest-ranked pair first, until no ranked pair remains."""
        if word in (START_TEXT, END_TEXT):
            return (word,)
        parts = [*word[:-1], word[-1] + WORD_END]
        while len(parts) > 1:
            pairs = {(a, b) for a, b in zip(parts, parts[1:])}
            best = min(pairs, key=lambda pair: self.ranks.get(pair, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return tuple(parts)
