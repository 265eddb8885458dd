"""The bundled demo model (ldm/demo/ldm-demo-shapes.safetensors, `make demo-model`): it loads, draws what the
prompt says (as far as the shapes classifier can read it), and survives a save/load round trip bit for bit."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import ldm
from ldm.models.checkpoint import METADATA_CONFIG_KEY, read_state_dict
from ldm.demo import DEMO_CHECKPOINT
from ldm.data.shapes import ShapeSpec
from ldm.demo.eval import classify

pytestmark = pytest.mark.skipif(not DEMO_CHECKPOINT.is_file(),
                                reason=f"no bundled demo model at {DEMO_CHECKPOINT}; build it with `make demo-model`")

# Seen and held-out captions (the last two are held-out triples: red circle on green, white circle on black).
PROMPTS = [
    "large red circle on the left, blue background",
    "small yellow square on the center, black background",
    "large white triangle on the right, green background",
    "large blue square on the center, yellow background",
    "large red circle on the right, green background",
    "large white circle on the left, black background",
]
MAX_BYTES = 50 * 2**20  # the size limit


@pytest.fixture(scope="module")
def demo():
    return ldm.load(DEMO_CHECKPOINT)


def test_checkpoint_is_small_and_self_describing():
    assert DEMO_CHECKPOINT.stat().st_size <= MAX_BYTES
    with safe_open(str(DEMO_CHECKPOINT), "pt") as f:
        cfg = json.loads(f.metadata()[METADATA_CONFIG_KEY])
    assert cfg["name"] == "demo-shapes" and cfg["image_size"] == 64
    assert cfg["guidance_interval"] == [1.0, None]  # guided above σ = 1 only (ldm.config, the demo preset)


def test_generates_the_prompted_colours(demo):
    """At the defaults of `make run` (30 steps; guidance above σ = 1, from the model's config): most images get
    the colour and background right. (At 12 steps the demo model is off on colours, with or without the guidance
    interval: README.)"""
    images = ldm.txt2img(demo, PROMPTS, seed=0).images
    agree = 0
    for prompt, image in zip(PROMPTS, images):
        assert image.size == (64, 64)
        spec, pred = ShapeSpec.parse(prompt), classify(image)
        agree += pred["colour"] == spec.colour and pred["background"] == spec.background
    assert agree >= len(PROMPTS) - 1, f"colour and background right in only {agree} of {len(PROMPTS)} images"


def test_round_trip_through_save_and_load(demo, tmp_path):
    path = ldm.save(demo, tmp_path / "copy.safetensors")
    original, _ = read_state_dict(DEMO_CHECKPOINT)
    copy, _ = read_state_dict(path)
    assert original.keys() == copy.keys()
    for key, tensor in original.items():
        assert copy[key].dtype == tensor.dtype and torch.equal(copy[key], tensor), key
    assert ldm.load(path).config == demo.config
