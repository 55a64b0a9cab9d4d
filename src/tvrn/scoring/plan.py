"""score_all's schedule: block sizes from the memory budget, captions visited by length, work units and their
shares across ranks. Nothing here scores: the plan is a list of (caption block, image chunk) units."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import nn


def pairs_per_block(model: nn.Module, enc_images: Any, enc_texts: Any, memory_budget_mb: Optional[float]) -> Optional[int]:
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
    pairs = pairs_per_block(model, enc_images, enc_texts, memory_budget_mb)
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
            pairs = pairs_per_block(model, enc_images, enc_texts[first].trim(n), memory_budget_mb)
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
