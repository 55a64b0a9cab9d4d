"""`tvrn synth OUT`: write the synthetic benchmark (SCAN precomp layout) to OUT. See docs/synthetic.md."""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields, replace
from pathlib import Path

_FLAGS = {  # SynthConfig field -> help
    "seed": "random seed (same seed and options: byte-identical output)",
    "train_images": "train images (5 captions each)",
    "dev_images": "dev images",
    "test_images": "test images",
    "regions": "R, regions per image (>= 2 * max objects; the rest are background regions)",
    "feature_dim": "Dv, region feature size",
    "image_size": "side of the rendered square images in pixels (the boxes' frame)",
    "min_objects": "fewest objects per image (>= 2)",
    "max_objects": "most objects per image (<= 4)",
    "twin_fraction": "fraction of each split's images that are hard-negative twins",
    "same_category_prob": "chance of two objects of the same category in a scene",
    "noise": "feature noise std per dimension (evidence embeddings have std 1)",
}


def register(subparsers) -> None:
    from tvrn.data.synth import SynthConfig

    defaults = SynthConfig()
    p = subparsers.add_parser(
        "synth",
        help="write the synthetic benchmark (precomp layout)",
        description="Generate a synthetic image-text retrieval benchmark in SCAN's precomp layout: train, dev "
        "and test region features, boxes, captions, ids, rendered PNGs, vocab.json and manifest.json.",
    )
    p.add_argument("out", type=Path, help="output folder")
    for f in fields(SynthConfig):
        if f.name in _FLAGS:
            p.add_argument("--" + f.name.replace("_", "-"), type=type(getattr(defaults, f.name)),
                           default=getattr(defaults, f.name), help=f"{_FLAGS[f.name]} (default %(default)s)")
    p.add_argument("--no-images", action="store_true", help="do not render PNG images")
    p.add_argument("--merge-evidence", action="store_true",
                   help="probe variant: colour evidence also in each object's category region (docs/synthetic.md)")
    p.add_argument("--force", action="store_true", help="write into OUT even if it is not empty")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tvrn.data.synth import SPLITS, SynthConfig, write_dataset

    config = replace(SynthConfig(), render_images=not args.no_images, merge_evidence=args.merge_evidence,
                     **{name: getattr(args, name) for name in _FLAGS})
    try:
        config.validate()
    except ValueError as e:
        print(f"tvrn synth: {e}", file=sys.stderr)
        return 2
    out: Path = args.out
    if out.exists() and any(out.iterdir()) and not args.force:
        print(f"tvrn synth: {out} is not empty (use --force to write into it)", file=sys.stderr)
        return 2

    def on_split(split, stats):
        twins = ", ".join(f"{n} {k}" for k, n in stats["twin_pairs"].items())
        print(f"  {split:5s} {stats['images']:6d} images {stats['captions']:6d} captions  twin pairs: {twins}")

    print(f"tvrn synth: seed {config.seed}, R={config.regions}, Dv={config.feature_dim}, "
          f"{config.image_size}x{config.image_size} px -> {out}")
    result = write_dataset(out, config, on_split=on_split)
    m, sec = result.manifest, result.seconds
    size_mb = sum(p.stat().st_size for p in out.iterdir() if p.is_file()) / 2**20
    n_png = sum(m["counts"][s]["images"] for s in SPLITS) if config.render_images else 0
    print(f"  vocabulary {m['vocabulary_size']} words; {size_mb:.1f} MiB of arrays and text"
          + (f"; {n_png} PNGs in {out / 'images'}" if n_png else "; no images"))
    print(f"  done in {sec['total']:.1f} s (generate {sec['generate']:.1f} s, write {sec['write']:.1f} s, "
          f"render {sec['render']:.1f} s); manifest: {out / 'manifest.json'}")
    return 0
