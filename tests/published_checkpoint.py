"""The TVRN authors' checkpoint at tiny sizes: built by tests/official_tvrn.py with their tensor names and shapes,
and the vocabulary it was made for. Shared by tests/test_published_convert.py and tests/test_export.py."""
from __future__ import annotations

import official_tvrn as ref
from tvrn.data import Vocabulary
from tvrn.data.vocab import SPECIAL_TOKENS

DV, WD, D, S, R, V = 10, 7, 12, 6, 4, 20  # region features, words, embed, sim, regions, vocabulary
WORDS = [f"w{i}" for i in range(V - len(SPECIAL_TOKENS))]


def vocab() -> Vocabulary:
    return Vocabulary(list(SPECIAL_TOKENS) + WORDS)


def checkpoint(module="SGR", seed=0):
    return ref.make_official_checkpoint(module=module, img_dim=DV, word_dim=WD, embed=D, sim_dim=S, regions=R,
                                        vocab_size=V, seed=seed)
