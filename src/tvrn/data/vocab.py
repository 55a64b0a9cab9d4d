"""Word vocabulary and offline tokenisation, compatible with SCAN's vocabulary JSON.

Tokenisation: lower-case, then `treebank_tokenize`, a port of the regular-expression rules of NLTK's
`TreebankWordTokenizer` (the tokenizer SCAN's `word_tokenize` uses for a single sentence). It needs no
download and no NLTK; on one-sentence captions it gives NLTK's tokens:
"a man's dog, running." -> ["a", "man", "'s", "dog", ",", "running", "."]. What it leaves out from NLTK:
the optional conversion of brackets to -LRB- style symbols (off by default in NLTK too) and the two rare
"whaddya"/"whatcha" splits that NLTK itself does not apply.

Any object with `encode(str) -> list[int]` and an int `pad_id` can tokenize for the collate functions
(`TokenizerLike`); `Vocabulary` is one, a BERT tokenizer adapter is another.
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from typing import Iterable, Protocol, Sequence, runtime_checkable

from .errors import VocabularyError

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIAL_TOKENS = (PAD, START, END, UNK)  # ids 0, 1, 2, 3, as in SCAN


@runtime_checkable
class TokenizerLike(Protocol):
    """What collate needs from a tokenizer: caption -> token ids (special tokens included), and a pad id."""

    pad_id: int

    def encode(self, caption: str) -> list[int]: ...


# --- Treebank rules (NLTK's TreebankWordTokenizer, applied in the same order) ---

_STARTING_QUOTES = [
    (re.compile(r"^\""), r"``"),
    (re.compile(r"(``)"), r" \1 "),
    (re.compile(r"([ \(\[{<])(\"|\'{2})"), r"\1 `` "),
]
_PUNCTUATION = [
    (re.compile(r"([:,])([^\d])"), r" \1 \2"),
    (re.compile(r"([:,])$"), r" \1 "),
    (re.compile(r"\.\.\."), r" ... "),
    (re.compile(r"[;@#$%&]"), r" \g<0> "),
    (re.compile(r'([^\.])(\.)([\]\)}>"\']*)\s*$'), r"\1 \2\3 "),  # final period only
    (re.compile(r"[?!]"), r" \g<0> "),
    (re.compile(r"([^'])' "), r"\1 ' "),
]
_PARENS_BRACKETS = (re.compile(r"[\]\[\(\)\{\}\<\>]"), r" \g<0> ")
_DOUBLE_DASHES = (re.compile(r"--"), r" -- ")
_ENDING_QUOTES = [
    (re.compile(r"''"), " '' "),
    (re.compile(r'"'), " '' "),
    (re.compile(r"([^' ])('[sS]|'[mM]|'[dD]|') "), r"\1 \2 "),
    (re.compile(r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) "), r"\1 \2 "),
]
_CONTRACTIONS = [
    re.compile(p, re.IGNORECASE)
    for p in [
        r"\b(can)(not)\b", r"\b(d)('ye)\b", r"\b(gim)(me)\b", r"\b(gon)(na)\b", r"\b(got)(ta)\b",
        r"\b(lem)(me)\b", r"\b(more)('n)\b", r"\b(wan)(na)(?=\s)", r" ('t)(is)\b", r" ('t)(was)\b",
    ]
]


def treebank_tokenize(text: str) -> list[str]:
    """Split one sentence into Penn Treebank tokens (NLTK's TreebankWordTokenizer rules). Keeps case."""
    for regexp, sub in _STARTING_QUOTES:
        text = regexp.sub(sub, text)
    for regexp, sub in _PUNCTUATION:
        text = regexp.sub(sub, text)
    text = _PARENS_BRACKETS[0].sub(_PARENS_BRACKETS[1], text)
    text = _DOUBLE_DASHES[0].sub(_DOUBLE_DASHES[1], text)
    text = " " + text + " "
    for regexp, sub in _ENDING_QUOTES:
        text = regexp.sub(sub, text)
    for regexp in _CONTRACTIONS:
        text = regexp.sub(r" \1 \2 ", text)
    return text.split()


def tokenize(caption: str) -> list[str]:
    """Caption -> word tokens, as SCAN: lower-case, then Treebank rules."""
    return treebank_tokenize(caption.lower())


class Vocabulary:
    """Word <-> id map with SCAN's special tokens <pad>=0, <start>=1, <end>=2, <unk>=3.

    `encode(caption)` gives [<start>] + word ids + [<end>] (unknown words -> <unk>), SCAN's convention.
    """

    def __init__(self, words: Sequence[str]):
        """words: every word in id order; the first four must be SCAN's special tokens."""
        words = list(words)
        if tuple(words[:4]) != SPECIAL_TOKENS:
            raise ValueError(f"the first four words must be {SPECIAL_TOKENS}, got {words[:4]}")
        if len(set(words)) != len(words):
            raise ValueError("duplicate words in vocabulary")
        self.idx2word: list[str] = words
        self.word2idx: dict[str, int] = {w: i for i, w in enumerate(words)}

    # --- building ---

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 4) -> "Vocabulary":
        """Vocabulary of the words seen at least `min_count` times (SCAN's threshold is 4), in order of first
        appearance after the special tokens."""
        counts = Counter(w for c in captions for w in tokenize(c))
        words = [w for w, n in counts.items() if n >= min_count and w not in SPECIAL_TOKENS]
        return cls(list(SPECIAL_TOKENS) + words)

    # --- ids ---

    def __len__(self) -> int:
        return len(self.idx2word)

    def __contains__(self, word: str) -> bool:
        return word in self.word2idx

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def start_id(self) -> int:
        return 1

    @property
    def end_id(self) -> int:
        return 2

    @property
    def unk_id(self) -> int:
        return 3

    def encode(self, caption: str) -> list[int]:
        """Caption -> [<start>, word ids..., <end>] (length L = words + 2)."""
        unk = self.unk_id
        return [self.start_id] + [self.word2idx.get(w, unk) for w in tokenize(caption)] + [self.end_id]

    def words(self, caption: str) -> list[tuple[str, bool]]:
        """Caption -> [(word, known)] in order: the tokens `encode` maps, and whether each has its own id."""
        return [(w, w in self.word2idx) for w in tokenize(caption)]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Token ids -> words joined by spaces; drops <pad>, <start>, <end> unless skip_special is False."""
        skip = {self.pad_id, self.start_id, self.end_id} if skip_special else set()
        return " ".join(self.idx2word[int(i)] for i in ids if int(i) not in skip)

    # --- SCAN JSON: {"word2idx": {w: i}, "idx2word": {"i": w}, "idx": N} ---

    def to_json_dict(self) -> dict:
        return {
            "word2idx": dict(self.word2idx),
            "idx2word": {str(i): w for i, w in enumerate(self.idx2word)},
            "idx": len(self.idx2word),
        }

    def save(self, path: "str | os.PathLike[str]") -> None:
        """Write SCAN's vocabulary JSON atomically (`tvrn.fileio.write_json`)."""
        from ..fileio import write_json

        write_json(path, self.to_json_dict(), indent=None, ensure_ascii=False)

    @classmethod
    def load(cls, path: "str | os.PathLike[str]") -> "Vocabulary":
        """Read SCAN's vocabulary JSON. Raises `VocabularyError` naming the file and the problem."""
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise VocabularyError(path, f"cannot read file ({e.__class__.__name__}: {e})") from e
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise VocabularyError(path, f"invalid JSON ({e})") from e
        return cls._from_json_dict(data, path)

    @classmethod
    def from_json_dict(cls, data: dict, source: str = "<dict>") -> "Vocabulary":
        """A vocabulary from SCAN's JSON structure already in memory (e.g. saved in a checkpoint)."""
        return cls._from_json_dict(data, source)

    @classmethod
    def _from_json_dict(cls, data, path: str) -> "Vocabulary":
        def fail(problem: str):
            raise VocabularyError(path, problem)

        if not isinstance(data, dict):
            fail(f"top level must be a JSON object, got {type(data).__name__}")
        missing = [k for k in ("word2idx", "idx2word", "idx") if k not in data]
        if missing:
            fail(f"missing key(s) {missing}; expected 'word2idx', 'idx2word' and 'idx'")
        w2i, i2w, n = data["word2idx"], data["idx2word"], data["idx"]
        if not isinstance(w2i, dict) or not isinstance(i2w, dict):
            fail("'word2idx' and 'idx2word' must be JSON objects")
        if not isinstance(n, int) or isinstance(n, bool):
            fail(f"'idx' must be an integer, got {n!r}")
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in w2i.values()):
            fail("'word2idx' values must be integers")
        if len(w2i) != n or len(i2w) != n:
            fail(f"sizes disagree: 'idx' = {n}, {len(w2i)} entries in 'word2idx', {len(i2w)} in 'idx2word'")
        if sorted(w2i.values()) != list(range(n)):
            fail(f"'word2idx' ids must be exactly 0..{n - 1}")
        words = [None] * n
        for k, w in i2w.items():
            try:
                i = int(k)
            except ValueError:
                fail(f"'idx2word' key {k!r} is not an integer")
            if not 0 <= i < n or words[i] is not None:
                fail(f"'idx2word' key {k!r} is out of range 0..{n - 1} or repeated")
            words[i] = w
        for w, i in w2i.items():
            if words[i] != w:
                fail(f"inconsistent: word2idx[{w!r}] = {i} but idx2word[{str(i)!r}] = {words[i]!r}")
        for i, tok in enumerate(SPECIAL_TOKENS):
            if w2i.get(tok) != i:
                fail(f"special token {tok!r} must have id {i}, found {w2i.get(tok)!r}")
        return cls(words)
