"""`tvrn convert --from scan|sgraf|vse_infty|tvrn CHECKPOINT --out tvrn.pt`: a published checkpoint as a tvrn one."""
from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert", help="convert a published SCAN / SGRAF / VSE-infinity / TVRN checkpoint to a tvrn checkpoint",
        description="Read an official checkpoint (loaded safely: tensors, argparse.Namespace and numpy scalars "
                    "only), map every tensor to tvrn's names, set the model config from its 'opt', and write a "
                    "tvrn checkpoint that `tvrn eval` and `tvrn index` read. A tensor left over or missing is "
                    "refused by name.")
    p.add_argument("checkpoint", help="the official checkpoint (model_best.pth.tar, ...)")
    p.add_argument("--from", dest="source", required=True, choices=["scan", "sgraf", "vse_infty", "tvrn"],
                   help="whose code wrote it: SCAN, SGRAF, VSE-infinity, or the TVRN authors' (-> tvrn_*_published)")
    p.add_argument("--vocab", help="the vocabulary JSON it was trained with (GRU text encoders)")
    p.add_argument("--bert-path", help="local folder of its BERT (VSE-infinity's BERT variant)")
    p.add_argument("--out", required=True, help="tvrn checkpoint to write")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tvrn.convert import ConvertError, convert_file
    from tvrn.data import TvrnDataError

    try:
        result = convert_file(args.source, args.checkpoint, args.out, vocab_path=args.vocab, bert_path=args.bert_path)
    except (ConvertError, TvrnDataError, FileNotFoundError) as e:
        print(f"tvrn convert: {e}", file=sys.stderr)
        return 2
    cfg = result["config"]
    n = sum(t.numel() for t in result["model"].values())
    print(f"tvrn convert: {args.source} -> {cfg['model_name']} ({len(result['model'])} tensors, {n / 1e6:.2f} M values) "
          f"-> {args.out}")
    for d in result["converted_from"]["dropped"]:
        print(f"  dropped {d}")
    return 0
