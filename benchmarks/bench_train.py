"""Training-step speed, FLOPs and peak memory at paper shapes: tvrn against the field's way of training, in one run.

D=1024, S=256, Dv=2048, R=36, caption lengths uniform in 7..17 (Flickr30K-like), random weights, CPU fp32, a
batch of B pairs (caption b belongs to image b), the (B, B) ranking loss (default: VSE++ hardest negative, the
loss SCAN and SGRAF train with and tvrn's presets default to; `--loss published`: the TVRN authors' clamped
cross-entropy over all negatives, batch mean, whose gradient is dense early in training), backward, Adam step.
Model names are registered names, or `tvrn_sgr_published_first`: TVRN as published with its first-image
refinement (docs/published-tvrn.md E; the authors' cost model: each caption refined once per batch). For each model and batch size, each side in a fresh
process:

- tvrn:      `model.train_scores(..., memory_budget_mb=BUDGET)`, as `tvrn train` runs it (tvrn.scoring.score_all_train:
             the fast path over all B x B pairs, recomputation of the pairs with a non-zero gradient in backward;
             with a dense gradient, the plain path when it fits the budget: the training task's ScorePath policy);
- plain:     `model(images, texts)`, tvrn's path before score_all_train (all pairs' activations kept, padded);
- reference: written the way the field's code trains (SCAN, SGRAF, VSE++ style): a Python loop over captions,
             each caption cut to its length and scored against all images of the batch with the plain equations
             (`_score_plain`; with first-image refinement the caption is refined once against the batch's first
             image, as the authors' code does), plain autograd through everything.

Reported per side: pairs/s (B^2 / median step time of --steps steps after a warm-up), training FLOPs per pair
(forward + backward, counted with torch.utils.flop_counter on one more step after the timed ones), share of this
machine's 4096^2 fp32 matmul rate (measured in the same process before and after the steps, the better of the
two), peak RSS (VmHWM of the process over the warm-up and timed steps, model and data included, read before the
FLOP-counted step: FlopCounterMode makes a step heavier and the process keeps that RSS), and for tvrn the pairs recomputed in backward (and how many of them in
grid blocks: dense caption lengths, `score_grid`). With
--profile, a stage breakdown of one step (encoders, scores, loss, backward: pair recomputation vs the rest,
optimiser). A side whose memory, extrapolated from the batch before (B^2), would not fit the machine is skipped
and says so.

    python benchmarks/bench_train.py [--models tvrn_sgr sgraf_sgr sgraf_saf scan_t2i vse] [--batches 32 64 128]
        [--loss max] [--sides tvrn plain reference] [--budget 512] [--profile] [--out benchmarks/results/train.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).parent))
from bench_scoring import build, make_data, matmul_rate  # noqa: E402  (paper shapes, the same data recipe)

from tvrn.losses import ContrastiveLoss  # noqa: E402
from tvrn.train.task import ScorePath  # noqa: E402

MODELS = ["tvrn_sgr", "sgraf_sgr", "sgraf_saf", "scan_t2i", "scan_i2t", "vse"]
VARIANTS = {"tvrn_sgr_published_first": ("tvrn_sgr_published", {"refine_against": "first_image"})}
OFFICIAL_TVRN = (160.0, 185.0)  # the official TVRN code's training pairs/s at batch 64-128 at 185 GFLOP/s (issue 10)


def status(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    return 0


def reference_scores(model, enc_i, enc_t):
    """The field's training forward: for each caption, cut to its length, its scores with every image."""
    cols = []
    for c in range(len(enc_t)):
        cap = enc_t[c : c + 1]
        cap = model.anchor_texts(enc_i, cap.trim(int(cap.mask.sum())))  # first-image refinement: once per caption
        cols.append(model._score_plain(enc_i, cap) if hasattr(model, "_score_plain") else enc_i.glob @ cap.glob.t())
    return torch.cat(cols, 1)  # (B, B)


class Stages:
    """Wall time per stage of a step (only when profiling)."""

    def __init__(self, on: bool):
        self.on, self.t = on, {}

    def __call__(self, name):
        stages = self

        class _T:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                if stages.on:
                    stages.t[name] = stages.t.get(name, 0.0) + time.perf_counter() - self.t0

        return _T()


def worker(a) -> dict:
    """One (model, batch, side) in this process -> result dict."""
    import tvrn.scoring as scoring

    torch.set_num_threads(a.threads)
    name, B, side = a.worker
    B = int(B)
    base_name, overrides = VARIANTS.get(name, (name, {}))
    model = build(base_name).train()
    for k, v in overrides.items():
        setattr(model.config, k, v)
    images, texts = make_data(B, B, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-5)
    loss_fn = ContrastiveLoss(0.2, a.loss, reduction="mean" if a.loss == "published" else "sum",
                              exclude_same_image=a.loss != "published")  # published: the authors' recipe
    ids = torch.arange(B)
    path = ScorePath(a.budget if side == "tvrn" and model.blocked_training else None, sparse_loss=a.loss == "max")
    stages = Stages(False)

    def step():
        opt.zero_grad(set_to_none=True)
        with stages("encode images"):
            enc_i = model.encode_image(images)
        with stages("encode captions"):
            enc_t = model.encode_text(texts)
        with stages("scores (forward)"):
            if side == "reference":
                S = reference_scores(model, enc_i, enc_t)
            else:
                # as TrainingTask does: the batch is one block
                S = model.train_scores(enc_i, model.anchor_texts(enc_i, enc_t), **path.forward_kwargs(False))
        path.watch(S)
        with stages("loss"):
            loss = loss_fn(S, ids)
        scoring.LAST_TRAIN_BACKWARD.clear()
        with stages("backward"):
            loss.backward()
        if scoring.LAST_TRAIN_BACKWARD and stages.on:
            stages.t["backward: pair recomputation"] = stages.t.get("backward: pair recomputation", 0.0) + \
                scoring.LAST_TRAIN_BACKWARD["seconds"]
        with stages("optimiser"):
            opt.step()
        return float(loss.detach())

    base = status("VmRSS:")
    mm = [matmul_rate(reps=2)]
    step()  # warm-up
    times, recomputed, grid = [], [], []
    for _ in range(a.steps):
        t = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t)
        recomputed.append(scoring.LAST_TRAIN_BACKWARD.get("pairs"))
        grid.append(scoring.LAST_TRAIN_BACKWARD.get("grid_pairs"))
    peak = status("VmHWM:")  # warm-up and timed steps; read before the FLOP-counted step, which FlopCounterMode
    # makes heavier (what it holds while counting stays in the process's RSS afterwards)
    with FlopCounterMode(display=False) as fc:  # one more step, counted
        step()
    flops = fc.get_total_flops()
    mm.append(matmul_rate(reps=2))
    out = {"model": name, "batch": B, "side": side, "loss_mode": a.loss, "step_s": statistics.median(times),
           "times_s": times, "pairs_per_s": B * B / statistics.median(times), "train_flops_per_pair": flops / B**2,
           "matmul_gflop_per_s": max(mm) / 1e9, "peak_rss_bytes": peak, "rss_before_bytes": base,
           "loss": loss, "recomputed_pairs": recomputed[-1],
           "grid_pairs": grid[-1], "gradient_density": path.density}
    out["matmul_share"] = flops / out["step_s"] / max(mm)
    if a.profile:
        stages.on = True
        step()
        out["stages_s"] = dict(stages.t)
        if "backward: pair recomputation" in stages.t:
            stages.t["backward: encoders and the rest"] = stages.t["backward"] - stages.t["backward: pair recomputation"]
    return out


def table(rows: list[dict]) -> str:
    head = ["| model | batch | side | pairs/s | vs reference | MFLOP/pair (train) | % matmul | peak RSS GB | pairs recomputed |",
            "|---|---|---|---|---|---|---|---|---|"]
    ref = {(r["model"], r["batch"]): r for r in rows if r.get("side") == "reference" and "pairs_per_s" in r}
    for r in rows:
        if "skipped" in r:
            head.append(f"| {r['model']} | {r['batch']} | {r['side']} | not run: {r['skipped']} | | | | | |")
            continue
        base = ref.get((r["model"], r["batch"]))
        ratio = f"{r['pairs_per_s'] / base['pairs_per_s']:.2f}x" if base else ""
        rec = "" if r.get("recomputed_pairs") is None else f"{r['recomputed_pairs']:,} of {r['batch'] ** 2:,}"
        rec += f" ({r['grid_pairs']:,} in grid blocks)" if r.get("grid_pairs") else ""
        head.append(f"| {r['model']} | {r['batch']} | {r['side']} | {r['pairs_per_s']:,.0f} | {ratio} | "
                    f"{r['train_flops_per_pair'] / 1e6:.1f} | {100 * r['matmul_share']:.0f}% | "
                    f"{r['peak_rss_bytes'] / 2**30:.2f} | {rec} |")
    return "\n".join(head)


def stage_table(rows: list[dict]) -> str:
    out = []
    for r in rows:
        if "stages_s" not in r:
            continue
        total = sum(v for k, v in r["stages_s"].items() if not k.startswith("backward:"))
        parts = ", ".join(f"{k} {v:.2f} s ({100 * v / total:.0f}%)" for k, v in r["stages_s"].items())
        out.append(f"- {r['model']} B={r['batch']} {r['side']}: {total:.2f} s: {parts}")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=MODELS)
    ap.add_argument("--batches", nargs="*", type=int, default=[32, 64, 128])
    ap.add_argument("--sides", nargs="*", default=["tvrn", "plain", "reference"])
    ap.add_argument("--loss", default="max", choices=["max", "sum", "smooth", "published"])
    ap.add_argument("--budget", type=float, default=512.0, help="train.memory_budget_mb of the tvrn side")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ram-gb", type=float, default=20.0, help="skip a side whose extrapolated peak exceeds this")
    ap.add_argument("--profile", action="store_true", help="stage breakdown of one more step per run")
    ap.add_argument("--worker", nargs=3, metavar=("MODEL", "BATCH", "SIDE"), help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "train.json"))
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a)))
        return
    torch.set_num_threads(a.threads)
    res = {"command": " ".join(["python", *sys.argv]), "threads": a.threads, "torch": torch.__version__,
           "loss_mode": a.loss, "budget_mb": a.budget, "matmul_gflop_per_s_start": matmul_rate() / 1e9, "runs": []}
    out_path = Path(a.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    for name in a.models:
        last_peak = {}
        for B in sorted(a.batches):
            for side in a.sides:
                row = {"model": name, "batch": B, "side": side}
                if side == "plain" and name == "vse":
                    continue  # VSE has one path: its pair work is one matmul
                prev = last_peak.get(side)
                if prev is not None:
                    pb, peak, base = prev
                    guess = base + (peak - base) * (B / pb) ** 2
                    if guess > a.ram_gb * 2**30:
                        row["skipped"] = f"needs ~{guess / 2**30:.0f} GB (B^2 from B={pb})"
                        res["runs"].append(row)
                        print(json.dumps(row), file=sys.stderr)
                        continue
                cmd = [sys.executable, __file__, "--worker", name, str(B), side, "--loss", a.loss, "--budget",
                       str(a.budget), "--steps", str(a.steps), "--threads", str(a.threads)] + \
                      (["--profile"] if a.profile else [])
                proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
                if proc.returncode != 0:
                    row["skipped"] = f"failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1][:200]}"
                else:
                    row = json.loads(proc.stdout.strip().splitlines()[-1])
                    last_peak[side] = (B, row["peak_rss_bytes"], row["rss_before_bytes"])
                res["runs"].append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "times_s"}), file=sys.stderr, flush=True)
                out_path.write_text(json.dumps(res, indent=2) + "\n")  # after every run: a killed run keeps its rows
    res["matmul_gflop_per_s_end"] = matmul_rate() / 1e9
    out_path.write_text(json.dumps(res, indent=2) + "\n")
    print(table(res["runs"]))
    stages = stage_table(res["runs"])
    if stages:
        print("\n" + stages)
    tvrn = [r for r in res["runs"] if r["model"].startswith("tvrn") and r["side"] == "tvrn" and "pairs_per_s" in r]
    for r in tvrn:
        target = OFFICIAL_TVRN[0] * r["matmul_gflop_per_s"] / OFFICIAL_TVRN[1]
        print(f"{r['model']} B={r['batch']}: {r['pairs_per_s']:.0f} pairs/s against the official code's "
              f"{target:.0f} (160 at 185 GFLOP/s, scaled to {r['matmul_gflop_per_s']:.0f})")


if __name__ == "__main__":
    main()
