"""The training task: what one step computes from a batch, as the module DDP wraps (open_clip's TrainingTask is
the pattern). The model stays a model (encoders and scorer); the policy of a training forward lives here: the
scorer path of the step (`ScorePath`: budgeted blocks with recomputation, or the graph kept when the gradient is
dense and it fits), the first-image anchoring of a block, and, under DDP, every rank's negatives.

    task = TrainingTask(model, memory_budget_mb=512, sparse_loss=True)
    scores = task(batch.images, batch.texts)                  # (B, B), rows images, columns captions
    rows, cols, offset = task(images, texts, gather=True)     # DDP: (b, N), (N, b), this rank's offset
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..distributed import gather_encoded
from ..models.base import RetrievalModel


class ScorePath:
    """Chooses, per step, how the model scores the (B, B) batch (tvrn.scoring.score_all_train): the fast forward
    with recomputation of the pairs that get a gradient, or, when most pairs get one and all of them fit the
    budget, the plain path (storing costs less than recomputing then). The gradient density of the last step
    (share of non-zero dL/dS) decides; before the first step, the loss: the hardest-negative loss gives at most
    3B non-zero entries, the sum and smooth losses nearly B^2 from a random start.

    budget_mb None: the model's forward without a budget (the plain path, or a model without blocked training).
    """

    DENSE = 0.3  # density above which the plain path is taken when it fits: on the synthetic benchmark's demo
                 # sizes recomputation breaks even with storing at 0.35-0.47 (TVRN, SCAN) of the pairs

    def __init__(self, budget_mb: Optional[float], sparse_loss: bool) -> None:
        self.budget_mb, self.sparse_loss = budget_mb, sparse_loss
        self.density: Optional[float] = None

    def forward_kwargs(self, warmup: bool) -> dict:
        """Keyword arguments of `RetrievalModel.train_scores` for this step (warmup: the sum loss of train.sum_loss_epochs)."""
        if self.budget_mb is None:
            return {"memory_budget_mb": None}
        dense = self.density >= self.DENSE if self.density is not None else (warmup or not self.sparse_loss)
        return {"memory_budget_mb": self.budget_mb, "dense_gradient": dense}

    def watch(self, scores: torch.Tensor) -> None:
        """Record the gradient density of this step's scores when backward reaches them."""
        if scores.requires_grad:
            scores.register_hook(self._record)

    def _record(self, grad: torch.Tensor) -> None:
        self.density = float((grad != 0).float().mean())


class TrainingTask(nn.Module):
    """A model's training forward: ImageBatch (B), TextBatch (B) -> the (B, B) scores of the step (see the module
    doc). `model`: a RetrievalModel (encoders, `train_scores`, shortlist embeddings), or any module whose
    forward(images, texts) gives (B, B) scores (neither global negatives nor the shortlist loss then).
    memory_budget_mb: the step's pair work in blocks of this much working memory (None: the plain path, which keeps
    every pair's activations). sparse_loss: the loss gives few non-zero gradients (the hardest-negative loss), so
    the first step recomputes rather than keeps."""

    def __init__(self, model: nn.Module, memory_budget_mb: Optional[float] = 512.0, sparse_loss: bool = True) -> None:
        super().__init__()
        self.model = model
        blocked = getattr(model, "blocked_training", False) and memory_budget_mb is not None
        self.score_path = ScorePath(memory_budget_mb if blocked else None, sparse_loss)

    @property
    def gathers_negatives(self) -> bool:
        """Whether forward(..., gather=True) can score against every DDP rank's items."""
        return isinstance(self.model, RetrievalModel) and self.model.gathers_negatives

    def forward(self, images, texts, warmup: bool = False, return_shortlist: bool = False, gather: bool = False):
        """-> scores (B, B) (with return_shortlist also the (B, B) cosines of the shortlist embeddings, for the
        auxiliary loss: one forward, so DDP sees both); with gather (under torch.distributed) (rows (b, N), cols
        (N, b), offset of this rank's pairs[, the same two for the shortlist cosines]): this rank's images against
        every rank's captions and every rank's images against this rank's captions, encodings gathered with
        autograd. warmup: the step uses the sum loss of train.sum_loss_epochs (a dense gradient)."""
        kw = self.score_path.forward_kwargs(warmup)
        m = self.model
        if not isinstance(m, RetrievalModel):
            if gather or return_shortlist:
                raise ValueError(f"{type(m).__name__} is not a tvrn RetrievalModel: global negatives and the "
                                 f"shortlist loss need its encoders and shortlist embeddings")
            scores = m(images, texts)
            self.score_path.watch(scores)
            return scores
        enc_i, enc_t = m.encode_image(images), m.encode_text(texts)
        if gather:
            all_i, offset = gather_encoded(enc_i)
            all_t, _ = gather_encoded(enc_t)
            # block-level work against the global batch (its first image), as one process would compute it
            enc_t, all_t = m.anchor_texts(all_i, enc_t), m.anchor_texts(all_i, all_t)
            rows = m.train_scores(enc_i, all_t, **kw)
            out = (rows, m.train_scores(all_i, enc_t, **kw), offset)
            self.score_path.watch(rows)
            if return_shortlist:
                out += (m.shortlist_embed_image(enc_i) @ m.shortlist_embed_text(all_t).t(),
                        m.shortlist_embed_image(all_i) @ m.shortlist_embed_text(enc_t).t())
            return out
        enc_t = m.anchor_texts(enc_i, enc_t)  # the batch is one block
        scores = m.train_scores(enc_i, enc_t, **kw)
        self.score_path.watch(scores)
        if not return_shortlist:
            return scores
        return scores, m.shortlist_embed_image(enc_i) @ m.shortlist_embed_text(enc_t).t()  # (B, D) @ (D, B)
