"""tvrn: image-text retrieval with TVRN and its baselines.

    import tvrn
    scores = tvrn.load("models/tvrn-synth").similarity(images, ["a red cat on a mat"])  # (n_images, n_texts)
    model, tokenizer = tvrn.load_model("models/tvrn-synth")  # a folder, a checkpoint or "hf-hub:ORG/NAME"

`load`, `load_model` and `export_model` live in `tvrn.export` (docs/export.md), imported on first use.
"""
__version__ = "0.1.0"

_LAZY = {"load": "export", "load_model": "export", "export_model": "export"}
__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
