"""Synthetic image-text benchmark in SCAN's precomp layout, built to need what TVRN claims to add.

Each image is a scene of 2-4 objects (category, colour, size) with relations between object pairs (on, under,
inside, next to, left of, right of) that the boxes make visible. Region features are built so that:

- attribute binding needs geometry: an object's category (and size) evidence sits in one region, its colour
  evidence in another region whose box overlaps it (IoU >= `min_evidence_iou`); regions of different objects
  overlap less than `max_cross_iou` (except a contained object inside its container). Only a model that
  combines overlapping regions can tell "a red cat on a blue box" from "a blue cat on a red box";
- relations need positions: every region carries an encoding of its box;
- categories are ambiguous: some scenes hold two objects of one category with different colours;
- every split holds hard-negative twins: a scene whose colours of two related objects are swapped, or whose
  relation is reversed; its five captions differ from the original's only by the swapped words.

Public API: `SynthConfig`, `Scene`, `SynthSplit`, `SynthResult`, `generate_split`, `render_scene`, `position_features`,
`write_dataset`, and the vocabularies `CATEGORIES`, `COLOURS`, `SIZES`, `RELATIONS`, `CAPTION_TYPES`.
See docs/synthetic.md. Shapes: N images, R regions, Dv region feature size. The library never prints.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

# --- the world ---------------------------------------------------------------------------------------------

# category -> (caption nouns (synonyms), shape drawn in the PNG, (width, height) aspect factors)
CATEGORIES: dict[str, dict] = {
    "cat": {"nouns": ["cat", "kitty"], "shape": "ellipse with ears", "aspect": (1.0, 0.9)},
    "dog": {"nouns": ["dog", "puppy"], "shape": "rounded rectangle", "aspect": (1.15, 0.9)},
    "box": {"nouns": ["box", "crate"], "shape": "rectangle", "aspect": (1.1, 1.0)},
    "ball": {"nouns": ["ball"], "shape": "circle", "aspect": (1.0, 1.0)},
    "car": {"nouns": ["car"], "shape": "car outline", "aspect": (1.35, 0.8)},
    "cup": {"nouns": ["cup", "mug"], "shape": "trapezoid", "aspect": (0.9, 1.05)},
    "book": {"nouns": ["book"], "shape": "parallelogram", "aspect": (1.0, 1.15)},
    "chair": {"nouns": ["chair"], "shape": "L shape", "aspect": (0.8, 1.2)},
}
CONTAINERS = ("box", "cup", "car")  # categories that can hold another object ("inside")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "blue": (40, 80, 220),
    "green": (40, 165, 60),
    "yellow": (235, 205, 35),
    "black": (25, 25, 25),
    "white": (250, 250, 250),
}
SIZES: dict[str, tuple[float, float]] = {  # object scale as a fraction of the image side, uniform in range
    "small": (0.13, 0.19),
    "large": (0.25, 0.32),
}
# relation -> caption phrases ("A <phrase> B"), reverse phrases ("B with A <phrase>"), converse, geometry
RELATIONS: dict[str, dict] = {
    "on": {
        "phrases": ["on", "sitting on", "on top of"],
        "reverse": ["on it", "on top of it"],
        "converse": "under",
        "geometry": "A above B, touching: 0 <= A.y2 - B.y1 <= 0.2 * min(hA, hB); x-overlap >= 0.5 * min(wA, wB)",
    },
    "under": {
        "phrases": ["under", "below", "beneath"],
        "reverse": ["under it", "beneath it"],
        "converse": "on",
        "geometry": "B on A (mirror of 'on')",
    },
    "left of": {
        "phrases": ["left of", "to the left of"],
        "reverse": ["to its left", "on its left"],
        "converse": "right of",
        "geometry": "A left of B with a gap: 1 <= B.x1 - A.x2 <= 1 + 0.14 * side; y-overlap >= 0.5 * min(hA, hB)",
    },
    "right of": {
        "phrases": ["right of", "to the right of"],
        "reverse": ["to its right", "on its right"],
        "converse": "left of",
        "geometry": "B left of A (mirror of 'left of')",
    },
    "next to": {
        "phrases": ["next to", "beside"],
        "reverse": ["next to it", "beside it"],
        "converse": "next to",
        "geometry": "side by side, either order: 1 <= gap <= 1 + 0.04 * side; y-overlap >= 0.5 * min(hA, hB)",
    },
    "inside": {
        "phrases": ["inside", "in"],
        "reverse": ["inside it", "in it"],
        "converse": None,
        "geometry": "A's box within B's box with a margin >= 1 px; A small, B a large container (box, cup, car)",
    },
}
FLIPPABLE = ("on", "under", "left of", "right of")  # relations a relation twin can reverse
COUNT_WORDS = {2: "two", 3: "three", 4: "four"}

# caption type -> cues it needs, templates, example. {A}/{B}: the related pair described with attributes;
# {a}/{b}: the same pair by category only; {rel}/{rev}: relation phrase / reverse phrase; {X}: one object with
# attributes; {list}: every object with attributes; {cats}: every object by category; {n}: object count.
CAPTION_TYPES: dict[str, dict] = {
    "relation_full": {
        "cues": ["category", "attribute_binding", "relation"],
        "templates": ["{A} {rel} {B}", "{A} is {rel} {B}", "a picture of {A} {rel} {B}"],
        "example": "a red cat sitting on a blue box",
    },
    "relation_reverse": {
        "cues": ["category", "attribute_binding", "relation"],
        "templates": ["there is {B} with {A} {rev}", "{B} with {A} {rev}"],
        "example": "there is a blue box with a red cat on top of it",
    },
    "relation_categories": {
        "cues": ["category", "relation"],
        "templates": ["{a} {rel} {b}", "the {a_noun} is {rel} the {b_noun}"],
        "example": "a kitty on top of a crate",
    },
    "object_list": {
        "cues": ["category", "attribute_binding", "count"],
        "templates": ["{n} objects: {list}", "an image showing {list}"],
        "example": "three objects: a red cat, a blue box and a small green ball",
    },
    "single_object": {
        "cues": ["category", "attribute_binding"],
        "templates": ["{X}", "a photo of {X}", "there is {X} in the picture"],
        "example": "a photo of a small red kitty",
    },
    "categories_only": {
        "cues": ["category", "count"],
        "templates": ["{cats}", "a scene with {n} things: {cats}"],
        "example": "a scene with three things: a cat, a box and a ball",
    },
}
# caption types a twin's captions are drawn from: each must change with the twin's difference
TWIN_CAPTION_TYPES = {
    "colour_swap": ("relation_full", "relation_reverse", "object_list", "single_object"),
    "relation_flip": ("relation_full", "relation_reverse", "relation_categories"),
}
SPLITS = ("train", "dev", "test")
REGION_KINDS = ("category", "colour", "background")  # region_kind codes 0, 1, 2


@dataclass(frozen=True)
class SynthConfig:
    """Every parameter of the generator; the same config and seed give byte-identical output."""

    seed: int = 0
    train_images: int = 2000  # 10k captions: enough for colour binding, one epoch in seconds on 2 cores
    dev_images: int = 200  # 1000 captions: dev RSUM for checkpoint selection
    test_images: int = 200  # 1000 captions: a 1K-style protocol at a fifth of the scale
    regions: int = 12  # R: 2 evidence regions per object (<= 8) + background regions
    feature_dim: int = 256  # Dv (the paper's bottom-up features have 2048)
    image_size: int = 128  # rendered PNG side in pixels; boxes are in this pixel frame
    min_objects: int = 2
    max_objects: int = 4
    twin_fraction: float = 0.25  # fraction of each split's images that are hard-negative twins (1/3 of the rest)
    same_category_prob: float = 0.35  # chance a scene holds two objects of one category (different colours)
    min_evidence_iou: float = 0.3  # colour region vs category region of one object: IoU at least this
    max_cross_iou: float = 0.15  # regions of different objects (not container/contents): IoU below this
    noise: float = 0.5  # std of the Gaussian noise per feature dimension (evidence embeddings have std 1)
    position_scale: float = 1.0  # weight of the box position encoding
    background_kinds: int = 4  # number of background "texture" embeddings
    vocab_min_count: int = 1  # every generated word is a real word of the benchmark
    render_images: bool = True
    merge_evidence: bool = False  # probe variant: each object's colour evidence is also added to its category
                                  # region, so one region says "red cat" and binding needs no geometry

    def validate(self) -> None:
        """Raise ValueError for an inconsistent config."""
        if not 2 <= self.min_objects <= self.max_objects <= 4:
            raise ValueError(f"need 2 <= min_objects <= max_objects <= 4, got {self.min_objects}, {self.max_objects}")
        if self.regions < 2 * self.max_objects:
            raise ValueError(f"regions={self.regions} cannot hold 2 evidence regions for {self.max_objects} objects")
        for name in ("train_images", "dev_images", "test_images"):
            if getattr(self, name) < 2:
                raise ValueError(f"{name} must be at least 2, got {getattr(self, name)}")
        if not 0 <= self.twin_fraction <= 0.5:
            raise ValueError(f"twin_fraction must be in [0, 0.5], got {self.twin_fraction}")
        if self.feature_dim < 8 or self.image_size < 48:
            raise ValueError("feature_dim must be >= 8 and image_size >= 48")
        if not 0 < self.max_cross_iou < self.min_evidence_iou < 1:
            raise ValueError("need 0 < max_cross_iou < min_evidence_iou < 1")

    def split_images(self, split: str) -> int:
        return {"train": self.train_images, "dev": self.dev_images, "test": self.test_images}[split]


@dataclass
class SceneObject:
    category: str
    colour: str
    size: str
    box: list[float]  # x1, y1, x2, y2 in pixels


@dataclass
class Scene:
    """One image: objects, relations (subject index, relation, object index), its twin if any.

    relations[0] is the scene's main relation (the one relation captions describe); a 4-object scene has a
    second relation between objects 2 and 3. `twin` is the index (in the split) of the image that differs only
    by `twin_kind` ("colour_swap" or "relation_flip"), or None.
    """

    id: str
    objects: list[SceneObject]
    relations: list[tuple[int, str, int]]
    twin: Optional[int] = None
    twin_kind: Optional[str] = None
    captions: list[dict] = field(default_factory=list)  # per caption: {"type", "cues", "text"}


@dataclass
class SynthSplit:
    """A generated split. N images, R regions, Dv feature size; captions[i] belongs to image i // 5.

    features: (N, R, Dv) float32; boxes: (N, R, 4) float32 x1, y1, x2, y2 pixels; sizes: (N, 2) width, height;
    region_kind: (N, R) int8 (0 category, 1 colour, 2 background); region_object: (N, R) int8 object index
    of an evidence region (-1 for background).
    """

    name: str
    scenes: list[Scene]
    captions: list[str]
    ids: list[str]
    features: np.ndarray
    boxes: np.ndarray
    sizes: np.ndarray
    region_kind: np.ndarray
    region_object: np.ndarray


@dataclass
class SynthResult:
    """What `write_dataset` wrote: the output folder, the manifest (also in manifest.json), timings (s)."""

    out: Path
    manifest: dict
    seconds: dict


# --- random streams ----------------------------------------------------------------------------------------

def _rng(seed: int, *key: int) -> np.random.Generator:
    """Independent PCG64 stream per purpose: a split's content does not depend on the other splits' sizes."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=key)))


_STREAM_EMBED, _STREAM_SPLIT = 0, 1  # split streams: (1, split index, 0 scenes | 1 regions | 2 noise)


def _embeddings(config: SynthConfig) -> dict[str, np.ndarray]:
    """Fixed random evidence embeddings (entries ~ N(0, 1)) and the position projection, drawn from the seed."""
    rng = _rng(config.seed, _STREAM_EMBED)
    dv = config.feature_dim
    return {
        "category": rng.standard_normal((len(CATEGORIES), dv)).astype(np.float32),
        "colour": rng.standard_normal((len(COLOURS), dv)).astype(np.float32),
        "size": rng.standard_normal((len(SIZES), dv)).astype(np.float32),
        "background": rng.standard_normal((config.background_kinds, dv)).astype(np.float32),
        "position": (rng.standard_normal((_POS_FEATURES, dv)) / math.sqrt(_POS_FEATURES / 2)).astype(np.float32),
    }


# --- scene layout ------------------------------------------------------------------------------------------

def _object_dims(category: str, size: str, side: int, rng: np.random.Generator) -> tuple[float, float]:
    lo, hi = SIZES[size]
    s = rng.uniform(lo, hi) * side
    ax, ay = CATEGORIES[category]["aspect"]
    return s * ax * rng.uniform(0.92, 1.08), s * ay * rng.uniform(0.92, 1.08)


def _pair_layout(rel: str, da, db, u, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Boxes of subject A and object B for "A rel B", origin at the group's top-left. u: 3 uniforms."""
    (wa, ha), (wb, hb) = da, db
    if rel == "under":  # B on A
        b, a = _pair_layout("on", db, da, u, side)
        return a, b
    if rel == "right of":
        b, a = _pair_layout("left of", db, da, u, side)
        return a, b
    if rel == "on":
        overlap = u[0] * 0.15 * min(ha, hb)
        shift = (u[1] - 0.5) * (abs(wb - wa) + 0.5 * min(wa, wb))  # centre offset; x-overlap >= 0.75 narrower
        a = np.array([0.0, 0.0, wa, ha])
        a[[0, 2]] += wb / 2 - wa / 2 + shift
        b = np.array([0.0, ha - overlap, wb, ha - overlap + hb])
    elif rel in ("left of", "next to"):
        gap = 1.0 + u[0] * (0.14 if rel == "left of" else 0.04) * side
        shift = (u[1] - 0.5) * (abs(hb - ha) + 0.5 * min(ha, hb))
        a = np.array([0.0, 0.0, wa, ha])
        a[[1, 3]] += hb / 2 - ha / 2 + shift
        b = np.array([wa + gap, 0.0, wa + gap + wb, hb])
        if rel == "next to" and u[2] < 0.5:  # A on the right: mirror x
            a, b = a[[2, 1, 0, 3]] * [-1, 1, -1, 1], b[[2, 1, 0, 3]] * [-1, 1, -1, 1]
    elif rel == "inside":
        margin = 2.0
        wa, ha = min(wa, 0.65 * wb), min(ha, 0.65 * hb)
        b = np.array([0.0, 0.0, wb, hb])
        x = margin + u[0] * (wb - wa - 2 * margin)
        y = margin + u[1] * (hb - ha - 2 * margin)
        a = np.array([x, y, x + wa, y + ha])
    else:
        raise ValueError(f"unknown relation {rel!r}")
    lo = np.minimum(a[:2], b[:2])
    return a - np.tile(lo, 2), b - np.tile(lo, 2)


def _mirror(box: np.ndarray, axis: int, lo: float, hi: float) -> np.ndarray:
    """Mirror box (4,) within [lo, hi] along x (axis 0) or y (axis 1)."""
    out = box.copy()
    out[axis], out[axis + 2] = lo + hi - box[axis + 2], lo + hi - box[axis]
    return out


def _place_groups(extents: list[tuple[float, float]], side: int, rng) -> Optional[list[tuple[float, float]]]:
    """Random non-overlapping top-left corners for groups of the given (w, h); None if they do not fit."""
    margin, gap = 2.0, 0.06 * side
    placed: list[tuple[float, float, float, float]] = []
    for w, h in extents:
        if w > side - 2 * margin or h > side - 2 * margin:
            return None
        for _ in range(40):
            x, y = rng.uniform(margin, side - margin - w), rng.uniform(margin, side - margin - h)
            if all(x + w + gap <= p[0] or p[2] + gap <= x or y + h + gap <= p[1] or p[3] + gap <= y for p in placed):
                placed.append((x, y, x + w, y + h))
                break
        else:
            return None
    return [(p[0], p[1]) for p in placed]


def _sample_scene(config: SynthConfig, rng: np.random.Generator, twin_kind: Optional[str]) -> dict:
    """Draw one scene's semantics and layout. Returns a dict with objects, relations, group data."""
    side = config.image_size
    cats, cols = list(CATEGORIES), list(COLOURS)
    while True:
        n = int(rng.integers(config.min_objects, config.max_objects + 1))
        rels = [str(rng.choice(FLIPPABLE if twin_kind == "relation_flip" else list(RELATIONS)))]
        if n == 4:
            rels.append(str(rng.choice(list(RELATIONS))))
        category = [cats[i] for i in rng.choice(len(cats), n, replace=False)]
        size = [str(rng.choice(list(SIZES))) for _ in range(n)]
        for r, rel in enumerate(rels):
            if rel == "inside":  # subject 2r small, object 2r+1 a large container
                size[2 * r], size[2 * r + 1] = "small", "large"
                options = [c for c in CONTAINERS if c not in category or category[2 * r + 1] == c]
                category[2 * r + 1] = str(rng.choice(options)) if options else ""
        if "" in category:
            continue
        if rng.random() < config.same_category_prob:  # semantic ambiguity: two objects of one category
            i, j = rng.choice(n, 2, replace=False)
            if not any(rel == "inside" and j == 2 * r + 1 for r, rel in enumerate(rels)):
                category[j] = category[i]
        colour = [cols[i] for i in rng.choice(len(cols), n, replace=True)]
        if len(set(zip(category, colour))) < n:  # "a red cat" must name exactly one object
            continue
        if twin_kind == "colour_swap":
            swapped = list(colour)
            swapped[0], swapped[1] = colour[1], colour[0]
            if colour[0] == colour[1] or len(set(zip(category, swapped))) < n:
                continue
        dims = [_object_dims(c, s, side, rng) for c, s in zip(category, size)]
        u = rng.random((len(rels), 3))
        for _ in range(6):  # place; shrink everything if it does not fit
            groups = []  # (object indices, boxes relative to the group origin)
            for r, rel in enumerate(rels):
                a, b = _pair_layout(rel, dims[2 * r], dims[2 * r + 1], u[r], side)
                groups.append(([2 * r, 2 * r + 1], [a, b]))
            if n == 3:
                groups.append(([2], [np.array([0.0, 0.0, *dims[2]])]))
            extents = [(max(b[2] for b in bs), max(b[3] for b in bs)) for _, bs in groups]
            corners = _place_groups(extents, side, rng)
            if corners is not None:
                break
            dims = [(w * 0.9, h * 0.9) for w, h in dims]
        else:
            continue
        boxes = [None] * n
        for (idx, bs), (x, y) in zip(groups, corners):
            for i, b in zip(idx, bs):
                boxes[i] = b + np.array([x, y, x, y])
        return {
            "category": category, "colour": colour, "size": size, "boxes": boxes,
            "relations": [(2 * r, rel, 2 * r + 1) for r, rel in enumerate(rels)],
        }


def _twin_of(base: dict, kind: str) -> dict:
    """The hard-negative twin: colours of the main pair swapped, or the main relation reversed in place."""
    twin = {k: list(v) for k, v in base.items()}
    if kind == "colour_swap":
        twin["colour"][0], twin["colour"][1] = base["colour"][1], base["colour"][0]
    else:  # relation_flip: mirror the pair inside its group extent; other objects stay where they are
        a, rel, b = base["relations"][0]
        axis = 1 if rel in ("on", "under") else 0
        lo = min(base["boxes"][a][axis], base["boxes"][b][axis])
        hi = max(base["boxes"][a][axis + 2], base["boxes"][b][axis + 2])
        twin["boxes"][a] = _mirror(base["boxes"][a], axis, lo, hi)
        twin["boxes"][b] = _mirror(base["boxes"][b], axis, lo, hi)
        twin["relations"][0] = (a, RELATIONS[rel]["converse"], b)
    return twin


# --- captions ----------------------------------------------------------------------------------------------

def _caption_plan(rng: np.random.Generator, n_objects: int, twin_kind: Optional[str]) -> list[dict]:
    """Five caption choices (type, template, synonyms, ...) shared by an image and its twin."""
    if twin_kind is None:
        types = list(rng.choice(list(CAPTION_TYPES), 5, replace=False))
    else:
        allowed = TWIN_CAPTION_TYPES[twin_kind]
        types = list(allowed) + list(rng.choice(allowed, 5 - len(allowed)))
        types = [types[i] for i in rng.permutation(5)]
    plan, first = [], {}
    for t in types:
        n_templates = len(CAPTION_TYPES[t]["templates"])
        first.setdefault(t, int(rng.integers(n_templates)))
        seen = sum(p["type"] == t for p in plan)  # a repeated type takes the next template
        plan.append({
            "type": str(t),
            "template": (first[t] + seen) % n_templates,
            "phrase": int(rng.integers(6)),  # taken modulo the relation's phrase count
            "noun": [int(v) for v in rng.integers(0, 2, n_objects)],  # synonym index, modulo
            "with_size": [bool(v) for v in rng.random(n_objects) < 0.4],
            "order": [int(v) for v in rng.permutation(n_objects)],
            # single_object: one of the main pair (a twin's difference must show), otherwise any object
            "object": int(rng.integers(2 if twin_kind else n_objects)),
            "relation": 0 if twin_kind else int(rng.integers(n_objects // 2)),
        })
    return plan


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _caption_text(item: dict, scene: dict) -> str:
    def noun(i):
        nouns = CATEGORIES[scene["category"][i]]["nouns"]
        return nouns[item["noun"][i] % len(nouns)]

    def full(i):
        size = scene["size"][i] + " " if item["with_size"][i] else ""
        return f"a {size}{scene['colour'][i]} {noun(i)}"

    a, rel, b = scene["relations"][item["relation"]]
    n = len(scene["category"])
    phrases, reverse = RELATIONS[rel]["phrases"], RELATIONS[rel]["reverse"]
    fields = {
        "A": full(a), "B": full(b), "a": f"a {noun(a)}", "b": f"a {noun(b)}", "a_noun": noun(a), "b_noun": noun(b),
        "rel": phrases[item["phrase"] % len(phrases)], "rev": reverse[item["phrase"] % len(reverse)],
        "X": full(item["object"]), "n": COUNT_WORDS[n],
        "list": _join([full(i) for i in item["order"]]), "cats": _join([f"a {noun(i)}" for i in item["order"]]),
    }
    return CAPTION_TYPES[item["type"]]["templates"][item["template"]].format(**fields)


# --- regions and features ----------------------------------------------------------------------------------

def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes a (..., 4) and b (..., 4), broadcast."""
    iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = iw * ih
    union = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1]) + (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return inter / np.maximum(union - inter, 1e-9)


def _regions(scene: dict, config: SynthConfig, rng: np.random.Generator):
    """Region boxes (R, 4), kind (R,), object (R,), background id (R,) for one scene, in shuffled order."""
    side, n, r_total = config.image_size, len(scene["category"]), config.regions
    obj = np.array(scene["boxes"], dtype=np.float64)  # (n, 4)
    wh = np.stack([obj[:, 2] - obj[:, 0], obj[:, 3] - obj[:, 1]], 1)  # (n, 2)
    linked = {(a, b) for a, rel, b in scene["relations"] if rel == "inside"}
    linked |= {(b, a) for a, b in linked}

    def clip(box):
        return np.clip(box, 0, side)

    # category regions: the object box with each edge jittered by up to 5% of the object's size
    cat_boxes = np.stack([clip(obj[i] + rng.uniform(-0.05, 0.05, 4) * np.tile(wh[i], 2)) for i in range(n)])
    colour_boxes = np.zeros_like(cat_boxes)
    for i in range(n):
        others = [cat_boxes[j] for j in range(n) if j != i and (i, j) not in linked]
        others += [colour_boxes[j] for j in range(i) if (i, j) not in linked]
        for attempt in range(30):
            shrink = 1.0 - attempt / 30  # later attempts stay closer to the object
            shift = rng.uniform(0.08, 0.3, 2) * shrink * rng.choice([-1, 1], 2) * wh[i]
            scale = 1 + rng.uniform(-0.15, 0.1, 2) * shrink
            centre = (obj[i, :2] + obj[i, 2:]) / 2 + shift
            box = clip(np.concatenate([centre - scale * wh[i] / 2, centre + scale * wh[i] / 2]))
            if _iou(box, cat_boxes[i]) >= config.min_evidence_iou and all(
                _iou(box, o) < config.max_cross_iou for o in others
            ):
                break
        else:  # the central 80% of the category region always satisfies both
            c, half = (cat_boxes[i, :2] + cat_boxes[i, 2:]) / 2, 0.4 * (cat_boxes[i, 2:] - cat_boxes[i, :2])
            box = np.concatenate([c - half, c + half])
        colour_boxes[i] = box
    n_bg = r_total - 2 * n
    bw = rng.uniform(0.1, 0.6, (n_bg, 2)) * side  # background: random boxes anywhere
    bxy = rng.uniform(0, 1, (n_bg, 2)) * (side - bw)
    bg_boxes = np.concatenate([bxy, bxy + bw], 1)
    boxes = np.concatenate([cat_boxes, colour_boxes, bg_boxes])  # (R, 4)
    kind = np.array([0] * n + [1] * n + [2] * n_bg, dtype=np.int8)
    owner = np.array(list(range(n)) * 2 + [-1] * n_bg, dtype=np.int8)
    bg_id = np.concatenate([np.full(2 * n, -1), rng.integers(0, config.background_kinds, n_bg)])
    perm = rng.permutation(r_total)  # region order carries no information
    return boxes[perm], kind[perm], owner[perm], bg_id[perm]


_POS_FREQS = (1.0, 2.0, 4.0)
_POS_FEATURES = 4 * 2 * len(_POS_FREQS)  # (cx, cy, w, h) x (sin, cos) x frequencies


def position_features(boxes: np.ndarray, image_size: float) -> np.ndarray:
    """Coarse sinusoidal encoding of boxes (..., 4) -> (..., 24): sin/cos(pi * f * v), v in (cx, cy, w, h) / side,
    f in 1, 2, 4."""
    b = boxes / image_size
    v = np.stack([(b[..., 0] + b[..., 2]) / 2, (b[..., 1] + b[..., 3]) / 2, b[..., 2] - b[..., 0], b[..., 3] - b[..., 1]], -1)
    ang = np.pi * v[..., None] * np.array(_POS_FREQS)  # (..., 4, F)
    return np.concatenate([np.sin(ang), np.cos(ang)], -1).reshape(*boxes.shape[:-1], _POS_FEATURES)


def _features(config, emb, boxes, kind, owner, bg_id, obj_cat, obj_col, obj_size, rng) -> np.ndarray:
    """Region features (N, R, Dv) float32 = relu(amp * evidence + position_scale * pos @ P + noise * eps)."""
    n_img, r = kind.shape
    out = np.empty((n_img, r, config.feature_dim), dtype=np.float32)
    rows = np.arange(n_img)[:, None]
    own = np.clip(owner, 0, None)
    cat_id, col_id, size_id = obj_cat[rows, own], obj_col[rows, own], obj_size[rows, own]  # (N, R)
    for s in range(0, n_img, 512):  # chunks bound memory for large Dv
        e = slice(s, s + 512)
        k = kind[e]
        ev = np.where((k == 0)[..., None], emb["category"][cat_id[e]] + emb["size"][size_id[e]], 0)
        has_colour = (k == 1) | (k == 0) if config.merge_evidence else (k == 1)
        ev = ev + np.where(has_colour[..., None], emb["colour"][col_id[e]], 0)
        ev = ev + np.where((k == 2)[..., None], emb["background"][np.clip(bg_id[e], 0, None)], 0)
        amp = rng.uniform(0.8, 1.2, k.shape)[..., None]  # detector confidence
        pos = position_features(boxes[e], config.image_size) @ emb["position"]  # (n, R, Dv)
        noise = rng.standard_normal(ev.shape, dtype=np.float32)
        out[e] = np.maximum(amp * ev + config.position_scale * pos + config.noise * noise, 0)
    return out


# --- a split -----------------------------------------------------------------------------------------------

def generate_split(config: SynthConfig, split: str, embeddings: Optional[dict] = None) -> SynthSplit:
    """Generate one split ("train", "dev" or "test") of `config.split_images(split)` images, deterministically.

    Hard-negative twins are in the same split. Each split uses its own random streams, so changing one split's
    size leaves the others unchanged. Returns features (N, R, Dv) float32, boxes (N, R, 4) float32, captions
    (5 N), scenes (N) and region bookkeeping; see `SynthSplit`.
    """
    config.validate()
    s_idx = SPLITS.index(split)
    emb = embeddings if embeddings is not None else _embeddings(config)
    rng_scene = _rng(config.seed, _STREAM_SPLIT, s_idx, 0)
    rng_region = _rng(config.seed, _STREAM_SPLIT, s_idx, 1)
    rng_noise = _rng(config.seed, _STREAM_SPLIT, s_idx, 2)
    n_img = config.split_images(split)
    n_twin = int(round(config.twin_fraction * n_img))
    n_base = n_img - n_twin

    raw, plans, twin_of = [], [], []  # generation order: base scenes first, twins appended
    kinds = [None] * n_base
    for i in rng_scene.choice(n_base, n_twin, replace=False):
        kinds[i] = "colour_swap" if rng_scene.random() < 0.5 else "relation_flip"
    for i in range(n_base):
        raw.append(_sample_scene(config, rng_scene, kinds[i]))
        plans.append(_caption_plan(rng_scene, len(raw[i]["category"]), kinds[i]))
        twin_of.append(None)
    for i in range(n_base):
        if kinds[i]:
            raw.append(_twin_of(raw[i], kinds[i]))
            plans.append(plans[i])
            twin_of.append(i)
            twin_of[i] = len(raw) - 1
    order = rng_scene.permutation(n_img)  # position in the split -> generation index
    where = np.argsort(order)  # generation index -> position

    ids = [f"synth-{split}-{i:05d}" for i in range(n_img)]
    scenes, captions = [], []
    r = config.regions
    boxes = np.zeros((n_img, r, 4))
    kind = np.zeros((n_img, r), dtype=np.int8)
    owner = np.zeros((n_img, r), dtype=np.int8)
    bg_id = np.zeros((n_img, r), dtype=np.int64)
    obj_attr = np.zeros((3, n_img, config.max_objects), dtype=np.int64)  # category, colour, size ids
    cat_ids, col_ids, size_ids = ({k: i for i, k in enumerate(d)} for d in (CATEGORIES, COLOURS, SIZES))
    for pos, g in enumerate(order):
        sc, g_twin = raw[g], twin_of[g]
        n_obj = len(sc["category"])
        texts = [_caption_text(item, sc) for item in plans[g]]
        scene = Scene(
            id=ids[pos],
            objects=[SceneObject(c, col, s, [round(float(v), 3) for v in b])
                     for c, col, s, b in zip(sc["category"], sc["colour"], sc["size"], sc["boxes"])],
            relations=[(int(a), rel, int(b)) for a, rel, b in sc["relations"]],
            twin=None if g_twin is None else int(where[g_twin]),
            twin_kind=None if g_twin is None else kinds[g if g < n_base else g_twin],
            captions=[{"type": it["type"], "cues": CAPTION_TYPES[it["type"]]["cues"], "text": t}
                      for it, t in zip(plans[g], texts)],
        )
        scenes.append(scene)
        captions.extend(texts)
        sc_rounded = dict(sc, boxes=[np.array(o.box) for o in scene.objects])
        boxes[pos], kind[pos], owner[pos], bg_id[pos] = _regions(sc_rounded, config, rng_region)
        obj_attr[0, pos, :n_obj] = [cat_ids[c] for c in sc["category"]]
        obj_attr[1, pos, :n_obj] = [col_ids[c] for c in sc["colour"]]
        obj_attr[2, pos, :n_obj] = [size_ids[s] for s in sc["size"]]
    feats = _features(config, emb, boxes, kind, owner, bg_id, *obj_attr, rng_noise)
    sizes = np.full((n_img, 2), config.image_size, dtype=np.float32)
    return SynthSplit(split, scenes, captions, ids, feats, boxes.astype(np.float32), sizes, kind, owner)


# --- rendering ---------------------------------------------------------------------------------------------

def render_scene(scene: Scene, image_size: int):
    """Draw a scene as a PIL RGB image (image_size, image_size): each object a filled shape of its colour and
    category, in its box; containers before their contents, lower objects before the ones on top of them."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (image_size, image_size), (200, 200, 196))
    draw = ImageDraw.Draw(img)
    contents = {a for a, rel, b in scene.relations if rel == "inside"}
    order = sorted(range(len(scene.objects)), key=lambda i: (i in contents, -scene.objects[i].box[3]))
    for i in order:
        o = scene.objects[i]
        _draw_shape(draw, o.category, o.box, COLOURS[o.colour])
    return img


def _draw_shape(draw, category: str, box, fill) -> None:
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    line = (90, 90, 90) if fill == COLOURS["black"] else (20, 20, 20)
    kw = {"fill": fill, "outline": line, "width": 1}
    if category == "cat":
        draw.polygon([(x1 + 0.1 * w, y1 + 0.35 * h), (x1 + 0.2 * w, y1), (x1 + 0.4 * w, y1 + 0.25 * h)], **kw)
        draw.polygon([(x2 - 0.1 * w, y1 + 0.35 * h), (x2 - 0.2 * w, y1), (x2 - 0.4 * w, y1 + 0.25 * h)], **kw)
        draw.ellipse([x1, y1 + 0.15 * h, x2, y2], **kw)
    elif category == "dog":
        draw.rounded_rectangle([x1, y1, x2, y2], radius=max(1.0, 0.25 * min(w, h)), **kw)
    elif category == "box":
        draw.rectangle([x1, y1, x2, y2], **kw)
    elif category == "ball":
        draw.ellipse([x1, y1, x2, y2], **kw)
    elif category == "car":
        draw.polygon([(x1, y2), (x1, y1 + 0.45 * h), (x1 + 0.25 * w, y1), (x2 - 0.25 * w, y1),
                      (x2, y1 + 0.45 * h), (x2, y2)], **kw)
    elif category == "cup":
        draw.polygon([(x1, y1), (x2 - 0.2 * w, y1), (x2 - 0.32 * w, y2), (x1 + 0.12 * w, y2)], **kw)
        draw.arc([x2 - 0.35 * w, y1 + 0.2 * h, x2, y1 + 0.6 * h], -90, 90, fill=line, width=2)
    elif category == "book":
        draw.polygon([(x1 + 0.25 * w, y1), (x2, y1), (x2 - 0.25 * w, y2), (x1, y2)], **kw)
    elif category == "chair":
        draw.polygon([(x1, y1), (x1 + 0.3 * w, y1), (x1 + 0.3 * w, y1 + 0.55 * h), (x2, y1 + 0.55 * h),
                      (x2, y2), (x1, y2)], **kw)
    else:
        raise ValueError(f"unknown category {category!r}")


# --- writing -----------------------------------------------------------------------------------------------

def _atomic_write(path: Path, write: Callable) -> None:
    """Write via `write(file_object)` to a temp name in the same folder, then os.replace into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _write_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def _write_npy(path: Path, array: np.ndarray) -> None:
    _atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _split_stats(sp: SynthSplit) -> dict:
    """Counts and geometry checks of a split, for the manifest."""
    n_obj = [len(s.objects) for s in sp.scenes]
    own_iou, cross = [], []
    for i, sc in enumerate(sp.scenes):
        linked = {frozenset((a, b)) for a, rel, b in sc.relations if rel == "inside"}
        k, o, bx = sp.region_kind[i], sp.region_object[i], sp.boxes[i]
        ev = np.flatnonzero(k < 2)
        iou = _iou(bx[ev][:, None], bx[ev][None])  # (E, E)
        for p, rp in enumerate(ev):
            for q, rq in enumerate(ev):
                if o[rp] == o[rq] and k[rp] == 0 and k[rq] == 1:
                    own_iou.append(iou[p, q])
                elif o[rp] < o[rq] and frozenset((int(o[rp]), int(o[rq]))) not in linked:
                    cross.append(iou[p, q])
    return {
        "images": len(sp.scenes),
        "captions": len(sp.captions),
        "objects_per_image": {str(k): n_obj.count(k) for k in sorted(set(n_obj))},
        "relations": {r: sum(rel == r for s in sp.scenes for _, rel, _ in s.relations) for r in RELATIONS},
        "twin_pairs": {k: sum(s.twin_kind == k for s in sp.scenes) // 2 for k in TWIN_CAPTION_TYPES},
        "same_category_scenes": sum(len({o.category for o in s.objects}) < len(s.objects) for s in sp.scenes),
        "caption_types": {t: sum(c["type"] == t for s in sp.scenes for c in s.captions) for t in CAPTION_TYPES},
        "min_colour_category_iou": round(float(min(own_iou)), 4),
        "max_cross_object_iou": round(float(max(cross)), 4) if cross else 0.0,
    }


def write_dataset(
    out: "str | os.PathLike[str]",
    config: SynthConfig = SynthConfig(),
    on_split: Optional[Callable[[str, dict], None]] = None,
) -> SynthResult:
    """Generate train, dev and test and write them in SCAN's precomp layout to `out`.

    Files per split: SPLIT_ims.npy (N, R, Dv) float32, SPLIT_caps.txt (5 N lines), SPLIT_ids.txt (N lines),
    SPLIT_ims_bbx.npy (N, R, 4) float32, SPLIT_ims_size.npy (N, 2) float32, SPLIT_scenes.jsonl (N lines: objects,
    relations, twin, caption types), images/SPLIT/<id>.png if `config.render_images`; then vocab.json (train
    captions) and manifest.json, written last: a folder with manifest.json is complete. Every file is written
    under a temp name and moved into place. `on_split(split, stats)` is called after each split (progress).
    """
    config.validate()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "manifest.json"
    if manifest_path.exists():  # the folder is incomplete until the new manifest lands
        manifest_path.unlink()
    t0 = time.perf_counter()
    seconds = {"generate": 0.0, "write": 0.0, "render": 0.0}
    emb = _embeddings(config)
    stats, train_captions = {}, None
    for split in SPLITS:
        t = time.perf_counter()
        sp = generate_split(config, split, emb)
        seconds["generate"] += time.perf_counter() - t
        t = time.perf_counter()
        _write_npy(out / f"{split}_ims.npy", sp.features)
        _write_npy(out / f"{split}_ims_bbx.npy", sp.boxes)
        _write_npy(out / f"{split}_ims_size.npy", sp.sizes)
        _write_text(out / f"{split}_caps.txt", "".join(c + "\n" for c in sp.captions))
        _write_text(out / f"{split}_ids.txt", "".join(i + "\n" for i in sp.ids))
        _write_text(out / f"{split}_scenes.jsonl",
                    "".join(json.dumps(asdict(s), separators=(",", ":")) + "\n" for s in sp.scenes))
        seconds["write"] += time.perf_counter() - t
        if config.render_images:
            t = time.perf_counter()
            folder = out / "images" / split
            folder.mkdir(parents=True, exist_ok=True)
            for scene in sp.scenes:
                img = render_scene(scene, config.image_size)
                _atomic_write(folder / f"{scene.id}.png", lambda f: img.save(f, format="PNG"))
            seconds["render"] += time.perf_counter() - t
        stats[split] = _split_stats(sp)
        if split == "train":
            train_captions = sp.captions
        if on_split is not None:
            on_split(split, stats[split])

    from .vocab import Vocabulary

    vocab = Vocabulary.build(train_captions, min_count=config.vocab_min_count)
    vocab.save(out / "vocab.json")
    files = sorted(p.name for p in out.iterdir() if p.is_file() and p.name != "manifest.json")
    manifest = {
        "format": "tvrn-synth/1",
        "seed": config.seed,
        "config": asdict(config),
        "counts": stats,
        "vocabulary_size": len(vocab),
        "categories": {k: {"nouns": v["nouns"], "shape": v["shape"]} for k, v in CATEGORIES.items()},
        "containers": list(CONTAINERS),
        "colours": {k: list(v) for k, v in COLOURS.items()},
        "sizes": {k: list(v) for k, v in SIZES.items()},
        "relations": {k: {"phrases": v["phrases"], "reverse": v["reverse"], "converse": v["converse"],
                          "geometry": v["geometry"]} for k, v in RELATIONS.items()},
        "caption_types": CAPTION_TYPES,
        "twin_caption_types": {k: list(v) for k, v in TWIN_CAPTION_TYPES.items()},
        "features": {
            "recipe": "relu(amp * evidence + position_scale * (pos(box) @ P) + noise * eps), eps ~ N(0, 1)",
            "evidence": {
                "category region": "E_category[c] + E_size[s]; box = object box, each edge jittered by <= 5%",
                "colour region": f"E_colour[k]; box shifted/scaled from the object, IoU with the category region "
                                 f">= {config.min_evidence_iou}, IoU with other objects' regions < "
                                 f"{config.max_cross_iou} (except contents and container of 'inside')",
                "background region": "E_background[t], t uniform in background kinds; random box (10-60% of side)",
            },
            "embeddings": "E_* entries ~ N(0, 1), one fixed vector per category, colour, size, background kind",
            "amp": "uniform(0.8, 1.2) per region",
            "position": "pos(box) = sin/cos(pi * f * v), v = (cx, cy, w, h) / side, f in (1, 2, 4): 24 values; "
                        "P (24, Dv) fixed, entries ~ N(0, 1/12)",
            "region_order": "shuffled per image; R - 2 * objects background regions",
            "boxes": "x1, y1, x2, y2 in pixels of the image_size x image_size rendering",
        },
        "tokenisation": "lower-case + Treebank rules (tvrn.data.vocab.tokenize)",
        "files": {name: _sha256(out / name) for name in files},
        "images_rendered": config.render_images,
    }
    _write_text(manifest_path, json.dumps(manifest, indent=1, sort_keys=False) + "\n")
    seconds["total"] = time.perf_counter() - t0
    return SynthResult(out, manifest, seconds)


def twin_partners(root: str | Path, split: str = "train") -> list[int]:
    """For each image of a written split, its hard-negative twin (both ways) or -1, from SPLIT_scenes.jsonl: the
    partner map of `train.partner_file` (tvrn.train.sampling), so that batches hold both twins."""
    scenes = [json.loads(x) for x in (Path(root) / f"{split}_scenes.jsonl").read_text().splitlines()]
    out = [-1] * len(scenes)
    for i, s in enumerate(scenes):
        if s.get("twin") is not None:
            out[i], out[int(s["twin"])] = int(s["twin"]), i
    return out
