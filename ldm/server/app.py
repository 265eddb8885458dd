"""`ldm serve`: AUTOMATIC1111's web API (`/sdapi/v1/...`) over ldm's request type and denoising core.

    ldm serve                                   # the bundled demo model on http://127.0.0.1:7860
    ldm serve --ckpt v1-5-pruned-emaonly.safetensors --api-auth me:secret

A1111's clients (scripts, bots, editor plug-ins) post the bodies of its `modules/api/models.py` and read the same
responses: `{"images": [base64 PNG], "parameters": {...}, "info": "<JSON>"}`. Each body becomes a `Generation`;
fields this server does not know are ignored, as A1111 ignores them. Jobs run one at a time on the loaded model,
in a worker thread, in arrival order; `progress` and `interrupt` answer while one runs. An interrupted job returns
the images of the batches it finished. The model is loaded once. Width and height default to the model's own size.
`/` serves a one-page UI (`page.html`) over the same API: prompt, size, steps, sampler, CFG, seed, a progress bar,
the result with its infotext, and this session's gallery.
"""
from __future__ import annotations

import argparse
import base64
import binascii
import io
import json
import queue
import random
import secrets
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, HTTPException
from fastapi.responses import HTMLResponse
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from PIL import Image
from pydantic import BaseModel, ConfigDict

from ldm import __version__
from ldm.generation.images import infotext, png_bytes, read_png_text
from ldm.generation.request import HIRES_UPSCALERS, MASKED_CONTENT, Generation, RequestError
from ldm.sampling.names import NAMES, display_name

MAX_PIXELS = 2048 * 2048  # a request beyond this many pixels per image is refused before any work (--max-pixels)


class Txt2ImgBody(BaseModel):
    """A1111's `StableDiffusionTxt2ImgProcessingAPI`, the fields ldm acts on (others are accepted and ignored)."""
    model_config = ConfigDict(extra="ignore")
    prompt: str = ""
    negative_prompt: str = ""
    seed: int = -1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int | None = None
    height: int | None = None
    sampler_name: str | None = None
    sampler_index: str | None = None
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    eta: float | None = None
    override_settings: dict[str, Any] = {}
    override_settings_restore_afterwards: bool = True
    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    denoising_strength: float | None = None
    refiner_checkpoint: str | None = None  # a checkpoint of sd-models that takes over at refiner_switch_at
    refiner_switch_at: float | None = None


class Img2ImgBody(Txt2ImgBody):
    """A1111's `StableDiffusionImg2ImgProcessingAPI`: init_images (base64 or data: URLs) and the inpainting fields."""
    init_images: list[str] = []
    mask: str | None = None
    mask_blur: int = 4
    inpainting_fill: int = 1  # A1111's index into fill, original, latent noise, latent nothing
    inpaint_full_res: bool = False
    inpaint_full_res_padding: int = 32
    inpainting_mask_invert: int = 0


class PngInfoBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    image: str


@dataclass
class Job:
    requests: list[Generation]  # one per batch (n_iter)
    action: Any = None  # a function of the worker run before the requests (switching the model)
    after: Any = None  # and one run after them, even on error (switching it back)
    done: threading.Event = field(default_factory=threading.Event)
    results: list = field(default_factory=list)
    error: BaseException | None = None
    interrupted: bool = False
    run: Any = None


class Worker:
    """Runs the jobs one at a time on the model, in arrival order, and keeps what `progress` reports."""

    def __init__(self, sd):
        self.sd = sd
        self.jobs: queue.Queue[Job] = queue.Queue()
        self.lock = threading.Lock()
        self.current: Job | None = None
        self.step, self.steps, self.batch, self.batches, self.started = 0, 0, 0, 0, 0.0
        self.timestamp = ""
        self.preview: Any = None  # the x_0 prediction of the last step, for `progress`'s current_image
        threading.Thread(target=self._loop, daemon=True, name="ldm-serve-worker").start()

    def submit(self, requests: list[Generation], action=None, after=None) -> Job:
        job = Job(requests, action, after)
        self.jobs.put(job)
        job.done.wait()
        return job

    def interrupt(self) -> None:
        with self.lock:
            job = self.current
            if job is not None:
                job.interrupted = True
                if job.run is not None:
                    job.run.cancel()

    def _loop(self) -> None:
        from ldm.generation.pipeline import Denoising

        while True:
            job = self.jobs.get()
            with self.lock:
                self.current, self.batches, self.started = job, len(job.requests), time.time()
                self.timestamp = time.strftime("%Y%m%d%H%M%S")
            try:
                if job.action is not None:
                    job.action(self)
                for i, request in enumerate(job.requests):
                    if job.interrupted:
                        break
                    run = Denoising(self.sd, request)
                    with self.lock:
                        job.run, self.batch, self.step, self.steps = run, i, 0, request.steps
                    for step in run:
                        with self.lock:
                            self.step, self.steps, self.preview = step.i + 1, step.total, step.denoised[:1]
                    if run.result is not None:
                        job.results.append(run.result)
            except BaseException as e:  # handed to the request's handler, which answers it
                job.error = e
            finally:
                if job.after is not None:
                    try:
                        job.after(self)
                    except BaseException as e:
                        job.error = job.error or e
                with self.lock:
                    self.current, job.run, self.preview = None, None, None
                job.done.set()

    def progress(self, with_image: bool = False) -> dict[str, Any]:
        with self.lock:
            busy = self.current is not None
            preview = self.preview if with_image else None
            done = (self.batch + self.step / max(self.steps, 1)) / max(self.batches, 1) if busy else 0.0
            elapsed = time.time() - self.started
            return {
                "progress": done, "eta_relative": elapsed / done - elapsed if busy and done > 0 else 0.0,
                "state": {"skipped": False, "interrupted": bool(busy and self.current.interrupted),
                          "job": "txt2img" if busy else "", "job_count": 1 + self.jobs.qsize() if busy else 0,
                          "job_timestamp": self.timestamp, "job_no": self.batch if busy else 0,
                          "sampling_step": self.step if busy else 0, "sampling_steps": self.steps if busy else 0},
                "current_image": None if preview is None else preview_png(self.sd, preview), "textinfo": None,
            }


def preview_png(sd, latents) -> str:
    """A cheap preview of scaled latents (1, 4, h, w) as base64 PNG at latent size: each pixel's colour a linear
    function of its latent vector, fitted once per model to what its VAE encodes flat colours to (A1111's "approx
    cheap" preview, derived from the model instead of hard-coded for SD 1.5)."""
    import torch

    fit = sd.__dict__.get("_ldm_preview_fit")
    if fit is None:
        colours = torch.tensor([[1, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, 1], [-1, -1, -1], [0, 0, 0.0]])
        f = sd.config.vae.downsample_factor
        with torch.no_grad():
            flat = colours[:, :, None, None].expand(-1, -1, 2 * f, 2 * f).to(sd.device, sd.dtype)
            codes = sd.vae.encode(flat).mean.float().mean(dim=(2, 3)).cpu() * sd.scale_factor  # (6, 4)
        design = torch.cat([codes, torch.ones(len(codes), 1)], dim=1)
        fit = sd.__dict__["_ldm_preview_fit"] = torch.linalg.lstsq(design, colours).solution  # (5, 3)
    x = latents[0].float().cpu().permute(1, 2, 0)  # (h, w, 4)
    rgb = torch.cat([x, torch.ones(*x.shape[:2], 1)], dim=-1) @ fit
    pixels = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def decode_image(data: str, field_name: str) -> Image.Image:
    """A base64 image, plain or as a data: URL; HTTP 400 naming the field otherwise."""
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        image = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
        image.load()
    except (binascii.Error, ValueError, OSError, Image.DecompressionBombError) as e:
        raise HTTPException(400, f"{field_name}: not a base64-encoded image ({e})") from None
    return image


SCHEDULERS = {"automatic": None, "karras": "karras", "exponential": "exponential", "uniform": "discrete",
              "normal": "discrete"}


def to_requests(body: Txt2ImgBody, sd, max_pixels: int, image: Image.Image | None = None,
                mask: Image.Image | None = None, folders: dict[str, str | None] | None = None) -> list[Generation]:
    """The body as one Generation per batch (n_iter), seeds continuing across them as in A1111."""
    width, height = body.width or sd.config.image_size, body.height or sd.config.image_size
    if image is None and width * height > max_pixels or image is not None and image.width * image.height > max_pixels:
        raise HTTPException(400, f"width x height: {width}x{height} is more than this server's limit of "
                                 f"{max_pixels} pixels per image")
    if body.n_iter < 1:
        raise HTTPException(422, f"n_iter must be at least 1, got {body.n_iter}")
    sampler = body.sampler_name or body.sampler_index or "Euler"
    fields: dict[str, Any] = dict(
        prompt=body.prompt, negative_prompt=body.negative_prompt, steps=body.steps, guidance=body.cfg_scale,
        sampler=sampler, batch_size=body.batch_size, eta=body.eta,
        clip_skip=int(body.override_settings.get("CLIP_stop_at_last_layers", 1)), **(folders or {}))
    schedule = SCHEDULERS.get((body.scheduler or "automatic").lower(), "unknown")
    if schedule == "unknown":
        raise HTTPException(400, f"scheduler: unknown scheduler {body.scheduler!r}; these are known: "
                                 f"{', '.join(SCHEDULERS)}")
    if schedule is not None:
        fields["schedule"] = schedule
    if image is None:
        fields.update(width=width, height=height)
        if body.enable_hr:
            fields.update(hires_scale=body.hr_scale, hires_steps=body.hr_second_pass_steps,
                          hires_denoise=body.denoising_strength if body.denoising_strength is not None else 0.7)
            if body.hr_upscaler:
                fields["hires_upscaler"] = body.hr_upscaler
    else:
        fields.update(init_image=image, strength=body.denoising_strength if body.denoising_strength is not None
                      else 0.75, width=body.width, height=body.height)
        if mask is not None:
            b = body  # an Img2ImgBody
            fields.update(mask=mask, mask_blur=b.mask_blur, mask_invert=bool(b.inpainting_mask_invert),
                          masked_content=MASKED_CONTENT[b.inpainting_fill] if 0 <= b.inpainting_fill < 4 else "bad",
                          inpaint_area="masked" if b.inpaint_full_res else "whole",
                          inpaint_padding=b.inpaint_full_res_padding)
    seed = body.seed if body.seed != -1 else random.SystemRandom().randrange(2 ** 32)
    try:
        return [Generation(**fields, seed=(seed + i * body.batch_size) % 2 ** 32) for i in range(body.n_iter)]
    except RequestError as e:
        raise HTTPException(404 if e.field == "sampler" else 422, f"{e.field}: {e}") from None


def respond(body: BaseModel, job: Job) -> dict[str, Any]:
    """A1111's response: base64 PNGs with their infotext, the request's parameters, and `info` as a JSON string."""
    if job.error is not None:
        if isinstance(job.error, RequestError):
            raise HTTPException(422, f"{job.error.field}: {job.error}")
        raise HTTPException(500, f"{type(job.error).__name__}: {job.error}")
    images, seeds, prompts, infotexts = [], [], [], []
    for result in job.results:
        for i, image in enumerate(result.images):
            params = result.image_params(i)
            images.append(base64.b64encode(png_bytes(image, params)).decode())
            seeds.append(result.seeds[i])
            prompts.append(result.prompts[i])
            infotexts.append(infotext(params))
    first = job.results[0].params if job.results else {}
    info = {
        "prompt": prompts[0] if prompts else body.prompt, "all_prompts": prompts,
        "negative_prompt": body.negative_prompt, "all_negative_prompts": [body.negative_prompt] * len(prompts),
        "seed": seeds[0] if seeds else body.seed, "all_seeds": seeds, "subseed": -1, "all_subseeds": [-1] * len(seeds),
        "subseed_strength": 0, "width": first.get("final_width", first.get("width")),
        "height": first.get("final_height", first.get("height")), "sampler_name": first.get("sampler_display"),
        "cfg_scale": body.cfg_scale, "steps": body.steps, "batch_size": body.batch_size,
        "sd_model_name": first.get("model"), "sd_model_hash": (first.get("model_sha256") or "")[:10] or None,
        "denoising_strength": first.get("strength", first.get("hires_denoise")),
        "clip_skip": first.get("clip_skip", 1), "index_of_first_image": 0, "infotexts": infotexts,
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "version": f"ldm {__version__}",
        "interrupted": job.interrupted,
    }
    parameters = body.model_dump()
    parameters.pop("init_images", None)
    parameters.pop("mask", None)
    return {"images": images, "parameters": parameters, "info": json.dumps(info)}


def create_app(sd, *, checkpoint: str, auth: dict[str, str] | None = None, max_pixels: int = MAX_PIXELS,
               lora_dir: str | None = None, embeddings_dir: str | None = None, ckpt_dir: str | None = None,
               flags: dict[str, Any] | None = None) -> FastAPI:
    """The API app over a loaded model; `auth` (user -> password) makes every endpoint ask for HTTP basic auth;
    `lora_dir` / `embeddings_dir` are where prompts' <lora:...> tags and embedding words are looked up."""
    folders = {"lora_dir": lora_dir, "embeddings_dir": embeddings_dir}
    worker = Worker(sd)
    basic = HTTPBasic(auto_error=False)

    def authorised(credentials: HTTPBasicCredentials | None = Depends(basic)) -> None:
        if auth is None:
            return
        if credentials is None or not secrets.compare_digest(auth.get(credentials.username, "\0"),
                                                               credentials.password):
            raise HTTPException(401, "authentication required", headers={"WWW-Authenticate": "Basic"})

    app = FastAPI(title="ldm", version=__version__, dependencies=[Depends(authorised)])
    app.state.worker = worker
    loaded = {"path": Path(checkpoint)}

    def entry(path: Path) -> dict[str, Any]:
        return {"title": path.name, "model_name": path.stem, "hash": None, "sha256": None, "filename": str(path),
                "config": None}

    def models() -> list[Path]:
        """The loaded checkpoint, the one the server started with, then those of --ckpt-dir (listed afresh at each
        call: refresh-checkpoints)."""
        found = [loaded["path"]]
        for path in [Path(checkpoint), *_files(ckpt_dir, (".safetensors", ".ckpt"))]:
            if all(path.resolve() != other.resolve() for other in found):
                found.append(path)
        return found

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return (Path(__file__).parent / "page.html").read_text(encoding="utf-8")

    def find_model(wanted: str, field_name: str = "sd_model_checkpoint") -> Path:
        # A1111 titles read "name.safetensors [hash]"
        wanted = wanted.split(" [")[0]
        path = next((p for p in models() if wanted in (p.name, p.stem, str(p))), None)
        if path is None:
            raise HTTPException(404, f"{field_name}: no checkpoint {wanted!r}; see /sdapi/v1/sd-models "
                                     "(--ckpt-dir)")
        return path

    def switcher(path: Path):
        def switch(w: Worker) -> None:
            if path.resolve() == loaded["path"].resolve():
                return
            import ldm

            w.sd = ldm.load(path)  # the old model is released when nothing holds it any more
            loaded["path"] = path
        return switch

    def run(body: Txt2ImgBody, requests: list[Generation]) -> dict[str, Any]:
        """The job, on the checkpoint `override_settings` asks for (and back after it, unless told not to)."""
        if body.refiner_checkpoint and body.refiner_checkpoint.lower() != "none":  # A1111's UI sends "None"
            changes = {"refiner": str(find_model(body.refiner_checkpoint, "refiner_checkpoint"))}
            if body.refiner_switch_at is not None:  # else Generation's default
                changes["refiner_switch"] = body.refiner_switch_at
            try:
                requests = [r.replace(**changes) for r in requests]
            except RequestError as e:
                raise HTTPException(422, f"{'refiner_switch_at' if e.field == 'refiner_switch' else e.field}: "
                                         f"{e}") from None
        wanted = body.override_settings.get("sd_model_checkpoint")
        action = after = None
        if wanted and wanted not in (loaded["path"].name, loaded["path"].stem):
            action = switcher(find_model(wanted))
            if body.override_settings_restore_afterwards:
                after = switcher(loaded["path"])
        job = worker.submit(requests, action, after)
        return respond(body, job)

    @app.post("/sdapi/v1/txt2img")
    def txt2img(body: Txt2ImgBody) -> dict[str, Any]:
        return run(body, to_requests(body, worker.sd, max_pixels, folders=folders))

    @app.post("/sdapi/v1/img2img")
    def img2img(body: Img2ImgBody) -> dict[str, Any]:
        if not body.init_images:
            raise HTTPException(422, "init_images: give one base64 image")
        image = decode_image(body.init_images[0], "init_images")
        mask = decode_image(body.mask, "mask") if body.mask else None
        return run(body, to_requests(body, worker.sd, max_pixels, image, mask, folders))

    @app.get("/sdapi/v1/progress")
    def progress(skip_current_image: bool = False) -> dict[str, Any]:
        return worker.progress(with_image=not skip_current_image)

    @app.post("/sdapi/v1/interrupt")
    def interrupt() -> dict[str, Any]:
        worker.interrupt()
        return {}

    @app.post("/sdapi/v1/skip")
    def skip() -> dict[str, Any]:
        worker.interrupt()
        return {}

    @app.get("/sdapi/v1/samplers")
    def samplers() -> list[dict[str, Any]]:
        return [{"name": display_name(name), "aliases": [name], "options": {}} for name in NAMES]

    @app.get("/sdapi/v1/schedulers")
    def schedulers() -> list[dict[str, Any]]:
        return [{"name": name, "label": name.title(), "aliases": None, "default_rho": -1, "need_inner_model": False}
                for name in SCHEDULERS]

    @app.get("/sdapi/v1/sd-models")
    def sd_models() -> list[dict[str, Any]]:
        return [entry(path) for path in models()]

    @app.get("/sdapi/v1/options")
    def options() -> dict[str, Any]:
        return {"sd_model_checkpoint": loaded["path"].name, "CLIP_stop_at_last_layers": 1}

    @app.post("/sdapi/v1/options")
    def set_options(values: dict[str, Any]) -> dict[str, Any]:
        """`sd_model_checkpoint` switches the model (a title or name of `sd-models`), between two jobs."""
        wanted = values.get("sd_model_checkpoint")
        if wanted is None or wanted in (loaded["path"].name, loaded["path"].stem):
            return {}
        job = worker.submit([], action=switcher(find_model(wanted)))
        if job.error is not None:
            raise HTTPException(400, f"sd_model_checkpoint: {job.error}")
        return {}

    @app.get("/sdapi/v1/scripts")
    def scripts() -> dict[str, list]:
        return {"txt2img": [], "img2img": []}

    @app.get("/sdapi/v1/sd-vae")
    def sd_vae() -> list[dict[str, Any]]:
        return []  # the checkpoint's own VAE

    @app.get("/sdapi/v1/loras")
    def loras() -> list[dict[str, Any]]:
        return [{"name": path.stem, "alias": path.stem, "path": str(path), "metadata": {}}
                for path in _files(lora_dir, (".safetensors", ".pt", ".ckpt"))]

    @app.get("/sdapi/v1/embeddings")
    def embeddings() -> dict[str, Any]:
        loaded = {path.stem: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": None,
                              "vectors": None} for path in _files(embeddings_dir, (".pt", ".safetensors", ".bin"))}
        return {"loaded": loaded, "skipped": {}}

    @app.get("/sdapi/v1/upscalers")
    def upscalers() -> list[dict[str, Any]]:
        return [{"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": None}
                for name, (kind, _, _) in HIRES_UPSCALERS.items() if kind == "pixel"]

    @app.get("/sdapi/v1/latent-upscale-modes")
    def latent_upscale_modes() -> list[dict[str, Any]]:
        return [{"name": name} for name, (kind, _, _) in HIRES_UPSCALERS.items() if kind == "latent"]

    @app.get("/sdapi/v1/cmd-flags")
    def cmd_flags() -> dict[str, Any]:
        return dict(flags or {})

    @app.get("/sdapi/v1/memory")
    def memory() -> dict[str, Any]:
        import torch

        from ldm.generation.pipeline import available_memory, machine_memory

        cpu = torch.device("cpu")
        total, free = machine_memory(cpu), available_memory(cpu)
        gpu: dict[str, Any] = {"error": "no CUDA device"}
        if torch.cuda.is_available():
            free_gpu, total_gpu = torch.cuda.mem_get_info()
            gpu = {"system": {"free": free_gpu, "used": total_gpu - free_gpu, "total": total_gpu}}
        return {"ram": {"free": free, "used": total - free, "total": total}, "cuda": gpu}

    @app.post("/sdapi/v1/refresh-checkpoints")
    def refresh_checkpoints() -> dict[str, Any]:
        return {}

    @app.post("/sdapi/v1/png-info")
    def png_info(body: PngInfoBody) -> dict[str, Any]:
        text, items = read_png_text(decode_image(body.image, "image"))
        return {"info": text, "items": items, "parameters": {}}

    return app


def _files(folder: str | None, suffixes: tuple[str, ...]) -> list[Path]:
    if folder is None or not Path(folder).is_dir():
        return []
    return [p for p in sorted(Path(folder).iterdir()) if p.suffix in suffixes and p.is_file()]


def parse_auth(text: str) -> dict[str, str]:
    pairs = {}
    for part in text.split(","):
        user, sep, password = part.partition(":")
        if not sep or not user:
            raise ValueError(f"--api-auth takes user:password pairs separated by commas, got {part!r}")
        pairs[user] = password
    return pairs


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    import ldm
    from ldm.demo import DEMO_CHECKPOINT

    auth = parse_auth(args.api_auth) if args.api_auth else None
    checkpoint = Path(args.ckpt or DEMO_CHECKPOINT)
    if not checkpoint.is_file():
        raise ValueError(f"checkpoint not found: {checkpoint}")
    if args.host not in ("127.0.0.1", "localhost", "::1") and auth is None:
        print(f"ldm serve: warning: listening on {args.host} without --api-auth: anyone who can reach this port "
              "can use the server", file=sys.stderr)
    sd = ldm.load(checkpoint)
    flags = {k: v for k, v in vars(args).items() if k not in ("func", "command", "api_auth")}
    app = create_app(sd, checkpoint=str(checkpoint), auth=auth, max_pixels=args.max_pixels, lora_dir=args.lora_dir,
                     embeddings_dir=args.embeddings_dir, ckpt_dir=args.ckpt_dir, flags=flags)
    print(f"ldm serve: {checkpoint.name} on http://{args.host}:{args.port}/sdapi/v1/", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def add_subcommand(subparsers) -> argparse.ArgumentParser:
    from ldm.cli import MODULE_COMMANDS

    p = subparsers.add_parser("serve", help=MODULE_COMMANDS["serve"][1], description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None, help="the checkpoint to serve (default: the bundled demo model)")
    p.add_argument("--ckpt-dir", dest="ckpt_dir", default=None,
                   help="a folder of checkpoints that clients may switch to (POST /sdapi/v1/options)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--api-auth", dest="api_auth", default=None, metavar="USER:PASS[,USER:PASS]",
                   help="HTTP basic authentication for every endpoint")
    p.add_argument("--max-pixels", dest="max_pixels", type=int, default=MAX_PIXELS,
                   help=f"refuse images of more pixels than this (default {MAX_PIXELS})")
    p.add_argument("--lora-dir", dest="lora_dir", default=None, help="where <lora:NAME:WEIGHT> tags are looked up")
    p.add_argument("--embeddings-dir", dest="embeddings_dir", default=None,
                   help="textual inversion embeddings, called by their file names in prompts")
    p.set_defaults(func=cmd_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    from ldm.cli import run_standalone

    return run_standalone("serve", add_subcommand, argv)


if __name__ == "__main__":
    sys.exit(main())
