"""Model registry: small builder functions registered by name.

    @register_model("sgraf_sgr")
    def sgraf_sgr(**overrides): return TVRN(make_config("sgraf_sgr", dict(unify=False, ...), overrides))

`create_model(name, **overrides)` builds one; `create_model(model.config.name, **asdict(model.config))`
rebuilds the same architecture. `list_models()` lists the names.
"""
from __future__ import annotations

from dataclasses import fields
from typing import Callable

from .config import ModelConfig

_REGISTRY: dict[str, Callable] = {}


def register_model(name: str):
    def deco(fn):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = fn
        return fn
    return deco


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, /, **overrides):
    """Build a registered model; `overrides` are ModelConfig fields (a `name` equal to `name` is accepted)."""
    if name not in _REGISTRY:
        raise KeyError(f"no model named {name!r}; models: {', '.join(list_models())}")
    given = overrides.pop("name", name)
    if given != name:
        raise ValueError(f"create_model({name!r}) got config name {given!r}")
    return _REGISTRY[name](**overrides)


def make_config(name: str, defaults: dict, overrides: dict) -> ModelConfig:
    """ModelConfig(name, **defaults) with `overrides` applied; unknown keys are an error naming them."""
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"model {name!r}: unknown config keys {unknown}; known: {sorted(known - {'name'})}")
    return ModelConfig(name=name, **{**defaults, **overrides})
