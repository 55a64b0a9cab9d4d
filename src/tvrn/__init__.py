"""tvrn: image-text retrieval with TVRN and its baselines."""
__version__ = "0.1.0"
