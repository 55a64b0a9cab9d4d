"""The training path's scores of a (B, B) batch in bounded memory: the fast forward without a graph, and in
backward the pairs whose gradient is non-zero recomputed through `model.score_pairs` in blocks (or, with a
dense gradient, the whole grid through `score_grid` with its graph kept when it fits the budget)."""
from __future__ import annotations

import dataclasses
import time
import weakref
from contextlib import nullcontext
from typing import Any, Optional

import torch
from torch import nn

from ..tensors import tensor_fields
from .infer import score_all
from .plan import trim_lengths


def _tensor_fields(enc: Any) -> list[str]:
    return list(tensor_fields(enc))


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
