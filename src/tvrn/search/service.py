"""What the search server answers, without HTTP: validation, limits and the JSON bodies.

    service = SearchService(SearchIndex.load("test.index"))
    service.search("a red cat on a box", k="10", shortlist="100")   # -> dict (JSON body)
    service.image("3", k="10")                                       # gallery image 3 -> ranked captions

Parameters arrive as strings (query parameters) and are checked here; a bad one raises `ServiceError`
(status, message), which the server turns into a JSON error. Limits: the query text is refused above
`max_query_chars` (400); a query of more than `max_query_words` words is cut to that many, and the answer says
so (`truncated`); k and the shortlist are clamped to the gallery (`clamped`). Words the model's tokenizer does
not know are listed (`unknown_words`); a query with no known word gets no hits and a `notice`.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Optional

from .index import SearchIndex, SearchIndexError

_DIGITS = re.compile(r"[0-9]{1,9}")  # ASCII digits only: str.isdigit() accepts '²', which int() refuses


class ServiceError(Exception):
    """A request the service refuses: HTTP status, message (and Retry-After seconds for 503)."""

    def __init__(self, status: int, message: str, retry_after: Optional[int] = None):
        super().__init__(message)
        self.status, self.message, self.retry_after = status, message, retry_after

    def __reduce__(self):  # crosses from a model worker process to the server
        return ServiceError, (self.status, self.message, self.retry_after)


@dataclass(frozen=True)
class Limits:
    max_query_chars: int = 1000  # longer query text: 400 (checked before anything is tokenized)
    max_query_words: int = 64  # longer queries are cut to this many words (captions have about 12)
    default_k: int = 10
    default_text_shortlist: int = 100  # images re-ranked for a text query (0: all)
    default_image_shortlist: int = 500  # captions re-ranked for an image query (0: all)
    max_upload_bytes: int = 20 << 20  # an uploaded image query above this: 413
    body_timeout_s: float = 30.0  # an upload whose body has not all arrived by then: 408, connection closed


def _int(raw: Optional[str], name: str, default: int, minimum: int, maximum: int) -> int:
    """A query parameter: an integer >= minimum (values above `maximum`, the gallery size, are clamped by the
    caller); a non-integer, or one too long to be a count, is refused saying the range."""
    if raw is None or raw == "":
        return default
    if not re.fullmatch(r"-?[0-9]{1,9}", raw):
        raise ServiceError(400, f"parameter {name} must be an integer between {minimum} and {maximum}, got "
                                f"{raw[:40]!r}")
    value = int(raw)
    if value < minimum:
        raise ServiceError(400, f"parameter {name} must be at least {minimum}, got {value}")
    return value


_REPR = re.compile(r"<[A-Za-z_][\w.]* object at 0x[0-9A-Fa-f]+>")


def looks_multipart(content_type: Optional[str], data: bytes = b"") -> bool:
    """An HTML form / `curl -F` upload (multipart/form-data), by its Content-Type or by its first bytes."""
    if content_type and content_type.split(";", 1)[0].strip().lower().startswith("multipart/"):
        return True
    return data[:2] == b"--" and b"content-disposition: form-data" in data[:4096].lower()


MULTIPART = ("the request body is a multipart form (an HTML form or curl -F), not an image file: send the image "
             "file itself as the body, e.g. curl --data-binary @photo.jpg -H 'Content-Type: image/jpeg' URL")


def upload_problem(message: str, data: bytes) -> str:
    """What was wrong with an uploaded body, for a 400: no Python object reprs (`<_io.BytesIO object at 0x..>`)."""
    if looks_multipart(None, data):
        return MULTIPART
    if "UnidentifiedImageError" in message:
        return (f"the request body ({len(data)} bytes) is not an image file: its first bytes are no image format "
                f"this server decodes (JPEG, PNG, WebP, GIF, BMP, TIFF, ...)")
    return _REPR.sub("the request body", message)


def parse_index(raw: str, n: int, what: str) -> int:
    """A gallery index from a URL path segment: ASCII digits, below n; else 404."""
    if not _DIGITS.fullmatch(raw or "") or int(raw) >= n:
        raise ServiceError(404, f"no {what} {raw[:40]!r} (this index has {what}s 0..{n - 1})")
    return int(raw)


class SearchService:
    """JSON answers for a SearchIndex (see the module doc). Not thread-safe by itself: the server runs model
    calls in its bounded pool."""

    def __init__(self, index: SearchIndex, limits: Limits = Limits()):
        self.index, self.limits = index, limits

    def info(self) -> dict:
        from .image_query import image_query_problem

        problem = image_query_problem(self.index)
        return {**self.index.info(), "limits": self.limits.__dict__, "image_file_queries": problem is None,
                **({"image_file_queries_refused": problem} if problem else {})}

    def _clamp(self, k: int, shortlist: int, n: int, notes: dict) -> tuple[int, Optional[int]]:
        if k > n:
            notes["k"] = {"asked": k, "used": n}
            k = n
        if shortlist > n:
            notes["shortlist"] = {"asked": shortlist, "used": n}
            shortlist = n
        return k, (shortlist or None)

    def check_query(self, q: Optional[str]) -> str:
        """Cheap checks before any model work (the server runs them outside the pool)."""
        if q is None or not q.strip():
            raise ServiceError(400, "parameter q (the query text) is missing or empty")
        if len(q) > self.limits.max_query_chars:
            raise ServiceError(400, f"query too long: {len(q)} characters, at most {self.limits.max_query_chars}")
        return q

    def search(self, q: Optional[str], k: Optional[str] = None, shortlist: Optional[str] = None) -> dict:
        """Text -> images: {"query", "k", "shortlist", "hits", "unknown_words", ...}."""
        q = self.check_query(q)
        lim, notes, t0 = self.limits, {}, time.perf_counter()
        n = self.index.num_images
        k_, s_ = self._clamp(_int(k, "k", lim.default_k, 1, n),
                             _int(shortlist, "shortlist", lim.default_text_shortlist, 0, n), n, notes)
        words = self.index.query_words(q)
        out = {"query": q, "k": k_, "shortlist": s_ or 0, "unknown_words": words["unknown"]}
        if notes:
            out["clamped"] = notes
        if len(words["words"]) > lim.max_query_words:
            out["truncated"] = {"words": len(words["words"]), "kept": lim.max_query_words}
            q = " ".join(words["words"][: lim.max_query_words])
            words = self.index.query_words(q)
        if not words["known"]:
            out.update(hits=[], seconds=time.perf_counter() - t0,
                       notice="none of the query's words is in the model's vocabulary, so it cannot be matched: "
                              "no results")
            return out
        try:
            hits = self.index.search_text(q, k=k_, shortlist=s_)
        except SearchIndexError as e:
            raise ServiceError(400, str(e)) from None
        out.update(hits=[self._hit(h, captions=True) for h in hits], seconds=time.perf_counter() - t0)
        return out

    def image(self, raw: str, k: Optional[str] = None, shortlist: Optional[str] = None) -> dict:
        """Gallery image -> captions: {"image", "image_id", "captions", "hits" (relevant: its own), ...}."""
        image = parse_index(raw, self.index.num_images, "gallery image")
        lim, notes, t0 = self.limits, {}, time.perf_counter()
        n = self.index.num_captions
        k_, s_ = self._clamp(_int(k, "k", lim.default_k, 1, n),
                             _int(shortlist, "shortlist", lim.default_image_shortlist, 0, n), n, notes)
        hits = self.index.search_image(image, k=k_, shortlist=s_)
        own = self.index.caption_indices_of(image)
        out = {"image": image, "image_id": self.index.image_ids[image], "k": k_, "shortlist": s_ or 0,
               "image_url": self._url(image), "captions": [self.index.captions[c] for c in own],
               "caption_indices": own,  # the page shows them all, ranked in the top k or not
               "hits": [dict(self._hit(h, captions=False), relevant=h.image_index == image) for h in hits],
               "seconds": time.perf_counter() - t0}
        if notes:
            out["clamped"] = notes
        return out

    def image_file(self, data: bytes, k: Optional[str] = None, shortlist: Optional[str] = None) -> dict:
        """An uploaded image (the request body) -> captions: {"hits", "k", "shortlist", "seconds"}. 400 when it is
        not an image, 409 when the index cannot take image files (its gallery or model features were not made
        by `tvrn extract` with one recipe), 413 above max_upload_bytes."""
        from .image_query import image_query_problem

        if len(data) > self.limits.max_upload_bytes:
            raise ServiceError(413, f"image of {len(data)} bytes, at most {self.limits.max_upload_bytes}")
        if not data:
            raise ServiceError(400, "the request body (the image file) is empty")
        problem = image_query_problem(self.index)
        if problem:
            raise ServiceError(409, f"image file queries refused: {problem}")
        if looks_multipart(None, data):
            raise ServiceError(400, MULTIPART)
        lim, notes, t0 = self.limits, {}, time.perf_counter()
        n = self.index.num_captions
        k_, s_ = self._clamp(_int(k, "k", lim.default_k, 1, n),
                             _int(shortlist, "shortlist", lim.default_image_shortlist, 0, n), n, notes)
        try:
            hits = self.index.search_image_file(bytes(data), k=k_, shortlist=s_)
        except SearchIndexError as e:
            raise ServiceError(400, upload_problem(str(e), data)) from None
        out = {"k": k_, "shortlist": s_ or 0, "hits": [self._hit(h, captions=False) for h in hits],
               "seconds": time.perf_counter() - t0}
        if notes:
            out["clamped"] = notes
        return out

    def _url(self, image: int) -> Optional[str]:
        return f"/images/{image}" if self.index.image_path(image) is not None else None

    def _hit(self, hit, captions: bool) -> dict:
        out = hit.to_dict()
        img = hit.index if hit.image_index is None else hit.image_index
        out["image_url"] = self._url(img)
        if captions:
            out["captions"] = self.index.captions_of(img)
        return out


class ExplainService(SearchService):
    """SearchService plus the answer of /api/explain (what the server's model pool runs)."""

    def explain(self, q: Optional[str], image: Optional[str]) -> dict:
        """Caption and gallery image -> {"query", "image", "image_id", "image_url", "unknown_words", the
        Explanation's fields (`tvrn.models.explain.Explanation.to_dict`: words (L token strings), tokens,
        regions (R,), boxes (R, 4) or None, attention (L, R) or None, direction, gates, word_contributions,
        region_contributions, global_contribution, contribution_kind, context, score, model), "seconds"}.
        A query above max_query_words words is cut to that many (`truncated`), as a search is."""
        q = self.check_query(q)
        if image is None or image == "":
            raise ServiceError(400, "parameter image (the gallery image to explain) is missing")
        img = parse_index(image, self.index.num_images, "gallery image")
        t0 = time.perf_counter()
        words = self.index.query_words(q)
        out = {"query": q, "image": img, "image_id": self.index.image_ids[img], "image_url": self._url(img),
               "unknown_words": words["unknown"]}
        if len(words["words"]) > self.limits.max_query_words:
            out["truncated"] = {"words": len(words["words"]), "kept": self.limits.max_query_words}
            q = " ".join(words["words"][: self.limits.max_query_words])
        try:
            ex = self.index.explain(q, img)
        except SearchIndexError as e:
            raise ServiceError(400, str(e)) from None
        out.update(ex.to_dict())
        out["seconds"] = time.perf_counter() - t0
        return out
