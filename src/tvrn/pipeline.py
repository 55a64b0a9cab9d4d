"""Glue from a run config to data, tokenizer, model, trainer and evaluation: what `tvrn train`, `tvrn eval`
and `tvrn demo` call. No argument parsing and no printing here.

    cfg = resolve_config("tvrn_synth", ["data.root=data/synth", "train.epochs=3"])
    summary = train_from_config(cfg, out_dir="runs/tvrn", progress=True)
    result = evaluate_checkpoints(["runs/tvrn/best.pt"], data_root="data/synth", split="test", protocol="all")
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from .config import (ConfigError, DataConfig, TrainConfig, apply_overrides, check_resume, load_config,
                     resume_conflicts, save_config)
from .data import PairDataset, PrecompSplit, Vocabulary, iter_text_batches, load_split
from .evaluation import (check_protocol_split, encode_split, ensemble, evaluate, evaluate_protocol, load_scores,
                         score_split)
from .models import create_model, glove_vectors
from .scoring import encode_images, encode_texts, score_all
from .checkpoint import build_tokenizer, check_model_fits_split, load_trained
from .distributed import init_distributed
from .train.trainer import Trainer, seed_everything

def resolve_config(config: str | dict, overrides: Sequence[str] = ()) -> dict:
    """Preset name, JSON path or dict -> a full run config with defaults filled in and overrides applied."""
    cfg = load_config(config) if isinstance(config, (str, os.PathLike)) else dict(config)
    cfg = apply_overrides(cfg, overrides)
    cfg.setdefault("model", {}).setdefault("name", "tvrn_sgr")
    cfg.pop("eval", None)  # a section of earlier versions that nothing read
    cfg["data"] = dataclasses.asdict(DataConfig.from_dict(cfg.get("data", {})))
    cfg["train"] = dataclasses.asdict(TrainConfig.from_dict(cfg.get("train", {})))  # unknown keys fail, named
    return cfg


def uses_bert(cfg: dict) -> bool:
    """Whether the configured model has a BERT text encoder (then no vocabulary file is needed)."""
    return cfg["model"].get("text_encoder") == "bert" or cfg["model"]["name"].endswith("_bert")


def _vocab_path(data: dict) -> Path:
    return Path(data["vocab"]) if data.get("vocab") else Path(data["root"]) / "vocab.json"


def build_model(cfg: dict, feature_size: int, vocab: Optional[Vocabulary]) -> nn.Module:
    """create_model(cfg.model.name, **overrides) with img_dim from the data and vocab_size from the vocabulary."""
    overrides = {k: v for k, v in cfg["model"].items() if k != "name"}
    overrides["img_dim"] = feature_size
    if vocab is not None:
        overrides["vocab_size"] = len(vocab)
    model = create_model(cfg["model"]["name"], **overrides)
    if getattr(model.config, "refine_against", "pair") == "first_image":
        import warnings

        warnings.warn("model.refine_against=first_image refines every caption against the first image of its batch "
                      "(and of each 100-image block in evaluation), as the TVRN authors' code does: a pair's score "
                      "then depends on the other images of its block. Use it to reproduce their numbers only "
                      "(docs/published-tvrn.md).", stacklevel=2)
    if cfg["data"].get("glove") and model.config.text_encoder == "gru":
        vectors, found = glove_vectors(vocab.idx2word)
        model.txt_enc.load_word_vectors(vectors, found)  # every GRU model keeps its text encoder as txt_enc
    return model


def published_adjacency_source(caption_to_image, n_images: int, shard: int = 100) -> torch.Tensor:
    """The TVRN authors' evaluation gives image k of every image shard of `shard` images the adjacency of the
    image of caption Nt - shard + k (their last test batch; docs/published-tvrn.md F) -> (n_images,) long: the
    image whose boxes each image's spatial context uses. Needs n_images and Nt multiples of `shard` (their
    script only runs then)."""
    c2i = torch.as_tensor(caption_to_image).long().reshape(-1)
    nt = len(c2i)
    if shard < 1 or n_images % shard or nt % shard:
        raise ValueError(f"the published evaluation protocol scores shards of {shard} images x {shard} captions and "
                         f"needs image and caption counts that are multiples of {shard}; this split has {n_images} "
                         f"images and {nt} captions")
    return c2i[nt - shard + torch.arange(n_images) % shard]  # (n_images,)


def model_variant(model: nn.Module, **changes) -> nn.Module:
    """The same weights under another config (e.g. refine_against="pair" for a model trained with first-image
    refinement) -> a new model in eval mode on the model's device; `changes` are ModelConfig fields that do not
    change the state dict's names or shapes."""
    from dataclasses import asdict

    twin = create_model(model.config.name, **{**asdict(model.config), **changes})
    twin.load_state_dict(model.state_dict())
    return twin.to(next(model.parameters()).device).eval()


@torch.no_grad()
def published_protocol_scores(model: nn.Module, split: PrecompSplit, tokenizer, data: dict, shard: int = 100,
                              device=None, progress: bool = False) -> torch.Tensor:
    """The TVRN authors' evaluation of a model, reproduced exactly -> (N_img, N_caps) float32 (the number their
    script prints; docs/published-tvrn.md E, F): images in shards of `shard`, every caption refined against the
    first image of each shard (refine_against="first_image", refine_group=shard), and image k of every shard
    given the adjacency of the images of the split's last `shard` captions. Not a correct evaluation (a pair's
    score depends on its shard): report it beside `score_split`'s."""
    from .data import collate_images

    cfg = model.config
    if not hasattr(model, "anchor_group"):
        raise ValueError(f"the published evaluation protocol is TVRN's; {cfg.name} does not refine captions")
    src = published_adjacency_source(split.caption_to_image, split.num_images, shard).numpy()
    twin = model_variant(model, refine_against="first_image", refine_group=shard)
    bs, thr = int(data.get("eval_batch_size", 128)), float(data.get("adjacency_threshold", 0.2))
    batches = (collate_images(split.image_features(idx), split.boxes(src[idx]), idx, thr)
               for idx in (torch.arange(a, min(a + bs, split.num_images)).numpy()
                           for a in range(0, split.num_images, bs)))
    enc_i = encode_images(twin, batches, device=device, progress=progress)
    enc_t = encode_texts(twin, iter_text_batches(split, tokenizer, bs), device=device, progress=progress)
    return score_all(twin, enc_i, enc_t, block_texts=int(data.get("block_texts", 512)), device=device,
                     progress=progress)


def make_validate(split: PrecompSplit, tokenizer, data: dict) -> Callable[[nn.Module], dict]:
    """validate(model) -> metrics dict with 'rsum', all pairs of the dev split."""
    c2i = torch.as_tensor(split.caption_to_image)

    def validate(model: nn.Module) -> dict:
        return evaluate(score_split(model, split, tokenizer, data), c2i)

    validate.distributed = True  # under DDP every rank scores its share of the images (score_split)
    return validate


def train_from_config(cfg: dict, out_dir: str | os.PathLike, resume: bool | str = False, progress: bool = False,
                      device=None) -> dict[str, Any]:
    """Train the model a resolved run config describes; checkpoints, metrics.jsonl and run.json go to out_dir."""
    data = cfg["data"]
    if not data.get("root"):
        raise ValueError("the run config has no data.root (a precomp folder); set it with data.root=PATH")
    train_split = load_split(data["root"], data["train_split"])
    dev_split = load_split(data["root"], data["dev_split"])
    vocab = None if uses_bert(cfg) else Vocabulary.load(_vocab_path(data))
    run = run_config(cfg, out_dir)
    tcfg = TrainConfig.from_dict(run["train"])
    check_run_resume(run, out_dir, resume)
    dist = init_distributed()
    # train.seed decides the initial weights: seed before anything random is built (torch seeds its default
    # generator from the OS in every new process). Every rank builds the same weights; the trainer then
    # re-seeds with seed + rank for dropout.
    seed_everything(tcfg.seed)
    model = build_model(cfg, train_split.feature_size, vocab)
    tokenizer = build_tokenizer(model.config, vocab)
    if dist.is_main:  # under torchrun: every rank trains, rank 0 writes
        save_config({**run, "env": run_environment(dist.world_size)}, Path(out_dir) / "run.json")
    thr = float(data["adjacency_threshold"])
    dataset = PairDataset(train_split, tokenizer, adjacency_threshold=thr)
    trainer = Trainer(
        model, tcfg, train_dataset=dataset, collate_fn=dataset.collate,
        validate=make_validate(dev_split, tokenizer, data), model_name=cfg["model"]["name"],
        vocab=vocab.to_json_dict() if vocab is not None else None, device=device, progress=progress,
        order_fn=_partner_order_fn(tcfg, train_split),
    )
    summary = trainer.fit(resume=resume)
    summary["model_name"] = cfg["model"]["name"]
    summary["parameters"] = sum(p.numel() for p in model.parameters())
    return summary


def run_config(cfg: dict, out_dir: str | os.PathLike) -> dict:
    """The run config (from `resolve_config`, every field filled in) as OUT/run.json records it:
    train.out_dir = out_dir."""
    return dict(cfg, train={**cfg["train"], "out_dir": str(out_dir)})


def can_resume(cfg: dict, out_dir: str | os.PathLike) -> bool:
    """Whether out_dir holds a run (finished or killed) of this config that `resume=True` would continue."""
    return (Path(out_dir) / "last.pt").exists() and saved_run_config(out_dir) is not None \
        and not resume_conflicts_of_run(run_config(cfg, out_dir), out_dir)


def run_environment(world_size: int = 1) -> dict:
    """What bitwise reproducibility depends on beyond the config: CPU results change with the thread count
    (reductions split differently), the CPU kernels torch picks (`cpu_capability`: AVX2, AVX512, ...; MKL also
    picks its code path by CPU model) and the torch build."""
    import platform

    return {"threads": torch.get_num_threads(), "torch": torch.__version__, "world_size": world_size,
            "machine": platform.machine(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_model": cpu_model(), "cuda": torch.cuda.is_available()}


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, else platform.processor()), or "" when unknown."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def saved_run_config(out_dir: str | os.PathLike) -> Optional[dict]:
    """The run config saved in out_dir/run.json (without its "env" record), or None."""
    path = Path(out_dir) / "run.json"
    if not path.exists():
        return None
    saved = load_config(str(path))
    saved.pop("env", None)
    saved.pop("eval", None)  # a section of earlier versions that nothing read
    return saved


def resume_conflicts_of_run(run: dict, out_dir: str | os.PathLike) -> list[str]:
    """Dotted keys in which `run` (a resolved run config) differs from the run saved in out_dir, leaving out
    the train keys a resume may change (tvrn.config.RESUME_MAY_CHANGE); [] if none is saved."""
    saved = saved_run_config(out_dir)
    if saved is None:
        return []
    return resume_conflicts(saved, run)


def check_run_resume(run: dict, out_dir: str | os.PathLike, resume: bool | str) -> None:
    """Refuse to resume a run in out_dir with another config, naming the keys that differ (`config.check_resume`)."""
    if not resume or (resume is True and not (Path(out_dir) / "last.pt").exists()):
        return  # a fresh start
    saved = saved_run_config(out_dir)
    if saved is not None:
        check_resume(saved, run, f"cannot resume the run in {out_dir}: its run.json differs",
                     f"resume with the run's own settings (tvrn train --config {Path(out_dir) / 'run.json'} "
                     f"--resume) or choose a new --out")


def _partner_order_fn(tcfg: TrainConfig, split: PrecompSplit) -> Optional[Callable[[int], list]]:
    """train.partner_file -> epoch -> caption order with partner images' captions together (or None)."""
    if not tcfg.partner_file:
        return None
    import json

    from .train.sampling import partner_order

    path = Path(tcfg.partner_file)
    try:
        partners = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"train.partner_file {path}: cannot read a JSON list ({e})") from None
    if not isinstance(partners, list) or len(partners) != split.num_images or \
            any(not isinstance(p, int) or not -1 <= p < split.num_images for p in partners):
        raise ConfigError(f"train.partner_file {path}: expected a list of {split.num_images} image indices or -1 "
                          f"(one per training image)")
    c2i = split.caption_to_image
    return lambda epoch: partner_order(c2i, partners, tcfg.seed, epoch)


def evaluate_checkpoints(
    paths: Sequence[str | os.PathLike], data_root: str | os.PathLike, split: str = "test", protocol: str = "all",
    adjacency_threshold: float = 0.2, eval_batch_size: int = 128, save_scores_to: Optional[str] = None,
    device=None, progress: bool = False, two_stage: Sequence[tuple[int, int]] = (), published_protocol: bool = False,
) -> dict[str, Any]:
    """Evaluate checkpoints (.pt) and/or saved score matrices (.npy); several are an ensemble (scores averaged).

    Returns the metrics of the protocol plus "members" (the inputs) and "split". two_stage: (k_images, k_texts)
    pairs; for one checkpoint, result["two_stage"] lists, per pair, two-stage metrics over all pairs of the split
    (shortlist, then the full score; `tvrn.search.evaluate_two_stage`) next to the exact RSUM, and the fraction of
    pairs scored. published_protocol: for one TVRN checkpoint, result["published_protocol"] holds the metrics of
    the authors' evaluation script (`published_protocol_scores`) under the same protocol, beside the correct ones.
    """
    if published_protocol and (len(paths) != 1 or str(paths[0]).endswith(".npy")):
        raise ValueError("--published-protocol needs exactly one TVRN checkpoint (.pt): it re-scores with the model")
    if two_stage and (len(paths) != 1 or str(paths[0]).endswith(".npy")):
        raise ValueError("two-stage evaluation needs exactly one checkpoint (.pt): it re-scores shortlists with the model")
    data_split = load_split(data_root, split)
    check_protocol_split(protocol, data_split.num_images, f"split {split!r} of {data_root}")
    data = {"eval_batch_size": eval_batch_size, "adjacency_threshold": adjacency_threshold}
    shape = (data_split.num_images, data_split.num_captions)
    c2i = torch.as_tensor(data_split.caption_to_image)
    matrices, rows = [], None
    for p in paths:
        if str(p).endswith(".npy"):
            matrices.append(load_scores(p, expected_shape=shape))
        else:
            model, tokenizer, _ = load_trained(p)
            check_model_fits_split(model, data_split, p)
            if device is not None:
                model.to(device)
            # two-stage search reuses the encodings (one process); otherwise score_split (split across ranks
            # under torchrun)
            encoded = encode_split(model, data_split, tokenizer, data, device=device, progress=progress) \
                if two_stage else None
            matrices.append(score_split(model, data_split, tokenizer, data, device=device, progress=progress,
                                        encoded=encoded))
            if published_protocol:
                published = published_protocol_scores(model, data_split, tokenizer, data, device=device,
                                                      progress=progress)
            if two_stage:
                from .search import evaluate_two_stage
                rows = [{k: v for k, v in r.items() if k != "exact"}
                        for r in evaluate_two_stage(model, *encoded, c2i, two_stage, exact_scores=matrices[-1])]
    scores = ensemble(matrices) if len(matrices) > 1 else matrices[0]
    if save_scores_to:
        from .evaluation import save_scores
        save_scores(save_scores_to, scores)
    result = evaluate_protocol(scores, c2i, protocol)
    result["members"] = [str(p) for p in paths]
    result["split"] = split
    if rows is not None:
        result["two_stage"] = rows
    if published_protocol:
        result["published_protocol"] = evaluate_protocol(published, c2i, protocol)
    return result
