"""Textual inversion: A1111 .pt / .safetensors and diffusers files read without running pickled code; a word of the
prompt that names an embedding encodes as its vectors put in the vocabulary's place, checked against a text encoder
whose vocabulary holds them; clear errors for other models' embeddings."""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

import ldm
from ldm.adapters import embeddings as E
from ldm.generation import prompts as P
from ldm.models.checkpoint import CheckpointError
from ldm.testing.reference import random_model


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """The tiny models run on one thread (see conftest.one_torch_thread)."""


@pytest.fixture(scope="module", params=["tiny", "tiny-v2"])
def sd(request):
    return random_model(ldm.preset(request.param), seed=2)[0]


def _vectors(sd, n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, sd.config.text.width, generator=torch.Generator().manual_seed(seed))


def test_the_three_file_formats_read_the_same_vectors(tmp_path, sd):
    v = _vectors(sd)
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": v}, "name": "x", "step": 500},
               tmp_path / "a1111.pt")
    save_file({"emb_params": v}, str(tmp_path / "a1111.safetensors"))
    torch.save({"<my-token>": v[0]}, tmp_path / "diffusers.bin")
    for name in ("a1111.pt", "a1111.safetensors"):
        e = E.Embedding.read(tmp_path / name)
        assert e.name == name.split(".")[0] and torch.equal(e.vectors, v)
    assert torch.equal(E.Embedding.read(tmp_path / "diffusers.bin").vectors, v[:1])


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    torch.save({"string_to_param": {"*": torch.zeros(1, 8)}, "hook": print}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refused to load .*never runs code"):
        E.Embedding.read(tmp_path / "evil.pt")


def test_an_embedding_stands_for_its_vectors_in_the_text_encoder(sd):
    v = _vectors(sd, 2, seed=1)
    emb = E.Embedding("my-style", v, "my-style.pt")
    ours = P.encode(sd, ["a photo of my-style, red"], embeddings={"my-style": emb})
    # by hand: the vectors put into the vocabulary at two ids the prompt does not use, and those ids in the prompt
    twin = copy.deepcopy(sd)
    table = E.token_embeddings(twin)[0].weight
    with torch.no_grad():
        table[[10, 11]] = v.to(table.dtype)
    t = sd.tokenizer
    ids = [t.start_token, *t.encode("a photo of"), 10, 11, *t.encode(", red"), t.end_token]
    ids += [t.pad_token] * (77 - len(ids))
    expected = twin.encode_tokens(torch.tensor([ids]))
    assert torch.equal(ours, expected)
    assert not torch.equal(ours, sd.encode_prompt("a photo of my-style, red"))
    assert torch.equal(P.encode(sd, ["a photo of my-style, red"]), sd.encode_prompt("a photo of my-style, red"))


def test_an_embedding_that_does_not_fit_its_chunk_starts_the_next(sd):
    emb = E.Embedding("wide", _vectors(sd, 10), "wide.pt")
    tokens = P.tokenize(sd.tokenizer, "w " * 70 + "wide", {"wide": emb})
    assert tokens.ids.shape[0] == 2 and [(row, start) for row, start, _ in tokens.slots] == [(1, 1)]


def test_the_request_reads_embeddings_from_its_folder(tmp_path, sd):
    torch.save({"string_to_param": {"*": _vectors(sd, 3, seed=4)}}, tmp_path / "shiny.pt")
    kwargs = dict(steps=2, width=64, height=64, seed=1)
    plain = ldm.txt2img(sd, "a shiny circle", **kwargs)
    styled = ldm.txt2img(sd, "a shiny circle", embeddings_dir=str(tmp_path), **kwargs)
    assert (plain.latents - styled.latents).abs().max() > 1e-4
    assert torch.equal(ldm.txt2img(sd, "a red circle", embeddings_dir=str(tmp_path), **kwargs).latents,
                       ldm.txt2img(sd, "a red circle", **kwargs).latents)  # no word names it: nothing changes
    other = 1024 if sd.config.text.width == 768 else 768
    torch.save({"string_to_param": {"*": torch.zeros(1, other)}}, tmp_path / "shiny.pt")
    with pytest.raises(ldm.RequestError, match=f"{other}-wide vectors, for another model"):
        ldm.txt2img(sd, "a shiny circle", embeddings_dir=str(tmp_path), **kwargs)
    with pytest.raises(ldm.RequestError, match="embeddings folder not found"):
        ldm.txt2img(sd, "a circle", embeddings_dir=str(tmp_path / "nope"), **kwargs)
