"""The from-scratch CLIP tokenizer: known ids, padding, truncation, parity with transformers, vocab lookup."""
from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from ldm.models import tokenizer as tokenizer_module
from ldm.models.tokenizer import CLIPTokenizer, TokenTruncationWarning, find_vocab

START, END = 49406, 49407
CAT_IDS = [320, 1125, 539, 320, 2368]  # "a photo of a cat", the ids every CLIP tokenizer agrees on


def test_known_ids_sd1_padding():
    ids = CLIPTokenizer()("a photo of a cat")
    assert ids.shape == (1, 77) and ids.dtype == torch.int64
    assert ids[0].tolist() == [START, *CAT_IDS, END] + [END] * 70


def test_known_ids_sd2_padding():
    ids = CLIPTokenizer(pad_token=0)("a photo of a cat")
    assert ids[0].tolist() == [START, *CAT_IDS, END] + [0] * 70


def test_batch_and_encode_decode():
    tok = CLIPTokenizer()
    ids = tok(["a photo of a cat", "", "A PHOTO   of a cat"])
    assert ids.shape == (3, 77) and ids.dtype == torch.int64
    assert ids[1, :3].tolist() == [START, END, END]
    assert torch.equal(ids[0], ids[2])  # lowercased and whitespace collapsed
    assert tok.encode("a photo of a cat") == CAT_IDS
    assert tok.decode(CAT_IDS) == "a photo of a cat"
    assert tok.decode(ids[0, :7]) == "<|startoftext|>a photo of a cat <|endoftext|>"


def test_custom_max_length():
    ids = CLIPTokenizer(max_length=8)("a photo of a cat")
    assert ids[0].tolist() == [START, *CAT_IDS, END, END]
    with pytest.raises(ValueError, match="max_length"):
        CLIPTokenizer(max_length=1)


def test_long_prompt_is_truncated_and_warns_with_dropped_words():
    prompt = "a photo of a cat " * 20 + "riding a purple elephant"
    with pytest.warns(TokenTruncationWarning) as record:
        ids = CLIPTokenizer()(prompt)
    assert ids.shape == (1, 77)
    assert ids[0, 0] == START and ids[0, -1] == END
    assert ids[0, 1:-1].tolist() == (CAT_IDS * 15)  # 75 content tokens, no padding
    assert len(record) == 1
    message = str(record[0].message)
    assert "77 tokens" in message and "riding a purple elephant" in message
    assert "a photo of a cat a photo" in message  # the 16th to 20th repetitions were dropped too


def test_prompt_that_fits_exactly_does_not_warn():
    tok = CLIPTokenizer()
    with warnings.catch_warnings():
        warnings.simplefilter("error", TokenTruncationWarning)
        ids = tok("cat " * 75)
    assert ids[0].tolist() == [START] + [2368] * 75 + [END]
    with pytest.warns(TokenTruncationWarning, match="'dog'"):
        tok("cat " * 75 + "dog")


def test_one_warning_for_a_batch():
    with pytest.warns(TokenTruncationWarning) as record:
        CLIPTokenizer()(["cat " * 75 + "dog", "short", "cat " * 75 + "bird"])
    assert len(record) == 1
    assert "'dog'" in str(record[0].message) and "'bird'" in str(record[0].message)


def test_html_entities_are_unescaped_like_clip():
    tok = CLIPTokenizer()
    assert tok.encode("salt &amp; pepper") == tok.encode("salt & pepper")
    assert tok.encode("salt &amp;amp; pepper") == tok.encode("salt & pepper")  # CLIP unescapes twice


# Prompts where our normalisation and transformers' agree. transformers' CLIPTokenizer (v5: tokenizers-backed)
# normalises with NFC + whitespace + lowercase only. It does not unescape HTML entities as CLIP does
# ("a &amp; b"), and its Rust lowercasing ignores Greek final sigma ("ΣΑΣ"), which Python's str.lower, and
# so CLIP, handles. Neither needs ftfy: CLIP's ftfy step is NFC for text that is not mojibake.
PARITY_PROMPTS = [
    "a photo of a cat",
    "Hello, World!! ... ?!",
    "the 1990s, 3.14159 and 42nd street",
    "café naïve résumé",
    "cafe\u0301 (decomposed accent)",
    "it's, I'LL, we'd, they're, you've, I'm, don't",
    "   multiple    spaces\tand\nnewlines  ",
    "UPPERCASE And MiXeD CaSe",
    "emoji 🐱🔥 and 👩‍🚀 astronaut",
    "(masterpiece:1.2), [best quality], {{detailed}}, <lora:x:0.5>",
    "日本語のテキスト and Ελληνικά",
    "hyphen-ated, under_scored, slash/separated, e-mail@example.com",
    "",
]


@pytest.fixture(scope="module")
def reference_tokenizer(tmp_path_factory):
    """transformers' CLIPTokenizer built offline from vocab.json and merges.txt derived from the gz file."""
    transformers = pytest.importorskip("transformers")
    from ldm.testing.reference import write_clip_tokenizer_files

    directory = write_clip_tokenizer_files(tmp_path_factory.mktemp("clip-tokenizer"))
    return transformers.CLIPTokenizer.from_pretrained(str(directory))


@pytest.mark.parametrize("prompt", PARITY_PROMPTS)
def test_encode_matches_transformers(reference_tokenizer, prompt):
    expected = reference_tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert CLIPTokenizer().encode(prompt) == expected


def test_batch_matches_transformers(reference_tokenizer):
    expected = reference_tokenizer(PARITY_PROMPTS, padding="max_length", max_length=77, return_tensors="pt")
    assert torch.equal(CLIPTokenizer()(PARITY_PROMPTS), expected["input_ids"])


def test_vocab_is_found_without_importing_open_clip():
    # A fresh interpreter, so that nothing else in the test session has imported open_clip already.
    code = (
        "import sys\n"
        "from ldm.models.tokenizer import CLIPTokenizer\n"
        "assert CLIPTokenizer()('a photo of a cat')[0, 5].item() == 2368\n"
        "assert 'open_clip' not in sys.modules, 'open_clip was imported'\n"
    )
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_missing_vocab_path_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab_path|open_clip_torch"):
        CLIPTokenizer(vocab_path=tmp_path / "missing.txt.gz")


def test_missing_open_clip_raises(monkeypatch):
    monkeypatch.setattr(tokenizer_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps open_clip_torch"):
        find_vocab()


def test_vocab_is_loaded_once():
    vocab = find_vocab()
    assert CLIPTokenizer(vocab_path=vocab).bpe is CLIPTokenizer(vocab_path=str(vocab)).bpe
    assert len(CLIPTokenizer().bpe.encoder) == 49408
