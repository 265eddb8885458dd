"""Parity reports against diffusers and transformers (not tests): markdown tables of the errors the tests assert on.

    python tools/parity.py components --presets tiny tiny-v2 sd-v1 sd-v2   # UNet, VAE, text encoder
    python tools/parity.py pipeline [--full]                               # whole txt2img / img2img, DDIM
    python tools/parity.py samplers [parity] [orders]                      # samplers: parity and convergence orders

`components` and `pipeline` exit 1 when an error is over its tolerance. `--help` after a subcommand says what it
compares.
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _environment() -> str:
    import diffusers
    import torch
    import transformers

    return (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; torch "
            f"{torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}")


# --- components --------------------------------------------------------------------------------------------------

COMPONENTS_DOC = """\
For each preset, builds ldm's StableDiffusion with seeded weights, hands the same weights to diffusers'
UNet2DConditionModel and AutoencoderKL and transformers' CLIPTextModel through diffusers' own conversion
functions (strict loads), and prints a markdown table of the errors per component. It reuses ldm.testing.reference,
so the numbers are those the parity tests assert on (rel = max|ours - ref| / max|ref|, limit 1e-4 in fp32).
The full sizes need about 7 GB of memory and a minute or two each on a 2-core CPU."""


def components_report(presets: list[str], seed: int) -> tuple[str, bool]:
    import ldm
    from ldm.testing.reference import compare_all, probe_sizes, random_model

    rows = ["| preset | component | rel error | abs error | max abs ref | ok |", "|---|---|---|---|---|---|"]
    all_ok = True
    for name in presets:
        start = time.perf_counter()
        sd, checkpoint = random_model(ldm.preset(name), seed=seed)
        errors = compare_all(sd, checkpoint)
        del sd, checkpoint
        gc.collect()
        for e in errors:
            rows.append(f"| {name} | {e.component} | {e.rel:.2e} | {e.abs:.2e} | {e.scale:.2f} | "
                        f"{'yes' if e.ok else '**NO**'} |")
            all_ok &= e.ok
        latent, image = probe_sizes(ldm.preset(name))
        print(f"{name}: {time.perf_counter() - start:.0f} s (UNet latents 2x4x{latent}x{latent}, "
              f"VAE images 2x3x{image}x{image})", file=sys.stderr)
    return "\n".join(rows), all_ok


def cmd_components(args: argparse.Namespace) -> int:
    import ldm
    from ldm.testing.reference import TOLERANCE

    unknown = [p for p in args.presets if p not in ldm.PRESETS]
    if unknown:
        args.parser.error(f"unknown preset(s) {unknown}; choose from {sorted(ldm.PRESETS)}")
    table, ok = components_report(args.presets, args.seed)
    print(f"Parity, fp32 on CPU ({_environment()}). Tolerance: rel <= {TOLERANCE:.0e}.\n")
    print(table)
    return 0 if ok else 1


# --- pipeline ----------------------------------------------------------------------------------------------------

PIPELINE_DOC = """\
A whole txt2img and img2img (strength 0.5 and 1.0) with ldm and with diffusers' StableDiffusionPipeline /
StableDiffusionImg2ImgPipeline on the same seeded weights, DDIM schedule and noise (ldm.testing.pipeline_parity,
which tests/test_pipeline.py asserts on), fp32 on the CPU; then the first timestep and step count of img2img
on both sides for a few (steps, strength). SDXL-shaped models run against StableDiffusionXLPipeline /
StableDiffusionXLImg2ImgPipeline. `--full` adds the sd-v1 architecture at 256x256 (10 steps) and the SDXL base at
128x128 (6 steps): about 15 minutes on 2 busy CPU cores, 16 GB of memory."""


def pipeline_report(presets: list[tuple[str, int, int]], seed: int = 0) -> tuple[str, bool]:
    import ldm
    from ldm.testing.pipeline_parity import diffusers_pipelines, img2img_parity, txt2img_parity
    from ldm.testing.reference import random_model

    rows = ["| preset | case | size | steps | max abs pixel diff | max abs latent diff | max abs latent | ok |",
            "|---|---|---|---|---|---|---|---|"]
    all_ok = True
    for name, size, steps in presets:
        start = time.perf_counter()
        cfg = ldm.preset(name)
        sd, checkpoint = random_model(cfg, seed=seed)
        pipes = diffusers_pipelines(cfg, checkpoint)
        results = [txt2img_parity(sd, pipes, size=size, steps=steps),
                   *(img2img_parity(sd, pipes, strength=s, size=size, steps=steps) for s in (0.5, 1.0))]
        for r in results:
            rows.append(f"| {name} | {r.case.removeprefix(name + ' ')} | {size} | {steps} | {r.pixel:.2e} | "
                        f"{r.latent:.2e} | {r.latent_scale:.2f} | {'yes' if r.ok else '**NO**'} |")
            all_ok &= r.ok
        print(f"{name}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
        del sd, checkpoint, pipes
    return "\n".join(rows), all_ok


def cmd_pipeline(args: argparse.Namespace) -> int:
    import torch

    import ldm
    from ldm.testing.pipeline_parity import GUIDANCE, TOLERANCE, first_timesteps

    torch.manual_seed(0)
    presets = [("tiny", 64, 6), ("tiny-v2", 64, 6), ("tiny-sdxl", 64, 6)]
    presets += [("sd-v1", 256, 10), ("sdxl", 128, 6)] if args.full else []
    table, ok = pipeline_report(presets, args.seed)
    print(f"Pipeline parity against diffusers (DDIM, guidance {GUIDANCE}, negative prompt), fp32 on CPU "
          f"({_environment()}). Tolerance: max abs pixel difference <= {TOLERANCE:.0e}.\n")
    print(table)
    print("\nimg2img start (steps, strength -> first timestep ldm / diffusers, steps run ldm / diffusers):")
    for steps, strength in ((6, 0.5), (10, 0.75), (50, 0.3), (10, 1.0), (100, 0.01)):
        t_ours, t_theirs, n_ours, n_theirs = first_timesteps(ldm.preset("tiny"), steps, strength)
        print(f"- {steps} steps, strength {strength}: t = {t_ours} / {t_theirs}, {n_ours} / {n_theirs} steps")
    return 0 if ok else 1


# --- samplers ----------------------------------------------------------------------------------------------------

SAMPLERS_DOC = """\
The sampler parity errors against diffusers' schedulers and the measured convergence orders, as markdown. The
cases and measurements are the ones the tests assert (tests/test_sampler_parity.py, tests/test_samplers.py):
this subcommand loads those two test modules from the checkout, runs them and formats the numbers."""

# The order of each method as designed (the tests assert the order expected on SD's Karras grid, see
# tests/test_samplers.py for why lms, plms and dpmpp_3m_sde differ).
NOMINAL = {"euler": 1, "ddim": 1, "euler_a": 1, "heun": 2, "dpm2": 2, "dpm2_a": 2, "plms": 4, "lms": 4,
           "dpmpp_2s_a": 2, "dpmpp_sde": 2, "dpmpp_2m": 2, "dpmpp_2m_sde": 2, "dpmpp_3m_sde": 3}
NOTES = {
    "plms": "fixed-step AB weights on a grid not uniform in σ; 4 on a uniform grid",
    "lms": "Euler start-up caps it at 2 only beyond N ≈ 500",
    "dpmpp_3m_sde": "D2 weight is half the exact one (k-diffusion, diffusers); 3 with it doubled",
}


def load_test_module(name: str):
    """tests/<name>.py, loaded from its file: the test suite is no package, and the tables reuse its cases."""
    spec = importlib.util.spec_from_file_location(f"tests_{name}", ROOT / "tests" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def parity_table() -> str:
    import torch

    parity = load_test_module("test_sampler_parity")
    lines = ["| case | ldm sampler | diffusers reference | dtype | steps | max rel. error | σ grid rel. diff |",
             "|---|---|---|---|---|---|---|"]
    for case in parity.CASES:
        err, sigma_err = parity.run_case(case)
        dtype = "fp64" if case.dtype == torch.float64 else "fp32"
        sigma = f"{sigma_err:.1e}" if sigma_err else "—"
        lines.append(f"| {case.label} | `{case.sampler}` | {case.reference} | {dtype} | {case.steps} | "
                     f"{err:.1e} | {sigma} |")
    return "\n".join(lines)


def order_table() -> str:
    samplers = load_test_module("test_samplers")
    steps = samplers.ORDER_STEPS
    lines = [f"| sampler | method order | expected on Karras grid | measured (N = {steps[0]}→{steps[-1]}) | "
             f"error N={steps[0]} | error N={steps[-1]} | note |",
             "|---|---|---|---|---|---|---|"]
    for name, (kwargs, expected) in samplers.DETERMINISTIC.items():
        errors = samplers.ode_errors(name)
        label = f"`{name}`" + (" (η=0)" if "eta" in kwargs else "")
        lines.append(f"| {label} | {NOMINAL[name]} | {expected} | {samplers.measured_order(steps, errors):.2f} | "
                     f"{errors[0]:.1e} | {errors[-1]:.1e} | {NOTES.get(name, '')} |")
    return "\n".join(lines)


def cmd_samplers(args: argparse.Namespace) -> int:
    unknown = [t for t in args.tables if t not in ("parity", "orders")]
    if unknown:
        args.parser.error(f"unknown table(s) {unknown}; expected 'parity' or 'orders'")
    for part in args.tables or ["parity", "orders"]:
        start = time.perf_counter()
        if part == "parity":
            print("### Parity with diffusers (max |ldm - diffusers| / max |diffusers| of the final latents)\n")
            print(parity_table())
        else:
            print("### Convergence to the exact probability-flow ODE solution (Gaussian data, float64)\n")
            print(order_table())
        print(f"\n({time.perf_counter() - start:.1f} s)\n")
    return 0


# --- command line ------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/parity.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    raw = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser("components", help="UNet, VAE and text encoder against diffusers / transformers",
                       description=COMPONENTS_DOC, formatter_class=raw)
    p.add_argument("--presets", nargs="+", default=["tiny", "tiny-v2"], help="ldm preset names")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.set_defaults(func=cmd_components, parser=p)

    p = sub.add_parser("pipeline", help="whole txt2img / img2img against diffusers' pipelines",
                       description=PIPELINE_DOC, formatter_class=raw)
    p.add_argument("--full", action="store_true", help="also sd-v1 at 256x256 and sdxl at 128x128 (slow on a CPU)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.set_defaults(func=cmd_pipeline)

    p = sub.add_parser("samplers", help="sampler parity with diffusers' schedulers and convergence orders",
                       description=SAMPLERS_DOC, formatter_class=raw)
    # no `choices`: argparse would check the empty default list against them
    p.add_argument("tables", nargs="*", metavar="{parity,orders}", help="the tables to print (default: both)")
    p.set_defaults(func=cmd_samplers, parser=p)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
