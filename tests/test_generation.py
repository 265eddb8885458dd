"""The request type and the denoising core: one `Generation` for the API, the command line and the PNG; a run that
yields every step and can be cancelled; two requests on two threads of one process give the images each gives alone."""
from __future__ import annotations

import threading

import pytest
import torch

import ldm
from ldm.cli import flag_message
from ldm.demo import DEMO_CHECKPOINT
from ldm.generation.images import read_png_params, save_png
from ldm.generation.pipeline import Denoising, generate, img2img, txt2img
from ldm.generation.request import Generation, RequestError
from ldm.models import attention


@pytest.fixture(scope="module")
def sd():
    return ldm.load(DEMO_CHECKPOINT)


FAST = dict(steps=3, width=64, height=64)


def test_txt2img_and_img2img_are_the_same_request(sd):
    made = txt2img(sd, "large red circle on the left, blue background", seed=3, sampler="euler", **FAST)
    assert made.request == Generation("large red circle on the left, blue background", seed=3, sampler="euler", **FAST)
    assert torch.equal(generate(sd, made.request).latents, made.latents)
    again = img2img(sd, made.images[0], "large green circle", strength=0.5, seed=4, steps=4)
    assert again.request.img2img and again.params["mode"] == "img2img" and again.params["strength"] == 0.5


def test_the_run_yields_every_step_and_ends_with_the_result(sd):
    run = Denoising(sd, Generation("a blue square", seed=1, sampler="dpmpp_2m", **FAST))
    steps = list(run)
    assert [(s.i, s.total) for s in steps] == [(0, 3), (1, 3), (2, 3)]
    assert all(s.denoised.shape == s.x.shape == (1, 4, 16, 16) for s in steps)  # the demo VAE downsamples by 4
    assert steps[0].sigma > steps[1].sigma > steps[2].sigma
    assert run.result is not None and not run.cancelled
    assert torch.equal(run.result.latents, txt2img(sd, "a blue square", seed=1, **FAST).latents)


def test_a_cancelled_run_stops_between_steps_and_restores_what_it_changed(sd):
    run = Denoising(sd, Generation("a blue square", seed=1, steps=10, width=64, height=64, attention="math",
                                   attention_slicing=4))
    seen = []
    for step in run:
        seen.append(step.i)
        assert attention.current() == attention.AttentionOptions()  # the run's settings stay inside it
        if step.i == 2:
            threading.Thread(target=run.cancel).start()  # from another thread, as a server would
            threading.Event().wait(0.2)
    assert seen == [0, 1, 2] and run.cancelled and run.result is None
    assert list(run) == []


def _request(i: int) -> Generation:
    """Two requests that differ in everything a request holds."""
    return [Generation("large red circle on the left, blue background", seed=11, sampler="euler_a", steps=4,
                       width=64, height=64, attention="math", attention_slicing=8),
            Generation(("small green triangle", "blue square"), negative_prompt="red", seed=12, sampler="dpmpp_2m",
                       schedule="exponential", steps=3, width=48, height=64, guidance=5.0, batch_size=2,
                       attention="sdpa", vae_tiling=True, vae_tile_size=32)][i]


def test_two_requests_on_two_threads_give_the_images_each_gives_alone(sd):
    alone = [generate(sd, _request(i)) for i in range(2)]
    results: list = [None, None]
    errors = []
    barrier = threading.Barrier(2)

    def work(i: int) -> None:
        try:
            barrier.wait()
            run = Denoising(sd, _request(i))
            for _ in run:
                pass  # the threads take steps in turn, each with its own attention settings
            results[i] = run.result
        except BaseException as e:  # reported below, with the thread's failure
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i in range(2):
        assert torch.equal(results[i].latents, alone[i].latents), i
        assert results[i].params == alone[i].params
    assert alone[0].params["attention"] == "math" and alone[1].params["attention"] == "sdpa"


def test_the_png_parameters_round_trip_through_the_request(sd, tmp_path):
    request = Generation("small blue circle", negative_prompt="green", seed=21, sampler="DPM++ 2M Karras", steps=3,
                         width=64, height=48, guidance=6.0, guidance_interval=(0.5, None), clip_skip=1,
                         attention="math", batch_size=2)
    result = generate(sd, request)
    path = save_png(result.images[1], tmp_path, "x", result.image_params(1))
    replay = Generation.from_params(read_png_params(path))
    # the PNG records what ran: the A1111 name resolved, the attention settings in force
    assert replay == request.replace(seed=22, batch_size=1, sampler="dpmpp_2m", schedule="karras", upcast_attention=False)
    assert torch.equal(generate(sd, replay).latents[0], result.latents[1])


@pytest.mark.parametrize("changes, field, message", [
    (dict(steps=0), "steps", "steps must be at least 1, got 0"),
    (dict(guidance=float("nan")), "guidance", "guidance must be a finite number, got nan"),
    (dict(width=100), "width", "width 100 is not a multiple of 8; use 96 or 104"),
    (dict(strength=1.5), "strength", "strength must be in (0, 1], got 1.5"),
    (dict(seed=2 ** 32), "seed", "seed must be in [0, 2**32), got 4294967296"),
    (dict(sampler="dpmpp_2m", eta=0.3), "eta", "sampler 'dpmpp_2m' takes no eta"),
    (dict(schedule="cosine"), "schedule", "schedule must be one of discrete, karras, exponential"),
    (dict(attention="flash"), "attention", "attention must be one of sdpa, xformers, math"),
    (dict(attention_slicing=0), "attention_slicing", "attention_slicing must be a positive integer"),
    (dict(prompt=()), "prompt", "prompt must be a text or a non-empty list"),
    (dict(prompt=("a", "b"), negative_prompt=("c",)), "negative_prompt", "negative_prompt has 1 entries for 2"),
])
def test_a_bad_request_names_its_field(changes, field, message):
    with pytest.raises(RequestError) as e:
        Generation("x").replace(**changes)
    assert e.value.field == field and message in str(e.value)


def test_the_command_line_names_the_flag_of_a_field():
    assert flag_message(RequestError("guidance", "guidance must be >= 0, got -1")) == "--scale must be >= 0, got -1"
    assert flag_message(RequestError("batch_size", "batch_size must be at least 1")) == "--n-samples must be at least 1"
    assert flag_message(RequestError("clip_skip", "clip_skip must be at least 1")) == "--clip-skip must be at least 1"


def test_a_request_is_frozen_and_replace_checks_the_copy():
    request = Generation("x")
    with pytest.raises(AttributeError):
        request.steps = 3
    assert request.replace(steps=3).steps == 3 and request.steps == 30
    with pytest.raises(ValueError, match="not a field"):
        request.replace(cfg=3)
