"""Flickr30K-size scoring on one accelerator: 1000 images x 5000 captions at paper shapes, seconds and peak memory.

The prepared run for issue 5's GPU target (SGRAF under 5 s, TVRN under 60 s on a current data-centre GPU), and
for issue 10's training path on an accelerator: training steps at --train-batches (forward through
`score_all_train` under autocast, hardest-negative loss, backward, Adam), steps/s, pairs/s and peak memory, next
to the plain path (all pairs' activations kept) where it fits.
Random weights and features at paper shapes (D=1024, S=256, Dv=2048, R=36, caption lengths 7..17), so it
needs no data. For each model: encode (images, captions) and `tvrn.scoring.score_all` timed separately
after a warm-up on a small slice, under autocast (bf16 by default), with the peak accelerator memory of each
phase (torch.cuda.max_memory_allocated, reset before it). On CPU it runs too (`--device cpu --images 8
--texts 40`, a smoke test of the script itself).

    python benchmarks/bench_gpu.py [--device cuda] [--models sgraf_sgr tvrn_sgr] [--dtype bf16]
        [--budget-mb 8192] [--out benchmarks/results/gpu_scoring.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_scoring import build, make_data  # noqa: E402  (paper shapes, captions independent of images)

from tvrn.scoring import encode_images, encode_texts, score_all  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_mb(device):
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def batches(batch, n, size):
    return [batch[i : i + size] for i in range(0, n, size)]


def run_model(name, a, device):
    model = build(name).to(device)
    dtype = DTYPES[a.dtype]
    images, texts = make_data(a.images, a.texts)
    ib, tb = batches(images, a.images, a.encode_batch), batches(texts, a.texts, a.encode_batch)
    # warm-up: kernels, autotuning, allocator pools
    wi = encode_images(model, ib[:1], autocast_dtype=dtype)
    wt = encode_texts(model, tb[:1], autocast_dtype=dtype)
    score_all(model, wi, wt, memory_budget_mb=a.budget_mb, autocast_dtype=dtype)
    del wi, wt
    sync(device)
    reset_peak(device)
    t0 = time.perf_counter()
    ei = encode_images(model, ib, autocast_dtype=dtype)
    et = encode_texts(model, tb, autocast_dtype=dtype)
    sync(device)
    encode_s, encode_peak = time.perf_counter() - t0, peak_mb(device)
    reset_peak(device)
    t0 = time.perf_counter()
    scores = score_all(model, ei, et, memory_budget_mb=a.budget_mb, autocast_dtype=dtype, out_device=device,
                       progress=a.progress)
    sync(device)
    score_s = time.perf_counter() - t0
    return {"images": a.images, "captions": a.texts, "dtype": a.dtype, "budget_mb": a.budget_mb,
            "encode_seconds": encode_s, "encode_peak_mb": encode_peak, "score_seconds": score_s,
            "score_peak_mb": peak_mb(device), "pairs_per_s": a.images * a.texts / score_s,
            "finite": bool(torch.isfinite(scores).all())}


def train_steps(name, a, device):
    """Median step time and peak memory of training steps at each batch size, blocked (score_all_train) and plain."""
    from tvrn.losses import ContrastiveLoss

    dtype = DTYPES[a.dtype]
    rows = []
    for B in a.train_batches:
        for side in ("blocked", "plain"):
            model = build(name).to(device).train()
            opt = torch.optim.Adam(model.parameters(), lr=1e-5)
            images, texts = make_data(B, B, seed=1)
            images, texts = images.to(device), texts.to(device)
            loss_fn, ids = ContrastiveLoss(0.2, "max"), torch.arange(B, device=device)
            budget = a.train_budget_mb if side == "blocked" else None

            def step():
                opt.zero_grad(set_to_none=True)
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    scores = model(images, texts, memory_budget_mb=budget)
                loss_fn(scores.float(), ids).backward()
                opt.step()

            try:
                step()  # warm-up
                sync(device)
                reset_peak(device)
                times = []
                for _ in range(a.train_steps):
                    t0 = time.perf_counter()
                    step()
                    sync(device)
                    times.append(time.perf_counter() - t0)
                t = sorted(times)[len(times) // 2]
                rows.append({"batch": B, "side": side, "step_s": t, "pairs_per_s": B * B / t,
                             "peak_mb": peak_mb(device)})
            except torch.OutOfMemoryError as e:  # the plain path at large batches
                rows.append({"batch": B, "side": side, "skipped": f"out of memory: {str(e)[:120]}"})
            del model, opt
            if device.type == "cuda":
                torch.cuda.empty_cache()
            print(name, json.dumps(rows[-1]), flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--models", nargs="*", default=["sgraf_sgr", "sgraf_saf", "tvrn_sgr", "tvrn_saf"])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--texts", type=int, default=5000)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--budget-mb", type=float, default=8192.0, help="score_all memory_budget_mb")
    ap.add_argument("--encode-batch", type=int, default=500)
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--train-batches", nargs="*", type=int, default=[128, 256], help="training step batch sizes ([] skips)")
    ap.add_argument("--train-steps", type=int, default=3)
    ap.add_argument("--train-budget-mb", type=float, default=4096.0, help="train.memory_budget_mb of the blocked side")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "gpu_scoring.json"))
    a = ap.parse_args()
    device = torch.device(a.device)
    res = {"command": " ".join(["python", *sys.argv]), "torch": torch.__version__,
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "models": {}}
    for name in a.models:
        res["models"][name] = r = run_model(name, a, device)
        print(name, json.dumps(r), flush=True)
        if a.train_batches:
            r["train"] = train_steps(name, a, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    print("| model | dtype | encode s | score s | pairs/s | peak MB (encode / score) |")
    print("|---|---|---|---|---|---|")
    for name, r in res["models"].items():
        print(f"| {name} | {r['dtype']} | {r['encode_seconds']:.2f} | {r['score_seconds']:.2f} | "
              f"{r['pairs_per_s']:,.0f} | {r['encode_peak_mb']} / {r['score_peak_mb']} |")
    print("\n| model | batch | training path | step s | pairs/s | peak MB |\n|---|---|---|---|---|---|")
    for name, r in res["models"].items():
        for t in r.get("train", []):
            if "skipped" in t:
                print(f"| {name} | {t['batch']} | {t['side']} | {t['skipped']} | | |")
            else:
                print(f"| {name} | {t['batch']} | {t['side']} | {t['step_s']:.3f} | {t['pairs_per_s']:,.0f} | "
                      f"{t['peak_mb']} |")


if __name__ == "__main__":
    main()
