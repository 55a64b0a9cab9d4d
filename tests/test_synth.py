"""Synthetic benchmark: layout, determinism, geometry of relations and evidence, twins, atomic writes."""
import difflib
import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tvrn.data import synth
from tvrn.data.synth import (
    COLOURS, RELATIONS, SIZES, SPLITS, SynthConfig, generate_split, write_dataset,
)
from tvrn.data.vocab import tokenize

SMALL = SynthConfig(seed=3, train_images=60, dev_images=24, test_images=24, regions=10, feature_dim=32)


def _files(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    write_dataset(out, SMALL)
    return out


@pytest.fixture(scope="module")
def splits():
    return {s: generate_split(SMALL, s) for s in SPLITS}


def _iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def test_deterministic_for_a_seed(dataset, tmp_path):
    write_dataset(tmp_path / "again", SMALL)
    first, again = _files(dataset), _files(tmp_path / "again")
    assert first.keys() == again.keys()
    assert [k for k in first if first[k] != again[k]] == []
    write_dataset(tmp_path / "other", replace(SMALL, seed=4, render_images=False))
    other = _files(tmp_path / "other")
    for name in ("train_ims.npy", "train_caps.txt", "test_ims_bbx.npy"):
        assert other[name] != first[name]


def test_split_content_does_not_depend_on_other_split_sizes(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_dataset(a, replace(SMALL, render_images=False))
    write_dataset(b, replace(SMALL, train_images=30, render_images=False))
    for name in ("test_ims.npy", "test_caps.txt", "dev_ims_bbx.npy"):
        assert (a / name).read_bytes() == (b / name).read_bytes()


def test_precomp_layout_shapes_and_vocab(dataset):
    side = SMALL.image_size
    all_ids = []
    for split in SPLITS:
        n = SMALL.split_images(split)
        ims = np.load(dataset / f"{split}_ims.npy")
        assert ims.dtype == np.float32 and ims.shape == (n, SMALL.regions, SMALL.feature_dim)
        assert np.isfinite(ims).all() and (ims >= 0).all()
        caps = (dataset / f"{split}_caps.txt").read_text().splitlines()
        assert len(caps) == 5 * n and all(c.strip() for c in caps)
        bbx = np.load(dataset / f"{split}_ims_bbx.npy")
        assert bbx.dtype == np.float32 and bbx.shape == (n, SMALL.regions, 4)
        assert (bbx[..., 2] >= bbx[..., 0]).all() and (bbx[..., 3] >= bbx[..., 1]).all()
        size = np.load(dataset / f"{split}_ims_size.npy")
        assert size.shape == (n, 2) and (size == side).all()
        assert (bbx >= 0).all() and (bbx[..., [0, 2]] <= size[:, None, :1]).all()
        assert (bbx[..., [1, 3]] <= size[:, None, 1:]).all()
        ids = (dataset / f"{split}_ids.txt").read_text().splitlines()
        assert len(ids) == n
        all_ids += ids
        scenes = (dataset / f"{split}_scenes.jsonl").read_text().splitlines()
        assert [json.loads(s)["id"] for s in scenes] == ids
        assert [c["text"] for s in scenes for c in json.loads(s)["captions"]] == caps
        pngs = sorted(p.stem for p in (dataset / "images" / split).glob("*.png"))
        assert pngs == sorted(ids)
    assert len(set(all_ids)) == len(all_ids)

    vocab = json.loads((dataset / "vocab.json").read_text())
    assert set(vocab) == {"word2idx", "idx2word", "idx"}
    assert [vocab["idx2word"][str(i)] for i in range(4)] == ["<pad>", "<start>", "<end>", "<unk>"]
    assert vocab["idx"] == len(vocab["word2idx"]) == len(vocab["idx2word"])
    assert all(vocab["idx2word"][str(i)] == w for w, i in vocab["word2idx"].items())
    train_words = {w for c in (dataset / "train_caps.txt").read_text().splitlines() for w in tokenize(c)}
    assert set(vocab["word2idx"]) == train_words | {"<pad>", "<start>", "<end>", "<unk>"}

    manifest = json.loads((dataset / "manifest.json").read_text())
    assert manifest["seed"] == SMALL.seed and manifest["config"]["regions"] == SMALL.regions
    assert set(manifest["caption_types"]) and all(t["cues"] for t in manifest["caption_types"].values())
    for split in SPLITS:
        assert manifest["counts"][split]["captions"] == 5 * SMALL.split_images(split)
    assert set(manifest["files"]) >= {f"{s}_{f}" for s in SPLITS for f in ("ims.npy", "caps.txt", "ids.txt")}


def _overlap(a_lo, a_hi, b_lo, b_hi):
    return min(a_hi, b_hi) - max(a_lo, b_lo)


def _holds(rel, a, b, side):
    """The relation geometry of docs/synthetic.md, written out independently. a, b: boxes x1, y1, x2, y2."""
    eps = 0.01
    wa, ha, wb, hb = a[2] - a[0], a[3] - a[1], b[2] - b[0], b[3] - b[1]
    x_ov, y_ov = _overlap(a[0], a[2], b[0], b[2]), _overlap(a[1], a[3], b[1], b[3])
    if rel == "on":
        return -eps <= a[3] - b[1] <= 0.2 * min(ha, hb) + eps and a[1] < b[1] and x_ov >= 0.5 * min(wa, wb) - eps
    if rel == "under":
        return _holds("on", b, a, side)
    if rel == "left of":
        return 1 - eps <= b[0] - a[2] <= 1 + 0.14 * side + eps and y_ov >= 0.5 * min(ha, hb) - eps
    if rel == "right of":
        return _holds("left of", b, a, side)
    if rel == "next to":
        gap = max(b[0] - a[2], a[0] - b[2])
        return 1 - eps <= gap <= 1 + 0.04 * side + eps and y_ov >= 0.5 * min(ha, hb) - eps
    if rel == "inside":
        return b[0] < a[0] and b[1] < a[1] and a[2] < b[2] and a[3] < b[3]
    raise AssertionError(rel)


def test_relation_geometry_matches_boxes(splits):
    seen = Counter()
    for sp in splits.values():
        for scene in sp.scenes:
            boxes = [o.box for o in scene.objects]
            for a, rel, b in scene.relations:
                assert _holds(rel, boxes[a], boxes[b], SMALL.image_size), (scene.id, rel, boxes[a], boxes[b])
                seen[rel] += 1
                if rel == "inside":
                    assert scene.objects[a].size == "small" and scene.objects[b].size == "large"
    assert set(seen) == set(RELATIONS)


def test_evidence_regions_overlap_and_objects_stay_apart(splits):
    for sp in splits.values():
        for i, scene in enumerate(sp.scenes):
            kind, owner, boxes = sp.region_kind[i], sp.region_object[i], sp.boxes[i]
            n = len(scene.objects)
            assert sorted(owner[kind == 0]) == list(range(n)) == sorted(owner[kind == 1])
            assert (owner[kind == 2] == -1).all() and (kind == 2).sum() == SMALL.regions - 2 * n
            cat = {int(o): boxes[r] for r, (k, o) in enumerate(zip(kind, owner)) if k == 0}
            col = {int(o): boxes[r] for r, (k, o) in enumerate(zip(kind, owner)) if k == 1}
            for j in range(n):
                assert _iou(cat[j], col[j]) >= 0.2
            inside = {frozenset((a, b)) for a, rel, b in scene.relations if rel == "inside"}
            for j in range(n):
                for k in range(j + 1, n):
                    if frozenset((j, k)) in inside:
                        continue
                    for bj in (cat[j], col[j]):
                        for bk in (cat[k], col[k]):
                            assert _iou(bj, bk) < 0.2, (scene.id, j, k)


def test_features_carry_evidence_only_in_their_region():
    """A linear read-out of the colour embedding finds the colour in the colour region, not the category one."""
    cfg = replace(SMALL, feature_dim=256, noise=0.3)
    sp = generate_split(cfg, "dev")
    emb = synth._embeddings(cfg)["colour"]  # (6, Dv)
    colour_ids = {c: i for i, c in enumerate(COLOURS)}
    hits = {0: 0, 1: 0}
    total = 0
    for i, scene in enumerate(sp.scenes):
        for r in range(cfg.regions):
            if sp.region_kind[i, r] == 2:
                continue
            truth = colour_ids[scene.objects[sp.region_object[i, r]].colour]
            f = sp.features[i, r] - sp.features[i, r].mean()
            hits[int(sp.region_kind[i, r])] += int(np.argmax(emb @ f) == truth)
            total += sp.region_kind[i, r] == 1
    assert hits[1] / total > 0.9  # colour regions: colour decodable
    assert hits[0] / total < 0.5  # category regions: near chance (1/6)


def _changed_tokens(x: str, y: str):
    tx, ty = tokenize(x), tokenize(y)
    ops = difflib.SequenceMatcher(a=tx, b=ty, autojunk=False).get_opcodes()
    return [(tx[i1:i2], ty[j1:j2]) for tag, i1, i2, j1, j2 in ops if tag != "equal"]


def test_hard_negative_twins_in_every_split(splits):
    relation_words = {w for r in RELATIONS.values() for p in r["phrases"] + r["reverse"] for w in tokenize(p)}
    for split, sp in splits.items():
        kinds = Counter()
        for i, scene in enumerate(sp.scenes):
            if scene.twin is None:
                continue
            twin = sp.scenes[scene.twin]
            assert twin.twin == i and twin.twin_kind == scene.twin_kind
            kinds[scene.twin_kind] += 1
            assert [o.category for o in scene.objects] == [o.category for o in twin.objects]
            assert [o.size for o in scene.objects] == [o.size for o in twin.objects]
            assert [c["type"] for c in scene.captions] == [c["type"] for c in twin.captions]
            if scene.twin_kind == "colour_swap":
                cols, tcols = [o.colour for o in scene.objects], [o.colour for o in twin.objects]
                assert cols[0] != cols[1] and tcols[:2] == cols[1::-1] and tcols[2:] == cols[2:]
                assert [o.box for o in scene.objects] == [o.box for o in twin.objects]
                assert scene.relations == twin.relations
                for c, tc in zip(scene.captions, twin.captions):
                    tok, ttok = tokenize(c["text"]), tokenize(tc["text"])
                    changed = [{x, y} for x, y in zip(tok, ttok) if x != y]
                    assert len(tok) == len(ttok) and changed, (c["text"], tc["text"])
                    assert all(pair == {cols[0], cols[1]} for pair in changed), (c["text"], tc["text"])
            else:
                (a, rel, b), (ta, trel, tb) = scene.relations[0], twin.relations[0]
                assert (a, b) == (ta, tb) and trel == RELATIONS[rel]["converse"]
                assert [o.colour for o in scene.objects] == [o.colour for o in twin.objects]
                for c, tc in zip(scene.captions, twin.captions):
                    diff = _changed_tokens(c["text"], tc["text"])
                    assert diff, (c["text"], tc["text"])
                    assert {w for d in diff for side in d for w in side} <= relation_words, (c["text"], tc["text"])
        assert kinds["colour_swap"] > 0 and kinds["relation_flip"] > 0, split


def test_semantic_ambiguity_present(splits):
    same = sum(len({o.category for o in s.objects}) < len(s.objects) for sp in splits.values() for s in sp.scenes)
    assert same > 0
    for sp in splits.values():  # "a red cat" names exactly one object
        for s in sp.scenes:
            assert len({(o.category, o.colour) for o in s.objects}) == len(s.objects)


def test_no_temp_files_and_interrupted_run_leaves_no_manifest(dataset, tmp_path, monkeypatch):
    assert not [p for p in dataset.rglob("*") if ".tmp" in p.name]
    write_dataset(tmp_path, replace(SMALL, render_images=False))
    calls, original = [], synth.render_scene

    def failing_render(scene, size):
        calls.append(scene.id)
        if len(calls) > 5:
            raise RuntimeError("killed")
        return original(scene, size)

    monkeypatch.setattr(synth, "render_scene", failing_render)
    with pytest.raises(RuntimeError, match="killed"):
        write_dataset(tmp_path, SMALL)
    assert not (tmp_path / "manifest.json").exists()  # the old manifest is gone: the folder is incomplete
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]


def test_config_validation():
    with pytest.raises(ValueError, match="regions"):
        replace(SMALL, regions=7).validate()
    with pytest.raises(ValueError, match="objects"):
        replace(SMALL, max_objects=5).validate()


def test_cli_writes_and_summarises(tmp_path, capsys):
    from tvrn.cli import main

    out = tmp_path / "data"
    args = ["synth", str(out), "--train-images", "20", "--dev-images", "10", "--test-images", "10",
            "--feature-dim", "16", "--no-images", "--seed", "1"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "train" in text and "100 captions" in text and str(out) in text
    assert (out / "manifest.json").exists() and not (out / "images").exists()
    assert main(args) == 2  # not empty
    assert "not empty" in capsys.readouterr().err
    assert main(args + ["--force"]) == 0


def test_reads_through_precomp_reader(dataset):
    precomp = pytest.importorskip("tvrn.data.precomp", reason="tvrn.data.precomp (the precomp reader) not there yet")
    for split in SPLITS:
        ds = precomp.load_split(dataset, split, validate=True)
        n = SMALL.split_images(split)
        assert ds.num_images == n and ds.num_captions == 5 * n and not ds.repeated_images
        assert ds.image_features([0, n - 1]).shape == (2, SMALL.regions, SMALL.feature_dim)
        assert ds.boxes([0]).shape == (1, SMALL.regions, 4)
        assert ds.ids == (dataset / f"{split}_ids.txt").read_text().splitlines()
        assert ds.sizes.shape == (n, 2)
