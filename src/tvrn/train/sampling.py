"""Training orders: hard-negative partners in the same batch.

A uniform shuffle rarely puts two images that differ only in what a model must learn (a swapped colour, a flipped
relation) in one batch, so the ranking loss rarely asks for it. With a partner map (each training image's
partner image, or -1) the order keeps the partners' captions next to each other: a batch then holds both.
"""
from __future__ import annotations

from collections import deque

import torch


def partner_order(caption_to_image, partner_of_image, seed: int, epoch: int) -> list[int]:
    """Every caption index once, in a random order that is a function of (seed, epoch) only, where each caption
    of an image with a partner is followed by a not yet placed caption of the partner image.

    caption_to_image (N_caps,), partner_of_image (N_img,) with -1 where there is none (symmetric maps pair
    both ways; either member placed first brings one caption of the other)."""
    img = torch.as_tensor(caption_to_image).long().tolist()
    partner = torch.as_tensor(partner_of_image).long().tolist()
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(len(img), generator=g).tolist()
    queues: dict[int, deque] = {}
    for c in perm:
        queues.setdefault(img[c], deque()).append(c)
    placed = [False] * len(img)
    out = []
    for c in perm:
        if placed[c]:
            continue
        out.append(c)
        placed[c] = True
        p = partner[img[c]]
        if p >= 0:
            q = queues.get(p, deque())
            while q and placed[q[0]]:
                q.popleft()
            if q:
                d = q.popleft()
                out.append(d)
                placed[d] = True
    return out


def shard_batches(order: list[int], batch_size: int, rank: int, world: int) -> list[int]:
    """Rank `rank`'s items: batch-sized blocks dealt round-robin (a block keeps its partners together), the last
    blocks wrapped around so that every rank gets as many items."""
    if world == 1:
        return order
    blocks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    per_rank = -(-len(blocks) // world)
    blocks += blocks[: per_rank * world - len(blocks)]
    return [c for b in blocks[rank::world] for c in b]
