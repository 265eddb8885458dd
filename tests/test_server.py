"""`ldm serve`: a real server on a free local port with the bundled model, driven over HTTP as A1111's clients drive
it: the same pixels as the Python API, info and progress, interrupt mid-run, concurrent requests, auth, and bad
input answered with the field named."""
from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

import ldm  # noqa: E402
from ldm.demo import DEMO_CHECKPOINT  # noqa: E402
from ldm.server.app import create_app  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, sd, **options):
        self.port = _free_port()
        app = create_app(sd, checkpoint=str(DEMO_CHECKPOINT), **options)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started and time.time() < deadline:
            time.sleep(0.05)
        assert self.server.started

    def call(self, path: str, body=None, auth: tuple[str, str] | None = None, raw: bytes | None = None):
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/sdapi/v1/{path}", data=data,
                                         method="POST" if data is not None else "GET",
                                         headers={"Content-Type": "application/json"})
        if auth is not None:
            request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def sd():
    return ldm.load(DEMO_CHECKPOINT)


@pytest.fixture(scope="module")
def server(sd):
    s = Server(sd)
    yield s
    s.stop()


def _image(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_txt2img_gives_the_pixels_of_the_python_api_and_a1111s_info(server, sd):
    body = {"prompt": "large red circle on the left, blue background", "negative_prompt": "", "seed": 7,
            "steps": 6, "cfg_scale": 7.5, "sampler_name": "DPM++ 2M", "scheduler": "karras", "batch_size": 2,
            "n_iter": 2, "unknown_field": "ignored, as A1111 does"}
    status, out = server.call("txt2img", body)
    assert status == 200 and len(out["images"]) == 4
    info = json.loads(out["info"])
    assert info["all_seeds"] == [7, 8, 9, 10] and info["seed"] == 7 and (info["width"], info["height"]) == (64, 64)
    assert info["sampler_name"] == "DPM++ 2M Karras" and len(info["infotexts"]) == 4
    first = _image(out["images"][0])
    assert "Seed: 7" in first.info["parameters"]
    same = ldm.txt2img(sd, body["prompt"], seed=7, steps=6, guidance=7.5, sampler="DPM++ 2M", schedule="karras",
                       batch_size=2)
    assert np.array_equal(np.asarray(first.convert("RGB")), np.asarray(same.images[0]))
    assert server.call("progress")[1]["state"]["job_count"] == 0


def test_img2img_with_a_data_url_and_a_mask(server):
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (40, 90, 230)).save(buffer, format="PNG")
    image = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    mask = io.BytesIO()
    Image.new("L", (64, 64), 255).save(mask, format="PNG")
    status, out = server.call("img2img", {"init_images": [image], "prompt": "small red square in the center",
                                          "mask": base64.b64encode(mask.getvalue()).decode(), "steps": 4,
                                          "denoising_strength": 0.6, "seed": 3})
    assert status == 200 and _image(out["images"][0]).size == (64, 64)
    assert json.loads(out["info"])["denoising_strength"] == 0.6


@pytest.mark.parametrize("body, status, words", [
    ({"prompt": "x", "sampler_name": "Euler z"}, 404, "sampler"),
    ({"prompt": "x", "steps": "many"}, 422, "steps"),
    ({"prompt": "x", "width": 4096, "height": 4096}, 400, "limit"),
    ({"prompt": "x", "width": 100}, 422, "width 100 is not a multiple of 8"),
])
def test_bad_requests_name_the_field(server, body, status, words):
    code, out = server.call("txt2img", body)
    assert code == status and words in json.dumps(out)


def test_malformed_json_and_bad_base64(server):
    assert server.call("txt2img", raw=b"{not json")[0] == 422
    code, out = server.call("img2img", {"init_images": ["!!not base64!!"], "prompt": "x"})
    assert code == 400 and "init_images" in out["detail"]


def test_interrupt_mid_run_returns_what_was_finished(server):
    results = {}

    def long_request():
        results["out"] = server.call("txt2img", {"prompt": "a blue square", "steps": 200, "n_iter": 3, "seed": 1})

    thread = threading.Thread(target=long_request)
    thread.start()
    deadline = time.time() + 30
    while server.call("progress")[1]["state"]["sampling_step"] < 5 and time.time() < deadline:
        time.sleep(0.05)
    progress = server.call("progress")[1]
    assert progress["state"]["job_count"] == 1 and 0 < progress["progress"] < 1
    assert server.call("interrupt", {})[0] == 200
    thread.join(timeout=60)
    status, out = results["out"]
    assert status == 200 and json.loads(out["info"])["interrupted"] and len(out["images"]) < 3


def test_concurrent_requests_run_one_at_a_time_and_none_is_lost(server):
    outs = [None] * 4

    def go(i):
        outs[i] = server.call("txt2img", {"prompt": "a green triangle", "steps": 3, "seed": 100 + i})

    threads = [threading.Thread(target=go, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [o[0] for o in outs] == [200] * 4
    assert [json.loads(o[1]["info"])["seed"] for o in outs] == [100, 101, 102, 103]


def test_basic_auth(sd):
    s = Server(sd, auth={"me": "secret"})
    try:
        assert s.call("samplers")[0] == 401
        assert s.call("samplers", auth=("me", "wrong"))[0] == 401
        status, samplers = s.call("samplers", auth=("me", "secret"))
        assert status == 200 and {"name": "Euler a", "aliases": ["euler_a"], "options": {}} in samplers
    finally:
        s.stop()


def test_the_info_endpoints(server):
    assert server.call("sd-models")[1][0]["model_name"] == DEMO_CHECKPOINT.stem
    assert server.call("options")[1]["sd_model_checkpoint"] == DEMO_CHECKPOINT.name
    assert server.call("scripts")[1] == {"txt2img": [], "img2img": []}
    status, out = server.call("txt2img", {"prompt": "a red circle", "steps": 2, "seed": 5})
    status, info = server.call("png-info", {"image": out["images"][0]})
    assert status == 200 and info["items"]["Seed"] == "5"


def test_a_client_that_disconnects_does_not_disturb_the_server(server):
    body = json.dumps({"prompt": "a red circle", "steps": 30, "seed": 2}).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as conn:
        conn.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        time.sleep(0.3)  # the job has started; the client goes away without reading the answer
    status, out = server.call("txt2img", {"prompt": "a blue square", "steps": 3, "seed": 9})
    assert status == 200 and json.loads(out["info"])["seed"] == 9


def test_the_listing_endpoints_and_loras_in_prompts(sd, tmp_path):
    import torch
    from safetensors.torch import save_file

    from ldm.adapters import lora as L

    key = next(k for k in L.targets(sd) if k.startswith(L.KOHYA_UNET) and k.endswith("attn2_to_k"))
    shape = L.targets(sd)[key].weight.shape
    save_file({f"{key}.lora_down.weight": torch.randn(4, shape[1]),
               f"{key}.lora_up.weight": torch.randn(shape[0], 4)}, str(tmp_path / "style.safetensors"))
    (tmp_path / "embeddings").mkdir()
    torch.save({"string_to_param": {"*": torch.zeros(1, sd.config.text.width)}}, tmp_path / "embeddings" / "dark.pt")
    s = Server(sd, lora_dir=str(tmp_path), embeddings_dir=str(tmp_path / "embeddings"), flags={"port": 0})
    try:
        assert s.call("loras")[1][0]["name"] == "style"
        assert list(s.call("embeddings")[1]["loaded"]) == ["dark"]
        assert {"name": "Lanczos", "model_name": None, "model_path": None, "model_url": None, "scale": None} in \
            s.call("upscalers")[1]
        assert {"name": "Latent (bicubic)"} in s.call("latent-upscale-modes")[1]
        assert s.call("memory")[1]["ram"]["total"] > 0 and s.call("cmd-flags")[1] == {"port": 0}
        assert s.call("sd-vae")[1] == [] and s.call("refresh-checkpoints", {})[0] == 200
        plain = s.call("txt2img", {"prompt": "a red circle", "steps": 2, "seed": 4})[1]
        styled = s.call("txt2img", {"prompt": "a red circle <lora:style:1>", "steps": 2, "seed": 4})[1]
        assert plain["images"][0] != styled["images"][0]
        assert "Lora hashes" in json.loads(styled["info"])["infotexts"][0]
    finally:
        s.stop()


def test_progress_shows_a_preview_and_options_switch_the_checkpoint(sd, tmp_path):
    from ldm.testing.reference import random_model

    other = tmp_path / "models" / "tiny-random.safetensors"
    other.parent.mkdir()
    ldm.save(random_model(ldm.preset("tiny"), seed=3)[0], other)
    s = Server(sd, ckpt_dir=str(other.parent))
    try:
        results = {}
        thread = threading.Thread(target=lambda: results.update(
            out=s.call("txt2img", {"prompt": "a blue square", "steps": 300, "seed": 1})))
        thread.start()
        deadline = time.time() + 30
        while s.call("progress?skip_current_image=true")[1]["state"]["sampling_step"] < 3 and time.time() < deadline:
            time.sleep(0.05)
        preview = s.call("progress")[1]["current_image"]
        assert _image(preview).size == (16, 16)  # the demo model's latents: 64 px / 4
        assert s.call("progress?skip_current_image=true")[1]["current_image"] is None
        s.call("interrupt", {})
        thread.join(timeout=60)
        assert [m["title"] for m in s.call("sd-models")[1]] == [DEMO_CHECKPOINT.name, other.name]
        before = s.call("txt2img", {"prompt": "a red circle", "steps": 2, "seed": 4})[1]["images"][0]
        assert s.call("options", {"sd_model_checkpoint": "tiny-random"})[0] == 200
        assert s.call("options")[1]["sd_model_checkpoint"] == other.name
        after = s.call("txt2img", {"prompt": "a red circle", "steps": 2, "seed": 4})[1]["images"][0]
        assert before != after and _image(after).size == (64, 64)
        assert s.call("options", {"sd_model_checkpoint": "nope"})[0] == 404
        # override_settings: this request on the demo model, then back to the one the options chose
        again = s.call("txt2img", {"prompt": "a red circle", "steps": 2, "seed": 4,
                                   "override_settings": {"sd_model_checkpoint": DEMO_CHECKPOINT.stem}})[1]
        assert again["images"][0] == before
        assert s.call("options")[1]["sd_model_checkpoint"] == other.name
    finally:
        s.stop()
