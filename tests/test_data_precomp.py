import os
import pickle

import numpy as np
import pytest

from tvrn.data import COCO_DEV_CAPTIONS, PrecompSplit, load_split
from tvrn.fileio import NpyRows


@pytest.mark.parametrize("repeated", [False, True])
def test_both_layouts_expose_unique_images(tmp_path, precomp_write, repeated):
    ref = precomp_write(tmp_path, "test", n_images=4, R=3, Dv=5, repeated=repeated)
    ds = PrecompSplit(tmp_path, "test")
    assert ds.repeated_images is repeated
    assert (ds.num_images, ds.num_captions, ds.num_regions, ds.feature_size) == (4, 20, 3, 5)
    assert ds.captions == ref["captions"]
    np.testing.assert_array_equal(ds.caption_to_image, np.repeat(np.arange(4), 5))
    assert ds.caption_to_image.dtype == np.int64
    np.testing.assert_array_equal(ds.image_features(np.arange(4)), ref["features"])
    np.testing.assert_array_equal(ds.boxes(np.arange(4)), ref["boxes"])
    np.testing.assert_array_equal(ds.sizes, ref["sizes"])
    assert ds.ids == ref["ids"]


@pytest.mark.parametrize("repeated", [False, True])
def test_requested_rows_equal_rows_of_whole_array(tmp_path, precomp_write, repeated):
    ref = precomp_write(tmp_path, "train", n_images=9, repeated=repeated)
    ds = PrecompSplit(tmp_path, "train")
    idx = np.array([7, 2, 3, 4, 0, 7, 8, 3])  # unordered, repeated, several contiguous runs
    np.testing.assert_array_equal(ds.image_features(idx), ref["features"][idx])
    np.testing.assert_array_equal(ds.boxes(idx), ref["boxes"][idx])
    np.testing.assert_array_equal(ds.image_features(5), ref["features"][[5]])
    np.testing.assert_array_equal(ds.image_features(slice(2, 5)), ref["features"][2:5])
    np.testing.assert_array_equal(ds.image_features(-1), ref["features"][[-1]])
    assert ds.image_features([]).shape == (0, 3, 4)
    with pytest.raises(IndexError):
        ds.image_features([9])


def test_reads_only_requested_bytes(tmp_path, precomp_write, monkeypatch):
    precomp_write(tmp_path, "test", n_images=50, R=3, Dv=4)
    ds = PrecompSplit(tmp_path, "test")
    read = []
    real = os.preadv

    def counting_preadv(fd, buffers, offset):
        n = real(fd, buffers, offset)
        read.append(n)
        return n

    monkeypatch.setattr(os, "preadv", counting_preadv)
    ds.image_features([10, 11, 12, 40])
    row_bytes = 3 * 4 * 4
    assert sum(read) == 4 * row_bytes
    assert len(read) == 2  # one read per contiguous run


def test_optional_files_absent(tmp_path, precomp_write):
    precomp_write(tmp_path, "dev", n_images=2, boxes=False, sizes=False, ids=False)
    ds = PrecompSplit(tmp_path, "dev")
    assert ds.boxes([0, 1]) is None and not ds.has_boxes
    assert ds.sizes is None and ds.ids is None


def test_optional_files_one_row_per_unique_image_in_repeated_layout(tmp_path, precomp_write):
    ref = precomp_write(tmp_path, "test", n_images=3, repeated=True)
    np.save(tmp_path / "test_ims_bbx.npy", ref["boxes"])  # not repeated
    np.save(tmp_path / "test_ims_size.npy", ref["sizes"])
    (tmp_path / "test_ids.txt").write_text("\n".join(ref["ids"]) + "\n")
    ds = PrecompSplit(tmp_path, "test")
    np.testing.assert_array_equal(ds.boxes([2, 0]), ref["boxes"][[2, 0]])
    np.testing.assert_array_equal(ds.sizes, ref["sizes"])
    assert ds.ids == ref["ids"]


def test_ids_one_line_per_caption(tmp_path, precomp_write):
    ref = precomp_write(tmp_path, "test", n_images=3)
    (tmp_path / "test_ids.txt").write_text("\n".join(np.repeat(ref["ids"], 5)) + "\n")
    assert PrecompSplit(tmp_path, "test").ids == ref["ids"]


def test_dev_limited_to_first_5000_captions(tmp_path, precomp_write):
    ref = precomp_write(tmp_path, "dev", n_images=1003, R=2, Dv=2)
    for ds in (PrecompSplit(tmp_path, "dev", limit_captions=COCO_DEV_CAPTIONS), load_split(tmp_path, "dev_5k")):
        assert (ds.split, ds.num_captions, ds.num_images) == ("dev", 5000, 1000)
        assert ds.captions == ref["captions"][:5000]
        assert ds.caption_to_image[-1] == 999
        assert ds.sizes.shape == (1000, 2) and len(ds.ids) == 1000
        np.testing.assert_array_equal(ds.image_features([999]), ref["features"][[999]])
        with pytest.raises(IndexError):
            ds.image_features([1000])
    assert load_split(tmp_path, "dev").num_captions == 5015
    with pytest.raises(ValueError, match="multiple of 5"):
        PrecompSplit(tmp_path, "dev", limit_captions=4999)


def test_captions_are_stripped_and_trailing_newline_optional(tmp_path, precomp_write):
    caps = [f"  cap {i}\r" for i in range(5)]
    precomp_write(tmp_path, "test", n_images=1, captions=caps)
    (tmp_path / "test_caps.txt").write_text("\n".join(caps))  # no final newline
    assert PrecompSplit(tmp_path, "test").captions == [f"cap {i}" for i in range(5)]


def test_iter_chunks_covers_split_in_order(tmp_path, precomp_write):
    ref = precomp_write(tmp_path, "test", n_images=7, R=2, Dv=3)
    ds = PrecompSplit(tmp_path, "test")
    chunks = list(ds.iter_chunks(max_bytes=3 * 2 * 3 * 4))  # 3 images per chunk
    assert [len(i) for i, _ in chunks] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate([i for i, _ in chunks]), np.arange(7))
    np.testing.assert_array_equal(np.concatenate([f for _, f in chunks]), ref["features"])


def test_split_pickles_for_dataloader_workers(tmp_path, precomp_write):
    ref = precomp_write(tmp_path, "test", n_images=3)
    ds = PrecompSplit(tmp_path, "test")
    ds.image_features([0])  # opens the file descriptor
    clone = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(clone.image_features([1, 2]), ref["features"][[1, 2]])


def test_npy_rows_other_dtypes(tmp_path):
    a = np.arange(24, dtype=np.float64).reshape(6, 2, 2)
    np.save(tmp_path / "a.npy", a)
    rows = NpyRows(str(tmp_path / "a.npy"))
    assert rows.shape == (6, 2, 2) and len(rows) == 6
    np.testing.assert_array_equal(rows.rows(np.array([5, 0, 1])), a[[5, 0, 1]])
