"""Shared blocks: l2 / masked reductions, the attention primitive, IoU-masked spatial attention, self-attention
pooling, a masked GRU scan, region encoder, and SGR / SAF reasoning.

Shapes: B batch, R regions, L words, D joint size, S similarity size, Ni / Nt images / captions in a block.
Masks are bool, True for real tokens. Masked entries never receive weight: logits are filled with a large
negative number (exp underflows to exactly 0; unlike -inf an all-masked row stays finite).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

EPS = 1e-8
NEG = -1e9  # logit for masked entries: exp(NEG - max) == 0 in float32


def l2norm(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """x / (||x|| + 1e-8) along `dim`."""
    return x / (x.norm(dim=dim, keepdim=True) + EPS)


def squared_difference(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """(a - b)^2 elementwise into `out` (the broadcast shape of a and b; may be `a` itself) in one pass over
    memory: aten's unreduced mse_loss, where `(a - b).square_()` reads and writes the result twice. Inference
    only (no autograd through `out=`)."""
    return torch.ops.aten.mse_loss.out(a.expand_as(out), b.expand_as(out), 0, out=out)  # 0: no reduction


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the token axis. x (..., N, D), mask broadcastable to (..., N) -> (..., D)."""
    m = mask.to(x.dtype).unsqueeze(-1)  # (..., N, 1)
    return (x * m).sum(-2) / m.sum(-2).clamp_min(1.0)


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return torch.softmax(logits.masked_fill(~mask, NEG), dim=dim)


def normalise_scores(scores: torch.Tensor, mask: torch.Tensor, norm: str = "clipped_l2norm") -> torch.Tensor:
    """SCAN's raw_feature_norm of raw scores (..., Lq, Lc) across the queries (dim -2), masked entries 0:
    clipped_l2norm (LeakyReLU 0.1, then l2; SCAN's default and the only one TVRN / SGRAF use), l2norm, softmax,
    l1norm, clipped_l1norm (LeakyReLU first), clipped (LeakyReLU only) or no_norm."""
    if norm == "softmax":
        return torch.softmax(scores.masked_fill(~mask, NEG), dim=-2).masked_fill(~mask, 0.0)
    s = scores if norm in ("l2norm", "l1norm", "no_norm") else F.leaky_relu(scores, 0.1)
    s = s.masked_fill(~mask, 0.0)
    if norm in ("clipped_l2norm", "l2norm"):
        return l2norm(s, dim=-2)
    if norm in ("clipped_l1norm", "l1norm"):
        return s / (s.abs().sum(-2, keepdim=True) + EPS)
    if norm in ("clipped", "no_norm"):
        return s
    raise ValueError(f"unknown attention norm {norm!r}")


def attention_weights(scores: torch.Tensor, mask: torch.Tensor, lam: float,
                      bias: torch.Tensor | None = None, norm: str = "clipped_l2norm") -> torch.Tensor:
    """SCAN's attention weights from raw scores.

    scores (..., Lq, Lc): s[i, j] = <key_j, query_i>; mask broadcastable to (..., Lq, Lc), True where query i may
    attend context j. The scores are normalised across the queries i for each context j (`normalise_scores`;
    default: rectified with LeakyReLU 0.1 and l2-normalised, masked entries excluded), then a softmax over j of
    lam * s (+ bias, a log-prior over j). Returns (..., Lq, Lc); rows of padded queries are finite garbage the
    caller must ignore.
    """
    mask = mask.expand_as(scores)
    logits = lam * normalise_scores(scores, mask, norm)
    if bias is not None:
        logits = logits + bias
    return masked_softmax(logits, mask.expand_as(logits), dim=-1)


class Attention(nn.Module):
    """Attn(Q, C) of docs/models.md within one sequence set (relational / textual context).

    queries (B, Lq, D), context (B, Lc, D), mask (B, Lq, Lc) -> (B, Lq, D), unit length:
    s[i, j] = <Wk C_j, Wq Q_i>, weights by `attention_weights`, output_i = l2(sum_j a[i, j] C_j).
    score: "dot" (as above); "cosine" (the projections l2-normalised first: the designed spatial context);
    "published" (the TVRN authors' spatial score, self-attention only: <Wk C_j, Wq Q_i> / (max(|q_i|, 1e-8)
    max(|k_i|, 1e-8)), the key's norm taken at the QUERY's index i; docs/published-tvrn.md A).
    """

    SCORES = ("dot", "cosine", "published")

    def __init__(self, dim: int, lam: float, cosine: bool = False, score: str | None = None):
        super().__init__()
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.lam = lam
        self.score = score or ("cosine" if cosine else "dot")
        if self.score not in self.SCORES:
            raise ValueError(f"unknown attention score {self.score!r}, expected one of {self.SCORES}")

    def forward(self, queries, context, mask, weight: torch.Tensor | None = None, record: dict | None = None):
        """weight: (B, Lq, Lc) factor applied to the raw scores before normalisation (the published spatial
        context's adjacency, which multiplies instead of masking), or None. record: a dict that receives
        "weights", the attention weights (B, Lq, Lc) this call used (`tvrn.models.explain`), or None."""
        q, k = self.q(queries), self.k(context)  # (B, Lq, D), (B, Lc, D)
        if self.score == "cosine":
            q, k = l2norm(q), l2norm(k)
        s = q @ k.transpose(1, 2)  # (B, Lq, D) @ (B, D, Lc) -> (B, Lq, Lc)
        if self.score == "published":
            if q.shape[1] != k.shape[1]:
                raise ValueError("the published spatial score needs self-attention (as many queries as context items)")
            s = s / (q.norm(dim=-1).clamp_min(EPS) * k.norm(dim=-1).clamp_min(EPS)).unsqueeze(-1)  # (B, Lq, 1)
        if weight is not None:
            s = s * weight
        a = attention_weights(s, mask, self.lam)  # (B, Lq, Lc)
        if record is not None:
            record["weights"] = a
        return l2norm(a @ context)  # (B, Lq, Lc) @ (B, Lc, D) -> (B, Lq, D)


def pair_mask(qmask: torch.Tensor, cmask: torch.Tensor) -> torch.Tensor:
    """(B, Lq), (B, Lc) -> (B, Lq, Lc)."""
    return qmask[:, :, None] & cmask[:, None, :]


def spatial_mask(adjacency: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """IoU adjacency (B, R, R) restricted to real regions, diagonal always True for real regions."""
    eye = torch.eye(mask.shape[1], dtype=torch.bool, device=mask.device)
    return (adjacency.bool() | eye) & pair_mask(mask, mask)  # (B, R, R)


class SelfAttentionPool(nn.Module):
    """SGRAF's VisualSA / TextSA: pool tokens with weights guided by their (masked) mean.

    x (..., N, D), mask broadcastable to (..., N) -> (..., D), unit length. w_n = softmax_n(W_c (e_n * e_g)),
    e_n = drop(tanh(norm(W_l x_n))), e_g = drop(tanh(norm(W_g mean(x)))). `norm` is LayerNorm over D (the
    official VisualSA's BatchNorm sized to 72 tokens depends on the token count and on the other images of the
    batch) or none (TextSA). Works for any N.

    Dropout is the module's own (fresh masks per call) unless explicit keep-masks are given (`dropout_mask`):
    TVRN pools per pair, and its training path computes a pair's score twice (a fast pass, then the
    recomputation its backward needs), so the masks are drawn once per caption and travel with the caption's
    encodings: both passes, and every image the caption is paired with, use the same ones.
    """

    def __init__(self, dim: int, dropout: float, norm: str | None, tokens: int | None = None):
        """norm: "layer" (LayerNorm over D), "batch" (SGRAF's VisualSA: BatchNorm1d over the `tokens` slots of
        the local embeddings and BatchNorm1d(D) on the guide vector) or None (TextSA)."""
        super().__init__()
        self.local = nn.Linear(dim, dim)
        self.glob = nn.Linear(dim, dim)
        if norm == "batch":
            if not tokens:
                raise ValueError("BatchNorm pooling needs its number of token slots")
            self.local_norm, self.glob_norm = nn.BatchNorm1d(tokens), nn.BatchNorm1d(dim)
        elif norm == "layer":
            self.local_norm, self.glob_norm = nn.LayerNorm(dim), nn.LayerNorm(dim)
        elif norm is None:
            self.local_norm, self.glob_norm = nn.Identity(), nn.Identity()
        else:
            raise ValueError(f"unknown pooling norm {norm!r}")
        self.tokens = tokens if norm == "batch" else None
        self.common = nn.Linear(dim, 1, bias=False)  # a bias would cancel in the softmax (SGRAF has one)
        self.drop = nn.Dropout(dropout)

    def dropout_mask(self, shape, like: torch.Tensor) -> torch.Tensor | None:
        """Scaled keep-mask of `shape` (0 or 1 / (1 - p), like nn.Dropout), or None when dropout is inactive
        (eval mode or p = 0)."""
        p = self.drop.p
        if not self.training or p == 0:
            return None
        return torch.empty(shape, dtype=like.dtype, device=like.device).bernoulli_(1 - p).div_(1 - p)

    def embed_local(self, x, drop: torch.Tensor | None = None):
        """(..., N, D) -> (..., N, D); per token, so a caller may precompute it for a fixed part of x.
        drop: keep-mask broadcastable to the output, or None (the module's dropout)."""
        e = torch.tanh(self.local_norm(self.local(x)))
        return self.drop(e) if drop is None else e * drop

    def embed_global(self, mean, drop: torch.Tensor | None = None):
        """Guide vector e_g (..., D) from the token mean (..., D); drop as in embed_local."""
        e = torch.tanh(self.glob_norm(self.glob(mean)))
        return self.drop(e) if drop is None else e * drop

    def forward(self, x, mask, local=None, drop_glob: torch.Tensor | None = None):
        """local: e_n (..., N, D) if the caller has it; drop_glob: keep-mask of e_g, or None."""
        if self.tokens is not None and (x.dim() != 3 or x.shape[1] != self.tokens):
            raise ValueError(f"BatchNorm pooling was built for (B, {self.tokens}, D) tokens, got {tuple(x.shape)}")
        mask = mask.expand(x.shape[:-1])  # (..., N)
        e_g = self.embed_global(masked_mean(x, mask), drop_glob)  # (..., D)
        e_l = self.embed_local(x) if local is None else local  # (..., N, D)
        w = self.common(e_l * e_g.unsqueeze(-2)).squeeze(-1)  # (..., N)
        w = masked_softmax(w, mask)  # (..., N)
        return l2norm((w.unsqueeze(-1) * x).sum(-2))  # (..., D)


def gru_scan(cell: nn.GRUCell, gi: torch.Tensor, mask: torch.Tensor, h0: torch.Tensor | None = None):
    """Run a GRU cell over T steps whose input gates are precomputed; masked steps leave the state unchanged.

    gi (..., T, 3D) = W_ih x_t + b_ih (PyTorch gate order r, z, n); mask broadcastable to (..., T);
    h0 broadcastable to (..., D) or None (zeros). Returns outputs (..., T, D) and the last state (..., D).
    Batch dims broadcast, so a per-caption h0 (1, Nt, D) with per-pair gi (Ni, Nt, T, 3D) costs no copy.
    """
    D = cell.hidden_size
    h = gi.new_zeros(gi.shape[:-2] + (D,)) if h0 is None else h0
    masks = mask.expand(gi.shape[:-1]).unbind(-1)  # T x (...)
    # unbind, not gi[..., t, :]: the backward of T separate selects would write T full-size zero tensors
    steps = gi.unbind(-2)  # T x (..., 3D)
    out = []
    for t, g in enumerate(steps):
        gh = F.linear(h, cell.weight_hh, cell.bias_hh)  # (..., 3D)
        x_r, x_z, x_n = g.chunk(3, -1)  # 3 x (..., D)
        h_r, h_z, h_n = gh.chunk(3, -1)
        r = torch.sigmoid(x_r + h_r)
        z = torch.sigmoid(x_z + h_z)
        n = torch.tanh(x_n + r * h_n)
        h_new = (1 - z) * n + z * h
        h = torch.where(masks[t][..., None], h_new, h)  # (..., D)
        out.append(h)
    return torch.stack(out, -2), h  # (..., T, D), (..., D)


def gru_scan_dense(cell: nn.GRUCell, gi: torch.Tensor, h0: torch.Tensor, out: torch.Tensor,
                   gh0: torch.Tensor | None = None) -> torch.Tensor:
    """`gru_scan` without a mask (every step real), for inference: fused gate ops, outputs written in place.

    gi (P, T, 3D) input gates W_ih x_t + b_ih, contiguous, overwritten; h0 (P, D), may be a stride-0 expansion
    of per-caption states; out (P, T, D) receives h_1..h_T and is returned. gh0 (P, 3D) = W_hh h0 + b_hh if the
    caller has it (for a per-caption h0 it is a per-caption product: the first step costs no pair matmul).
    The r, z gates take x + b_hh as the addmm input (one pass instead of matmul, bias copy, add).
    """
    D = cell.hidden_size
    w_rz, w_n = cell.weight_hh[: 2 * D].t(), cell.weight_hh[2 * D :].t()  # (D, 2D), (D, D)
    b_n = cell.bias_hh[2 * D :]  # (D,)
    gi[..., : 2 * D] += cell.bias_hh[: 2 * D]  # x_rz + b_hh_rz
    h = h0.to(gi.dtype)  # one dtype through the loop (bf16 / fp16 under autocast)
    gh0 = None if gh0 is None else gh0.to(gi.dtype)
    for t in range(gi.shape[1]):
        x = gi[:, t]  # (P, 3D)
        if t == 0 and gh0 is not None:
            rz = (x[:, : 2 * D] + (gh0[:, : 2 * D] - cell.bias_hh[: 2 * D]).to(x.dtype)).sigmoid_()  # (P, 2D)
            hn = gh0[:, 2 * D :]  # (P, D)
        else:
            rz = torch.addmm(x[:, : 2 * D], h, w_rz).sigmoid_()  # x_rz + (P, D) @ (D, 2D) -> (P, 2D) r, z
            hn = torch.addmm(b_n, h, w_n)  # (P, D) @ (D, D) -> (P, D)
        n = torch.addcmul(x[:, 2 * D :], rz[:, :D], hn).tanh_()  # (P, D)
        torch.lerp(n, h, rz[:, D:], out=out[:, t])  # h_t = (1 - z) n + z h_(t-1)
        h = out[:, t]  # (P, D) view with row stride T*D: the next addmm reads it in place
    return out


def gru_input(cell: nn.GRUCell, x: torch.Tensor) -> torch.Tensor:
    """(..., T, Din) -> (..., T, 3D) input gates of every step in one matmul."""
    return F.linear(x, cell.weight_ih, cell.bias_ih)


class RegionEncoder(nn.Module):
    """Region features (B, R, Dv), mask (B, R) -> content IRs V = l2(FC(F)) (B, R, D), padded rows zero
    (normalize=False: FC(F), SCAN's --no_imgnorm)."""

    def __init__(self, img_dim: int, embed_size: int, normalize: bool = True):
        super().__init__()
        self.fc = nn.Linear(img_dim, embed_size)
        self.normalize = normalize
        r = math.sqrt(6.0) / math.sqrt(img_dim + embed_size)  # SCAN / SGRAF init
        nn.init.uniform_(self.fc.weight, -r, r)
        nn.init.zeros_(self.fc.bias)

    def forward(self, features, mask):
        v = self.fc(features)
        return (l2norm(v) if self.normalize else v) * mask.unsqueeze(-1)  # (B, R, D)


class GraphReasoning(nn.Module):
    """SGR: `steps` rounds of N <- relu(W_g softmax((W_q N)(W_k N)^T) N) over nodes (B, n, S), masked keys."""

    def __init__(self, sim_dim: int, steps: int):
        super().__init__()
        self.steps = nn.ModuleList(
            nn.ModuleDict({"query": nn.Linear(sim_dim, sim_dim),
                           "key": nn.Linear(sim_dim, sim_dim, bias=False),  # its bias cancels in the softmax
                           "graph": nn.Linear(sim_dim, sim_dim)}) for _ in range(steps))

    def forward(self, nodes, mask, read_global: bool, record: dict | None = None):
        """nodes (B, n, S), mask (B, n) -> (B, S): node 0 if read_global else the masked mean.
        record: a dict that receives "edges", the list of each step's edge weights (B, n, n) (rows: the node
        updated, columns: the nodes it reads), or None."""
        edges = [] if record is not None else None
        for step in self.steps:
            edge = step["query"](nodes) @ step["key"](nodes).transpose(1, 2)  # (B, n, S) @ (B, S, n) -> (B, n, n)
            edge = masked_softmax(edge, mask[:, None, :].expand_as(edge))  # softmax over keys
            if edges is not None:
                edges.append(edge)
            nodes = torch.relu(step["graph"](edge @ nodes))  # (B, n, n) @ (B, n, S) -> (B, n, S)
        if record is not None:
            record["edges"] = edges
        return nodes[:, 0] if read_global else masked_mean(nodes, mask)

    def forward_dense(self, nodes, read_global: bool):
        """`forward` for nodes (P, n, S) that are all real, with two exact shortcuts (inference, and the training
        recomputation's `score_grid`): edges (W_q N + b_q)(W_k N)^T = (N M + c) N^T with M = W_q^T W_k (S, S)
        and c = W_k^T b_q, one projection instead of two; and when only the global node is read, the last step
        updates node 0 only."""
        P, n, S = nodes.shape
        last = len(self.steps) - 1
        for k, step in enumerate(self.steps):
            wq, bq, wk = step["query"].weight, step["query"].bias, step["key"].weight  # (S, S), (S,), (S, S)
            M, c = wq.t() @ wk, wk.t() @ bq  # (S, S), (S,)
            if read_global and k == last:
                q0 = torch.addmm(c, nodes[:, 0], M)  # (P, S)
                edge = torch.softmax(torch.bmm(nodes, q0.unsqueeze(-1)).squeeze(-1), -1)  # (P,n,S)@(P,S,1) -> (P, n)
                agg = torch.bmm(edge.unsqueeze(1), nodes).squeeze(1)  # (P,1,n)@(P,n,S) -> (P, S)
                return torch.relu(step["graph"](agg))  # (P, S)
            q = torch.addmm(c, nodes.reshape(P * n, S), M).view(P, n, S)  # (P, n, S)
            edge = torch.softmax(torch.bmm(q, nodes.transpose(1, 2)), -1)  # (P,n,S)@(P,S,n) -> (P, n, n)
            nodes = torch.relu(step["graph"](torch.bmm(edge, nodes)))  # (P,n,n)@(P,n,S) -> (P, n, S)
        return nodes[:, 0] if read_global else nodes.mean(1)


class AttentionFiltration(nn.Module):
    """SAF: w_n = sigmoid(a . N_n + b), l1-normalised over real nodes; returns l2(sum_n w_n N_n) (B, S).

    SGRAF puts a BatchNorm1d(1) before the sigmoid; in eval mode it is an affine map that the linear already
    has, and in training it mixes the pairs of a batch, so it is left out.
    """

    def __init__(self, sim_dim: int):
        super().__init__()
        self.attn = nn.Linear(sim_dim, 1)

    def forward(self, nodes, mask, read_global: bool = True, record: dict | None = None):
        """nodes (B, n, S), mask (B, n) -> (B, S). record: a dict that receives "weights", the normalised node
        weights w (B, n), or None."""
        w = torch.sigmoid(self.attn(nodes).squeeze(-1)) * mask  # (B, n)
        w = w / (w.sum(-1, keepdim=True) + EPS)
        if record is not None:
            record["weights"] = w
        return l2norm((w.unsqueeze(-1) * nodes).sum(1))  # (B, S)

    def forward_parts(self, glob, locals_raw):
        """`forward` of the all-real nodes [glob; l2(M) for M in locals_raw] without forming them (inference, and
        the training recomputation's `score_grid`).

        glob (P, S) unit or None; locals_raw: tensors (P, n_k, S) before their l2 norm. With r = ||M|| + EPS,
        <a, M / r> = <a, M> / r and sum_j w_j M_j / r_j: each local tensor is read three times (norm, <a, M>,
        weighted sum) and never rewritten."""
        a, b = self.attn.weight[0], self.attn.bias  # (S,), (1,)
        total, vec = 0.0, 0.0
        for M in locals_raw:
            P, n, S = M.shape
            r = torch.linalg.vector_norm(M, dim=-1) + EPS  # (P, n); (P, n) tensors are small: out of place,
            w = torch.sigmoid((M.reshape(P * n, S) @ a).view(P, n) / r + b)  # (P, n)  so autograd can run through
            total = total + w.sum(1)  # (P,)
            vec = vec + torch.bmm((w / r).unsqueeze(1), M).squeeze(1)  # (P,1,n)@(P,n,S) -> (P, S)
        if glob is not None:
            w = torch.sigmoid(glob @ a + b)  # (P,)
            total = total + w
            vec = vec + w[:, None] * glob
        return l2norm(vec / (total + EPS)[:, None])  # (P, S)


def init_linears(module: nn.Module) -> None:
    """SGRAF's init: Xavier-uniform weights, zero biases, for every nn.Linear below `module`."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            r = math.sqrt(6.0) / math.sqrt(m.in_features + m.out_features)
            nn.init.uniform_(m.weight, -r, r)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
