"""HTTP search over a `SearchIndex`: FastAPI on uvicorn, with a web page for looking at results.

    tvrn serve runs/tvrn/test.index --port 8000        # then open http://127.0.0.1:8000/

Endpoints (GET or HEAD; JSON answers; every error, whatever its status, method or path, is {"error": message}):
    /                                     the web page (search box; results as images with their captions)
    /api/info                             model, split, gallery sizes, limits
    /api/search?q=TEXT&k=10&shortlist=100 text -> images (shortlist=0: exact, every image scored)
    /api/image/N?k=10&shortlist=500       gallery image N -> captions (its own captions marked relevant)
    /api/explain?q=TEXT&image=N           why image N scores what it does for TEXT: each token's attention over
                                          the image's regions (with their boxes), gates, per-word contributions,
                                          the pair's score (`SearchIndex.explain`; the page draws it)
    /images/N                             the image file of gallery image N (a regular file inside the
                                          index's image folder, links resolved; nothing else is served)
    POST /api/query-image?k=10&shortlist=500  body: an image file -> captions (indexes of `tvrn extract` data;
                                          refused with 409 when the gallery or the model has another recipe)

Model calls run in a bounded pool (`workers` at a time, `queue` waiting); when it is full a search gets 503 with
Retry-After at once instead of piling up; an upload takes its place in the pool before its body is read, so
when the pool is full it gets 503 without a byte of its body read (a Content-Length above the limit: 413, a
multipart form: 400, also unread). `tvrn serve` runs them in worker processes that each open the index
(`tvrn.search.pool.ModelPool`), so model work never holds the server's GIL; `create_app` uses threads unless
asked. The page, /api/info and image files never touch the pool, so they never wait behind model work.
uvicorn's HTTP protocol (httptools when installed, else h11) is extended (`tvrn.search.protocol`) with a header
timeout: a connection that has not sent a complete request head within `header_timeout` seconds (idle, or half
a header) is closed; idle keep-alive connections close after `keepalive_timeout`; a request head above 16 KB is
refused (400, JSON); an upload whose body has not arrived within `Limits.body_timeout_s` gets 408 and the
connection is closed.
With a token (`--token` or TVRN_SERVE_TOKEN), every /api route and /images/N need `Authorization: Bearer TOKEN`
(the page reads it from its URL: /#token=TOKEN); /images/N also takes it as ?token=TOKEN, since the page's <img>
cannot send a header (compared in constant time, and removed from the query string the access log shows).

This module is the app, its routes and the server around it; the model pool is `tvrn.search.pool`, the
answers without HTTP `tvrn.search.service`, uvicorn's extended protocols `tvrn.search.protocol`.

Needs the `serve` extra: pip install "tvrn[serve]" (fastapi, uvicorn).
"""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
import mimetypes
import os
import stat
import threading
from importlib import resources
from pathlib import Path
from typing import Callable, Optional

from .index import SearchIndex, inside_folder
from .pool import ModelPool
from .protocol import MAX_HEAD_BYTES, make_config, require_serve_extra
from .service import MULTIPART, ExplainService, Limits, ServiceError, looks_multipart, parse_index

try:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.requests import ClientDisconnect
except ImportError as e:  # the serve extra is not installed
    _MISSING = e
else:
    _MISSING = None


def _require():
    require_serve_extra(_MISSING)  # FastAPI's import, then uvicorn's (`tvrn.search.protocol`)


def page_html() -> bytes:
    return resources.files("tvrn.search").joinpath("page.html").read_bytes()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _error(status: int, message: str, headers: Optional[dict] = None):
    return JSONResponse({"error": message}, status_code=status, headers=headers)


_SAFE_HEADERS = [(b"cache-control", b"no-store"), (b"x-content-type-options", b"nosniff")]


class _Guard:
    """ASGI middleware in front of every route: the request head bound, the bearer token on /api routes and image
    files (there also as ?token=, removed from the query string before the route and the access log see it),
    HEAD served as GET, and no-store / nosniff on every answer. Plain ASGI, not Starlette's BaseHTTPMiddleware
    (which costs every request an extra task and a stream)."""

    def __init__(self, app, token: Optional[str] = None):
        self.app = app
        self.expected = None if token is None else f"Bearer {token}".encode()
        self.token = None if token is None else token.encode()

    def _authorized(self, scope, images: bool) -> bool:
        """The Authorization header, or for image files a ?token= parameter; constant-time comparisons. The
        token parameter is dropped from the scope's query string (in place: uvicorn's access log reads it)."""
        got = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        ok = hmac.compare_digest(got, self.expected)
        if images and scope.get("query_string"):
            from urllib.parse import unquote_to_bytes

            kept = []
            for part in scope["query_string"].split(b"&"):
                name, _, value = part.partition(b"=")
                if name == b"token":
                    ok = hmac.compare_digest(unquote_to_bytes(value.replace(b"+", b" ")), self.token) or ok
                else:
                    kept.append(part)
            scope["query_string"] = b"&".join(kept)
        return ok

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        head = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"") + \
            sum(len(k) + len(v) + 4 for k, v in scope["headers"])
        if head > MAX_HEAD_BYTES:  # h11 bounds only heads that arrive in pieces
            return await _error(400, f"request head of {head} bytes, at most {MAX_HEAD_BYTES}",
                                {"Connection": "close"})(scope, receive, send)
        images = scope["path"].startswith("/images/")
        if self.expected is not None and (images or scope["path"].startswith("/api/")):
            if not self._authorized(scope, images):
                how = "Authorization: Bearer TOKEN" + (", or ?token=TOKEN on image files" if images else "")
                return await _error(401, f"missing or wrong bearer token ({how}); in a browser, open the page as "
                                         f"/#token=TOKEN", {"WWW-Authenticate": "Bearer"})(scope, receive, send)
        head_only = scope["method"] == "HEAD"
        if head_only:  # routes answer GET; the server (whose scope still says HEAD) sends no body
            scope = dict(scope, method="GET")

        async def guarded(message):
            if message["type"] == "http.response.start":
                message = dict(message, headers=[*message.get("headers", []), *_SAFE_HEADERS])
            elif head_only and message["type"] == "http.response.body":
                message = dict(message, body=b"")
            await send(message)

        await self.app(scope, receive, guarded)


def create_app(index: SearchIndex, token: Optional[str] = None, workers: int = 1, queue: int = 8,
               limits: Limits = Limits(), model_nice: int = 10, processes: bool = False, threads: int = 1):
    """The ASGI app for `index` (see the module doc). app.state.pool is the model pool (`ModelPool`): worker
    processes when `processes` (each reopens the index from `index.source`, so the index must come from
    `SearchIndex.load`; `threads` torch threads each), else threads of this process; either runs `model_nice`
    steps below the event loop's priority (cheap requests first when the CPU is short)."""
    _require()
    from contextlib import asynccontextmanager

    service = ExplainService(index, limits)
    if processes and index.source is None:
        raise ValueError("model worker processes reopen the index from its path: open it with SearchIndex.load")
    pool = ModelPool(service, workers, queue, model_nice, index_source=index.source if processes else None,
                     limits=limits, threads=threads)

    @asynccontextmanager
    async def lifespan(app):
        await pool.start()  # worker processes load the index before the first request, not during it
        yield
        pool.shutdown()

    app = FastAPI(title="tvrn search", docs_url=None, redoc_url=None, openapi_url="/api/openapi.json",
                  lifespan=lifespan)
    app.state.pool, app.state.service = pool, service

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):  # unknown paths (404), wrong methods (405), ...
        message = {404: f"no such path {request.url.path[:200]!r}",
                   405: f"method {request.method} is not allowed here (GET or HEAD; POST on /api/query-image)"}.get(exc.status_code, str(exc.detail))
        return _error(exc.status_code, message, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc):
        return _error(400, f"bad request: {exc.errors()[:1]}")

    @app.exception_handler(ServiceError)
    async def service_error(request, exc: ServiceError):
        return _error(exc.status, exc.message, {"Retry-After": str(exc.retry_after)} if exc.retry_after else None)

    @app.exception_handler(Exception)
    async def internal_error(request, exc):
        return _error(500, f"internal error: {type(exc).__name__}")

    app.add_middleware(_Guard, token=token)

    get = app.get  # HEAD is answered as GET, without the body (_Guard; uvicorn drops a HEAD's body)
    page_bytes = page_html()

    @get("/")
    async def page():
        return Response(page_bytes, media_type="text/html; charset=utf-8")

    @get("/index.html")
    async def page_alias():
        return await page()

    @get("/api/info")
    async def info():
        return JSONResponse(service.info())  # a Response: FastAPI's encoder (slow) is skipped

    @get("/api/search")
    async def search(q: Optional[str] = None, k: Optional[str] = None, shortlist: Optional[str] = None):
        service.check_query(q)  # cheap refusals never queue
        return JSONResponse(await pool.run("search", q, k, shortlist))

    @get("/api/image/{raw}")
    async def image(raw: str, k: Optional[str] = None, shortlist: Optional[str] = None):
        parse_index(raw, index.num_images, "gallery image")
        return JSONResponse(await pool.run("image", raw, k, shortlist))

    @get("/api/explain")
    async def explain(q: Optional[str] = None, image: Optional[str] = None):
        service.check_query(q)  # cheap refusals never queue
        if image is None or image == "":
            raise ServiceError(400, "parameter image (the gallery image to explain) is missing")
        parse_index(image, index.num_images, "gallery image")
        return JSONResponse(await pool.run("explain", q, image))

    @app.post("/api/query-image")
    async def query_image(request: Request, k: Optional[str] = None, shortlist: Optional[str] = None):
        # refusals that need no body come first: nothing of it is read (or buffered) for them
        declared = request.headers.get("content-length")
        if declared and declared.isascii() and declared.isdigit() and int(declared) > limits.max_upload_bytes:
            raise ServiceError(413, f"image of {declared} bytes, at most {limits.max_upload_bytes}")
        if looks_multipart(request.headers.get("content-type")):
            raise ServiceError(400, MULTIPART)
        pool.reserve()  # 503 now when the pool is full; else the place is this upload's while its body arrives
        handed = False
        try:
            body = bytearray()
            try:
                async with asyncio.timeout(limits.body_timeout_s):  # a body trickling in holds nothing for long
                    async for chunk in request.stream():  # bounded read: stop at the limit
                        body += chunk
                        if len(body) > limits.max_upload_bytes:
                            raise ServiceError(413, f"image above {limits.max_upload_bytes} bytes")
            except TimeoutError:
                return _error(408, f"the request body did not arrive within {limits.body_timeout_s:g} s "
                                   f"({len(body)} bytes came)", {"Connection": "close"})
            except ClientDisconnect:  # the client left mid-body: its place is given back, nobody to answer
                return Response(status_code=400)
            handed = True  # run() releases the place
            return JSONResponse(await pool.run("image_file", bytes(body), k, shortlist, reserved=True))
        finally:
            if not handed:
                pool.release()

    @get("/images/{raw}")
    async def image_file(raw: str):
        file = index.image_path(parse_index(raw, index.num_images, "gallery image"))
        data = None if file is None else \
            await asyncio.get_running_loop().run_in_executor(None, _read_image_file, file, index.image_dir)
        if data is None:
            raise ServiceError(404, f"gallery image {raw} has no image file in this index (only regular files "
                                    f"inside its image folder are served)")
        return Response(data, media_type=mimetypes.guess_type(file.name)[0] or "application/octet-stream")

    return app


def _read_image_file(file: Path, image_dir: str) -> Optional[bytes]:
    """The bytes of `file` when it is a regular file inside `image_dir` once links are resolved, else None. Read
    through the resolved path without following a link there, and checked again on the open file (a file
    swapped for a link or a FIFO after the check is not read)."""
    try:
        real = inside_folder(file, Path(image_dir).resolve())
        if real is None:
            return None
        fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except (OSError, RuntimeError, ValueError):
        return None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return None
        return f.read()


class ServerThread:
    """uvicorn in a background thread (tests, notebooks): `with ServerThread(app) as url: ...`; port 0 picks a
    free port."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, **config):
        import uvicorn

        self.server = uvicorn.Server(make_config(app, host, port, quiet=True, **config))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server thread stopped before it started listening")
            threading.Event().wait(0.02)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def serve(index: SearchIndex, host: str = "127.0.0.1", port: int = 8000, quiet: bool = False,
          token: Optional[str] = None, workers: int = 1, queue: int = 8, header_timeout: float = 10.0,
          ready: Optional[Callable[[str], None]] = None, threads: Optional[int] = None,
          model_nice: int = 10, processes: bool = True, http: str = "auto", limits: Limits = Limits()) -> None:
    """Serve until interrupted. ready(url) is called once the socket listens. Model calls run in `workers`
    worker processes (`processes`, when the index was opened from a path; else threads) with `threads` torch
    threads each (default: CPU cores - 1, so the event loop answering cheap requests and 503s keeps a core).
    The workers are spawned, and a spawned process imports the main module: from a script, call serve under
    `if __name__ == "__main__":`."""
    import torch
    import uvicorn

    threads = threads or max(1, (os.cpu_count() or 1) - 1)
    processes = processes and index.source is not None
    if not processes:
        torch.set_num_threads(threads)
    app = create_app(index, token, workers, queue, limits=limits, model_nice=model_nice, processes=processes,
                     threads=threads)
    server = uvicorn.Server(make_config(app, host, port, quiet, header_timeout, http=http))
    if ready is not None:
        original = server.startup

        async def startup(sockets=None):
            await original(sockets)
            if server.started:
                h, p = server.servers[0].sockets[0].getsockname()[:2]
                ready(f"http://{h}:{p}")

        server.startup = startup
    server.run()

