"""The sampler table: each sampler's canonical name, its AUTOMATIC1111 name and what it takes, in one place.

Everything else is derived from `TABLE`: the sets of discrete, eta-taking and stochastic samplers, the names
`resolve_sampler` accepts (canonical, k-diffusion's and A1111's, the latter with a " Karras" or " Exponential"
schedule), the name an image's infotext records (`infotext_name`) and the command line's help. `ldm.sampling.samplers`
maps each name to its function. This module imports no torch, so that the command line checks a sampler name
without it.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplerName:
    name: str                      # canonical: the key of ldm.sampling.samplers.SAMPLERS and of the CLI's --sampler
    a1111: str                     # AUTOMATIC1111's display name, as its UI, API and infotext spell it
    discrete: bool = False         # runs on its own discrete timestep grid (CompVis), never a Karras schedule
    eta: bool = False              # takes eta, its noise scale
    stochastic: bool = False       # draws noise while sampling: takes each image's generator
    kdiffusion: str | None = None  # k-diffusion's `sample_<name>`, where it differs from `name`


TABLE: tuple[SamplerName, ...] = (
    SamplerName("ddpm", "DDPM", discrete=True, stochastic=True),
    SamplerName("ddim", "DDIM", discrete=True, eta=True, stochastic=True),
    SamplerName("plms", "PLMS", discrete=True),
    SamplerName("euler", "Euler"),
    SamplerName("euler_a", "Euler a", eta=True, stochastic=True, kdiffusion="euler_ancestral"),
    SamplerName("heun", "Heun"),
    SamplerName("dpm2", "DPM2", kdiffusion="dpm_2"),
    SamplerName("dpm2_a", "DPM2 a", eta=True, stochastic=True, kdiffusion="dpm_2_ancestral"),
    SamplerName("lms", "LMS"),
    SamplerName("dpmpp_2s_a", "DPM++ 2S a", eta=True, stochastic=True, kdiffusion="dpmpp_2s_ancestral"),
    SamplerName("dpmpp_sde", "DPM++ SDE", eta=True, stochastic=True),
    SamplerName("dpmpp_2m", "DPM++ 2M"),
    SamplerName("dpmpp_2m_sde", "DPM++ 2M SDE", eta=True, stochastic=True),
    SamplerName("dpmpp_3m_sde", "DPM++ 3M SDE", eta=True, stochastic=True),
)
NAMES: tuple[str, ...] = tuple(s.name for s in TABLE)
DISCRETE_SAMPLERS = frozenset(s.name for s in TABLE if s.discrete)  # CompVis/diffusers: "leading" grid, VP start
ETA_SAMPLERS = frozenset(s.name for s in TABLE if s.eta)
STOCHASTIC_SAMPLERS = frozenset(s.name for s in TABLE if s.stochastic)  # the ones that take `generators`
DISPLAY_NAMES = {s.a1111: s.name for s in TABLE}  # A1111 name -> canonical name
# A1111's suffix of a sampler name that carries its σ schedule ("DPM++ 2M Karras"), and that schedule
SCHEDULE_SUFFIXES = {"Karras": "karras", "Exponential": "exponential"}


def _build_aliases() -> dict[str, tuple[str, str | None]]:
    table: dict[str, tuple[str, str | None]] = {}
    for s in TABLE:
        table[s.name] = table[s.a1111] = (s.name, None)
        if s.kdiffusion is not None:
            table[s.kdiffusion] = (s.name, None)
        if not s.discrete:
            for suffix, schedule in SCHEDULE_SUFFIXES.items():
                table[f"{s.a1111} {suffix}"] = (s.name, schedule)
    return table


ALIASES: dict[str, tuple[str, str | None]] = _build_aliases()


def _normalize(name: str) -> str:
    return " ".join(name.lower().replace("_", " ").split())


_LOOKUP = {_normalize(alias): target for alias, target in ALIASES.items()}


def resolve_sampler(name: str) -> tuple[str, str | None]:
    """(canonical sampler name, σ schedule or None) for a canonical name, a k-diffusion name or an A1111 display
    name such as "DPM++ 2M Karras" -> ("dpmpp_2m", "karras"). Case and `_`/space are ignored."""
    try:
        return _LOOKUP[_normalize(name)]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; valid names: {', '.join(NAMES)} (A1111 names such as "
                         f"{', '.join(repr(n) for n in DISPLAY_NAMES)}, with ' Karras' or ' Exponential' "
                         "for the k-samplers, are accepted too)") from None


def display_name(name: str) -> str:
    """The A1111 display name of a canonical sampler name ("dpmpp_2m" -> "DPM++ 2M")."""
    return next((s.a1111 for s in TABLE if s.name == name), name)


def infotext_name(name: str, schedule: str | None) -> str:
    """The name A1111's infotext gives `name` sampled on `schedule` ("dpmpp_2m", "karras" -> "DPM++ 2M Karras");
    `resolve_sampler` reads it back."""
    suffix = {v: k for k, v in SCHEDULE_SUFFIXES.items()}.get(schedule or "")
    return display_name(name) + (f" {suffix}" if suffix and name not in DISCRETE_SAMPLERS else "")
