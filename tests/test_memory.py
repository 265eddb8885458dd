"""Memory options: exact tiled VAE decode and encode (`ldm.models.tiling`), attention slicing (`ldm.models.attention`), and the
`vae_tiling` / `vae_slicing` / `attention_slicing` options of the pipeline and the CLI, which must not change the
image. The VAE is the tiny preset's (four levels, f = 8, 1x1 shortcuts where the width changes) with seeded random
weights, and tiles small enough to give several tiles per axis at every level, the last ones smaller."""
from __future__ import annotations

import threading

import json

import numpy as np
import pytest
import torch
from PIL import Image

import ldm
from ldm.models import attention
from ldm.cli import main
from ldm.demo import DEMO_CHECKPOINT
from ldm.data.shapes import ShapeSpec, render
from ldm.generation.images import from_pil
from ldm.generation.pipeline import txt2img
from ldm.models.tiling import tiled_decode, tiled_encode

TILE = 24  # image pixels: tiles of 3 latent pixels at the lowest level
LATENT_HW = (9, 11)  # 72x88 images: 3 x 4 tiles, the last column 16 pixels wide


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """The tiny models run on one thread (see conftest.one_torch_thread)."""


@pytest.fixture(scope="module")
def latents() -> torch.Tensor:
    return torch.randn(2, 4, *LATENT_HW, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def decoded(tiny, latents) -> tuple[torch.Tensor, torch.Tensor]:
    """(untiled, tiled) decodes of the same latents."""
    with torch.no_grad():
        return tiny.vae.decode(latents), tiny.vae.decode(latents, tiled=True, tile_size=TILE)


def naive_tiled_decode(vae, latents: torch.Tensor, tile_size: int) -> torch.Tensor:
    """The negative control: each latent tile decoded on its own (no halo, its own GroupNorm statistics)."""
    f = vae.cfg.downsample_factor
    t = tile_size // f
    out = torch.empty(latents.shape[0], 3, latents.shape[2] * f, latents.shape[3] * f)
    with torch.no_grad():
        for r in range(0, latents.shape[2], t):
            for c in range(0, latents.shape[3], t):
                out[:, :, r * f:(r + t) * f, c * f:(c + t) * f] = vae.decode(latents[:, :, r:r + t, c:c + t])
    return out


def away_from_seams(images: torch.Tensor, tile: int, margin: int) -> torch.Tensor:
    """The pixels at least `margin` pixels from every tile seam."""
    rows = torch.arange(images.shape[2]) % tile
    cols = torch.arange(images.shape[3]) % tile
    far_r = (rows >= margin) & (rows < tile - margin)
    far_c = (cols >= margin) & (cols < tile - margin)
    return images[:, :, far_r][:, :, :, far_c]


# --- tiled VAE ---------------------------------------------------------------------------------------------------

def test_tiled_decode_equals_the_untiled_decode(decoded):
    full, tiled = decoded
    assert tiled.shape == full.shape == (2, 3, 72, 88)
    assert (tiled - full).abs().max() <= 1e-4
    assert (away_from_seams(tiled, TILE, 8) - away_from_seams(full, TILE, 8)).abs().max() <= 1e-4


def test_naive_tiles_fail_the_match_even_far_from_the_seams(tiny, latents, decoded):
    """Per-tile GroupNorm statistics change every pixel of a tile, not only those near its seams: this is why the
    statistics must be global, and shows that the match test above can fail."""
    full, _ = decoded
    naive = naive_tiled_decode(tiny.vae, latents, TILE)
    assert (away_from_seams(naive, TILE, 8) - away_from_seams(full, TILE, 8)).abs().max() > 0.05


def max_steps(images: torch.Tensor, dim: int, tile: int) -> tuple[float, float]:
    """The largest step between neighbouring pixels along `dim` (2: rows, 3: columns): (across a seam, elsewhere)."""
    steps = images.diff(dim=dim).abs().movedim(dim, 0)  # steps[i]: between pixels i and i + 1
    seam = torch.zeros(steps.shape[0], dtype=torch.bool)
    seam[tile - 1::tile] = True
    return steps[seam].max().item(), steps[~seam].max().item()


@pytest.mark.skipif(not DEMO_CHECKPOINT.is_file(), reason="needs the bundled demo model (`make demo-model`)")
def test_tiled_decode_has_no_visible_seams():
    """On an image a trained VAE decodes smoothly (the demo model's: random weights decode to noise, whose steps
    are large everywhere), no step across a seam is larger than the largest step elsewhere. The naive per-tile
    decode fails the same test."""
    vae = ldm.load(DEMO_CHECKPOINT).vae
    image = from_pil(render(ShapeSpec("small", "yellow", "triangle", "right", "purple"), 64))
    tile = 24  # seams at rows and columns 24 and 48, across the plain background
    with torch.no_grad():
        latents = vae.encode(image).mean
        tiled = vae.decode(latents, tiled=True, tile_size=tile)
    naive = naive_tiled_decode(vae, latents, tile)
    for dim in (2, 3):
        at_seams, elsewhere = max_steps(tiled, dim, tile)
        assert at_seams <= elsewhere
        at_seams, elsewhere = max_steps(naive, dim, tile)
        assert at_seams > elsewhere


@pytest.mark.parametrize("tile", [8, 40, 512])  # the smallest tile (1 latent pixel), uneven tiles, one tile
def test_tiled_decode_any_tile_size(tiny, latents, decoded, tile):
    full, _ = decoded
    assert (tiny.vae.decode(latents, tiled=True, tile_size=tile) - full).abs().max() <= 1e-4


def test_tiled_encode_equals_the_untiled_encode(tiny):
    images = torch.rand(2, 3, 72, 88, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        full = tiny.vae.encode(images)
        tiled = tiny.vae.encode(images, tiled=True, tile_size=TILE)
    assert (tiled.mean - full.mean).abs().max() <= 1e-4
    assert (tiled.logvar - full.logvar).abs().max() <= 1e-4


def test_tiled_ops_do_not_build_a_graph_or_touch_the_input(tiny, latents):
    before = latents.clone()
    images = tiled_decode(tiny.vae, latents, TILE)
    moments = tiled_encode(tiny.vae, images, TILE)
    assert torch.equal(latents, before) and not images.requires_grad and not moments.requires_grad


@pytest.mark.parametrize("tile", [4, 0, 12.0])
def test_bad_tile_size(tiny, latents, tile):
    with pytest.raises(ValueError, match="tile size"):
        tiny.vae.decode(latents, tiled=True, tile_size=tile)


# --- attention slicing -------------------------------------------------------------------------------------------

@pytest.fixture()
def qkv() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """37 queries (no slice size used below divides it), 23 keys and values, 2 heads of width 8."""
    g = torch.Generator().manual_seed(2)
    return torch.randn(2, 37, 16, generator=g), torch.randn(2, 23, 16, generator=g), torch.randn(2, 23, 16, generator=g)


@pytest.mark.parametrize("backend", ["sdpa", "math"])
@pytest.mark.parametrize("slice_size", [1, 5, 36, "auto"])
def test_sliced_attention_equals_unsliced(qkv, monkeypatch, backend, slice_size):
    monkeypatch.setattr(attention, "AUTO_SLICE_ELEMENTS", 2 * 2 * 23 * 10)  # "auto" -> slices of 10 rows
    full = attention.attention(*qkv, heads=2, backend=backend)
    seen = []
    attend = attention._attend
    monkeypatch.setattr(attention, "_attend", lambda q, k, v, b: seen.append(q.shape[2]) or attend(q, k, v, b))
    sliced = attention.attention(*qkv, heads=2, backend=backend, slice_size=slice_size)
    rows = 10 if slice_size == "auto" else slice_size
    assert max(seen) == rows and sum(seen) == 37  # never more than a slice of query rows at a time
    torch.testing.assert_close(sliced, full, rtol=0, atol=1e-6)


def test_slicing_for_a_block_and_per_call_override(qkv, monkeypatch):
    seen = []
    attend = attention._attend
    monkeypatch.setattr(attention, "_attend", lambda q, k, v, b: seen.append(q.shape[2]) or attend(q, k, v, b))
    with attention.slicing(16):
        assert attention.current().slice_size == 16
        attention.attention(*qkv, heads=2)
        attention.attention(*qkv, heads=2, slice_size=30)
    assert attention.current().slice_size is None
    assert seen == [16, 16, 5, 30, 7]


def test_attention_settings_hold_only_in_the_thread_that_set_them():
    """Two requests in one process (a server's threads) do not see each other's backend, upcast or slicing."""
    entered, looked = threading.Event(), threading.Event()
    seen = {}

    def other_request():
        entered.wait()
        seen["other"] = attention.current()
        looked.set()

    thread = threading.Thread(target=other_request)
    thread.start()
    with attention.options(backend="math", upcast=True, slice_size=4):
        entered.set()
        looked.wait()
        seen["here"] = attention.current()
    thread.join()
    assert seen["other"] == attention.AttentionOptions() == attention.current()
    assert seen["here"] == attention.AttentionOptions("math", True, 4)


def test_slicing_is_restored_after_an_error():
    with pytest.raises(RuntimeError), attention.slicing(8):
        raise RuntimeError
    assert attention.current().slice_size is None


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "half"])
def test_bad_slice_size(bad, qkv):
    with pytest.raises(ValueError, match="slice size"):
        attention.check_slice_size(bad)
    with pytest.raises(ValueError, match="slice size"):
        attention.attention(*qkv, heads=2, slice_size=bad)
    assert attention.current().slice_size is None


# --- pipeline and CLI ----------------------------------------------------------------------------------------------

def pixels_of(result) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.int16) for im in result.images])


def test_memory_options_leave_the_image_as_it_is(tiny):
    kwargs = dict(steps=2, width=80, height=64, seed=5, batch_size=2)
    base = txt2img(tiny, "a prompt", **kwargs)
    for options in ({"vae_tiling": True, "vae_tile_size": TILE}, {"vae_slicing": False}, {"attention_slicing": 7},
                    {"attention_slicing": "auto", "vae_tiling": True, "vae_slicing": True}):
        out = txt2img(tiny, "a prompt", **kwargs, **options)
        torch.testing.assert_close(out.latents, base.latents, rtol=0, atol=1e-4 * base.latents.abs().max().item())
        assert np.abs(pixels_of(out) - pixels_of(base)).max() <= 1, options  # at most float rounding
    assert attention.current().slice_size is None
    assert (out.params["vae_tiling"], out.params["vae_slicing"], out.params["attention_slicing"]) == (512, True, "auto")


def test_vae_slicing_decodes_one_image_at_a_time(tiny, monkeypatch):
    sizes = []
    decode = tiny.vae.decode
    monkeypatch.setattr(tiny.vae, "decode", lambda z, **kw: sizes.append(z.shape[0]) or decode(z, **kw))
    kwargs = dict(steps=1, width=64, height=64, seed=5, batch_size=3)
    txt2img(tiny, "x", **kwargs, vae_slicing=False)
    txt2img(tiny, "x", **kwargs, batch_invariant=False)
    txt2img(tiny, "x", **kwargs, batch_invariant=False, vae_slicing=True)
    assert sizes == [3, 3, 1, 1, 1]


def test_attention_slicing_is_for_the_call_only(tiny, monkeypatch):
    seen = []
    attend = attention._attend
    monkeypatch.setattr(attention, "_attend", lambda q, k, v, b: seen.append(q.shape[2]) or attend(q, k, v, b))
    txt2img(tiny, "x", steps=1, width=64, height=64, seed=5, attention_slicing=3)
    assert seen and max(seen) == 3 and attention.current().slice_size is None
    with pytest.raises(ValueError, match="latents must have shape"):  # an error inside the call
        txt2img(tiny, "x", steps=1, width=64, height=64, seed=5, attention_slicing=3, latents=torch.zeros(1, 4, 2, 2))
    assert attention.current().slice_size is None


@pytest.mark.parametrize("kwargs", [{"attention_slicing": 0}, {"vae_tile_size": 4, "vae_tiling": True}])
def test_pipeline_rejects_bad_memory_options_before_sampling(tiny, kwargs, monkeypatch):
    monkeypatch.setattr(tiny.unet, "forward", lambda *a: pytest.fail("sampled"))
    with pytest.raises(ValueError, match="attention_slicing|vae_tile_size"):
        txt2img(tiny, "x", steps=1, width=64, height=64, seed=5, **kwargs)


@pytest.fixture(scope="module")
def ckpt(tiny, tmp_path_factory):
    return ldm.save(tiny, tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


def test_cli_memory_flags_are_recorded_but_not_replayed(ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LDM_CACHE", str(tmp_path / "cache"))
    common = ["--ckpt", str(ckpt), "--W", "80", "--H", "64", "--steps", "2", "--seed", "3", "--quiet",
              "--device", "cpu"]
    assert main(["txt2img", "x", *common, "--outdir", "plain"]) == 0
    assert main(["txt2img", "x", *common, "--outdir", "lean", "--vae-tile-size", "24", "--vae-slicing",
                 "--attention-slicing"]) == 0
    plain, lean = (next((tmp_path / d).glob("*.png")) for d in ("plain", "lean"))
    assert np.abs(np.asarray(Image.open(plain), np.int16) - np.asarray(Image.open(lean), np.int16)).max() <= 1
    stored = json.loads(Image.open(lean).info["ldm"])
    assert (stored["vae_tiling"], stored["vae_slicing"], stored["attention_slicing"]) == (24, True, "auto")
    assert main(["txt2img", "--from-png", str(lean), "--outdir", "replay", "--quiet"]) == 0
    replayed = json.loads(Image.open(next((tmp_path / "replay").glob("*.png"))).info["ldm"])
    assert (replayed["vae_tiling"], replayed["attention_slicing"]) == (None, None)
    capsys.readouterr()


@pytest.mark.parametrize("args, message", [
    (["--attention-slicing", "0"], "--attention-slicing takes a positive number"),
    (["--attention-slicing", "many"], "got 'many'"),
    (["--vae-tile-size", "100"], "--vae-tile-size 100 is not a multiple of 8; use 96 or 104"),
    (["--vae-tile-size", "0", "--vae-tiling"], "--vae-tile-size"),
])
def test_cli_rejects_bad_memory_flags(ckpt, tmp_path, capsys, args, message):
    code = main(["txt2img", "x", "--ckpt", str(ckpt), "--outdir", str(tmp_path / "out"), "--quiet", *args])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_cli_help_documents_the_memory_flags(capsys):
    with pytest.raises(SystemExit):
        main(["txt2img", "--help"])
    out = capsys.readouterr().out
    for flag in ("--vae-tiling", "--vae-tile-size", "--vae-slicing", "--attention-slicing"):
        assert flag in out


def test_vae_tiling_switches_on_when_the_estimate_exceeds_free_memory(tiny, monkeypatch):
    """When the untiled VAE would not fit in the memory free now but tiles would, the call decodes in tiles (the
    same image), says so in one warning, and records it."""
    from ldm.generation import pipeline

    need = sum(pipeline.memory_needed(tiny, 64, 64, 1, 2, 1, None).values())
    monkeypatch.setattr(pipeline, "available_memory", lambda device: need - 1)
    with pytest.warns(UserWarning, match="decoding in tiles of 32 px"):
        out = txt2img(tiny, "x", steps=1, width=64, height=64, seed=1, vae_tile_size=32)
    assert out.params["vae_tiling"] == 32
    plain = txt2img(tiny, "x", steps=1, width=64, height=64, seed=1)
    assert plain.params["vae_tiling"] is None
