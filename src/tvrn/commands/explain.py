"""`tvrn explain INDEX "caption" --image N`: why gallery image N scores what it does for a caption.

    tvrn explain runs/tvrn/test.index "a black cat on top of a small ball" --image 3
    tvrn explain runs/tvrn/test.index "a red ball" --image 3 -k 2 --json

Prints, per token of the caption, its most attended regions (region index, box x1, y1, x2, y2, weight), the
word's similarity contribution where the model has one, and the module-3 gates; the score is the search hit's.
"""
from __future__ import annotations

import argparse
import json
import sys

from ._args import IntermixedArgumentParser, non_negative_int, positive_int


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "explain", help="show which regions each word of a caption attends to in a gallery image",
        description="For a caption and gallery image N of an index built by `tvrn index`: each token's attention "
                    "over the image's regions as the model computes it when scoring the pair (top -k regions with "
                    "their boxes and weights), per-word similarity contributions and module-3 gates where the "
                    "model has them, and the pair's score. Options may come before or after the caption.")
    p.__class__ = IntermixedArgumentParser
    p.add_argument("index", help="index from `tvrn index`")
    p.add_argument("caption", help="the caption (query text)")
    p.add_argument("--image", type=non_negative_int, required=True, help="gallery image index")
    p.add_argument("-k", type=positive_int, default=3, help="regions shown per word (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print the whole explanation as JSON")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the index files on opening")
    p.set_defaults(func=run)


def _box(box) -> str:
    return "[" + ", ".join(f"{float(v):.0f}" for v in box) + "]"


def format_explanation(ex, k: int = 3, image_id: str = "") -> str:
    """The table `tvrn explain` prints for an Explanation."""
    lines = [f"  {image_id + ': ' if image_id else ''}{ex.regions.numel()} regions; model {ex.model}; "
             f"score {ex.score:.4f}"]
    if ex.attention is None:
        lines.append(f"  {ex.model} computes no word-to-region attention (a dual encoder: pooled vectors, one cosine)")
        return "\n".join(lines)
    how = "regions attending to the word most (SCAN i2t: region-to-word weights)" \
        if ex.direction == "region_to_word" else "most attended regions"
    contrib = ex.word_contributions is not None
    lines.append(f"  word          {'contrib  ' if contrib else ''}{how}: region [x1, y1, x2, y2] weight")
    words = ex.words or [str(int(t)) for t in ex.tokens]
    for pos, w in enumerate(words):
        tops = []
        for r, weight in ex.top_regions(pos, k):
            j = int((ex.regions == r).nonzero()[0, 0])
            box = f" {_box(ex.boxes[j])}" if ex.boxes is not None else ""
            tops.append(f"{r}{box} {weight:.3f}")
        c = f"{float(ex.word_contributions[pos]):7.3f}  " if contrib else ""
        lines.append(f"  {w[:12]:12s}  {c}" + "   ".join(tops))
    if contrib:
        glob = f"; global node {ex.global_contribution:.3f}" if ex.global_contribution is not None else ""
        lines.append(f"  contrib: {ex.contribution_kind}{glob}")
    if ex.region_contributions is not None:
        lines.append("  region cosines: " + ", ".join(f"{int(r)} {float(c):.3f}"
                                                      for r, c in zip(ex.regions, ex.region_contributions)))
    if ex.gates is not None:
        order = ex.gates.argsort(descending=True)[:k]
        lines.append("  module-3 gates (top): " + ", ".join(f"region {int(ex.regions[j])} {float(ex.gates[j]):.3f}"
                                                              for j in order))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from tvrn.search.index import SearchIndex, SearchIndexError

    try:
        index = SearchIndex.load(args.index, verify=not args.no_verify)
        if args.image >= index.num_images:
            raise SearchIndexError(f"--image {args.image}: the index has images 0..{index.num_images - 1}")
        ex = index.explain(args.caption, args.image)
    except (SearchIndexError, FileNotFoundError) as e:
        print(f"tvrn explain: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(dict(ex.to_dict(), image=args.image, image_id=index.image_ids[args.image]), indent=1))
        return 0
    print(f"tvrn explain: {args.caption!r} with image {args.image}")
    print(format_explanation(ex, args.k, index.image_ids[args.image]))
    return 0
