"""Scoring: the one routine that scores all pairs (evaluation and search), and its training counterpart.

    enc_i = encode_images(model, image_batches)      # per-image work, once per image
    enc_t = encode_texts(model, text_batches)        # per-caption work, once per caption
    S = score_all(model, enc_i, enc_t)               # (Ni, Nt) float32, rows images, columns captions

Contract on encoded dataclasses (`EncodedImages`, `EncodedTexts` of any model): every tensor field has the item
axis first (dim 0), so `enc[a:b]` slices all fields together; fields with a padded token / region axis have it
at dim 1 and pad with zeros; fields whose name contains "mask" are bool and pad with False.
`tvrn.tensors.cat_fields` relies on exactly this. Plain tensors (item axis first) are accepted wherever an encoded dataclass is.

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
slices in gallery order. A pair's score must not depend on its block (docs/scoring.md): the tests check
that blocked, reordered and single-block results agree.

Modules: `encode` (the encoders over batches), `plan` (block sizes, caption order, work units and shards),
`infer` (`score_all`), `train` (`score_all_train`, the budgeted training path).
"""
from .encode import encode_images, encode_texts
from .infer import score_all
from .plan import anchor_group, block_plan, plan_blocks, plan_units, shard_units, trim_lengths
from .train import (CPU_BLOCK_MB, GRID_DENSITY, LAST_TRAIN_BACKWARD, grid_blocks, score_all_train, score_by_length,
                    train_grid_bytes, train_pair_bytes)

__all__ = ["encode_images", "encode_texts", "score_all", "plan_blocks", "block_plan", "plan_units", "shard_units",
           "anchor_group", "trim_lengths", "score_all_train", "score_by_length", "train_pair_bytes",
           "train_grid_bytes", "grid_blocks", "LAST_TRAIN_BACKWARD", "CPU_BLOCK_MB", "GRID_DENSITY"]
