"""The error of tvrn.search, below every module that raises it: the index, its on-disk forms, FAISS, and image
file queries (`tvrn.search.image_query`) import it from here, so none of them needs another to raise it."""
from __future__ import annotations


class SearchIndexError(ValueError):
    """An index file that is not a tvrn index, or a query the index cannot answer."""


__all__ = ["SearchIndexError"]
