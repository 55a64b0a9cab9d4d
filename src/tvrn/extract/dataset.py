"""An image folder and a caption file -> a precomp data folder that `tvrn train`, `eval` and `index` read.

    summary = extract_dataset("photos/", "data/mine", RegionExtractor(Recipe()), captions="captions.csv",
                              fractions={"train": 0.8, "dev": 0.1, "test": 0.1}, seed=0)

Images: every .jpg / .jpeg / .png / .webp under the folder; with a caption file, those it names (an image
without a caption is left out and listed, a caption naming no file is an error unless skip_missing). Splits:
one named split, a seeded random split, a split file, or the split field of Karpathy's JSON. For each split:
features (`extract_split`, resumable), then SPLIT_caps.txt + SPLIT_cap2img.txt; then vocab.json built from
the train captions. A split already extracted with the same recipe and the same images is not redone.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional

from ..data.captions import assign_splits, match_images, read_captions, split_of, write_split_captions
from ..data.vocab import Vocabulary
from .features import RegionExtractor
from .folder import RecipeMismatchError, _list_hash, check_recipe, extract_split, read_manifest
from .images import list_images


def extract_dataset(image_dir: str | os.PathLike, out_dir: str | os.PathLike, extractor: RegionExtractor,
                    captions: Optional[str] = None, caption_format: str = "auto", split: Optional[str] = None,
                    fractions: Optional[dict] = None, seed: int = 0, split_file: Optional[str] = None,
                    skip_missing: bool = False, min_word_count: int = 1, batch_size: int = 16, workers: int = 2,
                    skip_bad: bool = False, restart: bool = False,
                    progress: Optional[Callable[[str], Callable[[int, int], None]]] = None) -> dict:
    """See the module doc. progress(split) -> a callback(done, total) for that split, or None.
    -> {"splits": {split: SplitResult or "up to date"}, "uncaptioned": [files], "missing": [(image, where)],
        "vocab": size or None}."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer of at least 1, got {batch_size!r}")
    out = Path(out_dir)
    files = list_images(image_dir)
    if not files:
        raise FileNotFoundError(f"no .jpg / .jpeg / .png / .webp image in {image_dir}")
    desc = extractor.describe()
    check_recipe(out, desc)
    caps_by_file, missing, uncaptioned, given = None, [], [], None
    if captions is not None:
        records = read_captions(captions, caption_format)
        caps_by_file, missing_recs = match_images(records, files, str(captions), skip_missing=skip_missing)
        missing = [(r.image, r.where) for r in missing_recs]
        uncaptioned = [f for f in files if f not in caps_by_file]
        files = list(caps_by_file)
        if split is None and fractions is None and split_file is None:
            named = split_of(records)
            if named:
                given = {}
                for r in records:
                    if r.image in named:
                        for f in files:  # the matched file of this record's image name
                            if f == r.image or f.rsplit("/", 1)[-1] == r.image.rsplit("/", 1)[-1]:
                                given[f] = named[r.image]
                                break
    splits = assign_splits(files, split=split, fractions=fractions, seed=seed, split_file=split_file, given=given)
    man = read_manifest(out) or {"splits": {}}
    summary = {"splits": {}, "uncaptioned": uncaptioned, "missing": missing, "vocab": None}
    for name, split_files in splits.items():
        final = out / f"{name}_ims.npy"
        done = man["splits"].get(name)
        if final.is_file() and done is None:
            raise RecipeMismatchError(f"{final} exists but was not made by tvrn extract (no entry in "
                                      f"{out / 'manifest.json'}): extract into another folder")
        if final.is_file() and not restart and done.get("requested_sha256") == _list_hash(split_files):
            summary["splits"][name] = "up to date"
            kept = (out / f"{name}_files.txt").read_text(encoding="utf-8").splitlines()
        else:
            if final.is_file() and not restart:
                raise RecipeMismatchError(f"{final} holds another set of images; pass restart to replace it")
            res = extract_split(extractor, image_dir, split_files, out, name, batch_size=batch_size,
                                workers=workers, skip_bad=skip_bad, restart=restart,
                                progress=progress(name) if progress else None)
            _note_request(out, name, split_files, image_dir)
            summary["splits"][name] = res
            kept = res.files
        if caps_by_file is not None:
            write_split_captions(out, name, [caps_by_file[f] for f in kept])
    if caps_by_file is not None and "train" in splits:
        kept = (out / "train_files.txt").read_text(encoding="utf-8").splitlines()
        vocab = Vocabulary.build([c for f in kept for c in caps_by_file[f]], min_count=min_word_count)
        vocab.save(out / "vocab.json")
        summary["vocab"] = len(vocab)
    return summary


def _note_request(out: Path, split: str, requested, image_dir) -> None:
    """Record which images were asked for (before skipping bad ones), so an unchanged rerun is 'up to date'."""
    from ..fileio import write_json

    man = read_manifest(out)
    man["splits"][split]["requested_sha256"] = _list_hash(requested)
    man["splits"][split]["image_dir"] = str(Path(image_dir).resolve())  # the web page shows these files
    write_json(out / "manifest.json", man, indent=1)
