"""SDXL generation on tiny SDXL-shaped models of the same code: the conditioning (sizes, pooled embedding, empty
negative prompts, long prompts and emphasis on both text encoders), the base -> refiner hand-off, the command line
and its PNG records, and LoRA files for SDXL. Parity of the networks with diffusers is in test_sdxl_models.py, of
a whole txt2img in test_pipeline.py."""
from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import ldm
from ldm.adapters import embeddings as E
from ldm.adapters import lora as L
from ldm.cli import main
from ldm.generation import pipeline
from ldm.generation.images import parse_infotext
from ldm.generation.pipeline import Denoising, encode_texts, txt2img
from ldm.generation.prompts import encode_with_pooled, tokenize
from ldm.generation.request import Generation, RequestError
from ldm.models.unet import timestep_embedding
from ldm.sampling.denoisers import Handoff
from ldm.sampling.guidance import Conditioning
from ldm.testing.reference import random_model

FAST = dict(steps=4, width=64, height=64, seed=3)


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """The tiny models run on one thread (see conftest.one_torch_thread)."""


@pytest.fixture(scope="module")
def xl():
    return random_model(ldm.preset("tiny-sdxl"), seed=1)[0]


@pytest.fixture(scope="module")
def refiner():
    return random_model(ldm.preset("tiny-sdxl-refiner"), seed=2)[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory, xl, refiner) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("xl")
    return ldm.save(xl, folder / "tiny-xl.safetensors"), ldm.save(refiner, folder / "tiny-xl-refiner.safetensors")


# --- conditioning -------------------------------------------------------------------------------------------------

def test_the_vector_holds_the_pooled_embedding_then_each_size_number(xl):
    request = Generation("a red circle", negative_prompt="blurry")
    texts = encode_texts(xl, request, request.prompts, {})
    cond, uncond = pipeline.conditioning(xl, texts, (96, 64))  # width 96, height 64
    assert isinstance(cond, Conditioning) and cond.y.shape == (1, xl.config.unet.adm_in_channels)
    numbers = torch.tensor([64.0, 96.0, 0.0, 0.0, 64.0, 96.0])  # original (h, w), crop (top, left), target (h, w)
    expected = torch.cat([texts.pooled[:1], timestep_embedding(numbers, 256).reshape(1, -1)], dim=1)
    torch.testing.assert_close(cond.y, expected, rtol=0, atol=0)
    torch.testing.assert_close(uncond.y[:, texts.pooled.shape[1]:], expected[:, texts.pooled.shape[1]:], rtol=0, atol=0)
    assert not torch.equal(uncond.y, cond.y)  # the negative prompt's own pooled embedding


def test_the_refiner_vector_ends_with_the_aesthetic_score(refiner):
    request = Generation("a red circle", negative_prompt="blurry")
    cond, uncond = pipeline.conditioning(refiner, encode_texts(refiner, request, request.prompts, {}), (64, 64))
    for c, score in ((cond, 6.0), (uncond, 2.5)):  # A1111's high and low aesthetic scores
        torch.testing.assert_close(c.y[:, -256:], timestep_embedding(torch.tensor([score]), 256), rtol=0, atol=0)


def test_an_empty_negative_prompt_is_zeros_as_a1111_makes_it(xl):
    empty = encode_texts(xl, Generation("a cat"), ["a cat"], {})
    assert not empty.context[1:].any() and not empty.pooled[1:].any()
    given = encode_texts(xl, Generation("a cat", negative_prompt="blurry"), ["a cat"], {})
    assert given.context[1:].abs().min() > 0 or given.context[1:].any()
    torch.testing.assert_close(given.context[:1], empty.context[:1], rtol=0, atol=0)


def test_long_prompts_chunk_both_encoders_and_pool_the_first_chunk(xl):
    long = ", ".join(["a red circle on a blue background"] * 12)
    context, pooled = encode_with_pooled(xl, [long])
    tokens = tokenize(xl.tokenizer, long)
    assert tokens.ids.shape[0] == 2 and context.shape == (1, 154, xl.config.unet.context_dim)
    z, first_pooled = xl.encode_text(tokens.ids[:1])
    torch.testing.assert_close(context[:, :77], z, rtol=0, atol=0)
    torch.testing.assert_close(pooled, first_pooled, rtol=0, atol=0)


def test_emphasis_weights_each_encoder_with_its_own_mean(xl):
    context, pooled = encode_with_pooled(xl, ["a (red:1.5) circle"])
    tokens = tokenize(xl.tokenizer, "a (red:1.5) circle")
    z, plain_pooled = xl.encode_text(tokens.ids)
    w = tokens.weights[..., None]
    parts = []
    for part in z.split([t.width for t in xl.config.text_encoders], dim=-1):  # CLIP-L, then bigG
        parts.append(part * w * (part.mean() / (part * w).mean()))
    torch.testing.assert_close(context, torch.cat(parts, dim=-1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(pooled, plain_pooled, rtol=0, atol=0)  # the pooled embedding is not weighted


def test_the_bigg_sees_its_own_padding(xl):
    """CLIP-L pads with the end token, the bigG with 0: the same tokens give the bigG what open_clip gives it."""
    ids = xl.tokenize(["a cat"])
    bigg = xl.text_encoder.embedders[1]
    padded = ids.clone()
    end = int((ids[0] == 49407).nonzero()[0])
    padded[0, end + 1:] = 0
    z, pooled = xl.encode_text(ids)
    hidden, ref_pooled = bigg.with_pooled(padded)
    torch.testing.assert_close(z[..., xl.config.text.width:], hidden, rtol=0, atol=0)
    torch.testing.assert_close(pooled, ref_pooled, rtol=0, atol=0)


def test_an_sdxl_embedding_gives_each_encoder_its_vectors(xl, refiner, tmp_path):
    g = torch.Generator().manual_seed(4)
    clip_l, clip_g = (torch.randn(2, t.width, generator=g) for t in xl.config.text_encoders)
    from safetensors.torch import save_file

    save_file({"clip_l": clip_l, "clip_g": clip_g}, tmp_path / "shiny.safetensors")
    request = Generation("a shiny cat", embeddings_dir=str(tmp_path), guidance=1.0)
    embeddings = pipeline.read_embeddings(xl, request, ["a shiny cat"])
    ours = encode_texts(xl, request, ["a shiny cat"], embeddings)
    # by hand: the vectors put into each encoder's vocabulary at two ids the prompt does not use
    twin = copy.deepcopy(xl)
    for table, vectors in zip(E.token_embeddings(twin), (clip_l, clip_g)):
        with torch.no_grad():
            table.weight[[10, 11]] = vectors
    t = xl.tokenizer
    ids = [t.start_token, *t.encode("a"), 10, 11, *t.encode("cat"), t.end_token]
    context, pooled = twin.encode_text(torch.tensor([ids + [t.pad_token] * (77 - len(ids))]))
    assert torch.equal(ours.context, context) and torch.equal(ours.pooled, pooled)
    # the refiner reads the clip_g vectors; an SD 1.x embedding is refused
    assert torch.equal(pipeline.read_embeddings(refiner, request, ["a shiny cat"])["shiny"].vectors, clip_g)
    torch.save({"string_to_param": {"*": torch.zeros(1, 768)}}, tmp_path / "shiny.pt")
    (tmp_path / "shiny.safetensors").unlink()
    with pytest.raises(RequestError, match=r"768-wide vectors, for another model; this tiny-sdxl model's text "
                                           r"encoders take 32 \+ 48"):
        pipeline.read_embeddings(xl, request, ["a shiny cat"])


# --- generation ---------------------------------------------------------------------------------------------------

def test_txt2img_defaults_to_the_native_size(xl):
    result = txt2img(xl, "a cat", steps=2, seed=1)
    assert result.images[0].size == (64, 64) == (xl.config.image_size,) * 2
    assert torch.isfinite(result.latents).all()


def test_an_accelerated_sdxl_unet_takes_k_conditionings_per_latent(xl):
    """Guidance's [uncond, cond] pair for one latent: with y the embedding differs per row from the first block, so
    the accelerated UNet repeats the latent first; the same as the latent given twice, and as the plain UNet."""
    fast = ldm.accel.accelerate(copy.deepcopy(xl))
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(1, 4, 8, 8, generator=g), torch.randn(2, 77, xl.config.unet.context_dim, generator=g)
    y = torch.randn(2, xl.config.unet.adm_in_channels, generator=g)
    with torch.no_grad():
        shared = fast.unet(x, torch.tensor([500]), context, y)
        repeated = fast.unet(torch.cat([x, x]), torch.tensor([500, 500]), context, y)
        plain = xl.unet(torch.cat([x, x]), torch.tensor([500, 500]), context, y)
    assert torch.equal(shared, repeated)
    torch.testing.assert_close(shared, plain, rtol=1e-5, atol=1e-5)
    assert ldm.accel.shares_latents(fast.unet)


def test_a_refiner_takes_over_at_the_switch_step():
    """With 10 DDIM steps (timesteps 901, 801, ..., 1) and switch 0.8, the base runs t >= 200 and the refiner
    t <= 199, as A1111 and diffusers' denoising_end split them."""
    calls = []

    class Recorder:
        def __init__(self, name, log_sigmas):
            self.name, self.log_sigmas = name, log_sigmas

        def __call__(self, x, sigma):
            calls.append(self.name)
            return x * 0

    from ldm.sampling.schedules import alphas_cumprod_for, sigmas_from_alphas_cumprod

    log_sigmas = sigmas_from_alphas_cumprod(alphas_cumprod_for(ldm.preset("sdxl").schedule)).log()
    handoff = Handoff(Recorder("base", log_sigmas), Recorder("refiner", log_sigmas), 0.8)
    for t in range(901, -1, -100):
        handoff(torch.zeros(1, 4, 2, 2), log_sigmas[t].exp().reshape(1).float())
    assert calls == ["base"] * 8 + ["refiner"] * 2
    assert Handoff(handoff.first, handoff.second, 0.5).uses_second(log_sigmas[499].exp().reshape(1))
    assert not Handoff(handoff.first, handoff.second, 0.5).uses_second(log_sigmas[500].exp().reshape(1))


def test_the_model_as_its_own_refiner_changes_nothing(xl):
    plain = txt2img(xl, "a cat", negative_prompt="blurry", **FAST)
    refined = txt2img(xl, "a cat", negative_prompt="blurry", refiner=xl, refiner_switch=0.5, **FAST)
    assert torch.equal(plain.latents, refined.latents)


def test_the_refiner_changes_only_the_steps_after_the_switch(xl, refiner):
    request = Generation("a cat", negative_prompt="blurry", sampler="ddim", **FAST)
    base = [step.denoised.clone() for step in Denoising(xl, request)]
    refined = [step.denoised.clone() for step in Denoising(xl, request.replace(refiner=refiner, refiner_switch=0.5))]
    # DDIM over 4 steps: timesteps 751, 501, 251, 1; from 251 on (t <= 499) the refiner denoises
    assert all(torch.equal(a, b) for a, b in zip(base[:2], refined[:2]))
    assert all(not torch.equal(a, b) for a, b in zip(base[2:], refined[2:]))


def test_a_refiner_file_is_loaded_once_and_refused_when_memory_is_short(xl, files, monkeypatch):
    pipeline.forget_refiner()
    loads = []
    load = ldm.models.checkpoint.load
    monkeypatch.setattr(ldm.models.checkpoint, "load", lambda *a, **k: loads.append(a) or load(*a, **k))
    request = Generation("a cat", refiner=str(files[1]), **FAST)
    first = ldm.generate(xl, request)
    assert torch.equal(ldm.generate(xl, request).latents, first.latents) and len(loads) == 1
    pipeline.forget_refiner()
    monkeypatch.setattr(pipeline, "available_memory", lambda device: 1000)
    need = ldm.models.checkpoint.loaded_bytes(files[1], torch.float32)
    assert abs(need - sum(p.numel() * 4 for p in ldm.load(files[1]).state_dict().values())) < 10_000
    with pytest.raises(RequestError, match=r"refiner tiny-xl-refiner.safetensors: its weights take \d+ MiB in "
                                           r"float32 beside the model, and 0 MiB are free") as e:
        ldm.generate(xl, request)
    assert e.value.field == "refiner"


def test_a_refiner_of_other_latents_is_refused(xl):
    other, _ = random_model(ldm.preset("tiny").replace(vae=dataclasses.replace(ldm.preset("tiny").vae, ch_mult=(1, 2))))
    with pytest.raises(RequestError, match="works on other latents") as e:
        txt2img(xl, "a cat", refiner=other, **FAST)
    assert e.value.field == "refiner"


# --- command line ---------------------------------------------------------------------------------------------------

def test_info_names_base_and_refiner(files, capsys):
    base, refiner = files
    assert main(["info", str(base)]) == 0
    assert "architecture: tiny-sdxl (SDXL base)" in capsys.readouterr().out
    assert main(["info", str(refiner)]) == 0
    out = capsys.readouterr().out
    assert "architecture: tiny-sdxl-refiner (SDXL refiner)" in out and out.count("text encoder:") == 1


def test_the_cli_runs_the_refiner_records_it_and_replays_it(files, tmp_path, capsys):
    base, refiner = files
    args = ["txt2img", "--ckpt", str(base), "a cat", "--steps", "4", "--seed", "5", "--quiet",
            "--refiner", str(refiner), "--refiner-switch", "0.6", "--outdir", str(tmp_path / "a")]
    assert main(args) == 0
    first = sorted((tmp_path / "a").glob("*.png"))[0]
    info = parse_infotext(Image.open(first).info["parameters"])
    assert info["Refiner"].startswith("tiny-xl-refiner [") and info["Refiner switch at"] == "0.6"
    assert info["Size"] == "64x64"
    assert main(["txt2img", "--from-png", str(first), "--quiet", "--outdir", str(tmp_path / "b")]) == 0
    again = sorted((tmp_path / "b").glob("*.png"))[0]
    assert Image.open(first).tobytes() == Image.open(again).tobytes()
    params = json.loads(Image.open(again).info["ldm"])
    assert params["refiner"] == str(refiner) and params["refiner_switch"] == 0.6


@pytest.mark.parametrize("flags, message", [
    (["--refiner", "missing.safetensors"], "--refiner checkpoint not found: missing.safetensors"),
    (["--refiner-switch", "1"], "--refiner-switch must be below 1"),
    (["--refiner-switch", "0"], "--refiner-switch must be in (0, 1]"),
])
def test_bad_refiner_flags_are_usage_errors(files, flags, message, tmp_path, capsys):
    assert main(["txt2img", "--ckpt", str(files[0]), "a cat", "--outdir", str(tmp_path), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.glob("*.png"))


# --- LoRA ---------------------------------------------------------------------------------------------------------

def _kohya_xl(sd, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random kohya SDXL LoRA: UNet layers under their CompVis names (as kohya's SDXL trainer writes them), both
    text encoders (lora_te1_, lora_te2_) under Hugging Face CLIP names, q/k/v included."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, target in L.targets(sd).items():
        wanted = (key.startswith("lora_unet_input_blocks") and key.endswith(("attn2_to_k", "proj_in"))
                  or key.startswith(("lora_te1_", "lora_te2_")) and key.endswith(("q_proj", "v_proj", "fc2")))
        if wanted:
            out, inp = target.weight.shape[:2]
            tensors[f"{key}.lora_down.weight"] = torch.randn(4, inp, generator=g) * 0.1
            tensors[f"{key}.lora_up.weight"] = torch.randn(out, 4, generator=g) * 0.1
            tensors[f"{key}.alpha"] = torch.tensor(2.0)
    return tensors


def test_an_sdxl_lora_merges_into_both_text_encoders_and_restores(xl):
    tensors = _kohya_xl(xl)
    assert any(k.startswith("lora_te2_") and "q_proj" in k for k in tensors)
    before = {k: v.clone() for k, v in xl.state_dict().items()}
    ids = xl.tokenize(["a cat"])
    z0, p0 = xl.encode_text(ids)
    merged = L.merge(xl, [(L.LoRA.from_tensors(tensors, source="xl.safetensors"), 0.8)])
    z1, p1 = xl.encode_text(ids)
    width = xl.config.text.width
    assert not torch.equal(z0[..., :width], z1[..., :width]) and not torch.equal(z0[..., width:], z1[..., width:])
    bigg = xl.text_encoder.embedders[1].model.transformer.resblocks[0].attn
    q = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"
    delta = tensors[f"{q}.lora_up.weight"] @ tensors[f"{q}.lora_down.weight"] * 0.5 * 0.8
    w = bigg.embed_dim
    torch.testing.assert_close(bigg.in_proj_weight[:w], before["conditioner.embedders.1.model.transformer.resblocks.0."
                                                                 "attn.in_proj_weight"][:w] + delta)
    merged.restore()
    assert all(torch.equal(v, before[k]) for k, v in xl.state_dict().items())


def _peft_xl(sd, seed: int = 1) -> dict[str, torch.Tensor]:
    """A random diffusers/PEFT SDXL LoRA: unet., text_encoder. and text_encoder_2. keys (lora_A / lora_B)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, target in L.targets(sd).items():
        if key.startswith("unet.") and key.endswith(("attn2.to_k", "attn1.to_out.0", "add_embedding.linear_1")) or \
                key.startswith(("text_encoder.", "text_encoder_2.")) and key.endswith(("k_proj", "fc1")):
            out, inp = target.weight.shape[:2]
            tensors[f"{key}.lora_A.weight"] = torch.randn(4, inp, generator=g) * 0.1
            tensors[f"{key}.lora_B.weight"] = torch.randn(out, 4, generator=g) * 0.1
    return tensors


def _kohya_text_as_peft(sd, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The lora_te1_ / lora_te2_ layers of a kohya file as PEFT's text_encoder(_2). keys, alpha / rank folded into
    lora_B."""
    names = {kohya + key.removeprefix(peft).replace(".", "_"): key
             for kohya, peft in L.SDXL_TEXT for key in L.targets(sd) if key.startswith(peft)}
    out = {}
    for kohya, key in names.items():
        if f"{kohya}.lora_down.weight" in tensors:
            down, up = tensors[f"{kohya}.lora_down.weight"], tensors[f"{kohya}.lora_up.weight"]
            out[f"{key}.lora_A.weight"] = down
            out[f"{key}.lora_B.weight"] = up * (float(tensors[f"{kohya}.alpha"]) / down.shape[0])
    return out


@pytest.mark.parametrize("kind", ["kohya", "peft"])
def test_sdxl_lora_outputs_match_diffusers(kind):
    """The UNet (with y) and both text encoders (and the pooled embedding) with a random SDXL LoRA merged, against
    diffusers' own loading of the same file (StableDiffusionXLLoraLoaderMixin, PEFT, on the fly) on the same weights:
    kohya files name the UNet's layers as sgm does (input_blocks...), which diffusers maps itself."""
    pytest.importorskip("peft")
    from diffusers.loaders.lora_pipeline import StableDiffusionXLLoraLoaderMixin as Loader
    from peft.tuners.tuners_utils import BaseTunerLayer

    from ldm.testing import reference as R

    sd, checkpoint = random_model(ldm.preset("tiny-sdxl"), seed=4)
    tensors = _kohya_xl(sd, seed=7) if kind == "kohya" else _peft_xl(sd, seed=8)
    unet = R.reference_unet(sd.config, checkpoint)
    encoders = R.reference_sdxl_text(sd.config, checkpoint)
    state, alphas = Loader.lora_state_dict(dict(tensors), unet_config=unet.config)
    if kind == "kohya":
        # diffusers 0.42 turns kohya's text encoder keys into its old attention-processor names, which transformers
        # 5's CLIP text models then load only in part; its PEFT route reads the same layers, renamed
        renamed, _ = Loader.lora_state_dict(_kohya_text_as_peft(sd, tensors))
        state = {**{k: v for k, v in state.items() if not k.startswith("text_encoder")}, **renamed}
        alphas = {k: v for k, v in alphas.items() if not k.startswith("text_encoder")}  # folded into lora_B
    Loader.load_lora_into_unet(state, alphas, unet=unet, adapter_name="x")
    for prefix, encoder in zip(("text_encoder", "text_encoder_2"), encoders):
        Loader.load_lora_into_text_encoder(state, alphas, text_encoder=encoder, prefix=prefix, adapter_name="x")
        assert any(isinstance(m, BaseTunerLayer) for m in encoder.modules())  # diffusers loaded it
    for model in (unet, *encoders):
        for m in model.modules():
            if isinstance(m, BaseTunerLayer):
                m.scale_layer(0.7)
    before = R.sdxl_text_outputs(sd)
    L.merge(sd, [(L.LoRA.from_tensors(tensors), 0.7)])
    ours, theirs = R.sdxl_text_outputs(sd), R.reference_sdxl_text_outputs(sd.config, encoders)
    for name in ("text CLIP-L", "text OpenCLIP-bigG"):
        assert (ours[name] - before[name]).abs().max() > 1e-3  # the LoRA changes it well beyond the parity error
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours["pooled OpenCLIP-bigG"], theirs["pooled OpenCLIP-bigG"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(R.sdxl_unet_output(sd), R.reference_sdxl_unet_output(sd.config, unet),
                               rtol=1e-5, atol=1e-5)


def test_an_sd1_lora_on_sdxl_is_refused_naming_both(xl, refiner):
    sd1 = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.zeros(4, 768),
           "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.zeros(32, 4)}
    with pytest.raises(L.LoRAError, match=r"is a LoRA for SD 1.x; this model \(tiny-sdxl\) is SDXL"):
        L.merge(xl, [(L.LoRA.from_tensors(sd1, source="sd1.safetensors"), 1.0)])
    with pytest.raises(L.LoRAError, match=r"is a LoRA for SDXL; this model \(tiny-sdxl-refiner\) is the SDXL refiner"):
        L.merge(refiner, [(L.LoRA.from_tensors(_kohya_xl(xl), source="xl.safetensors"), 1.0)])


# --- server ---------------------------------------------------------------------------------------------------------

def test_the_server_runs_sdxl_with_a1111s_refiner_fields(files):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from test_server import Server, _image

    base, refiner = files
    sd = ldm.load(base)
    s = Server(sd, ckpt_dir=str(refiner.parent))
    try:
        body = {"prompt": "a cat", "negative_prompt": "blurry", "seed": 9, "steps": 4, "sampler_name": "DDIM",
                "refiner_checkpoint": refiner.name + " [0123456789]", "refiner_switch_at": 0.5}
        status, out = s.call("txt2img", body)
        assert status == 200
        info = json.loads(out["info"])
        assert "Refiner: tiny-xl-refiner" in info["infotexts"][0] and "Refiner switch at: 0.5" in info["infotexts"][0]
        expected = ldm.txt2img(sd, "a cat", negative_prompt="blurry", seed=9, steps=4, sampler="ddim", guidance=7.0,
                               refiner=str(refiner), refiner_switch=0.5, width=64, height=64).images[0]
        assert _image(out["images"][0]).tobytes() == expected.tobytes()
        status, out = s.call("txt2img", {**body, "refiner_checkpoint": "nope"})
        assert status == 404 and out["detail"].startswith("refiner_checkpoint: no checkpoint 'nope'")
        status, out = s.call("txt2img", {**body, "refiner_switch_at": 1.5})
        assert status == 422 and out["detail"].startswith("refiner_switch_at:")
    finally:
        s.stop()


def test_an_sgm_yaml_is_refused_naming_the_presets(tmp_path, files, capsys):
    yaml = tmp_path / "sd_xl_base.yaml"
    yaml.write_text("model:\n  target: sgm.models.diffusion.DiffusionEngine\n  params:\n    network_config:\n"
                    "      target: sgm.modules.diffusionmodules.openaimodel.UNetModel\n")
    assert main(["info", str(files[0]), "--config", str(yaml)]) == 2
    assert "is an sgm (SDXL) config, which ldm does not read" in capsys.readouterr().err
    assert main(["info", str(files[0]), "--config", "tiny-sdxl"]) == 0
