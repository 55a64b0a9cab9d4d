"""An independent float64 transcription of the TVRN authors' released scoring (docs/published-tvrn.md).

The reference tvrn's published-mode implementation is tested against. It imports nothing from tvrn and is
written like the equations: per image, per caption, per pair, with the checkpoint's own tensor names
(docs/published-tvrn.md section I). Slow on purpose; use small sizes.

Notation: R regions, Dv region feature size, W word_dim, D embed_size, S sim_dim, L real words of a caption.
l2(x) = x / (||x|| + 1e-8), rho = LeakyReLU(0.1), lambda = 9. Differences from the designed model (A-F):
A  spatial score r[i, j] = <k_i, q_j> / (max(|q_j|, 1e-8) max(|k_j|, 1e-8))  (key norm at the query's index j);
B  the adjacency multiplies the score: non-adjacent regions keep softmax weight exp(0) / Z;
C  module 3's gates are all ones (plain word-to-unit attention);
D  one projection pair (`scan_attention.fcq`, `.fck`) for relational context, text context and expansion;
E  refine="first": a caption is refined against the first image of its image shard only;
F  published_eval_scores: image k of every shard uses the adjacency of image (Nt - shard + k) // (Nt // Ni).
"""
from __future__ import annotations

import argparse
import math

import torch

LAMBDA = 9.0
EPS = 1e-8       # l2 norm, l1 norm of SAF
BN_EPS = 1e-5    # BatchNorm1d


# ----------------------------------------------------------------------------- primitives
def l2(x, dim=-1):
    """x / (||x|| + 1e-8) along dim."""
    return x / (x.norm(dim=dim, keepdim=True) + EPS)


def rho(x):
    return torch.nn.functional.leaky_relu(x, 0.1)


def linear(x, sd, name):
    """x (..., in) -> x W^T + b with W = sd[name.weight] (out, in), b = sd[name.bias] (out,)."""
    return x @ sd[name + ".weight"].T + sd[name + ".bias"]


def batchnorm_eval(x, sd, name):
    """Eval-mode BatchNorm1d on x (C, N): channel c (the first axis) uses running_mean[c], running_var[c]."""
    mean, var = sd[name + ".running_mean"][:, None], sd[name + ".running_var"][:, None]
    w, b = sd[name + ".weight"][:, None], sd[name + ".bias"][:, None]
    return (x - mean) / torch.sqrt(var + BN_EPS) * w + b


def gru(x, sd, name, suffix="_l0", h0=None):
    """PyTorch GRU layer (gate order r, z, n) over x (T, Din) from h0 (zeros) -> outputs h_1..h_T (T, H).
    r = sig(W_ir x + b_ir + W_hr h + b_hr); z likewise; n = tanh(W_in x + b_in + r * (W_hn h + b_hn));
    h' = (1 - z) n + z h."""
    W_ih, W_hh = sd[f"{name}.weight_ih{suffix}"], sd[f"{name}.weight_hh{suffix}"]
    b_ih, b_hh = sd[f"{name}.bias_ih{suffix}"], sd[f"{name}.bias_hh{suffix}"]
    H = W_hh.shape[1]
    h = x.new_zeros(H) if h0 is None else h0
    out = []
    for t in range(x.shape[0]):
        gi, gh = W_ih @ x[t] + b_ih, W_hh @ h + b_hh
        r = torch.sigmoid(gi[:H] + gh[:H])
        z = torch.sigmoid(gi[H:2 * H] + gh[H:2 * H])
        n = torch.tanh(gi[2 * H:] + r * gh[2 * H:])
        h = (1 - z) * n + z * h
        out.append(h)
    return torch.stack(out)


def scan_attention(Q, C, sd, name="scan_attention"):
    """Attn(Q, C), Q (n, D) queries, C (m, D) context -> (n, D) (D: the shared `scan_attention.fcq`, `.fck`).
    s[i, j] = <Wk C_j + bk, Wq Q_i + bq>; s <- l2 over the queries i of rho(s), per context j;
    a[i, :] = softmax_j(lambda s[i, :]); out_i = l2(sum_j a[i, j] C_j)."""
    q, k = linear(Q, sd, name + ".fcq"), linear(C, sd, name + ".fck")  # (n, D), (m, D)
    s = l2(rho(q @ k.T), dim=0)  # (n, m), normalised over queries (dim 0)
    a = torch.softmax(LAMBDA * s, dim=1)  # (n, m)
    return l2(a @ C)


def spatial_weights(V, A, sd):
    """A + B: weights w (R, R), w[j, i] = weight of source region i for query region j.
    q_j = W_q v_j + b_q, k_i = W_k v_i + b_k (the similarity module's `fcq`, `fck`);
    r[i, j] = <k_i, q_j> / (max(|q_j|, 1e-8) max(|k_j|, 1e-8)); s = rho(A * r); s~[i, :] = l2(s[i, :]) over j;
    w[j, i] = softmax_i(lambda s~[i, j]) over ALL regions i. A (R, R) 0/1, used as given (their files: diagonal 1)."""
    q, k = linear(V, sd, "fcq"), linear(V, sd, "fck")  # (R, D)
    qn, kn = q.norm(dim=1).clamp_min(1e-8), k.norm(dim=1).clamp_min(1e-8)  # (R,)
    R = V.shape[0]
    r = torch.empty(R, R, dtype=V.dtype)
    for i in range(R):
        for j in range(R):
            r[i, j] = (k[i] @ q[j]) / (qn[j] * kn[j])
    s = rho(A.to(V.dtype) * r)  # (R source i, R query j)
    s = l2(s, dim=1)  # over the query index j
    return torch.softmax(LAMBDA * s.T, dim=1)  # (query j, source i), softmax over i


def spatial_context(V, A, sd):
    """p_j = l2(sum_i w[j, i] v_i) -> (R, D)."""
    return l2(spatial_weights(V, A, sd) @ V)


# ----------------------------------------------------------------------------- pooling, reasoning
def visual_sa(U, sd):
    """VisualSA (eval mode) of U (2R, D) -> g (D,). e_t = tanh(BN72(W_l U_t + b_l)) (BatchNorm over the 2R token
    slots), e_g = tanh(BN_D(W_g mean_t U_t + b_g)); w = softmax_t(W_c (e_t * e_g) + b_c); g = l2(sum_t w_t U_t)."""
    p = "v_global_w"
    n_slots = sd[p + ".embedding_local.1.weight"].shape[0]
    if U.shape[0] != n_slots:
        raise ValueError(f"VisualSA's BatchNorm has {n_slots} token slots, got {U.shape[0]} units (2R)")
    e_l = torch.tanh(batchnorm_eval(linear(U, sd, p + ".embedding_local.0"), sd, p + ".embedding_local.1"))
    e_g = linear(U.mean(0), sd, p + ".embedding_global.0")  # (D,)
    e_g = torch.tanh(batchnorm_eval(e_g[:, None], sd, p + ".embedding_global.1")[:, 0])  # channels = D
    w = torch.softmax(linear(e_l * e_g, sd, p + ".embedding_common.0")[:, 0], dim=0)  # (2R,)
    return l2(w @ U)


def text_sa(T_ref, sd):
    """TextSA (eval mode) of T_ref (2L, D) -> t_glo (D,): VisualSA without the BatchNorms."""
    p = "t_global_w"
    e_l = torch.tanh(linear(T_ref, sd, p + ".embedding_local.0"))
    e_g = torch.tanh(linear(T_ref.mean(0), sd, p + ".embedding_global.0"))
    w = torch.softmax(linear(e_l * e_g, sd, p + ".embedding_common.0")[:, 0], dim=0)
    return l2(w @ T_ref)


def sgr(N, sd, steps):
    """SGR over nodes N (n, S): N <- relu(W_g (softmax_keys((W_q N + b_q)(W_k N + b_k)^T) N) + b_g); node 0."""
    for k in range(steps):
        p = f"SGR_module.{k}"
        edges = torch.softmax(linear(N, sd, p + ".graph_query_w") @ linear(N, sd, p + ".graph_key_w").T, dim=1)
        N = torch.relu(linear(edges @ N, sd, p + ".sim_graph_w"))
    return N[0]


def saf(N, sd):
    """SAF over nodes N (n, S): w_n = sigmoid(bn(a . N_n + b)), w /= (sum w + 1e-8); l2(sum_n w_n N_n)."""
    y = linear(N, sd, "SAF_module.attn_sim_w")  # (n, 1)
    w = torch.sigmoid(batchnorm_eval(y.T, sd, "SAF_module.bn")[0])  # BatchNorm1d(1): one channel
    w = w / (w.abs().sum() + EPS)
    return l2(w @ N)


# ----------------------------------------------------------------------------- image, caption, pair
def encode_image(feats, A, img, sim):
    """One image: feats (R, Dv), A (R, R) -> dict V (R, D), C (R, D), U (2R, D), g (D,).
    V = l2(fc(F)); C = l2((Attn(V, V) + p) / 2); M = l2(rho(V * C)); h = GRU_img([V; M]) from 0;
    U_t = l2(h_t + V_(t mod R)); g = VisualSA(U)."""
    V = l2(linear(feats, img, "fc"))
    C = l2((scan_attention(V, V, sim) + spatial_context(V, A, sim)) / 2)
    M = l2(rho(V * C))
    h = gru(torch.cat([V, M]), sim, "img_rnn")  # (2R, D)
    U = l2(h + torch.cat([V, V]))
    return {"V": V, "C": C, "U": U, "g": visual_sa(U, sim)}


def encode_caption(tokens, txt, sim):
    """One caption: tokens (L,) -> dict T (L, D), T_ctx (L, D). x = embed(tokens); forward GRU over x_1..x_L,
    backward GRU over x_L..x_1 (`_reverse`), outputs at each word averaged, l2; T_ctx = Attn(T, T)."""
    x = txt["embed.weight"][tokens]  # (L, W)
    fwd = gru(x, txt, "cap_rnn")
    bwd = gru(x.flip(0), txt, "cap_rnn", suffix="_l0_reverse").flip(0)
    T = l2((fwd + bwd) / 2)
    return {"T": T, "T_ctx": scan_attention(T, T, sim)}


def refine_caption(cap, C, sim):
    """Module 2 against context IRs C (R, D): E = Attn(T_ctx, C); z = GRU_cap([T; E]) from 0;
    T_ref_t = l2(z_t + T_(t mod L)) (2L, D); t_glo = TextSA(T_ref). Returns (T_ref, t_glo)."""
    T = cap["T"]
    E = scan_attention(cap["T_ctx"], C, sim)
    z = gru(torch.cat([T, E]), sim, "cap_rnn")
    T_ref = l2(z + torch.cat([T, T]))
    return T_ref, text_sa(T_ref, sim)


def pair_score(im, T_ref, t_glo, sim, module, steps):
    """Score of an image (U (2R, D), g) and a refined caption (T_ref (2L, D), t_glo) -> scalar in (0, 1).
    Module 3 (gates = 1): a[i, r] = softmax_r(lambda l2_over_words(rho(<T_ref_i, U_r>))); U_hat_i = l2(sum_r a U_r);
    sigma_i = l2(W_loc (U_hat_i - T_ref_i)^2 + b_loc), sigma_g = l2(W_glo (g - t_glo)^2 + b_glo);
    nodes [sigma_g; sigma_1..sigma_2L] -> SGR / SAF -> sigmoid(sim_eval_w . out + b)."""
    U, g = im["U"], im["g"]
    s = l2(rho(T_ref @ U.T), dim=0)  # (2L, 2R), l2 across the words for each unit
    a = torch.softmax(LAMBDA * s, dim=1)
    U_hat = l2(a @ U)  # (2L, D)
    local = l2(linear((U_hat - T_ref) ** 2, sim, "sim_tranloc_w"))  # (2L, S)
    glob = l2(linear((g - t_glo) ** 2, sim, "sim_tranglo_w"))  # (S,)
    nodes = torch.cat([glob[None], local])  # (1 + 2L, S)
    out = sgr(nodes, sim, steps) if module == "SGR" else saf(nodes, sim)
    return torch.sigmoid(linear(out, sim, "sim_eval_w"))[0]


# ----------------------------------------------------------------------------- whole matrices
def _unpack(ckpt):
    """-> (img, txt, sim) float64 state dicts, module_name, sgr_step."""
    opt = ckpt["opt"]
    if getattr(opt, "num_layers", 1) != 1 or not getattr(opt, "bi_gru", True) \
            or getattr(opt, "no_imgnorm", False) or getattr(opt, "no_txtnorm", False):
        raise ValueError("the reference covers num_layers=1, bi_gru=True, no_imgnorm=False, no_txtnorm=False")
    if opt.module_name not in ("SGR", "SAF"):
        raise ValueError(f"module_name {opt.module_name!r}")
    img, txt, sim = ({k: (v.double() if v.is_floating_point() else v) for k, v in sd.items()}
                     for sd in ckpt["model"])
    return img, txt, sim, opt.module_name, int(opt.sgr_step)


def official_scores(ckpt, feats, adjacency, captions, refine="pair", shard=100):
    """Scores (Ni, Nt) float64, rows images, columns captions.

    ckpt: the authors' checkpoint dict (make_official_checkpoint); feats (Ni, R, Dv); adjacency (Ni, R, R) bool;
    captions: list of Nt 1-D LongTensors of token ids (length >= 1, real words only).
    refine="pair": caption c is refined (module 2, t_glo) against image k for the pair (k, c).
    refine="first" (E): images in shards [0, shard), [shard, 2 shard), ...; each caption is refined against the
    first image of the shard and that refined caption is scored against every image of the shard."""
    if refine not in ("pair", "first"):
        raise ValueError(f"refine must be 'pair' or 'first', got {refine!r}")
    if shard < 1:
        raise ValueError("shard must be >= 1")
    if any(c.dim() != 1 or c.numel() < 1 for c in captions):
        raise ValueError("every caption must be a 1-D tensor of at least one token id")
    img, txt, sim, module, steps = _unpack(ckpt)
    feats, adjacency = torch.as_tensor(feats).double(), torch.as_tensor(adjacency)
    images = [encode_image(feats[k], adjacency[k], img, sim) for k in range(feats.shape[0])]
    caps = [encode_caption(c.long(), txt, sim) for c in captions]
    out = torch.empty(len(images), len(caps), dtype=torch.float64)
    for c, cap in enumerate(caps):
        for start in range(0, len(images), shard):
            first = refine_caption(cap, images[start]["C"], sim) if refine == "first" else None
            for k in range(start, min(start + shard, len(images))):
                T_ref, t_glo = first if first is not None else refine_caption(cap, images[k]["C"], sim)
                out[k, c] = pair_score(images[k], T_ref, t_glo, sim, module, steps)
    return out


def official_adjacency_substitution(adjacency, n_captions, shard):
    """F: (Ni, R, R) -> (Ni, R, R) where image s + k of every image shard (s a multiple of shard) gets the
    adjacency of image (n_captions - shard + k) // (n_captions // Ni): the images of the last loader batch of
    `shard` captions. Needs Ni % shard == 0, n_captions % shard == 0 and n_captions % Ni == 0 (their loader's
    captions-per-image layout); ValueError otherwise."""
    Ni = adjacency.shape[0]
    if shard < 1 or Ni == 0 or Ni % shard or n_captions == 0 or n_captions % shard or n_captions % Ni:
        raise ValueError(f"their evaluation needs Ni % shard == 0, Nt % shard == 0 and Nt % Ni == 0; got Ni={Ni}, "
                         f"Nt={n_captions}, shard={shard}")
    per_image = n_captions // Ni
    idx = [(n_captions - shard + (k % shard)) // per_image for k in range(Ni)]
    return adjacency[torch.tensor(idx)]


def published_eval_scores(ckpt, feats, adjacency, captions, shard=100):
    """Their evaluation (E + F): official_scores with refine="first" and the substituted adjacency. (Ni, Nt)."""
    adj = official_adjacency_substitution(adjacency, len(captions), shard)
    return official_scores(ckpt, feats, adj, captions, refine="first", shard=shard)


# ----------------------------------------------------------------------------- checkpoint
def make_official_checkpoint(module="SGR", img_dim=10, word_dim=7, embed=12, sim_dim=6, regions=4, vocab_size=20,
                             sgr_step=3, seed=0, dtype=torch.float64):
    """A random checkpoint in the authors' layout (docs/published-tvrn.md section I) at small sizes:
    {"epoch", "model": [image encoder, text encoder, similarity module state dicts], "best_rsum", "opt", "Eiters"}.
    Weights N(0, 1/fan_in) (keeps activations away from saturation), biases N(0, 0.1), embeddings N(0, 1),
    BatchNorm weight 1 + N(0, 0.2), bias / running_mean N(0, 0.1), running_var U(0.5, 1.5)."""
    if module not in ("SGR", "SAF"):
        raise ValueError(f"module must be 'SGR' or 'SAF', got {module!r}")
    gen = torch.Generator().manual_seed(seed)
    D, S, W = embed, sim_dim, word_dim

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).to(dtype)

    def lin(sd, name, n_out, n_in):
        sd[name + ".weight"] = randn(n_out, n_in, std=1 / math.sqrt(n_in))
        sd[name + ".bias"] = randn(n_out, std=0.1)

    def bn(sd, name, n):
        sd[name + ".weight"] = 1 + randn(n, std=0.2)
        sd[name + ".bias"] = randn(n, std=0.1)
        sd[name + ".running_mean"] = randn(n, std=0.1)
        sd[name + ".running_var"] = (0.5 + torch.rand(n, generator=gen, dtype=torch.float64)).to(dtype)
        sd[name + ".num_batches_tracked"] = torch.tensor(1000, dtype=torch.long)

    def rnn(sd, name, n_in, n_hid, suffix="_l0"):
        std = 1 / math.sqrt(n_hid)
        sd[f"{name}.weight_ih{suffix}"] = randn(3 * n_hid, n_in, std=std)
        sd[f"{name}.weight_hh{suffix}"] = randn(3 * n_hid, n_hid, std=std)
        sd[f"{name}.bias_ih{suffix}"] = randn(3 * n_hid, std=0.1)
        sd[f"{name}.bias_hh{suffix}"] = randn(3 * n_hid, std=0.1)

    img, txt, sim = {}, {}, {}
    lin(img, "fc", D, img_dim)
    txt["embed.weight"] = randn(vocab_size, W)
    rnn(txt, "cap_rnn", W, D)
    rnn(txt, "cap_rnn", W, D, suffix="_l0_reverse")
    lin(sim, "v_global_w.embedding_local.0", D, D)
    bn(sim, "v_global_w.embedding_local.1", 2 * regions)
    lin(sim, "v_global_w.embedding_global.0", D, D)
    bn(sim, "v_global_w.embedding_global.1", D)
    lin(sim, "v_global_w.embedding_common.0", 1, D)
    lin(sim, "t_global_w.embedding_local.0", D, D)
    lin(sim, "t_global_w.embedding_global.0", D, D)
    lin(sim, "t_global_w.embedding_common.0", 1, D)
    for name in ("sim_tranloc_w", "sim_tranglo_w", "sim_trancon_w"):
        lin(sim, name, S, D)
    lin(sim, "sim_eval_w", 1, S)
    for name in ("scan_attention.fcq", "scan_attention.fck", "scan_attention.fcv", "fcq", "fck", "fcv"):
        lin(sim, name, D, D)
    rnn(sim, "img_rnn", D, D)
    rnn(sim, "cap_rnn", D, D)
    if module == "SGR":
        for k in range(sgr_step):
            for name in ("graph_query_w", "graph_key_w", "sim_graph_w"):
                lin(sim, f"SGR_module.{k}.{name}", S, S)
    else:
        lin(sim, "SAF_module.attn_sim_w", 1, S)
        bn(sim, "SAF_module.bn", 1)
    opt = argparse.Namespace(
        data_path="./data", data_name="f30k_precomp", vocab_path="./vocab", margin=0.2, num_epochs=50,
        batch_size=64, word_dim=word_dim, embed_size=embed, sim_dim=sim_dim, grad_clip=2.0, num_layers=1,
        learning_rate=2e-4, lr_update=20, workers=2, log_step=100, logger_name="./runs/log",
        model_name="./runs/model", img_dim=img_dim, no_imgnorm=False, no_txtnorm=False, module_name=module,
        sgr_step=sgr_step, bi_gru=True, max_violation=False, focal_type="equal", lambda_softmax=9.0,
        vocab_size=vocab_size)
    return {"epoch": 10, "model": [img, txt, sim], "best_rsum": 500.0, "opt": opt, "Eiters": 12345}
