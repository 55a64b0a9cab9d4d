"""Train and test one configuration on the synthetic benchmark: dev RSUM per epoch and test RSUM of best.pt.

For ablations and hyper-parameter checks (module switches, model.gate_lambda, ...): each call is one run, and
its result is appended as one JSON line to --out with the command that produced it.

    python benchmarks/ablate_synth.py gate3 --set model.gate_lambda=3.0 [--preset demo_synth] [--epochs 5]
        [--out benchmarks/results/ablate_synth.jsonl]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from tvrn.data import load_split
from tvrn.evaluation import evaluate
from tvrn.pipeline import load_trained, resolve_config, score_split, train_from_config


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", help="run name (folder under --runs)")
    ap.add_argument("--set", nargs="*", default=[], help="config overrides section.key=value")
    ap.add_argument("--preset", default="demo_synth")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--milestones", default="[4]", help="train.lr_milestones")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", default="runs/ablate_synth")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "ablate_synth.jsonl"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg = resolve_config(a.preset, [f"train.epochs={a.epochs}", f"train.lr_milestones={a.milestones}", *a.set])
    run = Path(a.runs) / a.name
    t0 = time.time()
    summary = train_from_config(cfg, run)
    model, tokenizer, _ = load_trained(summary.get("best_checkpoint") or summary.get("last_checkpoint"))
    test = load_split(cfg["data"]["root"], "test")
    result = evaluate(score_split(model, test, tokenizer, cfg["data"]), torch.as_tensor(test.caption_to_image))
    epochs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    line = {"command": " ".join(["python", *sys.argv]), "name": a.name, "preset": a.preset, "overrides": a.set,
            "dev_rsum_per_epoch": [round(e["rsum"], 1) for e in epochs if e.get("kind") == "epoch"],
            "test": result, "seconds": time.time() - t0}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "a") as f:
        f.write(json.dumps(line) + "\n")
    print(json.dumps({k: line[k] for k in ("name", "dev_rsum_per_epoch", "seconds")}), f"test rsum {result['rsum']:.1f}")


if __name__ == "__main__":
    main()
