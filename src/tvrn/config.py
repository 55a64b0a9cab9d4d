"""Run configuration: presets are JSON data; flags override them; the resolved config is saved with the run.

A run config has three sections, each with fixed, typed keys:

    {"model": {"name": "tvrn_sgr", ...tvrn.models.ModelConfig fields...},
     "data":  {...DataConfig fields: "root", "vocab", "train_split", "dev_split", ...},
     "train": {...TrainConfig fields...}}

`resolve_config` fills in the defaults; `check_resume` is the one rule for whether a run may be resumed with
another config (the run folder's run.json, and the checkpoint's own config, both go through it).

Presets ship inside the package (`tvrn/configs/*.json`, listed by `list_presets()`); a config argument is a
preset name or a path to a JSON file. A preset may name a parent with `"base": "other_preset"`; the child's
values are merged over the parent's.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Iterable, Optional

from .fileio import write_json


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the file or key."""


class _Section:
    """`from_dict` of the run config's typed sections: unknown keys are refused by name."""

    section: ClassVar[str] = ""

    @classmethod
    def from_dict(cls, d: dict):
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown {cls.section} config keys: {sorted(unknown)}")
        return cls(**d)


@dataclass
class DataConfig(_Section):
    """The run config's data section: where the features are and how evaluation batches them."""

    root: Optional[str] = None  # precomp folder (SPLIT_ims.npy, SPLIT_caps.txt, ...)
    vocab: Optional[str] = None  # SCAN vocabulary JSON; default ROOT/vocab.json (GRU text encoders only)
    train_split: str = "train"
    dev_split: str = "dev"  # COCO: "dev_5k" (the first 5000 dev captions, as everyone does)
    adjacency_threshold: float = 0.2  # IoU threshold of the spatial adjacency (the official script's value)
    glove: bool = False  # initialise GRU word vectors from GloVe 6B 50d (needs model.word_dim=50)
    eval_batch_size: int = 128  # images / captions per encode batch at evaluation
    block_images: int = 128  # scorer block: images x captions scored at once
    block_texts: int = 512

    section: ClassVar[str] = "data"


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


SECTIONS = ("model", "data", "train")  # the sections of a run config (module doc)
CHECKED_SECTIONS = SECTIONS  # every key is a field


def known_keys() -> dict[str, dict[str, Any]]:
    """Section -> {key: expected type (a typing annotation; None: anything)}: `model` (tvrn.models.ModelConfig),
    `train` (TrainConfig), `data` (DataConfig)."""
    import typing

    from .models.config import ModelConfig

    out = {}
    for section, cls in (("model", ModelConfig), ("train", TrainConfig), ("data", DataConfig)):
        try:
            hints = typing.get_type_hints(cls)
        except Exception:  # an annotation that does not evaluate: check the names only
            hints = {}
        out[section] = {f.name: hints.get(f.name) for f in dataclasses.fields(cls)}
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
    write_json(path, config, indent=2, sort_keys=True)


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


# ------------------------------------------------------------------------------------------------ training
@dataclass
class TrainConfig(_Section):
    """Training settings; JSON-able (dataclasses.asdict). Defaults: batch 128, the hardest-negative loss (VSE++
    max violation, summed over queries), the TVRN authors' lr schedule (2e-4, x0.05 at epoch 20) and gradient
    clipping (2.0). The defaults are not the authors' whole recipe: they trained with batch 64 and the published
    loss (loss_mode="published", docs/training.md), which the `*_published_*` presets carry."""

    epochs: int = 50  # official: up to 50 epochs
    lr: float = 2e-4  # Adam learning rate before the first milestone
    lr_milestones: list[int] = field(default_factory=lambda: [20])  # epochs (0-based) at which the lr drops
    lr_gamma: float = 0.05  # factor per milestone: 2e-4 -> 1e-5 at epoch 20 is the official schedule
    lr_values: Optional[list[float]] = None  # explicit lr per phase (len(milestones) + 1); overrides lr, gamma
    warmup_steps: int = 0  # linear warmup over the first optimiser steps (0: none)
    grad_clip: float = 2.0  # max global gradient norm (0: no clipping)
    batch_size: int = 128  # pairs per batch and per process (the loss sees B x B scores)
    loss_mode: str = "max"  # "max" (VSE++ hardest negative), "sum" (all negatives' hinges), "smooth" (a smooth
                            # hinge per query, log(1 + sum exp(v / tau)), unclamped) or "published" (the TVRN
                            # authors' clamped cross-entropy over all negatives, docs/training.md)
    margin: float = 0.2  # hinge margin
    loss_tau: float = 0.05  # temperature of the smooth and published losses
    loss_reduction: str = "sum"  # "sum" over queries (VSE++/SCAN convention) or "mean" (the authors' published loss)
    loss_exclude_same_image: bool = True  # captions of the same image in a batch are not negatives of each other
                                          # (tvrn's convention); false: only the diagonal pair is positive, as in
                                          # the authors' published loss
    sum_loss_epochs: int = 0  # first epochs sum over all negatives before loss_mode applies: the hardest-
                             # negative loss from a random start collapses (all scores equal; VSE-infinity warms up too)
    amp: str = "bf16"  # CUDA only: "bf16" autocast, "fp16" autocast + GradScaler, or "none"; CPU runs fp32
    seed: int = 0  # seeds python/numpy/torch (+ rank) and the data order
    deterministic: bool = False  # torch.use_deterministic_algorithms(True): resume is bit-exact
    patience: int = 8  # early stop after this many epochs without dev RSUM improvement (0: never)
    save_every_steps: int = 0  # also write last.pt every N optimiser steps, mid-epoch (0: epoch ends only)
    log_every_steps: int = 0  # write a train-loss line to metrics.jsonl every N steps (0: epoch lines only)
    num_workers: int = 0  # DataLoader worker processes (built-in loader only)
    drop_last: bool = False  # drop the last incomplete batch of each epoch (built-in loader only)
    find_unused_parameters: bool = False  # DDP: needed when some modules are switched off in the forward
    tensorboard: bool = True  # also log to TensorBoard when the tensorboard package is importable
    out_dir: str = "runs/tvrn"  # checkpoints, config.json and metrics.jsonl go here
    memory_budget_mb: Optional[float] = 512.0  # working memory of a step's pair work: the (B, B) scores in blocks
                                               # (fast path), recomputed in backward where the gradient is non-zero
                                               # (tvrn.scoring.score_all_train); null: the plain path, which keeps
                                               # the activations of all B x B pairs
    global_negatives: bool = True  # DDP: each rank's images against every rank's captions and the reverse, so the
                                   # loss is the global batch's (world x batch_size pairs), as one process would
                                   # train; false: each rank's own B x B only
    partner_file: Optional[str] = None  # JSON list, for each training image its hard-negative partner image or -1:
                                       # batches then hold partners' captions together (tvrn.train.sampling);
                                       # null: a uniform shuffle
    shortlist_loss_weight: float = 0.0  # > 0: add weight * sum-hinge loss on the (B, B) cosines of the model's
                                       # shortlist embeddings, which two-stage search uses (tvrn.search); it
                                       # also ends the sum-hinge start-up plateau of SGRAF and TVRN early
    shortlist_loss_epochs: int = 0  # > 0: the shortlist loss only in the first epochs (a warm-up); 0: every epoch

    section: ClassVar[str] = "train"


# TrainConfig fields a resume may change: how long to train and how to log or load, not what is computed
RESUME_MAY_CHANGE = ("epochs", "num_workers", "tensorboard", "log_every_steps", "save_every_steps", "out_dir")
# run-config keys whose values are paths: a resume compares the files they name, not how they are spelled
# (data/synth and /home/me/data/synth, or a symlink to it, are the same folder)
PATH_KEYS = ("data.root", "data.vocab", "train.partner_file")


def resume_conflicts(saved: dict, current: dict) -> list[str]:
    """Dotted keys of a checkpoint's config ({"model_name", "model", "train"}) that a resume with `current` would
    change, leaving out RESUME_MAY_CHANGE and the PATH_KEYS that name the same file (resolved paths equal)."""
    saved = saved or {}
    keys = config_differences(saved, current)
    return [k for k in keys if not (k.startswith("train.") and k[len("train."):] in RESUME_MAY_CHANGE)
            and not _new_field_at_default(saved, current, k) and not _same_path(saved, current, k)]


def _same_path(saved: dict, current: dict, key: str) -> bool:
    """Whether a PATH_KEYS key names the same file in both configs, spelled differently (relative / absolute,
    through a symlink, with ./ or a trailing slash): resolved against the working directory."""
    if key not in PATH_KEYS:
        return False
    section, _, name = key.partition(".")
    a, b = (saved.get(section) or {}).get(name), (current.get(section) or {}).get(name)
    if not (isinstance(a, str) and isinstance(b, str) and a and b):
        return False
    return os.path.realpath(a) == os.path.realpath(b)


def _new_field_at_default(saved: dict, current: dict, key: str) -> bool:
    """A config key the saved run predates (absent there) whose current value is the field's default: the
    run was made before the field existed and behaved as its default does."""
    from dataclasses import MISSING, fields

    section, _, name = key.partition(".")
    if section not in ("train", "model") or "." in name or name in (saved.get(section) or {}):
        return False
    if section == "train":
        cls = TrainConfig
    else:
        from .models.config import ModelConfig as cls
    for f in fields(cls):
        if f.name == name:
            default = f.default if f.default is not MISSING else (f.default_factory() if f.default_factory is not MISSING
                                                                  else MISSING)
            return (current.get(section) or {}).get(name, MISSING) == default
    return False


def check_resume(saved: dict, current: dict, what: str, hint: str) -> None:
    """The one resume rule: refuse (ConfigError "WHAT (KEY: OLD -> NEW, ...); HINT") when `current` differs from
    the `saved` config in a key `resume_conflicts` reports."""
    conflicts = resume_conflicts(saved, current)
    if conflicts:
        raise ConfigError(f"{what} ({describe_differences(saved, current, conflicts)}); {hint}")
