"""Data layer: precomp reader, vocabulary and tokenizer, collate, synthetic benchmark."""
from .batch import ImageBatch, PairBatch, TextBatch
from .collate import (
    PairDataset,
    PairItem,
    collate_images,
    collate_pairs,
    collate_texts,
    iter_image_batches,
    iter_text_batches,
)
from .errors import (
    CaptionCountError,
    CaptionMapError,
    DegenerateBoxError,
    EmptyCaptionError,
    FeatureFileError,
    MissingFileError,
    NonFiniteFeatureError,
    TvrnDataError,
    VocabularyError,
)
from .geometry import DEFAULT_ADJACENCY_THRESHOLD, adjacency, check_boxes, iou_matrix
from .precomp import CAPTIONS_PER_IMAGE, COCO_DEV_CAPTIONS, SPLITS, PrecompSplit, load_split
from .vocab import SPECIAL_TOKENS, TokenizerLike, Vocabulary, tokenize, treebank_tokenize

__all__ = [
    "ImageBatch", "PairBatch", "TextBatch",
    "PairDataset", "PairItem", "collate_images", "collate_pairs", "collate_texts",
    "iter_image_batches", "iter_text_batches",
    "CaptionCountError", "CaptionMapError", "DegenerateBoxError", "EmptyCaptionError", "FeatureFileError", "MissingFileError",
    "NonFiniteFeatureError", "TvrnDataError", "VocabularyError",
    "DEFAULT_ADJACENCY_THRESHOLD", "adjacency", "check_boxes", "iou_matrix",
    "CAPTIONS_PER_IMAGE", "COCO_DEV_CAPTIONS", "SPLITS", "PrecompSplit", "load_split",
    "SPECIAL_TOKENS", "TokenizerLike", "Vocabulary", "tokenize", "treebank_tokenize",
]
