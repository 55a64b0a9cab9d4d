"""A model's tokenizer from its config and, for GRU text encoders, its vocabulary."""
from __future__ import annotations


def build_tokenizer(model_config, vocab):
    """The model's tokenizer: the SCAN vocabulary (a tvrn.data.Vocabulary) for GRU encoders, the word-piece
    tokenizer for BERT."""
    if model_config.text_encoder == "bert":
        from ..models import BertTokenizer

        return BertTokenizer(model_config.bert_path)
    if vocab is None:
        raise ValueError("a GRU text encoder needs a vocabulary (data.vocab or ROOT/vocab.json)")
    return vocab
