"""ldm.accel: the accelerated forwards give the plain networks' results to the bit (memory layout included), packed
weights to float rounding; `accelerate` changes only the model it is handed, `plain` undoes it, and wrapped layers
(a LoRA) keep the fast path."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import ldm
from ldm import accel
from ldm.accel import optimize
from ldm.accel.forwards import FORWARDS, add_into, add_residual, silu
from ldm.testing.reference import random_model


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """The tiny models run on one thread (see conftest.one_torch_thread)."""


def _inputs(sd):
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 700])
    context = torch.randn(2, 77, sd.config.unet.context_dim, generator=g)
    image = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    y = torch.randn(2, sd.config.unet.adm_in_channels, generator=g) if sd.config.sdxl else None
    return x, t, context, image, y


def _run(sd, x, t, context, image, y):
    """UNet output, VAE posterior mean and decode: every block with an accelerated forward."""
    unet = sd.unet(x, t, context) if y is None else sd.unet(x, t, context, y)
    return unet, sd.vae.encode(image).mean, sd.vae.decode(x[:1])


@pytest.mark.parametrize("name", ["tiny", "tiny-v2", "tiny-sdxl"])
def test_accelerated_forwards_equal_the_plain_networks_to_the_bit(name, monkeypatch):
    monkeypatch.setattr(optimize, "mark_for_packing", lambda model: 0)  # the forwards alone
    plain, _ = random_model(ldm.preset(name))
    plain.requires_grad_(False)
    fast = accel.accelerate(copy.deepcopy(plain))
    assert sum("forward" in m.__dict__ for m in fast.modules()) > 10
    assert not any("forward" in m.__dict__ for m in plain.modules())  # the copy only
    inputs = _inputs(plain)
    with torch.no_grad():
        for a, b in zip(_run(fast, *inputs), _run(plain, *inputs)):
            assert a.stride() == b.stride()
            assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["tiny", "tiny-v2", "tiny-sdxl"])
def test_in_place_inference_equals_the_out_of_place_expressions_on_packed_weights(name, monkeypatch):
    # the packed upsampling (optimize.upsample_conv, inference only) sums in another order: test_optimize checks it
    monkeypatch.setattr(optimize, "_upsamples_fast", lambda conv, x: False)
    sd, _ = random_model(ldm.preset(name))
    # no tensor needs grad: in grad mode a layer whose input needs grad computes from its plain weight (another
    # oneDNN kernel than the packed one, whose rounding differs on some CPUs, e.g. AMD Zen 4)
    sd.requires_grad_(False)
    accel.accelerate(sd)
    inputs = _inputs(sd)
    with torch.enable_grad():  # grad mode on: the accelerated forwards run the plain expressions
        reference = [r.detach() for r in _run(sd, *inputs)]
    with torch.no_grad():
        fast = _run(sd, *inputs)
    for a, b in zip(fast, reference):
        assert a.stride() == b.stride()
        assert torch.equal(a, b)


def test_helpers_take_the_layout_of_the_out_of_place_sum():
    a = torch.randn(2, 3, 4, 4)
    for b in (torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4).contiguous(memory_format=torch.channels_last)):
        expected = a + b
        with torch.no_grad():
            out = add_residual(a.clone(), b.clone())
        assert out.stride() == expected.stride() and torch.equal(out, expected)
        with torch.no_grad():
            fresh = a.clone()
            out = add_into(fresh, b)
        assert out.data_ptr() == fresh.data_ptr() and torch.equal(out, expected)  # summed into a, a's layout
    with torch.no_grad():
        b = torch.randn(2, 3, 4, 4)
        assert add_residual(a, b).data_ptr() == b.data_ptr()  # same layout: in place
        y = torch.randn(5)
        assert silu(y).data_ptr() == y.data_ptr()
    y = torch.randn(5)
    assert silu(y).data_ptr() != y.data_ptr()  # grad mode: a new tensor, the input kept for others


class LoRALinear(nn.Module):
    """A LoRA as kohya and diffusers apply it without merging: the base layer wrapped, plus a low-rank update."""

    def __init__(self, base: nn.Linear, rank: int = 2, scale: float = 0.5):
        super().__init__()
        self.base = base
        self.down = nn.Linear(base.in_features, rank, bias=False)
        self.up = nn.Linear(rank, base.out_features, bias=False)
        self.scale = scale

    def forward(self, x):
        return self.base(x) + self.scale * self.up(self.down(x))


def _wrap_attention_projections(sd) -> list[LoRALinear]:
    wrappers = []
    for m in sd.unet.modules():
        if type(m).__name__ == "CrossAttention":
            for name in ("to_q", "to_k", "to_v"):
                wrapper = LoRALinear(getattr(m, name))
                nn.init.normal_(wrapper.up.weight, std=0.5, generator=torch.Generator().manual_seed(len(wrappers)))
                setattr(m, name, wrapper)
                wrappers.append(wrapper)
    return wrappers


@torch.no_grad()
def test_layers_wrapped_by_a_lora_keep_the_fast_path():
    plain, _ = random_model(ldm.preset("tiny"), seed=2)
    wrappers = _wrap_attention_projections(plain.requires_grad_(False))
    fast = accel.accelerate(copy.deepcopy(plain))
    x, t, context, _, _ = _inputs(plain)
    expected = plain.unet(x, t, context)
    out = fast.unet(x, t, context)
    packed = [m for m in fast.unet.modules() if isinstance(m, LoRALinear)]
    assert len(packed) == len(wrappers) > 0
    # every wrapped base layer and LoRA projection ran from a packed weight
    assert all(isinstance(layer.__dict__.get(optimize.PACKED_ATTR), torch.Tensor)
               for w in packed for layer in (w.base, w.down, w.up))
    assert (out - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert (expected - random_model(ldm.preset("tiny"), seed=2)[0].unet(x, t, context)).abs().max() > 1e-3  # it acts


@torch.no_grad()
def test_plain_undoes_accelerate_bit_for_bit():
    sd, state = random_model(ldm.preset("tiny"), seed=3)
    sd.requires_grad_(False)
    inputs = _inputs(sd)
    before = [r.clone() for r in _run(sd, *inputs)]
    accel.accelerate(sd)
    assert accel.is_accelerated(sd) and accel.shares_latents(sd.unet)
    _run(sd, *inputs)
    assert optimize.is_packed(sd)
    accel.plain(sd)
    assert not accel.is_accelerated(sd) and not accel.shares_latents(sd.unet)
    assert not any("forward" in m.__dict__ or optimize.PACKED_ATTR in m.__dict__ for m in sd.modules())
    after = sd.state_dict()
    assert all(torch.equal(after[k], v) for k, v in state.items())
    assert all(torch.equal(a, b) for a, b in zip(_run(sd, *inputs), before))


def test_ldm_load_accelerates_unless_asked_not_to(tmp_path):
    sd, _ = random_model(ldm.preset("tiny"), seed=1)
    path = tmp_path / "m.safetensors"
    ldm.save(sd, path)
    assert accel.is_accelerated(ldm.load(path))
    plain = ldm.load(path, accelerate=False)
    assert not accel.is_accelerated(plain)
    assert not any("forward" in m.__dict__ for m in plain.modules())
    assert set(FORWARDS) >= {type(plain.unet), type(plain.vae.decoder)}
