"""`tvrn demo`: the main job on the shipped synthetic benchmark (see tvrn.demo)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="generate the synthetic benchmark, train TVRN and two baselines, compare them",
        description="Generate the synthetic benchmark if missing, train TVRN, SGRAF and VSE "
        "on it, evaluate them on its test split, print the comparison and save the dev RSUM plot.")
    p.add_argument("--data", default="data/synth_demo",
                   help="synthetic benchmark folder, generated if missing (the standard benchmark with a 1,000-image "
                   "test split; default %(default)s)")
    p.add_argument("--fold-images", type=int, default=None, metavar="N",
                   help="score the test split in folds of N consecutive images, each against its own captions, and "
                   "average (default 200, as five folds of COCO 1K at a fifth of the scale; 0: all pairs)")
    p.add_argument("--out", default="runs/demo", help="where runs, results.json and the plot go")
    p.add_argument("--preset", default="demo_synth", help="training preset (default %(default)s)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value for every model")
    p.add_argument("--fresh", action="store_true", help="retrain even where a finished run exists")
    p.add_argument("--progress", action="store_true", help="show progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from tvrn.config import check_overrides
    from tvrn.data.synth import write_dataset
    from tvrn.demo import DEMO_FOLD_IMAGES, DEMO_SYNTH, format_table, run_demo, table_note

    check_overrides(args.overrides)  # a misspelt key is named now, not after the benchmark is generated
    t0 = time.time()
    data = Path(args.data)
    if not (data / "manifest.json").exists():
        print(f"tvrn demo: generating the synthetic benchmark in {data}", flush=True)
        res = write_dataset(data, DEMO_SYNTH)
        print(f"  done in {res.seconds['total']:.1f} s", flush=True)
    print(f"tvrn demo: {torch.get_num_threads()} threads; runs in {args.out}", flush=True)
    fold_images = DEMO_FOLD_IMAGES if args.fold_images is None else args.fold_images
    summary = run_demo(data, args.out, preset=args.preset, extra_overrides=tuple(args.overrides),
                       resume=not args.fresh, progress=args.progress, fold_images=fold_images,
                       on_event=lambda msg: print("  " + msg, flush=True))
    test = summary["test"]
    how = ("all pairs" if test["folds"] == 1 else
           f"mean of {test['folds']} folds of {test['fold_images']} images, each against its own captions")
    print()
    print(f"Test split of {data}, {test['images']} images ({how}), best dev checkpoint of each run:")
    print(format_table(summary["rows"]))
    print("\n" + table_note(summary["rows"]))
    if summary["plot"]:
        print(f"\ndev RSUM curves: {summary['plot']}")
    print(f"results: {Path(args.out) / 'results.json'}; total {time.time() - t0:.0f} s")
    if summary.get("index"):
        exe = sys.argv[0] if Path(sys.argv[0]).name == "tvrn" else "tvrn"  # .venv/bin/tvrn after `make demo`
        print(f"\nsearch the test split with the TVRN run in a browser (the page at http://127.0.0.1:8000/):\n"
              f"  {exe} serve {summary['index']}")
    return 0
