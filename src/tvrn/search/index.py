"""A search index over one split: a trained model with the encodings of the split's images and captions.

    index = SearchIndex.build("runs/tvrn/best.pt", "data/synth", "test")   # encode once
    index.save("runs/tvrn/test.index")                                      # self-contained file (weights too)
    index = SearchIndex.load("runs/tvrn/test.index")
    hits = index.search_text("a black cat on a small ball", k=5)            # text -> gallery images
    hits = index.search_image(3, k=5)                                       # gallery image 3 -> captions

Queries are answered in two stages (`tvrn.search.shortlist`): the pair-independent shortlist vectors pick
`shortlist` candidates by cosine, the model's full score re-ranks them (through `tvrn.scoring.score_all`, the
one scorer). `shortlist=None` scores the whole gallery (exact). A hit's score never depends on the other
candidates (DESIGN 6), so a hit found in both modes has the same score in both.

Index file (torch.save of plain data, loadable with weights_only=True, written atomically):
    format "tvrn-index", version 1; model: {"config": {"model_name", "model"}, "model": state_dict, "vocab"};
    data_root, split, image_dir (or None); image_ids [str] (N_img); captions [str] (N_caps);
    caption_to_image (N_caps,) long; enc_images / enc_texts: {field: tensor} of the encoded dataclasses;
    image_vectors (N_img, D), text_vectors (N_caps, D): the shortlist vectors.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from ..data import collate_texts, load_split
from ..scoring import encode_texts, score_all
from ..train.checkpoint import atomic_save
from .shortlist import shortlist_embeddings

FORMAT, VERSION = "tvrn-index", 1
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class SearchIndexError(ValueError):
    """An index file that is not a tvrn index, or a query the index cannot answer."""


@dataclass(frozen=True)
class Hit:
    """One result. Text queries return images (index = image index, caption_index None); image queries return
    captions (index = caption index, image_index = the image the caption describes, text = the caption)."""

    rank: int
    index: int
    score: float  # the model's full score
    shortlist_score: float  # cosine of the shortlist vectors
    image_id: str  # the image of this hit (the caption's image for caption hits)
    text: Optional[str] = None
    image_index: Optional[int] = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _fields(enc) -> dict[str, torch.Tensor]:
    return {f.name: getattr(enc, f.name) for f in dataclasses.fields(enc)
            if isinstance(getattr(enc, f.name), torch.Tensor)}


class SearchIndex:
    """A model plus the encodings of one split's images (N_img) and captions (N_caps); see the module doc."""

    def __init__(self, model, tokenizer, checkpoint: dict, enc_images, enc_texts, image_ids: list[str],
                 captions: list[str], caption_to_image: torch.Tensor, data_root: str = "", split: str = "",
                 image_dir: Optional[str] = None):
        self.model, self.tokenizer, self.checkpoint = model.eval(), tokenizer, checkpoint
        self.enc_images, self.enc_texts = enc_images, enc_texts
        self.image_ids, self.captions = list(image_ids), list(captions)
        self.caption_to_image = torch.as_tensor(caption_to_image).long()
        self.data_root, self.split, self.image_dir = data_root, split, image_dir
        self.image_vectors, self.text_vectors = shortlist_embeddings(model, enc_images, enc_texts)  # (Ni, D), (Nt, D)

    @property
    def num_images(self) -> int:
        return len(self.image_ids)

    @property
    def num_captions(self) -> int:
        return len(self.captions)

    @property
    def model_name(self) -> str:
        return str(self.checkpoint["config"].get("model_name"))

    # ------------------------------------------------------------------ build / save / load
    @classmethod
    def build(cls, checkpoint_path: str | os.PathLike, data_root: str | os.PathLike, split: str = "test",
              image_dir: Optional[str | os.PathLike] = None, batch_size: int = 128, adjacency_threshold: float = 0.2,
              device=None, progress: bool = False) -> "SearchIndex":
        """Encode every image and caption of a precomp split with a trained checkpoint.

        image_dir: folder of <image id>.png / .jpg files for the web page; default data_root/images/<split> when
        it exists (the synthetic benchmark renders there)."""
        from ..pipeline import encode_split, load_trained
        from ..train.checkpoint import load_checkpoint

        model, tokenizer, _ = load_trained(checkpoint_path)
        ckpt = load_checkpoint(checkpoint_path)
        if device is not None:
            model.to(device)
        data = load_split(data_root, split)
        enc_i, enc_t = encode_split(model, data, tokenizer, {"eval_batch_size": batch_size,
                                                              "adjacency_threshold": adjacency_threshold},
                                    device=device, progress=progress)
        ids = list(data.ids) if data.ids is not None else [str(i) for i in range(data.num_images)]
        if image_dir is None and (Path(data_root) / "images" / split).is_dir():
            image_dir = Path(data_root) / "images" / split
        slim = {"config": {k: ckpt["config"].get(k) for k in ("model_name", "model")}, "model": ckpt["model"],
                "vocab": ckpt.get("vocab")}
        return cls(model, tokenizer, slim, enc_i.to("cpu"), enc_t.to("cpu"), ids, list(data.captions),
                   torch.as_tensor(data.caption_to_image), data_root=str(data_root), split=split,
                   image_dir=None if image_dir is None else str(Path(image_dir).resolve()))

    def save(self, path: str | os.PathLike) -> None:
        """Write the index (model weights included) atomically: a reader sees the old file or the new one."""
        atomic_save({"format": FORMAT, "version": VERSION, "model": self.checkpoint, "data_root": self.data_root,
                     "split": self.split, "image_dir": self.image_dir, "image_ids": self.image_ids,
                     "captions": self.captions, "caption_to_image": self.caption_to_image,
                     "enc_images": _fields(self.enc_images), "enc_texts": _fields(self.enc_texts)}, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SearchIndex":
        from ..models.base import EncodedImages, EncodedTexts
        from ..pipeline import model_from_checkpoint

        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as e:  # pickle / zip errors: not a torch file at all
            raise SearchIndexError(f"{path}: not a tvrn search index ({type(e).__name__}: {e})") from None
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise SearchIndexError(f"{path}: not a tvrn search index (no format {FORMAT!r}; a checkpoint is "
                                   f"turned into an index with `tvrn index CHECKPOINT --data DIR --out FILE`)")
        if obj.get("version") != VERSION:
            raise SearchIndexError(f"{path}: index version {obj.get('version')}, this tvrn reads version {VERSION}")
        model, tokenizer = model_from_checkpoint(obj["model"], source=str(path))
        return cls(model, tokenizer, obj["model"], EncodedImages(**obj["enc_images"]),
                   EncodedTexts(**obj["enc_texts"]), obj["image_ids"], obj["captions"], obj["caption_to_image"],
                   data_root=obj["data_root"], split=obj["split"], image_dir=obj["image_dir"])

    # ------------------------------------------------------------------ queries
    def encode_queries(self, queries: list[str]):
        """Captions -> EncodedTexts (len(queries)); raises SearchIndexError for a query without tokens."""
        tokens = []
        for q, text in enumerate(queries):
            ids = self.tokenizer.encode(text) if isinstance(text, str) and text.strip() else []
            if not ids:
                raise SearchIndexError(f"query {q} is empty: {text!r}")
            tokens.append(ids)
        return encode_texts(self.model, [collate_texts(tokens, self.tokenizer.pad_id)])

    def query_words(self, text: str) -> dict[str, list[str]]:
        """{"words": the query's words as the tokenizer splits them, "known": those with their own token,
        "unknown": the others (mapped to the unknown token, so they tell the model nothing)}."""
        split = getattr(self.tokenizer, "words", None)
        pairs = split(text) if callable(split) else [(w, True) for w in text.split()]
        return {"words": [w for w, _ in pairs], "known": [w for w, k in pairs if k],
                "unknown": [w for w, k in pairs if not k]}

    def _check_k(self, k: int, shortlist: Optional[int], n: int) -> tuple[int, int]:
        if k < 1:
            raise SearchIndexError(f"k must be at least 1, got {k}")
        if shortlist is not None and shortlist < 1:
            raise SearchIndexError(f"shortlist must be at least 1 (or None for exact search), got {shortlist}")
        m = n if shortlist is None else min(max(shortlist, k), n)  # candidates re-ranked
        return min(k, m), m

    def _rank(self, cand: torch.Tensor, full: torch.Tensor, short: torch.Tensor, k: int) -> list[tuple]:
        """cand (m,) gallery indices, full (m,) scores, short (m,) cosines -> k best (index, score, cosine)."""
        order = sorted(range(len(cand)), key=lambda j: (-float(full[j]), int(cand[j])))[:k]  # ties: lower index
        return [(int(cand[j]), float(full[j]), float(short[j])) for j in order]

    def search_text(self, query: str | list[str], k: int = 10, shortlist: Optional[int] = 100):
        """Captions -> images. query: one string (-> list of k Hits) or a list (-> one list per query).
        shortlist: candidates re-ranked with the full score (None: all images, exact)."""
        queries = [query] if isinstance(query, str) else list(query)
        k, m = self._check_k(k, shortlist, self.num_images)
        enc = self.encode_queries(queries)
        qv = self.model.shortlist_embed_text(enc).float()  # (Q, D)
        cos = qv @ self.image_vectors.t()  # (Q, N_img)
        cands = cos.topk(m, dim=1).indices if m < self.num_images else None  # (Q, m) as topk_exact would
        results = []
        for q in range(len(queries)):
            cand = torch.arange(self.num_images) if cands is None else cands[q]
            full = score_all(self.model, self.enc_images[cand], enc[q : q + 1])[:, 0]  # (m,)
            results.append([Hit(rank=r + 1, index=i, score=s, shortlist_score=c, image_id=self.image_ids[i])
                            for r, (i, s, c) in enumerate(self._rank(cand, full, cos[q, cand], k))])
        return results[0] if isinstance(query, str) else results

    def search_image(self, image: int, k: int = 10, shortlist: Optional[int] = 500) -> list[Hit]:
        """Gallery image -> captions of the index (k Hits). shortlist: captions re-ranked (None: all, exact)."""
        if not isinstance(image, int) or not 0 <= image < self.num_images:
            raise SearchIndexError(f"image index must be an integer in [0, {self.num_images}), got {image!r}")
        k, m = self._check_k(k, shortlist, self.num_captions)
        iv = self.image_vectors[image : image + 1]  # (1, D)
        cos = (iv @ self.text_vectors.t())[0]  # (N_caps,)
        cand = cos.topk(m).indices if m < self.num_captions else torch.arange(self.num_captions)  # (m,)
        full = score_all(self.model, self.enc_images[image : image + 1], self.enc_texts[cand])[0]  # (m,)
        hits = []
        for r, (c, s, sc) in enumerate(self._rank(cand, full, cos[cand], k)):
            img = int(self.caption_to_image[c])
            hits.append(Hit(rank=r + 1, index=c, score=s, shortlist_score=sc, image_id=self.image_ids[img],
                            text=self.captions[c], image_index=img))
        return hits

    # ------------------------------------------------------------------ for the web page
    def captions_of(self, image: int) -> list[str]:
        return [self.captions[c] for c in torch.nonzero(self.caption_to_image == image).reshape(-1).tolist()]

    def image_path(self, image: int) -> Optional[Path]:
        """The image file of gallery image `image` (image_dir/<id>.png|.jpg|.jpeg), or None."""
        if self.image_dir is None or not 0 <= image < self.num_images:
            return None
        for suffix in IMAGE_SUFFIXES:
            p = Path(self.image_dir) / f"{self.image_ids[image]}{suffix}"
            if p.is_file():
                return p
        return None

    def info(self) -> dict[str, Any]:
        return {"model": self.model_name, "data_root": self.data_root, "split": self.split,
                "images": self.num_images, "captions": self.num_captions, "has_image_files": self.image_dir is not None}


__all__ = ["Hit", "SearchIndex", "SearchIndexError"]
