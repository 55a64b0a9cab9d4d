"""Why a pair scores what it scores: word-to-region attention, module-3 gates, context weights and per-word
similarity contributions, read from the model's own scoring code.

    ex = explain(model, images[3], texts[7])           # one (image, caption) pair -> Explanation
    ex.score, ex.attention                             # the pair's score; (L, R) word-to-region weights
    ex.top_regions(2)                                  # [(region, weight), ...] of token 2, best first
    batch = explain_pairs(model, images, texts)        # P aligned pairs images[p], texts[p] -> PairExplanations
    batch.item(p)                                      # one pair's Explanation, padding removed

Nothing here re-computes the models' equations: `explain_pairs` runs the model's own plain pair path
(`score_pairs(..., record=dict)`, the one training recomputes and the fast inference path is tested against) and
`encode_image(..., record=dict)`, which hand back the intermediates they used. So the score of an explanation is
the pair's score: it equals `tvrn.scoring.score_all`'s within float rounding (tests/test_explain.py checks every
registered model in float64 to 1e-10). With `refine_against="first_image"` (the published computation's
block-dependent refinement) a caption is refined against the pair's own image, as `score_all` does for a block of
that one image.

Shapes: P pairs, L tokens (the tokenizer's, special tokens included), R regions, S similarity size. Models
compute over word rows L' and unit columns R': TVRN with module 2 scores 2L refined word rows (T_ref = [first
half; second half], row l and L + l both token l), with module 1 over 2R unified units (U = [GRU over V; GRU
over M], units r and R + r both region r); otherwise L' = L, R' = R. `attention` folds them: a token's
distribution over regions is the mean over its word rows of the summed weights of a region's units, so a row
still sums to 1; `unit_attention` keeps them apart, `unit_word` / `unit_region` say which token / region each
row / column is.

What each family has (None where it has nothing of the kind):
- TVRN / SGRAF: attention (module 3's word-to-unit weights, gated when module 3 is on), gates (module 3's
  softmax_r(lambda <U_r, g>), summed over a region's units), context "relational" / "spatial" (R, R) region-to-
  region weights of the context IRs (modules 1 and 2) and "refine" (L, R) module 2's word-to-context-IR weights;
  local_nodes (L', S) / global_node (S,) the similarity nodes; word_contributions (L,): how much each word's
  similarity nodes feed the score: SAF's filtration weights, or SGR's last-step edge from the global node it
  reads (without a global node, SGR reads the mean: 1 / nodes), summed over the word's rows; with
  global_contribution they sum to 1;
- SCAN t2i: attention (words over regions), word_contributions = each word's cosine with its attended region
  vector (what LogSumExp / mean aggregates); SCAN i2t: attention[l, r] is region r's weight on word l (columns
  sum to 1, direction "region_to_word"), region_contributions = each region's cosine with its attended words;
- VSE / VSE-infinity: a dual encoder computes no alignment: score only.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Optional

import torch

from ..scoring.encode import eval_mode, model_device

if TYPE_CHECKING:
    from .base import EncodedImages, EncodedTexts, RetrievalModel

WORD_TO_REGION, REGION_TO_WORD = "word_to_region", "region_to_word"


@dataclass
class Explanation:
    """One (image, caption) pair: L tokens, R real regions of the image (see the module doc for L', R').

    model:          registered model name
    score:          the pair's score (what tvrn.scoring.score_all gives the pair)
    tokens:         (L,) long token ids of the caption (special tokens included)
    words:          L token strings, when the caller has the tokenizer (SearchIndex.explain), else None
    regions:        (R,) long index of each region in the image's region order
    boxes:          (R, 4) float x1, y1, x2, y2 in pixels, or None without boxes
    attention:      (L, R) word-to-region weights (rows sum to 1; "region_to_word": columns), or None
    direction:      "word_to_region" or "region_to_word" (SCAN i2t), or None
    unit_attention: (L', R') the model's own rows and columns, or None (= attention for SCAN)
    unit_word:      (L',) long token of each row; unit_region: (R',) long region of each column
    gates:          (R,) module-3 gate of each region (sums to 1), or None; unit_gates: (R',) per unit
    word_contributions:   (L,) per-token similarity contribution, or None (contribution_kind says which)
    region_contributions: (R,) per-region cosine (SCAN i2t), or None
    global_contribution:  the global node's share (TVRN / SGRAF; with word_contributions it sums to 1), or None
    contribution_kind:    "saf_weight", "sgr_global_edge", "mean_weight", "cosine", or None
    local_nodes:    (L', S) similarity nodes of the word rows, or None; global_node: (S,) or None
    context:        {"relational": (R, R), "spatial": (R, R), "refine": (L, R)}, the ones the model computes
    """

    model: str
    score: float
    tokens: torch.Tensor
    regions: torch.Tensor
    words: Optional[list[str]] = None
    boxes: Optional[torch.Tensor] = None
    attention: Optional[torch.Tensor] = None
    direction: Optional[str] = None
    unit_attention: Optional[torch.Tensor] = None
    unit_word: Optional[torch.Tensor] = None
    unit_region: Optional[torch.Tensor] = None
    gates: Optional[torch.Tensor] = None
    unit_gates: Optional[torch.Tensor] = None
    word_contributions: Optional[torch.Tensor] = None
    region_contributions: Optional[torch.Tensor] = None
    global_contribution: Optional[float] = None
    contribution_kind: Optional[str] = None
    local_nodes: Optional[torch.Tensor] = None
    global_node: Optional[torch.Tensor] = None
    context: dict = field(default_factory=dict)

    def top_regions(self, token: int, k: int = 3) -> list[tuple[int, float]]:
        """[(region index in the image, weight)] of token `token`'s k most attended regions, best first ([]
        without attention)."""
        if self.attention is None:
            return []
        w = self.attention[token]  # (R,)
        top = torch.argsort(w, descending=True, stable=True)[:k]
        return [(int(self.regions[j]), float(w[j])) for j in top]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: tensors as nested lists (local_nodes and unit-level tensors left out), weights rounded to
        6 digits (the score is kept whole)."""

        def plain(x):
            if isinstance(x, torch.Tensor):
                x = x.tolist()
            if isinstance(x, float):
                return round(x, 6)
            if isinstance(x, list):
                return [plain(v) for v in x]
            return x

        skip = {"local_nodes", "global_node", "unit_attention", "unit_word", "unit_region", "unit_gates"}
        out = {f.name: plain(getattr(self, f.name)) for f in fields(self) if f.name not in skip | {"context"}}
        out["context"] = {k: plain(v) for k, v in self.context.items()}
        out["score"] = self.score
        return out


@dataclass
class PairExplanations:
    """P aligned pairs, padded (see `Explanation` for the fields; P leads every tensor):

    score (P,); tokens (P, L); word_mask (P, L); region_mask (P, R) bool; boxes (P, R, 4) or None;
    attention (P, L, R) zero on padding; unit_attention (P, L', R'); unit_word (L',); unit_region (R',);
    gates (P, R); unit_gates (P, R'); word_contributions (P, L); region_contributions (P, R);
    global_contribution (P,); local_nodes (P, L', S); global_node (P, S); context values (P, R, R) / (P, L, R).
    `item(p)` is pair p's Explanation with padding removed.
    """

    model: str
    score: torch.Tensor
    tokens: torch.Tensor
    word_mask: torch.Tensor
    region_mask: torch.Tensor
    boxes: Optional[torch.Tensor] = None
    attention: Optional[torch.Tensor] = None
    direction: Optional[str] = None
    unit_attention: Optional[torch.Tensor] = None
    unit_word: Optional[torch.Tensor] = None
    unit_region: Optional[torch.Tensor] = None
    gates: Optional[torch.Tensor] = None
    unit_gates: Optional[torch.Tensor] = None
    word_contributions: Optional[torch.Tensor] = None
    region_contributions: Optional[torch.Tensor] = None
    global_contribution: Optional[torch.Tensor] = None
    contribution_kind: Optional[str] = None
    local_nodes: Optional[torch.Tensor] = None
    global_node: Optional[torch.Tensor] = None
    context: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.score.shape[0]

    def pointed_regions(self) -> Optional[torch.Tensor]:
        """(P, L) long: each token's most attended real region (first on ties), or None without attention."""
        if self.attention is None:
            return None
        w = self.attention.masked_fill(~self.region_mask[:, None, :], -float("inf"))  # (P, L, R)
        return w.argmax(-1)

    def item(self, p: int) -> Explanation:
        """Pair p with its padded tokens and regions removed."""
        words = torch.nonzero(self.word_mask[p]).reshape(-1)  # (L,) real token positions
        regs = torch.nonzero(self.region_mask[p]).reshape(-1)  # (R,) real regions

        def wr(x):  # (.., L_pad, R_pad) -> (L, R)
            return None if x is None else x[p][words][:, regs]

        out = Explanation(model=self.model, score=float(self.score[p]), tokens=self.tokens[p][words], regions=regs,
                          boxes=None if self.boxes is None else self.boxes[p][regs], attention=wr(self.attention),
                          direction=self.direction, contribution_kind=self.contribution_kind,
                          gates=None if self.gates is None else self.gates[p][regs],
                          word_contributions=None if self.word_contributions is None
                          else self.word_contributions[p][words],
                          region_contributions=None if self.region_contributions is None
                          else self.region_contributions[p][regs],
                          global_contribution=None if self.global_contribution is None
                          else float(self.global_contribution[p]),
                          global_node=None if self.global_node is None else self.global_node[p])
        if self.unit_attention is not None:
            rows = torch.nonzero(self.word_mask[p][self.unit_word]).reshape(-1)  # (L',) rows of real tokens
            cols = torch.nonzero(self.region_mask[p][self.unit_region]).reshape(-1)  # (R',)
            new_word = torch.cumsum(self.word_mask[p].long(), 0) - 1  # old token position -> new
            new_region = torch.cumsum(self.region_mask[p].long(), 0) - 1
            out.unit_attention = self.unit_attention[p][rows][:, cols]
            out.unit_word, out.unit_region = new_word[self.unit_word[rows]], new_region[self.unit_region[cols]]
            if self.unit_gates is not None:
                out.unit_gates = self.unit_gates[p][cols]
            if self.local_nodes is not None:
                out.local_nodes = self.local_nodes[p][rows]
        for k, v in self.context.items():
            out.context[k] = v[p][words][:, regs] if k == "refine" else v[p][regs][:, regs]
        return out


def explain_pairs(model: RetrievalModel, images, texts) -> PairExplanations:
    """ImageBatch (P images), TextBatch (P captions) -> PairExplanations of the aligned pairs (images[p],
    texts[p]): the model encodes them (recording its image-side context weights) and scores each pair through
    `score_pairs(..., record=...)`, in eval mode without gradients. Results on the CPU."""
    if len(images) != len(texts):
        raise ValueError(f"explain_pairs needs as many images as captions (aligned pairs), got {len(images)} and "
                         f"{len(texts)}")
    device = model_device(model)
    with torch.no_grad(), eval_mode(model):
        image_record: dict = {}
        enc_i = model.encode_image(images.to(device), record=image_record)
        enc_t = model.encode_text(texts.to(device))
        return explain_encoded(model, enc_i, enc_t, tokens=texts.tokens, boxes=images.boxes,
                               image_record=image_record)


def explain(model: RetrievalModel, image, text) -> Explanation:
    """One pair: ImageBatch of 1 image, TextBatch of 1 caption -> Explanation (see `explain_pairs`)."""
    if len(image) != 1 or len(text) != 1:
        raise ValueError(f"explain takes one image and one caption, got {len(image)} and {len(text)} (use "
                         f"explain_pairs for aligned batches)")
    return explain_pairs(model, image, text).item(0)


def explain_encoded(model: RetrievalModel, enc_images: EncodedImages, enc_texts: EncodedTexts,
                    tokens: Optional[torch.Tensor] = None, boxes: Optional[torch.Tensor] = None,
                    image_record: Optional[dict] = None) -> PairExplanations:
    """Encodings of P images and P captions (e.g. a search index's stored ones) -> PairExplanations of the aligned
    pairs. tokens (P, L) long (default: zeros), boxes (P, R, 4) or None; image_record: what `encode_image(...,
    record=)` recorded for these images (context weights), or None."""
    from .scan import SCAN
    from .tvrn import TVRN

    if len(enc_images) != len(enc_texts):
        raise ValueError(f"explain needs as many images as captions, got {len(enc_images)} and {len(enc_texts)}")
    device = model_device(model)
    with torch.no_grad(), eval_mode(model):
        rec: dict = {}
        score = model.score_pairs(enc_images.to(device), enc_texts.to(device), record=rec)  # (P,)
    wmask, rmask = enc_texts.mask.bool().cpu(), enc_images.mask.bool().cpu()  # (P, L), (P, R)
    out = PairExplanations(model=model.config.name, score=score.cpu(),
                           tokens=(torch.zeros(wmask.shape, dtype=torch.long) if tokens is None else tokens.cpu()),
                           word_mask=wmask, region_mask=rmask, boxes=None if boxes is None else boxes.cpu())
    rec = {k: _cpu(v) for k, v in rec.items()}
    if isinstance(model, TVRN):
        _tvrn_fields(model, out, rec, enc_images)
        for k in ("relational", "spatial"):
            if image_record and image_record.get(k) is not None:
                out.context[k] = _zero_padding(image_record[k].cpu(), rmask, rmask)
    elif isinstance(model, SCAN):
        _scan_fields(model, out, rec)
    return out


def _cpu(v):
    if isinstance(v, torch.Tensor):
        return v.detach().cpu()
    if isinstance(v, dict):
        return {k: _cpu(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_cpu(x) for x in v]
    return v


def _zero_padding(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """(P, A, B) with rows (P, A) / cols (P, B) masks -> padded rows and columns set to 0 (the models leave
    finite garbage there)."""
    return x * (rows[:, :, None] & cols[:, None, :]).to(x.dtype)


def _fold(x: torch.Tensor, unit_word: torch.Tensor, unit_region: torch.Tensor, L: int, R: int) -> torch.Tensor:
    """(P, L', R') over word rows and unit columns -> (P, L, R): a token's rows averaged, a region's units summed."""
    Wm = torch.nn.functional.one_hot(unit_word, L).to(x.dtype)  # (L', L)
    Rm = torch.nn.functional.one_hot(unit_region, R).to(x.dtype)  # (R', R)
    return torch.einsum("pab,ai,bj->pij", x, Wm, Rm) / (len(unit_word) // L)


def _tvrn_fields(model, out: PairExplanations, rec: dict, enc_images: EncodedImages) -> None:
    c = model.config
    wmask, rmask = out.word_mask, out.region_mask
    (P, L), R = wmask.shape, rmask.shape[1]
    copies_w = 2 if c.refine_text else 1
    copies_r = 2 if c.unify else 1
    out.unit_word = torch.arange(L).repeat(copies_w)  # (L',): T_ref = [first half; second half]
    out.unit_region = torch.arange(R).repeat(copies_r)  # (R',): U = [units of V; units of M]
    urow, ucol = wmask[:, out.unit_word], rmask[:, out.unit_region]  # (P, L'), (P, R')
    a = _zero_padding(rec["attention"], urow, ucol)  # (P, L', R')
    out.unit_attention = a
    out.attention = _fold(a, out.unit_word, out.unit_region, L, R)  # (P, L, R)
    out.direction = WORD_TO_REGION
    out.local_nodes = rec["local_nodes"] * urow[..., None].to(a.dtype)  # (P, L', S)
    out.global_node = rec.get("global_node")
    if c.global_gates and enc_images.gate is not None:
        log_gate = enc_images.gate.detach().cpu().to(a.dtype).masked_fill(~ucol, -float("inf"))  # (P, R')
        out.unit_gates = torch.softmax(log_gate, -1)
        out.gates = _fold(out.unit_gates[:, None, :], torch.zeros(1, dtype=torch.long), out.unit_region, 1, R)[:, 0]
    if rec.get("refine_attention") is not None:
        out.context["refine"] = _zero_padding(rec["refine_attention"], wmask, rmask)  # (P, L, R)
    # how much each node feeds the score: SAF's weights, or the SGR node the score reads (node 0 when global)
    reasoning, g = rec["reasoning"], int(c.global_node)
    nmask = torch.cat([torch.ones(P, g, dtype=torch.bool), urow], 1)  # (P, n)
    if "weights" in reasoning:
        w, kind = reasoning["weights"], "saf_weight"
    elif c.global_node:
        w, kind = reasoning["edges"][-1][:, 0, :], "sgr_global_edge"  # (P, n): the read node's last update
    else:
        w, kind = nmask.to(a.dtype) / nmask.sum(1, keepdim=True), "mean_weight"
    w = w * nmask.to(w.dtype)
    out.contribution_kind = kind
    out.global_contribution = w[:, 0] if g else None
    out.word_contributions = _fold(w[:, g:, None], out.unit_word, torch.zeros(1, dtype=torch.long), L, 1)[..., 0] \
        * copies_w  # (P, L): summed, not averaged, over a token's rows


def _scan_fields(model, out: PairExplanations, rec: dict) -> None:
    wmask, rmask = out.word_mask, out.region_mask
    out.contribution_kind = "cosine"
    if model.config.direction == "t2i":
        out.attention = _zero_padding(rec["attention"], wmask, rmask)  # (P, L, R)
        out.direction = WORD_TO_REGION
        out.word_contributions = rec["cosines"] * wmask.to(rec["cosines"].dtype)  # (P, L)
    else:
        out.attention = _zero_padding(rec["attention"], rmask, wmask).transpose(1, 2)  # (P, R, L) -> (P, L, R)
        out.direction = REGION_TO_WORD
        out.region_contributions = rec["cosines"] * rmask.to(rec["cosines"].dtype)  # (P, R)


__all__ = ["Explanation", "PairExplanations", "explain", "explain_encoded", "explain_pairs"]
