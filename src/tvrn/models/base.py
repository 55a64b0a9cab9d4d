"""The one interface of every model, and the encoded-batch containers it passes around.

    enc_i = model.encode_image(images)   # per-image work, once per image
    enc_t = model.encode_text(texts)     # per-caption work, once per caption
    model.score(enc_i[i0:i1], enc_t[t0:t1])  # (Ni, Nt) pair work, rows images, columns captions
    model.pair_bytes(enc_i[:1], enc_t[:1])     # working bytes per pair of `score`, for memory-budgeted blocks

`score` has two paths that agree within float rounding (tests check it): a plain one, written like the
papers' equations, used when gradients are needed (training); and a fast one for inference (eval mode, no
grad) that groups captions by length (no padded words) and uses exact algebraic shortcuts.

Encoded containers (`tvrn.tensors.TensorFields`) hold only tensors whose first axis is the item axis (Ni or
Nt); fields a model does not compute are None. Slicing slices every field together; `.to(device)` moves them.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn as nn

from ..tensors import TensorFields
from ..scoring.train import score_all_train
from .config import ModelConfig
from .layers import l2norm, masked_mean


@dataclass
class EncodedImages(TensorFields):
    """Per-image work of Ni images.

    regions:   (Ni, R, D) content IRs V (unit length, padded rows zero)
    mask:      (Ni, R) bool real regions
    units:     (Ni, R', D) unified IRs U (R' = 2R with module 1, else U = V), or None
    units_mask:(Ni, R') bool
    units_gram:(Ni, R', R') U U^T (SCAN: V V^T), for ||sum_r a_r U_r|| without forming the attended vector; set
               only by encodings made without gradients (inference: the fast path reads it), else None
    glob:      (Ni, D) global IR g (TVRN / SGRAF) or pooled vector (VSE)
    gate:      (Ni, R') module-3 log-gates lambda * <U_r, g>, or None
    ctx_keys:  (Ni, R, D) Wk C, keys of module 2's attention, or None
    ctx_gates: (Ni, R, 3D) W_ih C, GRU input gates of the context IRs (module 2 shortcut), or None
    ctx_gram:  (Ni, R, R) C C^T, for ||sum_r a_r C_r|| (module 2 shortcut), or None
    """

    regions: torch.Tensor
    mask: torch.Tensor
    units: Optional[torch.Tensor] = None
    units_mask: Optional[torch.Tensor] = None
    units_gram: Optional[torch.Tensor] = None
    glob: Optional[torch.Tensor] = None
    gate: Optional[torch.Tensor] = None
    ctx_keys: Optional[torch.Tensor] = None
    ctx_gates: Optional[torch.Tensor] = None
    ctx_gram: Optional[torch.Tensor] = None


def state_dict_problems(state: dict, want: dict, source: str = "file", limit: Optional[int] = 6) -> list[str]:
    """What keeps `state` (tensors read from `source`: a file, a checkpoint) from loading into a model whose
    state dict is `want`: tensors it lacks, tensors the model does not have, shapes that differ; [] when it fits.
    At most `limit` names per kind (None: all)."""
    def listed(items):
        items = sorted(items)
        if limit is None or len(items) <= limit:
            return items
        return items[:limit] + [f"(and {len(items) - limit} more)"]

    shapes = [f"{k}: {source} {tuple(state[k].shape)}, model {tuple(want[k].shape)}" for k in want
              if k in state and tuple(state[k].shape) != tuple(want[k].shape)]
    out = []
    if set(want) - set(state):
        out.append(f"tensors the model needs that the {source} lacks: " + ", ".join(listed(set(want) - set(state))))
    if set(state) - set(want):
        out.append("tensors the model does not have: " + ", ".join(listed(set(state) - set(want))))
    if shapes:
        out.append("shapes that differ: " + "; ".join(listed(shapes)))
    return out


def gram(x: torch.Tensor) -> torch.Tensor:
    """(N, R, D) -> (N, R, R) x x^T per item."""
    return x @ x.transpose(1, 2)


def inference_gram(x: torch.Tensor) -> Optional[torch.Tensor]:
    """`gram(x)` for encodings made without gradients (only the inference fast paths read it), else None:
    training forwards do not pay for it."""
    return None if torch.is_grad_enabled() else gram(x)


WORD_AXIS_FIELDS = ("words", "mask", "ctx_queries", "refined", "refined_local", "drop_local", "anchored")  # dim 1: L


@dataclass
class EncodedTexts(TensorFields):
    """Per-caption work of Nt captions.

    words:      (Nt, L, D) content TRs T (unit length, padded rows zero)
    mask:       (Nt, L) bool real words
    glob:       (Nt, D) caption vector: t_glo when it is per caption (SGRAF), the shortlist vector (TVRN),
                or the pooled vector (VSE)
    ctx_queries:(Nt, L, D) Wq T_ctx, queries of module 2's attention, or None
    hidden:     (Nt, D) refinement GRU state after the caption's real words (module 2), or None
    refined:    (Nt, L, D) first half of the refined TRs, l2(z_t + T_t) (module 2), or None
    refined_local: (Nt, L, D) the text pooling's local embedding of `refined` (module 2), or None
    drop_local: (Nt, L, D) dropout keep-mask of the text pooling's local embedding of the second half of T_ref
                (per pair work), drawn once per caption in training; None in eval mode or without dropout
    drop_glob:  (Nt, D) dropout keep-mask of the text pooling's guide vector of the per-pair t_glo, or None
    anchored:   (Nt, L, D) second half of T_ref refined against one anchor image for every pair (TVRN with
                refine_against="first_image", the published computation: the first image of the block), or None
    anchored_glob: (Nt, D) t_glo of that refinement, or None
    """

    words: torch.Tensor
    mask: torch.Tensor
    glob: Optional[torch.Tensor] = None
    ctx_queries: Optional[torch.Tensor] = None
    hidden: Optional[torch.Tensor] = None
    refined: Optional[torch.Tensor] = None
    refined_local: Optional[torch.Tensor] = None
    drop_local: Optional[torch.Tensor] = None
    drop_glob: Optional[torch.Tensor] = None
    anchored: Optional[torch.Tensor] = None
    anchored_glob: Optional[torch.Tensor] = None

    def trim(self, n: int) -> "EncodedTexts":
        """Keep the first n word positions of every field with a word axis (dim 1)."""
        return replace(self, **{k: getattr(self, k)[:, :n] for k in WORD_AXIS_FIELDS
                                if getattr(self, k) is not None})

    def length_groups(self) -> Optional[list[tuple[torch.Tensor | slice, int]]]:
        """Captions grouped by length: [(indices (n_g,) long, or a slice when the group is contiguous, length)],
        or None when some mask is not a prefix of True (padding in the middle) or some caption is empty; then
        callers use the masked path. `tvrn.scoring.score_all` sorts captions by length, so groups are slices."""
        lengths = self.mask.sum(1)  # (Nt,)
        prefix = torch.arange(self.mask.shape[1], device=self.mask.device)[None] < lengths[:, None]  # (Nt, L)
        if len(self) == 0 or not torch.equal(prefix, self.mask) or int(lengths.min()) == 0:
            return None
        groups = []
        for n in torch.unique(lengths).tolist():
            idx = torch.nonzero(lengths == n).reshape(-1)  # (n_g,)
            i0, i1 = int(idx[0]), int(idx[-1]) + 1
            groups.append((slice(i0, i1) if i1 - i0 == len(idx) else idx, int(n)))
        return groups


def grid_layout(images: EncodedImages, texts: EncodedTexts) -> tuple[EncodedImages, EncodedTexts]:
    """Views for all pairs: image fields (Ni, 1, ...), caption fields (1, Nt, ...), so that code written for
    aligned pairs (leading axis P) broadcasts to the (Ni, Nt) grid. Not item-sliceable any more."""
    return images.map(lambda t: t[:, None]), texts.map(lambda t: t[None])


class RetrievalModel(nn.Module):
    """Base of every model: encode_image, encode_text, score (Ni, Nt); forward = the scores of a batch (bounded
    memory with gradients: `train_scores`).

    Models with pair work worth blocking (TVRN, SGRAF, SCAN) also define `score_pairs(images, texts) -> (P,)`,
    the plain equations for aligned pairs (images[p], texts[p]); the training path
    (`tvrn.scoring.score_all_train`) scores the whole (B, B) matrix with the fast inference path and, in
    backward, recomputes only the pairs whose gradient is non-zero through `score_pairs`.

    `encode_image(images, record=None)` and `score_pairs(images, texts, record=None)` take an optional dict that
    receives the intermediates the computation used (attention weights, gates, similarity nodes): what
    `tvrn.models.explain.explain_pairs(model, images, texts)` reads, so an explanation comes from the code that
    scores. None (the default, and every scoring call) records nothing and changes nothing.
    """

    config: ModelConfig
    blocked_training = True  # train_scores(..., memory_budget_mb=X) trains through score_all_train
    gathers_negatives = True  # tvrn.train.task.TrainingTask(..., gather=True) scores against every DDP rank's items

    def encode_image(self, images, record: Optional[dict] = None) -> EncodedImages:
        raise NotImplementedError

    def encode_text(self, texts) -> EncodedTexts:
        raise NotImplementedError

    def score(self, images: EncodedImages, texts: EncodedTexts) -> torch.Tensor:
        raise NotImplementedError

    def score_pairs(self, images: EncodedImages, texts: EncodedTexts, record: Optional[dict] = None) -> torch.Tensor:
        """(P,) scores of the aligned pairs (images[p], texts[p]); autograd-friendly. record: see the class doc."""
        raise NotImplementedError

    def inference_encodings(self, images: EncodedImages) -> EncodedImages:
        """Encodings made with gradients, plus the per-image fields only the inference fast path reads
        (computed here without gradients); identity by default."""
        return images

    def anchor_texts(self, images: EncodedImages, texts: EncodedTexts) -> EncodedTexts:
        """Caption encodings completed with any work that depends on the block's images as a whole rather than on
        each pair (TVRN's first-image refinement, refine_against="first_image": against images[0]); identity for
        every model whose scores are per pair. forward applies it to the whole batch before scoring."""
        return texts

    def train_scores(self, enc_i: EncodedImages, enc_t: EncodedTexts, memory_budget_mb: Optional[float] = 512.0,
                     dense_gradient: bool = False) -> torch.Tensor:
        """(Ni, Nt) scores of encodings made with gradients: with gradients enabled and a budget, through
        `tvrn.scoring.score_all_train` (pair work in blocks of `memory_budget_mb` of working memory, recomputed in
        backward where the gradient is non-zero; with dense_gradient the whole grid's graph kept when it fits);
        otherwise (no gradients, memory_budget_mb=None, or a model without blocked training) `score`, the plain
        path, which keeps the activations of every pair for backward."""
        if memory_budget_mb is not None and self.blocked_training and torch.is_grad_enabled():
            return score_all_train(self, enc_i, enc_t, memory_budget_mb=memory_budget_mb,
                                   dense_gradient=dense_gradient)
        return self.score(enc_i, enc_t)

    def forward(self, images, texts, return_shortlist: bool = False, memory_budget_mb: Optional[float] = 512.0,
                dense_gradient: bool = False):
        """ImageBatch (Ni), TextBatch (Nt) -> scores (Ni, Nt), the block's first-image work applied
        (`anchor_texts`); with return_shortlist also the (Ni, Nt) cosines of the shortlist embeddings.

        With gradients, the pair work is bounded: blocks of `memory_budget_mb` (`train_scores`); pass
        memory_budget_mb=None for the plain path, which keeps every pair's activations (a TVRN batch of 128 needs
        tens of GB then). Training steps go through `tvrn.train.task.TrainingTask`, which also chooses the dense
        path and gathers DDP negatives."""
        enc_i, enc_t = self.encode_image(images), self.encode_text(texts)
        enc_t = self.anchor_texts(enc_i, enc_t)  # the batch is one block
        scores = self.train_scores(enc_i, enc_t, memory_budget_mb, dense_gradient)
        if not return_shortlist:
            return scores
        short = self.shortlist_embed_image(enc_i) @ self.shortlist_embed_text(enc_t).t()  # (Ni, D) @ (D, Nt)
        return scores, short

    # ---------------------------------------------------------------- shortlist (two-stage search)
    def shortlist_embed_image(self, images: EncodedImages) -> torch.Tensor:
        """(Ni, D) unit pair-independent image vector; default: the l2 mean of the content IRs."""
        return l2norm(masked_mean(images.regions, images.mask))

    def shortlist_embed_text(self, texts: EncodedTexts) -> torch.Tensor:
        """(Nt, D) unit pair-independent caption vector; default: the l2 mean of the content TRs."""
        return l2norm(masked_mean(texts.words, texts.mask))
