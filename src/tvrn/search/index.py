"""A search index over one split: a trained model with the encodings of the split's images and captions.

    index = SearchIndex.build("runs/tvrn/best.pt", "data/synth", "test")   # encode once
    index.save("runs/tvrn/test.index")                                      # self-contained file (weights too)
    index = SearchIndex.load("runs/tvrn/test.index")
    hits = index.search_text("a black cat on a small ball", k=5)            # text -> gallery images
    hits = index.search_image(3, k=5)                                       # gallery image 3 -> captions

Queries are answered in two stages (`tvrn.search.shortlist`): the pair-independent shortlist vectors pick
`shortlist` candidates by cosine (`tvrn.search.vectors`: exact, or a FAISS index), the model's full score
re-ranks them (through `tvrn.scoring.score_all`, the one scorer). `shortlist=None` scores the whole gallery
(exact). A hit's score never depends on the other candidates (docs/scoring.md), so a hit found in both modes has the
same score in both.

This module holds the index and its queries; the rest of it sits beside it, below it:
- `tvrn.search.build`: encoding a split with a trained model (`build`, `build_to`) and its checks;
- `tvrn.search.formats`: the on-disk forms (a folder, version 3 or 2; a single file, version 1), all opened by
  `SearchIndex.load(path)`, with their sha256 checks and atomic writes;
- `tvrn.search.vectors`: the shortlist vectors and their FAISS indexes (`check_faiss`: a factory string is
  checked before anything is encoded);
- `tvrn.search.store`: encodings on disk, read by row;
- `tvrn.search.image_query`: image files as queries (`search_image_file`);
- `tvrn.search.errors`: SearchIndexError.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..data import collate_texts, load_split
from ..scoring import encode_texts, score_all
from ..fileio import stale_temporaries  # noqa: F401  (exported from here)
from .build import build_folder, build_in_memory, check_model_recipe
from .errors import SearchIndexError
from .formats import captions_by_image, load_file, load_folder, write_file, write_folder
from .shortlist import shortlist_embeddings
from ..fileio import NpyRows, StringRows
from .store import FieldStore
from .vectors import FaissSpecError, _Vectors, check_faiss  # noqa: F401  (FaissSpecError, check_faiss: exported)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".PNG", ".JPG", ".JPEG", ".WEBP")
EXACT_CHUNK = 4096  # images / captions scored at a time by an exact (shortlist=None) query


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


class _Rows:
    """Encoded items in RAM (an encoded dataclass) or on disk (a FieldStore), read by row index."""

    def __init__(self, enc):
        self.enc = enc

    def __len__(self) -> int:
        return len(self.enc)

    @property
    def on_disk(self) -> bool:
        return isinstance(self.enc, FieldStore)

    def get(self, idx: torch.Tensor):
        return self.enc.get(idx) if self.on_disk else self.enc[idx]

    def chunks(self, size: int = EXACT_CHUNK):
        """(start, encodings of rows start..) over the whole set, `size` rows at a time."""
        for start in range(0, len(self), size):
            stop = min(start + size, len(self))
            yield start, (self.enc.slice(start, stop) if self.on_disk else self.enc[start:stop])


class SearchIndex:
    """A model plus the encodings of one split's images (N_img) and captions (N_caps); see the module doc."""

    def __init__(self, model, tokenizer, checkpoint: dict, enc_images, enc_texts, image_ids: list[str],
                 captions: list[str], caption_to_image: torch.Tensor, data_root: str = "", split: str = "",
                 image_dir: Optional[str] = None, vectors: Optional[tuple] = None, extract: Optional[dict] = None,
                 image_captions: Optional[tuple] = None):
        """enc_images / enc_texts: encoded dataclasses (in RAM) or FieldStores (on disk); vectors: (image, text)
        _Vectors when they are stored, else computed from the encodings; extract: how the gallery's features
        were made (`tvrn.search.image_query.extract_record`), None when not by `tvrn extract`."""
        self.model, self.tokenizer, self.checkpoint = model.eval(), tokenizer, checkpoint
        self.images, self.texts = _Rows(enc_images), _Rows(enc_texts)
        # a version-3 folder passes ids, captions and their tables as readers of its files; else lists in RAM
        self.image_ids = image_ids if isinstance(image_ids, StringRows) else list(image_ids)
        self.captions = captions if isinstance(captions, StringRows) else list(captions)
        self.caption_to_image = caption_to_image if isinstance(caption_to_image, NpyRows) else \
            torch.as_tensor(caption_to_image).long()
        # (captions grouped by image (Nc,), their (Ni + 1,) offsets): read from the folder, or derived here
        self._image_captions = image_captions or captions_by_image(self.caption_to_image, len(self.image_ids))
        self.data_root, self.split, self.image_dir = data_root, split, image_dir
        self.extract = extract
        self.source: Optional[dict] = None  # {"path", "nprobe"} when opened by `load`: how a worker reopens it
        if vectors is None:
            iv, tv = shortlist_embeddings(model, enc_images, enc_texts)  # (Ni, D), (Nt, D)
            vectors = (_Vectors(iv), _Vectors(tv))
        self.image_vec, self.text_vec = vectors

    @property
    def enc_images(self):
        """The image encodings (in RAM, or the FieldStore of an index opened from a folder)."""
        return self.images.enc

    @property
    def enc_texts(self):
        return self.texts.enc

    @property
    def image_vectors(self) -> torch.Tensor:
        """(N_img, D) shortlist vectors, as a tensor (reads them all: small galleries and tests)."""
        return torch.as_tensor(np.asarray(self.image_vec.vectors, dtype=np.float32))

    @property
    def text_vectors(self) -> torch.Tensor:
        return torch.as_tensor(np.asarray(self.text_vec.vectors, dtype=np.float32))

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
        """Encode every image and caption of a precomp split with a trained checkpoint, in RAM (small
        galleries; `build_to` writes a large one to disk batch by batch).

        image_dir: folder of <image id>.png / .jpg files for the web page; default data_root/images/<split> when
        it exists (the synthetic benchmark renders there)."""
        return build_in_memory(cls, checkpoint_path, data_root, split, image_dir=image_dir, batch_size=batch_size,
                               adjacency_threshold=adjacency_threshold, device=device, progress=progress)

    @classmethod
    def build_to(cls, out: str | os.PathLike, checkpoint_path: str | os.PathLike, data_root: str | os.PathLike,
                 split: str = "test", image_dir=None, batch_size: int = 128, adjacency_threshold: float = 0.2,
                 dtype: str = "float32", faiss: Optional[str] = None, device=None, progress: bool = False,
                 on_batch=None) -> "SearchIndex":
        """Encode a split straight into an index folder at `out`, one batch at a time (memory flat in the
        gallery size), then open it. dtype: how encodings are stored (float32 / float16 / bfloat16);
        faiss: a FAISS factory string for the shortlist indexes ("Flat", "IVF1024,Flat", "HNSW32", ...)."""
        build_folder(out, checkpoint_path, data_root, split, image_dir=image_dir, batch_size=batch_size,
                     adjacency_threshold=adjacency_threshold, dtype=dtype, faiss=faiss, device=device,
                     progress=progress, on_batch=on_batch)
        return cls.load(out)

    def save(self, path: str | os.PathLike, dtype: str = "float32", faiss: Optional[str] = None) -> None:
        """Write the index as a folder (`tvrn.search.formats`), atomically: built beside `path`, renamed into
        place."""
        write_folder(self, path, dtype, faiss)

    def save_file(self, path: str | os.PathLike) -> None:
        """The single-file form (version 1): everything in one torch.save, loaded whole (small galleries)."""
        write_file(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike, verify: bool = True, nprobe: Optional[int] = None) -> "SearchIndex":
        """Open an index folder (checking every file's sha256 unless verify=False) or a version-1 file.
        nprobe: FAISS search breadth of an IVF / HNSW shortlist (more: slower, closer to exact)."""
        index = load_folder(cls, Path(path), verify, nprobe) if Path(path).is_dir() else load_file(cls, path)
        index.source = {"path": str(Path(path).resolve()), "nprobe": nprobe}
        return index

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
        results = []
        if m < self.num_images:
            cands, _ = self.image_vec.top(qv, m)  # (Q, m)
        for q in range(len(queries)):
            if m < self.num_images:
                cand = cands[q][cands[q] >= 0]  # FAISS pads with -1 when it finds fewer
                full = score_all(self.model, self.images.get(cand), enc[q : q + 1])[:, 0]  # (m,)
            else:  # exact: every image, a chunk at a time
                cand = torch.arange(self.num_images)
                full = torch.cat([score_all(self.model, rows, enc[q : q + 1])[:, 0] for _, rows in self.images.chunks()])
            cos = self.image_vec.cosines(qv[q : q + 1], cand)[0]  # (m,)
            results.append([Hit(rank=r + 1, index=i, score=s, shortlist_score=c, image_id=self.image_ids[i])
                            for r, (i, s, c) in enumerate(self._rank(cand, full, cos, k))])
        return results[0] if isinstance(query, str) else results

    def search_image(self, image: int, k: int = 10, shortlist: Optional[int] = 500) -> list[Hit]:
        """Gallery image -> captions of the index (k Hits). shortlist: captions re-ranked (None: all, exact)."""
        if not isinstance(image, int) or not 0 <= image < self.num_images:
            raise SearchIndexError(f"image index must be an integer in [0, {self.num_images}), got {image!r}")
        return self._rank_captions(self.images.get(torch.tensor([image])), self.image_vec.row(image), k, shortlist)

    def search_image_file(self, file, k: int = 10, shortlist: Optional[int] = 500) -> list[Hit]:
        """An image file (path, bytes or file object) -> captions of the index (k Hits): its region features
        made with the gallery's recorded extraction recipe (`tvrn.search.image_query`), then ranked as a gallery
        image. Raises SearchIndexError when the gallery or the model's features were not made that way."""
        from .image_query import encode_image_file

        img = encode_image_file(self, file)
        return self._rank_captions(img, self.model.shortlist_embed_image(img).float(), k, shortlist)

    def _rank_captions(self, img, iv: torch.Tensor, k: int, shortlist: Optional[int]) -> list[Hit]:
        """One encoded image, its shortlist vector iv (1, D) -> k caption Hits."""
        k, m = self._check_k(k, shortlist, self.num_captions)
        if m < self.num_captions:
            cand = self.text_vec.top(iv, m)[0][0]
            cand = cand[cand >= 0]
            full = score_all(self.model, img, self.texts.get(cand))[0]  # (m,)
        else:
            cand = torch.arange(self.num_captions)
            full = torch.cat([score_all(self.model, img, rows)[0] for _, rows in self.texts.chunks()])
        cos = self.text_vec.cosines(iv, cand)[0]
        hits = []
        for r, (c, s, sc) in enumerate(self._rank(cand, full, cos, k)):
            img_c = int(self.caption_to_image[c])
            hits.append(Hit(rank=r + 1, index=c, score=s, shortlist_score=sc, image_id=self.image_ids[img_c],
                            text=self.captions[c], image_index=img_c))
        return hits

    def explain(self, caption: str, image: int):
        """Why gallery image `image` scores what it does for `caption` -> `tvrn.models.explain.Explanation`: the
        caption's tokens (`words`: their strings) and the image's regions (`boxes` from the split's
        SPLIT_ims_bbx.npy when the index's data folder is readable, else None), each word's attention over the
        regions, module-3 gates, per-word contributions, and the pair's score, which is the search hit's score
        (the pair part runs on the index's stored encodings, as search does). The image-side context weights
        (TVRN's relational / spatial, `context`) are not stored in an index: they are computed again from the
        split's features when those are readable and encode to the stored regions, else left out.
        Raises SearchIndexError for an empty caption or an image outside the gallery."""
        from ..models.explain import explain_encoded

        if isinstance(image, bool) or not isinstance(image, int) or not 0 <= image < self.num_images:
            raise SearchIndexError(f"image index must be an integer in [0, {self.num_images}), got {image!r}")
        enc_t = self.encode_queries([caption])  # (1, L); refuses a caption without tokens
        ids = self.tokenizer.encode(caption)
        enc_i = self.images.get(torch.tensor([image]))
        boxes, record = self._explain_image_side(image, enc_i)
        ex = explain_encoded(self.model, enc_i, enc_t, tokens=torch.tensor([ids], dtype=torch.long), boxes=boxes,
                             image_record=record).item(0)
        ex.words = _token_strings(self.tokenizer, caption, ids)
        return ex

    def _explain_image_side(self, image: int, enc_i) -> tuple[Optional[torch.Tensor], Optional[dict]]:
        """(boxes (1, R, 4) or None, the context weights `encode_image` records or None) of gallery image `image`,
        from the index's data folder when it is readable (and its features encode to the stored regions)."""
        from ..data import collate_images

        try:
            data = load_split(self.data_root, self.split)
            if data.num_images != self.num_images:
                return None, None
            boxes = data.boxes([image])
            if boxes is None:
                return None, None
            threshold = float((self.extract or {}).get("adjacency_threshold", 0.2))
            batch = collate_images(data.image_features([image]), boxes, [image], threshold)
        except (OSError, ValueError, IndexError):  # no data folder there any more, or another split: no boxes
            return None, None
        record: dict = {}
        with torch.no_grad():
            again = self.model.encode_image(batch, record=record)
        if again.regions.shape != enc_i.regions.shape or \
                not torch.allclose(again.regions.float(), enc_i.regions.float(), atol=1e-2, rtol=0):
            record = {}  # the folder's features are not the indexed ones: their context weights would not be either
        return batch.boxes, record or None

    # ------------------------------------------------------------------ for the web page
    def caption_indices_of(self, image: int) -> list[int]:
        """The gallery captions of image `image`, in gallery order."""
        order, offsets = self._image_captions
        a, b = (int(x) for x in offsets[image : image + 2])
        return [int(c) for c in order[a:b]]

    def captions_of(self, image: int) -> list[str]:
        return [self.captions[c] for c in self.caption_indices_of(image)]

    def image_path(self, image: int) -> Optional[Path]:
        """The image file of gallery image `image` (image_dir/<id> + one of IMAGE_SUFFIXES), or None. Only a
        regular file inside the image folder once links are resolved: an id with '..' or a symbolic link that
        points elsewhere (or at a device, a FIFO, a folder) is no image file of the index."""
        if self.image_dir is None or not 0 <= image < self.num_images:
            return None
        folder = Path(self.image_dir)
        try:
            root = folder.resolve()
        except (OSError, RuntimeError):
            return None
        for suffix in IMAGE_SUFFIXES:
            p = folder / f"{self.image_ids[image]}{suffix}"
            if inside_folder(p, root) is not None:
                return p
        return None

    def info(self) -> dict[str, Any]:
        return {"model": self.model_name, "data_root": self.data_root, "split": self.split,
                "images": self.num_images, "captions": self.num_captions, "has_image_files": self.image_dir is not None,
                "on_disk": self.images.on_disk, "faiss": self.image_vec.faiss is not None}


def _token_strings(tokenizer, caption: str, ids: list[int]) -> list[str]:
    """The string of each token id of `tokenizer.encode(caption)` (special tokens included): the caption's own
    words for the vocabulary tokenizer (so an unknown word shows as itself, not <unk>), word pieces for BERT."""
    from ..data.vocab import tokenize

    if hasattr(tokenizer, "idx2word"):  # tvrn.data.Vocabulary: [<start>] + words + [<end>]
        words = tokenize(caption)
        if len(words) + 2 == len(ids):
            return [tokenizer.idx2word[ids[0]], *words, tokenizer.idx2word[ids[-1]]]
        return [tokenizer.idx2word[i] for i in ids]
    tok = getattr(tokenizer, "_tok", None)
    if tok is not None:
        return [str(t) for t in tok.convert_ids_to_tokens(ids)]
    return [str(i) for i in ids]


def inside_folder(path: Path, root: Path) -> Optional[Path]:
    """path resolved (links followed) when it is a regular file inside the resolved folder `root`, else None."""
    import stat

    try:
        real = Path(os.path.realpath(path))
        if not real.is_relative_to(root) or real == root:
            return None
        return real if stat.S_ISREG(os.stat(real, follow_symlinks=False).st_mode) else None
    except (OSError, ValueError, RuntimeError):
        return None


__all__ = ["FaissSpecError", "Hit", "SearchIndex", "SearchIndexError", "check_faiss", "check_model_recipe",
           "stale_temporaries"]
