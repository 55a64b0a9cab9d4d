"""Run configuration: presets are JSON data; flags override them; the resolved config is saved with the run.

A run config has three sections:

    {"model": {"name": "tvrn_sgr", ...model config overrides...},
     "data":  {"root": ..., "vocab": ..., "train_split": "train", "dev_split": "dev", ...},
     "train": {...tvrn.train.TrainConfig fields...},
     "eval":  {"split": "test", "protocol": "f30k_1k"}}

Presets ship inside the package (`tvrn/configs/*.json`, listed by `list_presets()`); a config argument is a
preset name or a path to a JSON file. A preset may name a parent with `"base": "other_preset"`; the child's
values are merged over the parent's.
"""
from __future__ import annotations

import copy
import json
import os
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

from .fileio import atomic_write


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the file or key."""


def _preset_dir():
    return resources.files("tvrn") / "configs"


def list_presets() -> list[str]:
    """Names of the presets shipped with the package."""
    return sorted(p.name[:-5] for p in _preset_dir().iterdir() if p.name.endswith(".json"))


def deep_merge(base: dict, over: dict) -> dict:
    """Return base with `over` merged in, recursively for nested dicts (over wins)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _read_json(path, label: str) -> dict:
    try:
        text = Path(path).read_text() if not hasattr(path, "read_text") else path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config {label}: {e}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"config {label} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"config {label} is not valid JSON: line {e.lineno}, column {e.colno}: {e.msg}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config {label} must hold a JSON object, got {type(data).__name__}")
    return data


def load_config(name_or_path: str, _seen: tuple = ()) -> dict:
    """Load a preset by name (see `list_presets()`) or a JSON file by path, resolving `base` chains."""
    if os.path.sep in name_or_path or name_or_path.endswith(".json") or os.path.exists(name_or_path):
        label = str(name_or_path)
        if not os.path.exists(name_or_path):
            raise ConfigError(f"config file {name_or_path} does not exist")
        data = _read_json(Path(name_or_path), label)
    else:
        entry = _preset_dir() / f"{name_or_path}.json"
        if not entry.is_file():
            raise ConfigError(f"no preset named {name_or_path!r}; presets: {', '.join(list_presets())}")
        data = _read_json(entry, f"preset {name_or_path!r}")
    base = data.pop("base", None)
    if base:
        if base in _seen:
            raise ConfigError(f"config {name_or_path}: base chain loops back to {base!r}")
        data = deep_merge(load_config(base, _seen + (name_or_path,)), data)
    return data


def parse_override(item: str) -> tuple[list[str], Any]:
    """'train.lr=1e-4' -> (['train', 'lr'], 0.0001). Values are parsed as JSON, else kept as strings."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, raw = item.split("=", 1)
    keys = [k for k in key.strip().split(".") if k]
    if not keys:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return keys, value


def apply_overrides(config: dict, overrides: Iterable[str]) -> dict:
    """Return a copy of config with `section.key=value` overrides applied (creating keys as needed)."""
    out = copy.deepcopy(config)
    for item in overrides:
        keys, value = parse_override(item)
        node = out
        for k in keys[:-1]:
            nxt = node.setdefault(k, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {k!r} is not a section")
            node = nxt
        node[keys[-1]] = value
    return out


SECTIONS = ("model", "data", "train", "eval")  # the sections of a run config (module doc)
CHECKED_SECTIONS = ("model", "train", "data")  # those whose keys are fixed fields


def known_keys() -> dict[str, dict[str, Any]]:
    """Section -> {key: expected type (a typing annotation; None: anything)} for the sections whose keys are
    fixed: `model` (tvrn.models.ModelConfig), `train` (tvrn.train.TrainConfig), `data` (tvrn.pipeline's
    DEFAULT_DATA)."""
    import dataclasses
    import typing

    from .models import ModelConfig  # imported here: the models, train and pipeline modules import this one
    from .pipeline import DEFAULT_DATA
    from .train import TrainConfig

    out = {}
    for section, cls in (("model", ModelConfig), ("train", TrainConfig)):
        try:
            hints = typing.get_type_hints(cls)
        except Exception:  # an annotation that does not evaluate: check the names only
            hints = {}
        out[section] = {f.name: hints.get(f.name) for f in dataclasses.fields(cls)}
    out["data"] = {k: (None if v is None else float if type(v) is float else type(v)) for k, v in DEFAULT_DATA.items()}
    return out


_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _type_matches(value: Any, expected: Any) -> bool:
    import typing

    if expected is None or expected is Any:
        return True
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is str:
        return isinstance(value, str)
    origin, params = typing.get_origin(expected), typing.get_args(expected)
    if origin is typing.Union:
        return any(_type_matches(value, p) for p in params)
    if origin is list:
        return isinstance(value, list) and all(_type_matches(v, params[0]) for v in value) if params else \
            isinstance(value, list)
    if expected is type(None):
        return value is None
    return True  # a type this check does not know: left to the code that uses it


def _type_name(expected: Any) -> str:
    import typing

    if expected in _TYPE_NAMES:
        return _TYPE_NAMES[expected]
    origin, params = typing.get_origin(expected), typing.get_args(expected)
    if origin is typing.Union:
        names = [_type_name(p) for p in params if p is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in params else "")
    if origin is list:
        return f"a JSON list of {_type_name(params[0]).removeprefix('an ').removeprefix('a ')}s" if params else \
            "a JSON list"
    return getattr(expected, "__name__", str(expected))


def _check_key(section: str, key: str, value: Any, known: dict, where: str) -> None:
    import difflib

    fields = known[section]
    if key not in fields:
        close = difflib.get_close_matches(key, list(fields), n=1)
        hint = f" (did you mean {section}.{close[0]}?)" if close else f"; known keys: {', '.join(sorted(fields))}"
        raise ConfigError(f"{where}: unknown key {section}.{key}{hint}")
    expected = fields[key]
    if not _type_matches(value, expected):
        raise ConfigError(f"{where}: {section}.{key} expects {_type_name(expected)}, got {json.dumps(value)}")


def check_overrides(overrides: Iterable[str]) -> None:
    """Refuse `section.key=value` overrides of a section that does not exist, and of the model / train / data
    sections whose key does not exist (naming the closest known one) or whose value has the wrong type for the
    field (an int, float, bool, string or list field). Raises ConfigError naming the override."""
    import difflib

    known = None
    for item in overrides:
        keys, value = parse_override(item)
        if keys[0] not in SECTIONS:
            close = difflib.get_close_matches(keys[0], SECTIONS, n=1)
            raise ConfigError(f"--set {item}: unknown section {keys[0]}"
                              + (f" (did you mean {'.'.join([close[0], *keys[1:]])}?)" if close else
                                 f"; sections: {', '.join(SECTIONS)}"))
        if keys[0] not in CHECKED_SECTIONS:
            continue
        known = known or known_keys()
        where = f"--set {item}"
        section = keys[0]
        if len(keys) == 1:
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: {section} is a section; set its keys ({section}.KEY=VALUE) or give a "
                                  f"JSON object")
            for k, v in value.items():
                _check_key(section, k, v, known, where)
            continue
        _check_key(section, keys[1], value, known, where)
        if len(keys) > 2:
            raise ConfigError(f"{where}: {section}.{keys[1]} is a value, not a section")


def check_config(config: dict, where: str = "config") -> None:
    """Refuse a resolved run config whose model / train / data sections hold unknown keys or wrongly typed values
    (see check_overrides). Raises ConfigError naming the key."""
    known = None
    for section in CHECKED_SECTIONS:
        values = config.get(section)
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: {section} must be a JSON object, got {json.dumps(values)}")
        known = known or known_keys()
        for k, v in values.items():
            _check_key(section, k, v, known, where)


def save_config(config: dict, path) -> None:
    """Write the resolved config as JSON, atomically (temporary file renamed into place)."""
    data = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
    atomic_write(path, lambda f: f.write(data))


def config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts (present in one only counts), sorted."""
    out = []
    for k in sorted(set(old) | set(new), key=str):
        key = f"{prefix}{k}"
        a, b = old.get(k, _MISSING), new.get(k, _MISSING)
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(config_differences(a, b, key + "."))
        elif a != b:
            out.append(key)
    return out


def describe_differences(old: dict, new: dict, keys: list[str]) -> str:
    """'train.lr: 0.0002 -> 0.001, model.embed_size: 1024 -> 256' for the given dotted keys."""
    def get(d, key):
        for part in key.split("."):
            if not isinstance(d, dict) or part not in d:
                return "(absent)"
            d = d[part]
        return json.dumps(d)

    return ", ".join(f"{k}: {get(old, k)} -> {get(new, k)}" for k in keys)


class _Missing:
    def __repr__(self) -> str:
        return "(absent)"


_MISSING = _Missing()
