"""Small speed and memory probes behind figures in docs/benchmarks.md (not tests): one question each.

    python tools/probe.py conv                                   # direct vs Winograd 3x3 convolutions, per shape
    python tools/probe.py call-phases --size 256 --calls 3       # where a CPU txt2img call's time goes
    python tools/probe.py vae-memory                             # VAE decode peak memory, untiled vs tiled
    python tools/probe.py adapters --rank 128                    # LoRA merge time and per-step cost, long prompts

`--help` after a subcommand says what it measures. The training-step speed is `python tools/bench.py train`.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# --- conv: where Winograd pays -------------------------------------------------------------------------------------

CONV_DOC = """\
Where Winograd's 3x3 convolution (`ldm.accel.winograd`) pays on this CPU: one convolution at a time, oneDNN's
direct convolution from a prepacked weight (what `ldm.accel.optimize.packed_weights` runs otherwise) against
`winograd_conv3x3` from a cached transformed weight, fp32, channels-last input. Prints a markdown table (the one
behind `ldm.accel.optimize.WINOGRAD_*`, docs/benchmarks.md, "Winograd convolutions and split wide convolutions").

    python tools/probe.py conv                      # SD 1.5's shapes at 256 and 512 px
    python tools/probe.py conv --shapes 2x640x640x32 1x512x512x128 --threads 2"""

# batch x in channels x out channels x size: the UNet's levels with guidance (batch 2) and the VAE decoder's (1)
SHAPES = ["2x320x320x64", "2x320x320x32", "2x960x320x32", "2x640x640x32", "2x1920x640x32", "2x640x640x48",
          "2x1280x1280x16", "2x2560x1280x16", "2x1280x1280x8", "1x512x512x32", "1x512x512x128", "1x128x128x512"]


def median_ms(fn, runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def cmd_conv(args: argparse.Namespace) -> int:
    import torch

    from ldm.accel.winograd import winograd_conv3x3, winograd_weight

    torch.set_num_threads(args.threads)
    conv_args = [1, 1], [1, 1], [1, 1], 1  # padding, stride, dilation, groups
    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.runs} calls after one\n")
    print("| conv (in -> out @ size) | n | direct ms | Winograd ms | ratio | max rel err direct / Winograd |")
    print("|---|---:|---:|---:|---:|---:|")
    g = torch.Generator().manual_seed(0)
    for shape in args.shapes:
        n, c, o, size = (int(v) for v in shape.split("x"))
        x = torch.randn(n, c, size, size, generator=g).contiguous(memory_format=torch.channels_last)
        w, b = torch.randn(o, c, 3, 3, generator=g) / (3 * c ** 0.5), torch.randn(o, generator=g)
        with torch.inference_mode():
            packed = torch.ops.mkldnn._reorder_convolution_weight(w, *conv_args, list(x.shape))
            u = winograd_weight(w)

            def direct():
                return torch.ops.mkldnn._convolution_pointwise(x, packed, b, *conv_args, "none", [], "")

            def winograd():
                return winograd_conv3x3(x, u, b)

            ref = torch.nn.functional.conv2d(x.double(), w.double(), b.double(), padding=1)
            err = [((f().double() - ref).abs().max() / ref.abs().max()).item() for f in (direct, winograd)]
            td, tw = median_ms(direct, args.runs), median_ms(winograd, args.runs)
        print(f"| {c} -> {o} @ {size} | {n} | {td:.1f} | {tw:.1f} | {tw / td:.2f} | {err[0]:.1e} / {err[1]:.1e} |",
              flush=True)
    return 0


# --- call-phases: where a txt2img call's time goes -----------------------------------------------------------------

CALL_PHASES_DOC = """\
Where the time of a whole CPU txt2img call goes: packing the weights, the first step, the later steps, the VAE
decode and restoring the weights, for several calls of one process (the bench's random-weight SD 1.5 file).

    python tools/probe.py call-phases --size 256 --calls 3            # an accelerated model: only call 0 packs
    python tools/probe.py call-phases --size 256 --calls 3 --plain    # the plain networks: nothing packed

A measurement tool, not a test: it wraps ldm.accel.optimize's packing and restoring and
ldm.generation.pipeline.decode with timers. Run `python tools/bench.py load` once first: it writes the checkpoint
to .bench_cache/."""

CHECKPOINT = ROOT / ".bench_cache" / "sd15-random-fp16.safetensors"
PROMPT = "a photograph of an astronaut riding a horse on the moon"


def timed(owner, name: str, totals: dict, key: str) -> None:
    """Replace owner.name by a wrapper that adds its wall time to totals[key]."""
    real = getattr(owner, name)

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            totals[key] += time.perf_counter() - t0
    setattr(owner, name, wrapper)


def cmd_call_phases(args: argparse.Namespace) -> int:
    if not CHECKPOINT.exists():
        args.parser.error(f"{CHECKPOINT} is missing; run `python tools/bench.py load` once to write it")

    import torch

    import ldm
    from ldm.accel import optimize
    from ldm.generation import pipeline

    torch.set_num_threads(args.threads)
    sd = ldm.load(CHECKPOINT, dtype=torch.float32, accelerate=not args.plain)
    totals = dict.fromkeys(("pack", "restore", "decode"), 0.0)
    timed(optimize, "_packed", totals, "pack")  # the reorders into oneDNN's layout
    timed(optimize, "_restore", totals, "restore")
    timed(pipeline, "decode", totals, "decode")
    noise = torch.randn(1, 4, args.size // 8, args.size // 8, generator=torch.Generator().manual_seed(0))
    for call in range(args.calls):
        totals.update(dict.fromkeys(totals, 0.0))
        stamps = []
        t0 = time.perf_counter()
        pipeline.txt2img(sd, PROMPT, negative_prompt="", sampler="ddim", steps=args.steps, guidance=7.5,
                         width=args.size, height=args.size, latents=noise,
                         callback=lambda i, n, x: stamps.append(time.perf_counter()))
        total = time.perf_counter() - t0
        later = statistics.median(b - a for a, b in zip(stamps, stamps[1:])) if len(stamps) > 1 else float("nan")
        print(f"call {call}: {total:.2f} s; first step {stamps[0] - t0:.2f} s (packing in it {totals['pack']:.2f} s), "
              f"later steps {later:.3f} s (median), decode {totals['decode']:.2f} s, "
              f"restoring {totals['restore']:.2f} s", flush=True)
    return 0


# --- adapters: LoRA merging and long prompts ---------------------------------------------------------------------

ADAPTERS_DOC = """\
What adapters and long prompts cost, on the bench's random-weight SD 1.5 file (fp32, accelerated as `ldm.load`
gives it): reading a random kohya LoRA (all attention, feed-forward and projection layers of the UNet and the text
encoder, at --rank), merging it and taking it out again, in the cases a user meets: the first LoRA after loading,
fused in place as the command line does, or merged for a run into fresh memory (the Python API, the server); a LoRA
after a run without one (the accelerated model's packed weights unpack); LoRA after LoRA (into the spare weights of
the last merge); the UNet step (batch 2, 64x64 latents) without and with
it merged; the text encoder's time for prompts of 1, 2 and 3 chunks of 75 tokens.

    python tools/probe.py adapters --rank 128       # a ~150 MB LoRA"""


def cmd_adapters(args: argparse.Namespace) -> int:
    if not CHECKPOINT.exists():
        args.parser.error(f"{CHECKPOINT} is missing; run `python tools/bench.py load` once to write it")

    import torch
    from safetensors.torch import save_file

    import ldm
    from ldm.adapters import lora as L
    from ldm.generation import prompts as P

    torch.set_num_threads(args.threads)
    sd = ldm.load(CHECKPOINT, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    layers = ("to_q", "to_k", "to_v", "to_out_0", "ff_net_0_proj", "ff_net_2", "proj_in", "proj_out", "q_proj",
              "k_proj", "v_proj", "out_proj", "fc1", "fc2")
    paths = []
    for name in ("", "-b"):  # two files of the same layers: the second is merged after the first is taken out
        tensors = {}
        for key, target in L.targets(sd).items():
            if key.startswith(("lora_unet_down", "lora_unet_mid", "lora_unet_up", L.KOHYA_TEXT)) \
                    and key.endswith(layers):
                out, inp = target.weight.shape[0], target.weight[0].numel()
                tensors[f"{key}.lora_down.weight"] = torch.randn(args.rank, inp, generator=g).half() * 0.01
                tensors[f"{key}.lora_up.weight"] = torch.randn(out, args.rank, generator=g).half() * 0.01
                tensors[f"{key}.alpha"] = torch.tensor(float(args.rank)).half()
        paths.append(CHECKPOINT.parent / f"lora-rank{args.rank}{name}.safetensors")
        save_file(tensors, str(paths[-1]))
    x = torch.randn(2, 4, 64, 64, generator=g)
    t = torch.tensor([500, 500])
    context = torch.randn(2, 77, 768, generator=g)

    def step() -> None:
        with torch.no_grad():
            sd.unet(x, t, context)

    def read_and_merge(path: Path) -> tuple[L.Merged, float, float]:
        """Read and merge as `ldm.adapters.lora.using` does (writing into the spare weights of the last merge)."""
        t0 = time.perf_counter()
        lora = L.LoRA.read(path)
        t1 = time.perf_counter()
        merged = L.merge(sd, [(lora, 1.0)], spare)
        return merged, t1 - t0, time.perf_counter() - t1

    def report(label: str, merged: L.Merged, read: float, merge: float) -> None:
        t0 = time.perf_counter()
        merged.restore()
        print(f"{label}: read {read:.2f} s, merge {merge:.2f} s, total {read + merge:.2f} s; restore "
              f"{time.perf_counter() - t0:.2f} s")

    fused = ldm.load(CHECKPOINT, dtype=torch.float32)  # as `ldm txt2img --lora` does: in place, for good
    t0 = time.perf_counter()
    lora = L.LoRA.read(paths[0])
    t1 = time.perf_counter()
    L.fuse(fused, [(lora, 1.0)])
    print(f"LoRA rank {args.rank}: {paths[0].stat().st_size / 2**20:.0f} MiB, {len(lora.layers)} layers")
    print(f"first LoRA after loading, fused in place (the command line): read {t1 - t0:.2f} s, fuse "
          f"{time.perf_counter() - t1:.2f} s, total {time.perf_counter() - t0:.2f} s")
    del fused, lora
    spare: dict = {}
    merged, read, merge = read_and_merge(paths[0])  # the Python API's first LoRA: no layer has run yet
    report("first LoRA after loading, merged for the run (fresh memory)", merged, read, merge)
    before = median_ms(step, args.runs)
    merged, read, merge = read_and_merge(paths[1])  # a server's LoRA request after plain ones
    with_lora = median_ms(step, args.runs)
    report("LoRA after a run without one (accelerated: its packed weights unpack)", merged, read, merge)
    print(f"UNet step {before:.0f} ms without, {with_lora:.0f} ms merged")
    times = []
    for i in range(args.runs):  # the two files in turn, as requests naming one and then the other
        merged, read, merge = read_and_merge(paths[i % 2])
        merged.restore()
        times.append((read + merge, read, merge))
    total, read, merge = sorted(times)[len(times) // 2]
    flops = sum(2 * w.numel() * args.rank for w in spare.values())  # one product up · down per weight
    print(f"LoRA after LoRA, into the spare weights (median of {args.runs}): read {read:.2f} s, merge "
          f"{merge:.2f} s ({flops / 1e9:.0f} GFLOP of products: {flops / merge / 1e9:.0f} GFLOP/s), total "
          f"{total:.2f} s (all: {', '.join(f'{t[0]:.2f}' for t in times)} s)")
    for chunks in (1, 2, 3):
        prompt = ", ".join(["a red circle"] * (18 * chunks))  # 4 tokens a phrase: 71, 143, 215 tokens
        k = P.count_chunks(sd.tokenizer, prompt)
        ms = median_ms(lambda prompt=prompt: P.encode(sd, [prompt]), args.runs)
        print(f"prompt of {k} chunk(s): text encoder {ms:.0f} ms")
    return 0


# --- hires-memory: a 1024 px hires fix pass -------------------------------------------------------------------------

HIRES_MEMORY_DOC = """\
Peak RSS and time of a whole hires-fix txt2img of SD 1.5 on the CPU (the bench's random-weight file): 512 px,
2 DDIM steps, then x2 to 1024 px (latent upscale) and 2 steps at denoise 0.5; untiled and with VAE tiling, each
in a fresh process (peak RSS is a per-process high-water mark).

    python tools/probe.py hires-memory"""


def cmd_hires_memory(args: argparse.Namespace) -> int:
    if not CHECKPOINT.exists():
        args.parser.error(f"{CHECKPOINT} is missing; run `python tools/bench.py load` once to write it")
    if args.child:
        import torch

        import ldm

        torch.set_num_threads(args.threads)
        sd = ldm.load(CHECKPOINT, dtype=torch.float32)
        t0 = time.perf_counter()
        out = ldm.txt2img(sd, PROMPT, steps=2, width=512, height=512, seed=1, sampler="ddim", hires_scale=2,
                          hires_steps=2, hires_denoise=0.5, vae_tiling=args.child == "tiled")
        print(f"{args.child}: {out.images[0].size[0]}x{out.images[0].size[1]}, {time.perf_counter() - t0:.0f} s, "
              f"peak RSS {peak_rss_gb():.2f} GB", flush=True)
        return 0
    for mode in ("untiled", "tiled"):
        subprocess.run([sys.executable, __file__, "hires-memory", "--child", mode, "--threads", str(args.threads)],
                       check=True)
    return 0


# --- serve-overhead: the HTTP layer against the Python API -------------------------------------------------------

SERVE_DOC = """\
What `ldm serve`'s HTTP layer adds: the same 256 px SD 1.5 txt2img (the bench's random-weight file, DDIM) through
the Python API and through POST /sdapi/v1/txt2img to a server in the same process, alternated, medians; then
`--queued` requests posted at once by as many threads to the bundled demo model's server, all of which must come
back.

    python tools/probe.py serve-overhead --runs 3 --queued 20"""


def cmd_serve_overhead(args: argparse.Namespace) -> int:
    if not CHECKPOINT.exists():
        args.parser.error(f"{CHECKPOINT} is missing; run `python tools/bench.py load` once to write it")
    import base64
    import socket
    import threading
    import urllib.request

    import torch
    import uvicorn

    import ldm
    from ldm.demo import DEMO_CHECKPOINT
    from ldm.server.app import create_app

    torch.set_num_threads(args.threads)

    def serve(sd, path):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(create_app(sd, checkpoint=str(path)), host="127.0.0.1", port=port,
                                               log_level="warning"))
        threading.Thread(target=server.run, daemon=True).start()
        while not server.started:
            time.sleep(0.05)
        return server, port

    def post(port, body):
        request = urllib.request.Request(f"http://127.0.0.1:{port}/sdapi/v1/txt2img", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=3600) as response:
            return json.loads(response.read())

    sd = ldm.load(CHECKPOINT, dtype=torch.float32)
    server, port = serve(sd, CHECKPOINT)
    body = {"prompt": PROMPT, "steps": args.steps, "sampler_name": "DDIM", "cfg_scale": 7.5, "width": 256,
            "height": 256, "seed": 1}
    ldm.txt2img(sd, PROMPT, steps=args.steps, sampler="ddim", width=256, height=256, seed=1)  # packs the weights
    api, http = [], []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        ldm.txt2img(sd, PROMPT, steps=args.steps, sampler="ddim", guidance=7.5, width=256, height=256, seed=1)
        api.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        out = post(port, body)
        http.append(time.perf_counter() - t0)
        assert len(base64.b64decode(out["images"][0])) > 0
    server.should_exit = True
    a, h = statistics.median(api), statistics.median(http)
    print(f"256 px SD 1.5, {args.steps} DDIM steps: Python API {a:.2f} s, HTTP {h:.2f} s (median of {args.runs}); "
          f"the HTTP layer adds {100 * (h / a - 1):+.1f}%")
    demo = ldm.load(DEMO_CHECKPOINT)
    server, port = serve(demo, DEMO_CHECKPOINT)
    seeds = [None] * args.queued

    def one(i):
        seeds[i] = json.loads(post(port, {"prompt": "a red circle", "steps": 10, "seed": i})["info"])["seed"]

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(args.queued)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    server.should_exit = True
    print(f"{args.queued} requests posted at once to the demo model: {sum(s == i for i, s in enumerate(seeds))} "
          f"came back, in {time.perf_counter() - t0:.1f} s")
    return 0


# --- vae-memory: untiled vs tiled decode -----------------------------------------------------------------------------

VAE_MEMORY_DOC = """\
Peak memory and time of a VAE decode, untiled vs tiled (`ldm.models.tiling`), with the full-size SD VAE.

    python tools/probe.py vae-memory                                  # 512 and 1024, untiled and tiled
    python tools/probe.py vae-memory --cases 2048:tiled --tile-size 512

Each case runs in a fresh subprocess (peak RSS is a per-process high-water mark): the SD 1.x VAE architecture
(`preset("sd-v1").vae`) with random weights, fp32 on the CPU, one image of random latents. Peak RSS is the
process's `ru_maxrss` after the decode, so it includes the interpreter, torch and the weights (`base`)."""

DEFAULT_CASES = ["512:untiled", "512:tiled", "1024:untiled", "1024:tiled"]


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # kB on Linux


def run_case(size: int, mode: str, tile_size: int, threads: int) -> dict:
    import torch

    import ldm
    from ldm.models.vae import AutoencoderKL

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    vae = AutoencoderKL(ldm.preset("sd-v1").vae).eval()
    latents = torch.randn(1, 4, size // 8, size // 8)
    base = peak_rss_gb()
    start = time.perf_counter()
    with torch.no_grad():
        images = vae.decode(latents, tiled=mode == "tiled", tile_size=tile_size)
    seconds = time.perf_counter() - start
    assert images.shape == (1, 3, size, size) and torch.isfinite(images).all()
    return {"size": size, "mode": mode, "tile_size": tile_size if mode == "tiled" else None, "threads": threads,
            "seconds": round(seconds, 1), "peak_rss_gb": round(peak_rss_gb(), 2), "base_rss_gb": round(base, 2)}


def cmd_vae_memory(args: argparse.Namespace) -> int:
    if args.child:
        size, mode = args.child.split(":")
        print(json.dumps(run_case(int(size), mode, args.tile_size, args.threads)))
        return 0
    print(f"{'size':>6} {'mode':>8} {'seconds':>8} {'peak RSS GB':>12} {'(base GB)':>10}")
    for case in args.cases:
        out = subprocess.run([sys.executable, __file__, "vae-memory", "--child", case, "--tile-size",
                              str(args.tile_size), "--threads", str(args.threads)],
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{r['size']:>6} {r['mode']:>8} {r['seconds']:>8} {r['peak_rss_gb']:>12} {r['base_rss_gb']:>10}",
              flush=True)
    return 0


# --- command line ------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/probe.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    raw = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser("conv", help="direct vs Winograd 3x3 convolution per shape, markdown",
                       description=CONV_DOC, formatter_class=raw)
    p.add_argument("--shapes", nargs="+", default=SHAPES, help="NxINxOUTxSIZE")
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(func=cmd_conv)

    p = sub.add_parser("call-phases", help="packing, steps, decode and restoring in whole txt2img calls",
                       description=CALL_PHASES_DOC, formatter_class=raw)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--plain", action="store_true", help="the plain networks (ldm.load(accelerate=False))")
    p.set_defaults(func=cmd_call_phases, parser=p)

    p = sub.add_parser("adapters", help="LoRA read / merge / restore time, UNet step with it, long prompts",
                       description=ADAPTERS_DOC, formatter_class=raw)
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(func=cmd_adapters, parser=p)

    p = sub.add_parser("hires-memory", help="peak RSS of a 1024 px hires-fix txt2img, untiled and tiled",
                       description=HIRES_MEMORY_DOC, formatter_class=raw)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", help=argparse.SUPPRESS)  # one mode, in this process
    p.set_defaults(func=cmd_hires_memory, parser=p)

    p = sub.add_parser("serve-overhead", help="ldm serve's HTTP layer against the Python API; queued requests",
                       description=SERVE_DOC, formatter_class=raw)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--queued", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(func=cmd_serve_overhead, parser=p)

    p = sub.add_parser("vae-memory", help="VAE decode peak RSS and time, untiled vs tiled",
                       description=VAE_MEMORY_DOC, formatter_class=raw)
    p.add_argument("--cases", nargs="+", default=DEFAULT_CASES, help="SIZE:MODE, MODE untiled or tiled")
    p.add_argument("--tile-size", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", help=argparse.SUPPRESS)  # one case, in this process
    p.set_defaults(func=cmd_vae_memory)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
