"""Scorer speed, FLOPs and memory at paper shapes, against a plain reference, in one run.

D=1024, S=256, Dv=2048, R=36, caption lengths uniform in 7..17 (mean ~12, Flickr30K-like), random weights,
forward only, CPU fp32. For each model:
- scorer: `tvrn.scoring.score_all` (memory-budgeted blocks, length-sorted captions, the models' fast paths);
- reference: written the way SCAN / SGRAF evaluate: a Python loop over captions, each caption (cut to its
  length) against all images of the shard with the model's plain (masked, equation-style) `_score_plain`;
  timed on the first `--ref-texts` captions (its cost is linear in captions);
- pairs/s of both (interleaved: reference, scorer, reference, scorer; best of each), their ratio, the largest
  score difference on the pairs both computed;
- MFLOP per pair (torch.utils.flop_counter) of the scorer and of the reference, and the fraction of this
  machine's 4096x4096 fp32 matmul rate (measured in the same run, next to each model's timings: the best of
  the rates measured before and after each timing) the scorer reaches (actual FLOPs, and
  "effective": reference FLOPs per pair x scorer pairs/s, so removed FLOPs count);
- each model timed in its own fresh process (the order of models does not matter);
- peak scoring memory (VmHWM minus VmRSS before scoring, the least of --memory-repeats fresh subprocesses, /proc/self/clear_refs, large
  allocations mmapped so RSS tracks live tensors) for a gallery and one with 10x the images (the encodings are
  inputs, present before scoring starts);
- training step throughput (pairs/s of forward + backward at --train-batch).

    python benchmarks/bench_scoring.py [--threads 2] [--out benchmarks/results/scoring.json] [--doc docs/scoring.md]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from tvrn.data.batch import ImageBatch, TextBatch
from tvrn.models import create_model
from tvrn.scoring import score_all

PAPER = dict(img_dim=2048, embed_size=1024, sim_dim=256, vocab_size=8500, word_dim=300)
R = 36
MODELS = ["tvrn_sgr", "tvrn_saf", "sgraf_sgr", "sgraf_saf", "scan_t2i", "scan_i2t", "vse"]


def make_data(ni, nt, seed=0):
    g = torch.Generator().manual_seed(seed)
    adj = torch.rand(ni, R, R, generator=g) > 0.7
    images = ImageBatch(features=torch.randn(ni, R, 2048, generator=g), mask=torch.ones(ni, R, dtype=torch.bool),
                        adjacency=adj | adj.transpose(1, 2))
    g = torch.Generator().manual_seed(seed + 1)  # captions independent of the number of images
    lens = torch.randint(7, 18, (nt,), generator=g)
    mask = torch.arange(int(lens.max()))[None] < lens[:, None]
    texts = TextBatch(tokens=torch.randint(1, 8500, mask.shape, generator=g) * mask, mask=mask,
                      caption_to_image=torch.arange(nt) % ni)
    return images, texts


def build(name):
    torch.manual_seed(0)
    return create_model(name, **PAPER).eval()


def reference_scores(model, ei, et):
    """The field's way: for each caption, cut to its length, score it against every image of the shard."""
    cols = []
    for c in range(len(et)):
        cap = et[c : c + 1]
        cap = cap.trim(int(cap.mask.sum()))
        if hasattr(model, "_score_plain"):
            cols.append(model._score_plain(ei, cap))  # (Ni, 1)
        else:  # VSE: one cosine per pair
            cols.append(ei.glob @ cap.glob.t())
    return torch.cat(cols, 1)  # (Ni, Nt)


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def matmul_rate(n=4096, reps=3):
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(timed(lambda: a @ b)[1] for _ in range(reps))
    return 2 * n**3 / best


def flops(fn):
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def sizes_for(name, a):
    if name.startswith("tvrn"):
        return a.tvrn_images, a.tvrn_texts, a.tvrn_ref_texts
    if name.startswith("sgraf"):
        return a.sgraf_images, a.sgraf_texts, a.sgraf_ref_texts
    if name.startswith("scan"):
        return a.scan_images, a.scan_texts, a.scan_ref_texts
    return a.vse_images, a.vse_texts, a.vse_ref_texts


def bench_model(name, a):
    ni, nt, nref = sizes_for(name, a)
    model = build(name)
    images, texts = make_data(ni, nt)
    with torch.no_grad():
        ei, et = model.encode_image(images), model.encode_text(texts)
        etr = et[:nref]
        score_all(model, ei[:2], et[:16], memory_budget_mb=a.budget)  # warm up
        ref_t, fast_t, mm = [], [], [matmul_rate(reps=2)]
        for _ in range(a.repeats):  # interleaved
            ref, dt = timed(lambda: reference_scores(model, ei, etr))
            ref_t.append(dt)
            fast, dt = timed(lambda: score_all(model, ei, et, memory_budget_mb=a.budget))
            fast_t.append(dt)
            mm.append(matmul_rate(reps=2))  # the machine is shared: the rate next to each measurement
        diff = (fast[:, :nref] - ref).abs().max().item()
        fi, ft = min(4, ni), min(64, nt)
        f_fast = flops(lambda: model.score(ei[:fi], et[:ft])) / (fi * ft)
        f_ref = flops(lambda: reference_scores(model, ei[:fi], et[:ft])) / (fi * ft)
    fast_rate, ref_rate = ni * nt / min(fast_t), ni * nref / min(ref_t)
    train = train_rate(name, a)
    return {"images": ni, "captions": nt, "reference_captions": nref, "scorer_pairs_per_s": fast_rate,
            "reference_pairs_per_s": ref_rate, "speedup": fast_rate / ref_rate, "max_abs_diff": diff,
            "scorer_mflop_per_pair": f_fast / 1e6, "reference_mflop_per_pair": f_ref / 1e6,
            "scorer_gflop_per_s": fast_rate * f_fast / 1e9, "train_pairs_per_s": train,
            "matmul_gflop_per_s_here": max(mm) / 1e9,
            "pair_bytes": model.pair_bytes(ei[:1], et[:1]), "times_s": {"scorer": fast_t, "reference": ref_t}}


def train_rate(name, a):
    b = a.train_batch_tvrn if name.startswith("tvrn") else a.train_batch
    model = build(name).train()
    images, texts = make_data(b, b, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-5)

    def step():
        opt.zero_grad()
        model(images, texts).sum().backward()
        opt.step()

    step()
    return b * b / min(timed(step)[1] for _ in range(2))


MEM_SCRIPT = r"""
import gc, sys, torch
sys.path.insert(0, {bench!r})
from bench_scoring import build, make_data
from tvrn.scoring import block_plan, score_all
torch.set_num_threads({threads})
model = build({name!r}); images, texts = make_data({ni}, {nt})
with torch.no_grad():
    ei, et = model.encode_image(images), model.encode_text(texts)
del images, texts; gc.collect()
import ctypes; ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed encoder temporaries back to the OS
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
base = status("VmRSS:")
s = score_all(model, ei, et, memory_budget_mb={budget})
peak = status("VmHWM:") - base
print(peak, s.numel() * 4, max(b for *_, b in block_plan(model, ei, et, memory_budget_mb={budget})[1]))
"""


def peak_memory(name, ni, nt, budget, a):
    code = MEM_SCRIPT.format(bench=str(Path(__file__).parent), threads=a.threads, name=name, ni=ni, nt=nt,
                             budget=budget)
    # one malloc arena and blocks from 16 KB up mmapped (returned to the OS on free): RSS tracks live tensors, not
    # heap caching; what glibc still retains grows by ~0.1 MB over repeated calls and then saturates
    # heap state still moves the high-water mark by up to ~1 MB between identical runs: the least of a few fresh
    # processes is reported
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="16384", MALLOC_ARENA_MAX="1")
    runs = []
    for _ in range(a.memory_repeats):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
        runs.append(tuple(map(int, out.stdout.split()[-3:])))
    peak, output, bi = min(runs)
    return {"images": ni, "captions": nt, "budget_mb": budget, "scoring_peak_bytes": peak, "output_bytes": output,
            "max_block_images": bi}


def table(res):
    rows = ["| model | scorer pairs/s | reference pairs/s | speedup | max diff | MFLOP/pair (scorer / ref) "
            "| % matmul (actual / effective) | matmul GFLOP/s | train pairs/s |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in res["models"].items():
        rate = r["matmul_gflop_per_s_here"]
        eff = r["scorer_pairs_per_s"] * r["reference_mflop_per_pair"] / 1e3
        rows.append(f"| {name} | {r['scorer_pairs_per_s']:,.0f} | {r['reference_pairs_per_s']:,.0f} | "
                    f"{r['speedup']:.2f}x | {r['max_abs_diff']:.1e} | {r['scorer_mflop_per_pair']:.2f} / "
                    f"{r['reference_mflop_per_pair']:.2f} | {100 * r['scorer_gflop_per_s'] / rate:.0f}% / "
                    f"{100 * eff / rate:.0f}% | {rate:.0f} | {r['train_pairs_per_s']:,.0f} |")
    mem = ["", "| model | gallery | budget MB | most images per block | scoring peak MB | output MB |",
           "|---|---|---|---|---|---|"]
    for name, ms in res.get("memory", {}).items():
        for m in ms:
            mem.append(f"| {name} | {m['images']} x {m['captions']} | {m['budget_mb']:.0f} | {m['max_block_images']} | "
                       f"{m['scoring_peak_bytes'] / 2**20:.1f} | {m['output_bytes'] / 2**20:.2f} |")
    return "\n".join(rows + mem)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=MODELS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget", type=float, default=512.0, help="score_all memory_budget_mb")
    ap.add_argument("--repeats", type=int, default=3)
    for fam, (i, t, r) in dict(tvrn=(32, 320, 24), sgraf=(64, 320, 32), scan=(128, 1280, 32),
                               vse=(1000, 5000, 1000)).items():
        ap.add_argument(f"--{fam}-images", type=int, default=i)
        ap.add_argument(f"--{fam}-texts", type=int, default=t)
        ap.add_argument(f"--{fam}-ref-texts", type=int, default=r)
    ap.add_argument("--train-batch", type=int, default=64)
    ap.add_argument("--train-batch-tvrn", type=int, default=16)
    ap.add_argument("--memory", nargs="*", default=["tvrn_sgr:40:120:128", "sgraf_saf:64:640", "scan_t2i:64:2048"],
                    help="name:images:captions[:budget_mb]; each is measured at that size and with 10x the images "
                         "(choose sizes at which the smaller gallery already fills its blocks: 'most images per "
                         "block' below the gallery's images)")
    ap.add_argument("--memory-repeats", type=int, default=3, help="fresh processes per memory measurement (least peak)")
    ap.add_argument("--single", metavar="MODEL", help=argparse.SUPPRESS)  # internal: one model, JSON to stdout
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "scoring.json"))
    ap.add_argument("--doc", default=str(Path(__file__).parent.parent / "docs" / "scoring.md"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.single:
        print(json.dumps(bench_model(a.single, a)))
        return
    res = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "threads": a.threads,
           "torch": torch.__version__, "matmul_gflop_per_s": matmul_rate() / 1e9, "models": {}, "memory": {}}
    print(f"matmul 4096^2 fp32: {res['matmul_gflop_per_s']:.1f} GFLOP/s", file=sys.stderr)
    for name in a.models:  # each model in a fresh process: no heap state or thread pool left by the one before
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--single", name], capture_output=True,
                             text=True, check=True)
        res["models"][name] = r = json.loads(out.stdout.strip().splitlines()[-1])
        print(name, json.dumps({k: v for k, v in r.items() if k != "times_s"}), file=sys.stderr)
    for spec in a.memory:
        name, ni, nt, *mb = spec.split(":")
        mb = float(mb[0]) if mb else a.budget
        res["memory"][name] = [peak_memory(name, int(ni), int(nt), mb, a), peak_memory(name, 10 * int(ni), int(nt), mb, a)]
    res["matmul_gflop_per_s_end"] = matmul_rate() / 1e9
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    md = table(res)
    print(md)
    if a.doc:
        doc = Path(a.doc)
        text = doc.read_text() if doc.exists() else ""
        marker = "<!-- bench_scoring table -->"
        block = (f"{marker}\nMeasured by `{res['command']}` ({a.threads} threads, torch {torch.__version__}; "
                 f"4096^2 fp32 matmul {res['matmul_gflop_per_s']:.0f} GFLOP/s at the start, "
                 f"{res['matmul_gflop_per_s_end']:.0f} at the end):\n\n{md}\n{marker}")
        if marker in text:
            pre, _, rest = text.partition(marker)
            _, _, post = rest.partition(marker)
            text = pre + block + post
        else:
            text = text + "\n" + block + "\n"
        doc.write_text(text)


if __name__ == "__main__":
    main()
