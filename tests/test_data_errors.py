"""Each data error: its type, and a message that names the file, the index and the counts."""
import numpy as np
import pytest

from tvrn.data import (
    CaptionCountError,
    DegenerateBoxError,
    EmptyCaptionError,
    FeatureFileError,
    MissingFileError,
    NonFiniteFeatureError,
    PrecompSplit,
    TvrnDataError,
    VocabularyError,
    iter_image_batches,
    load_split,
)


def test_all_errors_share_a_base():
    for cls in (CaptionCountError, DegenerateBoxError, EmptyCaptionError, FeatureFileError, MissingFileError,
                NonFiniteFeatureError, VocabularyError):
        assert issubclass(cls, TvrnDataError)
    assert issubclass(MissingFileError, FileNotFoundError)


@pytest.mark.parametrize("name", ["test_ims.npy", "test_caps.txt"])
def test_missing_required_file(tmp_path, precomp_write, name):
    precomp_write(tmp_path, "test", n_images=2)
    (tmp_path / name).unlink()
    with pytest.raises(MissingFileError) as e:
        PrecompSplit(tmp_path, "test")
    assert str(tmp_path / name) in str(e.value) and e.value.path == str(tmp_path / name)


@pytest.mark.parametrize("n_captions", [9, 11, 0])
def test_caption_count_mismatch(tmp_path, precomp_write, n_captions):
    precomp_write(tmp_path, "test", n_images=2)
    (tmp_path / "test_caps.txt").write_text("".join(f"cap {i}\n" for i in range(n_captions)))
    with pytest.raises(CaptionCountError) as e:
        PrecompSplit(tmp_path, "test")
    msg = str(e.value)
    assert f"N_img=2" in msg and f"N_caps={n_captions}" in msg
    assert "N_caps == 5 * N_img" in msg and "N_img == N_caps" in msg
    assert "test_ims.npy" in msg and "test_caps.txt" in msg
    assert (e.value.num_images, e.value.num_captions) == (2, n_captions)


def test_repeated_layout_needs_multiple_of_five(tmp_path, precomp_write):
    precomp_write(tmp_path, "test", n_images=7, captions=[f"c{i}" for i in range(35)])
    (tmp_path / "test_caps.txt").write_text("".join(f"c{i}\n" for i in range(7)))  # N_img == N_caps == 7
    with pytest.raises(CaptionCountError, match="N_img=7 .* N_caps=7"):
        PrecompSplit(tmp_path, "test")


def test_empty_caption_names_file_and_line(tmp_path, precomp_write):
    caps = [f"cap {i}" for i in range(10)]
    caps[6] = "   \t"
    precomp_write(tmp_path, "dev", n_images=2, captions=caps)
    with pytest.raises(EmptyCaptionError) as e:
        PrecompSplit(tmp_path, "dev")
    assert e.value.line_number == 7 and "line 7" in str(e.value)
    assert str(tmp_path / "dev_caps.txt") in str(e.value)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_features_lazy_and_validate(tmp_path, precomp_write, bad):
    ref = precomp_write(tmp_path, "test", n_images=6, R=2, Dv=3)
    feats = ref["features"].copy()
    feats[4, 1, 2] = bad
    np.save(tmp_path / "test_ims.npy", feats)
    ds = PrecompSplit(tmp_path, "test")  # opening reads no feature row
    np.testing.assert_array_equal(ds.image_features([0, 1, 5]), feats[[0, 1, 5]])  # rows without the bad one
    with pytest.raises(NonFiniteFeatureError) as e:
        ds.image_features([3, 4])
    assert e.value.image_index == 4 and "image 4" in str(e.value)
    assert str(tmp_path / "test_ims.npy") in str(e.value)
    with pytest.raises(NonFiniteFeatureError, match="image 4"):
        list(iter_image_batches(ds, batch_size=2))
    with pytest.raises(NonFiniteFeatureError, match="image 4"):
        ds.validate(max_bytes=2 * 2 * 3 * 4)  # 2 images per chunk
    unchecked = PrecompSplit(tmp_path, "test", check_finite=False)
    assert not np.isfinite(unchecked.image_features([4])).all()
    with pytest.raises(NonFiniteFeatureError, match="image 4"):
        unchecked.validate()  # validate always checks
    with pytest.raises(NonFiniteFeatureError, match="image 4"):
        load_split(tmp_path, "test", validate=True)


def test_non_finite_in_repeated_layout_names_unique_image(tmp_path, precomp_write):
    ref = precomp_write(tmp_path, "test", n_images=3, R=2, Dv=2, repeated=True)
    feats = np.repeat(ref["features"], 5, axis=0)
    feats[10] = np.nan  # file row 10 = unique image 2
    np.save(tmp_path / "test_ims.npy", feats)
    with pytest.raises(NonFiniteFeatureError, match="image 2"):
        PrecompSplit(tmp_path, "test").validate()


def test_degenerate_box_from_file(tmp_path, precomp_write):
    ref = precomp_write(tmp_path, "test", n_images=4, R=3)
    boxes = ref["boxes"].copy()
    boxes[2, 1] = [50, 10, 40, 20]  # x2 < x1
    np.save(tmp_path / "test_ims_bbx.npy", boxes)
    ds = PrecompSplit(tmp_path, "test")
    ds.boxes([0, 1, 3])  # fine
    for call in (lambda: ds.boxes([3, 2]), ds.validate, lambda: list(iter_image_batches(ds, 2))):
        with pytest.raises(DegenerateBoxError) as e:
            call()
        msg = str(e.value)
        assert "image 2, region 1" in msg and str(tmp_path / "test_ims_bbx.npy") in msg
        assert "(50, 10, 40, 20)" in msg
        assert (e.value.image_index, e.value.region_index, e.value.box) == (2, 1, (50.0, 10.0, 40.0, 20.0))


def test_optional_file_with_wrong_row_count(tmp_path, precomp_write):
    precomp_write(tmp_path, "test", n_images=4)
    np.save(tmp_path / "test_ims_size.npy", np.ones((3, 2), np.float32))
    with pytest.raises(FeatureFileError, match=r"test_ims_size\.npy: has 3 rows, expected one of \[4\]"):
        PrecompSplit(tmp_path, "test")


def test_features_wrong_dtype_or_shape(tmp_path, precomp_write):
    precomp_write(tmp_path, "test", n_images=2)
    np.save(tmp_path / "test_ims.npy", np.zeros((2, 3, 4), np.float64))
    with pytest.raises(FeatureFileError, match="expected float32 \\(N_img, R, Dv\\)"):
        PrecompSplit(tmp_path, "test")
    np.save(tmp_path / "test_ims.npy", np.zeros((2, 12), np.float32))
    with pytest.raises(FeatureFileError, match="test_ims.npy"):
        PrecompSplit(tmp_path, "test")


def test_truncated_feature_file(tmp_path, precomp_write):
    precomp_write(tmp_path, "test", n_images=4, R=2, Dv=2)
    path = tmp_path / "test_ims.npy"
    path.write_bytes(path.read_bytes()[:-8])  # cut half of the last row
    with pytest.raises(FeatureFileError, match="test_ims.npy: cannot open as a .npy array"):
        PrecompSplit(tmp_path, "test")
    path.write_bytes(b"not an npy file")
    with pytest.raises(FeatureFileError, match="test_ims.npy: cannot open"):
        PrecompSplit(tmp_path, "test")


def test_vocabulary_error_message(tmp_path):
    e = VocabularyError(tmp_path / "v.json", "missing key(s) ['idx']")
    assert str(e) == f"invalid vocabulary file {tmp_path / 'v.json'}: missing key(s) ['idx']"
