"""Caption files in the formats people have, the caption -> image map in the data layer, and the protocols on it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tvrn.data import CaptionMapError, PairDataset, Vocabulary, load_split
from tvrn.data.captions import (
    CaptionFileError, CaptionRecord, assign_splits, match_images, parse_fractions, read_captions, split_of,
    write_split_captions,
)
from tvrn.evaluation import evaluate_protocol


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def pairs(records):
    return [(r.image, r.caption) for r in records]


# ---------------------------------------------------------------------------- formats

def test_csv_with_header_quotes_and_extra_columns(tmp_path):
    p = _write(tmp_path, "c.csv", 'id,file_name,caption\n1,a.jpg,"a dog, running"\n2,b.JPG,  two   cats \n')
    assert pairs(read_captions(p)) == [("a.jpg", "a dog, running"), ("b.JPG", "two cats")]


def test_csv_without_header_and_flickr_kaggle_pipes(tmp_path):
    assert pairs(read_captions(_write(tmp_path, "c.csv", "a.jpg,a dog\nb.jpg,a cat\n"))) == \
        [("a.jpg", "a dog"), ("b.jpg", "a cat")]
    kaggle = "image_name| comment_number| comment\n1000.jpg| 0| Two young guys .\n1000.jpg| 1| Two men .\n"
    assert pairs(read_captions(_write(tmp_path, "results.csv", kaggle))) == \
        [("1000.jpg", "Two young guys ."), ("1000.jpg", "Two men .")]


def test_tsv_jsonl_coco_karpathy_flickr(tmp_path):
    assert pairs(read_captions(_write(tmp_path, "c.tsv", "image\tcaption\na.png\ta red car\n"))) == [("a.png", "a red car")]
    jl = '{"image": "a.png", "caption": "one"}\n\n{"file_name": "b.png", "captions": ["two", "three"]}\n'
    assert pairs(read_captions(_write(tmp_path, "c.jsonl", jl))) == [("a.png", "one"), ("b.png", "two"), ("b.png", "three")]
    coco = {"images": [{"id": 7, "file_name": "x.jpg"}, {"id": 9, "file_name": "y.jpg"}],
            "annotations": [{"image_id": 9, "id": 1, "caption": "a boat\n"}, {"image_id": 7, "id": 2, "caption": "a bus"}]}
    assert pairs(read_captions(_write(tmp_path, "captions_val.json", json.dumps(coco)))) == \
        [("y.jpg", "a boat"), ("x.jpg", "a bus")]
    karpathy = {"images": [{"filename": "p.jpg", "filepath": "val2014", "split": "val",
                            "sentences": [{"raw": "a pizza", "tokens": ["a", "pizza"]}]},
                           {"filename": "q.jpg", "split": "restval", "sentences": [{"tokens": ["a", "kite"]}]}]}
    recs = read_captions(_write(tmp_path, "dataset_coco.json", json.dumps(karpathy)))
    assert pairs(recs) == [("val2014/p.jpg", "a pizza"), ("q.jpg", "a kite")]
    assert split_of(recs) == {"val2014/p.jpg": "dev", "q.jpg": "train"}
    token = "1000092795.jpg#0\tTwo young guys with shaggy hair .\n1000092795.jpg#1\tTwo friends .\n"
    for name in ("results_20130124.token", "Flickr8k.token.txt"):
        assert pairs(read_captions(_write(tmp_path, name, token))) == \
            [("1000092795.jpg", "Two young guys with shaggy hair ."), ("1000092795.jpg", "Two friends .")]


@pytest.mark.parametrize("name,text,fmt,match", [
    ("c.csv", "image,caption\na.jpg,fine\nb.jpg,one,two\n", "auto", r"c\.csv, line 3: expected 2 columns"),
    ("c.csv", "image,caption\na.jpg,fine\nb.jpg,\n", "auto", r"c\.csv, line 3: empty caption"),
    ("c.jsonl", '{"image": "a", "caption": "x"}\n{"image": "b", "caption": \n', "auto", r"c\.jsonl, line 2: invalid JSON"),
    ("c.jsonl", '{"image": "a", "text": 3}\n', "auto", r"c\.jsonl, line 1: caption must be a string"),
    ("c.jsonl", '["a", "b"]\n', "auto", r"line 1: expected a JSON object"),
    ("c.json", '{"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 2, "caption": "x"}]}',
     "auto", r"c\.json, annotations\[0\]: image_id 2 is not in 'images'"),
    ("c.json", '{"images": [', "auto", r"c\.json, line 1: invalid JSON"),
    ("c.json", '[1, 2]', "auto", r"expected a JSON object with an 'images' list"),
    ("c.token", "a.jpg#0\tfine\na.jpg caption without a tab\n", "auto", r"c\.token, line 2: expected 'name\.jpg#N<TAB>caption'"),
    ("c.txt", "", "csv", r"c\.txt: no captions found"),
])
def test_bad_caption_files_name_file_and_line(tmp_path, name, text, fmt, match):
    with pytest.raises(CaptionFileError, match=match):
        read_captions(_write(tmp_path, name, text), fmt)


def test_not_utf8_and_missing_file(tmp_path):
    p = tmp_path / "c.csv"
    p.write_bytes(b"a.jpg,ok\nb.jpg,caf\xe9\n")
    with pytest.raises(CaptionFileError, match=r"c\.csv, line 2: not UTF-8"):
        read_captions(p)
    with pytest.raises(CaptionFileError, match="caption file not found"):
        read_captions(tmp_path / "nope.csv")


# ---------------------------------------------------------------------------- images and splits

def test_match_by_path_name_and_stem_and_missing_images_named():
    files = ["a/dog.jpg", "b/cat.PNG", "c/car.webp"]
    recs = [CaptionRecord("a/dog.jpg", "d1", "line 1"), CaptionRecord("cat.PNG", "c1", "line 2"),
            CaptionRecord("car", "r1", "line 3"), CaptionRecord("dog.jpg", "d2", "line 4"),
            CaptionRecord("zebra.jpg", "z", "line 5")]
    with pytest.raises(CaptionFileError, match=r"caps\.csv, line 5: image 'zebra\.jpg' is not in the image folder"):
        match_images(recs, files, "caps.csv")
    caps, missing = match_images(recs, files, "caps.csv", skip_missing=True)
    assert list(caps.items()) == [("a/dog.jpg", ["d1", "d2"]), ("b/cat.PNG", ["c1"]), ("c/car.webp", ["r1"])]
    assert [m.where for m in missing] == ["line 5"]


def test_seeded_split_is_reproducible_disjoint_and_sized(tmp_path):
    images = [f"{i:02d}.jpg" for i in range(20)]
    a = assign_splits(images, fractions=parse_fractions("train=0.7,dev=0.15,test=0.15"), seed=3)
    assert a == assign_splits(images, fractions=parse_fractions("train=0.7,dev=0.15,test=0.15"), seed=3)
    assert a != assign_splits(images, fractions=parse_fractions("train=0.7,dev=0.15,test=0.15"), seed=4)
    assert {k: len(v) for k, v in a.items()} == {"train": 14, "dev": 3, "test": 3}
    assert sorted(sum(a.values(), [])) == images and all(v == sorted(v) for v in a.values())
    f = _write(tmp_path, "splits.txt", "00.jpg train\n01 test\n\n02.jpg\tdev\n")
    assert assign_splits(images, split_file=str(f)) == {"train": ["00.jpg"], "test": ["01.jpg"], "dev": ["02.jpg"]}
    bad = _write(tmp_path, "bad.txt", "00.jpg train\n99.jpg test\n")
    with pytest.raises(CaptionFileError, match=r"bad\.txt, line 2: image '99\.jpg'"):
        assign_splits(images, split_file=str(bad))
    with pytest.raises(ValueError, match="sum to 1"):
        parse_fractions("train=0.5,test=0.2")


# ---------------------------------------------------------------------------- the data layer's caption map

def _split(root: Path, n_images: int, captions: list[list[str]], R=3, Dv=4):
    rng = np.random.default_rng(0)
    np.save(root / "test_ims.npy", rng.standard_normal((n_images, R, Dv)).astype(np.float32))
    write_split_captions(root, "test", captions)


def test_any_number_of_captions_per_image(tmp_path):
    _split(tmp_path, 3, [["a", "b"], ["c"], ["d", "e", "f", "g"]])
    assert (tmp_path / "test_cap2img.txt").read_text() == "0\n0\n1\n2\n2\n2\n2\n"
    ds = load_split(tmp_path, "test")
    assert ds.num_images == 3 and ds.num_captions == 7 and ds.captions == list("abcdefg")
    assert ds.caption_to_image.tolist() == [0, 0, 1, 2, 2, 2, 2]
    vocab = Vocabulary.build(ds.captions, min_count=1)
    pairs_ = PairDataset(ds, vocab)
    assert len(pairs_) == 7 and [pairs_[i].image_index for i in range(7)] == [0, 0, 1, 2, 2, 2, 2]
    np.testing.assert_array_equal(pairs_[6].features, ds.image_features([2])[0])
    limited = load_split(tmp_path, "test", limit_captions=3)
    assert limited.num_images == 2 and limited.caption_to_image.tolist() == [0, 0, 1]
    with pytest.raises(ValueError, match="does not keep whole images"):
        load_split(tmp_path, "test", limit_captions=4)


@pytest.mark.parametrize("lines,match", [
    ("0\n1\n5\n", r"test_cap2img\.txt at line 3: '5' is not an image index in \[0, 3\)"),
    ("0\n1\n-1\n", r"test_cap2img\.txt at line 3: '-1' is not an image index"),
    ("0\n1\n", r"test_cap2img\.txt: has 2 lines but .*test_caps\.txt has 3 captions"),
    ("0\n0\n1\n", r"test_cap2img\.txt: images without any caption: \[2\]"),
])
def test_bad_caption_map_named_by_file_and_line(tmp_path, lines, match):
    _split(tmp_path, 3, [["a"], ["b"], ["c"]])
    (tmp_path / "test_cap2img.txt").write_text(lines)
    with pytest.raises(CaptionMapError, match=match):
        load_split(tmp_path, "test")


def _ranks_by_loop(scores, c2i):
    """Reference ranks written here: plain loops over the definition in tvrn.metrics (ties count against)."""
    ni, nt = scores.shape
    t2i = [1 + sum(float(scores[j, c]) >= float(scores[c2i[c], c]) for j in range(ni) if j != c2i[c]) for c in range(nt)]
    i2t = []
    for i in range(ni):
        best = max(float(scores[i, c]) for c in range(nt) if c2i[c] == i)
        i2t.append(1 + sum(float(scores[i, c]) >= best for c in range(nt) if c2i[c] != i))
    return i2t, t2i


def test_protocols_on_an_uneven_caption_map_equal_plain_loops(tmp_path):
    counts = [1, 3, 2, 5, 1, 4]  # captions per image; the map is not i // 5
    _split(tmp_path, 6, [[f"c{i}_{k}" for k in range(n)] for i, n in enumerate(counts)])
    ds = load_split(tmp_path, "test")
    c2i = torch.as_tensor(ds.caption_to_image)
    scores = torch.randn(6, ds.num_captions, generator=torch.Generator().manual_seed(1))
    whole = evaluate_protocol(scores, c2i, "all")
    i2t, t2i = _ranks_by_loop(scores, c2i.tolist())
    assert whole["i2t/R@1"] == pytest.approx(100 * np.mean(np.array(i2t) <= 1))
    assert whole["t2i/R@5"] == pytest.approx(100 * np.mean(np.array(t2i) <= 5))
    assert whole["t2i/meanr"] == pytest.approx(np.mean(t2i))
    folds = evaluate_protocol(scores, c2i, "coco_1k", n_folds=2)  # folds of 3 images and their captions
    for k, fold in enumerate(folds["folds"]):
        caps = [c for c in range(ds.num_captions) if 3 * k <= int(c2i[c]) < 3 * k + 3]
        sub = scores[3 * k:3 * k + 3][:, caps]
        i2t, t2i = _ranks_by_loop(sub, [int(c2i[c]) - 3 * k for c in caps])
        assert fold["i2t/R@1"] == pytest.approx(100 * np.mean(np.array(i2t) <= 1))
        assert fold["t2i/R@1"] == pytest.approx(100 * np.mean(np.array(t2i) <= 1))
        assert fold["t2i/meanr"] == pytest.approx(np.mean(t2i))


def test_without_a_map_the_five_per_image_layout_reads_as_before(tmp_path):
    np.save(tmp_path / "test_ims.npy", np.zeros((2, 3, 4), np.float32))
    (tmp_path / "test_caps.txt").write_text("\n".join(f"c{i}" for i in range(10)) + "\n")
    assert load_split(tmp_path, "test").caption_to_image.tolist() == [0] * 5 + [1] * 5
