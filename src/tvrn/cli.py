"""The `tvrn` command: synth | train | eval | demo | index | search | serve | convert | extract.

Each subcommand lives in `tvrn.commands.<name>` and exposes `register(subparsers)`, which adds its parser and
sets `func` to a callable taking the parsed arguments and returning an exit code. The library itself never
parses arguments and never prints; the commands do.

Errors: a bad value on the command line is refused by argparse (status 2). An expected failure of a command (a
bad file, a bad value, a model and data that do not fit: ValueError and the tvrn errors derived from it,
OSError such as FileNotFoundError / PermissionError / IsADirectoryError, KeyError, UnicodeDecodeError) ends with
status 2 and one line `tvrn COMMAND: message` on stderr; `tvrn --debug COMMAND ...` shows its traceback instead.
Ctrl-C ends with status 130. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMANDS = ("synth", "train", "eval", "demo", "search", "convert", "extract", "export", "explain")  # search: the index, search and serve commands


# Failures a user's input causes (files, values, configs, checkpoints of another model): a message, not a
# traceback. UnicodeDecodeError and json.JSONDecodeError are ValueErrors; FileNotFoundError, PermissionError,
# IsADirectoryError and NotADirectoryError are OSErrors.
EXPECTED_ERRORS = (ValueError, OSError, KeyError)


def error_message(e: BaseException) -> str:
    """One line for an expected error: its message, or what a bare KeyError / UnicodeDecodeError means."""
    if isinstance(e, KeyError):
        key = e.args[0] if len(e.args) == 1 else None
        msg = key if isinstance(key, str) and " " in key.strip() else f"missing key {key!r} in the input"
    elif isinstance(e, UnicodeDecodeError):
        msg = f"a file that should be text is not UTF-8 ({e})"
    else:
        msg = str(e) or type(e).__name__
    lines = [line.strip() for line in msg.splitlines() if line.strip()]
    return "; ".join(lines) or type(e).__name__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tvrn", description="Image-text retrieval with TVRN and its baselines.")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error instead of a one-line message (before COMMAND)")
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
        if args.debug:
            raise
        print(f"tvrn {args.command}: interrupted", file=sys.stderr)
        rc = 130
    except EXPECTED_ERRORS as e:
        if args.debug:
            raise
        print(f"tvrn {args.command}: {error_message(e)}", file=sys.stderr)
        rc = 2
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
