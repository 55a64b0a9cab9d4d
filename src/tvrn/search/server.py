"""HTTP search over a `SearchIndex`, with a web page for looking at results.

    tvrn serve runs/tvrn/test.index --port 8000        # then open http://127.0.0.1:8000/

Endpoints (GET; JSON answers; errors are {"error": message} with status 400 / 404):
    /                                   the web page (search box; results as images with their captions)
    /api/info                           model, split, gallery sizes
    /api/search?q=TEXT&k=10&shortlist=100   text -> images (shortlist=0: exact, every image scored)
    /api/image/N?k=10&shortlist=500     gallery image N -> captions (ground-truth captions marked)
    /images/N                           the image file of gallery image N (404 when the index has none)

Standard library only (http.server): one request at a time, so the model is never run concurrently. Bind to
127.0.0.1 unless the machine's network is trusted.
"""
from __future__ import annotations

import json
import mimetypes
import sys
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from importlib import resources
from typing import Optional
from urllib.parse import parse_qs, urlparse

from .index import SearchIndex, SearchIndexError


class _BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _int_param(params: dict, name: str, default: int, lo: int, hi: int) -> int:
    raw = params.get(name, [str(default)])[-1]
    try:
        value = int(raw)
    except ValueError:
        raise _BadRequest(400, f"parameter {name} must be an integer, got {raw!r}") from None
    if not lo <= value <= hi:
        raise _BadRequest(400, f"parameter {name} must be in [{lo}, {hi}], got {value}")
    return value


def _hit_json(index: SearchIndex, hit, with_captions: bool) -> dict:
    out = hit.to_dict()
    img = hit.index if hit.image_index is None else hit.image_index
    out["image_url"] = f"/images/{img}" if index.image_path(img) is not None else None
    if with_captions:
        out["captions"] = index.captions_of(img)
    return out


def handle_api(index: SearchIndex, path: str, params: dict) -> dict:
    """The JSON API without HTTP (tests call it directly): path like "/api/search" -> response dict.
    Raises _BadRequest (status, message) for bad input."""
    if path == "/api/info":
        return index.info()
    t0 = time.perf_counter()
    try:
        if path == "/api/search":
            q = params.get("q", [""])[-1]
            if not q.strip():
                raise _BadRequest(400, "parameter q (the query text) is missing or empty")
            k = _int_param(params, "k", 10, 1, index.num_images)
            short = _int_param(params, "shortlist", 100, 0, index.num_images)
            hits = index.search_text(q, k=k, shortlist=short or None)
            return {"query": q, "k": k, "shortlist": short, "seconds": time.perf_counter() - t0,
                    "hits": [_hit_json(index, h, with_captions=True) for h in hits]}
        if path.startswith("/api/image/"):
            raw = path[len("/api/image/"):]
            if not raw.isdigit() or int(raw) >= index.num_images:
                raise _BadRequest(404, f"no gallery image {raw!r} (the index has images 0..{index.num_images - 1})")
            image = int(raw)
            k = _int_param(params, "k", 10, 1, index.num_captions)
            short = _int_param(params, "shortlist", 500, 0, index.num_captions)
            hits = index.search_image(image, k=k, shortlist=short or None)
            return {"image": image, "image_id": index.image_ids[image], "k": k, "shortlist": short,
                    "image_url": f"/images/{image}" if index.image_path(image) is not None else None,
                    "captions": index.captions_of(image), "seconds": time.perf_counter() - t0,
                    "hits": [dict(_hit_json(index, h, with_captions=False), relevant=h.image_index == image)
                             for h in hits]}
    except SearchIndexError as e:
        raise _BadRequest(400, str(e)) from None
    raise _BadRequest(404, f"no such endpoint {path!r}")


def page_html() -> bytes:
    return resources.files("tvrn.search").joinpath("page.html").read_bytes()


def make_handler(index: SearchIndex, quiet: bool = False):
    class Handler(BaseHTTPRequestHandler):
        server_version = "tvrn-search"

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, obj: dict) -> None:
            self._send(status, json.dumps(obj).encode(), "application/json")

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            url = urlparse(self.path)
            params = parse_qs(url.query)
            try:
                if url.path in ("/", "/index.html"):
                    return self._send(200, page_html(), "text/html; charset=utf-8")
                if url.path.startswith("/images/"):
                    raw = url.path[len("/images/"):]
                    file = index.image_path(int(raw)) if raw.isdigit() else None
                    if file is None:
                        raise _BadRequest(404, f"no image file for {raw!r}")
                    ctype = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
                    return self._send(200, file.read_bytes(), ctype)
                return self._json(200, handle_api(index, url.path, params))
            except _BadRequest as e:
                return self._json(e.status, {"error": str(e)})

        def log_message(self, fmt, *args) -> None:
            if not quiet:
                sys.stderr.write("tvrn serve: " + fmt % args + "\n")

    return Handler


def make_server(index: SearchIndex, host: str = "127.0.0.1", port: int = 8000, quiet: bool = False) -> HTTPServer:
    """An HTTPServer answering for `index` (port 0 picks a free port: server.server_address[1])."""
    return HTTPServer((host, port), make_handler(index, quiet))


def serve(index: SearchIndex, host: str = "127.0.0.1", port: int = 8000, quiet: bool = False,
          ready: Optional[callable] = None) -> None:
    server = make_server(index, host, port, quiet)
    if ready is not None:
        ready(server)
    try:
        server.serve_forever()
    finally:
        server.server_close()
