"""tvrn: image-text retrieval with TVRN and its baselines.

    import tvrn
    scores = tvrn.load("models/tvrn-synth").similarity(images, ["a red cat on a mat"])  # (n_images, n_texts)
    model, tokenizer = tvrn.load_model("models/tvrn-synth")  # a folder, a checkpoint or "hf-hub:ORG/NAME"
    model = tvrn.create_model("tvrn_sgr", embed_size=256); tvrn.list_models()
    S = tvrn.score_all(model, tvrn.encode_images(model, image_batches), tvrn.encode_texts(model, text_batches))

The names the README's Python API uses, imported on first use (`import tvrn` stays light): `load` (tvrn.api),
`load_model` (tvrn.checkpoint), `export_model` (tvrn.export), `create_model`, `list_models` (tvrn.models),
`encode_images`, `encode_texts`, `score_all` (tvrn.scoring), `evaluate` (tvrn.evaluation). The layers beneath
are described in docs/architecture.md.
"""
__version__ = "0.1.0"

_LAZY = {"load": "api", "load_model": "checkpoint", "export_model": "export", "create_model": "models",
         "list_models": "models", "encode_images": "scoring", "encode_texts": "scoring", "score_all": "scoring",
         "evaluate": "evaluation"}
__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
