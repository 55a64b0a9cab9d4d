"""The `tvrn` command: synth | train | eval | demo | index | search | serve | convert | extract.

Each subcommand lives in `tvrn.commands.<name>` and exposes `register(subparsers)`, which adds its parser and
sets `func` to a callable taking the parsed arguments and returning an exit code. The library itself never
parses arguments and never prints; the commands do.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMANDS = ("synth", "train", "eval", "demo", "search", "convert", "extract")  # search: the index, search and serve commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tvrn", description="Image-text retrieval with TVRN and its baselines.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"tvrn.commands.{name}")
        except ModuleNotFoundError as e:  # a command whose module has not landed yet
            if e.name != f"tvrn.commands.{name}":
                raise
            continue
        module.register(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        rc = 130
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Under torchrun, skip interpreter finalisation: gloo's worker threads can still hold work objects
        # whose destruction during finalisation aborts the process (SIGABRT, "terminate called without an
        # active exception") after all the work is done and the process group is destroyed.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    return rc


if __name__ == "__main__":
    sys.exit(main())
