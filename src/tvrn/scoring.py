"""The one routine that scores all pairs, for evaluation and search alike.

    enc_i = encode_images(model, image_batches)      # per-image work, once per image
    enc_t = encode_texts(model, text_batches)        # per-caption work, once per caption
    S = score_all(model, enc_i, enc_t)               # (Ni, Nt) float32, rows images, columns captions

Contract on encoded dataclasses (`EncodedImages`, `EncodedTexts` of any model): every tensor field has the item
axis first (dim 0), so `enc[a:b]` slices all fields together; fields with a padded token / region axis have it
at dim 1 and pad with zeros; fields whose name contains "mask" are bool and pad with False. `cat_encoded`
relies on exactly this. Plain tensors (item axis first) are accepted wherever an encoded dataclass is.

Blocks: `score_all` calls `model.score(enc_i[i0:i1], enc_t[t0:t1])` once per block of Bi images x Bt captions
and writes into a preallocated output; peak working memory is one block, independent of the gallery size,
apart from the output matrix. With `memory_budget_mb` (default 512 MB), the block is sized from
`model.pair_bytes(enc_i[:1], enc_t[:1])` (bytes of working memory per image-caption pair; every tvrn model
has it) when the model offers it; otherwise the given block sizes are used (`memory_budget_mb=None` forces
them). A model with `score_groups_by_length = True` (TVRN, SGRAF, SCAN: their fast paths drop padded words)
has its captions visited sorted by length (the output columns stay in the gallery's order); when its caption
encodings have `trim(n)` and prefix masks, caption blocks are also cut where the length changes and trimmed to
it (each `score` call sees captions of one length and no padding), and each block gets as many images as the
budget allows at its length (blocks of short captions hold more images). Other models (VSE) read contiguous
slices in gallery order. A pair's score must not depend on its block (DESIGN 6): the tests check
that blocked, reordered and single-block results agree.
"""
from __future__ import annotations

import dataclasses
import sys
import time
import weakref
from contextlib import nullcontext
from typing import Any, Iterable, Optional, Sequence

import torch
from torch import nn


def _pad_to(t: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Zero-pad (False for bool) every axis after the first up to `shape` (item axis kept)."""
    if tuple(t.shape[1:]) == tuple(shape[1:]):
        return t
    out = t.new_zeros((t.shape[0], *shape[1:]))
    out[tuple(slice(0, n) for n in t.shape)] = t
    return out


def _cat_tensors(ts: Sequence[torch.Tensor]) -> torch.Tensor:
    dims = {t.dim() for t in ts}
    if len(dims) != 1:
        raise ValueError(f"cannot concatenate tensors of different ranks {sorted(dims)}")
    if ts[0].dim() == 0:
        raise ValueError("encoded tensor fields must have an item axis first, got a 0-d tensor")
    shape = [max(t.shape[d] for t in ts) for d in range(ts[0].dim())]
    return torch.cat([_pad_to(t, shape) for t in ts], 0)


def cat_encoded(items: Sequence[Any]) -> Any:
    """Concatenate encoded dataclasses (or tensors) along the item axis (dim 0).

    Tensor fields are padded on every later axis to the longest (zeros; False for bool "*mask*" fields) and
    concatenated; None fields stay None (all must be None); other fields must be equal and are kept.
    Dataclasses always go through this generic padding path (a class's own `cat`, which may require equal
    token counts, is not used); other objects must provide `cat(items)`. Padded positions hold zeros: models
    must ignore them through their masks (per-batch token counts differ when batches are trimmed).
    """
    items = list(items)
    if not items:
        raise ValueError("nothing to concatenate")
    first = items[0]
    if len(items) == 1:
        return first
    if isinstance(first, torch.Tensor):
        return _cat_tensors(items)
    if not dataclasses.is_dataclass(first):
        if callable(getattr(type(first), "cat", None)):
            return type(first).cat(items)
        raise TypeError(f"cat_encoded expects tensors, dataclasses or a class with cat(), got {type(first).__name__}")
    changes = {}
    for f in dataclasses.fields(first):
        vals = [getattr(x, f.name) for x in items]
        if all(v is None for v in vals):
            continue
        if any(v is None for v in vals):
            raise ValueError(f"field {f.name!r} is None in some encoded items and not in others")
        if isinstance(vals[0], torch.Tensor):
            changes[f.name] = _cat_tensors(vals)
        elif any(v != vals[0] for v in vals[1:]):
            raise ValueError(f"non-tensor field {f.name!r} differs between encoded items")
    return dataclasses.replace(first, **changes)


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _autocast(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None or dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class _eval_mode:
    """Put a module in eval mode for the duration of a block, restoring its previous mode."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.was_training = model, model.training

    def __enter__(self) -> None:
        self.model.eval()

    def __exit__(self, *exc) -> None:
        self.model.train(self.was_training)


def _encode(fn, batches: Iterable[Any], device, out_device, autocast_dtype, progress, desc) -> Any:
    outs = []
    it = batches
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(batches, desc=desc, file=sys.stderr, unit="batch")
    with torch.no_grad(), _autocast(device, autocast_dtype):
        for batch in it:
            enc = fn(batch.to(device))
            outs.append(enc.to(out_device) if out_device is not None else enc)
    return cat_encoded(outs)


def encode_images(
    model: nn.Module,
    image_batches: Iterable[Any],
    device: Optional[torch.device | str] = None,
    out_device: Optional[torch.device | str] = None,
    autocast_dtype: Optional[torch.dtype] = None,
    progress: bool = False,
) -> Any:
    """Run model.encode_image over ImageBatches in order (eval mode, no grad) -> one EncodedImages (N_img items).

    device: where to compute (default: the model's device); out_device: where to keep the result (default: the
    compute device; "cpu" for galleries larger than accelerator memory).
    """
    device = torch.device(device) if device is not None else _model_device(model)
    with _eval_mode(model):
        return _encode(model.encode_image, image_batches, device, out_device, autocast_dtype, progress, "images")


def encode_texts(
    model: nn.Module,
    text_batches: Iterable[Any],
    device: Optional[torch.device | str] = None,
    out_device: Optional[torch.device | str] = None,
    autocast_dtype: Optional[torch.dtype] = None,
    progress: bool = False,
) -> Any:
    """Run model.encode_text over TextBatches in order (eval mode, no grad) -> one EncodedTexts (N_caps items)."""
    device = torch.device(device) if device is not None else _model_device(model)
    with _eval_mode(model):
        return _encode(model.encode_text, text_batches, device, out_device, autocast_dtype, progress, "captions")


def _pairs_per_block(model: nn.Module, enc_images: Any, enc_texts: Any, memory_budget_mb: Optional[float]) -> Optional[int]:
    """Image-caption pairs that fit the memory budget (the model's `preferred_budget_mb` caps it), from
    `model.pair_bytes(enc_images[:1], enc_texts[:1])`; None without a budget or without `pair_bytes`."""
    pair_bytes = getattr(model, "pair_bytes", None)
    if memory_budget_mb is None or pair_bytes is None or len(enc_images) == 0 or len(enc_texts) == 0:
        return None
    pref_mb = getattr(model, "preferred_budget_mb", None)  # block memory beyond which the model gains nothing
    if pref_mb is not None:
        memory_budget_mb = min(memory_budget_mb, pref_mb)
    per_pair = max(1, int(pair_bytes(enc_images[:1], enc_texts[:1])))
    return max(1, int(memory_budget_mb * 2**20) // per_pair)


def anchor_group(model: nn.Module, enc_texts: Any) -> Optional[int]:
    """Images per block when the model refines each caption against its block's first image (TVRN with
    refine_against="first_image", the published computation) and the captions are not refined yet; else None.
    score_all then scores image chunks of exactly this many images, starting at its multiples (the authors'
    evaluation shards), so that a score does not depend on the memory budget."""
    group = getattr(model, "anchor_group", None)
    return group if group and getattr(enc_texts, "anchored", None) is None else None


def _max_block_images(model: nn.Module, ni: int, block_images: int) -> int:
    pref = getattr(model, "preferred_block", None)  # (Bi, Bt) at which the model runs fastest (cache sizes)
    return ni if pref is None else min(block_images, pref[0])


def plan_blocks(
    model: nn.Module,
    enc_images: Any,
    enc_texts: Any,
    block_images: int = 128,
    block_texts: int = 1024,
    memory_budget_mb: Optional[float] = None,
) -> tuple[int, int]:
    """Block sizes (Bi, Bt) for score_all.

    Without a budget, or when the model has no `pair_bytes`, the given sizes (clipped to the gallery).
    With both, Bt = min(block_texts, Nt, pairs) and Bi = pairs // Bt, where pairs = budget / pair_bytes.
    A model's `preferred_block = (Bi, Bt)` caps the given sizes (SCAN: small blocks keep its elementwise work
    in cache), and its `preferred_budget_mb` caps the budget (SGRAF: larger blocks are slower).
    A model with `score_groups_by_length = True` (TVRN / SGRAF: it scores each caption length separately)
    also caps Bt at the mean number of captions per distinct length; score_all then cuts its caption blocks
    at length boundaries and gives each block of n-word captions as many images as the budget allows at n.
    """
    ni, nt = len(enc_images), len(enc_texts)
    bi, bt = max(1, min(block_images, ni)), max(1, min(block_texts, nt))
    pairs = _pairs_per_block(model, enc_images, enc_texts, memory_budget_mb)
    group = anchor_group(model, enc_texts)
    if group is not None:  # image chunks fixed by the model; the budget sizes the caption blocks
        bi = min(group, ni)
        return bi, bt if pairs is None else max(1, min(block_texts, nt, pairs // bi))
    if pairs is None:
        return bi, bt
    pref = getattr(model, "preferred_block", None)
    if pref is not None:
        block_texts = min(block_texts, pref[1])
    bt = max(1, min(block_texts, nt, pairs))
    mask = getattr(enc_texts, "mask", None)
    if getattr(model, "score_groups_by_length", False) and isinstance(mask, torch.Tensor) and mask.dim() == 2:
        per_length = -(-nt // len(torch.unique(mask.sum(1))))  # mean captions per distinct length, rounded up
        bt = max(1, min(bt, max(per_length, -(-pairs // ni))))  # never so few captions that images run out
    bi = max(1, min(ni, _max_block_images(model, ni, block_images), pairs // bt))
    return bi, bt


def _prefix_lengths(enc_texts: Any) -> Optional[torch.Tensor]:
    """(Nt,) caption lengths (CPU) when every caption has words and its (Nt, L) `mask` is a prefix of True, so that
    cutting a block to its longest caption keeps every word; else None."""
    mask = getattr(enc_texts, "mask", None)
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[0] == 0:
        return None
    mask = mask.cpu()
    lengths = mask.sum(1)
    if int(lengths.min()) == 0 or not torch.equal(torch.arange(mask.shape[1])[None] < lengths[:, None], mask):
        return None
    return lengths


def trim_lengths(model: nn.Module, enc_texts: Any) -> Optional[torch.Tensor]:
    """(Nt,) caption lengths when captions may be cut to their length before `model.score`: the model drops
    padded words (`score_groups_by_length`), the encodings have `trim(n)`, and every mask is a non-empty prefix;
    else None. Used by score_all's schedule and by two-stage re-ranking."""
    if not getattr(model, "score_groups_by_length", False) or not callable(getattr(enc_texts, "trim", None)):
        return None
    return _prefix_lengths(enc_texts)


def _caption_blocks(nt: int, bt: int, lengths: Optional[torch.Tensor]) -> list[tuple[int, int]]:
    """Blocks [(p0, p1)] of positions in visiting order, at most bt captions each; with `lengths` (in visiting
    order, sorted) no block crosses a change of length, and a run of one length is split into equal blocks (a run
    of bt + 2 captions gives two blocks of bt / 2 + 1, not bt and 2: no block of a few captions)."""
    if lengths is None:
        return [(p0, min(p0 + bt, nt)) for p0 in range(0, nt, bt)]
    change = (torch.nonzero(lengths[1:] != lengths[:-1]).reshape(-1) + 1).tolist()
    blocks = []
    for r0, r1 in zip([0] + change, change + [nt]):  # runs of one length
        k = -(-(r1 - r0) // bt)  # blocks in this run
        cuts = [r0 + (r1 - r0) * j // k for j in range(k + 1)]
        blocks.extend(zip(cuts[:-1], cuts[1:]))
    return blocks


def _length_order(enc_texts: Any) -> Optional[torch.Tensor]:
    """Captions sorted by length (stable) -> (Nt,) long, or None if unsorted order is as good / no word mask."""
    mask = getattr(enc_texts, "mask", None)
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return None
    lengths = mask.sum(1).cpu()  # (Nt,)
    if bool((lengths[1:] >= lengths[:-1]).all()):
        return None  # already sorted: contiguous slices, no gather
    return torch.sort(lengths, stable=True).indices


def block_plan(
    model: nn.Module,
    enc_images: Any,
    enc_texts: Any,
    block_images: int = 128,
    block_texts: int = 1024,
    memory_budget_mb: Optional[float] = 512.0,
) -> tuple[Optional[torch.Tensor], list[tuple[int, int, Optional[int], int]]]:
    """score_all's schedule -> (order, plan): `order` (Nt,) the caption visiting order (None: gallery order);
    `plan` [(p0, p1, n, Bi)]: captions order[p0:p1] form one block, cut to n words (None: not cut), scored against
    chunks of Bi images. Blocks are sized by `plan_blocks`; for length-grouping models see the module docstring.
    """
    ni, nt = len(enc_images), len(enc_texts)
    bi, bt = plan_blocks(model, enc_images, enc_texts, block_images, block_texts, memory_budget_mb)
    # (Nt,) caption visiting order, or None (gallery order): sorting (a gather of every caption field) only pays
    # for models that drop padded words; the others (VSE) read contiguous slices
    order = _length_order(enc_texts) if getattr(model, "score_groups_by_length", False) else None
    lengths = trim_lengths(model, enc_texts)  # when set, blocks are cut at length changes and trimmed
    if lengths is not None and order is not None:
        lengths = lengths[order]  # in visiting order
    plan = []  # (p0, p1, n or None, Bi): caption positions in visiting order, their length, images per block
    for p0, p1 in _caption_blocks(nt, bt, lengths):
        n, bi_block = None if lengths is None else int(lengths[p0]), bi
        if n is not None and anchor_group(model, enc_texts) is None:  # captions of one length n: cut to n words
            # and fill the budget at n
            first = int(order[p0]) if order is not None else p0
            pairs = _pairs_per_block(model, enc_images, enc_texts[first].trim(n), memory_budget_mb)
            if pairs is not None:
                bi_block = max(1, min(ni, _max_block_images(model, ni, block_images), pairs // (p1 - p0)))
        plan.append((p0, p1, n, bi_block))
    return order, plan


def plan_units(plan: Sequence[tuple[int, int, Optional[int], int]], ni: int) -> list[tuple[int, int, int]]:
    """score_all's work units, in the order it scores them -> [(entry, i0, i1)]: caption block `plan[entry]`
    against images i0:i1 (chunks of that entry's Bi)."""
    return [(e, i0, min(i0 + bi, ni)) for e, (_, _, _, bi) in enumerate(plan) for i0 in range(0, ni, bi)]


def shard_units(units: Sequence[tuple[int, int, int]], plan: Sequence[tuple[int, int, Optional[int], int]],
                rank: int, world: int) -> list[tuple[int, int, int]]:
    """Rank `rank`'s share of `units` (of `plan_units`): a contiguous run, balanced by cost (pairs x caption
    words), so every unit belongs to exactly one of the `world` ranks."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in [0, {world})")
    cost = [(i1 - i0) * (plan[e][1] - plan[e][0]) * (plan[e][2] or 1) for e, i0, i1 in units]
    total, acc, mine = sum(cost), 0, []
    for unit, c in zip(units, cost):
        owner = min(world - 1, int((acc + c / 2) * world // total)) if total else 0  # by the unit's midpoint
        acc += c
        if owner == rank:
            mine.append(unit)
    return mine


def score_all(
    model: nn.Module,
    enc_images: Any,
    enc_texts: Any,
    block_images: int = 128,
    block_texts: int = 1024,
    memory_budget_mb: Optional[float] = 512.0,
    device: Optional[torch.device | str] = None,
    out_device: torch.device | str = "cpu",
    autocast_dtype: Optional[torch.dtype] = None,
    progress: bool = False,
    out_dtype: torch.dtype = torch.float32,
    shard: Optional[tuple[int, int]] = None,
) -> torch.Tensor:
    """Score every image against every caption -> (Ni, Nt) `out_dtype` (float32) on `out_device` (default CPU).

    enc_images: EncodedImages (Ni items); enc_texts: EncodedTexts (Nt items), from encode_images / encode_texts.
    Blocks of Bi x Bt pairs (see plan_blocks) are moved to `device` (default: the model's device), scored with
    model.score under no_grad in eval mode, optionally under autocast(autocast_dtype), and written into the
    preallocated output. Loops run over blocks only, never over single images or captions.

    shard=(rank, world): score only this rank's share of the work units (`shard_units`: a contiguous,
    cost-balanced run of (caption block, image chunk) pairs of the whole gallery's plan); every other entry of
    the returned matrix is 0. Each unit is the very block a single process scores, with the same shapes, so the
    sum of the `world` shards is the single-process matrix bit for bit (pipeline.score_split under torchrun).
    """
    device = torch.device(device) if device is not None else _model_device(model)
    ni, nt = len(enc_images), len(enc_texts)
    out = (torch.empty if shard is None else torch.zeros)((ni, nt), dtype=out_dtype, device=out_device)
    if ni == 0 or nt == 0:
        return out
    order, plan = block_plan(model, enc_images, enc_texts, block_images, block_texts, memory_budget_mb)
    units = plan_units(plan, ni)
    if shard is not None:
        units = shard_units(units, plan, *shard)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(units), desc="scoring", unit="block", file=sys.stderr)
    try:
        with torch.no_grad(), _eval_mode(model), _autocast(device, autocast_dtype):
            # captions outer: a block of captions is gathered (length order) and moved once, then scored against
            # every chunk of images of its units (slices of the encodings: views, no copies)
            entry, txts, out_cols = None, None, None
            for e, i0, i1 in units:
                p0, p1, n, _ = plan[e]
                if e != entry:
                    entry, txts = e, None  # free the last block's captions before gathering this one's
                    cols = order[p0:p1] if order is not None else None  # (Bt,) gallery columns
                    src = enc_texts if n is None else enc_texts.trim(n)  # trim: views of the gallery's encodings
                    txts = src[p0:p1] if cols is None else src[cols]  # Bt captions (a gather copies them)
                    if n is not None and cols is None and callable(getattr(txts, "contiguous", None)):
                        txts = txts.contiguous()
                    txts = txts.to(device)
                    out_cols = None if cols is None else cols.to(out.device)
                imgs = enc_images[i0:i1].to(device)  # Bi images
                block = model.score(imgs, txts)  # (Bi, Bt)
                if block.shape != (len(imgs), len(txts)):
                    raise ValueError(
                        f"model.score returned {tuple(block.shape)} for {len(imgs)} images x {len(txts)} captions"
                    )
                if out_cols is None:
                    out[i0:i1, p0:p1] = block.to(out.device, out.dtype)
                else:
                    out[i0:i1].index_copy_(1, out_cols, block.to(out.device, out.dtype))
                del imgs, block
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return out


# ---------------------------------------------------------------------------------------------------- training
def _tensor_fields(enc: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(enc) if isinstance(getattr(enc, f.name), torch.Tensor)]


class _TrainSpec:
    """What _TrainScores needs besides its tensor inputs: the model, the encodings' field layout, the budget."""

    def __init__(self, model, enc_images, enc_texts, memory_budget_mb: float, n_params: int) -> None:
        self.model, self.budget_mb, self.n_params = model, float(memory_budget_mb), n_params
        self.templates = (enc_images, enc_texts)
        self.names = (_tensor_fields(enc_images), _tensor_fields(enc_texts))

    def flatten(self, enc_images, enc_texts) -> list[torch.Tensor]:
        return [getattr(enc_images, n) for n in self.names[0]] + [getattr(enc_texts, n) for n in self.names[1]]

    def unflatten(self, tensors) -> tuple[Any, Any]:
        ni = len(self.names[0])
        img = dataclasses.replace(self.templates[0], **dict(zip(self.names[0], tensors[:ni])))
        txt = dataclasses.replace(self.templates[1], **dict(zip(self.names[1], tensors[ni:ni + len(self.names[1])])))
        return img, txt


_PAIR_BYTES: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _layout_key(enc: Any) -> tuple:
    return tuple((n, tuple(getattr(enc, n).shape[1:]), getattr(enc, n).dtype) for n in _tensor_fields(enc))


def train_pair_bytes(model: nn.Module, enc_images: Any, enc_texts: Any) -> int:
    """Bytes per pair that `model.score_pairs` keeps for backward, measured on the pair (enc_images[0],
    enc_texts[0]) (captions cut to the length to plan for): its gathered inputs and every tensor autograd saves
    (parameters excluded), doubled for the backward's own temporaries. Cached per model and field shapes."""
    cache = _PAIR_BYTES.setdefault(model, {})
    key = (_layout_key(enc_images), _layout_key(enc_texts))
    if key not in cache:
        cache[key] = _measure_pair_bytes(model, enc_images, enc_texts)
    return cache[key]


def _measure_pair_bytes(model: nn.Module, enc_images: Any, enc_texts: Any) -> int:
    return _measure_saved_bytes(lambda i, t: model.score_pairs(i, t), model, enc_images[:1], enc_texts[:1])


def _measure_saved_bytes(score, model: nn.Module, enc_images: Any, enc_texts: Any) -> int:
    """Twice the bytes of score(images, texts)'s inputs (cloned, as gathered leaves) and of every tensor autograd
    saves for its backward, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def keep(t: torch.Tensor) -> None:
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            storages[st.data_ptr()] = st.nbytes()

    def pack(t: torch.Tensor) -> torch.Tensor:
        keep(t)
        return t

    img = dataclasses.replace(enc_images, **{n: getattr(enc_images, n).detach().clone() for n in _tensor_fields(enc_images)})
    txt = dataclasses.replace(enc_texts, **{n: getattr(enc_texts, n).detach().clone() for n in _tensor_fields(enc_texts)})
    for enc in (img, txt):
        for n in _tensor_fields(enc):
            t = getattr(enc, n)
            keep(t)
            if t.is_floating_point():
                t.requires_grad_(True)
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        score(img, txt)
    return 2 * sum(storages.values())


def _gathered_leaf(t: torch.Tensor, idx: torch.Tensor, needs_grad: bool) -> torch.Tensor:
    x = t.detach().index_select(0, idx)  # (P, ...) copies of the pairs' rows
    return x.requires_grad_(needs_grad and x.is_floating_point())


def _float_dtype(tensors) -> torch.dtype:
    """The widest floating dtype among the encodings (float64 models score in float64)."""
    dtypes = [t.dtype for t in tensors if t.is_floating_point()]
    return torch.float64 if torch.float64 in dtypes else torch.float32


# what the last backward of score_all_train did: pairs recomputed (of Ni x Nt), chunks, seconds (for benchmarks
# and logs; one process-wide record)
LAST_TRAIN_BACKWARD: dict[str, float] = {}


# a caption length whose pairs with a non-zero gradient are at least this share of its (Ni, n_g) grid is recomputed
# as whole grid blocks through `model.score_grid` (when the model has it) rather than pair by pair: per pair, the grid
# formulation's forward and backward cost about a fifth of score_pairs' on gathered pairs (TVRN at paper shapes)
GRID_DENSITY = 0.25

# on the CPU, the training forward's blocks and the recomputation's chunks are at most this many MB however large
# the budget: score_grid's forward + backward runs at 1,100-1,250 pairs/s for blocks of 64-1,024 pairs and
# 750-940 for 2,048-4,096 (TVRN as published, paper shapes, 2 threads: caches); a larger budget still lets a
# dense batch keep its whole graph (score_all_train)
CPU_BLOCK_MB = 512.0


def _block_mb(budget_mb: float, device: torch.device) -> float:
    return min(budget_mb, CPU_BLOCK_MB) if device.type == "cpu" else budget_mb


def train_grid_bytes(model: nn.Module, enc_images: Any, enc_texts: Any, ni: int = 1, nt: int = 1) -> int:
    """Bytes that `model.score_grid` keeps for backward on a block of ni images x nt captions of enc_texts' length
    (captions cut to it): d + a ni + b nt + c ni nt, with the fixed (d), per-image (a), per-caption (b) and
    per-pair (c) parts solved from the bytes measured on 2 x 2, 3 x 2, 2 x 3 and 3 x 3 grids of enc_images[:3] and
    enc_texts[:3] (inputs and every tensor autograd saves, parameters excluded, doubled for the backward's own
    temporaries). Per pair (c) it is about a third of what a 2 x 2 grid keeps per pair at paper shapes: the image
    side is shared by every caption of a block. Cached per model and field shapes."""
    d, a, b, c = _grid_cost(model, enc_images, enc_texts)
    return d + a * ni + b * nt + c * ni * nt


def _grid_cost(model: nn.Module, enc_images: Any, enc_texts: Any) -> tuple[int, int, int, int]:
    cache = _PAIR_BYTES.setdefault(model, {})
    key = ("grid", _layout_key(enc_images), _layout_key(enc_texts))
    if key not in cache:
        def saved(i: int, t: int) -> int:
            return _measure_saved_bytes(lambda x, y: model.score_grid(x, y), model, enc_images[:i], enc_texts[:t])

        if len(enc_images) < 2 or len(enc_texts) < 2:  # one side of one: everything counted per pair
            ki, kt = min(2, len(enc_images)), min(2, len(enc_texts))
            cache[key] = (0, 0, 0, -(-saved(ki, kt) // (ki * kt)))
        else:  # blocks of 2-3 (1-2 when fewer): a side of one can make views where larger blocks copy
            i0, t0 = (2 if len(enc_images) > 2 else 1), (2 if len(enc_texts) > 2 else 1)
            f00, f10, f01, f11 = saved(i0, t0), saved(i0 + 1, t0), saved(i0, t0 + 1), saved(i0 + 1, t0 + 1)
            c = max(1, f11 - f10 - f01 + f00)
            a, b = max(0, f10 - f00 - c * t0), max(0, f01 - f00 - c * i0)
            cache[key] = (max(0, f00 - a * i0 - b * t0 - c * i0 * t0), a, b, c)
    return cache[key]


def grid_blocks(model: nn.Module, enc_images: Any, enc_texts: Any, ni: int, nt: int,
                budget_bytes: float) -> tuple[int, int]:
    """(bi, bt): the largest block of images x captions (bt captions first, up to nt; then bi images, up to ni)
    whose `train_grid_bytes` fits budget_bytes; at least 1 x 1."""
    d, a, b, c = _grid_cost(model, enc_images, enc_texts)
    bt = int(min(nt, max(1, (budget_bytes - d - a) // (b + c))))
    bi = int(min(ni, max(1, (budget_bytes - d - b * bt) // (a + c * bt))))
    return bi, bt


class _TrainScores(torch.autograd.Function):
    """S = all-pairs scores of a training batch, differentiable in the encodings and the pair-work parameters.

    forward: `score_all` (the inference fast path, blocks sized to the budget, no graph kept).
    backward(G = dL/dS): only pairs with G != 0 contribute to any gradient (with the hardest-negative loss that is
    the diagonal and about two negatives per row and column); they are recomputed in chunks of one caption length
    (cut to it: no padded word), as many pairs per chunk as the budget allows, and back-propagated chunk by
    chunk. Sparse lengths go pair by pair through `model.score_pairs` (the plain equations, one pair axis, on
    gathered pairs; `train_pair_bytes`); a length whose gradient is dense (at least GRID_DENSITY of its pairs:
    sum / published losses early in training) goes as (images x captions) blocks through `model.score_grid`
    when the model has one (the fast path's formulation, differentiable; `train_grid_bytes`). Gradients of the
    encodings are accumulated by index; the encoders' own backward follows in the caller's graph.
    """

    @staticmethod
    def forward(ctx, spec: _TrainSpec, *tensors):
        enc_i, enc_t = spec.unflatten(tensors)
        device = enc_i.mask.device
        ctx.spec, ctx.device_type = spec, device.type
        ctx.autocast = (torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))
        ctx.save_for_backward(*tensors)
        dtype = _float_dtype(tensors)
        return score_all(spec.model, spec.model.inference_encodings(enc_i), enc_t,
                         memory_budget_mb=_block_mb(spec.budget_mb, device), device=device, out_device=device,
                         out_dtype=dtype)

    @staticmethod
    def backward(ctx, G):
        t0 = time.perf_counter()
        spec, tensors = ctx.spec, ctx.saved_tensors
        model, n_enc = spec.model, len(tensors) - spec.n_params
        enc_i, enc_t = spec.unflatten(tensors)
        params = tensors[n_enc:]
        needs = ctx.needs_input_grad[1:]  # per tensor input (the spec comes first)
        names_i, names_t = spec.names
        need_i = {n: needs[k] for k, n in enumerate(names_i)}
        need_t = {n: needs[len(names_i) + k] for k, n in enumerate(names_t)}
        acc_i = {n: torch.zeros_like(getattr(enc_i, n)) for n in names_i if need_i[n]}
        acc_t = {n: torch.zeros_like(getattr(enc_t, n)) for n in names_t if need_t[n]}
        acc_p: list[Optional[torch.Tensor]] = [None] * len(params)
        autocast = torch.autocast(ctx.device_type, dtype=ctx.autocast[1]) if ctx.autocast[0] else nullcontext()

        def recompute(score, txt_src, ci, cj, g_out):
            """Leaves gathered from enc_i rows ci (Bi,) and txt_src rows cj (Bt,); s = score(img, txt);
            back-propagate g_out (s's shape) and add the gradients into acc_i, acc_t, acc_p."""
            with torch.enable_grad(), autocast:
                img = dataclasses.replace(enc_i, **{k: _gathered_leaf(getattr(enc_i, k), ci, need_i[k]) for k in names_i})
                txt = dataclasses.replace(txt_src, **{k: _gathered_leaf(getattr(txt_src, k), cj, need_t[k])
                                                      for k in names_t})
                s = score(img, txt)
                leaves = [(acc_i[k], getattr(img, k), ci) for k in acc_i] + [(acc_t[k], getattr(txt, k), cj) for k in acc_t]
                wrt = [x for _, x, _ in leaves] + [p for p, nd in zip(params, needs[n_enc:]) if nd]
                grads = torch.autograd.grad(s, wrt, g_out.to(s.dtype), allow_unused=True)
            for (acc, x, idx), g in zip(leaves, grads):
                if g is not None:
                    target = acc if x.shape[1:] == acc.shape[1:] else acc[:, :x.shape[1]]  # cut captions
                    target.index_add_(0, idx, g.to(acc.dtype))
            pg = iter(grads[len(leaves):])
            for k, nd in enumerate(needs[n_enc:]):
                if nd:
                    g = next(pg)
                    if g is not None:
                        acc_p[k] = g if acc_p[k] is None else acc_p[k].add_(g)

        G = G.detach()
        nonzero = G != 0  # (Ni, Nt)
        lengths = trim_lengths(model, enc_t)  # (Nt,) CPU, or None: captions are not cut
        ni, budget, chunks, grid_pairs = len(enc_i), _block_mb(spec.budget_mb, G.device) * 2**20, 0, 0
        if lengths is not None and callable(getattr(model, "score_grid", None)):
            lengths_dev = lengths.to(G.device)
            for n in torch.unique(lengths).tolist():  # dense lengths: whole (images x captions) blocks
                cols = torch.nonzero(lengths_dev == n).reshape(-1)  # (n_g,)
                if int(nonzero[:, cols].sum()) < GRID_DENSITY * ni * len(cols):
                    continue
                txt_src = enc_t.trim(n)
                with autocast:
                    bi, bt = grid_blocks(model, enc_i, txt_src[cols[:3]], ni, len(cols), budget)
                for c0 in range(0, len(cols), bt):
                    cj = cols[c0:c0 + bt]
                    for i0 in range(0, ni, bi):
                        ci = torch.arange(i0, min(ni, i0 + bi), device=cj.device)
                        recompute(model.score_grid, txt_src, ci, cj, G[ci][:, cj])
                        chunks += 1
                grid_pairs += ni * len(cols)
                nonzero[:, cols] = False  # done
        ii, jj = torch.nonzero(nonzero, as_tuple=True)  # (Q,) the remaining pairs with a gradient
        zero = len(ii) == 0 and grid_pairs == 0
        if zero:  # one pair with a zero gradient: the pair-work parameters still get (zero) gradients, as DDP expects
            ii, jj = ii.new_zeros(1), jj.new_zeros(1)
        if lengths is not None:
            lengths = lengths.to(ii.device)
            order = torch.sort(lengths[jj] * ni + ii, stable=True).indices  # by caption length, then image
            ii, jj = ii[order], jj[order]
            run_len = lengths[jj].cpu()
        q, per_length = 0, {}
        while q < len(ii):
            n = None if lengths is None else int(run_len[q])
            end = len(ii) if lengths is None else int(torch.searchsorted(run_len, n, right=True))
            txt_src = enc_t if n is None else enc_t.trim(n)
            if n not in per_length:  # measured under the forward's autocast, as the recomputation runs
                with autocast:
                    per_length[n] = max(1, int(budget // max(1, train_pair_bytes(model, enc_i, txt_src))))
            for c0 in range(q, end, per_length[n]):
                ci, cj = ii[c0:min(end, c0 + per_length[n])], jj[c0:min(end, c0 + per_length[n])]
                recompute(model.score_pairs, txt_src, ci, cj, G.new_zeros(len(ci)) if zero else G[ci, cj])
                chunks += 1
            q = end
        out_i = [acc_i.get(n) for n in names_i]
        out_t = [acc_t.get(n) for n in names_t]
        LAST_TRAIN_BACKWARD.update(pairs=grid_pairs + (0 if zero else len(ii)), of=G.numel(), chunks=chunks,
                                   grid_pairs=grid_pairs, seconds=time.perf_counter() - t0)
        return (None, *out_i, *out_t, *acc_p)


def _kept_bytes(model: nn.Module, enc_images: Any, enc_texts: Any, grid: bool) -> Optional[int]:
    """What `score_by_length` keeps for backward: per caption length n_g, train_grid_bytes of the (Ni, n_g) block
    (grid) or Ni x n_g x train_pair_bytes (the plain path); None for the grid when the model has no score_grid or
    keeps padded words."""
    lengths = trim_lengths(model, enc_texts)
    if grid and (lengths is None or not callable(getattr(model, "score_grid", None))):
        return None
    ni = len(enc_images)
    if lengths is None:
        return ni * len(enc_texts) * train_pair_bytes(model, enc_images, enc_texts)
    total = 0
    for n, count in zip(*torch.unique(lengths, return_counts=True)):
        first = torch.nonzero(lengths == n).reshape(-1)[:3]  # a length's first captions, cut to it
        group = enc_texts[first.to(enc_texts.mask.device)].trim(int(n))
        total += (train_grid_bytes(model, enc_images, group, ni, int(count)) if grid
                  else ni * int(count) * train_pair_bytes(model, enc_images, group[:1]))
    return total


def score_by_length(model: nn.Module, enc_images: Any, enc_texts: Any, grid: bool = False) -> torch.Tensor:
    """model.score (Ni, Nt) with gradients, one call per caption length, captions cut to it (no padded words):
    the plain path for dense gradients; grid=True: model.score_grid per length (the fast path's formulation,
    differentiable; about a fifth of the plain path's work and memory per pair for TVRN). Models that keep
    padding (or odd masks) get one model.score call."""
    lengths = trim_lengths(model, enc_texts)
    if lengths is None:
        return model.score(enc_images, enc_texts)
    score = model.score_grid if grid else model.score
    lengths = lengths.to(enc_texts.mask.device)
    order = torch.sort(lengths, stable=True).indices  # (Nt,) captions by length
    cols, start = [], 0
    for n, count in zip(*torch.unique_consecutive(lengths[order], return_counts=True)):
        idx = order[start:start + int(count)]
        cols.append(score(enc_images, enc_texts[idx].trim(int(n))))  # (Ni, n_g)
        start += int(count)
    return torch.cat(cols, 1).index_select(1, torch.argsort(order))  # (Ni, Nt) in gallery order


def score_all_train(model: nn.Module, enc_images: Any, enc_texts: Any, memory_budget_mb: float = 512.0,
                    dense_gradient: bool = False) -> torch.Tensor:
    """All-pairs scores of a training batch -> (Ni, Nt), differentiable, in bounded memory.

    enc_images (Ni), enc_texts (Nt): encodings made with gradients (model.encode_image / encode_text in training
    mode). The forward is `score_all` (the fast path, blocks of `memory_budget_mb`); the backward recomputes
    only the pairs whose gradient is non-zero, through `model.score_pairs`, in chunks of `memory_budget_mb`
    (see _TrainScores). The scores equal `model.score(enc_images, enc_texts)` (the plain path) up to float
    rounding, and so do the gradients. Peak working memory: the budget, the encodings and their gradients,
    and the (Ni, Nt) matrix, whatever Ni and Nt.

    dense_gradient: the caller expects most pairs to get a gradient (sum / smooth / published losses early in
    training); then, if what autograd saves for all Ni x Nt pairs fits the budget, the pairs are scored once with
    their graph kept (`score_by_length`), which stores what the recomputation would redo: through
    `model.score_grid` when the model has one (TVRN, SGRAF), else through the plain path.
    """
    if dense_gradient:
        budget = memory_budget_mb * 2**20
        for grid in (True, False):
            need = _kept_bytes(model, enc_images, enc_texts, grid)
            if need is not None and need <= budget:
                return score_by_length(model, enc_images, enc_texts, grid=grid)
    params = [p for p in model.parameters() if p.requires_grad]
    spec = _TrainSpec(model, enc_images, enc_texts, memory_budget_mb, len(params))
    return _TrainScores.apply(spec, *spec.flatten(enc_images, enc_texts), *params)
