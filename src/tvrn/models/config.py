"""One model config for every registered model: sizes, switches, hyper-parameters.

Defaults are the paper's shapes (TVRN / SGRAF / SCAN on Flickr30K with a GRU text encoder). A registered builder
(`tvrn.models.create_model(name, **overrides)`) sets the family defaults, then applies the overrides. Fields a
family does not use are kept (and ignored) so that every model's config has the same keys.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

_CHOICES = {
    "text_encoder": ("gru", "bert"),
    "reasoning": ("sgr", "saf"),
    "direction": ("t2i", "i2t"),
    "agg": ("lse", "mean", "max", "sum"),
    "pool": ("mean", "max", "gpo"),
    "attention_norm": ("clipped_l2norm", "l2norm", "softmax", "l1norm", "clipped_l1norm", "clipped", "no_norm"),
    "image_pool_norm": ("layer", "batch"),
    "spatial_score": ("cosine", "published"),
    "spatial_adjacency": ("mask", "multiply"),
    "refine_against": ("pair", "first_image"),
}


@dataclass
class ModelConfig:
    name: str = "tvrn_sgr"           # registered builder that made this model; create_model(name, **config) rebuilds it
    # sizes
    img_dim: int = 2048              # Dv, bottom-up region feature size
    embed_size: int = 1024           # D, joint embedding size
    sim_dim: int = 256               # S, similarity vector size (SGRAF / TVRN nodes)
    # text encoder
    text_encoder: str = "gru"        # 'gru' (bi-GRU over a vocabulary) or 'bert' (any Hugging Face encoder)
    vocab_size: int = 8481           # GRU vocabulary size (SCAN's Flickr30K vocabulary); set to len(vocab)
    word_dim: int = 300              # GRU word embedding size (50 to initialise from GloVe 6B 50d)
    text_layers: int = 1             # GRU layers
    text_bidirectional: bool = True  # bidirectional GRU, directions averaged (SCAN's --bi_gru; off: one direction)
    word_dropout: float = 0.0        # dropout on the GRU's word embeddings in training (SGRAF: 0.4)
    image_norm: bool = True          # l2-normalise region embeddings (SCAN / SGRAF / VSE-infinity --no_imgnorm: off)
    text_norm: bool = True           # l2-normalise word embeddings (--no_txtnorm: off)
    bert_path: str = "bert-base-uncased"  # Hugging Face model name or local folder for text_encoder='bert'
    # attention
    lambda_softmax: float = 9.0      # inverse temperature of every attention softmax (SCAN's smooth)
    dropout: float = 0.4             # dropout inside the self-attention pooling (SGRAF's VisualSA / TextSA)
    # SCAN
    direction: str = "t2i"           # SCAN attention direction: words attend regions (t2i) or regions attend words
    agg: str = "lse"                 # SCAN aggregation of per-word / per-region cosines: LogSumExp, mean, max, sum
    lambda_lse: float = 6.0          # SCAN LogSumExp temperature
    attention_norm: str = "clipped_l2norm"  # SCAN's raw_feature_norm: how raw scores are normalised across the
                                     # queries before the softmax (clipped_l2norm: LeakyReLU 0.1 then l2, SCAN's best)
    # VSE
    pool: str = "mean"               # VSE pooling of regions and words (gpo: VSE-infinity's generalized pooling)
    gpo_dim: int = 32                # GPO: positional-encoding size and its GRU's hidden size
    # SGRAF / TVRN
    reasoning: str = "sgr"           # similarity reasoning: graph reasoning (SGR) or attention filtration (SAF)
    sgr_steps: int = 3               # SGR message-passing steps
    global_node: bool = True         # use the global similarity node (image g vs caption t_glo)
    image_pool_norm: str = "layer"   # norm in the image self-attention pooling: LayerNorm over D (any token count),
                                     # or SGRAF's BatchNorm (per token slot and on the guide vector; needs exactly
                                     # image_pool_tokens tokens; in training it normalises over the batch's images)
    image_pool_tokens: int = 36      # token slots of the BatchNorm pooling (SGRAF: 36 regions)
    # TVRN modules (all False: exactly SGRAF)
    relational_context: bool = True  # C_rel = Attn(V, V) in the context IRs
    spatial_context: bool = True     # IoU-masked attention in the context IRs (needs images.adjacency)
    unify: bool = True               # module 1: unified IRs U from a GRU over [V; M]; off: U = V
    refine_text: bool = True         # module 2: per-pair expanded + refined TRs; off: T_ref = T
    global_gates: bool = True        # module 3: word-to-region attention re-weighted by gate_r from g
    gate_lambda: Optional[float] = None  # module 3's lambda in gate_r = softmax_r(lambda <U_r, g>); None: lambda_softmax
    # TVRN as the authors' released code computes it (docs/published-tvrn.md); the defaults are the designed model.
    # The published model is these four switches plus global_gates=False (its gates are all ones):
    spatial_score: str = "cosine"    # spatial relation score of regions i (source) and j (query): "cosine" of the
                                     # projections; "published": <k_i, q_j> / (|q_j| |k_j|) (the key norm taken at j)
    spatial_adjacency: str = "mask"  # "mask": regions that do not overlap (IoU < threshold) get no spatial weight;
                                     # "multiply": their score is multiplied by 0 and they keep softmax weight exp(0)
    shared_attention: bool = False   # one projection pair (tied in training) for the relational context, the
                                     # caption self-context and module 2's expansion (state dict names stay separate)
    refine_against: str = "pair"     # module 2 refines a caption against "pair": the image it is scored with (the
                                     # design); "first_image": the first image of its block (the training batch;
                                     # in score_all, image chunks of refine_group). Exact reproduction ONLY: a pair's
                                     # score then depends on which images share its block and on their order
    refine_group: int = 100          # images per block under refine_against="first_image" (the authors' evaluation
                                     # shards of 100 images)

    def __post_init__(self):
        for key, allowed in _CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"model config {key}={getattr(self, key)!r}: choose one of {', '.join(allowed)}")
        if self.embed_size <= 0 or self.sim_dim <= 0 or self.img_dim <= 0:
            raise ValueError("model config sizes img_dim, embed_size, sim_dim must be positive")
        if self.refine_group < 1:
            raise ValueError(f"model config refine_group={self.refine_group}: must be at least 1")

    @property
    def needs_context(self) -> bool:
        """Context IRs C are only used by module 1 (M = V * C) and module 2 (E attends C)."""
        return self.unify or self.refine_text
