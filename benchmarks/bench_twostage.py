"""Two-stage search on the synthetic benchmark: shortlist recall vs exact, and the fraction of pairs scored.

Trains a small TVRN (the `tvrn_synth` preset, or --preset) with the auxiliary shortlist loss (train.shortlist_loss_weight),
then on the test split (200 images x 1000 captions) reports, for each (k_images per caption, k_texts per image),
the two-stage metrics (shortlist by the shortlist cosines, re-rank with the full score; a ground truth outside
the shortlist is a miss) next to exact all-pairs metrics.

    python benchmarks/bench_twostage.py [--data data/synth] [--epochs 2] [--out benchmarks/results/twostage.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from tvrn.data import iter_image_batches, iter_text_batches, load_split
from tvrn.evaluation import evaluate
from tvrn.pipeline import load_trained, resolve_config, train_from_config
from tvrn.scoring import encode_images, encode_texts, score_all
from tvrn.search import evaluate_two_stage


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/synth")
    ap.add_argument("--preset", default="tvrn_synth", help="config preset to train")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--weight", type=float, default=1.0, help="train.shortlist_loss_weight")
    ap.add_argument("--run", default="runs/bench_twostage")
    ap.add_argument("--ks", nargs="*", default=["10:50", "5:25", "20:100"], help="k_images:k_texts")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--override", nargs="*", default=[], help="more config overrides")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "twostage.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg = resolve_config(a.preset, [f"data.root={a.data}", f"train.epochs={a.epochs}",
                                        f"train.shortlist_loss_weight={a.weight}", *a.override])
    t0 = time.time()
    summary = train_from_config(cfg, a.run)
    train_s = time.time() - t0
    ckpt = summary.get("best_checkpoint") or summary.get("last_checkpoint")
    model, tokenizer, _ = load_trained(ckpt)
    split = load_split(a.data, "test")
    thr = float(cfg["data"]["adjacency_threshold"])
    ei = encode_images(model, iter_image_batches(split, 200, adjacency_threshold=thr))
    et = encode_texts(model, iter_text_batches(split, tokenizer, 200))
    t0 = time.time()
    exact = score_all(model, ei, et)
    exact_s = time.time() - t0
    c2i = torch.as_tensor(split.caption_to_image)
    ks = [tuple(int(x) for x in k.split(":")) for k in a.ks]
    t0 = time.time()
    rows = evaluate_two_stage(model, ei, et, c2i, ks, exact_scores=exact)
    two_s = time.time() - t0
    gi, gt = model.shortlist_embed_image(ei), model.shortlist_embed_text(et)
    shortlist_only = evaluate((gi @ gt.t()).float(), c2i)
    res = {"command": " ".join(["python", *sys.argv]), "train_seconds": train_s, "checkpoint": str(ckpt),
           "exact": evaluate(exact, c2i), "exact_seconds": exact_s, "two_stage_seconds_all_ks": two_s,
           "shortlist_only": shortlist_only,
           "two_stage": [{k: v for k, v in r.items() if k != "exact"} for r in rows]}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    print(f"exact rsum {res['exact']['rsum']:.1f}; shortlist-only rsum {shortlist_only['rsum']:.1f}")
    print("| k_images | k_texts | pairs scored | two-stage rsum | exact rsum | gap |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['k_images']} | {r['k_texts']} | {100 * r['fraction']:.1f}% | {r['rsum']:.1f} | "
              f"{r['exact/rsum']:.1f} | {r['rsum_gap']:.2f} |")


if __name__ == "__main__":
    main()
