"""Grounding: does a model look at the right regions? The pointing game on the synthetic benchmark.

    result = pointing_game(model, tokenizer, "data/synth", "test")   # -> dict, or None (no scenes / no alignment)
    result["accuracy"]                                               # % of object words that point right

The synthetic benchmark (`tvrn synth`, docs/synthetic.md) knows which regions are each object's evidence: a
category region and a colour region per object (the rest is background). An **object word** is a category noun
("cat", "kitty", ...) or a colour word ("red", ...) of an object a caption mentions; the word points at the region
its row of the model's word-to-region attention weighs most (`tvrn.models.explain`, the scoring code's own
weights, folded to tokens x regions). **Pointing-game accuracy** is the share of object words over the split's
positive pairs (each caption with its own image) whose pointed region is one of that object's evidence regions.
Chance is about 2 / R (2 evidence regions among R = 12: 16.7% at the defaults); `chance` reports it exactly.

Which object a word means: a noun with the colour word just before it (sizes may sit between: "a small red cat")
names the one object of that colour and category (unique within a scene), and both words are object words; a
noun without a colour is an object word when the scene has one object of that category, else it is ambiguous
(two cats) and left out, as is anything that names no object of the scene (counted in `unresolved`).

Which regions are an object's: SPLIT_scenes.jsonl records objects and their boxes, not the regions; the split is
generated again from manifest.json's config and seed (the generator is deterministic and byte-identical per seed,
a second or two for a default split) and its region bookkeeping used, after checking that the regenerated boxes
are the split's SPLIT_ims_bbx.npy (ValueError when they are not: data of another generator version).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from .data import collate_images, collate_texts, load_split, tokenize
from .data.synth import CATEGORIES, COLOURS, SIZES, SynthConfig, generate_split
from .models.explain import explain_pairs

NOUNS = {noun: cat for cat, v in CATEGORIES.items() for noun in v["nouns"]}  # caption noun -> category


@dataclass(frozen=True)
class PointingTarget:
    """One object word of one pair: pair index, token position in the caption's token ids, the word, its kind
    ("category" or "colour"), the object (index in the scene) and that object's regions (indices)."""

    pair: int
    position: int
    word: str
    kind: str
    object: int
    regions: tuple[int, ...]


def has_scenes(root: str | os.PathLike, split: str) -> bool:
    """Whether `root` is a synthetic benchmark folder with scenes for `split` (what the pointing game needs)."""
    root = Path(root)
    if not (root / f"{split}_scenes.jsonl").is_file():
        return False
    try:
        return json.loads((root / "manifest.json").read_text()).get("format", "").startswith("tvrn-synth")
    except (OSError, ValueError, AttributeError):
        return False


def read_scenes(root: str | os.PathLike, split: str) -> list[dict]:
    """SPLIT_scenes.jsonl -> one dict per image (objects, relations, twin, captions)."""
    return [json.loads(x) for x in (Path(root) / f"{split}_scenes.jsonl").read_text().splitlines() if x.strip()]


def region_owners(root: str | os.PathLike, split: str) -> np.ndarray:
    """(N, R) int: the object (index in its scene) each region is evidence of, -1 for background, from the split
    generated again with manifest.json's config (see the module doc). ValueError when the regenerated boxes are
    not the split's."""
    root = Path(root)
    man = json.loads((root / "manifest.json").read_text())
    known = set(SynthConfig.__dataclass_fields__)
    config = SynthConfig(**{k: v for k, v in man["config"].items() if k in known})
    sp = generate_split(config, split)
    boxes = np.load(root / f"{split}_ims_bbx.npy")
    if boxes.shape != sp.boxes.shape or not np.array_equal(boxes, sp.boxes):
        raise ValueError(f"{root}: regenerating split {split!r} from manifest.json does not give its boxes "
                         f"({split}_ims_bbx.npy): written by another version of the generator, so which region "
                         f"belongs to which object cannot be recovered; write the data again with `tvrn synth`")
    return sp.region_object.astype(np.int64)


def object_words(words: Sequence[str], objects: Sequence[dict]) -> tuple[list[tuple[int, str, int]], int]:
    """words (one caption's, in order) and its scene's objects ({"category", "colour", ...}) -> ([(word index,
    "category" | "colour", object index)] sorted by word index, number of unresolved mentions (a noun that names
    no single object of the scene, and its colour word if it has one)). See the module doc."""
    words = [w.lower() for w in words]
    out, unresolved = [], 0
    for j, w in enumerate(words):
        if w not in NOUNS:
            continue
        colour_at, k = None, j - 1
        while k >= 0 and (words[k] in COLOURS or words[k] in SIZES):  # "a small red cat", "a red cat"
            if words[k] in COLOURS and colour_at is None:
                colour_at = k
            k -= 1
        colour = None if colour_at is None else words[colour_at]
        found = [o for o, ob in enumerate(objects)
                 if ob["category"] == NOUNS[w] and (colour is None or ob["colour"] == colour)]
        if len(found) != 1:
            unresolved += 1 + (colour_at is not None)
            continue
        out.append((j, "category", found[0]))
        if colour_at is not None:
            out.append((colour_at, "colour", found[0]))
    return sorted(out), unresolved


def token_words(tokenizer, caption: str) -> list[tuple[str, int]]:
    """[(word, token position)] of a caption: each word and the position of its (first) token in
    `tokenizer.encode(caption)`. The vocabulary tokenizer: Treebank words after <start>; a Hugging Face
    tokenizer (BertTokenizer): its pre-tokenizer's words and their first word piece."""
    if hasattr(tokenizer, "word2idx"):  # tvrn.data.Vocabulary: [<start>] + tokenize(caption) + [<end>]
        return [(w, i + 1) for i, w in enumerate(tokenize(caption))]
    tok = getattr(tokenizer, "_tok", None)
    if tok is not None and getattr(tok, "is_fast", False):
        enc = tok(caption, truncation=True, max_length=getattr(tokenizer, "max_length", 512))
        pre = tok.backend_tokenizer.pre_tokenizer
        words = [w for w, _ in pre.pre_tokenize_str(tok.backend_tokenizer.normalizer.normalize_str(caption))] \
            if tok.backend_tokenizer.normalizer is not None else [w for w, _ in pre.pre_tokenize_str(caption)]
        out, seen = [], set()
        for pos, w in enumerate(enc.word_ids()):
            if w is not None and w not in seen and w < len(words):
                seen.add(w)
                out.append((words[w], pos))
        return out
    raise ValueError(f"cannot map caption words to token positions for a {type(tokenizer).__name__}")


def pointing_targets(captions: Sequence[str], scenes: Sequence[dict], owners: np.ndarray, tokenizer,
                     image_of: Sequence[int]) -> tuple[list[PointingTarget], int]:
    """Object words of captions[p] in the scene of image image_of[p] -> ([PointingTarget], unresolved count).
    owners: (N, R) region owners (`region_owners`)."""
    targets, unresolved = [], 0
    for p, (caption, img) in enumerate(zip(captions, image_of)):
        pairs = token_words(tokenizer, caption)
        found, bad = object_words([w for w, _ in pairs], scenes[img]["objects"])
        unresolved += bad
        for j, kind, obj in found:
            regions = tuple(int(r) for r in np.flatnonzero(owners[img] == obj))
            targets.append(PointingTarget(p, pairs[j][1], pairs[j][0].lower(), kind, obj, regions))
    return targets, unresolved


def pointing_accuracy(pointed: torch.Tensor, targets: Sequence[PointingTarget],
                      regions: Optional[torch.Tensor] = None) -> dict:
    """pointed (P, L) long: each token's most attended region (`PairExplanations.pointed_regions`); targets: the
    object words -> {"accuracy" (% hits), "hits", "words", "category" / "colour" ({"accuracy", "words"} per kind),
    "chance" (% expected of a region drawn uniformly: mean |object regions| / real regions; with regions (P,)
    real regions per pair, else pointed is assumed over R = its attention width and chance is left out)}.
    accuracy is None when there are no object words."""
    hits = [int(pointed[t.pair, t.position]) in t.regions for t in targets]

    def pct(xs):
        return None if not xs else 100.0 * sum(xs) / len(xs)

    out = {"accuracy": pct(hits), "hits": int(sum(hits)), "words": len(targets)}
    for kind in ("category", "colour"):
        sel = [h for h, t in zip(hits, targets) if t.kind == kind]
        out[kind] = {"accuracy": pct(sel), "words": len(sel)}
    if regions is not None and targets:
        out["chance"] = 100.0 * float(np.mean([len(t.regions) / int(regions[t.pair]) for t in targets]))
    return out


def pointing_game(model, tokenizer, root: str | os.PathLike, split: str = "test", batch_size: int = 64,
                  adjacency_threshold: float = 0.2, limit: Optional[int] = None) -> Optional[dict]:
    """Pointing-game accuracy of `model` over the positive pairs (every caption with its own image) of a synthetic
    split, `batch_size` pairs at a time through `tvrn.models.explain_pairs` -> the dict of `pointing_accuracy`
    plus "pairs", "unresolved" (mentions left out: see the module doc), "split"; None when the folder has no
    scenes for the split (not a `tvrn synth` folder) or the model computes no word-to-region attention (VSE).
    limit: only the first `limit` captions (quick checks)."""
    from .models import SCAN, TVRN

    if not has_scenes(root, split) or not isinstance(model, (SCAN, TVRN)):
        return None
    data = load_split(root, split)
    scenes = read_scenes(root, split)
    owners = region_owners(root, split)
    c2i = np.asarray(data.caption_to_image)
    n = data.num_captions if limit is None else min(limit, data.num_captions)
    targets, unresolved = pointing_targets(data.captions[:n], scenes, owners, tokenizer, c2i[:n])
    by_pair: dict[int, list[PointingTarget]] = {}
    for t in targets:
        by_pair.setdefault(t.pair, []).append(t)
    pairs = sorted(by_pair)
    pointed_all, kept, real = [], [], []
    for s in range(0, len(pairs), batch_size):
        caps = pairs[s:s + batch_size]
        imgs = c2i[caps]
        images = collate_images(data.image_features(imgs), data.boxes(imgs), imgs, adjacency_threshold)
        texts = collate_texts([tokenizer.encode(data.captions[c]) for c in caps], tokenizer.pad_id, imgs, caps)
        ex = explain_pairs(model, images, texts)
        pointed = ex.pointed_regions()  # (B, L)
        for b, c in enumerate(caps):
            for t in by_pair[c]:
                kept.append(PointingTarget(len(pointed_all), t.position, t.word, t.kind, t.object, t.regions))
                pointed_all.append(int(pointed[b, t.position]))
                real.append(int(ex.region_mask[b].sum()))
    # one row per target: pair index = its row, position 0
    flat = [PointingTarget(i, 0, t.word, t.kind, t.object, t.regions) for i, t in enumerate(kept)]
    out = pointing_accuracy(torch.tensor(pointed_all, dtype=torch.long).reshape(-1, 1), flat,
                            torch.tensor(real, dtype=torch.long))
    out.update(pairs=len(pairs), unresolved=unresolved, split=split)
    return out


def format_pointing(result: dict) -> str:
    """One line for `tvrn eval`."""
    if result["accuracy"] is None:
        return "  pointing game: no object words in the split's captions"
    kinds = ", ".join(f"{k} {result[k]['accuracy']:.1f}%" for k in ("category", "colour")
                      if result[k]["accuracy"] is not None)
    chance = f"; chance {result['chance']:.1f}%" if result.get("chance") is not None else ""
    return (f"  pointing game: {result['accuracy']:.1f}% of {result['words']} object words attend most to their "
            f"object's regions ({kinds}{chance})")


__all__ = ["PointingTarget", "format_pointing", "has_scenes", "object_words", "pointing_accuracy", "pointing_game",
           "pointing_targets", "read_scenes", "region_owners", "token_words"]
