"""LoRA files at inference: the layer names of kohya and PEFT files, ΔW per format against the formula written out,
parity with diffusers' `load_lora_weights` on the same files, merging and restoring bit for bit, clear errors."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import ldm
from ldm.adapters import lora as L
from ldm.adapters.names import unet_names
from ldm.testing.reference import random_model


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """The tiny models run on one thread (see conftest.one_torch_thread)."""


@pytest.fixture(scope="module")
def tiny():
    return random_model(ldm.preset("tiny"), seed=1)


@pytest.mark.parametrize("name", ["tiny", "tiny-v2", pytest.param("sd-v1", marks=pytest.mark.slow)])
def test_unet_layer_names_are_diffusers_names(name):
    """Every diffusers name given to a UNet layer holds that layer's weight in diffusers' own conversion of the
    checkpoint (`convert_ldm_unet_checkpoint`)."""
    from diffusers.loaders import single_file_utils as sfu

    from ldm.testing.reference import reference_unet_config

    sd, checkpoint = random_model(ldm.preset(name), seed=1)
    converted = sfu.convert_ldm_unet_checkpoint(checkpoint, reference_unet_config(sd.config, checkpoint))
    layers = {n: m for n, m in sd.unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    names = unet_names(sd.config.unet, list(layers))
    assert len(names) == len(layers)  # every layer with a weight has its diffusers name
    for diffusers, compvis in names.items():
        assert torch.equal(converted[f"{diffusers}.weight"].reshape(layers[compvis].weight.shape),
                           layers[compvis].weight), (diffusers, compvis)


def _kohya_file(sd, rank: int = 2, alpha: float = 1.0, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random kohya LoRA for some attention projections, a conv and proj_in of `sd`'s UNet, and the attention
    projections of its text encoder (all four: diffusers tells old-format text LoRAs by their out_proj)."""
    g = torch.Generator().manual_seed(seed)
    table = L.targets(sd)
    keys = [k for k in table if k.startswith(L.KOHYA_UNET) and any(s in k for s in ("attn1_to_q", "attn2_to_v",
                                                                                   "resnets_0_conv1", "proj_in"))
            and "down_blocks" in k or k.startswith(L.KOHYA_TEXT) and k.endswith(("q_proj", "k_proj", "v_proj", "out_proj"))]
    tensors = {}
    for key in keys:
        shape = table[key].weight.shape
        conv = len(shape) == 4
        down = (rank, shape[1], *shape[2:]) if conv else (rank, shape[1])
        up = (shape[0], rank, 1, 1) if conv else (shape[0], rank)
        tensors[f"{key}.lora_down.weight"] = torch.randn(down, generator=g) * 0.1
        tensors[f"{key}.lora_up.weight"] = torch.randn(up, generator=g) * 0.1
        tensors[f"{key}.alpha"] = torch.tensor(alpha)
    return tensors


def test_kohya_lora_merges_its_formula_and_restores_bit_for_bit(tiny):
    sd = copy.deepcopy(tiny[0])
    tensors = _kohya_file(sd, rank=2, alpha=1.0)
    before = {k: v.clone() for k, v in sd.state_dict().items()}
    lora = L.LoRA.from_tensors(tensors, name="test")
    merged = L.merge(sd, [(lora, 0.8)])
    key = next(k for k in lora.layers if "attn1_to_q" in k)
    target = L.targets(sd)[key]
    expected = (tensors[f"{key}.lora_up.weight"] @ tensors[f"{key}.lora_down.weight"]) * (1.0 / 2) * 0.8
    name = next(n for n, m in sd.named_modules() if m is target.module) + ".weight"
    torch.testing.assert_close(target.weight - before[name], expected, rtol=1e-5, atol=1e-6)
    changed = [k for k in before if not torch.equal(before[k], sd.state_dict()[k])]
    assert len(changed) == len(lora.layers)
    merged.restore()
    after = sd.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_a_lora_for_another_model_is_refused_naming_its_keys(tiny):
    sd = tiny[0]
    tensors = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_1_attn1_to_q.lora_down.weight":
               torch.zeros(2, 32), "lora_unet_down_blocks_0_attentions_0_transformer_blocks_1_attn1_to_q.lora_up.weight":
               torch.zeros(32, 2)}
    before = {k: v.clone() for k, v in sd.state_dict().items()}
    with pytest.raises(L.LoRAError, match="match no layer of this tiny model .*transformer_blocks_1_attn1_to_q"):
        L.merge(sd, [(L.LoRA.from_tensors(tensors), 1.0)])
    assert all(torch.equal(sd.state_dict()[k], v) for k, v in before.items())  # nothing changed
    with pytest.raises(L.LoRAError, match="not LoRA tensors"):
        L.LoRA.from_tensors({"model.diffusion_model.out.2.weight": torch.zeros(1)})
    key = next(iter(_kohya_file(sd))).rsplit(".", 2)[0]
    with pytest.raises(L.LoRAError, match="update for a weight of shape"):
        L.merge(sd, [(L.LoRA.from_tensors({f"{key}.lora_down.weight": torch.zeros(2, 5),
                                           f"{key}.lora_up.weight": torch.zeros(3, 2)}), 1.0)])


def test_loha_and_lokr_deltas_follow_their_formulas(tiny):
    g = torch.Generator().manual_seed(3)
    w1a, w1b, w2a, w2b = (torch.randn(s, generator=g) for s in ((32, 4), (4, 32), (32, 4), (4, 32)))
    loha = L.LoRA.from_tensors({"x.hada_w1_a": w1a, "x.hada_w1_b": w1b, "x.hada_w2_a": w2a, "x.hada_w2_b": w2b,
                                "x.alpha": torch.tensor(2.0)})
    torch.testing.assert_close(loha.delta("x", torch.Size((32, 32))), (w1a @ w1b) * (w2a @ w2b) * 0.5)
    k1, k2a, k2b = torch.randn(4, 4, generator=g), torch.randn(8, 2, generator=g), torch.randn(2, 8, generator=g)
    lokr = L.LoRA.from_tensors({"y.lokr_w1": k1, "y.lokr_w2_a": k2a, "y.lokr_w2_b": k2b, "y.alpha": torch.tensor(1.0)})
    torch.testing.assert_close(lokr.delta("y", torch.Size((32, 32))), torch.kron(k1, k2a @ k2b) * 0.5)


def test_merging_into_an_accelerated_model_repacks_and_restores(tmp_path, tiny):
    sd, _ = tiny
    path = tmp_path / "m.safetensors"
    ldm.save(sd, path)
    fast = ldm.load(path)
    plain = ldm.load(path, accelerate=False)
    kwargs = dict(steps=2, width=64, height=64, seed=3)
    base = ldm.txt2img(fast, "a red circle", **kwargs)  # packs the weights
    spare: dict = {}
    for seed in (5, 6):  # the second merge writes into the (packed, then unpacked) merged weights of the first
        lora = L.LoRA.from_tensors(_kohya_file(plain, seed=seed))
        merged_fast = L.merge(fast, [(lora, 1.0)], spare)
        merged_plain = L.merge(plain, [(lora, 1.0)])
        a = ldm.txt2img(fast, "a red circle", **kwargs)
        b = ldm.txt2img(plain, "a red circle", **kwargs)
        assert (a.latents - b.latents).abs().max() <= 1e-5 * b.latents.abs().max()
        assert (a.latents - base.latents).abs().max() > 1e-3  # the LoRA acts
        merged_fast.restore()
        merged_plain.restore()
        assert torch.equal(ldm.txt2img(fast, "a red circle", **kwargs).latents, base.latents)
    assert spare


def test_a_kohya_file_reads_from_disk(tmp_path, tiny):
    sd = tiny[0]
    path = tmp_path / "style.safetensors"
    save_file(_kohya_file(sd), str(path))
    lora = L.LoRA.read(path)
    assert lora.name == "style" and all(lora.format_of(k) == "lora" for k in lora.layers)
    with pytest.raises(L.LoRAError, match="not found"):
        L.LoRA.read(tmp_path / "nope.safetensors")


def _peft_file(sd, rank: int = 4, seed: int = 1) -> dict[str, torch.Tensor]:
    """A random diffusers/PEFT LoRA (lora_A / lora_B) for the UNet's attention projections and the text encoder's."""
    g = torch.Generator().manual_seed(seed)
    table = L.targets(sd)
    tensors = {}
    for key, target in table.items():
        if key.startswith(L.PEFT_UNET) and key.endswith(("attn2.to_k", "attn1.to_out.0")) or \
                key.startswith(L.PEFT_TEXT) and key.endswith(("v_proj", "fc1")):
            out, inp = target.weight.shape[:2]
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, inp, generator=g) * 0.1
            tensors[f"{key}.lora_B.weight"] = torch.randn(out, rank, generator=g) * 0.1
    return tensors


def _diffusers_outputs(sd, checkpoint, tensors, weight: float):
    """diffusers' UNet and CLIP text model on the same weights, with the LoRA loaded by diffusers itself
    (`lora_state_dict`, `load_lora_into_unet`, `load_lora_into_text_encoder`, PEFT), at `weight`."""
    pytest.importorskip("peft")
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin as Loader

    from ldm.testing.reference import reference_text, reference_unet, unet_inputs

    unet = reference_unet(sd.config, checkpoint)
    text = reference_text(sd.config, checkpoint)
    state, alphas = Loader.lora_state_dict(dict(tensors))
    Loader.load_lora_into_unet(state, alphas, unet=unet, adapter_name="x")
    Loader.load_lora_into_text_encoder(state, alphas, text_encoder=text, adapter_name="x")
    for model in (unet, text):
        from peft.tuners.tuners_utils import BaseTunerLayer

        for m in model.modules():
            if isinstance(m, BaseTunerLayer):
                m.scale_layer(weight)
    x, t, context = unet_inputs(sd.config)
    ids = sd.tokenize(["a photo of a cat", "a red circle"])
    with torch.no_grad():
        return (unet(x, t, encoder_hidden_states=context).sample, text(ids).last_hidden_state), (x, t, context, ids)


@pytest.mark.parametrize("kind", ["kohya", "peft"])
@pytest.mark.parametrize("name", ["tiny", "tiny-v2", pytest.param("sd-v1", marks=pytest.mark.slow)])
def test_lora_outputs_match_diffusers(kind, name):
    """The UNet and text encoder with a random LoRA merged, against diffusers' own loading of the same file (PEFT,
    applied on the fly) on the same weights; on the full-size SD 1.5 architecture in the slow suite."""
    sd, checkpoint = random_model(ldm.preset(name), seed=4)
    tensors = (_kohya_file(sd, rank=4, alpha=2.0, seed=7) if kind == "kohya" else _peft_file(sd, seed=8))
    (unet_ref, text_ref), (x, t, context, ids) = _diffusers_outputs(sd, checkpoint, tensors, 0.7)
    L.merge(sd, [(L.LoRA.from_tensors(tensors), 0.7)])
    with torch.no_grad():
        unet_out, text_out = sd.unet(x, t, context), sd.encode_tokens(ids)
    plain_sd, _ = random_model(ldm.preset(name), seed=4)
    with torch.no_grad():  # the LoRA changes both outputs well beyond the parity error
        assert (unet_out - plain_sd.unet(x, t, context)).abs().max() > 1e-3
        assert (text_out - plain_sd.encode_tokens(ids)).abs().max() > 1e-3
    torch.testing.assert_close(unet_out, unet_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(text_out, text_ref, rtol=1e-5, atol=1e-5)


def test_a_request_merges_its_loras_for_the_run_only(tmp_path, tiny):
    sd = copy.deepcopy(tiny[0])
    save_file(_kohya_file(sd, seed=9), str(tmp_path / "style.safetensors"))
    before = {k: v.clone() for k, v in sd.state_dict().items()}
    kwargs = dict(steps=2, width=64, height=64, seed=3)
    by_field = ldm.txt2img(sd, "a red circle", loras=((str(tmp_path / "style.safetensors"), 0.6),), **kwargs)
    assert all(torch.equal(sd.state_dict()[k], v) for k, v in before.items())  # restored after the run
    by_tag = ldm.txt2img(sd, "a red <lora:style:0.6>circle", lora_dir=str(tmp_path), **kwargs)
    merged = L.merge(sd, [(L.LoRA.read(tmp_path / "style.safetensors"), 0.6)])
    by_hand = ldm.txt2img(sd, "a red circle", **kwargs)
    merged.restore()
    assert torch.equal(by_field.latents, by_hand.latents) and torch.equal(by_tag.latents, by_hand.latents)
    assert by_field.params["loras"] == [[str(tmp_path / "style.safetensors"), 0.6]]
    with pytest.raises(ldm.RequestError, match="LoRA 'nope' not found in"):
        ldm.txt2img(sd, "a <lora:nope:1>", lora_dir=str(tmp_path), **kwargs)
    with pytest.raises(ldm.RequestError, match="weight 'x' of <lora:style"):
        ldm.Generation("a <lora:style:x>")


def test_the_cli_takes_loras_and_refuses_bad_ones(tmp_path, tiny, capsys):
    from ldm.cli import main

    sd = tiny[0]
    ckpt = tmp_path / "m.safetensors"
    ldm.save(sd, ckpt)
    save_file(_kohya_file(sd, seed=9), str(tmp_path / "style.safetensors"))
    base = ["txt2img", "a red circle", "--ckpt", str(ckpt), "--W", "64", "--H", "64", "--steps", "2", "--seed", "1",
            "--quiet"]
    loud = [arg for arg in base if arg != "--quiet"]
    assert main([*loud, "--lora", f"{tmp_path / 'style.safetensors'}:0.5", "--outdir", str(tmp_path / "a")]) == 0
    assert "merged style:0.5 into the weights" in capsys.readouterr().err
    assert main([base[0], "a <lora:style:0.5> red circle", *base[2:], "--lora-dir", str(tmp_path),
                 "--outdir", str(tmp_path / "b")]) == 0
    capsys.readouterr()
    for args, message in ((["--lora", str(tmp_path / "nope.safetensors")], "nope.safetensors' not found"),
                          (["--lora", f"{tmp_path / 'style.safetensors'}:much"], "must be a number"),
                          (["--lora", str(ckpt)], "not LoRA tensors")):
        assert main([*base, *args, "--outdir", str(tmp_path / "c")]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "c").exists()

    # the command line fuses the LoRA into the weights for good: the image is the one a merge for the run gives
    import numpy as np
    from PIL import Image

    by_cli = np.asarray(Image.open(next((tmp_path / "a").glob("*.png"))).convert("RGB"))
    by_api = ldm.txt2img(ldm.load(ckpt), "a red circle", loras=((str(tmp_path / "style.safetensors"), 0.5),),
                         steps=2, width=64, height=64, seed=1).images[0]
    assert np.array_equal(by_cli, np.asarray(by_api.convert("RGB")))


def test_the_png_records_lora_and_ti_hashes_and_replays_them(tmp_path, tiny):
    import hashlib

    from ldm.generation.images import parse_infotext, read_png_params, save_png

    sd = copy.deepcopy(tiny[0])
    path = tmp_path / "style.safetensors"
    save_file(_kohya_file(sd, seed=9), str(path), metadata={"ss_note": "edited metadata keeps the hash"})
    data = path.read_bytes()
    after_header = data[8 + int.from_bytes(data[:8], "little"):]
    assert L.short_hash(path) == hashlib.sha256(after_header).hexdigest()[:12]  # A1111's addnet hash
    torch.save({"string_to_param": {"*": torch.randn(2, sd.config.text.width)}}, tmp_path / "shiny.pt")
    result = ldm.txt2img(sd, "a <lora:style:0.6> shiny circle", lora_dir=str(tmp_path), embeddings_dir=str(tmp_path),
                         steps=2, width=64, height=64, seed=5)
    png = save_png(result.images[0], tmp_path / "out", "5", result.image_params(0))
    from PIL import Image

    info = parse_infotext(Image.open(png).info["parameters"])
    assert info["prompt"] == "a <lora:style:0.6> shiny circle"
    assert info["Lora hashes"] == f"style: {L.short_hash(path)}"
    assert info["TI hashes"] == f"shiny: {hashlib.sha256((tmp_path / 'shiny.pt').read_bytes()).hexdigest()[:12]}"
    replay = ldm.Generation.from_params(read_png_params(png))
    assert torch.equal(ldm.generate(sd, replay).latents, result.latents)
    path.rename(tmp_path / "renamed.safetensors")  # renamed files are found by their hashes
    (tmp_path / "shiny.pt").rename(tmp_path / "shiny-v2.pt")
    assert torch.equal(ldm.generate(sd, ldm.Generation.from_params(read_png_params(png))).latents, result.latents)


@pytest.mark.parametrize("shape", [(32, 24), (32, 16, 3, 3)])
def test_loha_and_lokr_match_the_lycoris_reconstruction(shape):
    """ΔW of LoHa and LoKr layers (linear and conv, low-rank and full Kronecker factors) as the lycoris-lora
    package rebuilds it from the same tensors."""
    pytest.importorskip("lycoris")
    from lycoris.functional import loha as lycoris_loha
    from lycoris.functional import lokr as lycoris_lokr

    g = torch.Generator().manual_seed(6)
    out, inp = shape[0], int(torch.tensor(shape[1:]).prod())
    rank, alpha = 4, 3.0
    w1a, w1b, w2a, w2b = (torch.randn(s, generator=g) for s in ((out, rank), (rank, inp), (out, rank), (rank, inp)))
    loha = L.LoRA.from_tensors({"x.hada_w1_a": w1a, "x.hada_w1_b": w1b, "x.hada_w2_a": w2a, "x.hada_w2_b": w2b,
                                "x.alpha": torch.tensor(alpha)})
    reference = lycoris_loha.diff_weight(w1b, w1a, w2b, w2a, None, None, gamma=alpha / rank)
    torch.testing.assert_close(loha.delta("x", torch.Size(shape)), reference.reshape(shape), rtol=1e-5, atol=1e-5)
    # LoKr: w1 (4 x 4) full; w2 (out/4 x in/4) low-rank, then full
    k2 = (out // 4, shape[1] // 4, *shape[2:])
    w1 = torch.randn(4, 4, generator=g)
    w2a, w2b = torch.randn(k2[0], rank, generator=g), torch.randn(rank, int(torch.tensor(k2[1:]).prod()), generator=g)
    lokr = L.LoRA.from_tensors({"y.lokr_w1": w1, "y.lokr_w2_a": w2a, "y.lokr_w2_b": w2b, "y.alpha": torch.tensor(alpha)})
    b = w2b if len(shape) == 2 else w2b.reshape(rank, *k2[1:])
    reference = lycoris_lokr.diff_weight(w1, None, None, None, w2a, b, None, gamma=alpha, backend="torch")
    torch.testing.assert_close(lokr.delta("y", torch.Size(shape)), reference.reshape(shape), rtol=1e-5, atol=1e-5)
    w2 = torch.randn(k2, generator=g)
    full = L.LoRA.from_tensors({"z.lokr_w1": w1, "z.lokr_w2": w2, "z.alpha": torch.tensor(alpha)})
    reference = lycoris_lokr.diff_weight(w1, None, None, w2, None, None, None, gamma=alpha, backend="torch")
    torch.testing.assert_close(full.delta("z", torch.Size(shape)), reference.reshape(shape), rtol=1e-5, atol=1e-5)


def test_a_lora_for_another_base_model_is_refused_naming_both():
    sd = ldm.StableDiffusion(ldm.preset("tiny"))
    sd.config = sd.config.replace(unet=dataclasses.replace(sd.config.unet, context_dim=768))  # as SD 1.x
    sd2 = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.zeros(4, 1024),
           "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.zeros(32, 4)}
    with pytest.raises(L.LoRAError, match=r"is a LoRA for SD 2.x; this model \(tiny\) is SD 1.x"):
        L.merge(sd, [(L.LoRA.from_tensors(sd2, source="sd2.safetensors"), 1.0)])
    sdxl = {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 768),
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(768, 4)}
    with pytest.raises(L.LoRAError, match=r"is a LoRA for SDXL; this model \(tiny\) is SD 1.x"):
        L.merge(sd, [(L.LoRA.from_tensors(sdxl, source="xl.safetensors"), 1.0)])


def test_a_later_merge_writes_into_the_spare_weights_of_the_last_one(tiny):
    """`using` keeps the merged tensors after restoring; the next merge writes into them (same memory) and gives
    the weights a merge into fresh tensors gives, and restoring is still bit for bit."""
    sd = copy.deepcopy(tiny[0])
    before = {k: v.clone() for k, v in sd.state_dict().items()}
    first = L.LoRA.from_tensors(_kohya_file(sd, seed=11), source="first")
    second = L.LoRA.from_tensors(_kohya_file(sd, seed=12), source="second")
    key = next(k for k in first.layers if "attn1_to_q" in k)
    target = L.targets(sd)[key]
    with L.using(sd, [(first, 1.0)]):
        first_storage = target.weight.data_ptr()
    name = next(n for n, m in sd.named_modules() if m is target.module) + ".weight"
    assert target.weight.data_ptr() != first_storage and torch.equal(target.weight, before[name])  # restored
    with L.using(sd, [(second, 0.7)]):
        assert target.weight.data_ptr() == first_storage  # the spare tensor, written again
        reused = {k: v.clone() for k, v in sd.state_dict().items()}
    fresh = copy.deepcopy(tiny[0])
    merged = L.merge(fresh, [(second, 0.7)])
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in reused.items())
    merged.restore()
    assert all(torch.equal(sd.state_dict()[k], v) for k, v in before.items())
    changed = {id(t.module): t.weight for t in (L.targets(sd)[k] for k in first.layers)}.values()
    assert L.release_spare(sd) == sum(w.numel() * w.element_size() for w in changed)
    assert L.release_spare(sd) == 0
    with L.using(sd, [(first, 1.0)]):
        assert target.weight.data_ptr() != first_storage  # released: a fresh tensor


def _fail_the_third_product(monkeypatch) -> None:
    """LoRA.add_to raises MemoryError at its third call, as a merge running out of memory half-way would."""
    calls = []
    add_to = L.LoRA.add_to

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise MemoryError("out of memory")
        return add_to(self, *args, **kwargs)

    monkeypatch.setattr(L.LoRA, "add_to", failing)


def test_a_failing_merge_changes_nothing_and_spares_no_original(tiny, monkeypatch):
    """A layer ldm does not read (DoRA) is refused before any weight changes; a merge stopped half-way (here by an
    error in the third layer's product) gives every weight back, and no original weight becomes a spare."""
    sd = copy.deepcopy(tiny[0])
    before = {k: v.clone() for k, v in sd.state_dict().items()}
    tensors = _kohya_file(sd, seed=13)
    last = sorted({k.rsplit(".", 2)[0] for k in tensors})[-1]
    dora = {**tensors, f"{last}.dora_scale": torch.ones(1)}
    with pytest.raises(L.LoRAError, match="DoRA or Tucker"):
        L.merge(sd, [(L.LoRA.from_tensors(dora), 1.0)])
    assert all(torch.equal(sd.state_dict()[k], v) for k, v in before.items())

    _fail_the_third_product(monkeypatch)
    spare: dict = {}
    with pytest.raises(MemoryError):
        L.merge(sd, [(L.LoRA.from_tensors(tensors), 1.0)], spare)
    assert all(torch.equal(sd.state_dict()[k], v) for k, v in before.items())
    live = {p.data_ptr() for p in sd.parameters()}
    assert len(spare) == 2 and not any(t.data_ptr() in live for t in spare.values())
    monkeypatch.undo()
    merged = L.merge(sd, [(L.LoRA.from_tensors(tensors), 1.0)], spare)
    merged.restore()
    assert all(torch.equal(sd.state_dict()[k], v) for k, v in before.items())


def test_the_pipeline_frees_spare_weights_when_memory_is_short(tiny, monkeypatch):
    """The spare weights are a cache: kept while memory is plentiful, freed before the pipeline would tile the VAE
    for want of memory."""
    from ldm.generation import pipeline

    sd = copy.deepcopy(tiny[0])
    with L.using(sd, [(L.LoRA.from_tensors(_kohya_file(sd, seed=14)), 1.0)]):
        pass
    monkeypatch.setattr(pipeline, "available_memory", lambda device: 1 << 40)
    assert not pipeline._tiling_needed(sd, 64, 64, 1, 2, 1, 32)
    assert L.release_spare(sd) > 0  # plenty of memory: kept
    with L.using(sd, [(L.LoRA.from_tensors(_kohya_file(sd, seed=14)), 1.0)]):
        pass
    monkeypatch.setattr(pipeline, "available_memory", lambda device: 0)
    pipeline._tiling_needed(sd, 64, 64, 1, 2, 1, 32)
    assert L.release_spare(sd) == 0  # short of memory: freed


@pytest.mark.parametrize("name", ["tiny", "tiny-v2"])  # tiny-v2: open_clip's fused q, k, v rows
def test_fuse_merges_in_place_for_good(name):
    """`fuse` writes the weights `merge` gives, bit for bit, into the model's own tensors; the model then runs with
    those LoRAs only, and a bad file is refused before any weight changes."""
    sd, _ = random_model(ldm.preset(name), seed=1)
    first = L.LoRA.from_tensors(_kohya_file(sd, seed=15), source="first.safetensors")
    second = L.LoRA.from_tensors(_kohya_file(sd, seed=16, rank=3), source="second.safetensors")
    loras = [(first, 0.6), (second, -0.3)]  # two updates of the same layers
    wrong = L.LoRA.from_tensors({"lora_unet_nowhere.lora_down.weight": torch.zeros(2, 4),
                                 "lora_unet_nowhere.lora_up.weight": torch.zeros(4, 2)}, source="wrong")
    reference = copy.deepcopy(sd)
    with pytest.raises(L.LoRAError, match="match no layer"):
        L.fuse(sd, [(wrong, 1.0)])
    assert all(torch.equal(sd.state_dict()[k], v) for k, v in reference.state_dict().items())
    L.merge(reference, loras)
    storage = {k: v.data_ptr() for k, v in sd.state_dict().items()}
    L.fuse(sd, loras)
    assert {k: v.data_ptr() for k, v in sd.state_dict().items()} == storage  # in place
    fused = sd.state_dict()
    assert all(torch.equal(fused[k], v) for k, v in reference.state_dict().items())
    with L.using(sd, loras):  # the same LoRAs: the model as it is
        assert all(torch.equal(sd.state_dict()[k], v) for k, v in fused.items())
    for other in ([], [(first, 0.6)], [(first, 0.6), (second, 0.3)]):
        with pytest.raises(L.LoRAError, match=r"first.safetensors:0.6, second.safetensors:-0.3 fused into its "
                                              r"weights for good"), L.using(sd, other):
            pass
    with pytest.raises(L.LoRAError, match="for good"):
        L.fuse(sd, [(first, 1.0)])
    assert all(torch.equal(sd.state_dict()[k], v) for k, v in fused.items())


def test_a_fuse_stopped_half_way_refuses_every_later_use(tiny, monkeypatch):
    sd = copy.deepcopy(tiny[0])
    lora = L.LoRA.from_tensors(_kohya_file(sd, seed=17))
    _fail_the_third_product(monkeypatch)
    with pytest.raises(MemoryError):
        L.fuse(sd, [(lora, 1.0)])
    monkeypatch.undo()
    for use in (lambda: L.using(sd, []).__enter__(), lambda: L.using(sd, [(lora, 1.0)]).__enter__(),
                lambda: L.fuse(sd, [(lora, 1.0)])):
        with pytest.raises(L.LoRAError, match="stopped half-way, leaving its weights half merged; load the model"):
            use()
