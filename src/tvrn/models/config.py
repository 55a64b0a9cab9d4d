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
    "agg": ("lse", "mean"),
    "pool": ("mean", "max"),
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
    bert_path: str = "bert-base-uncased"  # Hugging Face model name or local folder for text_encoder='bert'
    # attention
    lambda_softmax: float = 9.0      # inverse temperature of every attention softmax (SCAN's smooth)
    dropout: float = 0.4             # dropout inside the self-attention pooling (SGRAF's VisualSA / TextSA)
    # SCAN
    direction: str = "t2i"           # SCAN attention direction: words attend regions (t2i) or regions attend words
    agg: str = "lse"                 # SCAN aggregation of per-word / per-region cosines: LogSumExp or mean
    lambda_lse: float = 6.0          # SCAN LogSumExp temperature
    # VSE
    pool: str = "mean"               # VSE pooling of regions and words
    # SGRAF / TVRN
    reasoning: str = "sgr"           # similarity reasoning: graph reasoning (SGR) or attention filtration (SAF)
    sgr_steps: int = 3               # SGR message-passing steps
    global_node: bool = True         # use the global similarity node (image g vs caption t_glo)
    # TVRN modules (all False: exactly SGRAF)
    relational_context: bool = True  # C_rel = Attn(V, V) in the context IRs
    spatial_context: bool = True     # IoU-masked attention in the context IRs (needs images.adjacency)
    unify: bool = True               # module 1: unified IRs U from a GRU over [V; M]; off: U = V
    refine_text: bool = True         # module 2: per-pair expanded + refined TRs; off: T_ref = T
    global_gates: bool = True        # module 3: word-to-region attention re-weighted by gate_r from g
    gate_lambda: Optional[float] = None  # module 3's lambda in gate_r = softmax_r(lambda <U_r, g>); None: lambda_softmax

    def __post_init__(self):
        for key, allowed in _CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"model config {key}={getattr(self, key)!r}: choose one of {', '.join(allowed)}")
        if self.embed_size <= 0 or self.sim_dim <= 0 or self.img_dim <= 0:
            raise ValueError("model config sizes img_dim, embed_size, sim_dim must be positive")

    @property
    def needs_context(self) -> bool:
        """Context IRs C are only used by module 1 (M = V * C) and module 2 (E attends C)."""
        return self.unify or self.refine_text
