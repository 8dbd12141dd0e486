"""One schema for the Nexus settings (nexus_megatron.settings.NexusConfig): the YAML ``nexus:`` section, the
ds_config ``nexus`` section and Megatron's ``--nexus-*`` flags (the Megatron-LM hook-in and
launch/pretrain_gpt_nexus.py) have the same names, types, defaults and checks. Any difference fails here."""
import argparse
import dataclasses
import functools
import importlib.util
import os

import pytest

from nexus_megatron.errors import NexusConfigError
from nexus_megatron.layout import LAYOUTS, LayoutConfig
from nexus_megatron.settings import DEFAULTS, FIELDS, SURFACES, NexusConfig, flag_of, names_on, nexus_config_from_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = ("gamma", "gamma_mode", "min_grad_norm", "max_consecutive_skips")   # on every surface
LAYOUT_DEFAULT = {f.name: f.default for f in dataclasses.fields(LayoutConfig)}["mode"]
LAUNCHER_REQUIRED = ["--num-layers", "2", "--hidden-size", "8", "--num-attention-heads", "2", "--seq-length", "8",
                     "--micro-batch-size", "1", "--train-iters", "1", "--lr", "1e-3", "--data-path", "x"]
BAD = {"gamma": 0.0, "gamma_mode": "relative", "min_grad_norm": -1.0, "max_consecutive_skips": -1}


@functools.lru_cache(maxsize=None)
def megatron_parsers():
    """Both Megatron command lines: the Megatron-LM hook-in's flags and the launcher's parser."""
    from nexus_megatron.engines.megatron.megatron_lm import add_nexus_args
    spec = importlib.util.spec_from_file_location("pretrain_gpt_nexus", os.path.join(ROOT, "launch",
                                                                                     "pretrain_gpt_nexus.py"))
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    return {"megatron_lm": add_nexus_args(argparse.ArgumentParser()), "launcher": launcher.build_parser()}


def actions(parser) -> dict:
    return {s: a for a in parser._actions for s in a.option_strings}


def ds_prepare(section: dict):
    from nexus_megatron.engines.deepspeed.config import prepare_ds_config
    cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 2, "zero_optimization": {"stage": 2},
           "nexus": {"sources": ["a", "b"], **section}}
    return prepare_ds_config(cfg, world_size=1)


def test_every_setting_is_on_its_surfaces_and_the_shared_ones_on_all():
    assert set(SURFACES) == {"yaml", "ds_config", "megatron"}
    for s in SURFACES:
        assert set(SHARED) <= set(names_on(s)), s
    assert set(names_on("yaml")) == set(SHARED) | {"control"}
    assert DEFAULTS == NexusConfig() and DEFAULTS.gamma == 0.25


def test_yaml_section_matches_the_schema():
    from nexus_megatron.config import NexusSection, load_config, nexus_config_of
    fields = {f.name: f for f in dataclasses.fields(NexusSection)}
    for name in names_on("yaml"):
        assert fields[name].type is FIELDS[name].type and fields[name].default == FIELDS[name].default, name
    assert fields["layout"].default == LAYOUT_DEFAULT
    cfg = load_config(None)
    assert nexus_config_of(cfg) == NexusConfig()
    cfg = load_config(None, ["nexus.gamma=0.5", "nexus.gamma_mode=absolute", "nexus.min_grad_norm=1e-6",
                             "nexus.max_consecutive_skips=3", "nexus.seed=7"])
    assert nexus_config_of(cfg) == NexusConfig(gamma=0.5, gamma_mode="absolute", min_grad_norm=1e-6,
                                               max_consecutive_skips=3, control_seed=7)


def test_ds_config_section_matches_the_schema():
    from nexus_megatron.engines.deepspeed.config import NEXUS_KEYS
    assert set(names_on("ds_config")) <= set(NEXUS_KEYS)
    assert {"layout", "sources", "weights", "seed"} <= set(NEXUS_KEYS)
    p = ds_prepare({})                                     # nothing given: every default is the schema's
    assert p.nexus == NexusConfig() and p.layout.mode == LAYOUT_DEFAULT
    given = {"gamma": 0.5, "gamma_mode": "absolute", "min_grad_norm": 1e-6, "max_consecutive_skips": 3}
    assert ds_prepare(given).nexus == NexusConfig(**given)


@pytest.mark.parametrize("which", ["megatron_lm", "launcher"])
def test_megatron_flags_match_the_schema(which):
    from nexus_megatron.engines.megatron.megatron_lm import NexusSettings
    parser = megatron_parsers()[which]
    acts = actions(parser)
    for name in names_on("megatron"):
        a, f = acts[flag_of(name)], FIELDS[name]
        assert a.default == f.default, (which, name)
        if f.metadata["choices"]:
            assert tuple(a.choices) == f.metadata["choices"], (which, name)
        else:
            assert a.type is f.type, (which, name)
    assert tuple(acts["--nexus-layout"].choices) == LAYOUTS
    assert acts["--nexus-layout"].default == LAYOUT_DEFAULT
    args = parser.parse_known_args(LAUNCHER_REQUIRED)[0]
    assert nexus_config_from_flags(args) == NexusConfig()
    args = parser.parse_known_args(LAUNCHER_REQUIRED + ["--nexus-gamma", "0.5", "--nexus-gamma-mode", "absolute",
                                    "--nexus-min-grad-norm", "1e-6", "--nexus-max-consecutive-skips", "3"])[0]
    assert nexus_config_from_flags(args) == NexusConfig(gamma=0.5, gamma_mode="absolute", min_grad_norm=1e-6,
                                                        max_consecutive_skips=3)
    settings = NexusSettings(sources=["a"])                # the hook-in's settings object: the same defaults
    assert settings.nexus_config() == NexusConfig() and settings.layout == LAYOUT_DEFAULT


@pytest.mark.parametrize("name", SHARED)
def test_the_same_bad_value_is_refused_on_every_surface_naming_its_key(name):
    from nexus_megatron.config import load_config
    bad = BAD[name]
    with pytest.raises(NexusConfigError, match=f"^nexus.{name}="):
        load_config(None, [f"nexus.{name}={bad}"])
    with pytest.raises(NexusConfigError, match=f"^ds_config nexus.{name}="):
        ds_prepare({name: bad})
    for parser in megatron_parsers().values():           # argparse refuses a value outside the choices itself
        with pytest.raises(SystemExit if FIELDS[name].metadata["choices"] else NexusConfigError,
                           match=None if FIELDS[name].metadata["choices"] else f"^{flag_of(name)}="):
            nexus_config_from_flags(parser.parse_known_args(LAUNCHER_REQUIRED + [flag_of(name), str(bad)])[0])
    with pytest.raises(NexusConfigError, match=f"nexus.{name}="):
        NexusConfig(**{name: bad})
