"""Two-stage search, stage 2 (re-ranking a shortlist) against the all-pairs scorer, per pair, at paper shapes.

Stage 2 scores a sparse set of pairs: each image against the captions shortlisted with it in either direction,
one `model.score` call per image (a search engine's query loop). The all-pairs scorer works on dense blocks.
This measures, in one run, pairs per second of both on the same encodings (random weights, so the shortlist is
arbitrary: only the cost is measured, not the recall; `bench_twostage.py` measures recall on a trained model):

- grid: `score_all` over Ni x Nt;
- stage 2: `two_stage_scores(k_images, k_texts)`, timed as a whole (shortlist + re-rank), pairs scored / time;
- their ratio (the fraction of the grid's per-pair rate that stage 2 keeps).

    python benchmarks/bench_stage2.py [--models sgraf_saf scan_t2i tvrn_sgr] [--out benchmarks/results/stage2.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_scoring import build, make_data  # noqa: E402

from tvrn.scoring import score_all  # noqa: E402
from tvrn.search import two_stage_scores  # noqa: E402

SIZES = {"tvrn": (8, 1000), "sgraf": (32, 2000), "scan": (32, 2000)}


def best_time(fn, repeats):
    out, best = None, float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return out, best


def bench(name, k_images, k_texts, repeats):
    ni, nt = SIZES[name.split("_")[0]]
    model = build(name)
    images, texts = make_data(ni, nt)
    with torch.no_grad():
        ei, et = model.encode_image(images), model.encode_text(texts)
        _, grid_t = best_time(lambda: score_all(model, ei, et), repeats)
        r, st2_t = best_time(lambda: two_stage_scores(model, ei, et, k_images, k_texts, use_faiss=False), repeats)
    grid_rate, st2_rate = ni * nt / grid_t, r["pairs_scored"] / st2_t
    return {"images": ni, "captions": nt, "k_images": k_images, "k_texts": k_texts, "fraction": r["fraction"],
            "grid_pairs_per_s": grid_rate, "stage2_pairs_per_s": st2_rate, "ratio": st2_rate / grid_rate}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=["sgraf_saf", "scan_t2i", "tvrn_sgr"])
    ap.add_argument("--k", default="2:125", help="k_images:k_texts (2 of 8-32 images, 125 of 1000-2000 captions)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "stage2.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    ki, kt = map(int, a.k.split(":"))
    res = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "threads": a.threads,
           "torch": torch.__version__, "models": {}}
    print("| model | gallery | pairs scored | grid pairs/s | stage-2 pairs/s | ratio |\n|---|---|---|---|---|---|")
    for name in a.models:
        r = res["models"][name] = bench(name, ki, kt, a.repeats)
        print(f"| {name} | {r['images']} x {r['captions']} | {100 * r['fraction']:.1f}% | "
              f"{r['grid_pairs_per_s']:,.0f} | {r['stage2_pairs_per_s']:,.0f} | {r['ratio']:.2f} |")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
