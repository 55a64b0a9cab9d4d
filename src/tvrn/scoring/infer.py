"""The one routine that scores all pairs for evaluation and search: blocks of the plan, no gradients."""
from __future__ import annotations

import sys
from typing import Any, Optional

import torch
from torch import nn

from .encode import autocast, eval_mode, model_device
from .plan import block_plan, plan_units, shard_units


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
    device = torch.device(device) if device is not None else model_device(model)
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
        with torch.no_grad(), eval_mode(model), autocast(device, autocast_dtype):
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
