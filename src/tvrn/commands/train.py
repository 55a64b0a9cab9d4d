"""`tvrn train --config PRESET_OR_JSON [--set section.key=value ...]`: train from a config.

Runs as one process, or under torchrun (`torchrun --nproc_per_node=N -m tvrn.cli train ...`), in which case
every rank trains on its shard through DistributedDataParallel and rank 0 writes checkpoints and logs.
"""
from __future__ import annotations

import argparse
import json
import sys

from ._args import positive_int


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a model from a config preset or JSON file",
        description="Train a model from a config (a preset name from `tvrn train --list-presets`, or a JSON "
        "file). Flags override config values; the resolved config is saved as OUT/run.json.")
    p.add_argument("--config", "-c", default="tvrn_synth", help="preset name or JSON path (default %(default)s)")
    p.add_argument("--data", help="precomp data folder (overrides data.root)")
    p.add_argument("--out", "-o", help="run folder for checkpoints and logs (default runs/<model name>)")
    p.add_argument("--model", help="registered model name (overrides model.name)")
    p.add_argument("--epochs", type=positive_int, help="overrides train.epochs")
    p.add_argument("--batch-size", type=positive_int, help="overrides train.batch_size")
    p.add_argument("--lr", type=float, help="overrides train.lr")
    p.add_argument("--seed", type=int, help="overrides train.seed")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config value (JSON values), e.g. --set model.spatial_context=false")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt if it exists")
    p.add_argument("--deterministic", action="store_true", help="deterministic algorithms (bit-exact resume)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--list-presets", action="store_true", help="list the shipped presets and exit")
    p.set_defaults(func=run)


def flag_overrides(args: argparse.Namespace) -> list[str]:
    """The dedicated flags as section.key=value overrides (applied after --set ones)."""
    out = list(args.overrides)
    pairs = [("data.root", args.data), ("model.name", args.model), ("train.epochs", args.epochs),
             ("train.batch_size", args.batch_size), ("train.lr", args.lr), ("train.seed", args.seed)]
    for key, value in pairs:
        if value is not None:
            out.append(f"{key}={json.dumps(value)}")
    if args.deterministic:
        out.append("train.deterministic=true")
    return out


def stopped_early_line(summary: dict) -> str:
    """What `tvrn train` says when the trainer stopped before train.epochs (epochs count from 0, as in
    metrics.jsonl and the best-epoch line)."""
    done, planned = summary["epochs_completed"], summary.get("epochs_planned")
    of = f" ({done} of {planned} epochs run)" if planned is not None else ""
    reason = summary.get("stop_reason") or "no dev RSUM gain for train.patience epochs"
    return (f"stopped early after epoch {done - 1}{of}: {reason}; best epoch {summary.get('best_epoch')}; "
            f"set train.patience=0 (--set train.patience=0) to run every epoch")


def run(args: argparse.Namespace) -> int:
    from tvrn.config import ConfigError, check_config, check_overrides, list_presets
    from tvrn.data import TvrnDataError
    from tvrn.pipeline import resolve_config, train_from_config
    from tvrn.distributed import cleanup_distributed, dist_info

    if args.list_presets:
        print("\n".join(list_presets()))
        return 0
    try:
        check_overrides(args.overrides)  # unknown keys and wrongly typed values, named before anything runs
        cfg = resolve_config(args.config, flag_overrides(args))
        check_config(cfg, f"config {args.config}")
    except (ConfigError, ValueError) as e:
        print(f"tvrn train: {e}", file=sys.stderr)
        return 2
    out = args.out or f"runs/{cfg['model']['name']}"
    try:
        summary = train_from_config(cfg, out, resume=args.resume, progress=not args.no_progress,
                                    device=args.device)
    except (TvrnDataError, ConfigError) as e:
        if getattr(args, "debug", False):  # tvrn --debug train ...: the traceback, as for every other error
            raise
        print(f"tvrn train: {e}", file=sys.stderr)
        return 2
    finally:
        is_main = dist_info().is_main
        cleanup_distributed()
    if is_main:
        best = summary.get("best_rsum")
        print(f"tvrn train: {summary['model_name']} ({summary['parameters'] / 1e6:.2f} M parameters), "
              f"{summary['epochs_completed']} epochs, {summary['steps']} steps"
              + (f", best dev RSUM {best:.1f} at epoch {summary['best_epoch']}" if best is not None else ""))
        if summary.get("stopped_early"):
            print(f"  {stopped_early_line(summary)}")
        print(f"  checkpoints: {summary['best_checkpoint'] or summary['last_checkpoint']}; log: {out}/metrics.jsonl")
    return 0
