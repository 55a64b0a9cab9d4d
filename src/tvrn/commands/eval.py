"""`tvrn eval CKPT_OR_FOLDER_OR_NPY [...] --data DIR --split test --protocol f30k_1k|coco_1k|coco_5k|all`.

Several inputs are an ensemble: their score matrices are averaged. A `.npy` input is a saved score matrix
(N_img, N_caps) of the split; `--save-scores` writes this evaluation's matrix for later ensembles. `--two-stage 5:25 10:50` (one checkpoint) adds
two-stage search metrics and the fraction of pairs scored.
"""
from __future__ import annotations

import argparse
import sys

from tvrn.evaluation import PROTOCOLS

from ._args import positive_int

ROWS = (("i2t", "image-to-text"), ("t2i", "text-to-image"))


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="evaluate checkpoints or score matrices under a protocol",
        description="Evaluate one checkpoint, a saved score matrix (.npy), or an ensemble of several.")
    p.add_argument("inputs", nargs="+", help="checkpoints (.pt), model folders (tvrn export), hf-hub:ORG/NAME "
                                             "names and/or score matrices (.npy)")
    p.add_argument("--data", required=True, help="precomp data folder")
    p.add_argument("--split", default="test", help="split to evaluate (default %(default)s; COCO: testall)")
    p.add_argument("--protocol", default="all", choices=PROTOCOLS, help="evaluation protocol (default %(default)s)")
    p.add_argument("--out", help="write the metrics as JSON here")
    p.add_argument("--save-scores", help="save the (ensembled) score matrix as .npy")
    p.add_argument("--batch-size", type=positive_int, default=128, help="images / captions per encode batch")
    p.add_argument("--adjacency-threshold", type=float, default=0.2, help="IoU threshold of spatial adjacency")
    p.add_argument("--device", help="cpu, cuda, ... (default cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--two-stage", nargs="+", metavar="KI:KT", type=parse_k, default=(),
                   help="also report two-stage search (shortlist k_images per caption and k_texts per image, "
                        "re-ranked with the full score) against exact recall, over all pairs of the split")
    p.add_argument("--published-protocol", action="store_true",
                   help="TVRN checkpoints: also print the metrics the TVRN authors' evaluation script reports (shards "
                        "of 100 images x 100 captions, captions refined against each shard's first image, spatial "
                        "context from the last test batch's boxes) beside the correct per-pair evaluation; needs "
                        "image and caption counts that are multiples of 100")
    p.add_argument("--no-pointing-game", action="store_true",
                   help="skip the pointing game (grounding accuracy, reported for each model input on a `tvrn synth` "
                        "split, whose scenes say which regions are each object's; tvrn.grounding)")
    p.set_defaults(func=run)


def pointing_games(args: argparse.Namespace) -> dict:
    """{input: pointing-game result} for the model inputs (not .npy) when the split has synthetic scenes."""
    from tvrn.grounding import has_scenes, pointing_game
    from tvrn.checkpoint import load_trained

    if args.no_pointing_game or not has_scenes(args.data, args.split):
        return {}
    out = {}
    for p in args.inputs:
        if str(p).endswith(".npy"):
            continue
        model, tokenizer, _ = load_trained(p)
        if args.device is not None:
            model.to(args.device)
        try:
            result = pointing_game(model, tokenizer, args.data, args.split,
                                   adjacency_threshold=args.adjacency_threshold)
        except ValueError as e:  # scenes whose regions cannot be recovered: the retrieval metrics still stand
            print(f"  pointing game skipped: {e}")
            continue
        if result is not None:
            out[str(p)] = result
    return out


def parse_k(text: str) -> tuple[int, int]:
    try:
        ki, kt = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K_IMAGES:K_TEXTS such as 5:25, got {text!r}") from None
    if ki < 1 or kt < 1:
        raise argparse.ArgumentTypeError(f"shortlist sizes must be at least 1, got {text!r}")
    return ki, kt


def format_two_stage(rows: list) -> str:
    lines = ["  two-stage (shortlist, then full score; a ground truth outside the shortlist is a miss):",
             "    k_images  k_texts  pairs scored  RSUM    exact RSUM"]
    for r in rows:
        lines.append(f"    {r['k_images']:8d}  {r['k_texts']:7d}  {100 * r['fraction']:11.2f}%  {r['rsum']:6.1f}  "
                     f"{r['exact/rsum']:6.1f}")
    return "\n".join(lines)


def format_metrics(result: dict) -> str:
    lines = []
    for key, label in ROWS:
        r = [result[f"{key}/R@{k}"] for k in (1, 5, 10)]
        lines.append(f"  {label:14s} R@1 {r[0]:5.1f}  R@5 {r[1]:5.1f}  R@10 {r[2]:5.1f}  "
                     f"medr {result[f'{key}/medr']:.0f}  meanr {result[f'{key}/meanr']:.1f}")
    lines.append(f"  RSUM {result['rsum']:.1f}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from tvrn.data import TvrnDataError
    from tvrn.fileio import write_json
    from tvrn.pipeline import evaluate_checkpoints
    from tvrn.distributed import cleanup_distributed, init_distributed

    info = init_distributed()  # under torchrun the scoring work is split across the ranks; rank 0 reports
    if info.enabled and (args.two_stage or args.published_protocol):
        print("tvrn eval: --two-stage and --published-protocol run in one process (not under torchrun)", file=sys.stderr)
        return 2
    try:
        result = evaluate_checkpoints(args.inputs, args.data, split=args.split, protocol=args.protocol,
                                      adjacency_threshold=args.adjacency_threshold, eval_batch_size=args.batch_size,
                                      save_scores_to=args.save_scores if info.is_main else None, device=args.device,
                                      progress=not args.no_progress, two_stage=args.two_stage,
                                      published_protocol=args.published_protocol)
    except (TvrnDataError, ValueError, FileNotFoundError) as e:
        print(f"tvrn eval: {e}", file=sys.stderr)
        return 2
    finally:
        cleanup_distributed()
    if not info.is_main:
        return 0
    if info.enabled:
        print(f"tvrn eval: scored on {info.world_size} ranks (the block plan split across them)")
    what = "ensemble of " + ", ".join(args.inputs) if len(args.inputs) > 1 else args.inputs[0]
    print(f"tvrn eval: {what} on {args.data} {args.split}, protocol {args.protocol}")
    print(format_metrics(result))
    if "two_stage" in result:
        print(format_two_stage(result["two_stage"]))
    if "published_protocol" in result:
        print("  as the TVRN authors' evaluation script computes it (shards of 100, first-image refinement, last "
              "batch's boxes; not a per-pair evaluation):")
        print(format_metrics(result["published_protocol"]))
    grounding = pointing_games(args)
    if grounding:
        from tvrn.grounding import format_pointing

        for p, g in grounding.items():
            print(format_pointing(g) if len(args.inputs) == 1 else f"  {p}:\n" + format_pointing(g))
        result["pointing_game"] = grounding if len(args.inputs) > 1 else next(iter(grounding.values()))
    if args.out:
        write_json(args.out, result)
        print(f"  metrics written to {args.out}")
    return 0
