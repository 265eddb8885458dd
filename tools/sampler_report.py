"""Print, as markdown, the sampler parity errors against diffusers and the measured convergence orders.

    python tools/sampler_report.py            # both tables
    python tools/sampler_report.py parity     # one of them
    python tools/sampler_report.py orders

The cases and measurements are the ones the tests assert (tests/test_sampler_parity.py, tests/test_samplers.py);
this script only runs them and formats the numbers.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without installing

import torch  # noqa: E402

from tests import test_sampler_parity as parity  # noqa: E402
from tests import test_samplers as samplers  # noqa: E402

# The order of each method as designed (the tests assert the order expected on SD's Karras grid, see
# tests/test_samplers.py for why lms, plms and dpmpp_3m_sde differ).
NOMINAL = {"euler": 1, "ddim": 1, "euler_a": 1, "heun": 2, "dpm2": 2, "dpm2_a": 2, "plms": 4, "lms": 4,
           "dpmpp_2s_a": 2, "dpmpp_sde": 2, "dpmpp_2m": 2, "dpmpp_2m_sde": 2, "dpmpp_3m_sde": 3}
NOTES = {
    "plms": "fixed-step AB weights on a grid not uniform in σ; 4 on a uniform grid",
    "lms": "Euler start-up caps it at 2 only beyond N ≈ 500",
    "dpmpp_3m_sde": "D2 weight is half the exact one (k-diffusion, diffusers); 3 with it doubled",
}


def parity_table() -> str:
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


def main(argv: list[str]) -> None:
    which = argv[1:] or ["parity", "orders"]
    for part in which:
        start = time.perf_counter()
        if part == "parity":
            print("### Parity with diffusers (max |ldm - diffusers| / max |diffusers| of the final latents)\n")
            print(parity_table())
        elif part == "orders":
            print("### Convergence to the exact probability-flow ODE solution (Gaussian data, float64)\n")
            print(order_table())
        else:
            raise SystemExit(f"unknown table {part!r}; expected 'parity' or 'orders'")
        print(f"\n({time.perf_counter() - start:.1f} s)\n")


if __name__ == "__main__":
    main(sys.argv)
