"""The CPU fast path keeps the numerics: prepacked weights (`ldm.accel.optimize.packed_weights`) give the plain
outputs within float summation order, restore the weights bit for bit, and really run the packed kernels."""
import gc
import resource

import pytest
import torch
from torch import nn

import ldm
from ldm import accel
from ldm.accel import optimize, winograd
from ldm.models import vae as vae_module
from ldm.config import preset
from ldm.accel.cpu import cpu_features
from ldm.testing.reference import random_model

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.skipif(not optimize.mkldnn_available(), reason="needs oneDNN (mkldnn) CPU kernels"),
]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def packed_layouts(model: nn.Module) -> list[torch.layout | None]:
    """Per layer in a packed_weights block: torch._mkldnn once a call has packed it, None before."""
    return [getattr(m.__dict__[optimize.PACKED_ATTR], "layout", None) for m in model.modules()
            if optimize.PACKED_ATTR in m.__dict__]


@pytest.fixture(scope="module", params=["tiny", "tiny-v2"])
def model(request):
    sd, _ = random_model(preset(request.param), seed=3)
    return sd


def run_all(sd, latents, images, ids):
    t = torch.tensor([999, 10])
    context = sd.encode_tokens(ids)
    return {
        "text": context,
        "unet": sd.unet(latents, t, context),
        "decode": sd.vae.decode(latents),
        "encode": sd.vae.encode(images).mean,
    }


@torch.no_grad()
def test_packed_outputs_match_plain(model):
    g = torch.Generator().manual_seed(0)
    f = model.config.vae.downsample_factor
    latents = torch.randn(2, 4, 8, 8, generator=g)
    images = torch.rand(2, 3, 8 * f, 8 * f, generator=g) * 2 - 1
    ids = model.tokenize(["a red circle", "a blue square on the left"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain = run_all(model, latents, images, ids)
    accel.accelerate(model)
    try:
        n = sum(optimize.PACKED_ATTR in m.__dict__ for m in model.modules())
        assert n > 0
        packed = run_all(model, latents, images, ids)
        layouts = packed_layouts(model)
        # the packed kernels ran: every layer that was called now holds a oneDNN weight and no plain one
        assert layouts.count(torch._mkldnn) > 0.9 * n
        conv = model.unet.input_blocks[0][0]
        assert type(conv.weight) is optimize.PackedWeight
        with torch._C.DisableTorchFunctionSubclass():  # looked at without restoring it: a placeholder
            assert conv.weight.untyped_storage().nbytes() <= 4
    finally:
        accel.plain(model)
    for name in plain:
        assert packed[name].shape == plain[name].shape
        assert rel_err(packed[name], plain[name]) < 1e-5, name
    assert packed["unet"].is_contiguous()  # the samplers' arithmetic gets a plain tensor
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "weights not restored bit for bit"
    assert not optimize.is_packed(model)


@torch.no_grad()
@pytest.mark.parametrize("onednn_bf16", [True, False])
def test_packed_bf16_matches_plain_bf16(onednn_bf16, monkeypatch):
    """On every CPU: where oneDNN computes bf16 the block packs and stays within bf16 rounding of the plain path;
    where it does not (an AVX2-only CPU, or simulated here) the block packs nothing and the outputs are the plain
    ones, bit for bit."""
    if not onednn_bf16:
        monkeypatch.setattr(optimize, "onednn_supports", lambda dtype: dtype == torch.float32)
    elif not optimize.onednn_supports(torch.bfloat16):
        pytest.skip(f"oneDNN bf16 is not supported on this CPU ({cpu_features().describe()})")
    sd, _ = random_model(preset("tiny"), seed=4)
    sd.to(torch.bfloat16)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    context = sd.encode_tokens(sd.tokenize(["a cat"]))
    plain = sd.unet(x, torch.tensor([500]), context)
    with optimize.packed_weights(sd) as count:
        packed = sd.unet(x, torch.tensor([500]), context)
        layouts = packed_layouts(sd)
    if onednn_bf16:
        assert count > 0 and torch._mkldnn in layouts
        assert rel_err(packed, plain) < 2e-2  # bf16 has 8 bits of mantissa; a wrong weight gives O(1)
    else:
        assert count == 0 and layouts == []
        assert torch.equal(packed, plain)


@torch.no_grad()
def test_a_bf16_layer_computes_from_its_plain_weight_where_onednn_has_no_bf16(monkeypatch):
    """Every CPU, as on an AVX2-only one: a bf16 layer in a packed block, or one cast to bf16 inside it after
    packing in fp32, runs PyTorch's plain layer; the fp32 layers are packed as before."""
    monkeypatch.setattr(optimize, "onednn_supports", lambda dtype: dtype == torch.float32)
    conv, linear = nn.Conv2d(4, 8, 3, padding=1), nn.Linear(8, 4)
    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(2))
    with optimize.packed_weights(nn.Sequential(conv.to(torch.bfloat16), linear)) as count:
        assert count == 1  # the fp32 linear layer
        assert torch.equal(conv(x.bfloat16()), nn.functional.conv2d(x.bfloat16(), conv.weight, conv.bias, padding=1))
        assert optimize.PACKED_ATTR not in conv.__dict__
        linear(torch.randn(3, 8))  # packs
        assert linear.__dict__[optimize.PACKED_ATTR] is not None
        linear.to(torch.bfloat16)
        y = torch.randn(3, 8, dtype=torch.bfloat16)
        assert torch.equal(linear(y), nn.functional.linear(y, linear.weight, linear.bias))
        assert optimize.PACKED_ATTR not in linear.__dict__
        up = optimize.upsample_conv(conv, x.bfloat16())
        assert torch.equal(up, conv(nn.functional.interpolate(x.bfloat16(), scale_factor=2.0, mode="nearest")))


def test_the_onednn_probe_turns_an_error_into_false(monkeypatch):
    """A oneDNN kernel that refuses this CPU ("bf16 path needs the cpu support ...") is caught by the probe, once,
    and the dtype is then not packed; the real answer agrees with what packing a bf16 weight does here."""
    real = optimize.onednn_supports(torch.bfloat16)
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.ones(8, 16, dtype=torch.bfloat16), 2)
        packs = True
    except RuntimeError:
        packs = False
    assert real == packs

    def refuse(*args, **kwargs):
        raise RuntimeError("bf16 path needs the cpu support avx_ne_convert or avx512bw, avx512vl and avx512dq")

    from ldm.accel import cpu
    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_convolution_weight", refuse)
    cpu.onednn_supports.cache_clear()
    try:
        assert not cpu.onednn_supports(torch.bfloat16) and not cpu.onednn_supports(torch.float32)
    finally:
        monkeypatch.undo()
        cpu.onednn_supports.cache_clear()
    assert cpu.onednn_supports(torch.bfloat16) == real


def test_weights_restored_after_an_error_and_autograd_falls_back(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(1, 4, 8, 8)
    context = model.encode_prompt(["x"])
    with pytest.raises(RuntimeError, match="boom"):
        with optimize.packed_weights(model):
            with torch.no_grad():
                model.unet(x, torch.tensor([3]), context)
            # with autograd the plain kernels run on the (unpacked) weight: same values, gradients flow
            y = model.unet(x.requires_grad_(), torch.tensor([3]), context)
            y.sum().backward()
            assert x.grad is not None and torch.isfinite(x.grad).all()
            raise RuntimeError("boom")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_nested_blocks_and_disabled():
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(1), nn.Linear(8 * 16, 4))
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        ref = m(x)
        with optimize.packed_weights(m, enabled=False) as n:
            assert n == 0 and not optimize.is_packed(m)
        with optimize.packed_weights(m) as outer:
            with optimize.packed_weights(m) as inner:
                assert (outer, inner) == (2, 0)
                torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-6)
            assert optimize.is_packed(m)  # the inner block leaves the outer one's layers alone
        assert not optimize.is_packed(m)


@pytest.mark.parametrize("o, c, k", [(32, 48, 3), (16, 8, 1)])
def test_a_weight_packed_for_a_channels_last_input_goes_through_the_workspace(o, c, k, monkeypatch):
    """The channels-last copy oneDNN wants is made in the kept workspace; the packed weight is the same, and its
    pieces (a conv of more than SPLIT_CHANNELS inputs) give the plain weight back bit for bit."""
    monkeypatch.setattr(optimize, "SPLIT_CHANNELS", 32)
    w = torch.randn(o, c, k, k, generator=torch.Generator().manual_seed(o))
    x = torch.randn(2, c, 6, 6).contiguous(memory_format=torch.channels_last)
    args = [k // 2] * 2, [1, 1], [1, 1], 1
    winograd.workspace().release()
    last = optimize._reorder_conv(w, args, x)
    assert (winograd.workspace().buffer is not None) == (k > 1)  # a 1x1 kernel is channels-last already
    plain = optimize._reorder_conv(w, args, x.contiguous())
    assert len(optimize._pieces(last)) == -(-c // 32)
    for a, b in zip(optimize._pieces(last), optimize._pieces(plain), strict=True):
        assert torch.equal(a.to_dense(), b.to_dense())
    assert torch.equal(optimize._to_dense(last), w)
    winograd.workspace().release()


def test_multihead_attention_out_proj_is_left_alone():
    """nn.MultiheadAttention reads out_proj.weight directly; packing it would feed the placeholder."""
    mha = nn.MultiheadAttention(16, 2, batch_first=True)
    x = torch.randn(1, 5, 16)
    with torch.no_grad():
        ref = mha(x, x, x)[0]
        with optimize.packed_weights(mha) as n:
            assert n == 0
            torch.testing.assert_close(mha(x, x, x)[0], ref)


@torch.no_grad()
@pytest.mark.onednn_bf16
def test_cast_inside_the_block_uses_the_packed_values():
    """The pipeline's NaN fallback casts the VAE to fp32 and back inside the block: `.to()` sees only the
    placeholder, so the fp32 call must take its weight from the packed copy, and the exit must restore it."""
    conv = nn.Conv2d(4, 8, 3, padding=1).to(torch.bfloat16)
    x = torch.randn(1, 4, 6, 6)
    before = conv.weight.clone()
    ref = nn.functional.conv2d(x, before.float(), conv.bias.float(), padding=1)
    with optimize.packed_weights(conv):
        conv(x.bfloat16())  # packs
        conv.float()
        torch.testing.assert_close(conv(x), ref, rtol=1e-5, atol=1e-6)
        conv.to(torch.bfloat16)
        torch.testing.assert_close(conv(x.bfloat16()).float(), ref, rtol=2e-2, atol=2e-2)
    assert torch.equal(conv.weight, before)


@torch.no_grad()
def test_a_cast_to_a_dtype_onednn_cannot_pack_computes_from_the_plain_weight():
    conv = nn.Conv2d(4, 8, 3, padding=1)
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    with optimize.packed_weights(conv):
        conv.double()
        ref = nn.functional.conv2d(x, conv.weight, conv.bias, padding=1)
        assert torch.equal(conv(x), ref)
        assert torch.equal(optimize.upsample_conv(conv, x),
                           conv(nn.functional.interpolate(x, scale_factor=2.0, mode="nearest")))
        conv.float()


def test_upsample_weight_sums_the_taps_each_phase_reads():
    w = torch.arange(9.0).reshape(1, 1, 3, 3)  # w[r, c] = 3 r + c
    phases = optimize.upsample_weight(w).reshape(2, 2, 2, 2)  # (a, b, row, column)
    # output row 2i reads input rows i-1 (tap 0) and i (taps 1, 2); row 2i+1 rows i (taps 0, 1) and i+1 (tap 2)
    rows = [[[0], [1, 2]], [[0, 1], [2]]]
    for a in (0, 1):
        for b in (0, 1):
            expected = [[sum(3 * r + c for r in rows[a][p] for c in rows[b][q]) for q in (0, 1)] for p in (0, 1)]
            assert phases[a, b].tolist() == expected


@pytest.mark.parametrize("n, c, o, h, w, bias, channels_last", [
    (2, 16, 8, 5, 7, True, True), (1, 8, 8, 4, 4, False, False), (3, 32, 16, 9, 6, True, False)])
def test_upsample_conv_matches_interpolate_then_conv(n, c, o, h, w, bias, channels_last):
    conv = nn.Conv2d(c, o, 3, padding=1, bias=bias)
    x = torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(n))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    before = conv.weight.clone()
    with torch.no_grad():
        ref = conv(nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))
        assert torch.equal(optimize.upsample_conv(conv, x), ref)  # outside a packed block: the plain path
        with optimize.packed_weights(conv):
            out = optimize.upsample_conv(conv, x)
            assert optimize.UPSAMPLE_ATTR in conv.__dict__  # the phase convolution ran
            assert torch.equal(optimize.upsample_conv(conv, x), out)
            # autograd gets the plain path (and its gradients)
            with torch.enable_grad():
                assert torch.equal(optimize.upsample_conv(conv, x.clone().requires_grad_()).detach(), ref)
    assert out.shape == ref.shape and rel_err(out, ref) < 1e-5
    assert torch.equal(conv.weight, before) and optimize.UPSAMPLE_ATTR not in conv.__dict__


@torch.no_grad()
@pytest.mark.onednn_bf16
def test_upsample_conv_after_a_cast_inside_the_block():
    """The pipeline's NaN fallback runs a bf16 VAE in fp32 inside the block: the phase weights follow the dtype."""
    conv = nn.Conv2d(8, 8, 3, padding=1).to(torch.bfloat16)
    x = torch.randn(1, 8, 5, 5)
    ref = conv.float()(nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))
    conv.to(torch.bfloat16)
    with optimize.packed_weights(conv):
        low = optimize.upsample_conv(conv, x.bfloat16())
        conv.float()
        assert rel_err(optimize.upsample_conv(conv, x), ref) < 1e-5
        conv.to(torch.bfloat16)
        assert torch.equal(optimize.upsample_conv(conv, x.bfloat16()), low)
    assert rel_err(low, ref) < 2e-2


def test_winograd_weight_is_g_g_gt():
    """U = G g G^T, matrix 4 * column + row: a kernel with one tap (r, c) set gives G[:, r] G[:, c]^T."""
    g = torch.tensor(winograd.G)
    for r in range(3):
        for c in range(3):
            w = torch.zeros(1, 1, 3, 3)
            w[0, 0, r, c] = 1.0
            u = winograd.winograd_weight(w).reshape(4, 4)  # (column, row)
            assert torch.equal(u.T, torch.outer(g[:, r], g[:, c]))


@pytest.mark.parametrize("n, c, o, h, w, bias, channels_last", [
    (2, 16, 8, 8, 8, True, True), (1, 5, 7, 7, 9, False, False), (3, 8, 4, 1, 1, True, True),
    (1, 4, 6, 2, 3, True, False)])
def test_winograd_conv_matches_conv2d(n, c, o, h, w, bias, channels_last):
    gen = torch.Generator().manual_seed(h * w)
    x = torch.randn(n, c, h, w, generator=gen)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight, b = torch.randn(o, c, 3, 3, generator=gen), torch.randn(o, generator=gen) if bias else None
    ref = nn.functional.conv2d(x.double(), weight.double(), None if b is None else b.double(), padding=1)
    out = winograd.winograd_conv3x3(x, winograd.winograd_weight(weight), b)
    assert out.shape == ref.shape and out.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(out, ref) < 1e-6


@pytest.mark.parametrize("chunk_bytes", [1, 16 * 2 * 6 * 64 * 4 * 2])  # 1 tile row per chunk; 2 (7 rows: 2+2+2+1)
def test_winograd_conv_in_chunks_of_tile_rows(monkeypatch, chunk_bytes):
    monkeypatch.setattr(winograd, "CHUNK_BYTES", chunk_bytes)
    gen = torch.Generator().manual_seed(7)
    x, weight, b = torch.randn(2, 64, 13, 11, generator=gen), torch.randn(32, 64, 3, 3, generator=gen), torch.randn(32)
    ref = nn.functional.conv2d(x.double(), weight.double(), b.double(), padding=1)
    assert rel_err(winograd.winograd_conv3x3(x, winograd.winograd_weight(weight), b), ref) < 1e-6


def test_winograd_workspace_is_reused_across_chunks_and_calls():
    """The chunks' temporaries come from one aligned buffer, kept for the next calls, grown when a call needs
    more, and released on demand; results are those of fresh temporaries."""
    gen = torch.Generator().manual_seed(3)
    ws = winograd.Workspace()
    small, large = torch.randn(1, 8, 6, 7, generator=gen), torch.randn(2, 8, 12, 9, generator=gen)
    weight = torch.randn(5, 8, 3, 3, generator=gen)
    u = winograd.winograd_weight(weight)
    outs = []
    for x in (small, large, small):
        outs.append(winograd.winograd_conv3x3(x, u, ws=ws))
        assert ws.buffer is not None
        assert rel_err(outs[-1], nn.functional.conv2d(x.double(), weight.double(), padding=1)) < 1e-6
        if x is large:
            grown = ws.buffer.data_ptr()
    assert ws.buffer.data_ptr() == grown  # the smaller call took the grown buffer as it was
    assert torch.equal(outs[0], outs[2])
    views = ws.take(small, (3, 5), (7,), (2, 2))
    assert all(v.data_ptr() % 64 == 0 and v.is_contiguous() for v in views)
    whole = ws.take(small, (ws.buffer.numel(),))[0]  # a take as large as the buffer: it grows, keeping alignment
    assert whole.data_ptr() % 64 == 0 and whole.numel() <= ws.buffer.numel()
    halves = ws.take(small.bfloat16(), (3, 5), (7,))
    assert all(v.data_ptr() % 64 == 0 and v.dtype == torch.bfloat16 for v in halves)
    ws.release()
    assert ws.buffer is None


@torch.no_grad()
def test_packed_conv_takes_winograd_where_it_pays_and_keeps_the_plain_weight():
    conv = nn.Conv2d(256, 256, 3, padding=1)
    x = torch.randn(2, 256, 32, 32, generator=torch.Generator().manual_seed(0))  # 2048 output pixels
    small = x[:, :, :8, :8]  # 8 x 8: below WINOGRAD_SIZES, the packed direct convolution
    weight = conv.weight.clone()
    ref, ref_small = conv(x), conv(small)
    with optimize.packed_weights(conv):
        out = conv(x)
        assert optimize.WINOGRAD_ATTR in conv.__dict__ and conv.__dict__[optimize.PACKED_ATTR] is None
        assert torch.equal(conv.weight, weight)  # not packed, so not released: the cache comes on top
        assert rel_err(conv(small), ref_small) < 1e-5
        assert conv.__dict__[optimize.PACKED_ATTR] is not None
        assert rel_err(conv(x), ref) < 1e-5  # from the Winograd weight made before
        optimize.release_derived_weights(conv)
        large = torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(1))  # the UNet's 64 x 64 level
        assert rel_err(conv(large), nn.functional.conv2d(large, weight, conv.bias, padding=1)) < 1e-5
        assert optimize.WINOGRAD_ATTR in conv.__dict__
        with torch.enable_grad():
            assert torch.equal(conv(x.clone().requires_grad_()).detach(), ref)  # autograd: the plain path
    assert rel_err(out, ref) < 1e-5
    assert torch.equal(conv.weight, weight) and optimize.WINOGRAD_ATTR not in conv.__dict__


@torch.no_grad()
@pytest.mark.onednn_bf16
def test_packed_bf16_conv_takes_winograd_where_it_pays():
    conv = nn.Conv2d(256, 256, 3, padding=1)
    x = torch.randn(2, 256, 32, 32, generator=torch.Generator().manual_seed(0))  # 2048 output pixels
    ref = conv(x)
    conv.to(torch.bfloat16)
    direct = nn.functional.conv2d(x.bfloat16(), conv.weight, conv.bias, padding=1)
    with optimize.packed_weights(conv):
        low = conv(x.bfloat16())
        assert optimize.WINOGRAD_ATTR in conv.__dict__  # bf16 too
        assert conv.__dict__[optimize.WINOGRAD_ATTR][0].dtype == torch.bfloat16
    # about one bf16 step of the largest output (2 ** -8 = 3.9e-3), a few times the direct bf16 convolution's error;
    # a wrong transform or weight gives O(1)
    assert rel_err(low, ref) < 2e-2 and rel_err(low, ref) < 4 * rel_err(direct, ref)


@torch.no_grad()
def test_conv_with_many_input_channels_runs_in_pieces(monkeypatch):
    monkeypatch.setattr(optimize, "SPLIT_CHANNELS", 8)
    conv = nn.Conv2d(20, 6, 3, padding=1)
    x = torch.randn(2, 20, 5, 6, generator=torch.Generator().manual_seed(1)).contiguous(
        memory_format=torch.channels_last)
    weight = conv.weight.clone()
    ref = conv(x)
    with optimize.packed_weights(conv):
        out = conv(x)
        pieces = conv.__dict__[optimize.PACKED_ATTR]
        assert [p.shape[1] for p in pieces] == [7, 7, 6]
    assert rel_err(out, ref) < 1e-5
    assert torch.equal(conv.weight, weight)  # the pieces concatenated back, bit for bit
    with optimize.packed_weights(conv):
        conv(x)
        # a cast inside the block casts the plain weight, the pieces joined, as on a module never packed
        assert rel_err(conv.to(torch.bfloat16)(x.bfloat16()), ref) < 2e-2
    assert torch.equal(conv.weight, weight.bfloat16())


@pytest.mark.parametrize("tiling", [False, True])
def test_pipeline_prepacked_matches_plain(monkeypatch, tiling):
    """txt2img with an accelerated model on CPU computes from packed weights; the plain model gives the same
    latents."""
    sd, _ = random_model(preset("tiny"), seed=5)
    accel.accelerate(sd)
    kwargs = dict(steps=3, sampler="euler", seed=7, width=64, height=64, vae_tiling=tiling, vae_tile_size=32)
    calls = []
    real = optimize._packed
    monkeypatch.setattr(optimize, "_packed", lambda m, reorder: calls.append(m) or real(m, reorder))
    derived = []  # whether the UNet holds upsampling-phase weights, after each UNet call and at the decode

    def record(*_):
        derived.append(any(optimize.UPSAMPLE_ATTR in m.__dict__ for m in sd.unet.modules()))
    hooks = [sd.unet.register_forward_hook(record), sd.vae.decoder.register_forward_pre_hook(record)]
    packed = ldm.txt2img(sd, "a red circle", **kwargs)
    for h in hooks:
        h.remove()
    assert {sd.unet.input_blocks[0][0], sd.vae.decoder.conv_out} <= set(calls)  # the packed kernels ran
    assert derived[:3] == [True] * 3 and not any(derived[3:])  # released when sampling ends
    plain = ldm.txt2img(accel.plain(sd), "a red circle", **kwargs)
    assert rel_err(packed.latents, plain.latents) < 1e-5
    diff = (torch.tensor(list(packed.images[0].getdata())) - torch.tensor(list(plain.images[0].getdata()))).abs()
    assert diff.max() <= 1
    assert not optimize.is_packed(sd)


@pytest.mark.skipif(optimize._glibc() is None, reason="tunes glibc's malloc")
def test_leaving_a_packed_block_gives_the_heaps_free_memory_back(monkeypatch):
    """Packed weights made inside keep_freed_memory live in the heap; once restored, their memory is trimmed."""
    trims = []
    real = optimize._glibc()

    class Libc:
        def malloc_trim(self, pad):
            trims.append(pad.value)
            return real.malloc_trim(pad)

        def __getattr__(self, name):
            return getattr(real, name)

    monkeypatch.setattr(optimize, "_glibc", lambda: Libc())
    layer = nn.Conv2d(64, 64, 3, padding=1)
    with torch.no_grad(), optimize.packed_weights(layer):
        with optimize.keep_freed_memory(1 << 20):
            layer(torch.randn(1, 64, 8, 8))
        trims.clear()
    assert trims == [0]
    with optimize.packed_weights(nn.Sequential()):  # nothing packed: nothing to trim
        pass
    assert trims == [0]


class _OneConvUNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cfg = type("Cfg", (), {"model_channels": 4})()
        self.conv = nn.Conv2d(256, 256, 3, padding=1)


@torch.no_grad()
def test_sampling_memory_releases_derived_weights_even_on_error(monkeypatch):
    """... and before the kept-memory block's heap trim, so that the trim returns their memory."""
    unet = _OneConvUNet()
    x = torch.randn(2, 256, 32, 32, generator=torch.Generator().manual_seed(4))
    held_at_trim = []
    monkeypatch.setattr(optimize, "trim_heap", lambda: held_at_trim.append(optimize.WINOGRAD_ATTR in unet.conv.__dict__))
    with optimize.packed_weights(unet):
        with pytest.raises(RuntimeError, match="a sampler error"):
            with optimize.sampling_memory(unet, 2, 32, 32, "cpu"):
                unet.conv(x)
                assert optimize.WINOGRAD_ATTR in unet.conv.__dict__
                raise RuntimeError("a sampler error")
        assert optimize.WINOGRAD_ATTR not in unet.conv.__dict__
        assert winograd.workspace().buffer is None
        assert held_at_trim == ([False] if optimize._glibc() else [])


@torch.no_grad()
def test_decode_releases_the_vaes_derived_weights(monkeypatch):
    """Inside an outer packed block (several calls) the VAE's upsampling-phase weights are not held after a decode,
    so the next call's sampling does not carry them; an untiled decode runs each layer once, so it frees each
    derived weight after its use (`single_pass`)."""
    from ldm.generation.pipeline import decode

    sd, _ = random_model(preset("tiny"), seed=5)
    made, seen = [], []
    monkeypatch.setattr(optimize, "upsample_weight", lambda w, f=optimize.upsample_weight: made.append(1) or f(w))
    hook = sd.vae.decoder.conv_out.register_forward_pre_hook(
        lambda *_: seen.append(any(optimize.UPSAMPLE_ATTR in m.__dict__ for m in sd.vae.modules())))
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    accel.accelerate(sd)
    for _ in range(2):
        decode(sd, z, image_by_image=True)
        assert not any(optimize.UPSAMPLE_ATTR in m.__dict__ for m in sd.vae.modules())
    hook.remove()
    upsamplings = sum(isinstance(m, vae_module.Upsample) for m in sd.vae.decoder.modules())
    assert seen == [False] * 4 and len(made) == 4 * upsamplings  # the phase path ran, its weights made per image


@torch.no_grad()
def test_derived_weights_are_kept_for_the_next_call_except_in_a_single_pass(monkeypatch):
    conv = nn.Conv2d(256, 256, 3, padding=1)
    x = torch.randn(1, 256, 48, 48, generator=torch.Generator().manual_seed(6))
    made = []
    monkeypatch.setattr(optimize, "winograd_weight", lambda w, f=optimize.winograd_weight: made.append(1) or f(w))
    with optimize.packed_weights(conv):
        first = conv(x)
        assert torch.equal(conv(x), first) and len(made) == 1  # kept for the second call
        optimize.release_derived_weights(conv)
        with optimize.single_pass():
            assert torch.equal(conv(x), first) and torch.equal(conv(x), first)
            assert optimize.WINOGRAD_ATTR not in conv.__dict__ and len(made) == 3  # made per call, not kept
        conv(x)
        assert optimize.WINOGRAD_ATTR in conv.__dict__  # kept again outside the pass
    torch.testing.assert_close(first, conv(x), rtol=0, atol=1e-4)


def test_cli_compile_without_a_compiler_is_a_usage_error(tmp_path, monkeypatch, capsys):
    from ldm import cli

    monkeypatch.setattr(cli.shutil, "which", lambda name: None)
    code = cli.main(["txt2img", "a red circle", "--compile", "--device", "cpu", "--outdir", str(tmp_path)])
    assert code == 2
    assert "C++ compiler" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
@torch.no_grad()
def test_compiled_unet_matches_eager():
    """torch.compile (inductor, freezing on CPU) keeps the numerics; ~1 min of compiling, so marked slow."""
    sd, _ = random_model(preset("tiny"), seed=6)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    t, context = torch.tensor([999, 10]), sd.encode_prompt(["a", "b"])
    eager = sd.unet(x, t, context)
    optimize.compile_model(sd)
    assert optimize.is_compiled(sd.unet)
    assert rel_err(sd.unet(x, t, context), eager) < 1e-5
    assert set(sd.state_dict()) == set(sd.unet.state_dict(prefix="model.diffusion_model.")) | {
        k for k in sd.state_dict() if not k.startswith("model.diffusion_model.")}


def _faults_to_fill(nbytes: int) -> int:
    """Minor page faults taken to allocate and fill a fresh tensor of `nbytes` (then freed)."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(nbytes // 4).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def _fewest_faults(nbytes: int, tries: int = 6) -> int:
    """The fewest faults of several fills in a row: once the heap has settled (small allocations in between may
    take the start of a freed block, so the next one lands elsewhere a few times), a fill reuses freed memory."""
    return min(_faults_to_fill(nbytes) for _ in range(tries))


def _rss() -> int:
    """The process's resident memory in bytes, now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


@pytest.mark.skipif(optimize._glibc() is None, reason="tunes glibc's malloc")
def test_keep_freed_memory_reuses_large_blocks_and_gives_them_back():
    """Outside the block a 96 MiB block is fresh pages every time (24k faults); inside it freed memory is reused.
    On exit the heap is trimmed: the process's memory is back where it was."""
    size = 96 << 20
    _faults_to_fill(size)
    assert _faults_to_fill(size) > size // 4096 // 2
    rss_before = _rss()
    with optimize.keep_freed_memory(size) as applied:
        assert applied
        assert _fewest_faults(size) < size // 4096 // 10
        with optimize.keep_freed_memory(4 << 20):  # nested: the outer block's settings stay
            assert _fewest_faults(size) < size // 4096 // 10
        assert _rss() > rss_before + size // 2
    assert _rss() < rss_before + size // 4
    assert _faults_to_fill(size) > size // 4096 // 2
    with optimize.keep_freed_memory(size, device="meta") as applied:  # not CPU memory: nothing to do
        assert not applied


@pytest.mark.parametrize("name", ["tiny", "sd-v1", "sd-v2"])
def test_largest_activation_bounds_every_output_of_a_unet_call(name):
    """keep_freed_memory's bound in the sampling loop: the largest output of any layer of a UNet call (shapes on
    the meta device, no arithmetic); exact for SD, whose first level has attention."""
    cfg = preset(name)
    with torch.device("meta"):
        unet = ldm.StableDiffusion(cfg).unet
    h = w = 64 if name == "sd-v1" else 12
    largest = []
    for m in unet.modules():
        if not list(m.children()):
            m.register_forward_hook(lambda m, a, out: largest.append(out.numel() * out.element_size()))
    unet(torch.empty(2, 4, h, w, device="meta"), torch.zeros(2, device="meta"),
         torch.empty(2, 77, cfg.unet.context_dim, device="meta"))
    bound = optimize.largest_activation(unet, 2, h, w)
    assert max(largest) == bound if name != "tiny" else max(largest) <= bound  # tiny: no attention at level 0


def _frozen(name: str = "tiny", seed: int = 5):
    sd, state = random_model(preset(name), seed=seed)
    return accel.accelerate(sd.requires_grad_(False)), {k: v.clone() for k, v in state.items()}


def _count_packing(monkeypatch) -> list[nn.Module]:
    """The layers whose weight gets packed from now on, one entry per packing."""
    packed = []
    real = optimize._packed

    def record(m, reorder):
        if m.__dict__[optimize.PACKED_ATTR] is None:
            packed.append(m)
        return real(m, reorder)
    monkeypatch.setattr(optimize, "_packed", record)
    return packed


def test_an_accelerated_model_keeps_its_packed_weights_between_calls(monkeypatch):
    """Only the first call packs; later calls give the same images to the bit; a plain model is never packed."""
    sd, _ = _frozen()
    packs = _count_packing(monkeypatch)
    kwargs = dict(steps=3, sampler="euler", seed=7, width=64, height=64)
    first = ldm.txt2img(sd, "a red circle", **kwargs)
    n = len(packs)
    assert n > 0 and optimize.is_packed(sd)
    second = ldm.txt2img(sd, "a red circle", **kwargs)
    assert len(packs) == n  # nothing packed again
    assert torch.equal(first.latents, second.latents)
    assert not any(optimize.WINOGRAD_ATTR in m.__dict__ or optimize.UPSAMPLE_ATTR in m.__dict__
                   for m in sd.modules())  # derived weights are per call
    trained, _ = random_model(preset("tiny"), seed=5)  # plain, and requires grad
    assert rel_err(ldm.txt2img(trained, "a red circle", **kwargs).latents, first.latents) < 1e-5
    assert not optimize.is_packed(trained)


USES = {
    "state_dict": lambda sd, w: sd.state_dict()["model.diffusion_model.input_blocks.0.0.weight"],
    "arithmetic": lambda sd, w: w + 0,
    "clone": lambda sd, w: w.clone(),
    "data": lambda sd, w: w.data.clone(),
    "to float64": lambda sd, w: sd.unet.to(torch.float64).input_blocks[0][0].weight.float(),
    "requires_grad_": lambda sd, w: sd.requires_grad_(True).unet.input_blocks[0][0].weight.detach(),
    "numpy": lambda sd, w: torch.from_numpy(w.detach().numpy()),
}


@pytest.mark.parametrize("use", USES)
def test_any_use_of_a_packed_weight_gives_the_plain_one_back(use, monkeypatch):
    sd, state = _frozen()
    ldm.txt2img(sd, "a red circle", steps=2, sampler="euler", seed=1, width=64, height=64)
    conv = sd.unet.input_blocks[0][0]
    w = conv.weight
    assert type(w) is optimize.PackedWeight
    # its shape, dtype and device are read without restoring it (the pipeline reads them at every call)
    assert (w.shape, w.dtype, w.device, w.requires_grad, w.numel()) == ((32, 4, 3, 3), torch.float32,
                                                                          torch.device("cpu"), False, 1152)
    assert sd.device.type == "cpu" and sd.dtype == torch.float32 and type(w) is optimize.PackedWeight
    value = USES[use](sd, w)
    assert type(w) is nn.Parameter and conv.weight is w  # the same Parameter, plain again
    assert torch.equal(value.float(), state["model.diffusion_model.input_blocks.0.0.weight"])
    assert conv.__dict__[optimize.PACKED_ATTR] is None  # packed again at its next inference call


def test_state_dict_of_a_packed_model_is_the_checkpoint_and_training_sees_the_weights(monkeypatch):
    sd, state = _frozen()
    ldm.txt2img(sd, "a red circle", steps=2, sampler="euler", seed=1, width=64, height=64)
    assert optimize.is_packed(sd)
    after = sd.state_dict()
    assert all(torch.equal(after[k], state[k]) for k in state)
    ldm.txt2img(sd, "a red circle", steps=2, sampler="euler", seed=1, width=64, height=64)  # packs again
    # an optimizer step on a model packed between calls: the gradient reaches the Parameters and updates them
    unet = sd.unet
    params = list(unet.parameters())
    opt = torch.optim.SGD(params, lr=0.1)
    unet.requires_grad_(True)
    x = torch.randn(1, 4, 8, 8)
    unet(x, torch.tensor([10]), torch.randn(1, 77, sd.config.unet.context_dim)).square().mean().backward()
    assert all(p.grad is not None for p in params if p.dim() > 1)
    opt.step()
    moved = unet.state_dict()
    key = "input_blocks.0.0.weight"
    assert not torch.equal(moved[key], state[f"model.diffusion_model.{key}"])
    assert not any(type(p) is optimize.PackedWeight for p in unet.parameters())


@torch.no_grad()
def test_a_packed_layer_called_under_autograd_computes_the_gradient_of_its_parameter():
    layer = nn.Linear(8, 4).requires_grad_(False)
    x = torch.randn(3, 8)
    with optimize.packed_weights(layer, keep=True):
        ref = layer(x)
    assert type(layer.weight) is optimize.PackedWeight
    layer.weight.requires_grad_(True)  # a use: restores it
    with torch.enable_grad():
        out = layer(x)
        out.sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.weight.grad, x.sum(0).expand(4, 8))


def test_a_packed_weight_whose_layer_is_gone_refuses_to_give_values():
    layer = nn.Linear(8, 4)
    with torch.no_grad(), optimize.packed_weights(layer, keep=True):
        layer(torch.randn(2, 8))
    w = layer.weight
    del layer
    gc.collect()  # the layer's packed forward, a method bound to it, makes a reference cycle
    with pytest.raises(RuntimeError, match="no longer exists"):
        w + 1


def test_ldm_load_returns_a_frozen_model(tmp_path):
    sd, _ = random_model(preset("tiny"), seed=1)
    path = tmp_path / "m.safetensors"
    ldm.save(sd, path)
    loaded = ldm.load(path)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())


def test_a_copy_of_a_packed_model_is_plain_and_generates_the_same_images():
    import copy

    sd, state = _frozen()
    kwargs = dict(steps=2, sampler="euler", seed=1, width=64, height=64)
    first = ldm.txt2img(sd, "a red circle", **kwargs)
    twin = copy.deepcopy(sd)
    assert optimize.is_packed(sd)  # the original keeps its packed weights
    assert not any(type(p) is optimize.PackedWeight for p in twin.parameters())
    copied = twin.state_dict()
    assert all(torch.equal(copied[k], state[k]) for k in state)
    assert torch.equal(ldm.txt2img(twin, "a red circle", **kwargs).latents, first.latents)
    assert torch.equal(ldm.txt2img(sd, "a red circle", **kwargs).latents, first.latents)


@torch.no_grad()
def test_a_layer_packed_at_one_size_stays_packed_when_another_size_takes_winograd():
    """With weights kept between calls, a layer packed for a small image (direct convolution) derives its Winograd
    weight for a larger one from the packed copy, and stays packed."""
    conv = nn.Conv2d(256, 256, 3, padding=1).requires_grad_(False)
    g = torch.Generator().manual_seed(8)
    small, large = torch.randn(2, 256, 8, 8, generator=g), torch.randn(2, 256, 32, 32, generator=g)
    ref_small, ref_large = conv(small), conv(large)
    with optimize.packed_weights(conv, keep=True):
        assert rel_err(conv(small), ref_small) < 1e-5
    with optimize.packed_weights(conv, keep=True):
        assert rel_err(conv(large), ref_large) < 1e-5
        assert optimize.WINOGRAD_ATTR in conv.__dict__
        assert type(conv.weight) is optimize.PackedWeight and conv.__dict__[optimize.PACKED_ATTR] is not None


@torch.no_grad()
@pytest.mark.onednn_bf16
def test_a_derived_weight_made_for_another_dtype_is_made_again():
    """The pipeline's fp32 retry of a bf16 VAE decode casts the VAE inside the block: a tiled decode keeps the
    Winograd weights it made in bf16, which an fp32 call must not use."""
    conv = nn.Conv2d(256, 256, 3, padding=1)
    x = torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(9))
    ref = conv(x)
    conv.to(torch.bfloat16)
    with optimize.packed_weights(conv):
        conv(x.bfloat16())
        assert conv.__dict__[optimize.WINOGRAD_ATTR][0].dtype == torch.bfloat16
        conv.float()
        assert rel_err(conv(x), ref) < 2e-2  # the weight went through bf16; the arithmetic is fp32
        assert conv.__dict__[optimize.WINOGRAD_ATTR][0].dtype == torch.float32
