"""Reading a model folder (`tvrn export` writes it) or an `hf-hub:ORG/NAME` name, and the records of the image
input a model expects.

The folder (docs/export.md):

| file              | content                                                                              |
|-------------------|--------------------------------------------------------------------------------------|
| model.safetensors | the state dict, tensor for tensor as the checkpoint holds it (names, dtypes, bytes)   |
| config.json       | format, model name and config, tokenizer, the image features the model expects, what |
|                   | it was trained on / converted from, and the sha256 of model.safetensors (+ vocab.json) |
| vocab.json        | the SCAN-format vocabulary (GRU text encoders; a BERT model records its tokenizer)     |
| README.md         | model card: data, feature recipe, training config, metrics, the command, every sha256  |

Loading checks config.json (UTF-8 JSON of this format), the sha256 of every file it lists, that model.safetensors
is readable and that its tensors are exactly the ones (names, shapes) the model of config.json has; each failure
is a `ModelFolderError` (a `CheckpointError`, a ValueError) naming the folder, the file and what is wrong.

`hf-hub:ORG/NAME[@REVISION]` is resolved with `huggingface_hub.snapshot_download` (the `hub` extra) into the
local cache, then loaded as a folder; HF_HUB_OFFLINE=1 (read when called) loads from the cache only, and
HF_HUB_CACHE (read when called) names the cache.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .. import __version__
from ..fileio import error_reason, sha256_file
from .file import CheckpointError
from .tokenizer import build_tokenizer

FORMAT, VERSION = "tvrn-model", 1
WEIGHTS, CONFIG, VOCAB, CARD = "model.safetensors", "config.json", "vocab.json", "README.md"
HUB_PREFIX = "hf-hub:"
DEFAULT_ADJACENCY_THRESHOLD = 0.2


class ModelFolderError(CheckpointError):
    """A model folder (or an `hf-hub:` name) that cannot be written or loaded; the message names the folder, the
    file and what is wrong with it."""


class MissingExtraError(ImportError, ValueError):
    """An optional dependency is missing; the message says which extra of tvrn to install."""


def is_hub_name(source) -> bool:
    return isinstance(source, str) and source.startswith(HUB_PREFIX)


def is_model_source(source) -> bool:
    """Whether `source` is read as a model folder: an `hf-hub:` name or a directory (a checkpoint is a file)."""
    return is_hub_name(source) or (isinstance(source, (str, os.PathLike)) and Path(source).is_dir())


# ---------------------------------------------------------------------------------------------- hub names
def resolve_hub(name: str) -> Path:
    """`hf-hub:ORG/NAME[@REVISION]` -> the local folder of that snapshot (downloaded unless HF_HUB_OFFLINE=1;
    both HF_HUB_OFFLINE and HF_HUB_CACHE are read when this is called). Needs huggingface_hub (the `hub` extra)."""
    spec = name[len(HUB_PREFIX):]
    repo, _, revision = spec.partition("@")
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", repo):
        raise ModelFolderError(f"{name}: not a hub model name; expected {HUB_PREFIX}ORG/NAME or "
                               f"{HUB_PREFIX}ORG/NAME@REVISION")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise MissingExtraError(f"{name}: loading a model from the Hugging Face hub needs huggingface_hub: "
                                f"pip install 'tvrn[hub]'") from None
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    cache = os.environ.get("HF_HUB_CACHE") or None
    try:
        folder = snapshot_download(repo, revision=revision or None, cache_dir=cache, local_files_only=offline,
                                   library_name="tvrn", library_version=__version__)
    except Exception as e:  # huggingface_hub's errors: not cached offline, no such repo, no network, ...
        where = f" in the cache {cache}" if cache else ""
        raise ModelFolderError(f"{name}: cannot be resolved{where}"
                               f"{' (HF_HUB_OFFLINE=1: the local cache only)' if offline else ''} ({error_reason(e)})") \
            from None
    return Path(folder)


# ------------------------------------------------------------------------------------------------- reading
def looks_like_model_config(path: Path) -> bool:
    """Whether `path` is a readable config.json of this format (no further checks)."""
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def read_config(folder: str | os.PathLike) -> dict:
    """config.json of a model folder -> dict, checked: UTF-8 JSON, this format and version, with what loading
    needs (model_name, model, tokenizer, files). ModelFolderError otherwise."""
    folder = Path(folder)
    path = folder / CONFIG
    if not folder.is_dir():
        raise ModelFolderError(f"{folder}: no such model folder")
    try:
        raw = path.read_bytes()
    except OSError as e:
        hint = ""
        if (folder / "best.pt").is_file() or (folder / "last.pt").is_file():
            hint = (f"; it looks like a training run: pass {folder / 'best.pt'}, or make a model folder with "
                    f"`tvrn export {folder} OUT`")
        raise ModelFolderError(f"{folder}: not a tvrn model folder ({CONFIG}: {e.strerror or type(e).__name__})"
                               f"{hint}") from None
    try:
        cfg = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFolderError(f"{folder}: {CONFIG} is not valid UTF-8 JSON ({error_reason(e)})") from None
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        got = cfg.get("format") if isinstance(cfg, dict) else type(cfg).__name__
        hint = ""
        if (folder / "best.pt").is_file() or (folder / "last.pt").is_file():
            hint = (f" (a training run's config: pass {folder / 'best.pt'}, or make a model folder with "
                    f"`tvrn export {folder} OUT`)")
        raise ModelFolderError(f"{folder}: {CONFIG} is not a tvrn model config (format {got!r}, expected "
                               f"{FORMAT!r}){hint}")
    if cfg.get("version") != VERSION:
        raise ModelFolderError(f"{folder}: {CONFIG} is version {cfg.get('version')!r}; this tvrn reads version "
                               f"{VERSION}")
    checks = (("model_name", str), ("model", dict), ("tokenizer", dict), ("files", dict))
    for key, kind in checks:
        if not isinstance(cfg.get(key), kind):
            what = "missing" if key not in cfg else f"not a {'string' if kind is str else 'JSON object'}"
            raise ModelFolderError(f"{folder}: {CONFIG} cannot be used: its {key!r} entry is {what}")
    if WEIGHTS not in cfg["files"]:
        raise ModelFolderError(f"{folder}: {CONFIG} lists no {WEIGHTS} in its 'files'")
    return cfg


def verify_folder(folder: str | os.PathLike, cfg: dict) -> None:
    """Every file config.json lists exists and has its sha256 (ModelFolderError naming the first that fails)."""
    folder = Path(folder)
    for rel, digest in cfg["files"].items():
        f = folder / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise ModelFolderError(f"{folder}: {CONFIG} lists a file outside the folder: {rel!r}")
        if not f.is_file():
            raise ModelFolderError(f"{folder}: {rel} is missing ({CONFIG} lists it)")
        if sha256_file(f) != digest:
            raise ModelFolderError(f"{folder}: {rel} is corrupted (its sha256 differs from the one {CONFIG} "
                                   f"records)")


def read_weights(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """model.safetensors -> the state dict (CPU tensors, dtypes as stored)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(folder) / WEIGHTS
    try:
        return load_file(str(path), device="cpu")
    except FileNotFoundError:
        raise ModelFolderError(f"{folder}: {WEIGHTS} is missing") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ModelFolderError(f"{folder}: {WEIGHTS} is not a readable safetensors file ({error_reason(e)})") from None


def _read_vocab(folder: Path, cfg: dict):
    """The folder's vocabulary (GRU text encoders) as a Vocabulary, or None (BERT)."""
    from ..data import Vocabulary
    from ..data.errors import TvrnDataError

    tok = cfg["tokenizer"]
    if tok.get("type") == "bert":
        return None
    if tok.get("type") != "vocabulary":
        raise ModelFolderError(f"{folder}: {CONFIG} has an unknown tokenizer type {tok.get('type')!r} (expected "
                               f"'vocabulary' or 'bert')")
    rel = tok.get("file") or VOCAB
    try:
        vocab = Vocabulary.load(folder / rel)
    except (TvrnDataError, ValueError) as e:
        raise ModelFolderError(f"{folder}: {rel} cannot be used ({e})") from None
    size = cfg["model"].get("vocab_size")
    if size is not None and int(size) != len(vocab):
        raise ModelFolderError(f"{folder}: {rel} has {len(vocab)} words, but {CONFIG}'s model has vocab_size "
                               f"{size}: not the vocabulary the model was trained with")
    return vocab


def _build_model(folder: Path, cfg: dict, bert_path: Optional[str] = None) -> nn.Module:
    from ..models import create_model

    model_cfg = dict(cfg["model"])
    if bert_path is not None:
        model_cfg["bert_path"] = str(bert_path)
    try:
        return create_model(cfg["model_name"], **model_cfg)
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFolderError(f"{folder}: {CONFIG} describes no model tvrn can build ({error_reason(e)})") from None


def folder_of(source) -> Path:
    """The local folder of a model folder path or an `hf-hub:` name (resolved, downloaded unless offline)."""
    return resolve_hub(source) if is_hub_name(source) else Path(source)


def folder_config(source) -> dict:
    """config.json of a model folder or `hf-hub:` name, checked (`read_config`)."""
    return read_config(folder_of(source))


def load_folder(source, verify: bool = True, bert_path: Optional[str] = None):
    """A model folder or `hf-hub:` name -> (model in eval mode on the CPU, tokenizer, config.json dict).

    verify: check the sha256 of every file config.json lists (a flipped bit is refused, not used). bert_path:
    another location of the BERT a BERT model was built on (its architecture and word pieces), when the one
    recorded is not on this machine."""
    folder = folder_of(source)
    cfg = read_config(folder)
    if verify:
        verify_folder(folder, cfg)
    state = read_weights(folder)
    vocab = _read_vocab(folder, cfg)
    model = _build_model(folder, cfg, bert_path)
    from ..models.base import state_dict_problems

    problems = state_dict_problems(state, model.state_dict())
    if problems:
        raise ModelFolderError(f"{folder}: {WEIGHTS} does not match the {cfg['model_name']} model {CONFIG} "
                               f"describes: " + " | ".join(problems))
    model.load_state_dict(state)
    model.eval()
    try:
        tokenizer = build_tokenizer(model.config, vocab)
    except (OSError, ValueError) as e:
        raise ModelFolderError(f"{folder}: the tokenizer cannot be built ({error_reason(e)})") from None
    return model, tokenizer, cfg


def trained_config(cfg: dict) -> dict:
    """A folder's config.json -> the checkpoint config dict `tvrn.checkpoint.load_trained` returns for a checkpoint
    (model_name, model, train), plus the data section it was trained on when recorded."""
    training = cfg.get("training") or {}
    return {"model_name": cfg["model_name"], "model": cfg["model"], "train": training.get("train"),
            "data": training.get("data")}


# ------------------------------------------------------------------------------------------ recipe records
def read_json_or_none(path: Path):
    """A JSON file's content, or None when it is missing or not JSON (records that are optional)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def manifest_extractor(root) -> Optional[dict]:
    """The extractor record (`RegionExtractor.describe()`) of a data folder made by `tvrn extract`, or None."""
    if not root:
        return None
    man = read_json_or_none(Path(root) / "manifest.json")
    if isinstance(man, dict) and man.get("format") == "tvrn-extract" and isinstance(man.get("extractor"), dict):
        return man["extractor"]
    return None


def expected_regions(model_config) -> Optional[int]:
    """Regions per image the model needs (SGRAF's BatchNorm pooling has fixed token slots), or None (any R)."""
    if getattr(model_config, "image_pool_norm", None) != "batch":
        return None
    tokens = int(model_config.image_pool_tokens)
    return tokens // 2 if getattr(model_config, "unify", False) else tokens


def needs_boxes(model: nn.Module) -> bool:
    """Whether the model reads region boxes (TVRN's spatial context: the IoU adjacency of the regions)."""
    from ..models import TVRN

    c = model.config
    return isinstance(model, TVRN) and bool(c.spatial_context) and bool(c.needs_context)


def feature_record(model: nn.Module, data: Optional[dict]) -> dict:
    """What image input the model expects: feature size Dv, regions R (None: any), whether it needs boxes, the
    IoU threshold of their adjacency, and the `tvrn extract` recipe of the data it was trained on (None when
    those features were not made by `tvrn extract`: bottom-up features, the synthetic benchmark)."""
    data = data or {}
    root = data.get("root")
    return {"feature_size": int(model.config.img_dim), "num_regions": expected_regions(model.config),
            "boxes": needs_boxes(model),
            "adjacency_threshold": float(data.get("adjacency_threshold", DEFAULT_ADJACENCY_THRESHOLD)),
            "extract": manifest_extractor(root), "data_root": None if root is None else str(root)}


def run_dir_of(ckpt_path: Path) -> Optional[Path]:
    """The training run folder a checkpoint lies in (its run.json beside it), or None."""
    return ckpt_path.parent if (ckpt_path.parent / "run.json").is_file() else None


def training_data(ckpt_cfg: dict, run: Optional[dict], data_root=None) -> Optional[dict]:
    """The data section a model was trained with (run.json's, else the checkpoint's), data_root overriding its root."""
    data = dict((run or {}).get("data") or ckpt_cfg.get("data") or {})
    if data_root is not None:
        data["root"] = str(data_root)
    return data or None
