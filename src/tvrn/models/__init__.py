"""Models: TVRN and its baselines (SCAN, SGRAF, VSE) behind one interface.

    model = create_model("tvrn_sgr", embed_size=1024)
    scores = model.score(model.encode_image(images), model.encode_text(texts))  # (Ni, Nt)
    ex = explain(model, images[0], texts[0])  # why that pair scores what it does (tvrn.models.explain)
"""
from .base import EncodedImages, EncodedTexts, RetrievalModel
from .config import ModelConfig
from .explain import Explanation, PairExplanations, explain, explain_encoded, explain_pairs
from .registry import create_model, list_models, register_model
from .scan import SCAN
from .text import BertTextEncoder, BertTokenizer, GRUTextEncoder, glove_vectors
from .tvrn import TVRN
from .vse import VSE
from . import presets  # noqa: F401  (registers the models)

__all__ = ["EncodedImages", "EncodedTexts", "RetrievalModel", "ModelConfig", "create_model", "list_models",
           "Explanation", "PairExplanations", "explain", "explain_encoded", "explain_pairs",
           "register_model", "SCAN", "TVRN", "VSE", "BertTextEncoder", "BertTokenizer", "GRUTextEncoder",
           "glove_vectors"]
