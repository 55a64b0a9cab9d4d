"""Search: two-stage scoring (a pair-independent shortlist, exact top-k by matrix product or FAISS when
installed, re-ranked with the model's full score), a search index over a split, and an HTTP server.

    from tvrn.search import SearchIndex, two_stage_scores, evaluate_two_stage
"""
from .errors import SearchIndexError
from .index import Hit, SearchIndex
from .shortlist import evaluate_two_stage, shortlist_embeddings, topk_exact, topk_indices, two_stage_scores

__all__ = ["Hit", "SearchIndex", "SearchIndexError", "evaluate_two_stage", "shortlist_embeddings", "topk_exact",
           "topk_indices", "two_stage_scores"]
