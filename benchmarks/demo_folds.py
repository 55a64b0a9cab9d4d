"""Would a larger test split hold the demo's rows in place? (issue 21)

The demo's test split has 200 images: one image query is 0.5 points of an i2t recall and one of its 500 twin
captions 0.2 points of twin accuracy, so two runs of one model can print rows several points apart although
their models are as good. This scores the best checkpoints of `benchmarks/demo_spread.sh`'s seed-0 runs (one
thread, two threads, two threads on AVX2 kernels) on a 1,000-image test split of the same benchmark (`tvrn synth
--test-images 1000`: train and dev byte-identical to the default, so the checkpoints were trained on it) and
reports, per model and run, the RSUM averaged over five folds of 200 images (as COCO 1K is) and twin accuracy
over all its twin captions, beside the 200-image figures the demo printed.

    python benchmarks/demo_folds.py [--runs runs/demo_spread] [--models sgraf_sgr vse tvrn]
        -> benchmarks/results/demo_folds.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

RUNS = ("seed0", "threads2", "threads2_avx2")


def main(argv=None) -> int:
    from tvrn.checkpoint import load_trained
    from tvrn.data import load_split
    from tvrn.data.synth import SynthConfig, write_dataset
    from tvrn.demo import read_twins, twin_accuracy
    from tvrn.evaluation import evaluate_protocol, score_split

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", default="runs/demo_spread", help="OUT of benchmarks/demo_spread.sh")
    ap.add_argument("--models", nargs="+", default=["sgraf_sgr", "vse", "tvrn"], help="run folders in each demo")
    ap.add_argument("--out", default="benchmarks/results/demo_folds.json")
    a = ap.parse_args(argv)
    runs = Path(a.runs)
    data = runs / "synth_test1000"
    if not (data / "manifest.json").exists():
        write_dataset(data, SynthConfig(test_images=1000, render_images=False))
    test = load_split(data, "test")
    c2i = torch.as_tensor(test.caption_to_image)
    twins = read_twins(data, "test", test.num_images)
    rows = []
    for model_dir in a.models:
        for run in RUNS:
            model, tokenizer, cfg = load_trained(runs / run / model_dir / "best.pt")
            scores = score_split(model, test, tokenizer, cfg.get("data", {}))  # (1000, 5000)
            folds = evaluate_protocol(scores, c2i, "coco_1k")  # COCO 1K's five folds of consecutive images, averaged
            shown = json.loads((runs / run / model_dir / "result.json").read_text())
            rows.append({"model": model_dir, "run": run, "rsum_5x200": round(folds["rsum"], 1),
                         "rsum_folds": [round(f["rsum"], 1) for f in folds["folds"]],
                         "twin_acc_1000": round(twin_accuracy(scores, c2i, twins), 1),
                         "rsum_demo_200": round(shown["rsum"], 1), "twin_acc_demo_200": round(shown["twin_acc"], 1)})
            print(json.dumps(rows[-1]), flush=True)
    spread = {}
    for m in a.models:
        mine = [r for r in rows if r["model"] == m]
        base = next(r for r in mine if r["run"] == "threads2")
        spread[m] = {key: round(max(abs(r[key] - base[key]) for r in mine), 1)
                     for key in ("rsum_5x200", "twin_acc_1000", "rsum_demo_200", "twin_acc_demo_200")}
    res = {"command": " ".join(["python benchmarks/demo_folds.py", *(argv if argv is not None else sys.argv[1:])]),
           "threads": torch.get_num_threads(), "rows": rows, "largest_distance_from_threads2": spread}
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(spread, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
