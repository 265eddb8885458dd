"""ldm.accel.ops: the in-place SiLU and residual sums of inference give the out-of-place results to the bit, memory
layout included, so that inference-time optimisation never changes what training or `make demo-model` computes
(the demo VAE's frozen encoder runs without grad inside training)."""
from __future__ import annotations

import pytest
import torch

import ldm
from ldm.accel import optimize
from ldm.accel.ops import add_into, add_residual, silu
from ldm.accel.optimize import for_inference
from reference import random_model


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """The tiny models run on one thread (see conftest.one_torch_thread)."""


def _run(sd, x, t, context, image):
    """UNet output, VAE posterior mean and decode: the parts that use ldm.accel.ops."""
    return sd.unet(x, t, context), sd.vae.encode(image).mean, sd.vae.decode(x[:1])


@pytest.mark.parametrize("name", ["tiny", "tiny-v2"])
@pytest.mark.parametrize("packed", [False, True])
def test_inference_in_place_equals_the_out_of_place_expressions(name, packed, monkeypatch):
    # the packed upsampling (optimize.upsample_conv, inference only) sums in another order: test_optimize checks it
    monkeypatch.setattr(optimize, "_upsamples_fast", lambda conv, x: False)
    sd, _ = random_model(ldm.preset(name))
    # no tensor needs grad: in grad mode a layer whose input needs grad computes from its plain weight (another
    # oneDNN kernel than the packed one, whose rounding differs on some CPUs, e.g. AMD Zen 4)
    sd.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 700])
    context = torch.randn(2, 77, sd.config.unet.context_dim, generator=g)
    image = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    with for_inference(sd) if packed else torch.no_grad():
        with torch.enable_grad():  # grad mode on: ldm.accel.ops runs the plain expressions (no tensor needs grad)
            reference = [r.detach() for r in _run(sd, x, t, context, image)]
        with torch.no_grad():
            fast = _run(sd, x, t, context, image)
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
