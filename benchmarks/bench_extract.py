"""`tvrn extract` on scikit-image's photos: seconds per image, grid vs selective-search regions, and what each
gives in the end-to-end check (a small TVRN trained on the photos' captions).

Seconds per image: `extract_split` over the 13 captioned photos of tests/fixtures/own_images (decode, EXIF,
resize, boxes, backbone, RoIAlign, writes), after a warm-up image, at each --input-sizes, one intra-op thread
by default (on the shared 2-core machine several OpenMP threads wait on each other and are far slower).

Retrieval: the photos' captions split in two, the last caption of each photo held out (13 captions), the
others (15) train TVRN (tvrn_sgr, D=64) --epochs epochs; t2i / i2t recall on the held-out captions against
the 13 photos (chance R@1 = 7.7 %). The photos are the same in training and test: this measures whether a
caption never seen finds its photo, on 13 photos, not a benchmark of the features.

    python benchmarks/bench_extract.py [--input-sizes 224 384] [--epochs 10] [--out benchmarks/results/extract.json]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "own_images" / "captions.csv"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--input-sizes", type=int, nargs="+", default=[224, 384])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "extract.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import skimage

    from tvrn.data.captions import match_images, read_captions, write_split_captions
    from tvrn.data.vocab import Vocabulary
    from tvrn.evaluation import evaluate
    from tvrn.extract import Recipe, RegionExtractor, extract_split, list_images
    from tvrn.pipeline import resolve_config, train_from_config
    from tvrn.scoring import score_all
    from tvrn.search import SearchIndex

    work = Path(tempfile.mkdtemp(prefix="bench_extract_"))
    photos = work / "photos"
    photos.mkdir()
    records = read_captions(FIXTURE)
    for name in sorted({r.image for r in records}):
        shutil.copy(Path(skimage.__file__).parent / "data" / name, photos / name)
    files = list_images(photos)
    caps, _ = match_images(records, files, str(FIXTURE))
    results = []
    for size in args.input_sizes:
        for regions in ("grid", "selective_search"):
            ex = RegionExtractor(Recipe(regions=regions, input_size=size))
            extract_split(ex, photos, files[:1], work / f"warm_{regions}_{size}", "warm")  # warm-up
            data = work / f"data_{regions}_{size}"
            t0 = time.perf_counter()
            res = extract_split(ex, photos, files, data, "train", batch_size=8, workers=2)
            sec = (time.perf_counter() - t0) / len(files)
            for split in ("dev", "test"):  # the same photos, with the held-out captions
                for suffix in ("ims.npy", "ims_bbx.npy", "ims_size.npy", "ids.txt"):
                    shutil.copy(data / f"train_{suffix}", data / f"{split}_{suffix}")
                write_split_captions(data, split, [caps[f][-1:] for f in res.files])
            write_split_captions(data, "train", [caps[f][:-1] for f in res.files])
            Vocabulary.build([c for f in res.files for c in caps[f]], min_count=1).save(data / "vocab.json")
            cfg = resolve_config({"model": {"name": "tvrn_sgr", "embed_size": 64, "sim_dim": 32, "word_dim": 32},
                                  "data": {"root": str(data)},
                                  "train": {"epochs": args.epochs, "batch_size": 8, "lr": 2e-3, "seed": 0,
                                            "tensorboard": False, "patience": 100, "loss_mode": "sum"}})
            t1 = time.perf_counter()
            train_from_config(cfg, data / "run")
            train_s = time.perf_counter() - t1
            index = SearchIndex.build(data / "run" / "last.pt", data, "test")
            m = evaluate(score_all(index.model, index.enc_images, index.enc_texts), index.caption_to_image)
            row = {"regions": regions, "input_size": size, "num_regions": ex.recipe.num_regions,
                   "threads": args.threads, "images": len(files), "seconds_per_image": round(sec, 4),
                   "train_seconds": round(train_s, 1), "epochs": args.epochs,
                   "held_out": {k: round(v, 1) for k, v in m.items()}}
            results.append(row)
            print(json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
