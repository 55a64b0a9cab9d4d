"""Published checkpoints of SCAN, SGRAF and VSE-infinity -> tvrn checkpoints, tensor by tensor.

    tvrn convert --from scan   runs/f30k_scan_t2i/model_best.pth.tar --vocab vocab/f30k_precomp_vocab.json --out scan.pt
    tvrn convert --from sgraf  SGR_best.pth.tar --vocab vocab/f30k_precomp_vocab.json --out sgr.pt
    tvrn convert --from vse_infty model_best.pth --bert-path ./bert-base-uncased --out vse.pt   # BERT variant

The official code saves `{"model": [state dicts of img_enc, txt_enc(, sim_enc)], "opt": argparse.Namespace, "epoch",
"best_rsum", "Eiters"}` with torch.save. It is loaded with `weights_only=True` and an allow-list of exactly the
globals such a file needs (argparse.Namespace, numpy scalars and dtypes); anything else is refused, never
unpickled. The model config is read from `opt`, every tensor is renamed to tvrn's names, and the result must
match the tvrn model exactly: a tensor of the checkpoint that nothing consumes, one the model needs that the
checkpoint lacks, or a shape that differs is refused with the names.

Exact rewrites (the converted model computes the official scores; tests compare with the official equations):
- SCAN `precomp_enc_type=weight_norm`: fc.weight = g v / ||v|| (the reparametrisation folded).
- SGRAF's SAF BatchNorm1d(1) before the sigmoid: in eval mode an affine map, folded into the attention linear.
- Biases that cancel in a softmax (SGRAF's pooling `embedding_common` bias, SGR's key bias) are dropped.
- VSE-infinity's MLP builds a second BatchNorm that its forward never uses, and BERT's pooler is unused by every
  model here: both dropped, by name.
"""
from __future__ import annotations

import argparse
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Optional

import torch

from .fileio import load_torch_file

SOURCES = ("scan", "sgraf", "vse_infty", "tvrn")


class ConvertError(ValueError):
    """A checkpoint that cannot be converted; the message names the file and what is wrong."""


def _safe_globals() -> list:
    import numpy as np

    allowed: list[Any] = [argparse.Namespace, np.dtype]
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        try:
            allowed.append(__import__(mod, fromlist=["scalar"]).scalar)
        except (ImportError, AttributeError):
            pass
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    return allowed


def load_official(path: str | os.PathLike) -> dict:
    """torch.load(weights_only=True) with the allow-list above -> the checkpoint dict; anything else refused, and a
    file that is empty, truncated, damaged or no checkpoint at all refused saying so."""
    try:
        obj = load_torch_file(path, ConvertError, "tensors, argparse.Namespace and numpy scalars", _safe_globals())
    except FileNotFoundError:
        raise ConvertError(f"{path}: no such file") from None
    if not isinstance(obj, dict) or "model" not in obj:
        raise ConvertError(f"{path}: not an official SCAN / SGRAF / VSE-infinity checkpoint (no 'model' entry)")
    return obj


def _opt(ckpt: dict, path) -> dict:
    opt = ckpt.get("opt")
    if isinstance(opt, argparse.Namespace):
        return vars(opt)
    if isinstance(opt, dict):
        return opt
    raise ConvertError(f"{path}: the checkpoint has no 'opt' (the training options it was made with)")


def _need(opt: dict, key: str, path, default: Any = None, required: bool = True) -> Any:
    if key in opt:
        return opt[key]
    if required and default is None:
        raise ConvertError(f"{path}: option {key!r} is missing from the checkpoint's opt")
    return default


def _parts(ckpt: dict, n: int, path) -> list[dict]:
    model = ckpt["model"]
    if isinstance(model, (list, tuple)) and len(model) == n and all(isinstance(m, dict) for m in model):
        return [dict(m) for m in model]
    raise ConvertError(f"{path}: 'model' should hold {n} state dicts (image, text{', similarity' if n == 3 else ''} "
                       f"encoders), got {type(model).__name__}"
                       + (f" of {len(model)}" if isinstance(model, (list, tuple)) else ""))


class _Mapper:
    """Moves tensors from the official state dicts into a tvrn state dict, remembering what was consumed."""

    def __init__(self, parts: dict[str, dict]):
        self.src = {f"{p}.{k}": v for p, sd in parts.items() for k, v in sd.items()}  # prefixed official names
        self.used: set[str] = set()
        self.out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
        self.dropped: list[str] = []

    def take(self, name: str) -> torch.Tensor:
        if name not in self.src:
            raise KeyError(name)
        self.used.add(name)
        return self.src[name]

    def prefix(self, official: str, tvrn: str) -> None:
        """Every official tensor under `official.` to `tvrn.` with the same suffix."""
        for k in [k for k in self.src if k.startswith(official + ".")]:
            self.out[tvrn + k[len(official):]] = self.take(k)

    def drop(self, name: str, why: str) -> None:
        if name in self.src:
            self.used.add(name)
            self.dropped.append(f"{name} ({why})")

    def leftovers(self) -> list[str]:
        return sorted(set(self.src) - self.used)


def _fold_weight_norm(m: _Mapper, official: str, tvrn: str) -> None:
    g, v = m.take(f"{official}.weight_g"), m.take(f"{official}.weight_v")
    m.out[f"{tvrn}.weight"] = g * v / v.norm()  # weight_norm(dim=None): one norm over the whole matrix
    m.out[f"{tvrn}.bias"] = m.take(f"{official}.bias")


def _scan(parts, opt, path) -> tuple[str, dict, _Mapper]:
    m = _Mapper({"img": parts[0], "txt": parts[1]})
    direction = _need(opt, "cross_attn", path)
    agg = {"LogSumExp": "lse", "Mean": "mean", "Max": "max", "Sum": "sum"}.get(_need(opt, "agg_func", path))
    if agg is None:
        raise ConvertError(f"{path}: unknown agg_func {opt['agg_func']!r}")
    if direction not in ("t2i", "i2t"):
        raise ConvertError(f"{path}: unknown cross_attn {direction!r}")
    cfg = dict(direction=direction, agg=agg, attention_norm=_need(opt, "raw_feature_norm", path),
               lambda_softmax=float(_need(opt, "lambda_softmax", path)), lambda_lse=float(opt.get("lambda_lse", 6.0)),
               text_bidirectional=bool(opt.get("bi_gru", False)), image_norm=not opt.get("no_imgnorm", False),
               text_norm=not opt.get("no_txtnorm", False), text_layers=int(opt.get("num_layers", 1)))
    enc = opt.get("precomp_enc_type", "basic")
    if enc == "weight_norm":
        _fold_weight_norm(m, "img.fc", "img_enc.fc")
    elif enc == "basic":
        m.prefix("img.fc", "img_enc.fc")
    else:
        raise ConvertError(f"{path}: precomp_enc_type {enc!r} is not a precomputed-feature encoder")
    m.prefix("txt.embed", "txt_enc.embed")
    m.prefix("txt.rnn", "txt_enc.rnn")
    return f"scan_{direction}", cfg, m


def _sgraf(parts, opt, path) -> tuple[str, dict, _Mapper]:
    m = _Mapper({"img": parts[0], "txt": parts[1], "sim": parts[2]})
    module = _need(opt, "module_name", path)
    if module not in ("SGR", "SAF"):
        raise ConvertError(f"{path}: module_name {module!r} (expected SGR or SAF)")
    bn = parts[2].get("v_global_w.embedding_local.1.weight")
    cfg = dict(reasoning=module.lower(), sim_dim=int(_need(opt, "sim_dim", path)),
               sgr_steps=int(opt.get("sgr_step", 3)), text_bidirectional=bool(opt.get("bi_gru", True)),
               image_norm=not opt.get("no_imgnorm", False), text_norm=not opt.get("no_txtnorm", False),
               text_layers=int(opt.get("num_layers", 1)), word_dropout=0.4, dropout=0.4, lambda_softmax=9.0,
               image_pool_norm="batch", image_pool_tokens=int(bn.shape[0]) if bn is not None else 36)
    m.prefix("img.fc", "img_enc.fc")
    m.prefix("txt.embed", "txt_enc.embed")
    m.prefix("txt.cap_rnn", "txt_enc.rnn")
    for side, pool in (("v_global_w", "image_pool"), ("t_global_w", "text_pool")):
        m.prefix(f"sim.{side}.embedding_local.0", f"{pool}.local")
        m.prefix(f"sim.{side}.embedding_global.0", f"{pool}.glob")
        if side == "v_global_w":
            m.prefix(f"sim.{side}.embedding_local.1", f"{pool}.local_norm")
            m.prefix(f"sim.{side}.embedding_global.1", f"{pool}.glob_norm")
        m.out[f"{pool}.common.weight"] = m.take(f"sim.{side}.embedding_common.0.weight")
        m.drop(f"sim.{side}.embedding_common.0.bias", "cancels in the pooling softmax")
    m.prefix("sim.sim_tranloc_w", "sim_local")
    m.prefix("sim.sim_tranglo_w", "sim_global")
    m.prefix("sim.sim_eval_w", "sim_eval")
    if module == "SGR":
        for k in range(cfg["sgr_steps"]):
            m.prefix(f"sim.SGR_module.{k}.graph_query_w", f"reason.steps.{k}.query")
            m.out[f"reason.steps.{k}.key.weight"] = m.take(f"sim.SGR_module.{k}.graph_key_w.weight")
            m.drop(f"sim.SGR_module.{k}.graph_key_w.bias", "cancels in the edge softmax")
            m.prefix(f"sim.SGR_module.{k}.sim_graph_w", f"reason.steps.{k}.graph")
    else:  # sigmoid(bn(a . x + b)) with eval-mode bn(y) = (y - mu) / sqrt(var + eps) * gamma + beta
        a, b = m.take("sim.SAF_module.attn_sim_w.weight"), m.take("sim.SAF_module.attn_sim_w.bias")
        mu, var = m.take("sim.SAF_module.bn.running_mean"), m.take("sim.SAF_module.bn.running_var")
        gamma, beta = m.take("sim.SAF_module.bn.weight"), m.take("sim.SAF_module.bn.bias")
        m.drop("sim.SAF_module.bn.num_batches_tracked", "folded with the BatchNorm")
        scale = gamma / torch.sqrt(var + 1e-5)
        m.out["reason.attn.weight"] = a * scale[:, None]
        m.out["reason.attn.bias"] = (b - mu) * scale + beta
    return f"sgraf_{module.lower()}", cfg, m


def _tvrn(parts, opt, path) -> tuple[str, dict, _Mapper]:
    """The TVRN authors' checkpoint (docs/published-tvrn.md I) -> tvrn_{sgr,saf}_published: SGRAF's names plus the
    context attentions, module 1's and module 2's GRUs; their one attention pair goes to all three of tvrn's."""
    name, cfg, m = _sgraf(parts, opt, path)
    bn = parts[2].get("v_global_w.embedding_local.1.weight")
    cfg.update(shared_attention=True, spatial_score="published", spatial_adjacency="multiply", global_gates=False,
               image_pool_tokens=int(bn.shape[0]) if bn is not None else 72)
    for part in ("q", "k"):
        for k in [k for k in m.src if k.startswith(f"sim.scan_attention.fc{part}.")]:
            suffix = k[len(f"sim.scan_attention.fc{part}"):]
            t = m.take(k)
            for module in ("relational", "text_context", "expand"):  # D: one pair, three uses
                m.out[f"{module}.{part}{suffix}"] = t
        m.prefix(f"sim.fc{part}", f"spatial.{part}")
    for k in [k for k in m.src if k.startswith(("sim.scan_attention.fcv.", "sim.fcv.", "sim.sim_trancon_w."))]:
        m.drop(k, "never used by the released forward")
    for official, tvrn in (("sim.img_rnn", "unify_gru"), ("sim.cap_rnn", "refine_gru")):  # one-layer nn.GRU -> GRUCell
        for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            m.out[f"{tvrn}.{w}"] = m.take(f"{official}.{w}_l0")
    return name.replace("sgraf_", "tvrn_") + "_published", cfg, m


def _vse_infty(parts, opt, path) -> tuple[str, dict, _Mapper]:
    m = _Mapper({"img": parts[0], "txt": parts[1]})
    enc = opt.get("precomp_enc_type", "basic")
    if enc != "basic":
        raise ConvertError(f"{path}: precomp_enc_type {enc!r}: only the precomputed-region model ('basic') converts")
    bert = any(k.startswith("bert.") for k in parts[1])
    cfg = dict(image_norm=not opt.get("no_imgnorm", False), text_norm=not opt.get("no_txtnorm", False))
    m.prefix("img.fc", "img_enc.fc")
    m.prefix("img.mlp.layers", "img_mlp.layers")
    m.prefix("img.mlp.bns.0", "img_mlp.bns.0")
    for k in [k for k in m.src if k.startswith("img.mlp.bns.1.")]:
        m.drop(k, "built by the official MLP, never used by its forward")
    m.prefix("img.gpool", "img_pool")
    m.prefix("txt.gpool", "txt_pool")
    if bert:
        for k in [k for k in m.src if k.startswith("txt.bert.pooler.")]:
            m.drop(k, "BERT's pooler: unused")
        for k in [k for k in m.src if k.startswith("txt.bert.") and k not in m.used]:
            m.out["txt_enc.bert." + k[len("txt.bert."):]] = m.take(k)
        m.prefix("txt.linear", "txt_enc.fc")
        return "vse_gpo_bert", cfg, m
    m.prefix("txt.embed", "txt_enc.embed")
    m.prefix("txt.rnn", "txt_enc.rnn")
    cfg.update(text_bidirectional=True, text_layers=int(opt.get("num_layers", 1)))
    return "vse_gpo", cfg, m


def convert_checkpoint(source: str, ckpt: dict, path: str = "<checkpoint>", vocab=None,
                       bert_path: Optional[str] = None) -> dict:
    """An official checkpoint dict -> a tvrn checkpoint dict {"config": {"model_name", "model"}, "model",
    "vocab", "converted_from"}. vocab: a tvrn Vocabulary (GRU text encoders); bert_path: a local BERT folder
    (the architecture of VSE-infinity's BERT variant)."""
    from dataclasses import asdict

    from .models import create_model
    from .models.base import state_dict_problems

    if source not in SOURCES:
        raise ConvertError(f"unknown source {source!r}; choose one of {', '.join(SOURCES)}")
    opt = _opt(ckpt, path)
    parts = _parts(ckpt, 3 if source in ("sgraf", "tvrn") else 2, path)
    name, cfg, m = {"scan": _scan, "sgraf": _sgraf, "vse_infty": _vse_infty, "tvrn": _tvrn}[source](parts, opt, path)
    cfg.update(img_dim=int(_need(opt, "img_dim", path)), embed_size=int(_need(opt, "embed_size", path)))
    vocab_added: list[str] = []  # words the official training adds to the vocabulary JSON it reads
    if name.endswith("_bert"):
        if not bert_path:
            raise ConvertError(f"{path}: a BERT text encoder: give --bert-path (a local folder of the BERT it was "
                               f"trained with, e.g. bert-base-uncased) for its architecture")
        cfg["bert_path"] = str(bert_path)
    else:
        emb = m.out.get("txt_enc.embed.weight")
        if emb is None:
            raise ConvertError(f"{path}: no word embedding (txt_enc embed.weight) in the checkpoint")
        cfg.update(vocab_size=int(emb.shape[0]), word_dim=int(emb.shape[1]))
        if vocab is None:
            raise ConvertError(f"{path}: a GRU text encoder needs its vocabulary: give --vocab (the SCAN-format "
                               f"JSON it was trained with)")
        if source == "vse_infty" and emb.shape[0] == len(vocab) + 1 and "<mask>" not in vocab:
            # VSE-infinity's BiGRU training reads the JSON, then adds "<mask>" (its word-masking augmentation) as
            # the last word: the embedding has that one row more
            from .data import Vocabulary

            vocab = Vocabulary(list(vocab.idx2word) + ["<mask>"])
            vocab_added = ["<mask>"]
        if len(vocab) != emb.shape[0]:
            raise ConvertError(f"{path}: the vocabulary has {len(vocab)} words, the checkpoint's embedding "
                               f"{emb.shape[0]} rows: not the vocabulary it was trained with")
    leftovers = m.leftovers()
    model = create_model(name, **cfg)
    want = model.state_dict()
    problems = [f"tensors of the checkpoint nothing uses: {', '.join(leftovers)}"] if leftovers else []
    problems += state_dict_problems(m.out, want, source="checkpoint", limit=None)  # the mapped tensors
    if problems:
        raise ConvertError(f"{path}: cannot convert as {source} ({name}): " + " | ".join(problems))
    # floating tensors keep the checkpoint's precision (a float64 source stays float64: a model built in float64
    # then loads it exactly); integer buffers take the model's dtype
    state = OrderedDict((k, (m.out[k] if m.out[k].is_floating_point() else m.out[k].to(want[k].dtype)).clone())
                        for k in want)
    model.load_state_dict(state)  # strict: a final check
    return {"config": {"model_name": name, "model": asdict(model.config)}, "model": state,
            "vocab": vocab.to_json_dict() if vocab is not None else None,
            "converted_from": {"source": source, "file": str(path), "dropped": m.dropped, "vocab_added": vocab_added,
                               "epoch": ckpt.get("epoch"), "opt": {k: v for k, v in opt.items()
                                                                   if isinstance(v, (int, float, str, bool))}}}


def convert_file(source: str, path: str | os.PathLike, out: str | os.PathLike, vocab_path=None,
                 bert_path: Optional[str] = None) -> dict:
    """Convert the official checkpoint at `path` and write the tvrn checkpoint to `out` (atomically)."""
    from .data import Vocabulary
    from .checkpoint import atomic_save

    ckpt = load_official(path)
    vocab = Vocabulary.load(vocab_path) if vocab_path else None
    result = convert_checkpoint(source, ckpt, str(path), vocab=vocab, bert_path=bert_path)
    atomic_save(result, Path(out))
    return result
