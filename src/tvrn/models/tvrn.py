"""TVRN (Pang et al., IEEE TMM 2024) and SGRAF (Diao et al., AAAI 2021) as one class.

SGRAF is TVRN with modules 1-3 off: `TVRN(config)` builds only the modules its switches need, so a SGRAF
state dict is a subset of a TVRN state dict with the same names, and TVRN with its switches off is SGRAF.

Per image (encode_image):   V = l2(FC(F)); C = l2((Attn(V, V) + IoU-masked Attn(V, V)) / 2);
                            U = l2(GRU([V; M]) + V), M = l2(lrelu(V * C)); g = VisualSA(U);
                            module-3 log-gates lambda <U_r, g>; module-2 keys Wk C, W_ih C and C C^T.
Per caption (encode_text):  T; T_ctx = Attn(T, T); queries Wq T_ctx; GRU over T -> first half of T_ref and
                            the hidden state after the last real word.
Per pair (score):           E = Attn(T_ctx, C^(k)); GRU steps L+1..2L over E; t_glo = TextSA(T_ref);
                            U_hat = gated word-to-region attention over U; nodes; SGR / SAF; sigmoid.
Shapes: Ni images, Nt captions, R regions (R' = 2R with module 1), L words (L' = 2L with module 2), D, S.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from dataclasses import replace

from .base import EncodedImages, EncodedTexts, RetrievalModel, gram, grid_layout, inference_gram
from .config import ModelConfig
from .layers import (EPS, NEG, Attention, AttentionFiltration, GraphReasoning, RegionEncoder, SelfAttentionPool,
                     attention_weights, gru_input, gru_scan, gru_scan_dense, init_linears, l2norm, pair_mask,
                     spatial_mask, squared_difference)
from .text import build_text_encoder


class TVRN(RetrievalModel):
    score_groups_by_length = True  # inference scores each caption length separately (see score)

    @property
    def preferred_budget_mb(self):
        """Block memory above which score_all gains nothing (None: the larger the better). SGRAF-style models
        (no module 2) run 10-30% faster with ~96 MB blocks than 256-512 MB ones on CPU: their largest temporary,
        the (pairs, n, D) attended-unit difference, stays below glibc's 32 MB mmap ceiling, so freed memory is
        reused instead of faulted in again (zeroed) for every block. TVRN's per-pair GRU wants as many pairs per
        block as allowed."""
        return None if self.config.refine_text else 96.0

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = c = config
        D, S = c.embed_size, c.sim_dim
        self.img_enc = RegionEncoder(c.img_dim, D, normalize=c.image_norm)
        self.txt_enc = build_text_encoder(c)
        # SGRAF: global pooling, similarity encoding, reasoning, score
        self.image_pool = SelfAttentionPool(D, c.dropout, c.image_pool_norm, c.image_pool_tokens)
        self.text_pool = SelfAttentionPool(D, c.dropout, None)
        self.sim_local = nn.Linear(D, S)
        if c.global_node:
            self.sim_global = nn.Linear(D, S)
        self.reason = GraphReasoning(S, c.sgr_steps) if c.reasoning == "sgr" else AttentionFiltration(S)
        self.sim_eval = nn.Linear(S, 1)
        # TVRN: context IRs (only used by modules 1 and 2)
        shared = Attention(D, c.lambda_softmax) if c.shared_attention else None  # the published model's one pair
        if c.needs_context and c.relational_context:
            self.relational = shared or Attention(D, c.lambda_softmax)
        if c.needs_context and c.spatial_context:
            self.spatial = Attention(D, c.lambda_softmax, score=c.spatial_score if c.spatial_score == "published"
                                     else "cosine")
        if c.unify:  # module 1
            self.unify_gru = nn.GRUCell(D, D)
        if c.refine_text:  # module 2
            self.text_context = shared or Attention(D, c.lambda_softmax)
            self.expand = shared or Attention(D, c.lambda_softmax)
            self.refine_gru = nn.GRUCell(D, D)
        for name, module in self.named_children():  # SGRAF's Xavier init, except the (maybe pretrained) text encoder
            if name != "txt_enc":
                init_linears(module)

    # ---------------------------------------------------------------- per image
    def _context(self, V, mask, adjacency, record=None):
        """Context IRs C (Ni, R, D) from V (Ni, R, D). record: dict receiving "relational" / "spatial", the
        region-to-region weights (Ni, R, R) of the contexts computed, or None."""
        parts = []
        sub = {} if record is not None else None  # one attention call's weights, moved to their name below
        if self.config.relational_context:
            parts.append(self.relational(V, V, pair_mask(mask, mask), record=sub))  # (Ni, R, D)
            if record is not None:
                record["relational"] = sub.pop("weights")
        if self.config.spatial_context:
            if adjacency is None:
                raise ValueError("spatial_context needs images.adjacency (region boxes); "
                                 "build the model with spatial_context=False for data without boxes")
            adj = spatial_mask(adjacency, mask)  # (Ni, R, R) overlapping real regions, diagonal True
            if self.config.spatial_adjacency == "multiply":  # published: scores of the others times 0, kept
                parts.append(self.spatial(V, V, pair_mask(mask, mask), weight=adj.to(V.dtype), record=sub))
            else:
                parts.append(self.spatial(V, V, adj, record=sub))  # (Ni, R, D)
            if record is not None:
                record["spatial"] = sub.pop("weights")
        if not parts:
            return V
        return l2norm(sum(parts) / len(parts)) * mask.unsqueeze(-1)

    def _unify(self, V, C, mask):
        """Module 1: U (Ni, 2R, D) = l2(h_t + V_(t mod R)), h = GRU over [V; M] skipping padded regions."""
        M = l2norm(F.leaky_relu(V * C, 0.1)) * mask.unsqueeze(-1)  # (Ni, R, D)
        X = torch.cat([V, M], 1)  # (Ni, 2R, D)
        m2 = torch.cat([mask, mask], 1)  # (Ni, 2R)
        h, _ = gru_scan(self.unify_gru, gru_input(self.unify_gru, X), m2)  # (Ni, 2R, D)
        return l2norm(h + torch.cat([V, V], 1)) * m2.unsqueeze(-1), m2

    def encode_image(self, images, record: dict | None = None) -> EncodedImages:
        """record: a dict that receives the context weights "relational" / "spatial" (Ni, R, R) where the
        model computes them (`tvrn.models.explain`), or None (scoring)."""
        c = self.config
        mask = images.mask.bool()
        V = self.img_enc(images.features, mask)  # (Ni, R, D)
        C = self._context(V, mask, images.adjacency, record) if c.needs_context else None
        U, umask = self._unify(V, C, mask) if c.unify else (V, mask)  # (Ni, R', D)
        g = self.image_pool(U, umask)  # (Ni, D)
        enc = EncodedImages(regions=V, mask=mask, units=U, units_mask=umask, glob=g,
                            units_gram=inference_gram(U))  # (Ni, R', R') for the fast path
        if c.global_gates:
            lam = c.lambda_softmax if c.gate_lambda is None else c.gate_lambda
            enc.gate = lam * torch.einsum("nrd,nd->nr", U, g)  # (Ni, R') log gate_r up to a constant
        if c.refine_text:
            enc.ctx_keys = self.expand.k(C)  # (Ni, R, D)
            enc.ctx_gates = F.linear(C, self.refine_gru.weight_ih)  # (Ni, R, 3D), no bias
            enc.ctx_gram = gram(C)  # (Ni, R, R), read by the plain path too
        return enc

    # ---------------------------------------------------------------- per caption
    def encode_text(self, texts) -> EncodedTexts:
        mask = texts.mask.bool()
        T = self.txt_enc(texts.tokens, mask)  # (Nt, L, D)
        # t_glo when module 2 is off; the pair-independent shortlist vector when it is on
        enc = EncodedTexts(words=T, mask=mask, glob=self.text_pool(T, mask))
        if self.config.refine_text:
            T_ctx = self.text_context(T, T, pair_mask(mask, mask))  # (Nt, L, D)
            enc.ctx_queries = self.expand.q(T_ctx)  # (Nt, L, D)
            z, enc.hidden = gru_scan(self.refine_gru, gru_input(self.refine_gru, T), mask)  # (Nt, L, D), (Nt, D)
            enc.refined = l2norm(z + T) * mask.unsqueeze(-1)  # (Nt, L, D) steps 1..L of T_ref
            if self.config.global_node:
                enc.refined_local = self.text_pool.embed_local(enc.refined)  # (Nt, L, D)
                # t_glo is per pair: its dropout masks are drawn here, once per caption (None in eval mode)
                enc.drop_local = self.text_pool.dropout_mask(T.shape, T)  # (Nt, L, D)
                enc.drop_glob = self.text_pool.dropout_mask(T.shape[:1] + T.shape[2:], T)  # (Nt, D)
        return enc

    def inference_encodings(self, images: EncodedImages) -> EncodedImages:
        """Adds U U^T (Ni, R', R'), which the fast path reads, to encodings made with gradients."""
        if images.units_gram is not None:
            return images
        with torch.no_grad():
            return replace(images, units_gram=gram(images.units.detach()))

    # ---------------------------------------------------------------- per pair
    # The plain path is written once, for aligned pairs with leading axes `lead`: image fields (*lead, ...) and
    # caption fields (*lead, ...) that broadcast against each other. score_pairs passes P aligned pairs
    # (lead = (P,)); _score_plain passes grid views (images (Ni, 1, ...), captions (1, Nt, ...), lead = (Ni, Nt)).
    def _refine(self, I: EncodedImages, T: EncodedTexts, lead, record=None):
        """Module 2: T_ref (*lead, 2L, D), its mask (.., 2L), t_glo (*lead, D) or None. record: dict receiving
        "refine_attention", the word-to-context-IR weights (*lead, L, R), or None."""
        # E = Attn(T_ctx, C^(k)): queries Wq T_ctx per caption, keys Wk C per image
        s = T.ctx_queries @ I.ctx_keys.transpose(-1, -2)  # (.., L, D) @ (.., D, R) -> (*lead, L, R)
        m = T.mask[..., :, None] & I.mask[..., None, :]  # (*lead, L, R)
        a = attention_weights(s, m, self.config.lambda_softmax)  # (*lead, L, R)
        if record is not None:
            record["refine_attention"] = a
        # GRU input gates of E = l2(sum_r a_r C_r) without forming E: W_ih E = (sum_r a_r W_ih C_r) / ||sum_r a_r C_r||
        sq = ((a @ I.ctx_gram) * a).sum(-1)  # (*lead, L, R) @ (.., R, R) -> (*lead, L, R) -> (*lead, L)
        gi = a @ I.ctx_gates  # (*lead, L, R) @ (.., R, 3D) -> (*lead, L, 3D)
        gi = gi / (sq.clamp_min(0).sqrt() + EPS).unsqueeze(-1) + self.refine_gru.bias_ih  # (*lead, L, 3D)
        # steps L+1..2L continue from the caption's hidden state (computed once per caption)
        z, _ = gru_scan(self.refine_gru, gi, T.mask, T.hidden)  # (*lead, L, D)
        second = l2norm(z + T.words) * T.mask[..., None]  # (*lead, L, D)
        L, D = second.shape[-2:]
        T_ref = torch.cat([T.refined.expand(*lead, L, D), second], -2)  # (*lead, 2L, D)
        tmask = torch.cat([T.mask, T.mask], -1)  # (.., 2L)
        if not self.config.global_node:
            return T_ref, tmask, None
        local = torch.cat([T.refined_local.expand(*lead, L, D),
                           self.text_pool.embed_local(second, T.drop_local)], -2)  # (*lead, 2L, D)
        t_glo = self.text_pool(T_ref, tmask, local=local, drop_glob=T.drop_glob)  # (*lead, D)
        return T_ref, tmask, t_glo

    @property
    def anchor_group(self):
        """Images per block whose first image refines every caption (refine_against="first_image"; score_all
        then scores image chunks of exactly this many, aligned to its multiples), or None (per-pair refinement)."""
        c = self.config
        return c.refine_group if c.refine_text and c.refine_against == "first_image" else None

    def anchor_texts(self, images: EncodedImages, texts: EncodedTexts) -> EncodedTexts:
        """First-image refinement (the published computation, docs/published-tvrn.md E): module 2 refines every
        caption against images[0] only -> texts with `anchored` (Nt, L, D) and `anchored_glob` (Nt, D) set, which
        every pair of the block then uses. Identity for per-pair refinement or texts already anchored."""
        if self.anchor_group is None or texts.anchored is not None or len(images) == 0:
            return texts
        T_ref, _, t_glo = self._refine(images[:1], texts, (len(texts),))  # (Nt, 2L, D), (Nt, D) or None
        return replace(texts, anchored=T_ref[:, texts.words.shape[1]:], anchored_glob=t_glo)

    def score(self, images: EncodedImages, texts: EncodedTexts) -> torch.Tensor:
        """(Ni, Nt) scores in (0, 1), rows images, columns captions.

        Inference (eval mode, no grad) takes the fast path when every caption's mask is a prefix; otherwise
        (training, odd masks) the plain path. Both compute the same function (tests/test_models.py).
        With refine_against="first_image" the captions are refined against images[0] (`anchor_texts`)."""
        texts = self.anchor_texts(images, texts)
        if self.training or torch.is_grad_enabled():
            return self._score_plain(images, texts)
        groups = texts.length_groups()
        if groups is None:
            return self._score_plain(images, texts)
        out = texts.words.new_empty(len(images), len(texts))  # (Ni, Nt)
        for idx, n in groups:  # captions of one length: no padded word anywhere below
            out[:, idx] = self._score_dense(images, texts[idx].trim(n))
        return out

    def _score_plain(self, images: EncodedImages, texts: EncodedTexts) -> torch.Tensor:
        """The masked, autograd-friendly computation for all pairs (Ni, Nt), written like the equations."""
        return self._pair_core(*grid_layout(images, texts), (len(images), len(texts)))

    def score_pairs(self, images: EncodedImages, texts: EncodedTexts, record: dict | None = None) -> torch.Tensor:
        """(P,) scores of the aligned pairs (images[p], texts[p]): the plain path with one pair axis.
        record: a dict that receives the pair side's intermediates (see `_pair_core`), or None (scoring)."""
        if len(images) != len(texts):
            raise ValueError(f"score_pairs needs as many images as captions, got {len(images)} and {len(texts)}")
        return self._pair_core(images, texts, (len(images),), record)

    def _pair_core(self, I: EncodedImages, T: EncodedTexts, lead, record=None) -> torch.Tensor:
        """The pair side (docs/models.md) for broadcastable image / caption fields -> scores (*lead).

        record: None (scoring), or a dict that receives what this computation used (`tvrn.models.explain`):
        "attention" (*lead, L', R') module 3's word-to-unit weights (gated when module 3 is on), "refine_attention"
        (*lead, L, R) module 2's word-to-context-IR weights (per-pair refinement only), "local_nodes" (*lead, L', S)
        and "global_node" (*lead, S) (or None) the similarity nodes, "reasoning" SGR's {"edges": steps x (P, n, n)}
        or SAF's {"weights": (P, n)} over the nodes [global;] local (P = prod(lead)), "score" (*lead)."""
        c = self.config
        U, umask, g = I.units, I.units_mask, I.glob  # (.., R', D), (.., R'), (.., D)
        if c.refine_text and T.anchored is not None:  # refined once against the block's first image
            T_ref = torch.cat([T.refined, T.anchored], -2)  # (.., 2L, D)
            tmask, t_glo = torch.cat([T.mask, T.mask], -1), T.anchored_glob  # (.., 2L), (.., D) or None
        elif c.refine_text:
            T_ref, tmask, t_glo = self._refine(I, T, lead, record)  # (*lead, L', D), (.., L'), (*lead, D)
        else:
            T_ref, tmask, t_glo = T.words, T.mask, T.glob  # (.., L, D), (.., L), (.., D)
        # module 3 (gates off: SGRAF's text-to-image attention): words attend the unified IRs
        s = T_ref @ U.transpose(-1, -2)  # (.., L', D) @ (.., D, R') -> (*lead, L', R')
        m = tmask[..., :, None] & umask[..., None, :]  # (*lead, L', R')
        bias = I.gate[..., None, :] if c.global_gates else None  # (.., 1, R') log gate_r
        a = attention_weights(s, m, c.lambda_softmax, bias)  # (*lead, L', R') prop. to a[i, r] * gate_r
        U_hat = l2norm(a @ U)  # (*lead, L', R') @ (.., R', D) -> (*lead, L', D)
        # similarity encoding: local node per word, global node
        nodes = l2norm(self.sim_local((U_hat - T_ref) ** 2))  # (*lead, L', S)
        nmask = tmask.expand(*lead, tmask.shape[-1])  # (*lead, L')
        if record is not None:
            record.update(attention=a, local_nodes=nodes, global_node=None)
        if c.global_node:
            glo = l2norm(self.sim_global((g - t_glo) ** 2))  # (*lead, S)
            if record is not None:
                record["global_node"] = glo
            nodes = torch.cat([glo.unsqueeze(-2), nodes], -2)  # (*lead, 1 + L', S)
            nmask = torch.cat([nmask.new_ones(*lead, 1), nmask], -1)  # (*lead, 1 + L')
        n, S = nodes.shape[-2:]
        sub = {} if record is not None else None
        vec = self.reason(nodes.reshape(-1, n, S), nmask.reshape(-1, n), read_global=c.global_node,
                          record=sub)  # (prod(lead), S)
        score = torch.sigmoid(self.sim_eval(vec)).view(lead)
        if record is not None:
            record.update(reasoning=sub, score=score)
        return score

    # ---------------------------------------------------------------- per pair, inference
    def _refine_dense(self, images: EncodedImages, texts: EncodedTexts, rmask):
        """Module 2 for captions that all have n real words: second half of T_ref (Ni, Nt, n, D).

        Shortcuts (exact): word-to-context scores of all pairs as one matmul; W_ih E from per-image W_ih C and
        ||sum_r a_r C_r|| from the per-image Gram matrix (E is never formed); the first GRU step's W_hh h_L is
        per caption; no mask inside the GRU loop."""
        Ni, (Nt, n, D), R = len(images), texts.words.shape, images.ctx_keys.shape[1]
        q, k = texts.ctx_queries.reshape(Nt * n, D), images.ctx_keys.reshape(Ni * R, D)
        s = F.leaky_relu((q @ k.t()).view(Nt, n, Ni, R), 0.1)  # (Nt*n, D) @ (D, Ni*R) -> (Nt, n, Ni, R)
        if rmask is not None:
            s = s.masked_fill(~rmask[None, None], 0.0)
        s = s * (self.config.lambda_softmax / (s.norm(dim=1, keepdim=True) + EPS))  # l2 across the n words
        if rmask is not None:
            s = s.masked_fill(~rmask[None, None], NEG)
        a = torch.softmax(s, -1).permute(2, 0, 1, 3).reshape(Ni, Nt * n, R)  # (Ni, Nt*n, R)
        sq = (torch.bmm(a, images.ctx_gram) * a).sum(-1)  # (Ni,Nt*n,R)@(Ni,R,R) -> (Ni, Nt*n) ||sum_r a_r C_r||^2
        gi = torch.bmm(a, images.ctx_gates)  # (Ni,Nt*n,R)@(Ni,R,3D) -> (Ni, Nt*n, 3D)
        gi.div_(sq.clamp_min(0).sqrt_().add_(EPS).unsqueeze(-1)).add_(self.refine_gru.bias_ih)
        gi = gi.view(Ni * Nt, n, 3 * D)  # (P, n, 3D)
        gh0 = F.linear(texts.hidden, self.refine_gru.weight_hh, self.refine_gru.bias_hh)  # (Nt, 3D) per caption
        z = gru_scan_dense(self.refine_gru, gi, texts.hidden[None].expand(Ni, Nt, D).reshape(Ni * Nt, D),
                           gi.new_empty(Ni * Nt, n, D), gh0[None].expand(Ni, Nt, 3 * D).reshape(Ni * Nt, 3 * D))
        z = z.view(Ni, Nt, n, D).add_(texts.words[None])  # (Ni, Nt, n, D)
        return z.div_(z.norm(dim=-1, keepdim=True).add_(EPS))  # l2(z + T)

    def _text_global_dense(self, texts: EncodedTexts, second: torch.Tensor) -> torch.Tensor:
        """t_glo = TextSA([T_ref first half (per caption); second (Ni, Nt, n, D)]) -> (Ni, Nt, D), without
        expanding the per-caption half over images (its products with per-pair vectors are bmm over captions)."""
        pool, first, first_local = self.text_pool, texts.refined, texts.refined_local  # (Nt, n, D) x2
        Ni, Nt, n, D = second.shape
        mean = (first.sum(1)[None] + second.sum(2)) / (2 * n)  # (Ni, Nt, D)
        drop_g, drop_l = (None if x is None else x[None] for x in (texts.drop_glob, texts.drop_local))  # per caption
        e_g = pool.embed_global(mean, drop_g)  # (Ni, Nt, D)
        u = e_g * pool.common.weight[0]  # (Ni, Nt, D): w_t = <e_t, u>
        w1 = torch.bmm(first_local, u.permute(1, 2, 0)).permute(2, 0, 1)  # (Nt,n,D)@(Nt,D,Ni) -> (Ni, Nt, n)
        w2 = torch.bmm(pool.embed_local(second, drop_l).view(Ni * Nt, n, D), u.view(Ni * Nt, D, 1))  # (P, n, 1)
        w = torch.softmax(torch.cat([w1, w2.view(Ni, Nt, n)], -1), -1)  # (Ni, Nt, 2n)
        t = torch.bmm(w[..., :n].transpose(0, 1), first).transpose(0, 1)  # (Nt,Ni,n)@(Nt,n,D) -> (Ni, Nt, D)
        t = t + torch.bmm(w[..., n:].reshape(Ni * Nt, 1, n), second.view(Ni * Nt, n, D)).view(Ni, Nt, D)
        return l2norm(t)

    def _score_dense(self, images: EncodedImages, texts: EncodedTexts) -> torch.Tensor:
        """`_score_plain` for captions that all have n real words (Nt, n, D) -> (Ni, Nt).

        Without gradients (inference) its large temporaries are updated in place; with gradients
        (`score_grid`, training) the same equations run out of place, and module 2's per-pair refinement is
        the plain `_refine` over the (Ni, Nt) grid."""
        c = self.config
        ip = not torch.is_grad_enabled()  # in place: inference only (autograd needs what in-place ops overwrite)
        Ni, (Nt, n, D) = len(images), texts.words.shape
        U, g = images.units, images.glob  # (Ni, R', D), (Ni, D)
        Rp = U.shape[1]
        umask = None if bool(images.units_mask.all()) else images.units_mask  # (Ni, R') or None
        G = images.units_gram if images.units_gram is not None else gram(U)  # (Ni, R', R')
        rmask = None if bool(images.mask.all()) else images.mask  # (Ni, R) or None
        if c.refine_text and texts.anchored is not None:  # T_ref and t_glo per caption (first-image refinement)
            halves = [texts.refined, texts.anchored]  # 2 x (Nt, n, D)
            t_glo = texts.anchored_glob[None] if c.global_node else None  # (1, Nt, D)
        elif c.refine_text and not ip:  # per pair, differentiable: the plain module 2 over the grid
            T_ref, _, t_glo = self._refine(*grid_layout(images, texts), (Ni, Nt))  # (Ni, Nt, 2n, D), (Ni, Nt, D)
            halves = [texts.refined, T_ref[:, :, n:]]
        elif c.refine_text:
            second = self._refine_dense(images, texts, rmask)  # (Ni, Nt, n, D)
            halves = [texts.refined, second]  # T_ref = [first (Nt, n, D) per caption; second per pair]
            t_glo = self._text_global_dense(texts, second) if c.global_node else None  # (Ni, Nt, D)
        else:
            halves, t_glo = [texts.words], texts.glob[None]  # T_ref = T (Nt, n, D); (1, Nt, D)
        # module 3, unit-major: scores (Ni, R', Nt, n) of every unit with every word of T_ref, so that the l2 norm
        # across the pair's words runs over the last axis and the softmax over units over axis 1 (no permuted
        # copy); lrelu, masking, scaling and gating in place (inference)
        ss = []
        for x in halves:
            if x.dim() == 3:  # per caption: all pairs in one matmul
                sx = (U.reshape(Ni * Rp, D) @ x.reshape(Nt * n, D).t()).view(Ni, Rp, Nt, n)  # (Ni*R',D)@(D,Nt*n)
            else:  # per pair
                sx = torch.bmm(U, x.reshape(Ni, Nt * n, D).transpose(1, 2)).view(Ni, Rp, Nt, n)  # (Ni,R',D)@(Ni,D,Nt*n)
            sx = F.leaky_relu(sx, 0.1, inplace=ip)  # (Ni, R', Nt, n)
            ss.append(sx if umask is None else _masked_fill(sx, ~umask[:, :, None, None], 0.0, ip))
        norms = [torch.linalg.vector_norm(sx, dim=-1, keepdim=True) for sx in ss]  # (Ni, R', Nt, 1) per half
        norm = norms[0] if len(norms) == 1 else _sqrt(sum(_square(v, ip) for v in norms), ip)
        scale = c.lambda_softmax / _add(norm, EPS, ip)  # (Ni, R', Nt, 1)
        glob, local = None, []  # global node (Ni, Nt, S); local similarities before their l2 norm
        if c.global_node:  # (g - t_glo)^2 in one pass: into t_glo when it is per pair (module 2), else a new tensor
            if not ip:
                sq = (g[:, None] - t_glo) ** 2  # (Ni, Nt, D)
            else:
                per_pair = c.refine_text and texts.anchored is None  # t_glo (Ni, Nt, D) made for this call
                out = t_glo if per_pair else t_glo.new_empty(Ni, Nt, D)  # never the caption encodings
                sq = squared_difference(g[:, None], t_glo, out=out)  # (Ni, Nt, D)
            glob = l2norm(self.sim_global(sq))  # (Ni, Nt, S)
        for x, sx in zip(halves, ss):
            logits = _mul(sx, scale, ip)  # (Ni, R', Nt, n)
            if c.global_gates:
                logits = _add(logits, images.gate[:, :, None, None], ip)  # + log gate_r
            if umask is not None:
                logits = _masked_fill(logits, ~umask[:, :, None, None], NEG, ip)
            a = torch.softmax(logits, 1).view(Ni, Rp, Nt * n)  # (Ni, R', Q) weights over units, Q = Nt*n words
            # U_hat = l2(a @ U) with the norm from the per-image Gram matrix (a^T G a): the weights are scaled, not
            # the (Ni, Q, D) product, which is only written once and then updated in place
            sq = _mul(torch.bmm(G, a), a, ip).sum(1, keepdim=True)  # (Ni,R',R')@(Ni,R',Q) -> (Ni, 1, Q)
            a = _div(a, _add(_sqrt(sq.clamp_min(0), ip), EPS, ip), ip)
            xs = x.reshape(1, Nt * n, D) if x.dim() == 3 else x.reshape(Ni, Nt * n, D)  # per caption / per pair
            diff = torch.bmm(a.transpose(1, 2), U)  # (Ni,Q,R')@(Ni,R',D) -> (Ni, Q, D) U_hat
            diff = (squared_difference(diff, xs, out=diff) if ip else (diff - xs) ** 2).view(Ni, Nt, n, D)
            local.append(self.sim_local(diff).view(Ni * Nt, n, c.sim_dim))  # (P, n, S) (U_hat - T_ref)^2 projected
        if glob is not None:
            glob = glob.view(Ni * Nt, c.sim_dim)  # (P, S)
        if isinstance(self.reason, AttentionFiltration):  # SAF folds the local nodes' l2 norm in: no node tensor
            vec = self.reason.forward_parts(glob, local)  # (P, S)
        else:
            nodes = ([] if glob is None else [glob[:, None]]) + [l2norm(x) for x in local]
            vec = self.reason.forward_dense(torch.cat(nodes, 1), read_global=c.global_node)  # (P, [1 +] n', S)
        return torch.sigmoid(self.sim_eval(vec)).view(Ni, Nt)

    def score_grid(self, images: EncodedImages, texts: EncodedTexts) -> torch.Tensor:
        """(Ni, Nt) scores of every image with every caption, captions all of n real words (Nt, n, D) and
        anchored if `anchor_group` is set: the fast path's formulation, differentiable (the training
        recomputation of a dense gradient, `tvrn.scoring.score_all_train`). Equals `score` (tests/test_train_scores.py)."""
        with torch.enable_grad():
            return self._score_dense(images, texts)

    def pair_bytes(self, images: EncodedImages, texts: EncodedTexts) -> int:
        """Working bytes per pair of the fast path (its largest live per-pair tensors, x1.5 for temporaries)."""
        c = self.config
        L, D, S = texts.words.shape[1], c.embed_size, c.sim_dim
        Rp = images.units.shape[1]
        halves = 2 if c.refine_text else 1
        floats = halves * L * (3 * Rp + 2 * D + 2 * S) + (L + 1) * S * 3 + (L + 1) ** 2 * 2
        if c.refine_text:  # gi, GRU outputs, one step's temporaries, embed_local of the second half, scores
            floats += L * 3 * D + L * D + 4 * 3 * D + L * D + 3 * L * images.regions.shape[1]
        return int(4 * floats * 1.5)

    # ---------------------------------------------------------------- shortlist (two-stage search)
    def shortlist_embed_image(self, images: EncodedImages) -> torch.Tensor:
        """(Ni, D) unit global IR g; pair-independent."""
        return images.glob

    def shortlist_embed_text(self, texts: EncodedTexts) -> torch.Tensor:
        """(Nt, D) unit caption vector pooled from the content words T (TextSA); pair-independent."""
        return texts.glob


# in place (inference) or out of place (under autograd) versions of the fast path's elementwise updates
def _mul(x, y, ip):
    return x.mul_(y) if ip else x * y


def _div(x, y, ip):
    return x.div_(y) if ip else x / y


def _add(x, y, ip):
    return x.add_(y) if ip else x + y


def _square(x, ip):
    return x.square_() if ip else x.square()


def _sqrt(x, ip):
    return x.sqrt_() if ip else x.sqrt()


def _masked_fill(x, mask, value, ip):
    return x.masked_fill_(mask, value) if ip else x.masked_fill(mask, value)
