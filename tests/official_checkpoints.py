"""SCAN, SGRAF and VSE-infinity checkpoints as their official code saves them (a pickle of state dicts with the
official module names and shapes, and an argparse.Namespace of options), built at tiny sizes with seeded random
weights (float64, eval). Shared by tests/test_convert.py (which scores them against the official forward) and
tests/test_export.py (which exports the converted models)."""
from __future__ import annotations

import argparse

import torch
import torch.nn as nn

from tvrn.data import Vocabulary
from tvrn.data.vocab import SPECIAL_TOKENS

NI, R, DV, D, WD, S, V = 3, 5, 12, 16, 10, 8, 30  # images, regions, region features, embed, words, sim, vocabulary


def vocab():
    return Vocabulary(list(SPECIAL_TOKENS) + [f"w{i}" for i in range(V - 4)])


def official_save(tmp_path, parts, opt, name="official.pth.tar"):
    path = tmp_path / name
    torch.save({"epoch": 12, "model": [p.state_dict() for p in parts], "best_rsum": 1.0, "opt": opt, "Eiters": 99},
               path)
    return path


def randomise(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if t.is_floating_point():
                if name.endswith("running_var"):
                    t.copy_(torch.rand(t.shape, generator=g, dtype=t.dtype) + 0.5)
                else:
                    t.copy_(torch.randn(t.shape, generator=g, dtype=t.dtype) * 0.3)
    return module.double().eval()


# ----------------------------------------------------------------------------------------------------- SCAN
def scan_opt(**kw):
    base = dict(data_name="f30k_precomp", img_dim=DV, embed_size=D, word_dim=WD, num_layers=1, bi_gru=True,
                no_imgnorm=False, no_txtnorm=False, raw_feature_norm="clipped_l2norm", agg_func="LogSumExp",
                cross_attn="t2i", precomp_enc_type="basic", lambda_lse=6.0, lambda_softmax=9.0, max_violation=True,
                margin=0.2, vocab_size=V)
    base.update(kw)
    return argparse.Namespace(**base)


def scan_parts(opt, seed=1):
    fc = nn.Linear(opt.img_dim, opt.embed_size)
    if opt.precomp_enc_type == "weight_norm":
        fc = torch.nn.utils.weight_norm(fc, dim=None)
    img = nn.Module()
    img.fc = fc
    txt = nn.Module()
    txt.embed = nn.Embedding(V, opt.word_dim)
    txt.rnn = nn.GRU(opt.word_dim, opt.embed_size, opt.num_layers, batch_first=True, bidirectional=opt.bi_gru)
    return randomise(img, seed), randomise(txt, seed + 1)


# ---------------------------------------------------------------------------------------------------- SGRAF
def sgraf_opt(**kw):
    base = dict(data_name="f30k_precomp", img_dim=DV, embed_size=D, word_dim=WD, sim_dim=S, num_layers=1, bi_gru=True,
                no_imgnorm=False, no_txtnorm=False, module_name="SGR", sgr_step=3, margin=0.2, max_violation=True,
                vocab_size=V)
    base.update(kw)
    return argparse.Namespace(**base)


def _sa(visual):
    m = nn.Module()
    m.embedding_local = nn.Sequential(*([nn.Linear(D, D)] + ([nn.BatchNorm1d(R)] if visual else [])
                                        + [nn.Tanh(), nn.Dropout(0.4)]))
    m.embedding_global = nn.Sequential(*([nn.Linear(D, D)] + ([nn.BatchNorm1d(D)] if visual else [])
                                         + [nn.Tanh(), nn.Dropout(0.4)]))
    m.embedding_common = nn.Sequential(nn.Linear(D, 1))
    return m


def sgraf_parts(opt, seed=3):
    img, txt, sim = nn.Module(), nn.Module(), nn.Module()
    img.fc = nn.Linear(DV, D)
    txt.embed = nn.Embedding(V, WD)
    txt.cap_rnn = nn.GRU(WD, D, 1, batch_first=True, bidirectional=opt.bi_gru)
    sim.v_global_w, sim.t_global_w = _sa(True), _sa(False)
    sim.sim_tranloc_w, sim.sim_tranglo_w, sim.sim_eval_w = nn.Linear(D, S), nn.Linear(D, S), nn.Linear(S, 1)
    if opt.module_name == "SGR":
        steps = []
        for _ in range(opt.sgr_step):
            step = nn.Module()
            step.graph_query_w, step.graph_key_w, step.sim_graph_w = nn.Linear(S, S), nn.Linear(S, S), nn.Linear(S, S)
            steps.append(step)
        sim.SGR_module = nn.ModuleList(steps)
    else:
        sim.SAF_module = nn.Module()
        sim.SAF_module.attn_sim_w, sim.SAF_module.bn = nn.Linear(S, 1), nn.BatchNorm1d(1)
    return randomise(img, seed), randomise(txt, seed + 1), randomise(sim, seed + 2)


# --------------------------------------------------------------------------------------------- VSE-infinity
def vse_opt(**kw):
    base = dict(data_name="f30k_precomp", img_dim=DV, embed_size=D, word_dim=WD, num_layers=1, no_imgnorm=False,
                no_txtnorm=False, precomp_enc_type="basic", max_violation=True, margin=0.2, vocab_size=V)
    base.update(kw)
    return argparse.Namespace(**base)


def _gpo():
    m = nn.Module()
    m.gru, m.linear = nn.GRU(32, 32, 1, batch_first=True, bidirectional=True), nn.Linear(32, 1, bias=False)
    return m


def vse_parts(seed=7, bert_path=None):
    img = nn.Module()
    img.fc = nn.Linear(DV, D)
    img.mlp = nn.Module()
    img.mlp.layers = nn.ModuleList([nn.Linear(DV, D // 2), nn.Linear(D // 2, D)])
    img.mlp.bns = nn.ModuleList([nn.BatchNorm1d(D // 2), nn.BatchNorm1d(D)])
    img.gpool = _gpo()
    txt = nn.Module()
    if bert_path is None:
        txt.embed, txt.rnn = nn.Embedding(V, WD), nn.GRU(WD, D, 1, batch_first=True, bidirectional=True)
    else:
        from transformers import BertModel

        txt.bert = BertModel.from_pretrained(bert_path)
        txt.linear = nn.Linear(txt.bert.config.hidden_size, D)
    txt.gpool = _gpo()
    img, txt = randomise(img, seed), (randomise(txt, seed + 1) if bert_path is None else txt.double().eval())
    if bert_path is not None:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for mod in (txt.linear, txt.gpool):
                for t in mod.parameters():
                    t.copy_(torch.randn(t.shape, generator=g, dtype=t.dtype) * 0.3)
    return img, txt
