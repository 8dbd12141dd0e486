"""The Nexus settings: one dataclass, :class:`NexusConfig`, is the single source of their names, types,
defaults, documentation and validation. Every surface that takes them is generated from it:

* the YAML ``nexus:`` section (:class:`nexus_megatron.config.NexusSection`; its Nexus fields are these,
  next to the layout's and the plain engine's own settings),
* the ``nexus`` section of a DeepSpeed ds_config (:data:`nexus_megatron.engines.deepspeed.config.NEXUS_KEYS`),
* Megatron's ``--nexus-*`` flags (:func:`add_nexus_flags`, used by the Megatron-LM hook-in
  :func:`nexus_megatron.engines.megatron.megatron_lm.add_nexus_args` and by ``launch/pretrain_gpt_nexus.py``),

and read back into a :class:`NexusConfig` by :func:`nexus_config_from` / :func:`nexus_config_from_flags`
(no hand-written mapping per surface). ``tests/test_settings_schema.py`` fails if a name, type or default
differs between the surfaces.

This module imports nothing from the package but the errors, so every module can import it.
"""
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Tuple

from .errors import NexusConfigError

GAMMA_MODES = ("update", "absolute")
CONTROLS = ("none", "random_direction")

SURFACES = ("yaml", "ds_config", "megatron")
"""The places a user writes Nexus settings: the trainer's YAML, a ds_config.json, Megatron's command line."""


def setting(default, doc: str, *, choices: Optional[Tuple[str, ...]] = None, minimum=None, open_min: bool = False,
            hint: str = "", surfaces: Tuple[str, ...] = SURFACES):
    """A field of :class:`NexusConfig` with what the surfaces need: its documentation, its allowed values
    (``choices``, or a bound ``minimum`` (exclusive with ``open_min``)), an extra ``hint`` for the error, and
    the ``surfaces`` that expose it under its own name (``--nexus-<name>`` on Megatron's command line)."""
    return field(default=default, metadata={"doc": doc, "choices": choices, "minimum": minimum, "open_min": open_min,
                                            "hint": hint, "surfaces": tuple(surfaces)})


@dataclass(frozen=True)
class NexusConfig:
    """Settings of the inner loop. The outer optimizer (lr, schedule, betas, weight decay) is configured
    on the outer optimizer itself; the source layout (sequential / source-parallel, sources, weights, seed)
    on :class:`nexus_megatron.layout.LayoutConfig`."""

    gamma: float = setting(
        0.25,
        "inner step size. gamma_mode=update: a dimensionless factor alpha, gamma_t = alpha * lr_t * sqrt(P) / k "
        "(the whole inner path k * gamma_t is alpha times the length of a sign-like AdamW step of P parameters "
        "at the current lr, so it follows the lr schedule and scales with the model); gamma_mode=absolute: the "
        "length of one inner step in parameter space, fixed for the whole run",
        minimum=0, open_min=True,
        hint="(gamma -> 0 is the 'normalized AdamW' control: use a small positive value such as 1e-6)")
    gamma_mode: str = setting("update", "'update' (gamma is a factor of the lr-scaled AdamW step length) or 'absolute'",
                              choices=GAMMA_MODES)
    min_grad_norm: float = setting(1e-8, "a source whose gradient norm is below this is dropped from the micro-step",
                                   minimum=0)
    max_consecutive_skips: int = setting(10, "abort after this many outer steps in a row with NaN/Inf gradients "
                                             "(0 = never abort)", minimum=0)
    control: str = setting(
        "none", "'none' (Nexus) or 'random_direction' (the study's control, docs/nexus.md#controls; plain engine): "
        "each inner step moves the forward point by a seeded random direction of the length the inner step would "
        "have moved (gamma_t * ||d||), while the pseudo-gradient still sums the normalized gradients d",
        choices=CONTROLS, surfaces=("yaml",))
    control_seed: int = setting(0, "seed of the random directions (mixed with the outer-step and micro-step numbers; "
                                    "every rank draws the same direction); the YAML's nexus.seed",
                                surfaces=())

    def __post_init__(self):
        validate_nexus_config(self)


FIELDS = {f.name: f for f in dataclasses.fields(NexusConfig)}


def names_on(surface: str) -> Tuple[str, ...]:
    """The :class:`NexusConfig` fields a surface exposes under their own names."""
    if surface not in SURFACES:
        raise ValueError(f"unknown surface {surface!r}")
    return tuple(n for n, f in FIELDS.items() if surface in f.metadata["surfaces"])


def flag_of(name: str) -> str:
    """Megatron's command-line flag of a setting: ``--nexus-<name with dashes>``."""
    return "--nexus-" + name.replace("_", "-")


def doc_of(name: str) -> str:
    return FIELDS[name].metadata["doc"]


def check_value(name: str, value, label: Optional[str] = None) -> None:
    """Raise NexusConfigError (naming ``label``, default ``nexus.<name>``) unless ``value`` fits the field."""
    f, label = FIELDS[name], label or f"nexus.{name}"
    meta, hint = f.metadata, (" " + f.metadata["hint"]) if f.metadata["hint"] else ""
    if meta["choices"] is not None:
        if value not in meta["choices"]:
            raise NexusConfigError(f"{label}={value!r}: use one of {', '.join(meta['choices'])}")
        return
    lo, strict = meta["minimum"], meta["open_min"]
    bound = "" if lo is None else f" {'>' if strict else '>='} {lo}"
    if f.type is int:
        if isinstance(value, bool) or not isinstance(value, int) or (lo is not None and value < lo):
            raise NexusConfigError(f"{label}={value!r}: must be an integer{bound}")
        return
    if f.type is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise NexusConfigError(f"{label}={value!r}: must be a finite number")
        if lo is not None and (value <= lo if strict else value < lo):
            raise NexusConfigError(f"{label}={value!r}: must be{bound}{hint}")
        return
    raise TypeError(f"NexusConfig.{name}: no check for type {f.type!r}")   # a new field needs its check here


def validate_nexus_config(cfg: NexusConfig, label: Callable[[str], str] = lambda n: f"nexus.{n}") -> None:
    for name in FIELDS:
        check_value(name, getattr(cfg, name), label(name))


def nexus_config_from(values, label: Callable[[str], str] = lambda n: f"nexus.{n}", **extra) -> NexusConfig:
    """A NexusConfig from whatever holds the settings under their own names: a mapping (a ds_config
    ``nexus`` section; only the keys present), or an object with attributes (the YAML's NexusSection,
    Megatron's NexusSettings); ``extra`` sets fields held under another name (e.g. ``control_seed``).
    Every value is checked first, the error naming it with ``label(name)``."""
    if isinstance(values, Mapping):
        got = {n: values[n] for n in FIELDS if n in values}
    else:
        got = {n: getattr(values, n) for n in FIELDS if hasattr(values, n)}
    got.update(extra)
    for n, v in got.items():
        check_value(n, v, label(n))
    return NexusConfig(**got)


def nexus_config_of_section(section) -> NexusConfig:
    """The NexusConfig of the YAML's ``nexus:`` section (:class:`nexus_megatron.config.NexusSection`), whose
    ``seed`` also seeds the control's random directions."""
    return nexus_config_from(section, label=lambda n: "nexus.seed" if n == "control_seed" else f"nexus.{n}",
                             control_seed=section.seed)


def add_nexus_flags(group) -> None:
    """Megatron's ``--nexus-*`` flags of the settings, on an argparse parser or argument group."""
    for name in names_on("megatron"):
        f = FIELDS[name]
        kw = {"choices": list(f.metadata["choices"])} if f.metadata["choices"] else {"type": f.type}
        group.add_argument(flag_of(name), default=f.default, help=f"{doc_of(name)} (default {f.default})", **kw)


def nexus_config_from_flags(args) -> NexusConfig:
    """The NexusConfig of parsed ``--nexus-*`` flags (:func:`add_nexus_flags`)."""
    return nexus_config_from({n: getattr(args, "nexus_" + n) for n in names_on("megatron")}, label=flag_of)


DEFAULTS = NexusConfig()
"""A :class:`NexusConfig` of the defaults (``DEFAULTS.gamma`` is the one default of ``gamma`` everywhere)."""


__all__ = ["NexusConfig", "GAMMA_MODES", "CONTROLS", "SURFACES", "DEFAULTS", "names_on", "flag_of", "doc_of",
           "check_value", "validate_nexus_config", "nexus_config_from", "nexus_config_of_section", "add_nexus_flags", "nexus_config_from_flags"]
