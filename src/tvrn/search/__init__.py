"""Two-stage search: a pair-independent shortlist (exact top-k by matrix product, or FAISS when installed),
re-ranked with the model's full score.

    from tvrn.search import two_stage_scores, evaluate_two_stage
"""
from .shortlist import evaluate_two_stage, shortlist_embeddings, topk_exact, topk_indices, two_stage_scores

__all__ = ["evaluate_two_stage", "shortlist_embeddings", "topk_exact", "topk_indices", "two_stage_scores"]
