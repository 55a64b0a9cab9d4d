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

Two on-disk forms, both opened by `SearchIndex.load(path)`:

- a folder (`save`, and `SearchIndex.build_to` which encodes a split straight to disk, one batch at a time): the
  encodings as one memory-mapped `.npy` file per field (`tvrn.search.store`, float32 / float16 / bfloat16),
  read by row, so a query touches its shortlisted candidates only; the shortlist vectors as `.npy` and, when
  asked for, FAISS indexes built from a factory string (`Flat`, `IVF1024,Flat`, `HNSW32`, ...); `model.pt`;
  `manifest.json` with the sha256 of every file, checked on opening (a corrupted file is refused by name);
- a single file (version 1, torch.save of plain data, loaded whole): model, ids, captions, encodings.

A folder is written into a temporary folder beside it, `.NAME.tmp.PID@HOST`, renamed into place when complete;
a build that fails removes it, and a new build of NAME removes those whose writer is gone (a killed build).
A FAISS factory string is checked before anything is encoded (`check_faiss`). A damaged folder (a manifest that
is not UTF-8 JSON, a truncated file) is refused with a SearchIndexError naming the file.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..data import collate_texts, load_split
from ..scoring import encode_texts, score_all
from ..train.checkpoint import atomic_save
from .shortlist import shortlist_embeddings
from ..fileio import sha256_file, stale_temporaries, temporary_sibling
from .store import FieldStore, FieldWriter, NpyRows, NpyRowWriter, StringRows, write_strings

FORMAT, VERSION = "tvrn-index", 1
DIR_VERSION = 3  # the folder form (2: ids and captions loaded into RAM; 3: read from disk when asked)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".PNG", ".JPG", ".JPEG", ".WEBP")
EXACT_CHUNK = 4096  # images / captions scored at a time by an exact (shortlist=None) query


class SearchIndexError(ValueError):
    """An index file that is not a tvrn index, or a query the index cannot answer."""


class FaissSpecError(SearchIndexError):
    """A FAISS factory string (`tvrn index --faiss`) that FAISS cannot build, or not for this gallery."""


FAISS_ACCEPTED = ("Flat (exact)", "IVF<lists>,Flat (e.g. IVF1024,Flat; at most one list per gallery image)",
                  "IVF<lists>,SQ8", "IVF<lists>,PQ<m>", "HNSW<links> (e.g. HNSW32)", "PQ<m>",
                  "or another FAISS index_factory string")


def _faiss_reason(e: BaseException) -> str:
    """FAISS's message without its C++ location: 'could not parse index string Bogus99'."""
    text = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    m = re.search(r"\.(?:cpp|h|hpp):\d+: (.*)$", text)
    return (m.group(1) if m else text)[:300]


def check_faiss(spec: str, n_train: int, what: str = "images") -> None:
    """Refuse (FaissSpecError, naming --faiss) a factory string FAISS cannot build, or an IVF with more inverted
    lists than the `n_train` vectors (`what`) it would be trained on; cheap: built on tiny dimensions, untrained.
    A string that builds here may still fail on the real dimension or data (PQ sizes): `_IndexWriter.finish`
    refuses that the same way, leaving no temporary folder."""
    import faiss

    accepted = "; accepted: " + ", ".join(FAISS_ACCEPTED)
    if not isinstance(spec, str) or not spec.strip():
        raise FaissSpecError("--faiss: an empty factory string" + accepted)
    ivf = re.search(r"IVF([0-9]+)", spec)
    if ivf is not None:
        nlist = int(ivf.group(1))
        if nlist < 1:
            raise FaissSpecError(f"--faiss {spec!r}: an IVF needs at least 1 inverted list" + accepted)
        if nlist > n_train:  # checked before FAISS allocates the lists (IVF99999999 takes it half a minute)
            raise FaissSpecError(
                f"--faiss {spec!r}: an IVF of {nlist} inverted lists is trained on the gallery's vectors, and the "
                f"gallery has {n_train} {what}: use at most IVF{n_train} (FAISS advises 39 vectors per list: "
                f"IVF{max(1, n_train // 39)}), or Flat / HNSW32 for a gallery this small")
    hnsw = re.search(r"HNSW([0-9]+)", spec)
    if hnsw is not None and int(hnsw.group(1)) < 2:  # FAISS aborts the process on HNSW0 / HNSW1 when adding
        raise FaissSpecError(f"--faiss {spec!r}: an HNSW graph needs at least 2 links per vector (HNSW32 is usual)"
                             + accepted)
    first = None
    for dim in (8, 16, 32, 64, 128, 256, 512, 1024):  # PQ<m> needs a dimension divisible by m
        try:
            faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)
            return
        except Exception as e:  # FAISS raises RuntimeError (parse errors, failed assertions)
            first = first or e
    raise FaissSpecError(f"--faiss {spec!r} is not a factory string FAISS can build ({_faiss_reason(first)})"
                         + accepted)


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


class _Vectors:
    """Shortlist vectors (N, D) in RAM or memory-mapped, with an optional FAISS index over them."""

    def __init__(self, vectors, faiss_index=None):
        self.vectors, self.faiss = vectors, faiss_index

    def __len__(self) -> int:
        return self.vectors.shape[0]

    def row(self, i: int) -> torch.Tensor:
        return torch.as_tensor(np.array(self.vectors[i : i + 1], dtype=np.float32))

    def top(self, queries: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """queries (Q, D) -> (indices (Q, m), cosines (Q, m)), best first: FAISS when the index has one, else exact."""
        if self.faiss is not None:
            cos, idx = self.faiss.search(queries.float().contiguous().numpy(), m)
            return torch.from_numpy(idx).long(), torch.from_numpy(cos).float()
        best_c = torch.full((queries.shape[0], 0), -float("inf"))
        best_i = torch.zeros((queries.shape[0], 0), dtype=torch.long)
        for start in range(0, len(self), 65536):  # chunks: a memory-mapped gallery is never read whole
            block = torch.as_tensor(np.array(self.vectors[start:start + 65536], dtype=np.float32))
            c = queries.float() @ block.t()  # (Q, chunk)
            cand_c = torch.cat([best_c, c], 1)
            cand_i = torch.cat([best_i, torch.arange(start, start + block.shape[0]).expand(queries.shape[0], -1)], 1)
            keep = cand_c.topk(min(m, cand_c.shape[1]), dim=1)
            best_c, best_i = keep.values, cand_i.gather(1, keep.indices)
        return best_i, best_c

    def cosines(self, queries: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """(Q, D) against the gallery rows idx (m,) -> (Q, m)."""
        rows = np.asarray(self.vectors[np.sort(idx.numpy())], dtype=np.float32)
        order = torch.as_tensor(np.argsort(np.argsort(idx.numpy(), kind="stable"), kind="stable"))
        return queries.float() @ torch.as_tensor(rows)[order].t()


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
        from ..pipeline import check_model_fits_split, encode_split

        check_model_recipe(checkpoint_path, data_root)
        model, tokenizer, slim = _load_model(checkpoint_path, device)
        data = load_split(data_root, split)
        check_model_fits_split(model, data, checkpoint_path)
        enc_i, enc_t = encode_split(model, data, tokenizer, {"eval_batch_size": batch_size,
                                                              "adjacency_threshold": adjacency_threshold},
                                    device=device, progress=progress)
        return cls(model, tokenizer, slim, enc_i.to("cpu"), enc_t.to("cpu"), _ids(data), list(data.captions),
                   torch.as_tensor(data.caption_to_image), data_root=str(data_root), split=split,
                   image_dir=_image_dir(data_root, split, image_dir))

    @classmethod
    def build_to(cls, out: str | os.PathLike, checkpoint_path: str | os.PathLike, data_root: str | os.PathLike,
                 split: str = "test", image_dir=None, batch_size: int = 128, adjacency_threshold: float = 0.2,
                 dtype: str = "float32", faiss: Optional[str] = None, device=None, progress: bool = False,
                 on_batch=None) -> "SearchIndex":
        """Encode a split straight into an index folder at `out`, one batch at a time (memory flat in the
        gallery size), then open it. dtype: how encodings are stored (float32 / float16 / bfloat16);
        faiss: a FAISS factory string for the shortlist indexes ("Flat", "IVF1024,Flat", "HNSW32", ...)."""
        from ..data import iter_image_batches, iter_text_batches
        from ..pipeline import check_model_fits_split
        from .image_query import extract_record

        data = load_split(data_root, split)
        if faiss is not None:  # before any encoding: a bad factory string costs nothing
            check_faiss(faiss, *_train_count(data.num_images, data.num_captions))
        check_model_recipe(checkpoint_path, data_root)
        model, tokenizer, slim = _load_model(checkpoint_path, device)
        check_model_fits_split(model, data, checkpoint_path)
        tokens = [tokenizer.encode(c) for c in data.captions]
        writer = _IndexWriter(out, data.num_images, data.num_captions, dtype, max_words=max(map(len, tokens)))
        try:
            with torch.no_grad():
                start = 0
                for batch in iter_image_batches(data, batch_size, adjacency_threshold=adjacency_threshold):
                    enc = model.encode_image(batch.to(device) if device else batch).to("cpu")
                    writer.add_images(start, enc, model.shortlist_embed_image(enc).float())
                    start += len(enc)
                    if on_batch:
                        on_batch("images", start)
                start = 0
                for batch in iter_text_batches(data, tokenizer, batch_size):
                    enc = model.encode_text(batch.to(device) if device else batch).to("cpu")
                    writer.add_texts(start, enc, model.shortlist_embed_text(enc).float())
                    start += len(enc)
                    if on_batch:
                        on_batch("captions", start)
            writer.finish(slim, _ids(data), list(data.captions), torch.as_tensor(data.caption_to_image),
                          str(data_root), split, _image_dir(data_root, split, image_dir), faiss,
                          extract=extract_record(checkpoint_path, data_root, adjacency_threshold))
        except BaseException:  # a failed or interrupted build leaves no temporary folder behind
            writer.abort()
            raise
        return cls.load(out)

    def save(self, path: str | os.PathLike, dtype: str = "float32", faiss: Optional[str] = None) -> None:
        """Write the index as a folder (see the module doc), atomically: built beside `path`, renamed into place."""
        if faiss is not None:
            check_faiss(faiss, *_train_count(self.num_images, self.num_captions))
        writer = _IndexWriter(path, self.num_images, self.num_captions, dtype)
        try:
            for start, enc in self.images.chunks():
                writer.add_images(start, enc, self.model.shortlist_embed_image(enc).float())
            for start, enc in self.texts.chunks():
                writer.add_texts(start, enc, self.model.shortlist_embed_text(enc).float())
            writer.finish(self.checkpoint, self.image_ids, self.captions, self.caption_to_image, self.data_root,
                          self.split, self.image_dir, faiss, extract=self.extract)
        except BaseException:
            writer.abort()
            raise

    def save_file(self, path: str | os.PathLike) -> None:
        """The single-file form (version 1): everything in one torch.save, loaded whole (small galleries)."""
        atomic_save({"format": FORMAT, "version": VERSION, "model": self.checkpoint, "data_root": self.data_root,
                     "split": self.split, "image_dir": self.image_dir, "image_ids": list(self.image_ids),
                     "captions": list(self.captions),
                     "caption_to_image": torch.as_tensor(np.asarray(self.caption_to_image)).long(),
                     "enc_images": _fields(self.images.get(torch.arange(self.num_images))),
                     "enc_texts": _fields(self.texts.get(torch.arange(self.num_captions)))}, path)

    @classmethod
    def load(cls, path: str | os.PathLike, verify: bool = True, nprobe: Optional[int] = None) -> "SearchIndex":
        """Open an index folder (checking every file's sha256 unless verify=False) or a version-1 file.
        nprobe: FAISS search breadth of an IVF / HNSW shortlist (more: slower, closer to exact)."""
        index = cls._load_dir(Path(path), verify, nprobe) if Path(path).is_dir() else cls._load_file(path)
        index.source = {"path": str(Path(path).resolve()), "nprobe": nprobe}
        return index

    @classmethod
    def _load_file(cls, path) -> "SearchIndex":
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
        try:
            model, tokenizer = model_from_checkpoint(obj["model"], source=str(path))
            return cls(model, tokenizer, obj["model"], EncodedImages(**obj["enc_images"]),
                       EncodedTexts(**obj["enc_texts"]), obj["image_ids"], obj["captions"], obj["caption_to_image"],
                       data_root=obj["data_root"], split=obj["split"], image_dir=obj["image_dir"])
        except SearchIndexError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:
            raise SearchIndexError(f"{path}: a damaged tvrn search index ({_reason(e)}); rebuild it with "
                                   f"`tvrn index`") from None

    @classmethod
    def _load_dir(cls, path: Path, verify: bool, nprobe: Optional[int]) -> "SearchIndex":
        """A damaged folder raises SearchIndexError naming the file: a manifest that is not UTF-8 JSON or lacks
        what an index records, a missing, corrupted (verify) or truncated file."""
        from ..models.base import EncodedImages, EncodedTexts
        from ..pipeline import model_from_checkpoint

        try:
            raw = (path / "manifest.json").read_bytes()
        except OSError as e:
            raise SearchIndexError(f"{path}: not a tvrn index folder (manifest.json: "
                                   f"{e.strerror or type(e).__name__})") from None
        try:
            man = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SearchIndexError(f"{path}: manifest.json is not valid UTF-8 JSON ({_reason(e)}): the index is "
                                   f"damaged; rebuild it with `tvrn index`") from None
        if not isinstance(man, dict) or man.get("format") != FORMAT or man.get("version") not in (2, DIR_VERSION):
            raise SearchIndexError(f"{path}: manifest.json is not a tvrn index version 2 or {DIR_VERSION}")
        problem = _manifest_problem(man)
        if problem:
            raise SearchIndexError(f"{path}: manifest.json cannot be read ({problem}): the index is damaged; "
                                   f"rebuild it with `tvrn index`")
        reading = "manifest.json"  # the file being read when something fails: named in the error
        try:
            if verify:
                for rel, digest in man["files"].items():
                    f = path / rel
                    if not f.is_file():
                        raise SearchIndexError(f"{path}: {rel} is missing")
                    if sha256_file(f) != digest:
                        raise SearchIndexError(f"{path}: {rel} is corrupted (its sha256 differs from manifest.json)")
            reading = "model.pt"
            ckpt = torch.load(path / "model.pt", map_location="cpu", weights_only=True)
            model, tokenizer = model_from_checkpoint(ckpt, source=str(path / "model.pt"))
            reading = "images/"
            images = FieldStore(path / "images", man["fields"]["images"], EncodedImages)
            reading = "texts/"
            texts = FieldStore(path / "texts", man["fields"]["texts"], EncodedTexts)
            vectors = []
            for side in ("image", "text"):
                reading = f"{side}_vectors.npy"
                vec = NpyRows(path / f"{side}_vectors.npy")
                index = None
                if man.get("faiss"):
                    import faiss

                    reading = f"{side}.faiss"
                    index = faiss.read_index(str(path / f"{side}.faiss"))
                    if nprobe is not None and ("IVF" in man["faiss"] or "HNSW" in man["faiss"]):  # Flat: exact
                        faiss.ParameterSpace().set_index_parameter(
                            index, "nprobe" if "IVF" in man["faiss"] else "efSearch", nprobe)
                vectors.append(_Vectors(vec, index))
            reading = "image_ids / captions"
            if man["version"] == 2:  # ids and captions into RAM
                captions = (path / "captions.txt").read_text(encoding="utf-8").split("\n")[: man["counts"]["captions"]]
                ids = (path / "image_ids.txt").read_text(encoding="utf-8").split("\n")[: man["counts"]["images"]]
                c2i, by_image = torch.from_numpy(np.load(path / "caption_to_image.npy")), None
            else:  # read from disk when asked
                ids = StringRows(path / "image_ids.txt", path / "image_ids.offsets.npy")
                captions = StringRows(path / "captions.txt", path / "captions.offsets.npy")
                c2i = NpyRows(path / "caption_to_image.npy")
                by_image = (NpyRows(path / "image_captions.npy"), NpyRows(path / "image_captions.offsets.npy"))
                if (len(ids), len(captions), len(c2i)) != (man["counts"]["images"], man["counts"]["captions"],
                                                            man["counts"]["captions"]):
                    raise SearchIndexError(f"{path}: image_ids / captions / caption_to_image do not match the counts "
                                           f"of manifest.json")
            reading = "manifest.json"
            return cls(model, tokenizer, ckpt, images, texts, ids, captions, c2i, data_root=man["data_root"],
                       split=man["split"], image_dir=man["image_dir"], vectors=tuple(vectors),
                       extract=man.get("extract"), image_captions=by_image)
        except SearchIndexError:
            raise
        except FileNotFoundError as e:
            raise SearchIndexError(f"{path}: {Path(e.filename).name if e.filename else reading} is missing (the "
                                   f"index is incomplete; rebuild it with `tvrn index`)") from None
        except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError, RuntimeError, EOFError) as e:
            # truncated or damaged files (numpy, torch, FAISS and pickle errors), a manifest lacking a key
            raise SearchIndexError(f"{path}: {reading} cannot be read ({_reason(e)}): the index is damaged or "
                                   f"truncated; rebuild it with `tvrn index`") from None

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


def check_model_recipe(checkpoint_path, data_root) -> None:
    """Refuse (SearchIndexError) to index a gallery whose features `tvrn extract` made with another recipe than
    the data the model was trained on (its checkpoint's or run.json's data.root), when both folders record their
    recipe: the model has not learned features made that way, so its text and photo answers would be noise.
    Nothing is refused when either recipe is unknown (features not made by `tvrn extract`)."""
    from ..extract.features import recipe_difference, same_recipe
    from ..extract.folder import MANIFEST
    from .image_query import _manifest_extractor, model_extractor

    gallery = _manifest_extractor(data_root)
    if gallery is None:
        return
    train_root, model_data = model_extractor(checkpoint_path)
    if model_data is None or same_recipe(gallery, model_data):
        return

    def recipe(rec: dict) -> str:
        return ", ".join(f"{k}={v}" for k, v in (rec.get("recipe") or {}).items())

    raise SearchIndexError(
        f"checkpoint {checkpoint_path} was trained on features of another extraction recipe than the gallery's: "
        f"model data {Path(train_root) / MANIFEST} ({recipe(model_data)}) vs gallery {Path(data_root) / MANIFEST} "
        f"({recipe(gallery)}); differences: {'; '.join(recipe_difference(model_data, gallery))}. Index data "
        f"extracted with the model's recipe (tvrn extract with the same options), or train a model on this data")


def _load_model(checkpoint_path, device):
    """(model in eval mode, tokenizer, the slim checkpoint an index stores: config, weights, vocabulary)."""
    from ..pipeline import load_trained
    from ..train.checkpoint import load_checkpoint

    from ..export import is_model_source

    model, tokenizer, cfg = load_trained(checkpoint_path)
    if is_model_source(checkpoint_path):  # a model folder (tvrn export) or hub name: its weights as loaded
        slim = {"config": {k: cfg.get(k) for k in ("model_name", "model")}, "model": dict(model.state_dict()),
                "vocab": tokenizer.to_json_dict() if hasattr(tokenizer, "to_json_dict") else None}
    else:
        ckpt = load_checkpoint(checkpoint_path)
        slim = {"config": {k: ckpt["config"].get(k) for k in ("model_name", "model")}, "model": ckpt["model"],
                "vocab": ckpt.get("vocab")}
    if device is not None:
        model.to(device)
    return model.eval(), tokenizer, slim


def _reason(e: BaseException) -> str:
    """One line for an error inside a message (its first line, bounded; never an object repr)."""
    if isinstance(e, KeyError):
        return f"no {e.args[0]!r} entry" if e.args else "a missing entry"
    text = (str(e).strip().splitlines() or [""])[0][:300]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _manifest_problem(man: dict) -> Optional[str]:
    """What an index folder's manifest lacks of what the folder form records, or None."""
    for key in ("files", "fields", "counts"):
        if not isinstance(man.get(key), dict):
            return f"no {key!r} entry" if key not in man else f"its {key!r} entry is not an object"
    for key in ("images", "texts"):
        if not isinstance(man["fields"].get(key), dict):
            return f"no 'fields' / {key!r} entry"
    for key in ("images", "captions"):
        if not isinstance(man["counts"].get(key), int):
            return f"no 'counts' / {key!r} count"
    for key in ("data_root", "split", "image_dir"):
        if key not in man:
            return f"no {key!r} entry"
    return None


def _train_count(n_images: int, n_captions: int) -> tuple[int, str]:
    """The fewest vectors a FAISS index of the gallery is trained on (both sides get one), and what they are."""
    return (n_images, "images") if n_images <= n_captions else (n_captions, "captions")


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


def _ids(data) -> list[str]:
    return list(data.ids) if data.ids is not None else [str(i) for i in range(data.num_images)]


def _image_dir(data_root, split, image_dir) -> Optional[str]:
    if image_dir is None and (Path(data_root) / "images" / split).is_dir():
        image_dir = Path(data_root) / "images" / split
    if image_dir is None:  # a `tvrn extract` data folder records the photo folder of each split
        try:
            image_dir = json.loads((Path(data_root) / "manifest.json").read_text())["splits"][split].get("image_dir")
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            image_dir = None
        if image_dir is not None and not Path(image_dir).is_dir():
            image_dir = None
    return None if image_dir is None else str(Path(image_dir).resolve())


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


def captions_by_image(caption_to_image, n_images: int) -> tuple[np.ndarray, np.ndarray]:
    """caption_to_image (Nc,) -> (captions grouped by image, stable: (Nc,) int64; offsets (n_images + 1,) int64):
    the captions of image i are order[offsets[i]:offsets[i + 1]]."""
    c2i = np.asarray(caption_to_image, dtype=np.int64).reshape(-1)
    return np.argsort(c2i, kind="stable"), np.r_[0, np.cumsum(np.bincount(c2i, minlength=n_images))].astype(np.int64)


def _ivf_lists(index) -> int:
    """The number of inverted lists of a FAISS IVF index (0 for other kinds)."""
    import faiss

    try:
        return int(faiss.extract_index_ivf(index).nlist)
    except RuntimeError:
        return 0


def _remove(p: Path) -> None:
    try:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    except FileNotFoundError:
        pass


class _IndexWriter:
    """Writes an index folder into a temporary folder beside `out` (.NAME.tmp.PID@HOST), renamed into place by
    finish(); abort() removes it. Starting removes the temporary folders of earlier builds of `out` whose writer
    is gone (`stale_temporaries`)."""

    def __init__(self, out, n_images: int, n_captions: int, dtype: str, max_words: Optional[int] = None):
        self.out = Path(out)
        self.removed = stale_temporaries(self.out)
        for p in self.removed:
            _remove(p)
        self.tmp = temporary_sibling(self.out)
        if self.tmp.exists() or self.tmp.is_symlink():  # this process's own, from a build that could not clean up
            _remove(self.tmp)
        self.tmp.mkdir(parents=True)
        self.dtype, self.max_words = dtype, max_words
        self.images = FieldWriter(self.tmp / "images", n_images, dtype)
        self.texts = None
        self.n_captions = n_captions
        self.vec = {"image": None, "text": None}
        self.sizes = {"image": n_images, "text": n_captions}

    def _vectors(self, side: str, start: int, v: torch.Tensor) -> None:
        if self.vec[side] is None:
            self.vec[side] = NpyRowWriter(self.tmp / f"{side}_vectors.npy", (self.sizes[side], v.shape[1]), np.float32)
        self.vec[side].write(start, v.detach().cpu().float().numpy())

    def add_images(self, start: int, enc, vectors: torch.Tensor) -> None:
        self.images.write(start, enc)
        self._vectors("image", start, vectors)

    def add_texts(self, start: int, enc, vectors: torch.Tensor) -> None:
        from ..models.base import WORD_AXIS_FIELDS

        if self.texts is None:  # captions of all lengths in one file: the word axis at the longest
            L = self.max_words or enc.mask.shape[1]
            shapes = {f.name: (L, *getattr(enc, f.name).shape[2:]) for f in dataclasses.fields(enc)
                      if f.name in WORD_AXIS_FIELDS and isinstance(getattr(enc, f.name), torch.Tensor)}
            self.texts = FieldWriter(self.tmp / "texts", self.n_captions, self.dtype, max_shape=shapes)
        self.texts.write(start, enc)
        self._vectors("text", start, vectors)

    def abort(self) -> None:
        """A failed or interrupted build: close the files and remove the temporary folder."""
        for w in (self.images, self.texts, *self.vec.values()):
            if w is not None:
                w.abort()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def finish(self, checkpoint: dict, image_ids, captions, caption_to_image, data_root, split, image_dir,
               faiss_spec: Optional[str], extract: Optional[dict] = None) -> None:
        for side in ("image", "text"):
            self.vec[side].close()
        meta_i, meta_t = self.images.close(), self.texts.close()
        if faiss_spec:
            import faiss

            for side in ("image", "text"):
                vec = NpyRows(self.tmp / f"{side}_vectors.npy")
                try:
                    index = faiss.index_factory(vec.shape[1], faiss_spec, faiss.METRIC_INNER_PRODUCT)
                    if not index.is_trained:  # IVF / PQ: train on a sample, 64 vectors per list (FAISS asks 39+)
                        step = max(1, vec.shape[0] // max(100_000, 64 * _ivf_lists(index)))
                        index.train(np.ascontiguousarray(vec[np.arange(0, vec.shape[0], step)], dtype=np.float32))
                    for s0 in range(0, vec.shape[0], 65536):
                        index.add(np.ascontiguousarray(vec[s0:s0 + 65536], dtype=np.float32))
                except RuntimeError as e:  # what check_faiss cannot see: the real dimension, the training data
                    raise FaissSpecError(f"--faiss {faiss_spec!r}: FAISS cannot build it for the {vec.shape[0]} "
                                         f"{side} vectors of dimension {vec.shape[1]} ({_faiss_reason(e)}); "
                                         f"accepted: " + ", ".join(FAISS_ACCEPTED)) from None
                faiss.write_index(index, str(self.tmp / f"{side}.faiss"))
        torch.save(checkpoint, self.tmp / "model.pt")
        n_ids = write_strings(self.tmp / "image_ids.txt", self.tmp / "image_ids.offsets.npy", image_ids)
        n_caps = write_strings(self.tmp / "captions.txt", self.tmp / "captions.offsets.npy", captions)
        c2i = np.asarray(caption_to_image, dtype=np.int64).reshape(-1)
        if (n_ids, n_caps, len(c2i)) != (self.sizes["image"], self.sizes["text"], self.sizes["text"]):
            raise ValueError(f"{n_ids} image ids, {n_caps} captions and {len(c2i)} caption images for an index of "
                             f"{self.sizes['image']} images and {self.sizes['text']} captions")
        if len(c2i) and (c2i.min() < 0 or c2i.max() >= n_ids):
            raise ValueError(f"caption_to_image has an image outside 0..{n_ids - 1}")
        np.save(self.tmp / "caption_to_image.npy", c2i)
        order, offsets = captions_by_image(c2i, n_ids)
        np.save(self.tmp / "image_captions.npy", order)
        np.save(self.tmp / "image_captions.offsets.npy", offsets)
        files = {str(p.relative_to(self.tmp)): sha256_file(p) for p in sorted(self.tmp.rglob("*")) if p.is_file()}
        man = {"format": FORMAT, "version": DIR_VERSION, "counts": {"images": n_ids, "captions": n_caps},
               "dtype": self.dtype, "faiss": faiss_spec, "data_root": data_root, "split": split,
               "image_dir": image_dir, "fields": {"images": meta_i, "texts": meta_t}, "files": files,
               "extract": extract}
        (self.tmp / "manifest.json").write_text(json.dumps(man, indent=1))
        old = self.out.parent / f".{self.out.name}.old"
        if self.out.exists():  # replace: move the old one aside first, so a reader sees one or the other
            if old.exists() or old.is_symlink():
                _remove(old)
            os.replace(self.out, old)
            try:
                os.replace(self.tmp, self.out)
            except BaseException:  # interrupted between the renames: the previous index goes back in place
                if not self.out.exists():
                    os.replace(old, self.out)
                raise
        else:
            os.replace(self.tmp, self.out)
        if old.exists() or old.is_symlink():  # this build's, or one left by a build killed between the renames
            _remove(old)


__all__ = ["FaissSpecError", "Hit", "SearchIndex", "SearchIndexError", "check_faiss", "check_model_recipe",
           "stale_temporaries"]
