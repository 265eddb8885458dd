"""Prompts as AUTOMATIC1111 reads them: emphasis, `BREAK` and no 77-token limit.

Emphasis. `(text)` multiplies the attention weight of its tokens by 1.1, `[text]` divides it by 1.1, and they nest:
`((text))` is 1.21. `(text:1.5)` sets the factor 1.5 (also inside other brackets, which multiply it). `\\(`, `\\)`,
`\\[`, `\\]` and `\\\\` are the literal characters (another backslash is dropped). Malformed text never fails, and reads
as A1111 reads it: a bracket left open applies to the end of the prompt, and a closing bracket with none open, or
a `:` outside `(text:weight)`, is text.

Long prompts. The tokens are cut into chunks of 75 (CLIP's 77 minus its start and end tokens); each chunk is
encoded on its own, with its own start and end tokens and padding, and the encodings are concatenated along the
sequence axis: a prompt of 76 to 150 tokens conditions the UNet with 154 context vectors. When a chunk fills up
and its last comma is at most 20 tokens back, the chunk ends after that comma and the rest moves to the next
chunk, so that a phrase is not cut in two. `BREAK` (in capitals, a word of its own) ends the chunk at once. A
prompt and its negative prompt are padded to the same number of chunks with chunks of the empty prompt.

Weights. Each token's vector is multiplied by its factor, then the whole prompt's encoding is rescaled so that its
mean is the mean it had before (A1111's "original" emphasis; A1111 takes that mean over the batch of prompts it
encodes together, which is the same when the batch repeats one prompt, ldm per prompt so that an image does not
depend on its batch). SDXL's two text encoders are weighted each on its own, as A1111 does. A prompt without
emphasis gives exactly the encoding of the plain tokenizer. SDXL's pooled embedding is the first chunk's, unweighted.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ldm.adapters.embeddings import Embedding, EmbeddingError, install, placed

CHUNK_TOKENS = 75  # tokens per chunk, between the start and end tokens
COMMA_BACKTRACK = 20  # a full chunk ends at its last comma if that is at most this many tokens back
EMPHASIS = 1.1  # the factor of one pair of round brackets
BREAK = "BREAK"

# the pieces of a prompt, in order: escapes, brackets, an explicit weight closing a round bracket, text, a lone colon
_PIECE = re.compile(r"""
    \\[()\[\]\\]                        # an escaped bracket or backslash
  | \\                                  # a lone backslash: text
  | \(|\[                               # opening brackets
  | :\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\)  # ":1.5)": the weight of the round bracket it closes
  | \)|\]                               # closing brackets
  | [^\\()\[\]:]+                       # text
  | :                                   # a colon that is not a weight
""", re.VERBOSE)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


def parse_emphasis(prompt: str) -> list[tuple[str, float]]:
    """The prompt as (text, weight) pieces, neighbours of equal weight merged; `BREAK` is the piece (BREAK, -1)."""
    pieces: list[list] = []
    round_open: list[int] = []  # indices into `pieces` where each open bracket starts
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for match in _PIECE.finditer(prompt):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            pieces.append([token[1:], 1.0])
        elif token == "(":
            round_open.append(len(pieces))
        elif token == "[":
            square_open.append(len(pieces))
        elif weight is not None and round_open:
            scale(round_open.pop(), float(weight))
        elif token == ")" and round_open:
            scale(round_open.pop(), EMPHASIS)
        elif token == "]" and square_open:
            scale(square_open.pop(), 1 / EMPHASIS)
        else:  # text, or a closing bracket with none open
            for i, part in enumerate(_BREAK.split(token)):
                if i:
                    pieces.append([BREAK, -1.0])
                if part:
                    pieces.append([part, 1.0])
    for start in round_open:  # brackets left open apply to the end
        scale(start, EMPHASIS)
    for start in square_open:
        scale(start, 1 / EMPHASIS)
    merged: list[list] = []
    for text, weight in pieces:
        if merged and merged[-1][1] == weight and text != BREAK and merged[-1][0] != BREAK:
            merged[-1][0] += text
        else:
            merged.append([text, weight])
    return [(text, weight) for text, weight in merged] or [("", 1.0)]


@dataclass
class Chunk:
    """Up to CHUNK_TOKENS token ids and their weights, before the start and end tokens are added; `slots`: the
    (position, vectors) of the embeddings placed in it."""
    ids: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    slots: list[tuple[int, Tensor]] = field(default_factory=list)


def chunk_tokens(pieces: list[tuple[str | Embedding, float]], encode, comma: int) -> list[Chunk]:
    """The (text or embedding, weight) pieces as chunks of token ids (`encode(text)`: BPE ids; `comma`: the id of
    ","). An embedding's n vectors take n places (id 0), in the next chunk if this one cannot hold them."""
    chunks: list[Chunk] = []
    chunk = Chunk()
    last_comma = -1

    def close() -> None:
        nonlocal chunk, last_comma
        chunks.append(chunk)
        chunk, last_comma = Chunk(), -1

    for text, weight in pieces:
        if weight == -1 and text == BREAK:
            close()
            continue
        if isinstance(text, Embedding):
            n = text.vectors.shape[0]
            if n > CHUNK_TOKENS:
                raise EmbeddingError(f"{text.source} has {n} vectors; a chunk holds {CHUNK_TOKENS}")
            if len(chunk.ids) + n > CHUNK_TOKENS:
                close()
            chunk.slots.append((len(chunk.ids), text.vectors))
            chunk.ids += [0] * n
            chunk.weights += [weight] * n
            continue
        for token in encode(text):
            if token == comma:
                last_comma = len(chunk.ids)
            elif len(chunk.ids) == CHUNK_TOKENS and last_comma != -1 and \
                    len(chunk.ids) - last_comma <= COMMA_BACKTRACK:
                cut = last_comma + 1
                rest = Chunk(chunk.ids[cut:], chunk.weights[cut:], [(i - cut, v) for i, v in chunk.slots if i >= cut])
                chunk.ids, chunk.weights = chunk.ids[:cut], chunk.weights[:cut]
                chunk.slots = [(i, v) for i, v in chunk.slots if i < cut]
                close()
                chunk = rest
            if len(chunk.ids) == CHUNK_TOKENS:
                close()
            chunk.ids.append(token)
            chunk.weights.append(weight)
    if chunk.ids or not chunks:
        close()
    return chunks


@dataclass
class PromptTokens:
    """A prompt ready for the text encoder: (chunks, 77) token ids and their (chunks, 77) weights, and the
    (chunk, position, vectors) of its embeddings."""
    ids: Tensor
    weights: Tensor
    slots: tuple[tuple[int, int, Tensor], ...] = ()

    @property
    def plain(self) -> bool:
        return bool((self.weights == 1.0).all())


def with_embeddings(pieces: list[tuple[str, float]], embeddings: dict[str, Embedding]) -> list:
    """The pieces with each word that names an embedding made a piece of its own, the Embedding in its place."""
    if not embeddings:
        return pieces
    names = re.compile(r"(?<![\w-])(" + "|".join(map(re.escape, sorted(embeddings, key=len, reverse=True)))
                       + r")(?![\w-])")
    out: list = []
    for text, weight in pieces:
        if text == BREAK and weight == -1:
            out.append((text, weight))
            continue
        for i, part in enumerate(names.split(text)):
            if part:
                out.append((embeddings[part] if i % 2 else part, weight))
    return out


def words(prompt: str) -> set[str]:
    """The words of a prompt that could name an embedding file."""
    return set(re.findall(r"[\w-]+", prompt))


def tokenize(tokenizer, prompt: str, embeddings: dict[str, Embedding] | None = None) -> PromptTokens:
    """`prompt` as chunks of `tokenizer`'s layout: start token, ids, end token, then padding (the end token for
    SD1, 0 for SD2's open_clip), each chunk max_length long."""
    pieces = with_embeddings(parse_emphasis(prompt), embeddings or {})
    comma = tokenizer.encode(",")[0]
    rows, weights, slots = [], [], []
    for row, chunk in enumerate(chunk_tokens(pieces, tokenizer.encode, comma)):
        pad = tokenizer.max_length - 2 - len(chunk.ids)
        rows.append([tokenizer.start_token, *chunk.ids, tokenizer.end_token] + [tokenizer.pad_token] * pad)
        weights.append([1.0, *chunk.weights, 1.0] + [1.0] * pad)
        slots += [(row, 1 + position, vectors) for position, vectors in chunk.slots]
    return PromptTokens(torch.tensor(rows, dtype=torch.long), torch.tensor(weights, dtype=torch.float32),
                        tuple(slots))


def empty_chunk(tokenizer) -> PromptTokens:
    return tokenize(tokenizer, "")


def encode(sd, prompts: list[str], clip_skip: int = 1, chunks: int | None = None,
           embeddings: dict[str, Embedding] | None = None) -> Tensor:
    """Prompts -> conditioning (B, 77 * k, D), k the most chunks of any prompt (or `chunks`, if more); shorter
    prompts are padded with chunks of the empty prompt. Each distinct prompt is encoded once. `embeddings`: the
    textual inversions that words of the prompts name."""
    return encode_with_pooled(sd, prompts, clip_skip, chunks, embeddings)[0]


def encode_with_pooled(sd, prompts: list[str], clip_skip: int = 1, chunks: int | None = None,
                       embeddings: dict[str, Embedding] | None = None) -> tuple[Tensor, Tensor | None]:
    """`encode`, and for SDXL each prompt's pooled embedding (B, P): its first chunk's, without emphasis, as A1111
    takes it (None for SD 1.x/2.x)."""
    tokens = {p: tokenize(sd.tokenizer, p, embeddings) for p in dict.fromkeys(prompts)}
    k = max([chunks or 1, *(t.ids.shape[0] for t in tokens.values())])
    encoded = {p: _encode_one(sd, t, clip_skip) for p, t in tokens.items()}
    pad = None
    out, pooled = [], []
    for p in prompts:
        z, first = encoded[p]
        if z.shape[0] < k:
            if pad is None:
                pad = _encode_one(sd, empty_chunk(sd.tokenizer), clip_skip)[0]
            z = torch.cat([z, pad.expand(k - z.shape[0], *pad.shape[1:])])
        out.append(z.reshape(1, -1, z.shape[-1]))  # chunks one after the other along the sequence
        pooled.append(first)
    return torch.cat(out), None if pooled[0] is None else torch.cat(pooled)


def count_chunks(tokenizer, prompt: str) -> int:
    return tokenize(tokenizer, prompt).ids.shape[0]


def _encode_one(sd, tokens: PromptTokens, clip_skip: int) -> tuple[Tensor, Tensor | None]:
    """(chunks, 77, D): each chunk through the text encoder, weighted with the mean restored; and the first
    chunk's pooled embedding (1, P) (SDXL; else None)."""
    if tokens.slots:
        install(sd)
        with placed(tokens.slots):
            z, pooled = sd.encode_text(tokens.ids, clip_skip=clip_skip)
    else:
        z, pooled = sd.encode_text(tokens.ids, clip_skip=clip_skip)
    pooled = None if pooled is None else pooled[:1]
    if tokens.plain:
        return z, pooled
    # SDXL's two encoders are weighted each on its own (A1111 wraps each one), their widths side by side in z
    parts = z.float().split([t.width for t in sd.config.text_encoders], dim=-1)
    weights = tokens.weights.to(z.device)[..., None]
    return torch.cat([(part * weights) * (part.mean() / (part * weights).mean()) for part in parts],
                     dim=-1).to(z.dtype), pooled
