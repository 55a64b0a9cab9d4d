"""Two-stage search on the synthetic benchmark: shortlist recall vs exact, and the fraction of pairs scored.

Generates the synthetic benchmark with a Flickr30K-size test split (--test-images 1000, 5000 captions; train
and dev are byte-identical to the default `tvrn synth` output of the same seed, since every split has its own
random stream), trains a small TVRN (--preset, default demo_synth) with the auxiliary shortlist loss
(train.shortlist_loss_weight), then on the test split reports, for each (k_images per caption, k_texts per
image), the two-stage metrics (shortlist by the shortlist cosines, re-rank with the full score; a ground truth
outside the shortlist is a miss) next to exact all-pairs metrics and the shortlist alone.

    python benchmarks/bench_twostage.py [--data runs/bench_twostage/data] [--epochs 6] [--checkpoint CKPT]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from tvrn.data import iter_image_batches, iter_text_batches, load_split
from tvrn.data.synth import SynthConfig, write_dataset
from tvrn.evaluation import evaluate
from tvrn.checkpoint import load_trained
from tvrn.pipeline import resolve_config, train_from_config
from tvrn.scoring import encode_images, encode_texts, score_all
from tvrn.search import evaluate_two_stage


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="runs/bench_twostage/data", help="synthetic benchmark (generated if missing)")
    ap.add_argument("--test-images", type=int, default=1000, help="test split size when generating --data")
    ap.add_argument("--preset", default="demo_synth", help="config preset to train")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--checkpoint", help="evaluate this checkpoint instead of training one")
    ap.add_argument("--weight", type=float, default=1.0, help="train.shortlist_loss_weight")
    ap.add_argument("--run", default="runs/bench_twostage")
    ap.add_argument("--ks", nargs="*", default=["25:125", "20:100", "10:50", "5:25"], help="k_images:k_texts")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--override", nargs="*", default=["train.lr_milestones=[4]"], help="more config overrides")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "twostage.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg = resolve_config(a.preset, [f"data.root={a.data}", f"train.epochs={a.epochs}",
                                        f"train.shortlist_loss_weight={a.weight}",
                                        "train.shortlist_loss_epochs=0", *a.override])
    if not (Path(a.data) / "manifest.json").exists():
        write_dataset(a.data, SynthConfig(test_images=a.test_images, render_images=False))
    t0 = time.time()
    if a.checkpoint:
        ckpt = a.checkpoint
    else:
        summary = train_from_config(cfg, a.run)
        ckpt = summary.get("best_checkpoint") or summary.get("last_checkpoint")
    train_s = time.time() - t0
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
