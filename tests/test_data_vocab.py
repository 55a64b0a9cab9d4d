import json
import os

import pytest

from tvrn.data import TokenizerLike, Vocabulary, VocabularyError, tokenize, treebank_tokenize


@pytest.mark.parametrize(
    "caption, tokens",
    [
        ("A man's dog, running.", ["a", "man", "'s", "dog", ",", "running", "."]),
        ("Two dogs can't play.", ["two", "dogs", "ca", "n't", "play", "."]),
        ("They'll go, won't they?", ["they", "'ll", "go", ",", "wo", "n't", "they", "?"]),
        ("A woman; eating 3,000 apples...", ["a", "woman", ";", "eating", "3,000", "apples", "..."]),
        ('A sign reads "stop" (in red)!', ["a", "sign", "reads", "``", "stop", "''", "(", "in", "red", ")", "!"]),
        ("The boys' toys: a ball", ["the", "boys", "'", "toys", ":", "a", "ball"]),
        ("a st. bernard dog", ["a", "st.", "bernard", "dog"]),  # only the final period is split
        ("  A  cat  ", ["a", "cat"]),
    ],
)
def test_tokenize_like_treebank(caption, tokens):
    assert tokenize(caption) == tokens


def test_treebank_keeps_case():
    assert treebank_tokenize("I'm Here.") == ["I", "'m", "Here", "."]


def captions():
    return ["A dog runs.", "a dog sits.", "A cat runs!", "a dog, a cat."]


def test_build_min_count_and_order():
    vocab = Vocabulary.build(captions(), min_count=2)
    # specials, then words seen >= 2 times in order of first appearance
    assert vocab.idx2word == ["<pad>", "<start>", "<end>", "<unk>", "a", "dog", "runs", ".", "cat"]
    assert Vocabulary.build(captions(), min_count=1).idx2word[4:] == [
        "a", "dog", "runs", ".", "sits", "cat", "!", ","
    ]
    assert (vocab.pad_id, vocab.start_id, vocab.end_id, vocab.unk_id) == (0, 1, 2, 3)
    assert len(vocab) == 9 and "dog" in vocab and "sits" not in vocab


def test_encode_decode():
    vocab = Vocabulary.build(captions(), min_count=2)
    ids = vocab.encode("A dog sits.")
    assert ids == [1, 4, 5, 3, 7, 2]  # <start> a dog <unk> . <end>
    assert vocab.decode(ids) == "a dog <unk> ."
    assert vocab.decode(ids + [0, 0], skip_special=False) == "<start> a dog <unk> . <end> <pad> <pad>"
    assert isinstance(vocab, TokenizerLike)


def test_save_load_round_trip_scan_format(tmp_path):
    vocab = Vocabulary.build(captions(), min_count=1)
    path = tmp_path / "f30k_precomp_vocab.json"
    vocab.save(path)
    data = json.loads(path.read_text())
    assert list(data) == ["word2idx", "idx2word", "idx"]
    assert data["idx"] == 12
    assert data["word2idx"]["<pad>"] == 0 and data["word2idx"]["<unk>"] == 3
    assert data["idx2word"] == {str(i): w for i, w in enumerate(vocab.idx2word)}
    assert data["word2idx"] == {w: i for i, w in enumerate(vocab.idx2word)}
    loaded = Vocabulary.load(path)
    assert loaded.idx2word == vocab.idx2word
    for c in captions() + ["an unseen zebra."]:
        assert loaded.encode(c) == vocab.encode(c)
    assert os.listdir(tmp_path) == ["f30k_precomp_vocab.json"]  # no temporary file left


def test_load_scan_file_written_by_hand(tmp_path):
    # SCAN writes idx2word with integer keys, which JSON turns into strings; key order may differ
    path = tmp_path / "v.json"
    words = ["<pad>", "<start>", "<end>", "<unk>", "man"]
    path.write_text(json.dumps({"idx": 5, "idx2word": {i: w for i, w in enumerate(words)},
                                "word2idx": {w: i for i, w in reversed(list(enumerate(words)))}}))
    assert Vocabulary.load(path).encode("Man") == [1, 4, 2]


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "vocab.json"
    Vocabulary.build(["old words"], min_count=1).save(path)
    before = path.read_text()

    def broken_fsync(fd):  # the new file is written, not yet renamed into place
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        Vocabulary.build(["new words"], min_count=1).save(path)
    assert path.read_text() == before
    assert os.listdir(tmp_path) == ["vocab.json"]


def good_dict():
    words = ["<pad>", "<start>", "<end>", "<unk>", "dog"]
    return {"word2idx": {w: i for i, w in enumerate(words)},
            "idx2word": {str(i): w for i, w in enumerate(words)}, "idx": 5}


def _bad(d, change):
    change(d)
    return d


@pytest.mark.parametrize(
    "content, problem",
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "top level must be a JSON object"),
        (_bad(good_dict(), lambda d: d.pop("idx2word")), r"missing key\(s\) \['idx2word'\]"),
        (_bad(good_dict(), lambda d: d.update(idx=6)), "sizes disagree"),
        (_bad(good_dict(), lambda d: d["idx2word"].update({"4": "cat"})), "inconsistent: word2idx\\['dog'\\] = 4"),
        (_bad(good_dict(), lambda d: d["word2idx"].update({"dog": 7})), "ids must be exactly 0..4"),
        (_bad(good_dict(), lambda d: d["idx2word"].update({"x": d["idx2word"].pop("4")})), "key 'x' is not an integer"),
        (
            {"word2idx": {"<start>": 0, "<pad>": 1, "<end>": 2, "<unk>": 3},
             "idx2word": {"0": "<start>", "1": "<pad>", "2": "<end>", "3": "<unk>"}, "idx": 4},
            "special token '<pad>' must have id 0",
        ),
        (
            {"word2idx": {"a": 0, "b": 1, "c": 2, "d": 3}, "idx2word": {"0": "a", "1": "b", "2": "c", "3": "d"},
             "idx": 4},
            "special token '<pad>'",
        ),
    ],
)
def test_load_errors_name_file_and_problem(tmp_path, content, problem):
    path = tmp_path / "bad_vocab.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(VocabularyError, match=problem) as e:
        Vocabulary.load(path)
    assert str(path) in str(e.value) and e.value.file == str(path)


def test_load_missing_file(tmp_path):
    path = tmp_path / "nope.json"
    with pytest.raises(VocabularyError, match="cannot read file") as e:
        Vocabulary.load(path)
    assert str(path) in str(e.value)
