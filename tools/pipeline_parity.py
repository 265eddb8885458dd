"""Pipeline parity report (not a test): `python tools/pipeline_parity.py [--full]`.

A whole txt2img and img2img with ldm and with diffusers' `StableDiffusionPipeline` /
`StableDiffusionImg2ImgPipeline` on the same seeded weights, DDIM schedule and noise, as a markdown table of the max
abs difference of the decoded images in [0, 1] and of the final latents, fp32 on the CPU. The comparisons are those
of `ldm.testing.pipeline_parity`, which `tests/test_pipeline.py` asserts on (max abs pixel difference <= 1e-3).

`--full` adds the sd-v1 architecture at 256x256 (10 steps): about 10 minutes on 2 busy CPU cores.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time

import diffusers
import torch
import transformers

import ldm
from ldm.testing.pipeline_parity import (GUIDANCE, TOLERANCE, diffusers_pipelines, first_timesteps, img2img_parity,
                                         txt2img_parity)
from ldm.testing.reference import random_model


# --- report ----------------------------------------------------------------------------------------------------------

def report(presets: list[tuple[str, int, int]], seed: int = 0) -> tuple[str, bool]:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="also sd-v1 at 256x256, 10 steps (slow on a CPU)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args()
    torch.manual_seed(0)
    presets = [("tiny", 64, 6), ("tiny-v2", 64, 6)] + ([("sd-v1", 256, 10)] if args.full else [])
    table, ok = report(presets, args.seed)
    print(f"Pipeline parity against diffusers (DDIM, guidance {GUIDANCE}, negative prompt), fp32 on CPU "
          f"({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; torch "
          f"{torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}). "
          f"Tolerance: max abs pixel difference <= {TOLERANCE:.0e}.\n")
    print(table)
    print("\nimg2img start (steps, strength -> first timestep ldm / diffusers, steps run ldm / diffusers):")
    for steps, strength in ((6, 0.5), (10, 0.75), (50, 0.3), (10, 1.0), (100, 0.01)):
        t_ours, t_theirs, n_ours, n_theirs = first_timesteps(ldm.preset("tiny"), steps, strength)
        print(f"- {steps} steps, strength {strength}: t = {t_ours} / {t_theirs}, {n_ours} / {n_theirs} steps")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
