"""A1111 prompts: the emphasis parser on nesting, escapes and malformed text; 75-token chunks with the comma rule and
BREAK; weights applied with the mean restored, checked against the same arithmetic done by hand; a plain prompt
encodes bit for bit as the plain tokenizer does."""
from __future__ import annotations

import pytest
import torch

import ldm
from ldm.generation import prompts as P
from ldm.testing.reference import random_model


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """The tiny models run on one thread (see conftest.one_torch_thread)."""


@pytest.mark.parametrize("text, expected", [
    ("a cat", [("a cat", 1.0)]),
    ("(a) cat", [("a", 1.1), (" cat", 1.0)]),
    ("((a))", [("a", 1.1 * 1.1)]),
    ("[a]", [("a", 1 / 1.1)]),
    ("[[a]]", [("a", 1 / 1.1 / 1.1)]),
    ("(a:1.5) b", [("a", 1.5), (" b", 1.0)]),
    ("(a: 0.25 ) b", [("a", 0.25), (" b", 1.0)]),
    ("(a (b:2)) c", [("a ", 1.1), ("b", 2.2), (" c", 1.0)]),
    ("[a (b)]", [("a ", 1 / 1.1), ("b", 1.1 / 1.1)]),
    (r"\(x\) \[y\] \\", [("(x) [y] \\", 1.0)]),
    ("(open", [("open", 1.1)]),  # left open: to the end
    ("[open (both", [("open ", 1 / 1.1), ("both", 1.1 / 1.1)]),
    ("a ) b ] c", [("a ) b ] c", 1.0)]),  # closing brackets with none open: text
    ("a:b, c: d", [("a:b, c: d", 1.0)]),
    ("(a:1.2.3) x", [("a:1.2.3", 1.1), (" x", 1.0)]),  # not a number: text, and the bracket still closes
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("aBREAK b", [("aBREAK b", 1.0)]),  # only the word
    ("", [("", 1.0)]),
])
def test_emphasis_parser(text, expected):
    got = P.parse_emphasis(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], rel=1e-12)


@pytest.mark.parametrize("text", ["((((", "))))", "[(]", "(:)", "(a:)", ":::", "\\", "(a:1e5)", "BREAK BREAK",
                                  "(" * 200 + "x"])
def test_malformed_prompts_never_fail(text):
    pieces = P.parse_emphasis(text)
    assert pieces and all(isinstance(t, str) and w == w for t, w in pieces)


def _fake_encode(text: str) -> list[int]:
    """Token ids of a text: one per word, "," is 9 (stand-ins for BPE ids)."""
    return [9 if w == "," else 100 + len(w) for w in text.replace(",", " , ").split()]


def test_chunks_of_75_tokens():
    chunks = P.chunk_tokens([("w " * 160, 1.0)], _fake_encode, comma=9)
    assert [len(c.ids) for c in chunks] == [75, 75, 10]


def test_a_full_chunk_ends_after_its_last_comma_when_it_is_near():
    # a comma at index 60 (15 tokens before the end of the chunk): the chunk ends after it
    text = "w " * 60 + ", " + "w " * 30
    chunks = P.chunk_tokens([(text, 2.0)], _fake_encode, comma=9)
    assert [len(c.ids) for c in chunks] == [61, 30] and chunks[0].ids[-1] == 9
    assert chunks[1].weights == [2.0] * 30
    # a comma more than 20 tokens back: the chunk is cut at 75
    text = "w " * 40 + ", " + "w " * 60
    assert [len(c.ids) for c in P.chunk_tokens([(text, 1.0)], _fake_encode, comma=9)] == [75, 26]


def test_break_starts_a_new_chunk():
    chunks = P.chunk_tokens(P.parse_emphasis("a b BREAK c"), _fake_encode, comma=9)
    assert [len(c.ids) for c in chunks] == [2, 1]
    assert len(P.chunk_tokens(P.parse_emphasis("BREAK"), _fake_encode, comma=9)) == 1  # as A1111: no empty last chunk


@pytest.fixture(scope="module")
def models():
    return {name: random_model(ldm.preset(name), seed=1)[0] for name in ("tiny", "tiny-v2")}


@pytest.mark.parametrize("name", ["tiny", "tiny-v2"])
def test_a_plain_prompt_encodes_as_the_plain_tokenizer(models, name):
    sd = models[name]
    texts = ["a red circle on the left", ""]
    tokens = P.tokenize(sd.tokenizer, texts[0])
    assert torch.equal(tokens.ids, sd.tokenize(texts[0]))  # SD2's padding with 0 included
    assert torch.equal(P.encode(sd, texts), sd.encode_prompt(texts))


@pytest.mark.parametrize("name", ["tiny", "tiny-v2"])
def test_long_prompts_are_encoded_chunk_by_chunk(models, name):
    sd = models[name]
    long = ", ".join(f"word{i}" for i in range(60))  # well over 75 tokens
    tokens = P.tokenize(sd.tokenizer, long)
    k = tokens.ids.shape[0]
    assert k >= 2 and (tokens.ids[:, 0] == sd.tokenizer.start_token).all()
    z = P.encode(sd, [long, "short"])
    assert z.shape == (2, 77 * k, sd.config.unet.context_dim)
    for i in range(k):  # each chunk is the text encoder's output for that chunk alone
        assert torch.equal(z[0, 77 * i:77 * (i + 1)], sd.encode_tokens(tokens.ids[i:i + 1])[0])
    assert torch.equal(z[1, :77], sd.encode_prompt("short")[0])
    assert torch.equal(z[1, 77:154], sd.encode_prompt("")[0])  # padded with the empty prompt's chunk


def test_weights_scale_the_token_vectors_and_restore_the_mean(models):
    sd = models["tiny"]
    z = P.encode(sd, ["a (red:1.5) circle [left]"])[0]
    plain = sd.encode_prompt("a red circle left")[0]
    ids = sd.tokenize("a red circle left")[0].tolist()
    weights = torch.ones(77)
    weights[1 + _position(sd, ids, "red")] = 1.5
    weights[1 + _position(sd, ids, "left")] = 1 / 1.1
    by_hand = plain * weights[:, None]
    by_hand = by_hand * (plain.mean() / by_hand.mean())
    torch.testing.assert_close(z, by_hand, rtol=1e-6, atol=1e-6)
    assert torch.allclose(z.mean(), plain.mean())


def _position(sd, ids: list[int], word: str) -> int:
    token = sd.tokenizer.encode(word)
    assert len(token) == 1
    return ids.index(token[0]) - 1


def test_a_long_prompt_runs_through_txt2img(models):
    sd = models["tiny"]
    long = ", ".join(f"word{i}" for i in range(60))
    out = ldm.txt2img(sd, long, negative_prompt="(blurry:1.3)", steps=2, width=64, height=64, seed=1)
    assert out.images[0].size == (64, 64) and torch.isfinite(out.latents).all()
