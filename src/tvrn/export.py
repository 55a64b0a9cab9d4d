"""Writing a model as a self-describing folder (`tvrn export`); reading one is `tvrn.checkpoint` (load_trained,
load_model), one line from inputs to scores is `tvrn.load` (`tvrn.api`).

    tvrn export runs/tvrn models/tvrn-synth        # RUN/best.pt, a checkpoint or a converted one -> a folder

The folder's files are listed in `tvrn.checkpoint.folder` and docs/export.md. It is written into a temporary
folder beside OUT and renamed into place, so a reader sees the whole folder or none.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from . import __version__
from .checkpoint import load_checkpoint, model_from_checkpoint
from .checkpoint.folder import (CARD, CONFIG, FORMAT, VERSION, VOCAB, WEIGHTS, ModelFolderError, feature_record,
                                folder_of, is_hub_name, load_folder, looks_like_model_config, manifest_extractor,
                                read_json_or_none, read_weights, run_dir_of, training_data)
from .fileio import error_reason, sha256_file, stale_temporaries, temporary_sibling, write_text


# ------------------------------------------------------------------------------------------------- helpers
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
    p = Path(source) if not is_hub_name(source) else None
    if p is None or (p.is_dir() and (p / CONFIG).is_file() and looks_like_model_config(p / CONFIG)):
        folder = folder_of(source)
        model, tokenizer, cfg = load_folder(folder)
        vocab = tokenizer.to_json_dict() if hasattr(tokenizer, "to_json_dict") else None
        return {"config": {"model_name": cfg["model_name"], "model": cfg["model"]},
                "model": read_weights(folder), "vocab": vocab, "folder_config": cfg}, str(source), None
    if p.is_dir():
        for name in ("best.pt", "last.pt"):
            if (p / name).is_file():
                return load_checkpoint(p / name), str(p / name), p
        raise ModelFolderError(f"{p}: neither a training run (no best.pt or last.pt) nor a tvrn model folder")
    return load_checkpoint(p), str(p), run_dir_of(p)


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
        result = read_json_or_none(run_dir / "result.json")
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

    out = Path(out)
    if out.exists() or out.is_symlink():
        if not (out.is_dir() and looks_like_model_config(out / CONFIG)):
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
        raise ModelFolderError(f"{read_from}: its weights do not fit its model config ({error_reason(e)})") from None
    state = _state_for_file(ckpt["model"], read_from)
    previous = ckpt.get("folder_config")  # re-export of a model folder: keep what it records
    run = read_json_or_none(run_dir / "run.json") if run_dir is not None else None
    if previous is not None:
        features = dict(previous.get("features") or {})
        if data_root is not None:
            features.update(extract=manifest_extractor(data_root), data_root=str(data_root))
        training = previous.get("training") or {}
        provenance = dict(previous.get("source") or {})
    else:
        data = training_data(config, run, data_root)
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
            write_text(tmp / VOCAB, json.dumps(tokenizer.to_json_dict(), ensure_ascii=False))
            files[VOCAB] = sha256_file(tmp / VOCAB)
        cfg = {"format": FORMAT, "version": VERSION, "tvrn_version": __version__,
               "model_name": config["model_name"], "model": asdict(model.config), "parameters": params,
               "tokenizer": tok, "features": features, "training": training, "source": provenance, "files": files}
        write_text(tmp / CONFIG, _json_text(cfg))
        sizes = {rel: (tmp / rel).stat().st_size for rel in [*files, CONFIG]}
        digests = {**files, CONFIG: sha256_file(tmp / CONFIG)}
        write_text(tmp / CARD, model_card(cfg, digests, sizes, out.name))
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


__all__ = ["export_model", "model_card"]
